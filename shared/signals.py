"""Turning a first SIGTERM (or SIGINT) into a stop request, and a second into the usual end of the process.

Every process of a run stops at a boundary of its own (the learner after a step and a checkpoint,
the driver once the learner has), so a signal must not end it where it stands; `SignalStop` sets
an event instead, once. A signal that comes while the event is already set (or while `when()`
says no stop is wanted, e.g. a Ray worker between runs) goes to `on_repeat`, by default the
handler that was installed before, so a stuck process can still be ended the usual way.

Python runs signal handlers only in the main thread, so `install` there does nothing elsewhere
(a loop running in another thread is then stopped through its event alone), and a handler must
not block: `on_first` runs inside it, so one that makes remote calls should start a thread.

Imports: stdlib only.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

log = logging.getLogger("vapo")

Handler = Callable[[int, FrameType | None], Any]


class SignalStop:
    """While installed, the first of `signals` sets `event` (and calls `on_first`); later ones go to `on_repeat`."""

    def __init__(
        self,
        event: threading.Event,
        signals: Sequence[signal.Signals] = (signal.SIGTERM,),
        *,
        message: str = "stopping at the next step boundary (after a checkpoint)",
        when: Callable[[], bool] = lambda: True,
        on_first: Callable[[], None] | None = None,
        on_repeat: Handler | None = None,
    ) -> None:
        self.event, self.signals, self.message = event, tuple(signals), message
        self.when, self.on_first, self.on_repeat = when, on_first, on_repeat
        self._previous: dict[int, Any] = {}

    def install(self) -> SignalStop:
        """Install the handler for `signals` (in the main thread; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> SignalStop:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.when() and not self.event.is_set():
            log.warning("%s: %s", signal.Signals(signum).name, self.message)
            self.event.set()
            if self.on_first is not None:
                self.on_first()
        elif self.on_repeat is not None:
            self.on_repeat(signum, frame)
        else:
            self._previous_handler(signum, frame)

    def _previous_handler(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum)  # None: installed outside Python; SIG_DFL/SIG_IGN: not callable
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
