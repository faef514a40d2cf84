"""Choosing each row's next token from its logits: greedy, or sampled as HF ``generate`` does.

Every request carries its own ``Sampling`` (temperature 0 is greedy), so rows that sample
differently share a decode step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens: greedy at temperature 0, else temperature + top-k/top-p."""

    temperature: float = 0.0
    top_k: int = 50
    top_p: float = 1.0

    @classmethod
    def of(cls, temperature: float, generation_config: Any = None) -> Sampling:
        """``temperature`` with the model's generation config's top-k / top-p (HF's defaults)."""
        top_k = getattr(generation_config, "top_k", 50)
        top_p = getattr(generation_config, "top_p", 1.0)
        return cls(
            float(temperature), int(50 if top_k is None else top_k), float(1.0 if top_p is None else top_p)
        )

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def choose_tokens(logits: torch.Tensor, sampling: Sequence[Sampling]) -> list[int]:
    """One token per row of ``logits`` (rows x vocab), each row by its own ``Sampling``."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()
    for row, how in enumerate(sampling):
        if how.greedy:
            continue
        scores = logits[row] / how.temperature
        if 0 < how.top_k < scores.shape[-1]:
            kth = torch.topk(scores, how.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if how.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - how.top_p
            drop[-1] = False
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        tokens[row] = int(torch.multinomial(scores.softmax(-1), 1))
    return tokens
