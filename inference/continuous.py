"""Continuous batching on the fast path: requests join and leave a running batch per step.

The local engine's worker thread (``LocalEngine._serve_continuous``) drives a
``SlotDecoder``: a fixed number of SLOTS (rows) of a static KV cache of LENGTH positions per
slot, and the native ``Phi3ForCausalLM`` of ``fast_path`` (sharing the remote model's
weights). No HF ``generate``: the decode loop is this module's.

Design (what differs from "one ``generate`` per batch"):

- **Per-row write positions, no shared clock.** Every slot holds its own request's K/V at
  cache positions ``[0, prompt + generated)``: left-aligned, each row at its own position.
  ``SlotCache`` is a ``StaticCache`` whose ``update`` writes each row's one new key/value at
  THAT ROW's position (``scatter_`` along the sequence axis, the positions passed as the
  forward's ``cache_position``, shape (slots,)), instead of one ``cache_position`` for the
  whole batch. So a joiner never has to wait for a clock to pass its prompt length, and no
  clock needs resetting; a row is limited only by the slot length. The attention mask is
  per row: row r sees cache positions ``<= position[r]`` (a 4-D additive mask, slots x 1 x 1
  x LENGTH), so stale K/V of an earlier occupant of the slot are never read (they are
  overwritten before they become visible). Position ids are the row's own logical
  positions, so RoPE is the same as alone.
- **Prefill apart from the decoding rows.** Joiners that arrive together (up to the free
  slots and MAX_BATCH_TOKENS) are prefilled as one right-padded batch (``prefill_many``:
  ``inputs_embeds`` from ``fast_path.prompt_embeddings``, each row at positions ``0..P-1``
  as alone, a throw-away ``DynamicCache``), and each one's K/V are copied into its slot at
  ``[0, P)``. Its last logits give its first token (the same sampling rules as the engine:
  greedy at temperature 0, else temperature + the model's top-k/top-p). It then decodes in
  step with the others from the next step on.
- **Decode step.** On CUDA with COMPILE all slots run every step (fixed shapes: slots x 1
  token, LENGTH cache) as ``torch.compile(mode="reduce-overhead", fullgraph=True)``: CUDA
  graphs, one graph per (slots, LENGTH). Eager (the CPU, or COMPILE=off) runs only the rows
  up to the last busy slot, attending only over the positions the furthest row has reached.
  Free slots among them feed the pad token at position 0 and see only position 0 (their
  output is dropped; they never produce NaNs).
- **LongRoPE per row.** ``fast_path._LongRopeEmbedding`` picks short/long factors per row
  (by the row's own largest position in that forward), so a row's tokens never depend on
  which rows share its batch: batched == alone for every row, across the switch too.
- **Cache size.** LENGTH = the larger of (first request's prompt + max_new_tokens) and, when
  the step is compiled, MAX_BATCH_TOKENS / MAX_BATCH_SIZE, rounded up to a bucket (256);
  SLOTS = MAX_BATCH_TOKENS // LENGTH, clamped to [1, MAX_BATCH_SIZE]. (Eager, attention over
  empty positions costs time and there are no graphs to keep, so LENGTH is the first
  request's need: a later, longer request waits for the batch to drain.) The cache is kept
  while that shape holds. A request that does not fit a slot (prompt + max_new_tokens >
  LENGTH) waits, first in line, until the batch drains; then the cache is re-made for it.
- **Warm-up** (``warm_up.py``): the engine runs the common shapes once before it takes
  questions, so compiling and recording graphs happen at start-up; compiled artefacts are
  kept on disk (COMPILE_CACHE_DIR) for the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from .fast_path import DEFAULT_BUCKET, cache_length, prompt_embeddings

log = logging.getLogger(__name__)


class SlotCache(StaticCache):
    """A ``StaticCache`` whose decode writes go to a per-row position (``cache_position``
    of shape (rows,)), one new token per row.

    ``visible_rows`` / ``visible_length``: when set (eager decoding), the step runs only the
    leading rows up to the last busy slot, and attention reads only the positions the
    furthest row has reached; CUDA graphs need the whole fixed shape.
    """

    visible_rows: int | None = None
    visible_length: int | None = None

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = (cache_kwargs or {})["cache_position"]
        k_out = self.key_cache[layer_idx][: self.visible_rows]  # a view: writes land in the cache
        v_out = self.value_cache[layer_idx][: self.visible_rows]
        rows, heads, _, dim = key_states.shape
        index = positions.view(rows, 1, 1, 1).expand(rows, heads, 1, dim)
        k_out.scatter_(2, index, key_states.to(k_out.dtype))
        v_out.scatter_(2, index, value_states.to(v_out.dtype))
        if self.visible_length is not None:  # eager only: attend over the used part, not all
            return k_out[:, :, : self.visible_length], v_out[:, :, : self.visible_length]
        return k_out, v_out

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return 0  # per-row lengths; the model only uses this where a static cache ignores it


def choose_tokens(
    logits: torch.Tensor, temperatures: list[float], generation_config: Any = None
) -> list[int]:
    """One token per row of ``logits`` (rows x vocab): greedy for temperature 0, else sampling
    with that temperature and the generation config's top-k / top-p (as HF ``generate``)."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()
    top_k = int(getattr(generation_config, "top_k", 50) or 0)
    top_p = float(getattr(generation_config, "top_p", 1.0) or 1.0)
    for row, temperature in enumerate(temperatures):
        if temperature <= 0:
            continue
        scores = logits[row] / temperature
        if 0 < top_k < scores.shape[-1]:
            kth = torch.topk(scores, top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - top_p
            drop[-1] = False
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        tokens[row] = int(torch.multinomial(scores.softmax(-1), 1))
    return tokens


class SlotDecoder:
    """Slots of a static KV cache over a native Phi-3; see the module docstring.

    ``fast``: a ``fast_path.FastPathGenerator`` (its native model, remote model, device,
    dtype and compile choice are used). ``pad_id``: what free slots feed. ``max_rows`` and
    ``max_tokens`` (MAX_BATCH_SIZE, MAX_BATCH_TOKENS) size the cache.
    """

    def __init__(
        self,
        fast: Any,
        *,
        pad_id: int,
        max_rows: int,
        max_tokens: int,
        bucket: int = DEFAULT_BUCKET,
        compile: bool | None = None,
    ) -> None:
        self.native = fast.native
        self.remote_model = fast.remote_model
        self.device = fast.device
        self.dtype = fast.dtype
        # Compile the decode step: CUDA graphs on CUDA; inductor alone on the CPU (COMPILE=on).
        self.compile = bool(fast.compile if compile is None else compile)
        self.pad_id = int(pad_id)
        self.max_rows = max(1, int(max_rows))
        self.max_tokens = int(max_tokens)
        self.bucket = max(1, int(bucket))
        self.cache: SlotCache | None = None
        self.slots = 0
        self.length = 0
        self._positions = torch.zeros(0, dtype=torch.long)  # per slot: the next write position
        self._step_fn: Any = None

    # --- the cache ------------------------------------------------------------------------

    def shape_for(self, need: int) -> tuple[int, int]:
        """(slots, length) for a first request needing ``need`` positions (see the docstring)."""
        # Compiled, every slot gets its share of MAX_BATCH_TOKENS, so shapes (graphs) repeat and
        # joiners fit; eager, attention over empty positions only costs time.
        floor = (self.max_tokens // self.max_rows) // self.bucket * self.bucket if self.compile else 0
        length = max(cache_length(need, 0, self.bucket), floor, self.bucket)
        slots = max(1, min(self.max_rows, self.max_tokens // length))
        return slots, length

    def ensure(self, slots: int, length: int) -> None:
        """Have a cache of this shape (only while no slot is in use)."""
        if self.cache is not None and (self.slots, self.length) == (slots, length):
            return
        self.release()
        log.info("continuous batching: %d slot(s) x %d tokens of KV cache", slots, length)
        self.cache = SlotCache(
            config=self.native.config,
            max_batch_size=slots,
            max_cache_len=length,
            device=self.device,
            dtype=self.dtype,
        )
        self.slots, self.length = slots, length
        self._positions = torch.zeros(slots, dtype=torch.long)
        self._step_fn = self._decode_forward
        if self.compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs
            self._step_fn = torch.compile(self._decode_forward, mode=mode, fullgraph=True)

    def release(self) -> None:
        """Drop the cache (after an error, or to re-make it in another shape)."""
        self.cache = None
        self._step_fn = None
        self.slots = self.length = 0
        self._positions = torch.zeros(0, dtype=torch.long)

    # --- prefill and decode ---------------------------------------------------------------

    def prefill_many(self, prompts: Sequence[tuple[int, Mapping[str, torch.Tensor]]]) -> torch.Tensor:
        """Run prompts that join together as one batch and put each one's K/V in its slot;
        returns each one's last logits (prompts x vocab).

        The prompts are RIGHT-padded: every row's tokens sit at positions ``0..P-1`` as
        alone, and with plain causal attention no real token ever sees a pad (pads come
        after), so no padding mask is needed; the pads' K/V are never copied. Only each
        row's last hidden state goes through ``lm_head`` (all of them would be prompts x P
        x vocab of logits).
        """
        assert self.cache is not None
        lengths = [inputs["input_ids"].shape[1] for _, inputs in prompts]
        longest = max(lengths)
        if longest >= self.length:
            raise ValueError(f"a {longest}-token prompt does not fit a {self.length}-token slot")
        with torch.inference_mode():
            rows = [prompt_embeddings(self.remote_model, inputs).to(self.dtype)[0] for _, inputs in prompts]
            embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
            last = torch.tensor(lengths, device=self.device) - 1
            # A pad repeats its row's last position: LongRoPE picks factors by a row's
            # largest position, which must be the row's own.
            positions = torch.minimum(torch.arange(longest, device=self.device)[None, :], last[:, None])
            scratch = DynamicCache()
            hidden = self.native.model(
                inputs_embeds=embeds,
                position_ids=positions,
                past_key_values=scratch,
                use_cache=True,
                return_dict=True,
            ).last_hidden_state
            logits = self.native.lm_head(hidden[torch.arange(len(rows), device=self.device), last])
            for layer in range(len(self.cache.key_cache)):
                keys, values = scratch.key_cache[layer], scratch.value_cache[layer]
                for row, ((slot, _), length) in enumerate(zip(prompts, lengths, strict=True)):
                    self.cache.key_cache[layer][slot, :, :length].copy_(keys[row, :, :length])
                    self.cache.value_cache[layer][slot, :, :length].copy_(values[row, :, :length])
            del scratch, hidden
        for (slot, _), length in zip(prompts, lengths, strict=True):
            self._positions[slot] = length
        return logits

    def position(self, slot: int) -> int:
        return int(self._positions[slot])

    def free(self, slot: int) -> None:
        if slot < self._positions.shape[0]:  # after release() there is nothing to free
            self._positions[slot] = 0

    def _decode_forward(
        self, ids: torch.Tensor, positions: torch.Tensor, span: int | None = None
    ) -> torch.Tensor:
        assert self.cache is not None
        self.cache.visible_rows = None if span is None else ids.shape[0]
        self.cache.visible_length = span
        visible = torch.arange(span or self.length, device=positions.device)[None, :] <= positions[:, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=positions.device)
        mask = mask.masked_fill(~visible, torch.finfo(self.dtype).min)[:, None, None, :]
        output = self.native(
            input_ids=ids,
            position_ids=positions[:, None],
            attention_mask=mask,
            past_key_values=self.cache,
            cache_position=positions,
            use_cache=True,
            num_logits_to_keep=1,
            return_dict=True,
        )
        return output.logits[:, -1]

    def step(self, tokens: Mapping[int, int]) -> torch.Tensor:
        """One decode step: ``tokens`` maps each busy slot to its last token; every busy slot
        advances one position. Returns logits (rows x vocab; at least up to the last busy
        slot); free slots' rows are junk."""
        assert self.cache is not None and self._step_fn is not None
        # Eager: only the rows up to the last busy slot (joiners take the lowest free slots).
        rows = self.slots if self.compile else max(tokens) + 1
        ids = torch.full((rows, 1), self.pad_id, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        for slot, token in tokens.items():
            ids[slot, 0] = token
            positions[slot] = self._positions[slot]
        if int(positions.max()) >= self.length:
            raise ValueError("a slot ran past the end of the KV cache")
        with torch.inference_mode():
            if self.compile:
                logits = self._step_fn(ids.to(self.device), positions.to(self.device))
            else:  # eager: only the positions some row has reached cost attention
                span = int(positions.max()) + 1
                logits = self._step_fn(ids.to(self.device), positions.to(self.device), span)
            logits = logits.float().cpu() if self.device.type != "cpu" else logits.float().clone()
        for slot in tokens:
            self._positions[slot] += 1
        return logits
