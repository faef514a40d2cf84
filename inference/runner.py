"""The model runner: prefill chunks and decode steps of the native model over a ``SlotCache``.

Prefill chunks and decode steps run the model's own modules (embedding, rotary, each
``Phi3DecoderLayer``'s norms, projections and MLP, norm, head) through one layer loop of
the runner's (``_through_layers``), with attention over the cache (``slot_attention``); the
model itself is left as it is for ``generate``. A decode step runs over the BUSY rows only,
each attending over the positions it has filled: the step's shape is (busy rows, length),
where length covers the longest busy row. Eager (COMPILE off) and compiled on the CPU
(inductor, symbolic shapes) both are exact, so one row's step costs one row; on the CPU,
eager or compiled, each run of consecutive slots attends over a view of the cache (no copy
of the busy rows, however far apart their slots are; compiled, through an op the graph
calls as it is); eager elsewhere, a step whose rows all see every position (one row always
does) runs with no mask. With CUDA graphs (COMPILE on CUDA) both are rounded up
to buckets (rows 1, 2, 4, 8, 16...; lengths a multiple of ``length_bucket``) so that shapes
repeat and graphs replay; the padding rows repeat the last busy row (its slot, token and
position: the same key/value written twice, its logits dropped). The prefill runs eagerly,
one chunk of one prompt at a time, the chunk's K/V written into its slot; on the CPU a chunk
past the first attends in two passes with no mask (slot_attention), as cheap as the same
queries in one forward over the whole prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .kv_cache import SlotCache
from .slot_attention import (
    can_split_chunks,
    chunk_attention,
    chunk_mask,
    decode_attention,
    decode_mask,
)

log = logging.getLogger(__name__)

DEFAULT_LENGTH_BUCKET = 256

# A layer's attention over the cache: (the layer's Phi3Attention, query, key, value) -> output.
Attend = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def row_buckets(slots: int) -> list[int]:
    """1, 2, 4, 8... up to ``slots`` (which is always the last one)."""
    buckets = []
    size = 1
    while size < slots:
        buckets.append(size)
        size *= 2
    return [*buckets, slots]


def round_up(value: int, bucket: int) -> int:
    return -(-value // bucket) * bucket


def prompt_embeddings(
    model: Any, inputs: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """One prompt's input embeddings (positions x hidden), images included (any thread)."""
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None:
        pixel_values = pixel_values.to(device, dtype)
    image_sizes = inputs.get("image_sizes")
    with torch.inference_mode():
        embeds = model.embed_prompt(
            inputs["input_ids"].to(device),
            pixel_values=pixel_values,
            image_sizes=None if image_sizes is None else image_sizes.to(device),
        )
    return embeds[0].to(dtype)


