"""The local engine's fast path: set-up, warm-up and continuous batching on the worker thread.

``LocalEngine`` (local_engine.py) owns the queue of requests and the worker thread; with
FAST_PATH on, its worker runs ``_serve_continuous`` from this mixin instead of the plain
path's batched ``generate``: requests are prefilled (those arriving together, together)
into free slots of ``continuous.SlotDecoder`` and decode in step with the others, each
leaving its slot as soon as it ends. Before taking questions the engine warms the fast path
up (``warm_up.py``); anything that does not fit falls back to the plain path with one log
line, never a crash.

The methods use the engine's queue (``_lock``, ``_waiting``, ``_running``, ``_closing``) and
request helpers (``_prepare``, ``_fit_context``, ``_on_device``...), as ``self: LocalEngine``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from .continuous import SlotDecoder, choose_tokens
from .engine import EngineClosed, GenerationRequest
from .fast_path import FastPathGenerator, FastPathUnavailable
from .jobs import BATCH_GATHER_SECONDS, Job, Row, padding_id, release_gpu_memory
from .loading import LoadedModel
from .pieces import TextPieces
from .warm_up import use_compile_cache, warm_up, warm_up_conversations

if TYPE_CHECKING:
    from .local_engine import LocalEngine

log = logging.getLogger(__name__)


class ContinuousServing:
    """Mixed into ``LocalEngine``: see the module docstring."""

    def _start_fast_path(self: LocalEngine, loaded: LoadedModel) -> None:
        """The slots over a native Phi-3 (``self._slots``) when FAST_PATH asks for them and the
        model fits; anything that does not fit falls back to the plain path with one log
        line, never a crash."""
        wanted = self.settings.fast_path
        if wanted == "off" or (wanted == "auto" and loaded.device.type != "cuda"):
            return
        on_cuda = loaded.device.type == "cuda"
        compile_decode = self.settings.compile == "on" or (self.settings.compile == "auto" and on_cuda)
        try:
            fast = FastPathGenerator(loaded.model, compile=compile_decode and on_cuda)
        except FastPathUnavailable as reason:
            log.warning("fast path off, using the plain path: %s", reason)
            return
        decoding = "eager"
        if compile_decode:
            cache = use_compile_cache(self.settings.compile_cache_dir)
            decoding = f"{'CUDA graphs' if on_cuda else 'compiled'}, compile cache {cache}"
        log.info("fast path on: native Phi-3, %s, continuous batching", decoding)
        self._slots = SlotDecoder(
            fast,
            pad_id=padding_id(loaded.tokenizer),
            max_rows=self.settings.max_batch_size,
            max_tokens=self.settings.max_batch_tokens,
            compile=compile_decode,
        )

    def _warm_up(self: LocalEngine) -> None:
        """Run the fast path's common shapes before taking questions (see warm_up.py). If
        compiling fails, decode eagerly; if the fast path itself fails, use the plain path:
        one log line each, never a crash."""
        decoder = self._slots
        assert decoder is not None and self._loaded is not None
        started = time.perf_counter()
        try:
            settings = self.settings
            prompts = []
            for conversation in warm_up_conversations(with_picture=decoder.compile):
                encoded = self._fit_context(GenerationRequest(conversation), settings.max_new_tokens)
                prompts.append(self._on_device(encoded))

            try:
                shapes = warm_up(decoder, prompts, settings.max_new_tokens)
            except Exception as error:
                if not decoder.compile:
                    raise
                log.warning("compiling the decode step failed, decoding without it: %s", error)
                decoder.release()
                decoder.compile = False
                release_gpu_memory()
                shapes = warm_up(decoder, prompts, settings.max_new_tokens)
        except Exception as error:
            log.warning("fast path off after its warm-up failed, using the plain path: %s", error)
            decoder.release()
            release_gpu_memory()
            self._slots = None
            return
        self.warm_up_seconds = time.perf_counter() - started
        log.info(
            "warmed up in %.1f s (KV cache shapes, slots x tokens: %s)",
            self.warm_up_seconds,
            ", ".join(f"{slots} x {length}" for slots, length in shapes),
        )

    # --- continuous batching -------------------------------------------------------------

    def _serve_continuous(self: LocalEngine, decoder: SlotDecoder) -> None:
        """The worker's loop on the fast path: requests join the running batch between decode
        steps and leave it when done (see inference/continuous.py)."""
        loaded = self._loaded
        assert loaded is not None
        stops = frozenset(loaded.stop_token_ids)
        active: dict[int, Row] = {}  # slot -> its request
        feed: dict[int, int] = {}  # slot -> the token it decodes next
        temperatures: dict[int, float] = {}
        try:
            while self._admit(decoder, active, feed, temperatures):
                for slot, row in list(active.items()):
                    if row.job.cancelled.is_set() or row.finished:
                        row.finished = True
                        self._leave(decoder, active, slot)
                if not active:
                    continue
                slots = sorted(active)
                try:
                    logits = decoder.step({slot: feed[slot] for slot in slots})
                    tokens = choose_tokens(
                        logits[slots],
                        [temperatures[slot] for slot in slots],
                        decoder.native.generation_config,
                    )
                except Exception as error:
                    log.exception("a decode step failed")
                    decoder.release()
                    release_gpu_memory()
                    for slot in slots:
                        active[slot].finish(error)
                        self._leave(decoder, active, slot)
                    continue
                for slot, token in zip(slots, tokens, strict=True):
                    row = active[slot]
                    row.accept(token, stops)
                    feed[slot] = token
                    if row.finished:
                        self._leave(decoder, active, slot)  # its slot is free for the next step
        except BaseException:
            log.critical("the model worker stopped", exc_info=True)
            for row in active.values():
                row.finish(EngineClosed("the model worker stopped"))
            raise
        for row in active.values():  # shutting down: what was said so far is the answer
            row.finish()

    def _leave(self: LocalEngine, decoder: SlotDecoder, active: dict[int, Row], slot: int) -> None:
        del active[slot]
        decoder.free(slot)
        if not active:
            with self._lock:
                self._running = None

    def _admit(
        self: LocalEngine,
        decoder: SlotDecoder,
        active: dict[int, Row],
        feed: dict[int, int],
        temperatures: dict[int, float],
    ) -> bool:
        """Give free slots to waiting requests, prefilling those that join together as one
        batch; False when closing. With nothing running this waits for a request."""
        while not self._closing.is_set():
            if active and len(active) >= decoder.slots:
                return True
            group = self._take_joiners(decoder, active)
            if group is None:
                return False
            if not group:
                if active:
                    return True
                continue  # none of them could start (cancelled, bad prompt): wait again
            self._join(decoder, group, active, feed, temperatures)
        return False

    def _take_joiners(self: LocalEngine, decoder: SlotDecoder, active: dict[int, Row]) -> list[Job] | None:
        """Waiting requests for the free slots, to prefill together; None when closing.

        With nothing running, the first one sets the cache's shape (and waits a moment for
        company, as ``_take_batch`` does). A request that does not fit a slot (prompt + answer
        longer than the cache's rows), or would push the joiners' padded prompts past
        MAX_BATCH_TOKENS, waits first in line: for the next step, or for the batch to drain
        (then the cache is re-made for it).
        """
        group: list[Job] = []
        longest = 0
        while len(active) + len(group) < (decoder.slots if active or group else 1):
            with self._lock:
                if not active and not group:
                    while not self._waiting and not self._closing.is_set():
                        self._lock.wait()
                elif len(group) == 1 and not active and not self._waiting:
                    self._lock.wait_for(lambda: self._waiting or self._closing.is_set(), BATCH_GATHER_SECONDS)
                if self._closing.is_set():
                    self._waiting.extendleft(reversed(group))
                    return None
                if not self._waiting:
                    break
                job = self._waiting.popleft()
                if not active and not group:
                    self._running = job
            if job.cancelled.is_set() or not self._prepare(job):
                self._no_longer_running(active, group)
                continue
            prompt_length = job.encoded["input_ids"].shape[1]  # type: ignore[index]
            need = prompt_length + self._max_new_tokens(job)
            if not active and not group:
                try:
                    decoder.ensure(*decoder.shape_for(need))
                except Exception as error:
                    log.exception("making the KV cache failed")
                    decoder.release()
                    release_gpu_memory()
                    job.send(error)
                    self._no_longer_running(active, group)
                    continue
            elif need > decoder.length or (len(group) + 1) * max(longest, prompt_length) > (
                self.settings.max_batch_tokens
            ):
                with self._lock:
                    self._waiting.appendleft(job)  # first in line, for a later step or batch
                break
            group.append(job)
            longest = max(longest, prompt_length)
        return group

    def _no_longer_running(self: LocalEngine, active: dict[int, Row], group: list[Job]) -> None:
        if not active and not group:
            with self._lock:
                self._running = None

    def _join(
        self: LocalEngine,
        decoder: SlotDecoder,
        group: list[Job],
        active: dict[int, Row],
        feed: dict[int, int],
        temperatures: dict[int, float],
    ) -> None:
        """Prefill the joiners together into free slots; each one's first token is streamed
        at once."""
        loaded = self._loaded
        assert loaded is not None
        joining = len(active)
        free = [slot for slot in range(decoder.slots) if slot not in active][: len(group)]
        rows: list[Row] = []
        prompts: list[tuple[int, dict[str, torch.Tensor]]] = []
        for job, slot in zip(group, free, strict=True):
            self._tell_started(job)
            rows.append(Row(job, self._max_new_tokens(job), TextPieces(loaded.tokenizer, job.send)))
            prompts.append((slot, self._on_device(job.encoded)))  # type: ignore[arg-type]
        row_temperatures = [self._temperature(job) for job in group]
        try:
            logits = decoder.prefill_many(prompts)
            tokens = choose_tokens(logits, row_temperatures, decoder.native.generation_config)
        except Exception as error:
            log.exception("a prefill failed")
            for slot in free:
                decoder.free(slot)
            release_gpu_memory()
            for row in rows:
                row.finish(error)
            self._no_longer_running(active, [])
            return
        if joining:
            self.joined_running += len(group)
            log.info(
                "%d request(s) joined a running batch (%d answer(s) decoding)",
                len(group),
                joining + len(group),
            )
        stops = frozenset(loaded.stop_token_ids)
        for row, slot, token, temperature in zip(rows, free, tokens, row_temperatures, strict=True):
            row.accept(token, stops)
            if row.finished:
                decoder.free(slot)
                continue
            active[slot] = row
            feed[slot] = token
            temperatures[slot] = temperature
        self._no_longer_running(active, [])
