"""A worker thread with progress and cancel, free of Qt: the widget polls it from a QTimer.

The work function runs on its own thread and never touches MRML, VTK or Qt (they are main-thread only): it
gets copies of the data and returns a result. Progress reports and the outcome go through a queue that the
main thread drains with ``poll()``; ``cancel()`` sets the ``threading.Event`` the library checks between
encoder batches, training iterations and slices.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """A progress report: ``text`` names the stage, ``done``/``total`` fill the bar."""

    text: str
    done: int
    total: int

    @property
    def percent(self) -> int:
        return round(100 * self.done / self.total) if self.total else 0


@dataclass(frozen=True)
class Finished:
    result: Any


@dataclass(frozen=True)
class Failed:
    error: BaseException
    details: str  # the traceback, for the log and the error dialog's details


@dataclass(frozen=True)
class Cancelled:
    message: str = "Cancelled; the scene is unchanged."


WorkFunction = Callable[[Callable[[Progress], None], threading.Event], Any]


class Job:
    """Runs ``work(report, cancel)`` on a daemon thread.

    ``work`` calls ``report(Progress(...))`` as it goes and checks ``cancel``; it returns the result or raises.
    The main thread calls ``poll()`` (e.g. every 100 ms) and gets the events since the last call; the last
    one is ``Finished``, ``Failed`` or ``Cancelled``.
    """

    def __init__(self, work: WorkFunction, name: str = "SAMFewshot"):
        self._work = work
        self._events: queue.Queue = queue.Queue()
        self.cancel_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._done = threading.Event()
        self.started_at: float | None = None
        self.cancel_requested_at: float | None = None
        self.outcome: Finished | Failed | Cancelled | None = None

    def start(self) -> Job:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop; it ends at its next check (within a second or two)."""
        if not self.cancel_event.is_set():
            self.cancel_requested_at = time.monotonic()
            self.cancel_event.set()

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self._done.is_set()

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def _report(self, progress: Progress) -> None:
        self._events.put(progress)

    def _run(self) -> None:
        try:
            if self.cancel_event.is_set():
                raise _cancelled_error()("cancelled before it started")
            result = self._work(self._report, self.cancel_event)
            if self.cancel_event.is_set():
                event = Cancelled()
            else:
                event = Finished(result)
        except BaseException as error:  # reported to the main thread, which shows it
            if self.cancel_event.is_set() or isinstance(error, _cancelled_error()):
                event = Cancelled()
            else:
                event = Failed(error, traceback.format_exc())
        self._events.put(event)
        self._done.set()

    def poll(self) -> list:
        """Events since the last call; consecutive progress reports are merged into the latest one."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, Progress) and events and isinstance(events[-1], Progress):
                events[-1] = event
            else:
                events.append(event)
            if isinstance(event, (Finished, Failed, Cancelled)):
                self.outcome = event
        return events

    def wait(self, timeout: float | None = None, on_event: Callable[[Any], None] | None = None,
             interval: float = 0.05) -> Finished | Failed | Cancelled | None:
        """Poll until the job ends or ``timeout`` seconds pass (for tests and scripts); returns the outcome."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.outcome is None:
            self._done.wait(interval)
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if deadline is not None and time.monotonic() > deadline:
                break
        return self.outcome


def _cancelled_error():
    try:
        from SAMFewshotLib.errors import Cancelled as LibraryCancelled

        return LibraryCancelled
    except ImportError:  # the library is not importable: nothing can raise its Cancelled
        return _NeverRaised


class _NeverRaised(Exception):
    pass
