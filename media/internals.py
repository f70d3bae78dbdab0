"""Whether the installed aiortc, aioice and pylibsrtp still have what the relay reaches into.

The relay changes aiortc's behaviour per object (a receiver, a sender, a connection's sockets),
never by a process-wide switch, and each module that does so lists what it relies on in its
own `internals_problems()`:

- media/receiver_tap.py: receivers that hand out encoded frames (intake, per receiver);
- media/rtp_intake.py: RTP taken in the socket's callback (intake, per connection);
- media/frame_sender.py: senders of pre-encoded frames, with their feedback;
- media/ice_hosts.py: the host addresses ICE offers (`_gather_from`);
- media/ice_restart.py: ICE restarts;
- media/forwarding.py: VP8 packetizing (`Vp8Encoder._packetize`).

media/frame_assembler.py, the jitter buffer's stand-in, uses no internal. The three libraries
are pinned exactly in pyproject.toml (`PINNED` here says the same, and a test compares them);
`check_internals()` runs when the server starts (server/app.py), which then refuses to start
the relay, naming what is missing, rather than fail on the first call."""

from __future__ import annotations

from importlib import metadata

from media import forwarding, frame_sender, ice_hosts, ice_restart, receiver_tap, rtp_intake

# The versions the relay was written and checked against.
PINNED = {"aiortc": "1.16.0", "aioice": "0.13.0", "pylibsrtp": "1.0.0"}


class AiortcInternalsChanged(RuntimeError):
    """The message is one line naming each internal that moved."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "the media relay relies on internals of "
            + ", ".join(f"{name} {version}" for name, version in PINNED.items())
            + " that are not there: "
            + "; ".join(problems)
        )


def internals_problems() -> list[str]:
    """Each version that differs from the pin and each internal that is no longer there, once
    (modules that rely on the same internal both list it)."""
    problems: list[str] = []
    for name, pinned in PINNED.items():
        installed = metadata.version(name)
        if installed != pinned:
            problems.append(f"{name} is {installed}, the relay was written for {pinned}")
    for module in (receiver_tap, rtp_intake, frame_sender, ice_hosts, ice_restart, forwarding):
        try:
            problems += module.internals_problems()
        except Exception as exc:  # a method or class the check reads is gone: named by exc
            problems.append(f"missing ({module.__name__}): {type(exc).__name__}: {exc}")
    return list(dict.fromkeys(problems))


def check_internals() -> None:
    """Raises AiortcInternalsChanged naming each internal the relay relies on that is no
    longer there."""
    problems = internals_problems()
    if problems:
        raise AiortcInternalsChanged(problems)
