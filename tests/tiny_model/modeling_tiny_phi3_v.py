"""Model of the tiny Phi-3-vision stand-in.

Remote code: ``builder.py`` copies this file into the model directory; it imports only torch,
transformers and the standard library, and its siblings only relatively.

``TinyPhi3VForCausalLM`` wraps transformers' own ``Phi3Model`` (so the language model has
the hub model's module names: ``model.embed_tokens``, ``model.layers.N.self_attn.qkv_proj``,
``...o_proj``, ``...mlp.gate_up_proj``, ``...mlp.down_proj``, ``...input_layernorm``,
``...post_attention_layernorm``, ``model.norm``, ``lm_head``) and adds a tiny image embedder
at ``model.vision_embed_tokens``. Like the hub model, the embedder takes the ids with
negative image placeholders, clamps them IN PLACE, and returns the input embeddings with
image N's features at the ``-N`` positions.

Scripted replies: ``config.script`` is a list of rules ``{"when": str, "reply": str,
"seconds_per_token": float, "after_end": str, "fail": "out_of_memory" | "worker_crash"}``.
On the prefill, each row's last user turn
(the text after the last ``<|user|>``, up to ``<|end|>``, without image tags, stripped) is
matched against the rules; the first rule whose ``when`` occurs in it (``""`` matches
anything) forces the reply's tokens, then ``<|end|>``, then ``after_end`` (the model running
on past its turn, as the real one does when only ``<|endoftext|>`` stops it), then
``<|endoftext|>`` for ever. ``{images}`` in a reply becomes the number of distinct images in
the row's prompt, ``{question}`` the matched turn text. Rows without a matching rule use the
random weights, which the builder shapes so that they never produce a special token, a
partial UTF-8 byte or an unused id: they never stop by themselves (a logits processor can
still force ``<|end|>`` at any step) and always decode to clean text.

Slow loading: with ``config.load_gate`` (a path to a named pipe), building the model waits
until someone writes to that pipe, as a big model keeps a bot starting for minutes.
"""

from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, Phi3Model, PreTrainedModel, PreTrainedTokenizerFast
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tiny_phi3_v import TinyPhi3VConfig

DEFAULT_AFTER_END = "\n<|assistant|>\nrunaway text"
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")
POOLED_SIDE = 4  # each crop is average-pooled to 3 x 4 x 4 values before the "encoder"
FORCED_LOGIT = 1.0e4


def _fail_as_scripted(failure: object) -> None:
    """`"fail"` in a script rule: fail the way a real GPU run can, to test recovery."""
    if failure is None:
        return
    if failure == "out_of_memory":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (scripted)")
    if failure == "worker_crash":
        raise SystemExit("the worker thread dies (scripted)")
    raise ValueError(f"unknown scripted failure {failure!r}")


