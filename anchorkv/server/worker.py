"""The engine's scheduler runs on one thread, fed by a bounded queue; each job streams its events back to
the event loop.

`anchorkv serve` runs the engine on the process's main thread and HTTP on another (serve_on_main_thread):
libgomp, PyTorch's OpenMP, wakes the thread team of the initial thread within microseconds but far slower
for a team started by any later thread, and a decode step runs a few hundred small parallel regions.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import FrameType

import uvicorn

from anchorkv.cache.prefix_cache import CacheRequest
from anchorkv.engine.constraint import GrammarError
from anchorkv.engine.engine import Delta, Engine, Failed, Finished
from anchorkv.engine.pipeline import StageFailed
from anchorkv.engine.sampling import SamplingParams
from anchorkv.engine.sequence import Event

log = logging.getLogger("anchorkv.worker")


class QueueFull(Exception):
    pass


class ShuttingDown(RuntimeError):
    pass


# the requests still running this long before the graceful shutdown's end are failed cleanly
SHUTDOWN_MARGIN_S = 1.5


class JobFailed(Exception):
    """The engine gave the job up; `error` is what it raised."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error

    @property
    def shutting_down(self) -> bool:
        return isinstance(self.error, ShuttingDown)

    @property
    def unavailable(self) -> bool:
        """Not the request's fault, and a retry may succeed: shutting down, or a stage being restarted."""
        return isinstance(self.error, (ShuttingDown, StageFailed))

    @property
    def client_error(self) -> bool:
        """A grammar the client sent that fails only while generating (too big to run, say): a 4xx."""
        return isinstance(self.error, GrammarError)


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    cache_req: CacheRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Delta | Finished | JobFailed] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)  # its prompt is prefilled (or it failed)

    def emit(self, event: Delta | Finished | JobFailed) -> None:
        self.loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: Delta | Finished | JobFailed) -> None:
        self.events.put_nowait(event)
        self.started.set()

    async def stream(self) -> AsyncIterator[Delta | Finished]:
        """Events until Finished. Leaving early (a client that went away) cancels the generation."""
        try:
            while True:
                event = await self.events.get()
                if isinstance(event, JobFailed):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self.cancel.set()


# quiet time after a request before background work starts: a client's next request often follows at once
IDLE_GRACE_S = 0.05


