"""The continuous-batching KV cache: slots of key/value buffers and each slot's filled length.

One buffer per layer for keys and one for values, ``(slots, kv_heads, length, head_dim)``:
a request holds one slot (row) from its prefill to its end, its K/V at positions
``[0, filled)``. No row is kept for scratch (on a small GPU a row is a question): the padding
rows of a bucketed decode step repeat a busy row (runner.py). Reads
gather only the rows of a step and only up to the step's length bucket, so a step costs
what its busy rows hold, not the whole cache.
"""

from __future__ import annotations

from typing import Any

import torch

from .memory import kv_geometry


class SlotCache:
    """Fixed slots of K/V buffers; ``filled(slot)`` is how many positions a slot holds."""

    def __init__(
        self,
        *,
        layers: int,
        slots: int,
        length: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (slots, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.slots = slots
        self.length = length
        self._filled = [0] * slots

    @classmethod
    def for_model(
        cls, config: Any, *, slots: int, length: int, device: torch.device, dtype: torch.dtype
    ) -> SlotCache:
        """A cache shaped for a (Phi-3) language model config."""
        layers, kv_heads, head_dim = kv_geometry(config)
        return cls(
            layers=layers,
            slots=slots,
            length=length,
            kv_heads=kv_heads,
            head_dim=head_dim,
            device=device,
            dtype=dtype,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def mark_static(self) -> None:
        """Tell torch.compile the buffers never move (CUDA graphs read them in place)."""
        for tensor in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(tensor)

    # --- lengths (host side) -----------------------------------------------------------

    def filled(self, slot: int) -> int:
        return self._filled[slot]

    def advance(self, slot: int, count: int) -> None:
        if self._filled[slot] + count > self.length:
            raise ValueError(f"slot {slot} would run past the end of its {self.length}-token KV cache")
        self._filled[slot] += count

    def free(self, slot: int) -> None:
        self._filled[slot] = 0  # stale K/V stay, masked out until overwritten

    # --- device side (called from the attention function, one layer at a time) --------

    def write_tokens(
        self,
        layer: int,
        rows: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """Decode: one new key/value per row (``keys``: rows x heads x 1 x dim) at its position."""
        self.keys[layer][rows, :, positions] = keys[:, :, 0].to(self.keys[layer].dtype)
        self.values[layer][rows, :, positions] = values[:, :, 0].to(self.values[layer].dtype)

    def write_span(self, layer: int, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Prefill: a chunk's keys/values (1 x heads x n x dim) at ``[start, start + n)``."""
        end = start + keys.shape[2]
        self.keys[layer][slot, :, start:end] = keys[0].to(self.keys[layer].dtype)
        self.values[layer][slot, :, start:end] = values[0].to(self.values[layer].dtype)

    def read(self, layer: int, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of these rows (rows x heads x length x dim)."""
        return self.keys[layer][rows, :, :length], self.values[layer][rows, :, :length]

    def read_rows(self, layer: int, first: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Consecutive slots ``first .. first + rows - 1`` (no copy)."""
        return self.rows_of(self.keys[layer], self.values[layer], first, rows, length)

    @staticmethod
    def rows_of(
        keys: torch.Tensor, values: torch.Tensor, first: int, rows: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``read_rows`` of one layer's buffers (``keys``, ``values``): views, for attention that
        is handed the buffers rather than the cache (``slot_attention.attend_by_runs``)."""
        end = first + rows
        return keys[first:end, :, :length], values[first:end, :, :length]

    def read_slot(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's first ``length`` positions (1 x heads x length x dim), without a copy."""
        return self.keys[layer][slot : slot + 1, :, :length], self.values[layer][slot : slot + 1, :, :length]
