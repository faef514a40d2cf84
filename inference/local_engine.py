"""The in-process engine: one worker thread owns the model; requests wait in a queue.

Several threads calling `generate` on one model gain nothing and race on GPU memory, so
exactly one thread loads the model and runs every request. Text pieces come back to the
event loop with `call_soon_threadsafe`; the loop never waits on the GPU.

Plain path: requests waiting together run as one batched `generate` call (`_take_batch`).
Fast path (FAST_PATH): continuous batching (`_serve_continuous` in continuous_serving.py,
over continuous.py's slots): a request joins the running batch at the next decode step and
leaves it when done.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .continuous import SlotDecoder
from .continuous_serving import ContinuousServing
from .conversation import Conversation, PromptError, build_prompt, without_oldest_exchange
from .engine import EngineClosed, EngineError, GenerationError, GenerationRequest, PromptTooLong
from .jobs import BATCH_GATHER_SECONDS, DONE, Job, Row, padding_id, release_gpu_memory
from .loading import LoadedModel, load_model
from .pieces import TextPieces
from .settings import InferenceSettings

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


class _StopRows(StoppingCriteria):
    """Ends each row of a batch on its own: when its requester left, when it reached its own
    token limit or stop token (the streamer marks those), and all of them on shutdown."""

    def __init__(self, rows: list[Row], closing: threading.Event) -> None:
        self._rows = rows
        self._closing = closing

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        closing = self._closing.is_set()
        stop = [closing or row.finished or row.job.cancelled.is_set() for row in self._rows]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)


class _BatchStreamer(BaseStreamer):
    """Splits each step's tokens by row: every request streams its own text and ends at its
    own stop token or token limit, while the others in the batch go on."""

    def __init__(self, rows: list[Row], stop_token_ids: list[int]) -> None:
        self._rows = rows
        self._stops = set(stop_token_ids)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate hands over the (left-padded) prompts first
            self._prompt_seen = True
            return
        for row, token in zip(self._rows, value.view(-1).tolist(), strict=True):
            row.accept(token, self._stops)

    def end(self) -> None:
        for row in self._rows:
            row.finish()


def default_num_crops(image_count: int) -> int:
    """The model cards' advice: 16 crops for a single image, 4 for multi-image prompts."""
    return 16 if image_count <= 1 else 4


