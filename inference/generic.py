"""The generic path: a vision-language model that transformers runs natively (not Phi-3-vision).

`AutoProcessor` with the model's own chat template over transformers' multimodal messages,
`AutoModelForImageTextToText`'s `generate`, batched: one call over several requests, each
row streamed and ended on its own (stop token, its own token limit, its asker leaving).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from .conversation import Conversation, PromptError
from .engine import ModelLoadError
from .loading import LoadedModel
from .settings import InferenceSettings

__all__ = [
    "GenericPrompt",
    "GenericRow",
    "GenericRunner",
    "context_length",
    "encode_generic",
    "encode_prompts",
    "generic_messages",
    "generic_prompt",
    "load_generic",
    "special_tokens",
]

log = logging.getLogger(__name__)

_ZERO_WIDTH_SPACE = "\u200b"
# Processor attributes that name a placeholder the processor expands (LLaVA, Gemma 3, Qwen2-VL...).
_PLACEHOLDER_ATTRIBUTES = ("image_token", "video_token", "audio_token", "boi_token", "eoi_token")


# Loading


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _config_dict(source: str, revision: str | None) -> dict[str, Any]:
    """The checkpoint's config.json as it is (no class resolved, no code run)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source, revision=revision)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model {source!r}: {_first_line(error)}") from error
    if "model_type" not in config:
        raise ModelLoadError(f"cannot load model {source!r}: it has no config.json naming its model_type")
    return config


def _check_architecture(source: str, config: dict[str, Any], trust_remote_code: bool) -> None:
    """One clear error, before any weights download, for a model this path cannot run."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = config.get("model_type")
    auto_map = config.get("auto_map") or {}
    if model_type not in CONFIG_MAPPING_NAMES:
        if not auto_map:
            raise ModelLoadError(
                f"model {source!r} has model_type {model_type!r}, which transformers "
                f"{transformers.__version__} does not know: choose another MODEL_ID or upgrade transformers"
            )
        if not trust_remote_code:
            raise ModelLoadError(
                f"model {source!r} ({model_type}) runs Python code from its hub repository; "
                "set TRUST_REMOTE_CODE=true to allow that (only for a repository you trust)"
            )
        if "AutoModelForImageTextToText" not in auto_map:
            raise ModelLoadError(
                f"model {source!r} ({model_type}): its hub code has no AutoModelForImageTextToText "
                "class, which the generic path runs; choose another MODEL_ID"
            )
    elif model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelLoadError(
            f"model {source!r} ({model_type}) takes no image input: MODEL_ID must be a vision-language "
            "(image-text-to-text) model, such as Phi-3-vision, Qwen2.5-VL or SmolVLM"
        )


def _check_processor(source: str, processor: Any) -> None:
    if getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"model {source!r} has no image processor (preprocessor_config.json)")
    tokenizer = processor.tokenizer
    if getattr(processor, "chat_template", None) is None:
        if not isinstance(getattr(tokenizer, "chat_template", None), str):
            raise ModelLoadError(
                f"model {source!r} has no chat template: use its instruction-tuned (chat) version"
            )
        processor.chat_template = tokenizer.chat_template
    if tokenizer.pad_token is None:  # batches are padded
        tokenizer.pad_token = tokenizer.eos_token


def _stop_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """The tokenizer's eos and the generation config's eos ids, in that order, once each."""
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    ids: list[int] = []
    for token_id in [tokenizer.eos_token_id, *configured]:
        if isinstance(token_id, int) and token_id not in ids:
            ids.append(token_id)
    return ids


def _load_model(source: str, settings: InferenceSettings, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForImageTextToText

    from .quantization import GENERIC_KEPT, quantization_config

    common: dict[str, Any] = {
        "quantization_config": quantization_config(settings.quantize, device, dtype, GENERIC_KEPT),
        "revision": settings.model_revision,
        "trust_remote_code": settings.trust_remote_code,
        "dtype": dtype,
        # Straight onto the GPU: no full copy of the weights in CPU memory first.
        "device_map": {"": device} if device.type == "cuda" else None,
        "output_loading_info": True,
    }
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            source, attn_implementation="sdpa", **common
        )
    except ValueError as error:
        if "sdpa" not in str(error).lower():
            raise
        log.info("%s has no sdpa attention; using eager", source)
        model, info = AutoModelForImageTextToText.from_pretrained(
            source, attn_implementation="eager", **common
        )
    missing = info.get("missing_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        names = sorted(missing)[:3] + [str(key) for key in mismatched[:3]]
        raise ModelLoadError(
            f"model {source!r}: the checkpoint's weights do not match its config "
            f"({len(missing)} missing, {len(mismatched)} of another shape, e.g. {', '.join(names)})"
        )
    return model


def load_generic(settings: InferenceSettings, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load a native transformers VLM and its processor; `ModelLoadError` says what is wrong."""
    from transformers import AutoProcessor

    source = settings.model_id
    trust_remote_code = settings.trust_remote_code
    _check_architecture(source, _config_dict(source, settings.model_revision), trust_remote_code)
    log.info(
        "loading %s on %s (%s, QUANTIZE=%s) through the generic path",
        source,
        device,
        dtype,
        settings.quantize,
    )
    try:
        processor = AutoProcessor.from_pretrained(
            source, revision=settings.model_revision, trust_remote_code=trust_remote_code
        )
        _check_processor(source, processor)
        model = _load_model(source, settings, device, dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, ImportError, KeyError, RuntimeError, TypeError) as error:
        raise ModelLoadError(f"cannot load model {source!r}: {_first_line(error)}") from error
    if device.type != "cuda":
        model.to(device)
    model.eval()
    stops = _stop_token_ids(processor.tokenizer, model.generation_config)
    attention = model.config._attn_implementation
    log.info("model ready: %s, %s attention, stop tokens %s", type(model).__name__, attention, stops)
    return LoadedModel(model, processor, device, dtype, attention, stops, kind="generic")


