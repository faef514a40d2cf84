"""The in-process engine: one worker thread owns the model; requests wait in a queue.

Several threads calling `generate` on one model gain nothing and race on GPU memory, so
exactly one thread loads the model and runs every request. Text pieces come back to the
event loop with `call_soon_threadsafe`; the loop never waits on the GPU.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from .conversation import Conversation, PromptError, build_prompt, without_oldest_exchange
from .engine import EngineClosed, EngineError, GenerationError, GenerationRequest, PromptTooLong
from .loading import LoadedModel, load_model
from .settings import InferenceSettings

log = logging.getLogger(__name__)

_DONE = object()
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    pieces: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    position: int | None = None

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


class _StopWhen(StoppingCriteria):
    """Ends `generate` at the next token once any of the events is set."""

    def __init__(self, *events: threading.Event) -> None:
        self._events = events

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        stop = any(event.is_set() for event in self._events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _PieceStreamer(TextStreamer):
    """Decodes new tokens into readable pieces (whole words where it can) for a callback.

    `skip_prompt=True` is required: the prompt holds negative image ids that cannot be decoded.
    """

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._emit = emit

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._emit(text)


def default_num_crops(image_count: int) -> int:
    """The model cards' advice: 16 crops for a single image, 4 for multi-image prompts."""
    return 16 if image_count <= 1 else 4


class LocalEngine:
    """Runs a Phi-3-vision model in this process (see the module docstring)."""

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        loader: Callable[[InferenceSettings], LoadedModel] = load_model,
    ) -> None:
        self.settings = settings
        self._loader = loader
        self._waiting: collections.deque[_Job] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._loaded: LoadedModel | None = None
        self._running: _Job | None = None

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

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
        job = _Job(request, asyncio.get_running_loop())
        with self._lock:
            self._waiting.append(job)
            self._lock.notify()
        self._announce_positions()
        try:
            while True:
                item = await job.pieces.get()
                if item is _DONE:
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

    def _announce_positions(self, started: _Job | None = None) -> None:
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

    def _next_job(self) -> _Job | None:
        with self._lock:
            while not self._waiting and not self._closing.is_set():
                self._lock.wait()
            if self._closing.is_set():
                return None
            job = self._waiting.popleft()
            self._running = job
        try:
            job.loop.call_soon_threadsafe(self._announce_positions, job)
        except RuntimeError:
            job.cancelled.set()
        return job

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            self._loaded = self._loader(self.settings)
        except BaseException as error:
            loop.call_soon_threadsafe(_settle, ready, error)
            return
        loop.call_soon_threadsafe(_settle, ready, None)
        try:
            while (job := self._next_job()) is not None:
                try:
                    if job.cancelled.is_set():
                        continue
                    self._generate(job)
                except EngineError as error:
                    job.send(error)
                except Exception as error:
                    log.exception("generation failed")
                    _release_gpu_memory()
                    job.send(error)
                except BaseException:
                    log.critical("the model worker stopped", exc_info=True)
                    job.send(EngineClosed("the model worker stopped"))
                    raise
                else:
                    job.send(_DONE)
                finally:
                    with self._lock:
                        self._running = None
        finally:
            # Whatever happens to this thread, nobody is left waiting for an answer.
            self._fail_waiting(EngineClosed("the model worker stopped"))

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

    def _generate(self, job: _Job) -> None:
        loaded = self._loaded
        assert loaded is not None
        request = job.request
        max_new_tokens = request.max_new_tokens or self.settings.max_new_tokens
        inputs = {
            name: tensor.to(loaded.device)
            for name, tensor in self._fit_context(request, max_new_tokens).items()
        }
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        temperature = self.settings.temperature if request.temperature is None else request.temperature
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        tokenizer = loaded.tokenizer
        with torch.inference_mode():
            loaded.model.generate(
                **inputs,
                **sampling,
                max_new_tokens=max_new_tokens,
                eos_token_id=loaded.stop_token_ids,
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
                streamer=_PieceStreamer(tokenizer, job.send),
                stopping_criteria=StoppingCriteriaList([_StopWhen(job.cancelled, self._closing)]),
            )


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _release_gpu_memory() -> None:
    """After a failure (often out-of-memory) give the cached blocks back for the next request."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
