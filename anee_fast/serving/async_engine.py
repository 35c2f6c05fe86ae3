"""Runs an `LLMEngine` in one background thread and streams each request's tokens to asyncio.

The engine is not thread-safe, so only its thread touches it: new requests and aborts arrive
through a queue and are applied between steps (continuous batching: sequences join and leave
at step boundaries). After every step each request's new tokens go to its own asyncio.Queue on
the event loop that submitted it. A step that raises fails the requests that were running in
it, with the error, and the loop goes on serving the others.
"""
import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Optional

from ..engine.sequence import Sequence, SequenceStatus
from .metrics import ServingMetrics

log = logging.getLogger(__name__)


@dataclass
class RequestEvent:
    new_token_ids: list         # tokens generated since the previous event
    finished: bool
    seq: Sequence
    error: Optional[str] = None  # set when the engine failed this request


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    sent: int = 0               # generated tokens already delivered


class AsyncEngine:
    def __init__(self, engine, metrics: Optional[ServingMetrics] = None):
        self.engine = engine
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self._commands = queue.Queue()
        self._streams = {}      # Sequence -> _Stream; only the engine thread touches it
        self._thread = None

    # ---- lifecycle (caller's thread) -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine loop is already running")
        self._thread = threading.Thread(target=self._loop, name="anee-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Aborts what is still running and ends the loop."""
        if self._thread is None:
            return
        self._commands.put(("stop", None, None))
        self._thread.join()
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- requests (an asyncio event loop) --------------------------------------------------------

    async def generate(self, seq: Sequence):
        """Submits a validated sequence and yields its RequestEvents until it finishes.

        Leaving the iteration early (a client that went away, a cancelled task) aborts the
        sequence, which frees its KV blocks.
        """
        if not self.running:
            raise RuntimeError("the engine loop is not running")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", seq, stream))
        done = False
        try:
            while not done:
                event = await stream.events.get()
                done = event.finished
                yield event
        finally:
            if not done:
                self.abort(seq)

    def abort(self, seq: Sequence) -> None:
        self._commands.put(("abort", seq, None))

    # ---- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            block = not self.engine.has_unfinished()
            try:
                commands = [self._commands.get(block=block)]
            except queue.Empty:
                commands = []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for kind, seq, stream in commands:
                if kind == "stop":
                    self._abort_all()
                    return
                if kind == "add":
                    self._streams[seq] = stream
                    self.engine.scheduler.add(seq)
                elif kind == "abort" and seq in self._streams:
                    self.engine.abort(seq)
                    self._deliver(seq)
            if self.engine.has_unfinished():
                self._step()

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:   # noqa: BLE001 - one bad step must not end the server
            log.exception("engine step failed")
            scheduler = self.engine.scheduler
            # The step's sequences failed; with none running, the waiting ones could not start.
            for seq in list(scheduler.running) or list(scheduler.waiting):
                self.engine.abort(seq)
                seq.finish_reason = "error"
                self._deliver(seq, error=f"{type(e).__name__}: {e}")
        for seq in list(self._streams):
            self._deliver(seq)

    def _deliver(self, seq, error=None) -> None:
        """Sends the sequence's undelivered tokens, and its end if it finished."""
        stream = self._streams.get(seq)
        if stream is None:
            return
        finished = seq.status is SequenceStatus.FINISHED
        new = seq.generated_ids[stream.sent:]
        if not new and not finished:
            return
        stream.sent += len(new)
        if finished:
            del self._streams[seq]
            self.metrics.request_finished(seq)
        try:
            stream.loop.call_soon_threadsafe(stream.events.put_nowait,
                                             RequestEvent(new, finished, seq, error))
        except RuntimeError:     # its event loop is closed: nobody is listening any more
            if not finished:
                self.engine.abort(seq)
                self._deliver(seq)

    def _abort_all(self) -> None:
        for seq in list(self._streams):
            self.engine.abort(seq)
            self._deliver(seq)
