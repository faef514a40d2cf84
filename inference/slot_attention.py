"""Attention over the engine's ``SlotCache``: a prefill chunk's (``chunk_attention``) and a
decode step's (``decode_attention``), called by the runner's own layer loop (runner.py) over
the model's modules. Each writes the new keys/values into the cache and attends over the
positions its rows have filled, through ``F.scaled_dot_product_attention``; the model's own
attention (sdpa, eager or flash) is untouched, so HF ``generate`` on the same model is
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from .kv_cache import SlotCache


def chunk_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: SlotCache,
    slot: int,
    start: int,
    mask: torch.Tensor | None,
    *,
    split: bool = False,
) -> torch.Tensor:
    """A prefill chunk's attention (1 x heads x n x dim in; 1 x n x heads x dim out): its keys
    and values go into ``slot`` at ``[start, start + n)``, then it attends over the slot's
    first ``start + n`` positions: with ``mask`` (1 x 1 x n x start + n), or none, causal
    (the first chunk), or ``split``: in two passes (``_chunk_in_two``, the CPU)."""
    layer = module.layer_idx
    cache.write_span(layer, slot, start, key, value)
    keys, values = cache.read_slot(layer, slot, start + query.shape[2])
    if split:
        return _chunk_in_two(query, keys, values, start, module.scaling).transpose(1, 2).contiguous()
    return _attend(module, query, keys, values, mask, is_causal=mask is None).transpose(1, 2).contiguous()


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: SlotCache,
    rows: torch.Tensor,
    positions: torch.Tensor,
    length: int,
    mask: torch.Tensor | None = None,
    *,
    first: int | None = None,
    by_runs: bool = False,
) -> torch.Tensor:
    """A decode step's attention (rows x heads x 1 x dim in; rows x 1 x heads x dim out): each
    row writes its key/value at its position in its slot, then attends over the first
    ``length`` positions (``mask``: rows x 1 x 1 x length, None: every row sees them all),
    read as a gather of the rows, as a view of consecutive slots from ``first``, or
    ``by_runs``: each run of consecutive slots over a view of its own positions
    (``attend_by_runs``, the CPU step, eager or compiled: a row's cost is its own)."""
    layer = module.layer_idx
    cache.write_tokens(layer, rows, positions, key, value)
    if by_runs:
        keys, values = cache.keys[layer], cache.values[layer]
        attend = attend_by_runs if torch.compiler.is_compiling() else _attend_by_runs  # eager: no dispatch
        output = attend(query, keys, values, rows, positions, module.scaling, _grouped(module))
    else:
        if first is None:
            keys, values = cache.read(layer, rows, length)
        else:
            keys, values = cache.read_rows(layer, first, query.shape[0], length)
        output = _attend(module, query, keys, values, mask)
    return output.transpose(1, 2).contiguous()


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    is_causal: bool = False,
) -> torch.Tensor:
    """sdpa over cached keys/values (heads-first in and out) with the layer's scale."""
    return _sdpa(query, keys, values, mask, module.scaling, _grouped(module), is_causal=is_causal)


def _sdpa(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    grouped: bool,
    *,
    is_causal: bool = False,
) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        query,
        keys.to(query.dtype),
        values.to(query.dtype),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=grouped,
    )


def _grouped(module: torch.nn.Module) -> bool:
    return module.num_key_value_groups > 1


@dataclass(frozen=True)
class Run:
    """Decode rows in consecutive slots ``first .. first + rows - 1`` (and consecutive rows of
    the step), over their first ``length`` positions; ``mask``: who sees what, where their
    lengths differ (None: every row sees all ``length``)."""

    first: int
    rows: int
    length: int
    mask: torch.Tensor | None


def runs_of(slots: list[int], positions: list[int]) -> list[Run]:
    """The runs of consecutive slots in a step whose rows are sorted by slot."""
    runs: list[Run] = []
    begin = 0
    for row in range(1, len(slots) + 1):
        if row < len(slots) and slots[row] == slots[row - 1] + 1:
            continue
        own = positions[begin:row]
        length = max(own) + 1
        mask = None
        if any(p != length - 1 for p in own):
            mask = decode_mask(torch.tensor(own), length)
        runs.append(Run(slots[begin], row - begin, length, mask))
        begin = row
    return runs


def _by_runs(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    runs: list[Run],
    scale: float | None,
    grouped: bool,
) -> torch.Tensor:
    """Decode attention run by run, each over a view of its slots in one layer's ``keys`` and
    ``values`` buffers (no gather), the query's rows in the runs' order. Heads-first out."""
    outputs = []
    row = 0
    for run in runs:
        own_keys, own_values = SlotCache.rows_of(keys, values, run.first, run.rows, run.length)
        outputs.append(_sdpa(query[row : row + run.rows], own_keys, own_values, run.mask, scale, grouped))
        row += run.rows
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _attend_by_runs(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    grouped: bool,
) -> torch.Tensor:
    """``_by_runs`` over the runs of the step's ``rows`` (slots, in any order) at ``positions``;
    the output in the step's order."""
    slots, where = rows.tolist(), positions.tolist()
    order = sorted(range(len(slots)), key=slots.__getitem__)
    runs = runs_of([slots[i] for i in order], [where[i] for i in order])
    if order == list(range(len(order))):
        return _by_runs(query, keys, values, runs, scale, grouped)
    index = torch.tensor(order, device=query.device)
    output = _by_runs(query[index], keys, values, runs, scale, grouped)
    return output[torch.argsort(index)]


# The same as an op of its own, which a compiled step calls as it is: its runs change every
# step, and traced they would be a gather of every busy row. Eager calls the function itself.
attend_by_runs = torch.library.custom_op("seebot::attend_by_runs", _attend_by_runs, mutates_args=())


@attend_by_runs.register_fake
def _(query: torch.Tensor, *_: object) -> torch.Tensor:
    return torch.empty_like(query)


def _chunk_in_two(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scaling: float | None
) -> torch.Tensor:
    """A prompt chunk's attention with no mask (CPU): all of the ``start`` positions before it,
    then causal over its own, merged by their log-sum-exps. The same attention as one masked
    pass (to rounding), which computes every (query, key) pair of the chunk's own square and
    runs a slower kernel on the CPU; this costs what one forward over the whole prompt spends
    on these queries."""
    before, before_lse = _flash_cpu(query, keys[:, :, :start], values[:, :, :start], scale=scaling)
    own, own_lse = _flash_cpu(query, keys[:, :, start:], values[:, :, start:], is_causal=True, scale=scaling)
    lse = torch.logaddexp(before_lse, own_lse)
    output = before * (before_lse - lse).exp()[..., None] + own * (own_lse - lse).exp()[..., None]
    return output.to(query.dtype)  # heads-first


def can_split_chunks(model: Any) -> bool:
    """Whether ``_chunk_in_two`` can run this model's prefill chunks: on the CPU (torch's CPU
    flash kernel, which returns the log-sum-exp), without grouped key/value heads."""
    config = model.config
    heads = config.num_attention_heads
    return _flash_cpu is not None and getattr(config, "num_key_value_heads", heads) == heads


# (output, logsumexp); the public sdpa returns no log-sum-exp.
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


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
