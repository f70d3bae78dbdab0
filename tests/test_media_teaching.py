"""Teaching: one presenter publishes camera, microphone and screen; ten trainees, each through
an invite and the waiting room, only watch. Every trainee must receive the presenter's picture
(counter advancing), screen and tone; a trainee may not publish anything."""

from __future__ import annotations

from media_client import MediaRoom, TrackingMediaClient
from media_peers import (
    ColourCounterTrack,
    ToneTrack,
    close_to,
    dominant_frequency,
    mean_colour,
    read_counter,
)
from signaling_fixtures import eventually

from rooms.model import ConsultationKind
from rooms.roles import Role
from server.demo import SPECIALIST

pytest_plugins = ["signaling_fixtures", "media_client"]

SIZE = {"width": 160, "height": 120}
TRAINEES = 10
# Half are admitted before the presenter publishes (they get the tracks by renegotiation),
# half after (they get them in their first offer).
EARLY_TRAINEES = TRAINEES // 2
CAMERA_COLOUR = (200, 80, 40)
SCREEN_COLOUR = (240, 240, 240)
TONE = 440.0


async def admit_trainee(
    room: MediaRoom, cid: str, presenter: TrackingMediaClient, n: int
) -> TrackingMediaClient:
    """A trainee with an invite joins, waits, and the presenter admits them."""
    token, invite = await room.server.invite(cid, Role.TRAINEE, f"学员{n}")
    trainee, pid = await room.waiting(token, cid, label=f"trainee-{n}")
    # The presenter, who may admit, sees them waiting.
    await presenter.peer.wait_for("waiting", lambda w: w["participant"]["participant_id"] == pid)
    await presenter.peer.ok("admit", {"participant": pid})
    joined = await trainee.peer.wait_for("joined")
    assert joined["kind"] == "teaching"
    assert (joined["you"]["role"], joined["you"]["user_id"]) == ("trainee", invite.user_id)
    return trainee


async def test_ten_trainees_watch_the_presenter_and_may_not_publish(media_room: MediaRoom) -> None:
    cid = (await media_room.server.scheduled(kind=ConsultationKind.TEACHING)).id
    presenter = await media_room.seated(SPECIALIST, cid, label="presenter")
    trainees = [await admit_trainee(media_room, cid, presenter, n) for n in range(EARLY_TRAINEES)]

    camera = ColourCounterTrack(CAMERA_COLOUR, **SIZE)
    screen = ColourCounterTrack(SCREEN_COLOUR, **SIZE)
    ack = await presenter.publish(
        [(camera, "camera"), (ToneTrack(TONE), "microphone"), (screen, "screen")]
    )
    assert ack == {"ok": True}, ack
    trainees += [
        await admit_trainee(media_room, cid, presenter, n) for n in range(EARLY_TRAINEES, TRAINEES)
    ]

    presenter_pid = presenter.peer.participant_id
    published = {t["track_id"]: t for t in presenter.peer.events("track_published")}
    assert sorted((t["kind"], t["source"]) for t in published.values()) == [
        ("audio", "microphone"),
        ("video", "camera"),
        ("video", "screen"),
    ]
    by_source = {t["source"]: t["track_id"] for t in published.values()}

    for trainee in trainees:
        label = trainee.peer.label
        await eventually(
            lambda t=trainee: len(t.offered()) == 3 and t.settled(), f"{label}'s offer"
        )
        assert {i["track_id"] for i in trainee.offered().values()} == set(by_source.values())
        assert {i["participant"] for i in trainee.offered().values()} == {presenter_pid}
    for trainee in trainees:
        label = trainee.peer.label
        await eventually(
            lambda t=trainee: (
                t.frames_of(by_source["camera"]) >= 30
                and t.frames_of(by_source["screen"]) >= 10
                and t.frames_of(by_source["microphone"]) >= 50
            ),
            f"{label} receives the presenter's camera, screen and microphone",
            within=20,
        )
    for trainee in trainees:
        label = trainee.peer.label
        got = trainee.collector(by_source["camera"])
        assert got is not None
        counters = [read_counter(f) for f in got.frames]  # type: ignore[arg-type]
        assert counters == sorted(counters), (label, counters)
        assert counters[-1] - counters[0] >= 25, (label, counters)
        assert counters[-1] <= camera.count
        assert all(close_to(mean_colour(f), CAMERA_COLOUR) for f in got.frames[-5:]), label  # type: ignore[arg-type]
        shown = trainee.collector(by_source["screen"])
        assert shown is not None
        assert close_to(mean_colour(shown.frames[-1]), SCREEN_COLOUR), label  # type: ignore[arg-type]
        sound = trainee.collector(by_source["microphone"])
        assert sound is not None
        assert abs(dominant_frequency(sound.frames[-50:]) - TONE) < 20, label  # type: ignore[arg-type]

    # A trainee's publish offer, of any source, is refused; nothing is published.
    offender = trainees[0]
    before = len(presenter.peer.events("track_published"))
    refusal = await offender.publish([(ColourCounterTrack((0, 0, 0), **SIZE), "camera")])
    assert refusal["ok"] is False and refusal["error"]["code"] == "forbidden", refusal
    assert refusal["error"]["event"] == "publish_offer"
    assert offender.peer.events("publish_answer") == []
    microphone_only = trainees[1]
    refusal = await microphone_only.publish([(ToneTrack(300.0), "microphone")])
    assert refusal["ok"] is False and refusal["error"]["code"] == "forbidden", refusal
    # Everyone has heard everything the refusals could have caused by the time a later
    # announcement (a chat message, after the refusals) arrives.
    await presenter.peer.ok("chat", {"text": "大家看这里"})
    for client in (presenter, *trainees):
        await client.peer.wait_for("chat_message", lambda m: m["text"] == "大家看这里")
        owners = {t["participant"] for t in client.peer.events("track_published")}
        assert owners <= {presenter_pid}, (client.peer.label, owners)
    assert len(presenter.peer.events("track_published")) == before == 3
    assert {t.track_id for t in media_room.hub.tracks(cid)} == set(by_source.values())
    # The presenter is offered nothing: trainees publish nothing.
    assert presenter.offered() == {}
    assert presenter.received == {}