class LocalEngine(ContinuousServing):
    """Runs a Phi-3-vision model in this process (see the module docstring)."""

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        loader: Callable[[InferenceSettings], LoadedModel] = load_model,
    ) -> None:
        self.settings = settings
        self._loader = loader
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._loaded: LoadedModel | None = None
        self._running: Job | None = None
        # The fast path's continuous batching (inference/continuous.py), when it is on.
        self._slots: SlotDecoder | None = None
        # Requests that joined a batch already decoding (continuous batching; for tests/logs).
        self.joined_running = 0
        # How long the fast path's warm-up took at start-up (None: no warm-up ran).
        self.warm_up_seconds: float | None = None

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    @property
    def decoding(self) -> str:
        """How answers are generated: "plain", "fast, eager" or "fast, compiled"."""
        if self._slots is None:
            return "plain"
        return "fast, compiled" if self._slots.compile else "fast, eager"

    @property
    def waiting(self) -> int:
        """Requests in line behind the one that is running."""
        with self._lock:
            return len(self._waiting)

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready), name="inference-worker", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self) -> None:
        self._closing.set()
        with self._lock:
            self._lock.notify_all()
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join, 5)  # a token or two; a model still loading is abandoned
        self._fail_waiting(EngineClosed("the bot is shutting down"))
        self._slots = None  # the KV cache goes with it
        self._loaded = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self._closing.is_set() or self._thread is None or not self._thread.is_alive():
            raise EngineClosed("the model is not running")
        try:
            build_prompt(request.conversation)  # a malformed conversation fails here, at once
        except PromptError as error:
            raise EngineError(str(error)) from error
        job = Job(request, asyncio.get_running_loop())
        with self._lock:
            self._waiting.append(job)
            self._lock.notify()
        self._announce_positions()
        try:
            while True:
                item = await job.pieces.get()
                if item is DONE:
                    if request.on_end is not None:
                        request.on_end("length" if job.hit_token_limit else "stop")
                    return
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, BaseException):
                    raise GenerationError(f"generation failed: {item}") from item
                yield item
        finally:
            # Reached on normal end, on error, on break/aclose and on task cancellation.
            job.cancelled.set()
            with self._lock:
                withdrawn = job in self._waiting
                if withdrawn:
                    self._waiting.remove(job)
            if withdrawn:
                self._announce_positions()

    def _announce_positions(self, started: Job | None = None) -> None:
        """Tell every waiting requester its place in line (runs on the event loop).

        Place 1 means "next, behind the one running". With nothing running, the first in line
        is about to start: it hears nothing until it does (0), so an idle bot shows no queue.
        """
        if started is not None:
            started.tell_position(0)
        with self._lock:
            waiting = list(self._waiting)
            offset = 1 if self._running is not None else 0
        for index, job in enumerate(waiting):
            if index + offset > 0:
                job.tell_position(index + offset)

    def _fail_waiting(self, error: EngineError) -> None:
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting:
            job.send(error)

    # --- worker thread -------------------------------------------------------------------

    def _next_job(self) -> Job | None:
        with self._lock:
            while not self._waiting and not self._closing.is_set():
                self._lock.wait()
            if self._closing.is_set():
                return None
            job = self._waiting.popleft()
            self._running = job
        self._tell_started(job)
        return job

    def _tell_started(self, job: Job) -> None:
        try:
            job.loop.call_soon_threadsafe(self._announce_positions, job)
        except RuntimeError:
            job.cancelled.set()

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            self._loaded = self._loader(self.settings)
            self._start_fast_path(self._loaded)
            if self._slots is not None:
                self._warm_up()
        except BaseException as error:
            loop.call_soon_threadsafe(_settle, ready, error)
            return
        loop.call_soon_threadsafe(_settle, ready, None)
        try:
            if self._slots is not None:
                self._serve_continuous(self._slots)
                return
            while (batch := self._take_batch()) is not None:
                try:
                    if batch:
                        self._generate(batch)
                finally:
                    with self._lock:
                        self._running = None
        finally:
            # Whatever happens to this thread, nobody is left waiting for an answer.
            self._fail_waiting(EngineClosed("the model worker stopped"))

    def _take_batch(self) -> list[Job] | None:
        """The next request, and those waiting behind it that can share its `generate` call.

        Rows must sample alike (one temperature) and fit MAX_BATCH_TOKENS together, counted
        as the KV cache a left-padded batch needs: rows x (longest prompt + longest answer).
        """
        first = self._next_job()
        if first is None:
            return None
        if first.cancelled.is_set() or not self._prepare(first):
            return []
        batch = [first]
        longest_prompt = first.encoded["input_ids"].shape[1]  # type: ignore[index]
        longest_answer = self._max_new_tokens(first)
        while len(batch) < self.settings.max_batch_size:
            with self._lock:
                if len(batch) == 1:
                    # Requests often arrive in bursts (a batch just ended and its askers ask
                    # again): a few milliseconds of patience turn a batch of 1 into a full one.
                    self._lock.wait_for(lambda: self._waiting or self._closing.is_set(), BATCH_GATHER_SECONDS)
                if not self._waiting:
                    break
                job = self._waiting.popleft()
            if job.cancelled.is_set() or not self._prepare(job):
                continue
            prompt = max(longest_prompt, job.encoded["input_ids"].shape[1])  # type: ignore[index]
            answer = max(longest_answer, self._max_new_tokens(job))
            fits = (len(batch) + 1) * (prompt + answer) <= self.settings.max_batch_tokens
            if not fits or self._temperature(job) != self._temperature(first):
                with self._lock:
                    self._waiting.appendleft(job)  # first in line for the next batch
                break
            batch.append(job)
            longest_prompt, longest_answer = prompt, answer
            self._tell_started(job)
        return batch

    def _on_device(self, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loaded = self._loaded
        assert loaded is not None
        inputs = {name: tensor.to(loaded.device) for name, tensor in encoded.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        return inputs

    def _prepare(self, job: Job) -> bool:
        """Encode the request (once); on failure tell its requester and leave it out."""
        if job.encoded is not None:
            return True
        try:
            job.encoded = self._fit_context(job.request, self._max_new_tokens(job))
        except EngineError as error:
            job.send(error)
            return False
        except Exception as error:
            log.exception("preparing a request failed")
            job.send(error)
            return False
        return True

    def _max_new_tokens(self, job: Job) -> int:
        return job.request.max_new_tokens or self.settings.max_new_tokens

    def _temperature(self, job: Job) -> float:
        temperature = job.request.temperature
        return self.settings.temperature if temperature is None else temperature

    def _encode(self, conversation: Conversation, request: GenerationRequest) -> dict[str, torch.Tensor]:
        loaded = self._loaded
        assert loaded is not None
        images = [image if image.mode == "RGB" else image.convert("RGB") for image in conversation.images]
        processor = loaded.processor
        if images:
            processor.image_processor.num_crops = (
                request.num_crops or self.settings.num_crops or default_num_crops(len(images))
            )
        encoded = processor(build_prompt(conversation), images or None, return_tensors="pt")
        # Only what the model takes: some tokenizers add token_type_ids, which generate rejects.
        return {name: encoded[name] for name in MODEL_INPUTS if name in encoded}

    def _fit_context(self, request: GenerationRequest, max_new_tokens: int) -> dict[str, torch.Tensor]:
        """Encode the conversation, dropping its oldest exchanges until it fits the context."""
        loaded = self._loaded
        assert loaded is not None
        context = self.settings.max_context_tokens or getattr(
            loaded.model.config, "max_position_embeddings", None
        )
        conversation: Conversation | None = request.conversation
        dropped = 0
        while conversation is not None:
            inputs = self._encode(conversation, request)
            length = inputs["input_ids"].shape[1]
            if context is None or length + max_new_tokens <= context:
                if dropped:
                    log.info("left out the %d oldest exchange(s) to fit %d tokens", dropped, context)
                return inputs
            conversation = without_oldest_exchange(conversation)
            dropped += 1
        raise PromptTooLong(
            f"the question and its images take {length} tokens, and the model reads at most "
            f"{context - max_new_tokens} before answering; try fewer images or a shorter question"
        )

    def _collate(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch from single prompts: ids and masks left-padded, images concatenated in
        row order (crops zero-padded to the most any image has; image_sizes says which count).
        With one prompt this is the prompt itself."""
        loaded = self._loaded
        assert loaded is not None
        if len(encoded) == 1:
            return {name: tensor.clone() for name, tensor in encoded[0].items()}  # the model edits ids
        tokenizer = loaded.tokenizer
        pad_id = padding_id(tokenizer)
        longest = max(item["input_ids"].shape[1] for item in encoded)
        input_ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, item in enumerate(encoded):
            length = item["input_ids"].shape[1]
            input_ids[row, longest - length :] = item["input_ids"][0]
            attention_mask[row, longest - length :] = item.get("attention_mask", torch.ones(1, length))[0]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        pixels = [item["pixel_values"] for item in encoded if "pixel_values" in item]
        if pixels:
            slots = max(p.shape[1] for p in pixels)
            batch["pixel_values"] = torch.cat(
                [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, slots - p.shape[1])) for p in pixels]
            )
            batch["image_sizes"] = torch.cat(
                [item["image_sizes"] for item in encoded if "image_sizes" in item]
            )
        return batch

    def _generate(self, batch: list[Job]) -> None:
        loaded = self._loaded
        assert loaded is not None
        tokenizer = loaded.tokenizer
        rows = [Row(job, self._max_new_tokens(job), TextPieces(tokenizer, job.send)) for job in batch]
        inputs = self._on_device(self._collate([job.encoded for job in batch]))  # type: ignore[misc]
        temperature = self._temperature(batch[0])
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        if len(batch) > 1:
            log.info("generating %d answers in one batch", len(batch))
        pad_id = padding_id(tokenizer)
        arguments: dict[str, Any] = {
            **sampling,
            "max_new_tokens": max(row.max_new_tokens for row in rows),
            "eos_token_id": loaded.stop_token_ids,
            "pad_token_id": pad_id,
            "streamer": _BatchStreamer(rows, loaded.stop_token_ids),
            "stopping_criteria": StoppingCriteriaList([_StopRows(rows, self._closing)]),
        }
        try:
            with torch.inference_mode():
                loaded.model.generate(**inputs, **arguments)
        except Exception as error:
            log.exception("generation failed")
            release_gpu_memory()
            for row in rows:
                row.finish(error)
        except BaseException:
            log.critical("the model worker stopped", exc_info=True)
            for row in rows:
                row.finish(EngineClosed("the model worker stopped"))
            raise
        for row in rows:  # normally done by the streamer; this covers a generate that ends early
            row.finish()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