def context_length(model: Any) -> int | None:
    """The language model's context (max_position_embeddings), None where it has none."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


# Prompts


@dataclass(frozen=True)
class GenericPrompt:
    """One request's chat-templated prompt text and its images, in prompt order."""

    text: str
    images: tuple[Image.Image, ...]


def _is_markup(token: str) -> bool:
    return len(token) > 1 and not token.isalnum() and not any(char.isspace() for char in token)


@functools.lru_cache(maxsize=8)
def _defuse_pattern(tokens: frozenset[str]) -> re.Pattern[str] | None:
    """Markup-like tokens (`<image>`, `<|im_end|>`, `[INST]`), longest first; never plain words
    or whitespace runs, which people type."""
    markup = sorted((token for token in tokens if _is_markup(token)), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, markup))) if markup else None


def _defuse(text: str, pattern: re.Pattern[str] | None) -> str:
    if pattern is None:
        return text
    return pattern.sub(lambda match: match[0][0] + _ZERO_WIDTH_SPACE + match[0][1:], text)


def special_tokens(processor: Any) -> frozenset[str]:
    """Every added token of the processor's tokenizer, and the placeholders it expands."""
    tokenizer = processor.tokenizer
    tokens = {added.content for added in tokenizer.added_tokens_decoder.values()}
    tokens.update(tokenizer.all_special_tokens)
    tokens.update(
        value for name in _PLACEHOLDER_ATTRIBUTES if isinstance(value := getattr(processor, name, None), str)
    )
    return frozenset(tokens)


def generic_messages(conversation: Conversation, reserved: Iterable[str] = ()) -> list[dict[str, Any]]:
    """transformers' multimodal messages; `reserved` tokens in the text are defused (a zero-width
    space after their first character) so text cannot add image placeholders or fake a turn."""
    if not conversation.turns or conversation.turns[-1].role != "user":
        raise PromptError("a conversation must end with a user turn")
    pattern = _defuse_pattern(frozenset(reserved))
    messages: list[dict[str, Any]] = []
    for turn in conversation.turns:
        if turn.role not in ("user", "assistant"):
            raise PromptError(f"unknown role {turn.role!r}")
        if turn.role == "assistant" and turn.images:
            raise PromptError("assistant turns cannot carry images")
        content: list[dict[str, Any]] = [{"type": "image"} for _ in turn.images]
        content.append({"type": "text", "text": _defuse(turn.text, pattern)})
        messages.append({"role": turn.role, "content": content})
    return messages


