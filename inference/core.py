"""Continuous batching on the native model: the engine core's step is schedule, execute, update.

The front (local_engine.py) hands the core jobs while it has a free slot (``add``) and calls
``step`` while it is busy. A step asks the ``Scheduler`` for its plan (prompt chunks to
prefill, requests that decode), runs it on the ``ModelRunner`` (over the ``SlotCache``),
chooses each row's token (``sampling``, after the optional ``Steering``), and updates each
``Request``: its text goes out through its detokenizer (``TextPieces``), and a request
that ended (stop token, token limit, asker gone) leaves its slot for the next one.

Cache shape: ``slots x length``, length = the larger of MAX_BATCH_TOKENS / MAX_BATCH_SIZE
and the need (prompt + MAX_NEW_TOKENS) of a question about one 1280x720 picture, rounded
up to the runner's length bucket; slots = MAX_BATCH_TOKENS // length (1..MAX_BATCH_SIZE).
A request that needs more waits, first in line, until the batch drains; then the cache is
re-made for it (eagerly: no graphs for a one-off shape), and the usual shape comes back
with the next request that fits it.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

import torch

from .conversation import Conversation
from .jobs import DONE, Job, padding_id, release_gpu_memory
from .kv_cache import SlotCache
from .loading import LoadedModel
from .pieces import TextPieces
from .prompt_inputs import PromptEncoder
from .runner import DEFAULT_LENGTH_BUCKET, ModelRunner, round_up
from .sampling import Sampling, choose_tokens
from .scheduler import Chunk, Request, Scheduler
from .settings import InferenceSettings
from .steering import Steering

log = logging.getLogger(__name__)


class Admission(enum.Enum):
    ADMITTED = "admitted"
    LATER = "later"  # no room now: first in line for a later step
    REFUSED = "refused"  # its asker was told why (prompt too long, cancelled...)


def cache_shape(settings: InferenceSettings, need: int, bucket: int) -> tuple[int, int]:
    """(slots, length) of a cache whose slots hold ``need`` positions (see the module docstring)."""
    floor = settings.max_batch_tokens // settings.max_batch_size
    length = round_up(max(need, floor, 1), bucket)
    slots = max(1, min(settings.max_batch_size, settings.max_batch_tokens // length))
    return slots, length


class EngineCore:
    """Continuous batching over ``loaded`` (a Phi-3-vision model); see the module docstring.

    ``usual_question``: a conversation whose prompt and MAX_NEW_TOKENS answer a slot of the
    usual cache must hold (the warm-up's picture question; None: MAX_BATCH_TOKENS /
    MAX_BATCH_SIZE). ``compile``: decode steps compiled (CUDA graphs on CUDA) on the usual
    cache. ``steering``: see steering.py.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        settings: InferenceSettings,
        *,
        compile: bool = False,
        usual_question: Conversation | None = None,
        steering: Steering | None = None,
        length_bucket: int = DEFAULT_LENGTH_BUCKET,
    ) -> None:
        self.loaded = loaded
        self.settings = settings
        self.compile = compile
        self.steering = steering
        self.prefill_budget = settings.prefill_chunk_tokens
        self.length_bucket = length_bucket if compile else 64
        config = loaded.model.config
        self.encoder = PromptEncoder(
            loaded.processor, settings, getattr(config, "max_position_embeddings", None)
        )
        self.stops = frozenset(loaded.stop_token_ids)
        self.pad_id = padding_id(loaded.tokenizer)
        original = getattr(config, "original_max_position_embeddings", None)
        self.rope_switch = int(original) if getattr(config, "rope_scaling", None) and original else None
        need = 0
        if usual_question is not None:
            need = (
                self.encoder.encode_conversation(usual_question)["input_ids"].shape[1]
                + settings.max_new_tokens
            )
        self.usual_shape = cache_shape(settings, need, self.length_bucket)
        # Requests that joined a batch already decoding (for tests and logs).
        self.joined_running = 0
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        self._build(*self.usual_shape, compile=compile)

    # --- the cache -------------------------------------------------------------------------

    def _build(self, slots: int, length: int, *, compile: bool) -> None:
        self.runner = self.scheduler = None  # the old cache goes first
        release_gpu_memory()
        loaded = self.loaded
        cache = SlotCache.for_model(
            loaded.model.config, slots=slots, length=length, device=loaded.device, dtype=loaded.dtype
        )
        log.info(
            "KV cache: %d slot(s) x %d tokens (%.1f MiB)%s",
            slots,
            length,
            cache.nbytes / 2**20,
            ", decode steps compiled" if compile else "",
        )
        self.runner = ModelRunner(
            loaded.model,
            cache,
            device=loaded.device,
            dtype=loaded.dtype,
            pad_id=self.pad_id,
            compile=compile,
            length_bucket=self.length_bucket,
        )
        self.scheduler = Scheduler(
            slots=slots, slot_length=length, prefill_budget=self.prefill_budget, whole_above=self.rope_switch
        )

    def recompile(self, compile: bool) -> None:
        """Re-make the usual cache and runner, compiled or not (e.g. after a failed compile)."""
        assert self.idle
        self.compile = compile
        self._build(*self.usual_shape, compile=compile)

    @property
    def decoding(self) -> str:
        return "compiled" if self.compile else "eager"

    @property
    def shape(self) -> tuple[int, int]:
        assert self.scheduler is not None
        return self.scheduler.slots, self.scheduler.slot_length

    # --- the front's side -----------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return self.scheduler is None or self.scheduler.idle

    @property
    def running(self) -> int:
        return 0 if self.scheduler is None else len(self.scheduler.running)

    def has_room(self) -> bool:
        return self.room > 0

    @property
    def room(self) -> int:
        return 0 if self.scheduler is None else self.scheduler.free_slots

    def max_new_tokens(self, job: Job) -> int:
        return job.request.max_new_tokens or self.settings.max_new_tokens

    def prepare(self, job: Job) -> None:
        """Encode the job's request (``job.encoded``); raises ``EngineError`` when it cannot be
        answered (too long). CPU work only: the front runs it off the worker thread."""
        job.encoded = self.encoder.encode(job.request, self.max_new_tokens(job))

    def add(self, job: Job) -> Admission:
        """Admit ``job`` (prepared) to a free slot; its prefill starts at the next step."""
        if job.cancelled.is_set():
            return Admission.REFUSED
        assert job.encoded is not None, "the front prepares every job first"
        max_new_tokens = self.max_new_tokens(job)
        temperature = job.request.temperature
        temperature = self.settings.temperature if temperature is None else temperature
        request = Request(
            job=job,
            prompt=job.encoded,
            max_new_tokens=max_new_tokens,
            sampling=Sampling.of(temperature, getattr(self.loaded.model, "generation_config", None)),
            pieces=TextPieces(self.loaded.tokenizer, job.send),
        )
        scheduler = self.scheduler
        assert scheduler is not None
        if scheduler.idle:
            usual_fits = request.need <= self.usual_shape[1]
            if usual_fits and self.shape != self.usual_shape:
                self._build(*self.usual_shape, compile=self.compile)
            elif not scheduler.fits(request):
                self._build(*cache_shape(self.settings, request.need, self.length_bucket), compile=False)
            scheduler = self.scheduler
            assert scheduler is not None
        if not scheduler.can_admit(request):
            return Admission.LATER
        if any(other.status.name == "DECODING" for other in scheduler.running):
            self.joined_running += 1
            log.info(
                "a request joined a running batch (%d answer(s) running)",
                scheduler.slots - scheduler.free_slots + 1,
            )
        scheduler.admit(request)
        return Admission.ADMITTED

    def finish_all(self, item: Any = DONE) -> None:
        """End every running request with ``item`` (DONE: what was said so far is the answer)."""
        if self.scheduler is None:
            return
        for request in self.scheduler.running:
            self._finish(request, item)

    # --- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Schedule, execute, update (see the module docstring)."""
        scheduler, runner = self.scheduler, self.runner
        assert scheduler is not None and runner is not None
        for request in scheduler.running:
            if request.job.cancelled.is_set():
                self._finish(request)  # nobody is listening
        plan = scheduler.schedule()
        for chunk in plan.prefill:
            self._prefill(chunk)
        decoding = [request for request in plan.decode if request.job.cancelled.is_set() is False]
        if not decoding:
            return
        try:
            logits = runner.decode([r.slot for r in decoding], [int(r.last_token) for r in decoding])  # type: ignore[arg-type]
            for row, request in enumerate(decoding):
                if request.steering is not None:
                    request.steering.steer(request.generated, logits[row])
            tokens = choose_tokens(logits, [request.sampling for request in decoding])
        except Exception as error:
            log.exception("a decode step failed")
            release_gpu_memory()
            for request in decoding:
                self._finish(request, error)
            return
        for request, token in zip(decoding, tokens, strict=True):
            self._accept(request, token)

    def _prefill(self, chunk: Chunk) -> None:
        request = chunk.request
        scheduler, runner = self.scheduler, self.runner
        assert scheduler is not None and runner is not None
        try:
            if request.embeds is None:
                if self.steering is not None:
                    ids = request.prompt["input_ids"][0].tolist()
                    request.steering = self.steering.begin(request.job.request, ids)
                request.embeds = runner.embed_prompt(request.prompt)
            logits = runner.prefill(request.slot, request.embeds[chunk.start : chunk.end], chunk.start)
            scheduler.prefilled(chunk)
            if not chunk.last:
                return
            request.embeds = None
            if request.steering is not None:
                request.steering.steer(0, logits)
            token = choose_tokens(logits[None], [request.sampling])[0]
        except Exception as error:
            log.exception("a prefill failed")
            release_gpu_memory()
            self._finish(request, error)
            return
        self._accept(request, token)

    def _accept(self, request: Request, token: int) -> None:
        """The request's next token: streamed, or its end (stop token, token limit)."""
        if token in self.stops:
            self._finish(request)
            return
        request.pieces.put(token)
        request.generated += 1
        request.last_token = token
        if request.generated >= request.max_new_tokens:
            request.job.hit_token_limit = True
            self._finish(request)

    def _finish(self, request: Request, item: Any = DONE) -> None:
        scheduler, runner = self.scheduler, self.runner
        assert scheduler is not None and runner is not None
        if request.status.name == "FINISHED":
            return
        scheduler.finish(request)
        runner.cache.free(request.slot)
        if request.job.cancelled.is_set():
            return
        if item is DONE:
            request.pieces.end()
        request.job.send(item)