class EngineWorker:
    def __init__(
        self, engine: Engine, max_queue: int, turn_grace_s: float = 0.0, on_cancel: Callable[[], None] = lambda: None
    ) -> None:
        self.engine = engine
        self.turn_grace_s = turn_grace_s
        self.on_cancel = on_cancel
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()  # unbounded so that stop() never blocks
        self._thread: threading.Thread | None = None
        self._ended = 0.0  # when a reply last ended with no request arriving since (time.monotonic), else 0

    @property
    def waiting(self) -> int:
        """Requests not yet given a slot."""
        return self._queue.qsize() + len(self.engine.waiting)

    @property
    def free_slots(self) -> int:
        """Slots a waiting request will take at the next step, so it does not count as queued."""
        return max(0, self.engine.cfg.parallel - len(self.engine.running))

    @property
    def running(self) -> int:
        return len(self.engine.running)

    @property
    def busy(self) -> bool:
        return bool(self.engine.running)

    def start(self) -> None:
        """Run the engine on a thread of its own, for an app served by someone else's uvicorn (`serve` runs it
        on the main thread, where PyTorch's OpenMP runs faster)."""
        self._thread = threading.Thread(target=self.run, name="anchorkv-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let run() return once the sequences in hand are done."""
        self._queue.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def stop_now(self) -> None:
        """Fail every request in hand with ShuttingDown (its stream gets an error event and its end, a
        non-streamed client a 503), so that none is cut mid-stream when the graceful shutdown ends."""
        error = ShuttingDown("the server is shutting down")
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop() still ends run()
                break
            job.emit(JobFailed(error))
        with self.engine.lock:
            self.engine.fail_all(error)

    def submit(self, prompt: list[int], params: SamplingParams, cache_req: CacheRequest) -> Job:
        """Called on the event loop only, so the size check and the put cannot interleave with another submit.
        Past the free slots, at most max_queue requests wait."""
        if self.waiting - self.free_slots >= self.max_queue:
            raise QueueFull
        job = Job(prompt, params, cache_req, asyncio.get_running_loop())
        self._queue.put_nowait(job)
        return job

    def _add(self, job: Job) -> None:
        def emit(event: Event) -> None:
            if isinstance(event, Failed):
                job.emit(JobFailed(event.error))
                return
            if isinstance(event, Finished) and event.finish_reason == "cancelled":
                self.on_cancel()  # a client that went away sends no next turn
            elif isinstance(event, Finished):
                self._ended = time.monotonic()
            job.emit(event)

        with self.engine.lock:
            self.engine.submit(job.prompt, job.params, emit, job.cancel, job.cache_req)
        self._ended = 0.0

    def _drain(self, wait: float = 0.0) -> bool:
        """Hand every queued job to the engine, waiting up to `wait` seconds for the first. Returns whether
        stop() was asked."""
        stop = False
        while True:
            try:
                job = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                return stop
            wait = 0.0
            if job is None:
                stop = True
            else:
                self._add(job)

    def _turn_grace(self) -> float:
        """How long to hold the next step for a turn that may be on its way: an agent whose reply just ended
        sends its next turn within milliseconds, and arriving while a decode step runs, it would wait the
        whole step (about 30 ms at 4 sessions) before its prefill starts. The hold ends when any request
        arrives; the other sequences' next token waits at most `turn_grace_s` once per reply."""
        if not self._ended or self.engine.waiting:
            return 0.0
        return max(0.0, self._ended + self.turn_grace_s - time.monotonic())

    def _arrived(self) -> bool:
        """A request is queued that the scheduler has not seen yet."""
        return not self._queue.empty()

    def _next(self) -> Job | None:
        """The next job, while nothing runs. Meanwhile, once the queue has been empty for IDLE_GRACE_S, the
        engine's background work runs a step at a time, and gives a step up between two layers when a
        request arrives."""
        while self.engine.has_idle_work:
            try:
                return self._queue.get(timeout=IDLE_GRACE_S)
            except queue.Empty:
                try:
                    self.engine.idle_work(interrupt=self._arrived)
                except Exception:  # background work never takes the engine down
                    log.exception("background work failed")
        return self._queue.get()

    def run(self) -> None:
        """Step the scheduler until stop(), then until the sequences in hand are done."""
        stopping = False
        while not (stopping and not self.engine.has_work):
            if not self.engine.has_work:
                job = self._next()
                if job is None:
                    stopping = True
                else:
                    self._add(job)
            stopping |= self._drain(self._turn_grace())
            try:
                with self.engine.lock:
                    self.engine.step(interrupt=self._arrived)
            except Exception as e:  # a fault in the scheduler itself: fail what it holds, keep serving
                log.exception("scheduler step failed")
                with self.engine.lock:
                    self.engine.fail_all(e)


def serve_on_main_thread(server: uvicorn.Server, worker: EngineWorker) -> bool:
    """Serve HTTP from a background thread and run the engine on this one, which must be the main thread.
    SIGINT and SIGTERM shut down as uvicorn would (a second one forces it); the engine keeps serving until
    HTTP has closed. Returns whether the HTTP server started."""
    assert threading.current_thread() is threading.main_thread()

    def http() -> None:
        try:
            server.run()
        finally:
            worker.stop()  # however HTTP ends (shutdown, failure to bind), the engine loop ends with it

    grace = server.config.timeout_graceful_shutdown
    deadline: list[threading.Timer] = []

    def on_signal(sig: int, frame: FrameType | None) -> None:
        server.handle_exit(sig, frame)
        if grace and not deadline:  # before uvicorn cuts them, end what still runs with an error its clients see
            deadline.append(threading.Timer(max(0.0, grace - SHUTDOWN_MARGIN_S), worker.stop_now))
            deadline[0].daemon = True
            deadline[0].start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=http, name="anchorkv-http")
    thread.start()
    try:
        worker.run()
    finally:
        # an engine loop that died leaves no one to answer: HTTP stops at once rather than hang its clients
        server.should_exit = server.force_exit = True
        thread.join()
    worker.engine.cache.flush()  # what the engine recorded after HTTP's own shutdown flushed
    return server.started