def generic_prompt(processor: Any, conversation: Conversation) -> GenericPrompt:
    """The prompt text from the model's own chat template, and the images it refers to."""
    messages = generic_messages(conversation, special_tokens(processor))
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return GenericPrompt(text, tuple(conversation.images))


def encode_prompts(processor: Any, prompts: Sequence[GenericPrompt]) -> dict[str, torch.Tensor]:
    """Model inputs for prompts in one batch (on the CPU): left-padded ids, images as the
    processor batches them (a list of images per prompt)."""
    images = [list(prompt.images) for prompt in prompts]
    bos = processor.tokenizer.bos_token
    # A template that writes the BOS itself (Gemma 3, Llama 3.2 Vision) must not get a second
    # one from the tokenizer: what transformers' apply_chat_template(tokenize=True) does.
    templated_bos = bos is not None and all(prompt.text.startswith(bos) for prompt in prompts)
    return dict(
        processor(
            text=[prompt.text for prompt in prompts],
            images=images if any(images) else None,
            padding=True,
            padding_side="left",  # batched prompts end where the answers begin
            add_special_tokens=not templated_bos,
            return_tensors="pt",
        )
    )


def encode_generic(processor: Any, conversation: Conversation) -> dict[str, torch.Tensor]:
    """One request's model inputs; `input_ids.shape[1]` is its prompt length."""
    return encode_prompts(processor, [generic_prompt(processor, conversation)])


# Batched generation


def _never() -> bool:
    return False


def _nothing() -> None:
    return None


@dataclass(eq=False)
class GenericRow:
    """One request in a batched `generate` call, and the way its tokens go back."""

    prompt: GenericPrompt
    max_new_tokens: int
    on_token: Callable[[int], None]  # each answer token, in order; never a stop token
    stopped: Callable[[], bool] = _never  # True: end this row now (asker left, shutdown)
    on_end: Callable[[], None] = _nothing  # once, when the row ends
    ended: bool = False  # set by the runner: on_end was called
    hit_limit: bool = False  # set by the runner before on_end: the row ran out of tokens
    generated: int = field(default=0, init=False)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.on_end()


class _RowCriteria(StoppingCriteria):
    """Runs at every step with the tokens just chosen: hands each open row its token and
    ends the row on a stop token, its own limit or `stopped()`; the others go on."""

    def __init__(self, rows: Sequence[GenericRow], stop_token_ids: Iterable[int]) -> None:
        self._rows = rows
        self._stops = frozenset(stop_token_ids)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        for row, token in zip(self._rows, input_ids[:, -1].tolist(), strict=True):
            if row.ended:
                continue
            if row.stopped() or token in self._stops:
                row.end()
                continue
            row.on_token(token)
            row.generated += 1
            if row.generated >= row.max_new_tokens:
                row.hit_limit = True
                row.end()
        return torch.tensor([row.ended for row in self._rows], dtype=torch.bool, device=input_ids.device)


class GenericRunner:
    """Runs batches of generic-path requests on a loaded model, one `generate` call each."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    def _on_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Tensors onto the model's device, floating ones (pixels) in its dtype."""
        device, dtype = self.loaded.device, self.loaded.dtype

        def move(value: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            return value.to(device, dtype) if value.is_floating_point() else value.to(device)

        return {name: move(value) for name, value in inputs.items()}

    def generate(self, rows: Sequence[GenericRow], temperature: float = 0.0) -> None:
        """One batched `generate` over `rows`; each row ends on its own. Raises what the model
        raised; rows with `ended == False` then got no `on_end`."""
        if not rows:
            return
        loaded = self.loaded
        tokenizer = loaded.tokenizer
        inputs = self._on_device(encode_prompts(loaded.processor, [row.prompt for row in rows]))
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        with torch.inference_mode():
            loaded.model.generate(
                **inputs,
                **sampling,
                max_new_tokens=max(row.max_new_tokens for row in rows),
                eos_token_id=loaded.stop_token_ids,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_RowCriteria(rows, loaded.stop_token_ids)]),
            )
        for row in rows:  # generate can end before a row did (the model's own max_length)
            if not row.ended:
                row.hit_limit = True
                row.end()
