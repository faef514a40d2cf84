"""Tiny checkpoints for the generic path, built offline from config (no hub).

``build_tiny_llava``: transformers' own LLaVA (a 2-layer CLIP tower, a 2-layer Llama) with a
byte-level BPE trained here, a ChatML-style chat template and a CLIP image processor, saved
with ``save_pretrained``: the layout of a user's checkpoint. ``build_tiny_llama``: a text-only
causal LM. ``build_tiny_qwen2_vl``: Qwen2-VL, with its own image sizes and multimodal RoPE.
``build_tiny_idefics3``: Idefics3 (SmolVLM's architecture), images batched per prompt.
``build_hub_code_llava``: the LLaVA as a model that exists only as hub code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

SEED = 1234
WEIGHTS = "model.safetensors"
IMAGE_TOKEN = "<image>"
END_OF_TURN = "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"  # Qwen2-VL's image brackets
IDEFICS3_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|im_start|>",
    END_OF_TURN,
    IMAGE_TOKEN,
    VISION_START,
    VISION_END,
    *IDEFICS3_TOKENS,
)
IMAGE_SIZE = 28
PATCH_SIZE = 14
# 2x2 patches, the CLS feature dropped ("default" strategy): 4 placeholders per image.
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2


def chatml_template(image: str) -> str:
    """A ChatML-style template over transformers' multimodal messages; `image` per image item."""
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        f"{{% if item['type'] == 'image' %}}{{{{ '{image}' }}}}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant' + '\\n' }}{% endif %}"
    )


CHAT_TEMPLATE = chatml_template(IMAGE_TOKEN)

_WORDS = (
    "the a image picture cat dog red blue green shows what is in this there are two of and "
    "chart text sign reads hello world question answer compare difference left right small"
).split()


def _corpus(lines: int = 200) -> list[str]:
    rng = random.Random(SEED)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(3, 12))) + rng.choice(".?!") for _ in range(lines)]


def _special(content: str) -> AddedToken:
    return AddedToken(content, lstrip=False, rstrip=False, normalized=False, special=True)


def build_tokenizer(
    chat_template: str | None = CHAT_TEMPLATE, *, add_bos: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE whose special tokens are never split; `add_bos`: it starts every text
    with <s>, as Llama's and Gemma's do."""
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
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
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


def build_tiny_llava(
    directory: Path, *, chat_template: str | None = CHAT_TEMPLATE, add_bos: bool = False
) -> Path:
    """A random-weight LLaVA with its processor, saved as a local checkpoint directory."""
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(chat_template, add_bos=add_bos)
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
    _quiet_special_tokens(model, tokenizer)
    model.generation_config.eos_token_id = _end_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _quiet_special_tokens(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    """Logit 0 for the special tokens: random greedy answers run to their token limit."""
    with torch.no_grad():
        model.lm_head.weight[[tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]] = 0


def build_tiny_qwen2_vl(directory: Path) -> Path:
    """A random-weight Qwen2-VL (multimodal RoPE, images of their own size, at most 2x2
    merged patches) with its processor, saved as a local checkpoint directory."""
    torch.manual_seed(SEED)
    template = chatml_template(VISION_START + IMAGE_TOKEN + VISION_END)
    tokenizer = build_tokenizer(template)
    patch, merge = PATCH_SIZE, 2
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            min_pixels=(patch * merge) ** 2,
            max_pixels=(2 * patch * merge) ** 2,
            patch_size=patch,
            merge_size=merge,
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=template,
    )
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.3,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        **ids,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": patch,
            "spatial_merge_size": merge,
            "initializer_range": 0.3,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.unk_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(VISION_END),
        **ids,
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    _quiet_special_tokens(model, tokenizer)
    model.generation_config.eos_token_id = _end_ids(tokenizer)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_idefics3(directory: Path) -> Path:
    """A random-weight Idefics3 (SmolVLM's architecture: images batched per prompt, padded,
    with a pixel mask; one 28-pixel view per image) with its processor, saved as a checkpoint."""
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            size={"longest_edge": IMAGE_SIZE},
            max_image_size={"longest_edge": IMAGE_SIZE},
            do_image_splitting=False,
        ),
        tokenizer=tokenizer,
        image_seq_len=1,  # (28 / 14) ** 2 patches, merged 2x2 (scale_factor)
        chat_template=CHAT_TEMPLATE,
    )
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Idefics3Config(
        text_config=_text_config(tokenizer).to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=2,
        **ids,
    )
    model = Idefics3ForConditionalGeneration(config).eval()
    _quiet_special_tokens(model, tokenizer)
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


_HUB_CONFIG_CODE = """from transformers import LlavaConfig


class HubVLMConfig(LlavaConfig):
    model_type = "seebot_hub_vlm"
"""

_HUB_MODELING_CODE = """from transformers import LlavaForConditionalGeneration

from .configuration_hub_vlm import HubVLMConfig


class HubVLMForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = HubVLMConfig
"""


def build_hub_code_llava(directory: Path) -> Path:
    """The tiny LLaVA as a model whose architecture exists only as Python code in its
    repository (``auto_map``), as hub-code models are published."""
    build_tiny_llava(directory)
    # save_pretrained writes LLaVA's legacy key names, which transformers renames for the
    # llava model_type only: hub code gets the names its classes use.
    weights = LlavaForConditionalGeneration.from_pretrained(directory).state_dict()
    save_file({name: weight.contiguous() for name, weight in weights.items()}, directory / WEIGHTS)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "seebot_hub_vlm"
    config["architectures"] = ["HubVLMForConditionalGeneration"]
    config["auto_map"] = {
        "AutoConfig": "configuration_hub_vlm.HubVLMConfig",
        "AutoModelForImageTextToText": "modeling_hub_vlm.HubVLMForConditionalGeneration",
    }
    config_path.write_text(json.dumps(config, indent=2))
    (directory / "configuration_hub_vlm.py").write_text(_HUB_CONFIG_CODE)
    (directory / "modeling_hub_vlm.py").write_text(_HUB_MODELING_CODE)
    return directory
