"""The attention function that reads and writes the engine's ``SlotCache``.

Registered with transformers' ``AttentionInterface`` (``use_slot_attention``), so the
engine runs the model's own ``Phi3Model`` forward and only attention differs: given
``slot_cache=`` (and where to write) in the forward's keyword arguments, which transformers
hands down to every attention call, it writes the new keys/values into the cache and
attends over the rows' cached positions, with the 4-D mask the runner passes (a 4-D mask
reaches attention as it is; a prompt's first chunk gets transformers' own causal mask, or
none, sdpa's ``is_causal``). Without ``slot_cache`` it is the model's original attention
(sdpa, eager or flash), so HF ``generate`` on the same model is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .kv_cache import SlotCache

PREFIX = "seebot_slots"


def _slot_attention(fallback: Any) -> Any:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        slot_cache: SlotCache | None = None,
        slot_rows: torch.Tensor | None = None,
        slot_positions: torch.Tensor | None = None,
        slot_first: int | None = None,
        slot_length: int | None = None,
        slot_index: int | None = None,
        slot_start: int = 0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if slot_cache is None:
            return fallback(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        layer = module.layer_idx
        if slot_index is None:  # decode: one token per row, rows gathered from their slots
            assert slot_rows is not None and slot_positions is not None
            slot_cache.write_tokens(layer, slot_rows, slot_positions, key, value)
            # No mask (eager, every row sees all its positions): the length comes on its own.
            length = attention_mask.shape[-1] if attention_mask is not None else slot_length
            assert length is not None
            if slot_first is None:
                keys, values = slot_cache.read(layer, slot_rows, length)
            else:  # consecutive slots (eager): a view, no gather
                keys, values = slot_cache.read_rows(layer, slot_first, query.shape[0], length)
        else:  # a prefill chunk of one slot
            slot_cache.write_span(layer, slot_index, slot_start, key, value)
            keys, values = slot_cache.read_slot(layer, slot_index, slot_start + query.shape[2])
        output = F.scaled_dot_product_attention(
            query,
            keys.to(query.dtype),
            values.to(query.dtype),
            attn_mask=attention_mask,
            # A first chunk with no mask: plain causal (transformers found no padding or window);
            # a decode step with none: one query per row, every position visible.
            is_causal=attention_mask is None and slot_index is not None,
            scale=scaling,
            enable_gqa=module.num_key_value_groups > 1,
        )
        return output.transpose(1, 2).contiguous(), None

    return attention


def use_slot_attention(model: Any) -> str:
    """Switch ``model`` to the slot-cache attention over its current implementation; returns
    the implementation's name. Idempotent."""
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return current
    name = f"{PREFIX}_{current}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _slot_attention(ALL_ATTENTION_FUNCTIONS[current]))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    return name


def _visible(keys: torch.Tensor, queries: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal, and within the model's sliding window as transformers masks it."""
    visible = keys[None, :] <= queries[:, None]
    if window is not None:
        visible &= keys[None, :] > queries[:, None] - window
    return visible


def decode_mask(positions: torch.Tensor, length: int, window: int | None = None) -> torch.Tensor:
    """Row r sees cache positions <= positions[r] of the first ``length`` (rows x 1 x 1 x length)."""
    return _visible(torch.arange(length, device=positions.device), positions, window)[:, None, None, :]


def chunk_mask(start: int, end: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """Causal over a prefill chunk's positions ``[start, end)`` and everything before them."""
    keys = torch.arange(end, device=device)
    return _visible(keys, torch.arange(start, end, device=device), window)[None, None]
