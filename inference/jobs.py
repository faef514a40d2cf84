"""A request as the local engine's worker thread sees it, on both paths (plain and fast).

``Job``: a request waiting in line or running, and the way back to its asker (pieces go to
the event loop with ``call_soon_threadsafe``). ``Row``: a running job's answer so far: its
text streamed piece by piece, ended by its own stop token or token limit, or by its asker
leaving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import GenerationRequest
from .pieces import TextPieces

log = logging.getLogger(__name__)

DONE = object()  # what a job's queue gets after its last piece
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
    # The prompt as model inputs (on the CPU), made once on the worker thread.
    encoded: dict[str, torch.Tensor] | None = None
    # Set on the worker thread before DONE is sent: the answer stopped at its token limit.
    hit_token_limit: bool = False

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


@dataclass(eq=False)
class Row:
    """One running request: in a batched `generate` call, or in a slot of the fast path."""

    job: Job
    max_new_tokens: int
    streamer: TextPieces
    generated: int = 0
    finished: bool = False

    def finish(self, item: Any = DONE) -> None:
        if self.finished:
            return
        self.finished = True
        if item is DONE:
            self.streamer.end()
        self.job.send(item)

    def accept(self, token: int, stops: set[int] | frozenset[int]) -> None:
        """This row's next token: streamed, or the end (stop token, token limit, requester gone)."""
        if self.finished:
            return
        if self.job.cancelled.is_set():
            self.finished = True  # nobody is listening
        elif token in stops:
            self.finish()
        else:
            self.streamer.put(token)
            self.generated += 1
            if self.generated >= self.max_new_tokens:
                self.job.hit_token_limit = True
                self.finish()


def padding_id(tokenizer: Any) -> int:
    """Phi-3's pad is its eos, `<|endoftext|>`; fall back to eos for tokenizers without one."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def release_gpu_memory() -> None:
    """After a failure (often out-of-memory) give the cached blocks back for the next request."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
