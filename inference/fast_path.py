"""The local engine's fast path: generate with transformers' native Phi-3, not the hub code.

Phi-3-vision's language model is Phi-3-mini: the hub's remote code and transformers' own
``Phi3ForCausalLM`` have the same module names and shapes. The fast path keeps the remote
model for what only it has (the image embedder, ``model.vision_embed_tokens``) and for the
weights, and generates with a native ``Phi3ForCausalLM`` that SHARES those weight tensors
(built on the meta device, then given the remote model's own parameters with
``load_state_dict(assign=True)``: no second copy). The native model runs with sdpa
attention; on CUDA with a static KV cache and, when asked, its decode step compiled with
``torch.compile(mode="reduce-overhead")`` (CUDA graphs). See DESIGN.md, "Speed on a GPU".

Flow: ``prompt_embeddings`` runs the remote image embedder over (a copy of) the prompt ids,
which puts image N's features at its ``-N`` placeholders and embeds the text, exactly what
the remote model's own forward does on the prefill; ``FastPathGenerator.generate`` hands
those ``inputs_embeds`` and the attention mask to the native model's HF ``generate``.

What transformers 4.48.3 does, and what this module changes to match the hub model:

- ``generate(inputs_embeds=..., attention_mask=...)`` without ``input_ids``: the running
  ``input_ids`` start EMPTY, shape (batch, 0). The streamer's first ``put`` gets that empty
  tensor (the plain path's first ``put`` gets the prompt ids); every later ``put`` gets one
  new token per row, and stopping criteria see only the new tokens. A streamer that skips
  its first ``put`` (``_BatchStreamer``) therefore still skips exactly the prompt. The
  returned sequences hold only the new tokens (the plain path returns prompt + new tokens).
- Position ids come from the attention mask, as in the plain path:
  ``cumsum(mask) - 1``, padding set to 1 (GenerationMixin's ``prepare_inputs_for_generation``
  computes them for the native model; the hub's own override does the same). With a
  ``StaticCache`` generate builds the 4-D mask over the whole cache length itself, so left
  padding is masked on the prefill and on every decode step.
- LongRoPE (the hub config's rope_scaling type ``su``; transformers calls it ``longrope``,
  and ``Phi3Config`` renames ``su``/``yarn`` to it): the hub's
  ``Phi3SuScaledRotaryEmbedding`` picks the long factors when ``max(position_ids) + 1 >
  original_max_position_embeddings`` and the short ones otherwise; 4.48's
  ``Phi3RotaryEmbedding`` makes the same test with the same frequencies and the same
  attention scaling ``sqrt(1 + ln(max/original) / ln(original))``. In both the choice is made
  per FORWARD CALL over the WHOLE BATCH (the batch-wide max position, not per row), so a short
  row in a batch with a long one gets the long factors once the long one crosses, and the
  keys already in the cache keep the rotation they were made with (short), while later
  tokens use the long one. The fast path chooses PER ROW instead (each row's own largest
  position in that forward): a row gets the tokens it gets alone (the plain path alone),
  whatever shares its batch; a batched plain-path row may differ past the switch. Two
  further differences are removed:
  (1) 4.48's ``Phi3ForCausalLM.prepare_inputs_for_generation`` DROPS the cache when
  ``input_ids`` first reach ``original_max_position_embeddings + 1`` tokens while the cache
  holds at most that many, to recompute the whole sequence with the long factors; the hub
  code never does (nor does the tiny test model). Fed ``inputs_embeds`` alone that test can
  never pass (the running ``input_ids`` hold only the new tokens, and by the time they are
  that many the cache is longer), but the native model here uses GenerationMixin's
  ``prepare_inputs_for_generation`` anyway, so that no caller (``input_ids`` passed along,
  a later transformers) gets the recompute. (2) 4.48's rotary embedding switches with a
  Python ``if`` on a tensor and re-registers a buffer inside ``forward``, which breaks a
  ``fullgraph`` compile and CUDA graphs; here it is replaced by ``_LongRopeEmbedding``, which
  selects between the two precomputed frequency vectors with ``torch.where`` (same numbers,
  no data-dependent control flow). The hub's ``yarn`` variant scales differently from
  transformers' longrope and is refused.
- On CUDA, 4.48's ``_sample`` compiles the decode step by itself whenever the cache is a
  ``StaticCache`` (``get_compiled_call``, ``CompileConfig``: fullgraph, "reduce-overhead");
  the prefill always runs eagerly. ``NativePhi3ForCausalLM.compile_decode`` turns that off
  unless asked for; on the CPU transformers never compiles.
- A ``StaticCache``'s tensors are marked as static addresses for CUDA graphs (unguarded in
  this torch): a new cache object makes the CUDA graphs re-record, and a new shape (rows,
  cache length) means a new graph (dynamo recompiles at most 8 times per function by
  default, then runs that function uncompiled). The generator therefore reuses its caches
  (``reset()`` in place) for the same (rows, length bucket), and lengths are rounded up to a
  multiple of ``bucket`` tokens so that shapes repeat.
- On the CPU the static cache gains nothing (no CUDA graphs) and costs a little (a 4-D mask
  over the whole cache each step, attention over every slot): there the generator uses
  transformers' dynamic cache unless told otherwise. Tiny model, one thread, 256 greedy
  tokens: plain ~980 tokens/s, native + dynamic cache ~1,160, native + static cache ~980
  (one row; with three rows all three are within noise).
- ``sliding_window`` is copied; both implementations mask keys more than ``sliding_window``
  positions back (Phi-3-vision's equals its context, so it never applies).
"""

