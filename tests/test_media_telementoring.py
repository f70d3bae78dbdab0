"""Telementoring: the county surgeon operates with two devices in the room, one filming the
team (`camera`) and one over the operating field (`field_camera`), and the provincial
specialist mentors from afar. One user, two devices, two participants: the specialist must
receive both pictures, each named with its own participant and source."""

from __future__ import annotations

from media_client import MediaRoom
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
from server.demo import COUNTY, SPECIALIST

pytest_plugins = ["signaling_fixtures", "media_client"]

SIZE = {"width": 160, "height": 120}
ROOM_COLOUR = (200, 60, 60)
FIELD_COLOUR = (60, 200, 200)
SPECIALIST_COLOUR = (220, 200, 40)
SURGEON_TONE = 600.0


async def test_the_mentor_receives_both_of_the_surgeons_devices(media_room: MediaRoom) -> None:
    cid = (await media_room.server.scheduled(kind=ConsultationKind.TELEMENTORING)).id
    room_cam = await media_room.seated(COUNTY, cid, label="room-cam", device="room-cam")
    field_cam = await media_room.seated(COUNTY, cid, label="field-cam", device="field-cam")
    mentor = await media_room.seated(SPECIALIST, cid, label="mentor")
    assert mentor.peer.snapshot["kind"] == "telementoring"

    # Two seats of one user, told apart by their device labels.
    room_pid, field_pid = room_cam.peer.participant_id, field_cam.peer.participant_id
    assert room_pid != field_pid
    seats = {p["participant_id"]: p for p in mentor.peer.snapshot["participants"]}
    assert (seats[room_pid]["user_id"], seats[room_pid]["device"]) == (COUNTY.user_id, "room-cam")
    assert (seats[field_pid]["user_id"], seats[field_pid]["device"]) == (
        COUNTY.user_id,
        "field-cam",
    )

    cameras = {
        "camera": ColourCounterTrack(ROOM_COLOUR, **SIZE),
        "field_camera": ColourCounterTrack(FIELD_COLOUR, **SIZE),
    }
    ack = await room_cam.publish(
        [(cameras["camera"], "camera"), (ToneTrack(SURGEON_TONE), "microphone")]
    )
    assert ack == {"ok": True}, ack
    ack = await field_cam.publish([(cameras["field_camera"], "field_camera")])
    assert ack == {"ok": True}, ack
    assert await mentor.publish([(ColourCounterTrack(SPECIALIST_COLOUR, **SIZE), "camera")]) == {
        "ok": True
    }

    # The mentor is offered exactly the surgeon's three tracks, each named by device and source.
    await eventually(
        lambda: len(mentor.offered()) == 3 and mentor.settled(), "the mentor's offer of 3 tracks"
    )
    named = sorted((i["participant"], i["kind"], i["source"]) for i in mentor.offered().values())
    assert named == sorted(
        [
            (room_pid, "video", "camera"),
            (room_pid, "audio", "microphone"),
            (field_pid, "video", "field_camera"),
        ]
    )
    videos = {
        info["source"]: info["track_id"]
        for info in mentor.offered().values()
        if info["kind"] == "video"
    }
    (audio,) = mentor.offered_from(room_pid, "audio")
    for source, track_id in videos.items():
        await eventually(
            lambda t=track_id: mentor.frames_of(t) >= 30, f"the mentor sees the {source}"
        )
    await eventually(lambda: mentor.frames_of(audio) >= 50, "the mentor hears the surgeon")

    # Each picture is the device's own: colour, and a counter that advances with it.
    for source, colour in (("camera", ROOM_COLOUR), ("field_camera", FIELD_COLOUR)):
        got = mentor.collector(videos[source])
        assert got is not None
        assert all(close_to(mean_colour(f), colour) for f in got.frames[-10:]), source  # type: ignore[arg-type]
        counters = [read_counter(f) for f in got.frames]  # type: ignore[arg-type]
        assert counters == sorted(counters), (source, counters)
        assert counters[-1] - counters[0] >= 25, (source, counters)
        assert counters[-1] <= cameras[source].count
    sound = mentor.collector(audio)
    assert sound is not None
    assert abs(dominant_frequency(sound.frames[-50:]) - SURGEON_TONE) < 20  # type: ignore[arg-type]

    # The room was told of each track with its owner, source and who they are.
    published = {
        (t["participant"], t["kind"], t["source"], t["name"], t["role"])
        for t in mentor.peer.events("track_published")
    }
    assert {
        (room_pid, "video", "camera", COUNTY.name, "county_physician"),
        (field_pid, "video", "field_camera", COUNTY.name, "county_physician"),
    } <= published

    # Each device of the surgeon sees the mentor, and the other device (another participant).
    mentor_pid = mentor.peer.participant_id
    for device, other_pid, other_colour in (
        (room_cam, field_pid, FIELD_COLOUR),
        (field_cam, room_pid, ROOM_COLOUR),
    ):
        await eventually(
            lambda d=device: d.offered_from(mentor_pid, "video") and d.settled(),
            f"{device.peer.label} is offered the mentor",
        )
        for pid, colour in ((mentor_pid, SPECIALIST_COLOUR), (other_pid, other_colour)):
            (track_id,) = device.offered_from(pid, "video")
            await eventually(
                lambda d=device, t=track_id: d.frames_of(t) >= 10,
                f"{device.peer.label} receives {pid}",
            )
            got = device.collector(track_id)
            assert got is not None and close_to(mean_colour(got.frames[-1]), colour)  # type: ignore[arg-type]
