"""A request as the asker left it with the local engine: waiting in line or running.

``Job``: the request, its cancellation flag and the way back to its asker (pieces go to the
event loop with ``call_soon_threadsafe``). The front (local_engine.py) queues jobs; the
serving core (core.py, or generic_serving.py) runs them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import GenerationRequest

log = logging.getLogger(__name__)

DONE = object()  # what a job's queue gets after its last piece


# Pieces of answers already streaming reach the event loop at most this often: waking it for
# every token of every step cost the step loop the GIL (a Discord message is edited about once
# a second; an answer's first piece, its end and errors still go at once).
STREAM_INTERVAL_SECONDS = 0.02


class Outbox:
    """What engine steps send their askers, handed to each event loop in one call: a step over
    16 rows wakes the loop once, not 16 times, and the pieces of answers already streaming wait
    for the next steps' up to ``interval`` (anything else is urgent: it takes them all along).
    Items keep their order."""

    def __init__(self, interval: float = STREAM_INTERVAL_SECONDS) -> None:
        self._items: list[tuple[Job, Any]] = []
        self._interval = interval
        self._handed_at = -interval
        self._urgent = False

    def send(self, job: Job, item: Any) -> None:
        if not isinstance(item, str) or not job.streaming:
            self._urgent = True
            job.streaming = True
        self._items.append((job, item))

    def flush(self) -> None:
        """Hand over what is due (at the end of every step)."""
        now = time.monotonic()
        if not self._items or (not self._urgent and now - self._handed_at < self._interval):
            return
        self._handed_at, self._urgent = now, False
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}
        for job, item in items:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, mail in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, mail)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                for job, _ in mail:
                    job.cancelled.set()


def _deliver(mail: list[tuple[Job, Any]]) -> None:
    for job, item in mail:
        job.pieces.put_nowait(item)
# Requests often arrive in bursts (a batch just ended and its askers ask again): this much
# patience turns a batch of one into a full one.
BATCH_GATHER_SECONDS = 0.002


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    pieces: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    position: int | None = None
    # The prompt as the core takes it (model inputs on the CPU), made once by ``core.prepare``.
    encoded: Any = None
    # Set by the serving core before DONE is sent: the answer stopped at its token limit.
    hit_token_limit: bool = False
    # Its first piece is on its way (later ones may wait a moment: Outbox).
    streaming: bool = False

    def send(self, item: Any) -> None:
        """Hand an item to the waiting coroutine; safe from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()

    def tell_position(self, position: int) -> None:
        """Report the place in line to the requester (on the event loop), once per change."""
        callback = self.request.on_queue_position
        if callback is None or position == self.position or self.cancelled.is_set():
            return
        self.position = position
        try:
            callback(position)
        except Exception:
            log.exception("queue position callback failed")


def padding_id(tokenizer: Any) -> int:
    """Phi-3's pad is its eos, `<|endoftext|>`; fall back to eos for tokenizers without one."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def release_gpu_memory() -> None:
    """After a failure (often out-of-memory) give the cached blocks back for the next request."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
