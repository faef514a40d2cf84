"""Scripted replies over the real engine, for tests: a ``Steering`` (inference/steering.py).

The real model runs every forward; this only changes which token each row takes. Rules are
``{"when": str, "reply": str, "seconds_per_token": float, "after_end": str, "fail":
"out_of_memory" | "worker_crash"}`` (tests/conftest.py's SCRIPT), matched on the last user
turn's text (stripped): the first rule whose ``when`` occurs in it (``""`` matches anything)
forces the reply's tokens, then ``<|end|>``, then ``after_end`` (the model running on past
its turn, as the real one does when only ``<|endoftext|>`` stops it), then
``<|endoftext|>``. ``{images}`` in a reply becomes the number of images in the prompt,
``{question}`` the matched turn text. ``fail`` raises when the request's prefill starts,
where a real failure would: ``torch.OutOfMemoryError``, or ``SystemExit`` (the worker thread
dies). A question no rule matches gets the random weights' own tokens, kept to clean
printable text (never a special token, a partial UTF-8 byte or an unused id): it never ends
by itself.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from inference.engine import GenerationRequest

DEFAULT_AFTER_END = "\n<|assistant|>\nrunaway text"
FORCED = 1.0e4


def _fail_as_scripted(failure: object) -> None:
    if failure is None:
        return
    if failure == "out_of_memory":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (scripted)")
    if failure == "worker_crash":
        raise SystemExit("the worker thread dies (scripted)")
    raise ValueError(f"unknown scripted failure {failure!r}")


class _Forced:
    """A row that takes ``tokens`` one per step, then eos for ever."""

    def __init__(self, tokens: list[int], eos_id: int, seconds_per_token: float) -> None:
        self._tokens = tokens
        self._eos = eos_id
        self._pause = seconds_per_token

    def steer(self, step: int, logits: torch.Tensor) -> None:
        token = self._tokens[step] if step < len(self._tokens) else self._eos
        logits.fill_(-FORCED)
        logits[token] = FORCED
        if self._pause and step < len(self._tokens):
            time.sleep(self._pause)


class _Clean:
    """A row left to the random weights, but only over clean text tokens."""

    def __init__(self, banned: torch.Tensor) -> None:
        self._banned = banned

    def steer(self, step: int, logits: torch.Tensor) -> None:
        banned = self._banned.to(logits.device)
        logits[: banned.shape[0]].masked_fill_(banned, float("-inf"))
        logits[banned.shape[0] :] = float("-inf")


@functools.lru_cache(maxsize=8)
def _banned_tokens(tokenizer_file: str) -> torch.Tensor:
    """True for every id whose text is not plain printable ASCII (special tokens included)."""
    backend = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file).backend_tokenizer
    special = {token.content for token in backend.get_added_tokens_decoder().values()}
    banned = torch.ones(backend.get_vocab_size(with_added_tokens=True), dtype=torch.bool)
    for token_id in range(banned.shape[0]):
        if backend.id_to_token(token_id) in special:
            continue
        text = backend.decode([token_id], skip_special_tokens=False)
        banned[token_id] = not (text and text.isascii() and (text.isprintable() or text.strip() == ""))
    return banned


class ScriptedReplies:
    """The scripted-replies ``Steering``; ``model_dir`` holds the model's tokenizer.json."""

    def __init__(self, script: Sequence[dict[str, Any]], model_dir: str | Path) -> None:
        self._rules = list(script)
        self._tokenizer_file = str(Path(model_dir) / "tokenizer.json")

    @functools.cached_property
    def _backend(self) -> Any:
        return PreTrainedTokenizerFast(tokenizer_file=self._tokenizer_file).backend_tokenizer

    def begin(self, request: GenerationRequest, prompt_ids: list[int]) -> _Forced | _Clean:
        turns = [turn for turn in request.conversation.turns if turn.role == "user"]
        question = turns[-1].text.strip() if turns else ""
        rule = next((r for r in self._rules if str(r.get("when", "")) in question), None)
        if rule is None:
            return _Clean(_banned_tokens(self._tokenizer_file))
        _fail_as_scripted(rule.get("fail"))
        backend = self._backend
        end_id, eos_id = backend.token_to_id("<|end|>"), backend.token_to_id("<|endoftext|>")
        images = len({i for i in prompt_ids if i < 0})
        reply = str(rule.get("reply", "")).replace("{images}", str(images)).replace("{question}", question)
        after_end = rule.get("after_end")
        after_end = DEFAULT_AFTER_END if after_end is None else str(after_end)
        tokens = [*backend.encode(reply, add_special_tokens=False).ids, end_id]
        tokens += [*backend.encode(after_end, add_special_tokens=False).ids, eos_id]
        return _Forced(tokens, eos_id, float(rule.get("seconds_per_token", 0.0) or 0.0))
