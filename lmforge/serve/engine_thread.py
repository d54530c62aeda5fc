"""The engine's own thread: it steps the engine while there is work and hands each Output to the asyncio queue
of the request it belongs to. Requests and aborts reach it from the server's event loop."""

from __future__ import annotations

import asyncio
import logging
import threading

from lmforge.serve.engine import Engine, Output, SamplingParams
from lmforge.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


class EngineThread:
    def __init__(self, engine: Engine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics
        self.lock = threading.Lock()  # held while the engine steps or takes a request
        self.wake = threading.Event()
        self.queues: dict[str, asyncio.Queue] = {}
        self.aborted: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self.stopping = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=30)

    async def add(
        self, request_id: str, prompt: list[int], params: SamplingParams, queue: asyncio.Queue, adapter: int = 0
    ) -> None:
        """Queue a request (LmforgeError or EngineFull if refused); its Outputs will arrive on `queue`."""
        await asyncio.to_thread(self._add, request_id, prompt, params, queue, adapter)

    def _add(self, request_id, prompt, params, queue, adapter) -> None:
        with self.lock:
            self.engine.add(request_id, prompt, params, adapter)
            self.queues[request_id] = queue
            self.metrics.arrived(request_id)
        self.wake.set()

    def abort(self, request_ids: list[str]) -> None:
        """Drop requests at the next step (safe to call from the event loop: it never waits for a step)."""
        self.aborted.extend(request_ids)  # list.extend is atomic under the GIL
        self.wake.set()

    def _run(self) -> None:
        while not self.stopping:
            self.wake.clear()
            with self.lock:
                while self.aborted:
                    request_id = self.aborted.pop()
                    self.engine.abort(request_id)
                    self.queues.pop(request_id, None)
                    self.metrics.forget(request_id)
                busy = self.engine.has_work()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except Exception:  # a bug: fail the requests in flight, keep serving new ones
                        log.exception("engine step failed")
                        outputs = self._fail_all()
                    self.metrics.stepped(outputs)
            if not busy:
                self.wake.wait(0.05)
                continue
            for out in outputs:
                queue = self.queues.pop(out.request_id, None) if out.finished else self.queues.get(out.request_id)
                if queue is not None:
                    self.loop.call_soon_threadsafe(queue.put_nowait, out)

    def _fail_all(self) -> list[Output]:
        ids = [s.id for s in self.engine.running] + [s.id for s in self.engine.waiting]
        for request_id in ids:
            self.engine.abort(request_id)
        return [Output(i, [], "", finished=True, finish_reason="error") for i in ids]