from __future__ import annotations

import collections
import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, Phi3Config, Phi3ForCausalLM, StaticCache
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

log = logging.getLogger(__name__)

VISION_PREFIX = "model.vision_embed_tokens."
DEFAULT_BUCKET = 256
_ROPE_TYPES = ("su", "longrope")  # "su" is the hub's name for transformers' "longrope"


class FastPathUnavailable(RuntimeError):
    """The remote model cannot run on the fast path; the message says why (one line)."""


class NativePhi3ForCausalLM(Phi3ForCausalLM):
    """transformers' Phi-3 with the hub model's generation behaviour (see the module docstring).

    ``compile_decode``: let ``generate`` compile the decode step on CUDA when the cache is a
    ``StaticCache`` (transformers 4.48 does so unconditionally; here only when asked).
    """

    compile_decode: bool = False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # Not Phi3ForCausalLM's: it drops the cache at the LongRoPE switch (the hub never does).
        # The explicit `inputs_embeds` parameter is how generate sees that it is accepted.
        return GenerationMixin.prepare_inputs_for_generation(
            self,
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache_position=cache_position,
            **kwargs,
        )

    def get_compiled_call(self, compile_config: Any) -> Any:
        if not self.compile_decode:
            return self.__call__
        return super().get_compiled_call(compile_config)


class _LongRopeEmbedding(Phi3RotaryEmbedding):
    """4.48's longrope rotary embedding without data-dependent control flow.

    Both frequency vectors are made up front; each forward picks, PER ROW, the long one when
    that row's largest position reaches past ``original_max_position_embeddings``. The hub's
    ``Phi3SuScaledRotaryEmbedding`` and transformers' ``_longrope_frequency_update`` make the
    same test over the whole batch; per row, a row's tokens never depend on which rows share
    its batch (batched == alone, what continuous batching needs). For one row, or rows whose
    largest positions agree, the numbers are the same as theirs.
    """

    def __init__(self, config: Phi3Config, device: torch.device | None = None) -> None:
        super().__init__(config, device=device)  # inv_freq: the short factors
        self.original_max_position_embeddings = int(config.original_max_position_embeddings)
        long_inv_freq, _ = self.rope_init_fn(
            config, device, seq_len=self.original_max_position_embeddings + 1
        )
        self.register_buffer("short_inv_freq", self.inv_freq.clone(), persistent=False)
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Per ROW: each row's own largest position in this forward (see the class docstring).
        longest = position_ids.max(dim=-1, keepdim=True).values + 1  # (rows, 1)
        inv_freq = torch.where(
            longest > self.original_max_position_embeddings,
            self.long_inv_freq[None, :],
            self.short_inv_freq[None, :],
        )  # (rows, dim / 2)
        # From here on the same operations as Phi3RotaryEmbedding.forward (bit-identical).
        inv_freq_expanded = inv_freq[:, :, None].float()
        position_ids_expanded = position_ids[:, None, :].float()
        device_type = x.device.type
        device_type = device_type if isinstance(device_type, str) and device_type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos()
            sin = emb.sin()
        cos = cos * self.attention_scaling
        sin = sin * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


# --- building the native model --------------------------------------------------------------


