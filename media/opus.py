"""What the relay reads of an Opus packet (RFC 6716) without decoding it: whether it carries
in-band FEC, the LBRR ("low bit-rate redundancy") copy of the frame before it, which a receiver
decodes when that frame was lost; and how much loss to tell an Opus publisher of, so that it
adds the FEC its subscribers' links need."""

from __future__ import annotations


def has_fec(packet: bytes) -> bool:
    """Whether the packet's first frame carries LBRR data (in-band FEC for the packet before).

    The TOC byte (section 3.1) gives the mode: LBRR exists only where SILK codes (SILK-only
    and hybrid modes, configurations 0-15), never in CELT-only packets. The SILK layer of a
    frame starts with one VAD flag per 20 ms SILK frame (one for 10 and 20 ms Opus frames, two
    for 40 ms, three for 60 ms) and then the LBRR flag, per channel (mid, then side in stereo)
    (section 4.2.3). Those flags are range coded with probability 1/2 each, which leaves them as
    the plain leading bits of the frame's first byte (each halves the range exactly, as
    `ec_dec_bit_logp` with logp 1 does), so they are read with shifts. A frame of no bytes
    (DTX, or a lost frame's placeholder) carries nothing."""
    if not packet:
        return False
    toc = packet[0]
    config = toc >> 3
    if config >= 16:  # CELT-only
        return False
    # SILK-only packets are 10, 20, 40 or 60 ms; hybrid ones 10 or 20 ms.
    silk_frames = (1, 1, 2, 3)[config & 3] if config < 12 else 1
    start = _first_frame(packet)
    if start is None:
        return False
    first = packet[start]
    if (first >> (7 - silk_frames)) & 1:
        return True
    # The side channel's flags follow the mid channel's VAD flags and LBRR flag.
    return bool(toc & 0x04) and bool((first >> (6 - 2 * silk_frames)) & 1)


def _first_frame(packet: bytes) -> int | None:
    """Where the first frame's data starts (section 3.2), or None if it has no byte."""
    code = packet[0] & 0x03
    size = len(packet)
    if code in (0, 1):
        start = 1
        length = size - 1 if code == 0 else (size - 1) // 2
    elif code == 2:
        if size < 2:
            return None
        start, length = _frame_length(packet, 1)
    else:
        if size < 2:
            return None
        count_byte = packet[1]
        vbr, padded = count_byte & 0x80, bool(count_byte & 0x40)
        at = 2
        padding = 0
        while padded:
            if at >= size:
                return None
            chunk = packet[at]
            at += 1
            padding += 254 if chunk == 255 else chunk
            padded = chunk == 255
        frames = count_byte & 0x3F
        if not frames:
            return None
        if vbr and frames > 1:
            # Frames 1..M-1 have their lengths here; the data starts after the last of them.
            start, length = _frame_length(packet, at)
            for _ in range(frames - 2):
                start, _other = _frame_length(packet, start)
        else:
            start = at
            length = (size - at - padding) // frames
    if length <= 0 or start >= size:
        return None
    return start


def _frame_length(packet: bytes, at: int) -> tuple[int, int]:
    """A frame length coded at `at` in one or two bytes (section 3.2.1): where the bytes after
    it start, and the length (0 if the packet ends first)."""
    if at >= len(packet):
        return at, 0
    first = packet[at]
    if first < 252:
        return at + 1, first
    if at + 1 >= len(packet):
        return at + 1, 0
    return at + 2, first + 4 * packet[at + 1]


# A subscriber's receiver report older than this no longer speaks for its link. libwebrtc
# reports on a received audio stream every 5 s on average (0.5 to 1.5 times that): two of
# its reports may be 7.5 s apart.
DOWNSTREAM_REPORT_FRESH_S = 10.0
# The most downstream loss told to a publisher: libwebrtc's Opus encoder sizes its FEC for
# loss up to 20 % (it rounds the rate to 0, 1, 5, 10 or 20 %), and the same report feeds the
# publisher's loss-based rate control, which should not take a subscriber's bad link for
# congestion on its own uplink.
DOWNSTREAM_LOSS_CAP = 0.20


def loss_to_report_upstream(reports: list[tuple[float, float]], now: float) -> float:
    """The loss the relay tells an Opus publisher about, besides its own uplink's: the worst
    fresh `(arrival time, fraction lost)` report among the subscribers of its audio, capped.

    The relay forwards the publisher's packets unchanged, so the in-band FEC a subscriber
    needs on its own downlink can only come from the publisher, and the publisher's encoder
    adds FEC only for the loss its receiver reports say (LiveKit does the same)."""
    fresh = [lost for at, lost in reports if now - at <= DOWNSTREAM_REPORT_FRESH_S]
    return min(max(fresh, default=0.0), DOWNSTREAM_LOSS_CAP)