class ModelRunner:
    """Runs ``model`` (a Phi-3-vision model: ``embed_prompt``, ``.model``, ``.lm_head``) on
    ``cache``. ``compile``: the decode step through ``torch.compile`` (CUDA graphs on CUDA)."""

    def __init__(
        self,
        model: Any,
        cache: SlotCache,
        *,
        device: torch.device,
        dtype: torch.dtype,
        pad_id: int,
        compile: bool = False,
        length_bucket: int = DEFAULT_LENGTH_BUCKET,
    ) -> None:
        self._split_chunks = device.type == "cpu" and can_split_chunks(model)
        self.model = model
        self.device = device
        self.dtype = dtype
        self.pad_id = int(pad_id)
        self.compile = compile
        self.cache = cache
        self.window = getattr(model.config, "sliding_window", None)
        # CUDA graphs replay fixed shapes: buckets of rows and lengths. Eager, or compiled on
        # the CPU (one graph with symbolic shapes), every step runs its exact shape.
        self.graphs = compile and device.type == "cuda"
        self.length_bucket = max(1, int(length_bucket)) if self.graphs else 1
        self._row_buckets = row_buckets(cache.slots) if self.graphs else None
        self._embed_tokens = model.get_input_embeddings()
        self._layers = list(model.model.layers[: model.config.num_hidden_layers])
        config = model.config
        self._head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_width = config.num_key_value_heads * self._head_dim
        self._qkv_split = (config.num_attention_heads * self._head_dim, kv_width, kv_width)
        self._decode = self._decode_forward
        # What the last decode step ran: (rows, length), padding included.
        self.last_decode_shape: tuple[int, int] | None = None
        if compile:
            import torch._dynamo.config as dynamo_config

            # Each (rows, length) bucket may re-trace at first; the default limit is 8.
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
            cache.mark_static()
            mode = "reduce-overhead" if device.type == "cuda" else None
            # CPU: every shape from one graph (rows of 1 get their own); CUDA: graphs per bucket.
            dynamic = None if self.graphs else True
            self._decode = torch.compile(self._decode_forward, mode=mode, fullgraph=True, dynamic=dynamic)

    # --- prefill -------------------------------------------------------------------------

    def embed_prompt(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One prompt's input embeddings (positions x hidden), images included."""
        return prompt_embeddings(self.model, inputs, self.device, self.dtype)

    def prefill(
        self, slot: int, embeds: torch.Tensor, start: int, prompt_length: int | None = None
    ) -> torch.Tensor:
        """Positions ``[start, start + len(embeds))`` of the prompt in ``slot`` (which holds
        ``start`` positions already); returns the logits after its last position (vocab,).
        ``prompt_length``: the whole prompt's (a chunk's rotary factors are the whole prompt's)."""
        if self.cache.filled(slot) != start:
            raise ValueError(f"slot {slot} holds {self.cache.filled(slot)} positions, not {start}")
        end = start + embeds.shape[0]
        if end > self.cache.length:
            raise ValueError(f"a {end}-token prompt does not fit a {self.cache.length}-token slot")
        # From position 0: causal (sdpa's is_causal); past it, on the CPU two passes with no
        # mask (slot_attention), else a mask; a sliding window that bites: a mask.
        unwindowed = self.window is None or end <= self.window
        split = start > 0 and unwindowed and self._split_chunks
        needs_mask = not unwindowed or (start > 0 and not split)
        mask = chunk_mask(start, end, self.device, self.window) if needs_mask else None

        def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            return chunk_attention(module, query, key, value, self.cache, slot, start, mask, split=split)

        with torch.inference_mode():
            positions = torch.arange(start, end, device=self.device)[None]
            # A chunk's rotary factors are its whole prompt's, as one forward over it has them.
            rotary = self.model.model.rotary_emb.as_of(embeds, positions, prompt_length)
            hidden = self._through_layers(embeds[None], rotary, attend)
            logits = self.model.lm_head(hidden[0, -1:]).float()[0]
        self.cache.advance(slot, end - start)
        return logits

    # --- decode --------------------------------------------------------------------------

    def decode_shape(self, rows: int, longest: int) -> tuple[int, int]:
        """(rows, length) a step over ``rows`` busy rows, the longest holding ``longest``
        positions after this step, runs as."""
        if self._row_buckets is None:
            return rows, longest
        bucket_rows = next(size for size in self._row_buckets if size >= rows)
        return bucket_rows, min(round_up(longest, self.length_bucket), self.cache.length)

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One decode step: each slot takes its token at its next position; returns the
        logits (len(slots) x vocab, float32)."""
        positions = [self.cache.filled(slot) for slot in slots]
        if max(positions) >= self.cache.length:
            raise ValueError("a slot ran past the end of the KV cache")
        rows, length = self.decode_shape(len(slots), max(positions) + 1)
        padding = rows - len(slots)
        consecutive = not self.compile and slots == list(range(slots[0], slots[0] + len(slots)))
        logits = self._run(
            [*slots, *slots[-1:] * padding],
            [*tokens, *tokens[-1:] * padding],
            [*positions, *positions[-1:] * padding],
            length,
            first=slots[0] if consecutive else None,
        )[: len(slots)]
        for slot in slots:
            self.cache.advance(slot, 1)
        return logits

    def run_shape(self, rows: int, length: int) -> None:
        """Run (compile, record) the decode step of one bucket shape, for the warm-up (nothing
        running): every row writes slot 0's position ``length - 1``, which no request reads
        before writing it itself; no slot's length changes."""
        self._run([0] * rows, [self.pad_id] * rows, [length - 1] * rows, length)

    @torch.inference_mode()  # inputs made inside it too: a compiled graph guards on that
    def _run(
        self, slots: list[int], tokens: list[int], positions: list[int], length: int, first: int | None = None
    ) -> torch.Tensor:
        self.last_decode_shape = (len(slots), length)
        ids = torch.tensor(tokens, dtype=torch.long)[:, None].to(self.device)
        rows = torch.tensor(slots, dtype=torch.long).to(self.device)
        where = torch.tensor(positions, dtype=torch.long).to(self.device)
        windowed = self.window is not None and length > self.window
        if self.device.type == "cpu" and not windowed:  # runs of consecutive slots, no gather
            logits = self._decode(ids, rows, where, None, by_runs=True)
        elif self.compile:
            logits = self._decode(ids, rows, where, decode_mask(where, length, self.window))
        else:  # eager: no mask when every row sees all ``length`` positions (one row always does)
            sees_all = not windowed and all(p == length - 1 for p in positions)
            mask = None if sees_all else decode_mask(where, length, self.window)
            logits = self._decode_forward(ids, rows, where, mask, first, length)
        # A CUDA graph's output is overwritten by its next replay.
        return logits.float().clone() if self.graphs else logits.float()

    def _decode_forward(
        self,
        ids: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        first: int | None = None,
        length: int | None = None,
        by_runs: bool = False,
    ) -> torch.Tensor:
        """One token per row; ``length``: positions read (None: the mask's; ``by_runs``: each
        run of consecutive slots its own, see ``decode_attention``). See ``_through_layers``."""
        seen = length if length is not None else 0 if mask is None else mask.shape[-1]

        def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            cache = self.cache
            return decode_attention(
                module, query, key, value, cache, rows, positions, seen, mask, first=first, by_runs=by_runs
            )

        hidden = self._embed_tokens(ids)  # rows x 1 x hidden
        rotary = self.model.model.rotary_emb.as_of(hidden, positions[:, None])  # each row's own
        return self.model.lm_head(self._through_layers(hidden, rotary, attend)[:, -1])

    def _through_layers(
        self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], attend: Attend
    ) -> torch.Tensor:
        """``hidden`` (rows x positions x hidden) through the decoder layers and the final norm:
        Phi3DecoderLayer's and Phi3Attention's forwards written out over the model's own
        modules (gpt-fast's shape), with ``attend`` over the cache, minus their wrappers and
        transformers' dispatch, which cost more than a tiny model's step (the same operations
        in the same order: bitwise the model's own)."""
        rows, count = hidden.shape[:2]
        cos, sin = rotary[0][:, None], rotary[1][:, None]  # over the heads
        for layer in self._layers:
            attention = layer.self_attn
            qkv = attention.qkv_proj(layer.input_layernorm(hidden))
            query, key, value = [
                part.view(rows, count, -1, self._head_dim).transpose(1, 2)
                for part in qkv.split(self._qkv_split, dim=-1)
            ]
            query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
            output = attend(attention, query, key, value)
            hidden = hidden + attention.o_proj(output.reshape(rows, count, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.model.norm(hidden)


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` on one tensor (rotary over the first cos.shape[-1]
    dims of each head, the rest as they are)."""
    dim = cos.shape[-1]
    turning = states[..., :dim]
    half = dim // 2
    rotated = (turning * cos) + (torch.cat((-turning[..., half:], turning[..., :half]), dim=-1) * sin)
    if dim == states.shape[-1]:  # all of each head turns (Phi-3): nothing to append
        return rotated
    return torch.cat([rotated, states[..., dim:]], dim=-1)