class TinyImageEmbedding(nn.Module):
    """Stand-in for the hub's ``Phi3ImageEmbedding``: ids + crops -> input embeddings.

    Per image: every crop is pooled and mapped to ``tokens_per_crop`` feature vectors; the
    local crops are laid out row by row with a ``sub_GN`` vector after each row, then come
    ``glb_GN`` and the global crop's features with their own ``sub_GN`` (the hub's
    "sub_glb" order); ``img_projection`` maps them to the hidden size.
    """

    def __init__(self, config: TinyPhi3VConfig, wte: nn.Embedding) -> None:
        super().__init__()
        # Shared with model.embed_tokens; kept out of this module's parameters so the
        # weights are stored once.
        self.__dict__["wte"] = wte
        dim = config.image_dim_out
        self.crop_size = config.crop_size
        self.tokens_per_crop = config.tokens_per_crop
        self.image_dim_out = dim
        self.vocab_size = config.vocab_size
        self.img_processor = nn.Linear(3 * POOLED_SIDE * POOLED_SIDE, self.tokens_per_crop * dim)
        self.img_projection = nn.Sequential(
            nn.Linear(dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.glb_GN = nn.Parameter(torch.zeros(1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, dim))

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """One (num_tokens, hidden) tensor per image."""
        num_images, num_slots = pixel_values.shape[:2]
        dtype = self.img_processor.weight.dtype
        crops = pixel_values.to(device=self.img_processor.weight.device, dtype=dtype)
        pooled = F.adaptive_avg_pool2d(crops.flatten(0, 1), POOLED_SIDE).flatten(1)
        features = self.img_processor(pooled).view(
            num_images, num_slots, self.tokens_per_crop, self.image_dim_out
        )
        result = []
        for index, (height, width) in enumerate(image_sizes.tolist()):
            rows, cols = int(height) // self.crop_size, int(width) // self.crop_size
            if rows < 1 or cols < 1 or rows * cols + 1 > num_slots:
                raise ValueError(
                    f"image_sizes[{index}] = {(height, width)} does not fit pixel_values "
                    f"with {num_slots} crops per image"
                )
            local = features[index, 1 : 1 + rows * cols].reshape(rows, cols * self.tokens_per_crop, -1)
            local = torch.cat([local, self.sub_GN.expand(rows, 1, -1)], dim=1).flatten(0, 1)
            whole = torch.cat([features[index, 0], self.sub_GN])
            result.append(self.img_projection(torch.cat([local, self.glb_GN, whole])))
        return result

    def forward(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor, image_sizes=None
    ) -> torch.Tensor:
        ids = input_ids.view(-1, input_ids.shape[-1])
        image_numbers = (-ids).clamp_min(0)  # N at image N's positions, 0 elsewhere
        # Like the hub model: the caller's ids lose their image placeholders.
        input_ids.clamp_min_(0).clamp_max_(self.vocab_size - 1)
        hidden = self.wte(ids)
        if not bool(image_numbers.any()):
            return hidden
        if pixel_values is None or image_sizes is None:
            raise ValueError("input_ids has image placeholders but pixel_values/image_sizes are missing")
        image_sizes = torch.as_tensor(image_sizes).view(-1, 2)
        features = self.image_features(pixel_values, image_sizes)
        hidden = hidden.clone()
        offset = 0  # images of row r follow those of rows < r in pixel_values
        for row in range(ids.shape[0]):
            numbers = sorted(set(image_numbers[row].tolist()) - {0})
            if numbers != list(range(1, len(numbers) + 1)):
                raise ValueError(f"row {row}: image placeholders must be -1..-N, got {numbers}")
            if offset + len(numbers) > len(features):
                raise ValueError(
                    f"the prompts name {offset + len(numbers)}+ images, pixel_values has {len(features)}"
                )
            for number in numbers:
                positions = (image_numbers[row] == number).nonzero().squeeze(1)
                feature = features[offset + number - 1]
                if positions.numel() != feature.shape[0]:
                    raise ValueError(
                        f"row {row}: image {number} has {positions.numel()} placeholder tokens "
                        f"but its image_sizes entry gives {feature.shape[0]}"
                    )
                hidden[row, positions] = feature.to(hidden.dtype)
            offset += len(numbers)
        if offset != len(features):
            raise ValueError(f"the prompts name {offset} images but pixel_values has {len(features)}")
        return hidden


@dataclass(frozen=True)
class _ScriptedRow:
    tokens: list[int]
    seconds_per_token: float


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=path)


def _last_user_turn(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> str:
    backend = tokenizer.backend_tokenizer
    user_id, end_id = backend.token_to_id("<|user|>"), backend.token_to_id("<|end|>")
    if user_id in ids:
        ids = ids[len(ids) - ids[::-1].index(user_id) :]
    if end_id in ids:
        ids = ids[: ids.index(end_id)]
    text = backend.decode(ids, skip_special_tokens=True)
    return IMAGE_TAG.sub("", text).strip()


class TinyPhi3VPreTrainedModel(PreTrainedModel):
    config_class = TinyPhi3VConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["Phi3DecoderLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_flash_attn_2 = True
    _supports_sdpa = False  # like the hub model: eager unless flash attention is asked for
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, TinyImageEmbedding):
            module.glb_GN.data.normal_(mean=0.0, std=std)
            module.sub_GN.data.normal_(mean=0.0, std=std)


class TinyPhi3VForCausalLM(TinyPhi3VPreTrainedModel, GenerationMixin):
    def __init__(self, config: TinyPhi3VConfig) -> None:
        super().__init__(config)
        gate = getattr(config, "load_gate", None)
        if gate:
            with open(gate, "rb") as pipe:  # blocks until the test opens it for writing
                pipe.read()
        self.model = Phi3Model(config)
        self.model.vision_embed_tokens = TinyImageEmbedding(config, self.model.embed_tokens)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._script_state: tuple[int, list[_ScriptedRow | None], int] | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value
        self.model.vision_embed_tokens.__dict__["wte"] = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # -- scripted replies ---------------------------------------------------------------

    def _start_script(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Pick each row's rule from its prompt; called on the prefill, before the clamp."""
        self._script_state = None
        rules = list(getattr(self.config, "script", None) or [])
        if not rules:
            return
        path = os.path.join(str(self.config._name_or_path), "tokenizer.json")
        if not os.path.isfile(path):
            raise RuntimeError(
                f"scripted replies need the model directory's tokenizer.json, not found at {path}"
            )
        tokenizer = _load_tokenizer(path)
        backend = tokenizer.backend_tokenizer
        end_id = backend.token_to_id("<|end|>")
        eos_id = backend.token_to_id("<|endoftext|>")
        rows: list[_ScriptedRow | None] = []
        for row in range(input_ids.shape[0]):
            ids = input_ids[row]
            if attention_mask is not None and attention_mask.dim() == 2:
                ids = ids[attention_mask[row].bool()]
            ids = ids.tolist()
            question = _last_user_turn(tokenizer, [i for i in ids if i >= 0])
            rule = next((r for r in rules if str(r.get("when", "")) in question), None)
            if rule is None:
                rows.append(None)
                continue
            _fail_as_scripted(rule.get("fail"))
            images = len({i for i in ids if i < 0})
            reply = str(rule.get("reply", ""))
            reply = reply.replace("{images}", str(images)).replace("{question}", question)
            after_end = rule.get("after_end")
            after_end = DEFAULT_AFTER_END if after_end is None else str(after_end)
            tokens = [*backend.encode(reply, add_special_tokens=False).ids, end_id]
            tokens += [*backend.encode(after_end, add_special_tokens=False).ids, eos_id]
            rows.append(_ScriptedRow(tokens, float(rule.get("seconds_per_token", 0.0) or 0.0)))
        if any(rows):
            self._script_state = (input_ids.shape[1], rows, eos_id)

    def _steer_next_token(self, logits: torch.Tensor, past_length: int, new_length: int) -> None:
        """Force the scripted rows' next token.

        The step (number of tokens generated so far) comes from the cache length, so rows
        of a batch need no counters.
        """
        if self._script_state is None:
            return
        prompt_length, rows, eos_id = self._script_state
        step = past_length + new_length - prompt_length
        if step < 0 or logits.shape[0] != len(rows):
            return
        pause = 0.0
        for index, row in enumerate(rows):
            if row is None:
                continue
            token = row.tokens[step] if step < len(row.tokens) else eos_id
            logits[index, -1, :] = -FORCED_LOGIT
            logits[index, -1, token] = FORCED_LOGIT
            if step < len(row.tokens):
                pause = max(pause, row.seconds_per_token)
        if pause > 0:
            time.sleep(pause)

    # -- forward and generation ---------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        num_logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if isinstance(past_key_values, Cache):
            past_length = past_key_values.get_seq_length()
        elif past_key_values:
            past_length = past_key_values[0][0].shape[2]
        else:
            past_length = 0
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            if past_length == 0:
                self._start_script(input_ids, attention_mask)
            if bool((input_ids < 0).any()) or (pixel_values is not None and image_sizes is not None):
                inputs_embeds = self.model.vision_embed_tokens(
                    input_ids, pixel_values=pixel_values, image_sizes=image_sizes
                )
            else:
                inputs_embeds = self.model.embed_tokens(input_ids)
        elif past_length == 0:
            self._script_state = None
        outputs = self.model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        hidden = outputs.last_hidden_state
        if num_logits_to_keep:
            hidden = hidden[:, -num_logits_to_keep:]
        logits = self.lm_head(hidden).float()
        self._steer_next_token(logits, past_length, inputs_embeds.shape[1])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        if not return_dict:
            output = (logits, outputs.past_key_values, outputs.hidden_states, outputs.attentions)
            return (loss, *output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        cache_position=None,
        pixel_values=None,
        image_sizes=None,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache_position=cache_position,
            **kwargs,
        )
        ids = model_inputs.get("input_ids")
        if ids is not None and ids.shape == input_ids.shape:
            # As with the hub model, the prefill gets the caller's own tensor (no copy), so
            # the image embedder's in-place clamp is visible to the caller.
            model_inputs["input_ids"] = input_ids
        model_inputs["pixel_values"] = pixel_values
        model_inputs["image_sizes"] = image_sizes
        return model_inputs
