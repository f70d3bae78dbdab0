"""When a session may be recorded, and how the room sees its recorder.

Recording needs the resident's own consent to recording (given by them or their guardian),
and for a teaching session also their consent to teaching use: the two are separate consents
(domain.md). The newest consent of each kind counts, so a withdrawal ends it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rooms.live import RecordingOn
from rooms.model import Consent, ConsentKind, Consultation, ConsultationKind

# The recorder's seat in participant lists; no participant id of a person looks like it.
RECORDER_ID = "recorder"


def consents_needed(consultation: Consultation) -> tuple[ConsentKind, ...]:
    if consultation.kind is ConsultationKind.TEACHING:
        return (ConsentKind.RECORDING, ConsentKind.TEACHING)
    return (ConsentKind.RECORDING,)


def missing_consent(consultation: Consultation, consents: Iterable[Consent]) -> ConsentKind | None:
    """The first needed consent the resident has not given (or has withdrawn), if any.
    `consents` are oldest first, as the record keeps them."""
    newest: dict[ConsentKind, bool] = {}
    for consent in consents:
        if consent.on_behalf_of == consultation.resident.pseudonym:
            newest[consent.kind] = consent.granted
    return next((k for k in consents_needed(consultation) if not newest.get(k, False)), None)


def recorder_participant(recording: RecordingOn) -> dict[str, Any]:
    """The recorder as a participant object, so that every list of who is in the room shows
    that the session is being recorded."""
    return {
        "participant_id": RECORDER_ID,
        "user_id": RECORDER_ID,
        "name": "录制 Recording",
        "role": "recorder",
        "org": "",
        "device": "server",
        "state": "admitted",
        "joined_at": recording.at.isoformat(),
        "hand_raised": False,
        "audio_muted": True,
        "video_muted": True,
        "connected": True,
    }
