"""The scheduler: which requests hold a slot, which prompt chunks run this step, who decodes.

One ``Request`` object per admitted request carries everything about it (its slot, how
much of its prompt is in the cache, its last token, its sampling, its status); the
scheduler only moves requests between states (ENCODING while its images are in the vision
tower, and on the CPU while its prompt is prefilled beside the steps; PREFILLING, DECODING,
FINISHED) and hands out slots. Each step: the requests
still prefilling get prompt chunks up to a budget of prompt tokens (FIFO), then every
decoding request decodes one token. With nobody decoding, a prompt is prefilled whole
(nobody would wait). A chunk's rotary factors are its whole prompt's (the runner passes
the prompt's length), so prompts past the LongRoPE switch are chunked like the others.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import Sampling

log = logging.getLogger(__name__)


class Status(enum.Enum):
    ENCODING = "encoding"  # its images in the vision tower (image_encoder.py); on the CPU its prefill too
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request inside the engine, from its admission to its end."""

    job: Any  # the asker's side (jobs.Job): cancellation and the way back
    prompt: Mapping[str, torch.Tensor]  # the model inputs, on the CPU
    max_new_tokens: int
    sampling: Sampling
    pieces: Any  # pieces.TextPieces: the detokenizer of this answer
    steering: Any = None  # a steering.RowSteering, or None
    slot: int = -1
    status: Status = Status.PREFILLING
    prefilled: int = 0  # prompt positions in the cache
    embeds: torch.Tensor | None = None  # the prompt's embeddings, while prefilling
    encoding: Any = None  # while ENCODING: the future of its embeddings
    last_token: int | None = None  # what the next decode step feeds
    generated: int = 0  # answer tokens streamed
    chunks: int = 0
    admitted_at: float = field(default_factory=time.monotonic)

    @property
    def prompt_length(self) -> int:
        return int(self.prompt["input_ids"].shape[1])

    @property
    def need(self) -> int:
        """Cache positions this request may fill: its prompt and its longest answer."""
        return self.prompt_length + self.max_new_tokens


@dataclass(frozen=True)
class Chunk:
    request: Request
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == self.request.prompt_length


@dataclass(frozen=True)
class Plan:
    """One step's work: prompt chunks to prefill, then the requests that decode a token."""

    prefill: list[Chunk]
    decode: list[Request]


class Scheduler:
    """Hands out ``slots`` slots of ``slot_length`` positions; see the module docstring.

    ``prefill_budget``: prompt tokens per step while others decode.
    """

    def __init__(self, *, slots: int, slot_length: int, prefill_budget: int) -> None:
        self.slots = slots
        self.slot_length = slot_length
        self.prefill_budget = max(1, prefill_budget)
        self._free = list(range(slots))
        self._running: list[Request] = []

    @property
    def running(self) -> list[Request]:
        """Requests holding a slot, in the order they were admitted."""
        return list(self._running)

    @property
    def idle(self) -> bool:
        return not self._running

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def fits(self, request: Request) -> bool:
        """Whether the request fits a slot at all."""
        return request.need <= self.slot_length

    def can_admit(self, request: Request) -> bool:
        return bool(self._free) and self.fits(request)

    @property
    def encoding(self) -> list[Request]:
        """Requests whose images are still in the vision tower."""
        return [r for r in self._running if r.status is Status.ENCODING]

    def admit(self, request: Request, *, encoding: bool = False) -> None:
        """A slot for the request; it prefills from the next step, or once its images are
        encoded (``encoding``: see ``encoded``)."""
        if not self.can_admit(request):
            raise ValueError("no slot for this request")
        request.slot = self._free.pop(0)
        request.status = Status.ENCODING if encoding else Status.PREFILLING
        self._running.append(request)

    def encoded(self, request: Request) -> None:
        """Its embeddings are ready: it prefills from this step."""
        if request.status is Status.ENCODING:
            request.status = Status.PREFILLING

    def schedule(self) -> Plan:
        decoding = [r for r in self._running if r.status is Status.DECODING]
        budget = self.prefill_budget if decoding else None
        chunks: list[Chunk] = []
        for request in self._running:
            if request.status is not Status.PREFILLING:
                continue
            left = request.prompt_length - request.prefilled
            if budget is not None:
                if budget <= 0:
                    break
                left = min(left, budget)
                budget -= left
            chunks.append(Chunk(request, request.prefilled, request.prefilled + left))
        return Plan(chunks, decoding)

    def prefilled(self, chunk: Chunk, *, beside: bool = False) -> None:
        """A chunk ran: the request moves on (to decoding after its last chunk). ``beside``:
        the whole prompt, prefilled by the image encoder while ENCODING (the CPU)."""
        request = chunk.request
        request.prefilled = chunk.end
        request.chunks += 1
        if chunk.last:
            others = sum(1 for r in self._running if r.status is Status.DECODING) if beside else 0
            request.status = Status.DECODING
            if others:
                log.info(
                    "a %d-token prompt joined %d answer(s), prefilled beside their decode steps (%.2f s)",
                    request.prompt_length,
                    others,
                    time.monotonic() - request.admitted_at,
                )
            elif request.chunks > 1:
                log.info(
                    "a %d-token prompt joined after %d chunks between decode steps (%.2f s)",
                    request.prompt_length,
                    request.chunks,
                    time.monotonic() - request.admitted_at,
                )

    def finish(self, request: Request) -> None:
        """The request leaves: its slot is free for the next one."""
        if request.status is Status.FINISHED:
            return
        request.status = Status.FINISHED
        request.embeds = None
        if request.encoding is not None:
            request.encoding.cancel()  # not started yet: never runs; else its result is dropped
            request.encoding = None
        self._running.remove(request)
        self._free.append(request.slot)
        self._free.sort()
