"""The generic path behind the local engine's front: batched ``generate`` for other VLMs.

A vision-language model that is not Phi-3-vision runs on ``generic.GenericRunner`` (one
batched ``generate`` call per batch, each row ending on its own). This core collects the
requests waiting together (up to MAX_BATCH_SIZE, one temperature) and runs them as one
call in its ``step``; a request arriving meanwhile waits for the next batch.
"""

from __future__ import annotations

import logging
from typing import Any

from .conversation import Conversation, without_oldest_exchange
from .core import Admission
from .engine import PromptTooLong
from .generic import GenericPrompt, GenericRow, GenericRunner, context_length, encode_generic, generic_prompt
from .jobs import DONE, Job, release_gpu_memory
from .loading import LoadedModel
from .pieces import TextPieces
from .settings import InferenceSettings

log = logging.getLogger(__name__)


class GenericCore:
    """Batches of generic-path requests, one ``generate`` each (see the module docstring)."""

    decoding = "generic"

    def __init__(self, loaded: LoadedModel, settings: InferenceSettings) -> None:
        self.loaded = loaded
        self.settings = settings
        self.runner = GenericRunner(loaded)
        self.context = settings.max_context_tokens or context_length(loaded.model)
        self._batch: list[tuple[Job, GenericRow, TextPieces]] = []
        self._temperature: float | None = None
        self._generating = False

    @property
    def idle(self) -> bool:
        return not self._batch

    @property
    def running(self) -> int:
        return len(self._batch)

    def has_room(self) -> bool:
        """Whether the batch being gathered can take one more."""
        return not self._generating and len(self._batch) < self.settings.max_batch_size

    @property
    def room(self) -> int:
        """A gathered batch runs at once: later requests wait for the next one."""
        return 0 if self._generating or self._batch else self.settings.max_batch_size

    def _prompt(self, job: Job, max_new_tokens: int) -> GenericPrompt:
        processor = self.loaded.processor
        conversation: Conversation | None = job.request.conversation
        length = 0
        while conversation is not None:
            length = encode_generic(processor, conversation)["input_ids"].shape[1]
            if self.context is None or length + max_new_tokens <= self.context:
                return generic_prompt(processor, conversation)
            conversation = without_oldest_exchange(conversation)
        assert self.context is not None
        raise PromptTooLong(
            f"the question and its images take {length} tokens, and the model reads at most "
            f"{self.context - max_new_tokens} before answering; try fewer images or a shorter question"
        )

    def prepare(self, job: Job) -> None:
        """The job's prompt (``job.encoded``); raises ``EngineError`` when it is too long."""
        job.encoded = self._prompt(job, job.request.max_new_tokens or self.settings.max_new_tokens)

    def add(self, job: Job) -> Admission:
        if job.cancelled.is_set():
            return Admission.REFUSED
        temperature = job.request.temperature
        temperature = self.settings.temperature if temperature is None else temperature
        if self._batch and temperature != self._temperature:
            return Admission.LATER  # one temperature per generate call
        max_new_tokens = job.request.max_new_tokens or self.settings.max_new_tokens
        prompt = job.encoded
        assert isinstance(prompt, GenericPrompt), "the front prepares every job first"
        pieces = TextPieces(self.loaded.tokenizer, job.send)

        def end() -> None:
            job.hit_token_limit = row.hit_limit
            if not job.cancelled.is_set():
                pieces.end()
                job.send(DONE)

        row = GenericRow(
            prompt, max_new_tokens, on_token=pieces.put, stopped=job.cancelled.is_set, on_end=end
        )
        self._batch.append((job, row, pieces))
        self._temperature = temperature
        return Admission.ADMITTED

    def step(self) -> None:
        batch, self._batch = self._batch, []
        rows = [row for _, row, _ in batch]
        if len(rows) > 1:
            log.info("generating %d answers in one batch", len(rows))
        self._generating = True
        try:
            self.runner.generate(rows, self._temperature or 0.0)
        except Exception as error:
            log.exception("generation failed")
            release_gpu_memory()
            for job, row, _ in batch:
                if not row.ended:
                    row.ended = True
                    job.send(error)
        finally:
            self._generating = False

    def close(self) -> None:
        """Nothing of its own to stop."""

    def finish_all(self, item: Any = DONE) -> None:
        batch, self._batch = self._batch, []
        for job, row, pieces in batch:
            if not row.ended:
                row.ended = True
                if item is DONE:
                    pieces.end()
                job.send(item)
