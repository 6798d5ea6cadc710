"""The engine runs on one thread, fed by a bounded queue; each job streams its events back to the event loop."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

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
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="anchorkv-engine", daemon=True)
        self.busy = False

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, prompt: list[int], params: SamplingParams, cache_req: CacheRequest) -> Job:
        job = Job(prompt, params, cache_req, asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def _next(self) -> Job | None:
        """The next job. Meanwhile, once the queue has been empty for IDLE_GRACE_S, the engine's background
        work runs a step at a time, so a request that arrives waits for one step at most."""
        while self.engine.has_idle_work:
            try:
                return self._queue.get(timeout=IDLE_GRACE_S)
            except queue.Empty:
                self.engine.idle_work()
        return self._queue.get()

    def _run(self) -> None:
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
