"""What a publish offer asks to publish, read from its SDP before aiortc sees it: each media
section's mid, kind and direction, and the rules every section that would publish must meet
(named, with a source of its kind, within the caps). A section aiortc would turn into a track
must never be published under a default name, unchecked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiortc.sdp import SessionDescription

from media.errors import MediaError

# What each source carries (rooms.model.TrackSource values).
SOURCE_KIND = {"camera": "video", "field_camera": "video", "screen": "video", "microphone": "audio"}
# An offer section in one of these directions sends media to the relay.
SENDING = frozenset({"sendrecv", "sendonly"})


@dataclass(frozen=True)
class PublishLimits:
    # Media sections (m-lines, of any kind) in one publish offer. A renegotiation offer holds
    # every section of the connection, so this caps the connection.
    max_sections: int = 8
    # Tracks one participant has published at once, over all the offers of their connection.
    max_tracks: int = 6


@dataclass(frozen=True)
class OfferedSection:
    mid: str | None
    kind: str
    # As the offer says; "sendrecv" where it says nothing (the SDP default, RFC 8866 §6.7).
    direction: str

    @property
    def publishes(self) -> bool:
        """Whether the section sends audio or video to the relay. The port does not count:
        aiortc ignores it, so a port-0 ("rejected") section that says sendonly still becomes a
        track."""
        return self.kind in SOURCE_KIND.values() and self.direction in SENDING


def offered_sections(sdp: str) -> list[OfferedSection]:
    """Every media section of the offer, read by the parser aiortc itself uses on it. Text
    that is not SDP, or that the parser cannot read, is a MediaError (never another
    exception); so are two sections with the same mid."""
    if not sdp.lstrip().startswith("v=0"):
        raise MediaError("the offer is not SDP (it must start with v=0)")
    try:
        media = SessionDescription.parse(sdp).media
    except Exception:
        raise MediaError("the offer is not valid SDP") from None
    sections = [OfferedSection(m.rtp.muxId, m.kind, m.direction or "sendrecv") for m in media]
    mids = [s.mid for s in sections if s.mid is not None]
    if len(mids) != len(set(mids)):
        raise MediaError("two sections of the offer have the same mid")
    return sections


def publishing_sources(
    sections: list[OfferedSection], sources: Mapping[str, str], limits: PublishLimits
) -> dict[str, str]:
    """The source (by mid) of every section of the offer that would publish, once the offer
    meets the rules that depend on it alone: at most `limits.max_sections` sections, one of
    them audio or video; every name
    in `sources` is a section of the offer, with a source of that section's kind; every section
    that would publish is named, sections kept from an earlier offer too. Sections that do not
    publish (recvonly, inactive) need no name."""
    if len(sections) > limits.max_sections:
        raise MediaError(
            f"the offer has {len(sections)} sections; a publish connection has at most "
            f"{limits.max_sections}",
            "too_many_sections",
        )
    if not any(s.kind in SOURCE_KIND.values() for s in sections):
        raise MediaError("the offer has no audio or video section")
    by_mid = {s.mid: s for s in sections if s.mid is not None}
    unknown = sorted(set(sources) - set(by_mid))
    if unknown:
        raise MediaError(
            f"tracks names sections the offer does not have: {unknown}", "unknown_section"
        )
    for mid, source in sources.items():
        kind = by_mid[mid].kind
        if SOURCE_KIND.get(source) != kind:
            raise MediaError(
                f"section {mid} is {kind}; {source} is {SOURCE_KIND.get(source, 'unknown')}",
                "source_mismatch",
            )
    unnamed = [s for s in sections if s.publishes and (s.mid is None or s.mid not in sources)]
    if unnamed:
        # The mid comes from the SDP, not the schema: shown cut short and quoted.
        described = ", ".join(
            f"{s.kind[:16]} {s.mid[:32]!r}" if s.mid is not None else f"{s.kind[:16]} (no mid)"
            for s in unnamed
        )
        raise MediaError(
            f"every section that sends media must be named in tracks; not named: {described}",
            "unnamed_section",
        )
    return {s.mid: sources[s.mid] for s in sections if s.publishes and s.mid is not None}
