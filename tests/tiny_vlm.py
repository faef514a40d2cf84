"""Tiny checkpoints for the generic path, built offline from config (no hub).

``build_tiny_llava``: transformers' own LLaVA (a 2-layer CLIP tower, a 2-layer Llama) with a
byte-level BPE trained here, a ChatML-style chat template and a CLIP image processor, saved
with ``save_pretrained``: the layout of a user's checkpoint. ``build_tiny_llama``: a text-only
causal LM. ``build_hub_code_config``: a config whose model exists only as hub code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SEED = 1234
IMAGE_TOKEN = "<image>"
END_OF_TURN = "<|im_end|>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", END_OF_TURN, IMAGE_TOKEN)
IMAGE_SIZE = 28
PATCH_SIZE = 14
# 2x2 patches, the CLS feature dropped ("default" strategy): 4 placeholders per image.
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant' + '\n' }}{% endif %}"
)

_WORDS = (
    "the a image picture cat dog red blue green shows what is in this there are two of and "
    "chart text sign reads hello world question answer compare difference left right small"
).split()


def _corpus(lines: int = 200) -> list[str]:
    rng = random.Random(SEED)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(3, 12))) + rng.choice(".?!") for _ in range(lines)]


def _special(content: str) -> AddedToken:
    return AddedToken(content, lstrip=False, rstrip=False, normalized=False, special=True)


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE whose special tokens are never split."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=2,
        special_tokens=[_special(token) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=_special("<s>"),
        eos_token=_special(END_OF_TURN),
        unk_token=_special("<unk>"),
        pad_token=_special("<pad>"),
        extra_special_tokens={"image_token": _special(IMAGE_TOKEN)},
        additional_special_tokens=[_special("<|im_start|>"), _special("</s>")],
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def _text_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.3,  # wide random weights: each prompt and image gets its own answer
    )


def _end_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The generation config's eos: the end of a turn and the Llama-style </s>."""
    return [tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.convert_tokens_to_ids("</s>")]


def build_tiny_llava(directory: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A random-weight LLaVA with its processor, saved as a local checkpoint directory."""
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(chat_template)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # logit 0 for special tokens: greedy answers run to their token limit
        model.lm_head.weight[[tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]] = 0
    model.generation_config.eos_token_id = _end_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_llama(directory: Path) -> Path:
    """A text-only causal LM with a tokenizer and a chat template: no image input."""
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    LlamaForCausalLM(_text_config(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_hub_code_config(directory: Path) -> Path:
    """A checkpoint whose architecture exists only as Python code on the hub (auto_map)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "seebot_hub_only_vlm",
        "architectures": ["HubOnlyVLMForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_hub_only.HubOnlyVLMConfig",
            "AutoModelForImageTextToText": "modeling_hub_only.HubOnlyVLMForConditionalGeneration",
        },
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory
