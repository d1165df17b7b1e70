"""Signals as an exception: SIGINT/SIGTERM/SIGHUP unwind a stage, so its atomic writes clean up."""

from __future__ import annotations

import signal


class Interrupted(BaseException):  # like KeyboardInterrupt: `except Exception` does not catch it
    """The stage got SIGINT, SIGTERM or SIGHUP: unwinds so that atomic_dir removes its temp folder."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


_received: list[int] = []  # the signal this process got, if any


def _on_signal(signum: int, frame: object) -> None:
    # Once: a second Ctrl-C must not interrupt the cleanup of the first.
    for sig in INTERRUPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted(signum)


def install_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted in this process (once)."""
    for sig in INTERRUPT_SIGNALS:
        signal.signal(sig, _on_signal)


def received() -> Interrupted | None:
    """The signal this process got, as the Interrupted it raised; None when none came."""
    return Interrupted(_received[0]) if _received else None


def raise_if_interrupted() -> None:
    """Raise Interrupted again if a signal came, even if its first exception was swallowed.

    Measured: SIGINT during Olive's `import onnxruntime` surfaces as an ImportError, which Olive catches
    and logs as "ORT ... module isn't installed", then carries on. Checked before an output is committed.
    """
    if _received:
        raise Interrupted(_received[0])
