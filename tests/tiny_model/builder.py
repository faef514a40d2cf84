"""Build a tiny Phi-3-vision look-alike model directory offline (a few seconds on one core).

The directory loads exactly like the hub model::

    processor = AutoProcessor.from_pretrained(d, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        d, trust_remote_code=True, torch_dtype=torch.float32, _attn_implementation="eager"
    )

Everything is deterministic: the tokenizer is trained on generated text and the weights come
from a fixed seed (the caller's torch RNG state is left alone).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from .configuration_tiny_phi3_v import TinyPhi3VConfig
from .modeling_tiny_phi3_v import TinyPhi3VForCausalLM

HERE = Path(__file__).resolve().parent
REMOTE_CODE_FILES = (
    "configuration_tiny_phi3_v.py",
    "modeling_tiny_phi3_v.py",
    "image_processing_tiny_phi3_v.py",
    "processing_tiny_phi3_v.py",
)

SEED = 1234
BPE_VOCAB_SIZE = 1000  # byte alphabet + merges + the special tokens
MODEL_VOCAB_SIZE = 1024  # like the hub model, a few more rows than tokens
NUM_CROPS = 16
CROP_SIZE = 16
TOKENS_PER_CROP = 2
ANCHOR = 1.0  # the constant value of hidden dimension 0, see _keep_random_text_clean
UNSAYABLE_WEIGHT = -200.0

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


def _config(tokenizer: PreTrainedTokenizerFast, script: list[dict]) -> TinyPhi3VConfig:
    config = TinyPhi3VConfig(
        vocab_size=MODEL_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        # As in the hub config: eos is "</s>", which the model never says; callers must
        # pass eos_token_id=[<|end|>, <|endoftext|>] to generate.
        eos_token_id=tokenizer.convert_tokens_to_ids("</s>"),
        pad_token_id=tokenizer.pad_token_id,
        image_dim_out=16,
        crop_size=CROP_SIZE,
        tokens_per_crop=TOKENS_PER_CROP,
        script=script,
    )
    config.auto_map = {
        "AutoConfig": "configuration_tiny_phi3_v.TinyPhi3VConfig",
        "AutoModelForCausalLM": "modeling_tiny_phi3_v.TinyPhi3VForCausalLM",
    }
    config.architectures = ["TinyPhi3VForCausalLM"]
    return config


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


def _keep_random_text_clean(model: TinyPhi3VForCausalLM, unsayable: list[int]) -> None:
    """Make the random weights avoid ``unsayable`` ids on any code path, greedy or sampled.

    Hidden dimension 0 is pinned to a constant: every token embedding and image feature
    has ANCHOR there, no layer writes to it (and none reads it), so after the final RMSNorm
    it is always positive. Only the unsayable ids' lm_head rows read it, with a negative
    weight, and nothing else: their logits are always far below the others. A native
    ``Phi3ForCausalLM`` sharing these weights behaves the same.
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


def _check_script(script: list[dict]) -> list[dict]:
    allowed = {"when", "reply", "seconds_per_token", "after_end", "fail"}
    checked = []
    for rule in script:
        unknown = set(rule) - allowed
        if unknown or "reply" not in rule:
            raise ValueError(f"bad script rule {rule!r}: needs 'reply', may have {sorted(allowed)}")
        checked.append({"when": "", "seconds_per_token": 0.0, "after_end": None, **rule})
    return checked


def _write_full_config(config: TinyPhi3VConfig, path: Path) -> None:
    """Write every model field, like the hub's config.json.

    ``save_pretrained`` leaves out values equal to the class defaults, so a reader that
    builds a plain ``Phi3Config`` from the JSON would get Phi-3-mini's sizes; generic
    ``PretrainedConfig`` fields at their defaults are left out as noise.
    """
    generic = PretrainedConfig().to_dict()
    keep = {"architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id"}
    values = {
        key: value
        for key, value in config.to_dict().items()
        if not key.startswith("_") and (key in keep or key not in generic or generic[key] != value)
    }
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def build_tiny_model(directory: Path, *, script: list[dict] | None = None) -> Path:
    """Write a loadable tiny Phi-3-vision look-alike into ``directory`` and return it.

    ``script``: rules ``{"when": substring, "reply": text, "seconds_per_token": 0.0,
    "after_end": text or None}``; see ``modeling_tiny_phi3_v`` for how they are applied.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(directory)

    config = _config(tokenizer, _check_script(script or []))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = TinyPhi3VForCausalLM(config).eval()
    _keep_random_text_clean(model, _unsayable_ids(tokenizer, config.vocab_size))
    model.save_pretrained(directory, safe_serialization=True)
    _write_full_config(model.config, directory / "config.json")

    preprocessor = {
        "auto_map": {
            "AutoProcessor": "processing_tiny_phi3_v.TinyPhi3VProcessor",
            "AutoImageProcessor": "image_processing_tiny_phi3_v.TinyPhi3VImageProcessor",
        },
        "image_processor_type": "TinyPhi3VImageProcessor",
        "processor_class": "TinyPhi3VProcessor",
        "num_crops": NUM_CROPS,
        "crop_size": CROP_SIZE,
        "tokens_per_crop": TOKENS_PER_CROP,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(HERE / name, directory / name)
    return directory


def copy_with_longrope(source: Path, target: Path, original_max_position_embeddings: int) -> Path:
    """The same model with Phi-3-vision's rope scaling ("su", transformers' longrope), which
    switches from the short to the long factors past `original_max_position_embeddings`:
    small here, so tests cross the switch in a few dozen tokens."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    half_head = config["hidden_size"] // config["num_attention_heads"] // 2
    config["rope_scaling"] = {
        "type": "su",
        "short_factor": [1.0 + 0.25 * n for n in range(half_head)],
        "long_factor": [1.5 + 4.0 * n for n in range(half_head)],
    }
    config["original_max_position_embeddings"] = original_max_position_embeddings
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def copy_with_load_gate(source: Path, target: Path, gate: Path) -> Path:
    """The same model, whose loading waits until something is written to the named pipe
    ``gate`` (made here): a bot that is still starting when questions arrive."""
    shutil.copytree(source, target)
    os.mkfifo(gate)
    config = json.loads((target / "config.json").read_text())
    config["load_gate"] = str(gate)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
