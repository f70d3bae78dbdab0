"""The low layer: one publication decoded once and encoded once small (≤ 320×240, ≤ 150 kbit/s)
for every subscriber whose link cannot take the full picture. It runs in a thread of its own,
so the event loop never waits on a codec, and exists only while someone receives it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from fractions import Fraction

import av
from av.codec.context import CodecContext
from av.video.codeccontext import VideoCodecContext
from av.video.frame import PictureType, VideoFrame

from media.forwarding import VIDEO_CLOCK, Publication
from media.frames import EncodedFrame

log = logging.getLogger(__name__)

MAX_WIDTH, MAX_HEIGHT = 320, 240
BITRATE = 150_000
# Source frames waiting for the codec thread; past this the layer skips to the next keyframe.
QUEUE_FRAMES = 30


class LowLayer:
    def __init__(self, source: Publication) -> None:
        self.source = source
        self.publication = Publication(
            "video", self._keyframe_wanted, counters=source.counters, from_publisher=False
        )
        # Same timestamps as the full layer, so a subscriber switching layers sees no jump.
        self.publication.share_clock(source)
        self._loop = asyncio.get_running_loop()
        self._frames: queue.Queue[EncodedFrame | None] = queue.Queue(maxsize=QUEUE_FRAMES)
        self._force_keyframe = threading.Event()
        self._skipping = True  # until the first keyframe from the source
        self.frames_encoded = 0
        source.add_listener(self._on_source_frame)
        self._thread = threading.Thread(target=self._run, name="low-layer", daemon=True)
        self._thread.start()
        source.want_keyframe()

    def _on_source_frame(self, frame: EncodedFrame) -> None:
        if self._skipping and not frame.keyframe:
            # Asked again while waiting (the publication spaces the requests): one request
            # alone is dropped when another was made just before, and the keyframe that
            # answered that one may have come before this layer listened.
            self.source.want_keyframe()
            return
        self._skipping = False
        try:
            self._frames.put_nowait(frame)
        except queue.Full:
            # The codec fell behind: a decoder cannot skip frames, so restart at a keyframe.
            self._skipping = True
            self.source.want_keyframe()

    async def _keyframe_wanted(self) -> None:
        self._force_keyframe.set()

    def close(self) -> None:
        self.source.remove_listener(self._on_source_frame)
        self.publication.end()
        while True:
            try:
                self._frames.put_nowait(None)
                return
            except queue.Full:
                # Frames not yet transcoded are not wanted any more: make room to stop.
                with contextlib.suppress(queue.Empty):
                    self._frames.get_nowait()

    def _run(self) -> None:
        decoder = CodecContext.create("libvpx", "r")
        encoder: VideoCodecContext | None = None
        while (frame := self._frames.get()) is not None:
            try:
                for picture in decoder.decode(av.Packet(frame.data)):
                    assert isinstance(picture, VideoFrame)
                    if self._frames.qsize() > 1 and not self._force_keyframe.is_set():
                        # Behind: every frame must be decoded (the next ones refer to it), but
                        # encoding can skip a picture; the low layer's frame rate gives way.
                        continue
                    if encoder is None:
                        encoder = _create_encoder(picture.width, picture.height)
                    small = picture.reformat(
                        width=encoder.width, height=encoder.height, format="yuv420p"
                    )
                    small.pts = frame.timestamp
                    small.time_base = Fraction(1, VIDEO_CLOCK)
                    if self._force_keyframe.is_set():
                        self._force_keyframe.clear()
                        small.pict_type = PictureType.I
                    for packet in encoder.encode(small):
                        self.frames_encoded += 1
                        out = EncodedFrame(bytes(packet), frame.timestamp, packet.is_keyframe)
                        self._hand_over(self.publication.push, out)
            except (av.FFmpegError, ValueError):
                log.warning("low layer could not transcode a frame", exc_info=True)
                self._skipping = True
                self._hand_over(self.source.want_keyframe)

    def _hand_over(self, callback: Callable[..., None], *args: object) -> None:
        """Runs `callback` on the event loop, unless the loop is already gone (shutdown)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)


def _create_encoder(width: int, height: int) -> VideoCodecContext:
    scale = min(1.0, MAX_WIDTH / width, MAX_HEIGHT / height)
    encoder = CodecContext.create("libvpx", "w")
    assert isinstance(encoder, VideoCodecContext)
    # Even sizes: the chroma planes of yuv420p are half the size.
    encoder.width = max(2, int(width * scale) // 2 * 2)
    encoder.height = max(2, int(height * scale) // 2 * 2)
    encoder.pix_fmt = "yuv420p"
    encoder.bit_rate = BITRATE
    encoder.time_base = Fraction(1, VIDEO_CLOCK)
    encoder.gop_size = 3000
    encoder.options = {
        "deadline": "realtime",
        "cpu-used": "-6",
        "lag-in-frames": "0",
        "minrate": str(BITRATE),
        "maxrate": str(BITRATE),
        "bufsize": str(BITRATE),
        "partitions": "0",
        "static-thresh": "1",
        "undershoot-pct": "100",
        "overshoot-pct": "15",
    }
    return encoder
