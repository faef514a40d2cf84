"""The engine's seam for steering token choice: optional, handed to the engine at construction.

A ``Steering`` sees each request once its prompt is prefilled and may return a ``RowSteering``
for it, which then sees that row's logits at every step, before the row's token is chosen,
and may change them in place. The model still runs every forward; nothing else changes.
Tests use it for scripted replies (tests/scripted.py); it could carry grammar constraints.
Whatever ``begin`` or ``steer`` raise is what that request's forward would have raised.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .engine import GenerationRequest


class RowSteering(Protocol):
    def steer(self, step: int, logits: torch.Tensor) -> None:
        """Edit this row's logits (vocab,) in place; ``step``: answer tokens chosen so far."""


class Steering(Protocol):
    def begin(self, request: GenerationRequest, prompt_ids: list[int]) -> RowSteering | None:
        """A request's prompt is in the cache (on the worker thread); None leaves it alone."""
