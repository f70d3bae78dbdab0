"""PYTEST_DONT_REWRITE
Helpers for the server-side recording tests: reading recording rows and their files from a
running app's store, checking decoded content (through the seal, with the app's keys), and the
real server as a child process that a test can `kill -9`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import aiohttp
import av
import numpy as np
from record_helpers import signing_key_file
from recording_helpers import Decoded, decode, has_tone

from media.sealed import SealedReader, SealedWriter, media_input, plaintext_sha256
from rooms.model import (
    ConsultationId,
    Recording,
    RecordingId,
    RecordingKind,
    RecordingState,
    SessionId,
)
from server.app import CONFIG, RECORDING_KEYS, STORE

Colour = tuple[int, int, int]


async def recordings_of(app: Any, cid: str) -> list[tuple[Recording, Path | None]]:
    """Every recording row of the consultation with its file's absolute path (the store keeps
    it relative to data_dir)."""
    store = app[STORE]
    data_dir: Path = app[CONFIG].data_dir
    async with store.reading() as tx:
        rows = await tx.list_recordings(ConsultationId(cid))
        paths = {
            s.recording.id: s.path
            for session_id in {r.session_id for r in rows}
            for s in await tx.list_stored_recordings(session_id=session_id)
        }
    return [(r, data_dir / p if (p := paths.get(r.id)) else None) for r in rows]


# The WebM (EBML) header: what every plaintext recording starts with.
EBML_MAGIC = b"\x1a\x45\xdf\xa3"


async def add_sealed_recording(app: Any, session_id: str, data: bytes) -> str:
    """A closed track segment of `session_id` that recorded `data`, as the recorder leaves it:
    its sealed file under data_dir, its path relative to it and its SHA-256 in the record."""
    recording_id = f"rec_{secrets.token_hex(8)}"
    relative = f"recordings/{session_id}/{recording_id}.webm"
    path: Path = app[CONFIG].data_dir / relative

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with SealedWriter(path, app[RECORDING_KEYS]) as sealed:
            sealed.write(data)

    await asyncio.to_thread(write)
    now = datetime.now(UTC)
    row = Recording(
        id=RecordingId(recording_id),
        session_id=SessionId(session_id),
        track="t-video",
        kind=RecordingKind.TRACK.value,
        media_type="video/webm",
        sha256=hashlib.sha256(data).hexdigest(),
        duration_s=1.0,
        size_bytes=len(data),
        state=RecordingState.COMPLETE.value,
        started_at=now,
        ended_at=now,
    )
    async with app[STORE].transaction() as tx:
        await tx.add_recording(row, path=relative)
    return recording_id


def sha256_of(app: Any, path: Path, *, unfinished_ok: bool = False) -> tuple[str, int]:
    """SHA-256 and size of what was recorded into the sealed file."""
    return plaintext_sha256(path, app[RECORDING_KEYS], unfinished_ok=unfinished_ok)


def plaintext(app: Any, path: Path, *, unfinished_ok: bool = False) -> bytes:
    with SealedReader(path, app[RECORDING_KEYS], unfinished_ok=unfinished_ok) as reader:
        return reader.read_span(0, reader.size)


def decoded(app: Any, path: Path) -> Decoded:
    return decode(path, app[RECORDING_KEYS])


def colour_fraction(image: np.ndarray, colour: Colour, tolerance: int = 40) -> float:
    """How much of an RGB image is within `tolerance` of `colour` in every channel."""
    diff = np.abs(image.astype(np.int16) - np.array(colour, dtype=np.int16))
    return float(np.all(diff <= tolerance, axis=-1).mean())


@dataclass
class CompositeContent:
    video_frames: int
    duration_s: float
    middle: np.ndarray  # RGB picture from the middle of the video
    audio: np.ndarray  # mono float samples
    rate: int
    video_codec: str
    audio_codec: str


def read_composite(app: Any, path: Path) -> CompositeContent:
    keys = app[RECORDING_KEYS]
    with media_input(path, keys) as container:
        vstream = container.streams.video[0]
        video_codec = vstream.codec_context.name
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(vstream)]
    with media_input(path, keys) as container:
        astream = container.streams.audio[0]
        audio_codec = astream.codec_context.name
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48_000)
        chunks = [
            out.to_ndarray().reshape(-1).astype(np.float64)
            for f in container.decode(astream)
            for out in resampler.resample(f)
        ]
        duration = float(container.duration or 0) / av.time_base
    return CompositeContent(
        len(frames),
        duration,
        frames[len(frames) // 2],
        np.concatenate(chunks),
        48_000,
        video_codec,
        audio_codec,
    )


def tones_present(signal: np.ndarray, rate: int, tones: list[float]) -> dict[float, bool]:
    return {f: has_tone(signal, rate, f) for f in tones}


# --- the server as a child process ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(path: Path, data_dir: Path) -> None:
    """A config for `telemed serve` outside development mode, with a recording key file
    beside it."""
    key_file = path.parent / "recording.key"
    key_file.write_bytes(os.urandom(32))
    path.write_text(
        "\n".join(
            [
                'log_level = "WARNING"',
                f'data_dir = "{data_dir}"',
                "[signaling]",
                "reconnect_grace_s = 3600",
                "empty_room_grace_s = 3600",
                "[media]",
                'host_addresses = ["127.0.0.1"]',
                "[recording]",
                f'key_file = "{key_file}"',
                "",
            ]
        ),
        encoding="utf-8",
    )


def telemed_command() -> list[str]:
    script = Path(sys.executable).parent / "telemed"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())"]


class ServerProcess:
    """`telemed --config FILE serve` on a free port, its output in a log file."""

    def __init__(self, config: Path, secret: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMED_")}
        env["TELEMED_JWT_SECRET"] = secret
        key = log_path.parent / "signing-key.pem"
        env["TELEMED_SIGNING_KEY_FILE"] = str(
            key if key.exists() else signing_key_file(log_path.parent)
        )
        argv = [*telemed_command(), "--config", str(config), "serve"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def ready(self, within: float = 120.0) -> None:
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the server exited early:\n{self.tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(
                        self.url + "/readyz", timeout=aiohttp.ClientTimeout(total=5)
                    ) as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server is not ready:\n{self.tail()}")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the server."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()
