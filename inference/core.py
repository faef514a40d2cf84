"""Continuous batching on the native model: the engine core's step is schedule, execute, update.

The front (local_engine.py) hands the core jobs while it has a free slot (``add``) and calls
``step`` while it is busy. A step asks the ``Scheduler`` for its plan (prompt chunks to
prefill, requests that decode), runs it on the ``ModelRunner`` (over the ``SlotCache``),
chooses each row's token (``sampling``, after the optional ``Steering``), and updates each
``Request``: its text goes out through its detokenizer (``TextPieces``), and a request
that ended (stop token, token limit, asker gone) leaves its slot for the next one. A
request with pictures holds its slot as ENCODING while the ``ImageEncoder`` runs them
through the vision tower beside the steps; it prefills once they are ready, in chunks
between decode steps. On the CPU (``prefill_beside``) the encoder thread prefills the whole
prompt right after its pictures, into the request's slot, and the request joins the decode
steps with its first token: the step loop keeps one core and the prompts get the other
(in one thread, a picture question's prefill and decode share one core; measured in
bench/README.md). A request that leaves while its prompt is being read keeps its slot until
the encoder is done with it.

Cache shape: ``slots x length``, length = the larger of MAX_BATCH_TOKENS / MAX_BATCH_SIZE
and the need (prompt + MAX_NEW_TOKENS) of a question about one 1280x720 picture, rounded
up to the runner's length bucket; slots = MAX_BATCH_TOKENS // length (1..MAX_BATCH_SIZE).
A request that needs more waits, first in line, until the batch drains; then the cache is
re-made for it (eagerly: no graphs for a one-off shape), and the usual shape comes back
with the next request that fits it. A request that needs more than MAX_BATCH_TOKENS can
never run: it is refused as too long.

MAX_BATCH_TOKENS=auto where the device reports its free memory (CUDA; ``memory.device_memory``):
one slot first, a warm-up forward in it (the picture question's prefill: the vision tower's
and the prefill's activations, still held by torch's allocator when the figure is read),
then the cache takes GPU_MEMORY_FRACTION of the device's memory less what is in use, at the
model's KV bytes per token; its slots hold the picture question
(not stretched to MAX_BATCH_TOKENS / MAX_BATCH_SIZE), at most MAX_BATCH_SIZE of them.
Elsewhere auto is DEFAULT_MAX_BATCH_TOKENS. Out of memory in a prefill or a decode step: the
requests it hit get the error, and once the others have ended the cache is re-made with a
quarter fewer tokens (never below one slot); serving goes on.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
from collections.abc import Callable
from typing import Any

import torch

from . import memory
from .conversation import Conversation
from .engine import ModelLoadError, PromptTooLong
from .image_encoder import ImageEncoder
from .jobs import DONE, Job, Outbox, padding_id, release_gpu_memory
from .kv_cache import SlotCache
from .loading import LoadedModel
from .pieces import TextPieces
from .prompt_inputs import PromptEncoder
from .runner import DEFAULT_LENGTH_BUCKET, ModelRunner, round_up
from .sampling import Sampling, choose_tokens
from .scheduler import Chunk, Request, Scheduler
from .settings import DEFAULT_MAX_BATCH_TOKENS, InferenceSettings
from .steering import Steering

log = logging.getLogger(__name__)


class Admission(enum.Enum):
    ADMITTED = "admitted"
    LATER = "later"  # no room now: first in line for a later step
    REFUSED = "refused"  # its asker was told why (prompt too long, cancelled...)


# After an out-of-memory the cache keeps this share of its tokens.
SHRINK_AFTER_OUT_OF_MEMORY = 0.75
# Less KV cache than this left after loading: the model cannot serve.
LEAST_AUTO_TOKENS = 256
# With only pictures in the vision tower, a step waits at most this long for one.
ENCODING_WAIT_SECONDS = 0.05


def cache_shape(
    max_batch_tokens: int, max_batch_size: int, need: int, bucket: int, *, from_memory: bool = False
) -> tuple[int, int]:
    """(slots, length) of a cache whose slots hold ``need`` positions (see the module
    docstring). ``from_memory``: MAX_BATCH_TOKENS is what memory holds, and slots are not
    stretched to MAX_BATCH_TOKENS / MAX_BATCH_SIZE."""
    if from_memory:
        length = round_up(max(need, 1), bucket)
        if length > max_batch_tokens:  # memory for less than one such question
            length = max(bucket, max_batch_tokens // bucket * bucket)
        return max(1, min(max_batch_size, max_batch_tokens // length)), length
    length = round_up(max(need, max_batch_tokens // max_batch_size, 1), bucket)
    slots = max(1, min(max_batch_size, max_batch_tokens // length))
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
        self._usual_inputs = (
            None if usual_question is None else self.encoder.encode_conversation(usual_question)
        )
        need = 0
        if self._usual_inputs is not None:
            need = self._usual_inputs["input_ids"].shape[1] + settings.max_new_tokens
        self.usual_need = need
        # The KV cache's budget in tokens (MAX_BATCH_TOKENS, or sized from free memory).
        self.max_batch_tokens = settings.max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS
        auto = settings.max_batch_tokens is None and memory.device_memory(loaded.device) is not None
        self.sized_from_memory = auto
        if auto:  # one slot for the warm-up forward, then the memory there is
            self.max_batch_tokens = round_up(max(need, 1), self.length_bucket)
        self.usual_shape = self._usual_shape()
        self._shrink_pending = False
        # Requests that joined a batch already decoding (for tests and logs).
        self.joined_running = 0
        self.outbox = Outbox()
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        # Pictures go through the vision tower beside the decode loop (image_encoder.py); on
        # the CPU their prompts are prefilled there too, whole, on the core the steps leave free.
        self.images = ImageEncoder(loaded.device)
        self.prefill_beside = loaded.device.type == "cpu"
        self._build(*self.usual_shape, compile=compile)
        if auto:
            self._size_from_free_memory()

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
            slots=slots, slot_length=length, prefill_budget=self.prefill_budget
        )

    def _usual_shape(self) -> tuple[int, int]:
        return cache_shape(
            self.max_batch_tokens,
            self.settings.max_batch_size,
            self.usual_need,
            self.length_bucket,
            from_memory=self.sized_from_memory,
        )

    def _resize(self, max_batch_tokens: int) -> None:
        """Re-make the usual cache for a new budget (nothing running)."""
        self.max_batch_tokens = max_batch_tokens
        self.usual_shape = self._usual_shape()
        self._build(*self.usual_shape, compile=self.compile)

    @torch.inference_mode()
    def _warm_up_forward(self) -> None:
        """The picture question's prefill in slot 0 (then freed): what one question's vision
        tower and prefill take beside the weights, before the cache is sized."""
        runner = self.runner
        if runner is None or self._usual_inputs is None:
            return
        runner.prefill(0, runner.embed_prompt(self._usual_inputs), 0)
        runner.cache.free(0)

    def _size_from_free_memory(self) -> None:
        """MAX_BATCH_TOKENS=auto: see the module docstring."""
        loaded = self.loaded
        try:
            self._warm_up_forward()
        except torch.OutOfMemoryError as error:
            raise ModelLoadError(
                "the model's weights leave too little GPU memory for one question about a picture "
                "(try QUANTIZE=4bit, a lower NUM_CROPS or MAX_NEW_TOKENS)"
            ) from error
        # Read while torch's allocator still holds the warm-up's activations (they count as in
        # use); the warm-up's own cache, about to be replaced, does not.
        figure = memory.device_memory(loaded.device)
        assert figure is not None and self.runner is not None
        free, total = figure
        free += self.runner.cache.nbytes
        self.runner = self.scheduler = None
        release_gpu_memory()
        per_token = memory.kv_bytes_per_token(loaded.model.config, loaded.dtype)
        fraction = self.settings.gpu_memory_fraction
        budget = memory.cache_budget_tokens(free, total, fraction, per_token)
        if budget < LEAST_AUTO_TOKENS:
            raise ModelLoadError(
                f"only {max(budget, 0)} tokens of KV cache fit in GPU_MEMORY_FRACTION={fraction} of the "
                f"GPU's {total / 2**30:.1f} GiB after loading ({(total - free) / 2**30:.1f} GiB in use): "
                "try QUANTIZE=4bit or a higher GPU_MEMORY_FRACTION"
            )
        self._resize(budget)
        slots, length = self.usual_shape
        log.info(
            "KV cache from free memory: %.0f%% of %.1f GiB less %.1f GiB in use = %d tokens at %d "
            "bytes/token (%.1f GiB): %d slot(s) x %d tokens",
            fraction * 100,
            total / 2**30,
            (total - free) / 2**30,
            budget,
            per_token,
            budget * per_token / 2**30,
            slots,
            length,
        )
        if length < self.usual_need:
            log.warning(
                "the KV cache holds %d tokens, less than a question about one picture and its answer "
                "(%d): such questions are refused as too long; try QUANTIZE=4bit, a lower NUM_CROPS "
                "or MAX_NEW_TOKENS",
                length,
                self.usual_need,
            )

    @property
    def capacity(self) -> int:
        """The most positions one request may need (its prompt and longest answer)."""
        return max(self.max_batch_tokens // self.length_bucket * self.length_bucket, self.usual_shape[1])

    def _too_long(self, prompt: int, max_new_tokens: int) -> PromptTooLong | None:
        if prompt + max_new_tokens <= self.capacity:
            return None
        return PromptTooLong(
            f"the question and its images take {prompt} tokens, and with a {max_new_tokens}-token "
            f"answer that is more than the {self.capacity} tokens of memory for answers; try fewer "
            "images or a shorter question"
        )

    def _out_of_memory(self) -> None:
        """Re-make the cache smaller once nothing runs (now, if nothing does)."""
        self._shrink_pending = True
        if self.idle:
            self._shrink()

    def _shrink(self) -> None:
        """A quarter fewer tokens than the cache held, never below one slot of the usual need."""
        self._shrink_pending = False
        slots, length = self.shape
        held = min(self.max_batch_tokens, slots * length)
        least = round_up(max(self.usual_need, 1), self.length_bucket)
        before = self.max_batch_tokens
        smaller = min(before, max(int(held * SHRINK_AFTER_OUT_OF_MEMORY), least))
        self._resize(smaller)
        log.warning(
            "out of GPU memory: the KV cache was re-made %s: %d -> %d tokens (%d slot(s) x %d tokens)",
            "smaller" if smaller < before else "as it was (one slot is its smallest)",
            before,
            smaller,
            *self.usual_shape,
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
        max_new_tokens = self.max_new_tokens(job)
        job.encoded = self.encoder.encode(job.request, max_new_tokens)
        too_long = self._too_long(int(job.encoded["input_ids"].shape[1]), max_new_tokens)
        if too_long is not None:
            raise too_long

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
            pieces=TextPieces(self.loaded.tokenizer, lambda item: self.outbox.send(job, item)),
        )
        too_long = self._too_long(request.prompt_length, max_new_tokens)
        if too_long is not None:  # the cache was made smaller since it was prepared
            job.send(too_long)
            return Admission.REFUSED
        scheduler = self.scheduler
        assert scheduler is not None
        if self._shrink_pending:
            if not scheduler.idle:
                return Admission.LATER  # the cache is re-made smaller once the running answers end
            self._shrink()
            scheduler = self.scheduler
            assert scheduler is not None
        if scheduler.idle:
            usual_fits = request.need <= self.usual_shape[1]
            if usual_fits and self.shape != self.usual_shape:
                self._build(*self.usual_shape, compile=self.compile)
            elif not scheduler.fits(request):
                shape = cache_shape(
                    self.max_batch_tokens,
                    self.settings.max_batch_size,
                    request.need,
                    self.length_bucket,
                    from_memory=self.sized_from_memory,
                )
                self._build(*shape, compile=False)
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
        pictures = "pixel_values" in request.prompt
        scheduler.admit(request, encoding=pictures)
        if pictures:
            request.encoding = self.images.submit(self._read_prompt(request))
        return Admission.ADMITTED

    def finish_all(self, item: Any = DONE) -> None:
        """End every running request with ``item`` (DONE: what was said so far is the answer)."""
        if self.scheduler is None:
            return
        for request in self.scheduler.running:
            self._finish(request, item)
        self.outbox.flush()

    def close(self) -> None:
        """No more pictures are encoded (the engine is closing)."""
        self.images.close()

    # --- one step -------------------------------------------------------------------------

    def step(self) -> None:
        """Schedule, execute, update (see the module docstring); what it says to the askers
        leaves at its end, in one call per event loop (streaming pieces at most every
        ``jobs.STREAM_INTERVAL_SECONDS``)."""
        try:
            self._step()
        finally:
            self.outbox.flush()

    @torch.inference_mode()
    def _step(self) -> None:
        scheduler, runner = self.scheduler, self.runner
        assert scheduler is not None and runner is not None
        for request in scheduler.running:
            if request.job.cancelled.is_set():
                self._finish(request)  # nobody is listening
        self._take_encoded()
        plan = scheduler.schedule()
        if not plan.prefill and not plan.decode:
            self._wait_for_encoding()  # only pictures in the vision tower: nothing to step
            return
        for chunk in plan.prefill:
            self._prefill(chunk)
        self.outbox.flush()  # first tokens go out before the decode step, not after it
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
            self._fail(decoding, error)
            return
        for request, token in zip(decoding, tokens, strict=True):
            self._accept(request, token)

    def _read_prompt(self, request: Request) -> Callable[[], torch.Tensor | None]:
        """The image encoder's work for a picture question: its embeddings; with
        ``prefill_beside``, its whole prefill too (the logits after its last position; None
        if its asker left first: the slot is not written)."""
        runner = self.runner
        assert runner is not None

        def work() -> torch.Tensor | None:
            embeds = runner.embed_prompt(request.prompt)
            if not self.prefill_beside:
                return embeds
            if request.job.cancelled.is_set():
                return None
            return runner.prefill(request.slot, embeds, 0, request.prompt_length)

        return work

    def _take_encoded(self) -> None:
        """Requests whose pictures are through the vision tower start prefilling, or with
        ``prefill_beside``, decoding (their prompts are in the cache)."""
        scheduler = self.scheduler
        assert scheduler is not None
        for request in scheduler.encoding:
            if not request.encoding.done():
                continue
            try:
                result = request.encoding.result()
            except Exception as error:
                log.exception("reading a request's pictures failed")
                release_gpu_memory()
                self._fail([request], error)
                continue
            request.encoding = None
            if not self.prefill_beside:
                request.embeds = result
                scheduler.encoded(request)
            elif result is None:  # its asker left while it was read
                self._finish(request)
            else:
                scheduler.prefilled(Chunk(request, 0, request.prompt_length), beside=True)
                self._first_token(request, result)

    def _wait_for_encoding(self) -> None:
        """Until a picture is through the vision tower, or briefly (a cancel is seen soon)."""
        assert self.scheduler is not None
        pending = [request.encoding for request in self.scheduler.encoding]
        if pending:
            concurrent.futures.wait(pending, ENCODING_WAIT_SECONDS, concurrent.futures.FIRST_COMPLETED)

    def _prefill(self, chunk: Chunk) -> None:
        request = chunk.request
        scheduler, runner = self.scheduler, self.runner
        assert scheduler is not None and runner is not None
        try:
            if request.embeds is None:  # text only: the token embeddings, here
                request.embeds = runner.embed_prompt(request.prompt)
            logits = runner.prefill(
                request.slot, request.embeds[chunk.start : chunk.end], chunk.start, request.prompt_length
            )
            scheduler.prefilled(chunk)
        except Exception as error:
            log.exception("a prefill failed")
            release_gpu_memory()
            self._fail([request], error)
            return
        if chunk.last:
            request.embeds = None
            self._first_token(request, logits)

    def _first_token(self, request: Request, logits: torch.Tensor) -> None:
        """The answer's first token, from the logits after the prompt's last position."""
        try:
            if self.steering is not None:
                ids = request.prompt["input_ids"][0].tolist()
                request.steering = self.steering.begin(request.job.request, ids)
            if request.steering is not None:
                request.steering.steer(0, logits)
            token = choose_tokens(logits[None], [request.sampling])[0]
        except Exception as error:
            log.exception("a prefill failed")
            release_gpu_memory()
            self._fail([request], error)
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

    def _fail(self, requests: list[Request], error: Exception) -> None:
        """End the requests a failure hit with it; after an out-of-memory the cache is re-made
        smaller first (at once if nothing else runs), so whoever asks next finds it so."""
        for request in requests:
            self._finish(request, tell=False)
        if memory.is_out_of_memory(error):
            self._out_of_memory()
        for request in requests:
            if not request.job.cancelled.is_set():
                self.outbox.send(request.job, error)

    def _finish(self, request: Request, item: Any = DONE, *, tell: bool = True) -> None:
        scheduler, runner = self.scheduler, self.runner
        assert scheduler is not None and runner is not None
        if request.status.name == "FINISHED":
            return
        reading = request.encoding
        if self.prefill_beside and reading is not None and not reading.cancel():
            concurrent.futures.wait([reading])  # it may be prefilling into the slot: not reused before
        scheduler.finish(request)
        runner.cache.free(request.slot)
        if request.job.cancelled.is_set() or not tell:
            return
        if item is DONE:
            request.pieces.end()
        self.outbox.send(request.job, item)
