"""The engine runs on one thread, fed by a bounded queue; each job streams its events back to the event loop.

`anchorkv serve` runs the engine on the process's main thread and HTTP on another (serve_on_main_thread):
libgomp, PyTorch's OpenMP, wakes the thread team of the initial thread within microseconds but takes about
50 us per parallel region for a team started by any later thread, and a decode step runs a few hundred
small parallel regions (measured here: 16 against 34 ms a step, a 128-token piece at 5k context 450
against 530 ms).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import uvicorn

from anchorkv.cache.prefix_cache import CacheRequest
from anchorkv.engine.engine import Delta, Engine, Finished
from anchorkv.engine.sampling import SamplingParams

log = logging.getLogger("anchorkv.worker")


class QueueFull(Exception):
    pass


class JobFailed(Exception):
    pass


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    cache_req: CacheRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Delta | Finished | JobFailed] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: Delta | Finished | JobFailed) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

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
    def __init__(self, engine: Engine, max_queue: int, on_cancel: Callable[[], None] = lambda: None) -> None:
        self.engine = engine
        self.on_cancel = on_cancel
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()  # unbounded so that stop() never blocks
        self._thread: threading.Thread | None = None
        self.busy = False

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        """Run the engine on a thread of its own (in tests; `serve` runs it on the main thread)."""
        self._thread = threading.Thread(target=self.run, name="anchorkv-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let run() return once the job in hand is done."""
        self._queue.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def submit(self, prompt: list[int], params: SamplingParams, cache_req: CacheRequest) -> Job:
        """Called on the event loop only, so the size check and the put cannot interleave with another submit."""
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull
        job = Job(prompt, params, cache_req, asyncio.get_running_loop())
        self._queue.put_nowait(job)
        return job

    def _next(self) -> Job | None:
        """The next job. Meanwhile, once the queue has been empty for IDLE_GRACE_S, the engine's background
        work runs a step at a time, and gives a step up between two layers when a request arrives."""
        while self.engine.has_idle_work:
            try:
                return self._queue.get(timeout=IDLE_GRACE_S)
            except queue.Empty:
                self.engine.idle_work(interrupt=lambda: not self._queue.empty())
        return self._queue.get()

    def run(self) -> None:
        """Serve jobs until stop()."""
        while (job := self._next()) is not None:
            if job.cancel.is_set():
                self.on_cancel()
                continue
            self.busy = True
            try:
                events = self.engine.generate(job.prompt, job.params, job.cancel, job.cache_req, background=True)
                for event in events:
                    job.emit(event)
                    if isinstance(event, Finished) and event.finish_reason == "cancelled":
                        self.on_cancel()
            except Exception as e:  # the request fails, the worker lives on
                log.exception("generation failed")
                job.emit(JobFailed(f"{type(e).__name__}: {e}"))
            finally:
                self.busy = False


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

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    thread = threading.Thread(target=http, name="anchorkv-http")
    thread.start()
    worker.run()
    thread.join()
    worker.engine.cache.flush()  # what the engine recorded after HTTP's own shutdown flushed
    return server.started
