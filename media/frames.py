"""The two shapes a frame takes in the relay: as it arrived from a publisher (`EncodedFrame`,
re-assembled by media/frame_assembler.py) and as it is sent to subscribers (`PackedFrame`,
split into RTP payloads once for all of them, sent by media/frame_sender.py). Plain data: what
forwarding, the low layer and the recorders pass around without touching aiortc."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedFrame:
    """One re-assembled frame as it arrived: VP8 (without RTP payload descriptors) or Opus."""

    data: bytes
    # RTP timestamp of the frame, unwrapped to keep increasing past 2**32.
    timestamp: int
    keyframe: bool


FrameSink = Callable[[EncodedFrame], None]


@dataclass(frozen=True)
class PackedFrame:
    """A frame already split into RTP payloads, shared by every sender that forwards it."""

    payloads: list[bytes]
    # In the codec's clock (90 kHz video, 48 kHz Opus), relative to the publication's start.
    timestamp: int
    # Encoded bytes (without RTP payload descriptors), for bitrate figures.
    size: int
    # Bytes of all payloads (with descriptors), for the RTCP sender report's octet count.
    payload_bytes: int
    # Several payloads, all but the last of one size and the last no larger: the packets can
    # go out in one segmented send.
    uniform: bool


# A frame the sender could not send now (not connected yet, or the socket's queue is full):
# the caller drops it (and video resumes at a keyframe).
FrameSend = Callable[[PackedFrame], bool]
