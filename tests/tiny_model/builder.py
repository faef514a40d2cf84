"""Build tiny NATIVE Phi-3-vision checkpoints offline, in the hub's file layout (a second or two).

A directory holds what the hub repository holds, minus its Python code: ``config.json``
(``model_type: phi3_v``, the hub's ``embd_layer``/``img_processor`` plus a small
``vision_config``), ``tokenizer.json`` (+ ``tokenizer_config.json``, chat template),
``preprocessor_config.json`` and safetensors with the hub's key names (one file, or shards with
``model.safetensors.index.json``). It loads through ``inference.loading.load_model`` exactly as
users' checkpoints do.

Everything is deterministic: the tokenizer is trained on generated text and the weights come
from a fixed seed (the caller's torch RNG state is left alone). The random weights never say a
special token, a partial UTF-8 character or an unused id (see ``_keep_random_text_clean``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from inference.phi3v import Phi3VConfig, Phi3VForCausalLM, hub_state_dict, save_hub_checkpoint
from inference.phi3v import num_image_tokens as _num_image_tokens

SEED = 1234
BPE_VOCAB_SIZE = 1000  # byte alphabet + merges + the special tokens
MODEL_VOCAB_SIZE = 1024  # like the hub model, a few more rows than tokens
NUM_CROPS = 16
# The tiny vision tower sees 28-pixel crops of 2x2 patches: one feature per crop after the merge.
TINY_CROP_SIZE = 28
TINY_TOKENS_PER_CROP = 1
# real_image_shapes=True: the hub's 336-pixel crops, 24x24 patches, 144 features per crop.
REAL_CROP_SIZE = 336
REAL_TOKENS_PER_CROP = 144
PATCH_SIZE = 14
ANCHOR = 1.0  # the constant value of hidden dimension 0, see _keep_random_text_clean
UNSAYABLE_WEIGHT = -200.0
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# (content, rstrip, special) in the hub tokenizer's order
SPECIAL_TOKENS = (
    ("<unk>", False, True),
    ("<s>", False, True),
    ("</s>", True, False),
    ("<|endoftext|>", False, True),
    ("<|assistant|>", True, True),
    ("<|placeholder1|>", True, True),
    ("<|placeholder2|>", True, True),
    ("<|placeholder3|>", True, True),
    ("<|placeholder4|>", True, True),
    ("<|system|>", False, True),
    ("<|end|>", False, True),
    ("<|placeholder5|>", True, True),
    ("<|placeholder6|>", True, True),
    ("<|user|>", False, True),
    ("<|image|>", True, True),
)
# The hub chat template, with Jinja string escapes for the newlines.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{ '<|assistant|>' + '\\n' }}"
    "{% endif %}"
)

_WORDS = (
    "the a an this that these two of in on with and or but to for from is are was were be "
    "image images chart charts book books team teams photo photos picture difference "
    "differences text texts table tables graph screenshot receipt sign page cover title "
    "what which who where when why how many much please describe explain compare read "
    "extract list show tell find count answer question help see look shows contains "
    "red blue green yellow black white left right top bottom first second third last "
    "people person dog cat car tree house street city sky water building player players "
    "score game match season year number numbers value values total percent line bar "
    "everyone here ALONE Morgan Maxwell Alice Bob code python function variable result "
    "I you we they it he she my your our their not no yes very more less same different "
    "about above after again all also always any around as at away back because before "
    "behind below between both can could day down each else even every far few get give "
    "go good great has have her him his if into just know large lead like little long make "
    "man many may me most must name near new next now off old only other out over own part "
    "place put said sales say shall should since small so some still such take than then "
    "there thing think through time under up us use way well what while will woman work "
    "world would write note notes section step steps example answer image's it's don't "
    "Hello hello thanks sure here's looks appears seems background foreground color colors "
    "bright dark light shadow smiling standing sitting holding wearing written caption label"
).split()
_CODE_LINES = (
    "```python",
    "def main():",
    "    print('hello world')",
    "def add(a, b):",
    "    return a + b",
    "for i in range(10):",
    "    print(i, end=' ')",
    "import os, sys",
    "x = [1, 2, 3]  # a list",
    'print(f"{x} -> {y}")',
    "if __name__ == '__main__':",
    "    main()",
    "```",
    "| column | value |",
    "| --- | --- |",
    "| total | 42 |",
    "# Heading",
    "## Summary",
    "- **bold** item with `code`",
    "* _italic_ item > quote",
    "1. first step; 2. second step!",
    "@everyone @here <@123456789> #channel",
    "https://example.com/image.png?size=large&x=1",
    "Cost: $3.50 (about 20%) ~ [link](url) {braces} <tag/> \\ path/to/file.txt",
)


def _corpus(lines: int = 400) -> list[str]:
    rng = random.Random(SEED)
    corpus = list(_CODE_LINES) * 3
    for _ in range(lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(".?!:,")
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 2024)}"
        corpus.append(sentence)
    return corpus


def _special(content: str, rstrip: bool, special: bool) -> AddedToken:
    return AddedToken(content, lstrip=False, rstrip=rstrip, normalized=False, special=special)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with the hub tokenizer's special tokens; ``tokenizer(text)`` adds <s>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [_special(*spec) for spec in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    named = {"<unk>", "<s>", "<|endoftext|>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=_special("<s>", False, True),
        eos_token=_special("<|endoftext|>", False, True),
        unk_token=_special("<unk>", False, True),
        pad_token=_special("<|endoftext|>", False, True),
        additional_special_tokens=[_special(*spec) for spec in SPECIAL_TOKENS if spec[0] not in named],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],  # as Llama's: no token_type_ids
    )


def image_shapes(real_image_shapes: bool = False) -> tuple[int, int]:
    """(crop size in pixels, features per crop) of the tiny model or of its real-shapes variant."""
    if real_image_shapes:
        return REAL_CROP_SIZE, REAL_TOKENS_PER_CROP
    return TINY_CROP_SIZE, TINY_TOKENS_PER_CROP


def num_image_tokens(
    width: int, height: int, num_crops: int = NUM_CROPS, *, real_image_shapes: bool = False
) -> int:
    """Prompt positions of one image in the tiny model (or, real_image_shapes, in the hub's)."""
    crop_size, tokens_per_crop = image_shapes(real_image_shapes)
    return _num_image_tokens(width, height, num_crops, crop_size=crop_size, tokens_per_crop=tokens_per_crop)


def _config_json(
    tokenizer: PreTrainedTokenizerFast,
    *,
    real_image_shapes: bool,
    original_max_position_embeddings: int | None,
) -> dict[str, Any]:
    """The hub's config.json for a Phi-3-vision model, with tiny sizes and a ``vision_config``."""
    crop_size, tokens_per_crop = image_shapes(real_image_shapes)
    vision_width = 16
    config: dict[str, Any] = {
        "architectures": ["Phi3VForCausalLM"],
        "model_type": "phi3_v",
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "bos_token_id": tokenizer.bos_token_id,
        # As in the hub config: eos is "</s>", which the model never says; callers stop on
        # <|end|> and <|endoftext|>.
        "eos_token_id": tokenizer.convert_tokens_to_ids("</s>"),
        "pad_token_id": tokenizer.pad_token_id,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "img_processor": {
            "image_dim_out": vision_width,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": tokens_per_crop,
        },
        "vision_config": {
            "hidden_size": vision_width,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "image_size": crop_size,
            "patch_size": PATCH_SIZE,
            "hidden_act": "quick_gelu",
        },
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "initializer_range": 0.2,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": MODEL_VOCAB_SIZE,
    }
    if real_image_shapes:
        # Real prompts run past 4,096 positions: the hub's context and LongRoPE switch.
        config.update(max_position_embeddings=131072, sliding_window=131072)
        original_max_position_embeddings = original_max_position_embeddings or 4096
    if original_max_position_embeddings is not None:
        config.update(_longrope(config, original_max_position_embeddings))
    return config


def _longrope(config: dict[str, Any], original_max_position_embeddings: int) -> dict[str, Any]:
    """Phi-3-vision's rope scaling ("su", transformers' longrope), switching from the short to
    the long factors past ``original_max_position_embeddings``."""
    half_head = config["hidden_size"] // config["num_attention_heads"] // 2
    return {
        "rope_scaling": {
            "type": "su",
            "short_factor": [1.0 + 0.25 * n for n in range(half_head)],
            "long_factor": [1.5 + 4.0 * n for n in range(half_head)],
        },
        "original_max_position_embeddings": original_max_position_embeddings,
        "max_position_embeddings": max(
            config["max_position_embeddings"], 4 * original_max_position_embeddings
        ),
    }


def _preprocessor_json(real_image_shapes: bool) -> dict[str, Any]:
    crop_size, tokens_per_crop = image_shapes(real_image_shapes)
    return {
        "image_processor_type": "Phi3VImageProcessor",
        "processor_class": "Phi3VProcessor",
        "num_crops": NUM_CROPS,
        "num_img_tokens": tokens_per_crop,
        "crop_size": crop_size,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }


def _unsayable_ids(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> list[int]:
    """Ids random weights must never pick: special tokens, tokens that are not whole UTF-8
    characters or that hold control characters, and the unused ids past the tokenizer."""
    backend = tokenizer.backend_tokenizer
    special = {backend.token_to_id(content) for content, _, _ in SPECIAL_TOKENS}
    unsayable = []
    for token_id in range(vocab_size):
        text = backend.decode([token_id], skip_special_tokens=False) if token_id < len(tokenizer) else ""
        clean = bool(text) and "\ufffd" not in text and all(c.isprintable() or c in "\n\t" for c in text)
        if token_id in special or not clean:
            unsayable.append(token_id)
    return unsayable


def _keep_random_text_clean(model: Phi3VForCausalLM, unsayable: list[int]) -> None:
    """Make the random weights avoid ``unsayable`` ids on any code path, greedy or sampled.

    Hidden dimension 0 is pinned to a constant: every token embedding and image feature has
    ANCHOR there, no layer writes to it (and none reads it), so after the final RMSNorm it is
    always positive. Only the unsayable ids' lm_head rows read it, with a negative weight, and
    nothing else: their logits are always far below the others.
    """
    inner = model.model
    with torch.no_grad():
        inner.embed_tokens.weight[:, 0] = ANCHOR
        for layer in inner.layers:
            layer.self_attn.qkv_proj.weight[:, 0] = 0.0
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.gate_up_proj.weight[:, 0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        projection = inner.vision_embed_tokens.img_projection[-1]
        projection.weight[0] = 0.0
        projection.bias[0] = ANCHOR
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[unsayable] = 0.0
        model.lm_head.weight[unsayable, 0] = UNSAYABLE_WEIGHT


def save_hub_weights(state_dict: dict[str, torch.Tensor], directory: Path, *, shards: int = 1) -> None:
    """safetensors as the hub stores them: one file, or about ``shards`` files and an index."""
    total = sum(tensor.numel() * tensor.element_size() for tensor in state_dict.values())
    save_hub_checkpoint(
        state_dict, directory, max_shard_size=total + 1 if shards <= 1 else total // shards + 1
    )


def build_tiny_model(
    directory: Path,
    *,
    real_image_shapes: bool = False,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    original_max_position_embeddings: int | None = None,
) -> Path:
    """Write a tiny native Phi-3-vision checkpoint into ``directory`` and return it.

    ``real_image_shapes``: the hub's image numbers (336-pixel crops, 144 features per crop, so
    prompts are as long as the real model's: 1280x720 at 16 crops is 2,353 image positions)
    with a tiny vision tower. ``shards``: weights split over about that many files with an index.
    ``dtype``: the stored dtype. ``original_max_position_embeddings``: add the hub's LongRoPE
    scaling, switching to the long factors past that many positions (real_image_shapes: the
    hub's 4,096 and 131,072 positions unless given).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(directory)
    config_json = _config_json(
        tokenizer,
        real_image_shapes=real_image_shapes,
        original_max_position_embeddings=original_max_position_embeddings,
    )
    config_json["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    (directory / "preprocessor_config.json").write_text(
        json.dumps(_preprocessor_json(real_image_shapes), indent=2) + "\n"
    )
    config = Phi3VConfig.from_pretrained(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Phi3VForCausalLM(config).eval()
    _keep_random_text_clean(model, _unsayable_ids(tokenizer, config.vocab_size))
    weights = {key: tensor.to(dtype) for key, tensor in hub_state_dict(model).items()}
    save_hub_weights(weights, directory, shards=shards)
    return directory


def copy_with_longrope(source: Path, target: Path, original_max_position_embeddings: int) -> Path:
    """The same model with Phi-3-vision's rope scaling ("su", transformers' longrope), which
    switches from the short to the long factors past `original_max_position_embeddings`:
    small here, so tests cross the switch in a few dozen tokens."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(_longrope(config, original_max_position_embeddings))
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target


def copy_with_load_gate(source: Path, target: Path, gate: Path) -> Path:
    """The same model, marked with ``load_gate``: a named pipe (made here) that
    ``wait_for_load_gate`` reads until something is written to it (a bot that is still
    starting when questions arrive). Nothing in ``inference`` reads it: the test harness that
    starts the bot calls ``wait_for_load_gate`` before loading."""
    shutil.copytree(source, target)
    os.mkfifo(gate)
    config = json.loads((target / "config.json").read_text())
    config["load_gate"] = str(gate)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target


def wait_for_load_gate(model_dir: str | os.PathLike[str]) -> None:
    """Block until the model directory's ``load_gate`` pipe is written to (no gate: return)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return
    gate = json.loads(config_path.read_text()).get("load_gate")
    if gate:
        with open(gate, "rb") as pipe:  # blocks until the test opens it for writing
            pipe.read()