def _required(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None:
        raise FastPathUnavailable(f"the model config has no {name}")
    return value


def _rope_scaling(config: Any) -> dict[str, Any] | None:
    scaling = getattr(config, "rope_scaling", None)
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise FastPathUnavailable(f"unsupported rope_scaling {scaling!r}")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in _ROPE_TYPES:
        raise FastPathUnavailable(f"rope_scaling type {kind!r} is not su/longrope")
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    if not isinstance(short, (list, tuple)) or not isinstance(long, (list, tuple)):
        raise FastPathUnavailable("rope_scaling lacks short_factor/long_factor lists")
    # A fresh dict: Phi3Config edits its rope_scaling in place ("su" -> "longrope").
    return {"type": "longrope", "short_factor": list(short), "long_factor": list(long)}


def native_config(remote_config: Any, dtype: torch.dtype | None = None) -> Phi3Config:
    """A transformers ``Phi3Config`` for the language model of a Phi-3-vision config."""
    heads = _required(remote_config, "num_attention_heads")
    max_positions = _required(remote_config, "max_position_embeddings")
    values: dict[str, Any] = {
        "vocab_size": _required(remote_config, "vocab_size"),
        "hidden_size": _required(remote_config, "hidden_size"),
        "intermediate_size": _required(remote_config, "intermediate_size"),
        "num_hidden_layers": _required(remote_config, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(remote_config, "num_key_value_heads", None) or heads,
        "hidden_act": getattr(remote_config, "hidden_act", "silu"),
        "max_position_embeddings": max_positions,
        "original_max_position_embeddings": getattr(remote_config, "original_max_position_embeddings", None)
        or max_positions,
        "rms_norm_eps": getattr(remote_config, "rms_norm_eps", 1e-5),
        "rope_theta": getattr(remote_config, "rope_theta", 10000.0),
        "rope_scaling": _rope_scaling(remote_config),
        "sliding_window": getattr(remote_config, "sliding_window", None),
        "tie_word_embeddings": bool(getattr(remote_config, "tie_word_embeddings", False)),
        "bos_token_id": getattr(remote_config, "bos_token_id", None),
        "eos_token_id": getattr(remote_config, "eos_token_id", None),
        "pad_token_id": getattr(remote_config, "pad_token_id", None),
        "attention_dropout": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "use_cache": True,
        "attn_implementation": "sdpa",
    }
    if dtype is not None:
        values["torch_dtype"] = dtype
    try:
        return Phi3Config(**values)
    except (TypeError, ValueError) as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise FastPathUnavailable(f"no Phi3Config for this model: {reason}") from error


def _language_model_tensors(remote_model: nn.Module) -> dict[str, torch.Tensor]:
    """The remote model's parameters and persistent buffers, less the image embedder's."""
    inner = getattr(remote_model, "model", None)
    missing = [
        name
        for name, owner in (
            ("model", remote_model),
            ("lm_head", remote_model),
            ("embed_tokens", inner),
            ("layers", inner),
            ("norm", inner),
            ("vision_embed_tokens", inner),
        )
        if owner is None or not isinstance(getattr(owner, name, None), nn.Module)
    ]
    if missing:
        raise FastPathUnavailable(
            f"{type(remote_model).__name__} is not a Phi-3-vision model: no {', '.join(missing)} module"
        )
    return {
        name: tensor
        for name, tensor in remote_model.state_dict(keep_vars=True).items()
        if not name.startswith(VISION_PREFIX)
    }


def _listing(names: set[str], limit: int = 3) -> str:
    shown = sorted(names)[:limit]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(shown) + more


def build_native_language_model(remote_model: nn.Module) -> NativePhi3ForCausalLM:
    """transformers' Phi-3 over the remote model's own weight tensors (shared, not copied).

    Raises ``FastPathUnavailable`` (one-line reason) for anything that does not fit: another
    architecture, missing or extra modules, a shape mismatch, an unsupported rope scaling.
    """
    tensors = _language_model_tensors(remote_model)
    first = next(iter(tensors.values()), None)
    if first is None:
        raise FastPathUnavailable("the model has no weights")
    device, dtype = first.device, first.dtype
    if device.type == "meta":
        raise FastPathUnavailable("the model's weights are not loaded (meta device)")
    config = native_config(remote_model.config, dtype)
    with torch.device("meta"):
        native = NativePhi3ForCausalLM(config)
    expected = set(native.state_dict().keys())
    offered = set(tensors)
    if expected - offered:
        raise FastPathUnavailable(f"the model lacks native Phi-3 tensors: {_listing(expected - offered)}")
    if offered - expected:
        raise FastPathUnavailable(f"the model has tensors native Phi-3 lacks: {_listing(offered - expected)}")
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise FastPathUnavailable(f"the weights are spread over devices ({name} is on {tensor.device})")
    try:
        native.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as error:
        reason = " ".join(str(error).split())
        raise FastPathUnavailable(f"the weights do not fit native Phi-3: {reason[:300]}") from error
    # Buffers made on the meta device (the rotary frequencies) are rebuilt for real.
    rotary_cls = _LongRopeEmbedding if config.rope_scaling is not None else Phi3RotaryEmbedding
    native.model.rotary_emb = rotary_cls(config, device=device)
    on_meta = [
        name for name, tensor in (*native.named_parameters(), *native.named_buffers()) if tensor.is_meta
    ]
    if on_meta:
        raise FastPathUnavailable(f"native Phi-3 tensors left without values: {_listing(set(on_meta))}")
    native.eval()
    generation_config = getattr(remote_model, "generation_config", None)
    if generation_config is not None:
        native.generation_config = copy.deepcopy(generation_config)
    return native


# --- the prompt's embeddings -----------------------------------------------------------------


def prompt_embeddings(remote_model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The prompt's ``inputs_embeds``, from the remote model's own embedders.

    ``inputs``: ``input_ids`` (negative ids are image placeholders) and, with images,
    ``pixel_values`` and ``image_sizes``; a left-padded batch takes its images concatenated
    in row order (``LocalEngine._collate``). ``inputs["input_ids"]`` is left as it is: the
    embedder clamps a copy. Same choice as the remote forward's prefill: the image embedder
    when there are images, else the token embedding.
    """
    input_ids = inputs["input_ids"]
    pixel_values = inputs.get("pixel_values")
    image_sizes = inputs.get("image_sizes")
    inner = remote_model.model
    if pixel_values is None and not bool((input_ids < 0).any()):
        return inner.embed_tokens(input_ids)
    return inner.vision_embed_tokens(input_ids.clone(), pixel_values=pixel_values, image_sizes=image_sizes)


# --- generating ------------------------------------------------------------------------------


def cache_length(prompt_length: int, max_new_tokens: int, bucket: int = DEFAULT_BUCKET) -> int:
    """KV cache slots for a prompt and its answer, rounded up to a whole bucket."""
    needed = prompt_length + max_new_tokens
    return -(-needed // bucket) * bucket if bucket > 1 else needed


class FastPathGenerator:
    """Generates for a remote Phi-3-vision model with a native Phi-3 sharing its weights.

    ``compile``: compile the decode step with ``torch.compile(mode="reduce-overhead")``; only
    on CUDA (ignored on the CPU). ``bucket``: KV cache lengths are rounded up to a multiple of
    this. ``cached``: how many static caches (one per rows x length bucket) are kept for reuse;
    each costs rows x length x the per-token KV size of GPU memory while kept.
    ``static_cache``: True for a static KV cache (sized to prompt + answer, bucketed), False
    for transformers' dynamic cache (no compile then); None (default): static on CUDA only.

    Raises ``FastPathUnavailable`` when the model does not fit (see
    ``build_native_language_model``).
    """

    def __init__(
        self,
        remote_model: nn.Module,
        *,
        compile: bool = False,
        bucket: int = DEFAULT_BUCKET,
        cached: int = 1,
        static_cache: bool | None = None,
    ) -> None:
        self.remote_model = remote_model
        self.native = build_native_language_model(remote_model)
        self.device = self.native.model.embed_tokens.weight.device
        self.dtype = self.native.model.embed_tokens.weight.dtype
        self.static_cache = self.device.type == "cuda" if static_cache is None else bool(static_cache)
        self.compile = bool(compile and self.static_cache and self.device.type == "cuda")
        self.native.compile_decode = self.compile
        self.bucket = max(1, int(bucket))
        self._keep = max(0, int(cached))
        self._caches: collections.OrderedDict[tuple[int, int], StaticCache] = collections.OrderedDict()

    def release(self) -> None:
        """Drop the kept KV caches (e.g. after an out-of-memory error)."""
        self._caches.clear()

    def _static_cache(self, rows: int, length: int) -> StaticCache:
        key = (rows, length)
        cache = self._caches.pop(key, None)
        if cache is None:
            while self._caches and len(self._caches) >= self._keep:
                self._caches.popitem(last=False)  # the least recently used; freed before the new one
            log.debug("new static KV cache: %d row(s) x %d tokens", rows, length)
            cache = StaticCache(
                config=self.native.config,
                max_batch_size=rows,
                max_cache_len=length,
                device=self.device,
                dtype=self.dtype,
            )
        else:
            cache.reset()
        if self._keep:
            self._caches[key] = cache
        return cache

    def generate(
        self, inputs: Mapping[str, torch.Tensor], *, max_new_tokens: int, **generate_kwargs: Any
    ) -> torch.Tensor:
        """Like ``remote_model.generate(**inputs, max_new_tokens=..., **generate_kwargs)``.

        ``inputs``: ``input_ids``, ``attention_mask`` (optional for one row), and with images
        ``pixel_values`` (in the model's dtype) and ``image_sizes``, all on the model's device.
        ``generate_kwargs``: sampling, ``eos_token_id``, ``pad_token_id``, ``streamer``,
        ``stopping_criteria``... passed on as they are. The streamer's first ``put`` gets an
        empty (rows, 0) tensor instead of the prompt. Returns the new tokens only.
        """
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows, prompt_length = input_ids.shape
        with torch.inference_mode():
            embeds = prompt_embeddings(self.remote_model, inputs).to(self.dtype)
            extra: dict[str, Any] = {}
            if self.static_cache:
                length = cache_length(prompt_length, max_new_tokens, self.bucket)
                extra["past_key_values"] = self._static_cache(rows, length)
            return self.native.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                **extra,
                **generate_kwargs,
            )
