"""The native Phi-3-vision model: loaded by ``load_model`` from the hub's file layout, answering
through HF ``generate`` with 0 to 3 images, LongRoPE per row, and one clear line for a
checkpoint it cannot load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from inference.conversation import Conversation, build_prompt
from inference.engine import ModelLoadError
from inference.loading import LoadedModel, load_model
from inference.phi3v import LongRopeRotaryEmbedding, Phi3VConfig, Phi3VForCausalLM
from inference.settings import InferenceSettings
from tests.tiny_model import build_tiny_model, copy_with_longrope, hub_state_dict

SWITCH = 64  # original_max_position_embeddings of the LongRoPE copy: crossed in a few tokens
HUB_PARAMETERS = 4_146_621_440  # the hub index's total_size / 2 (bf16)
HUB_KEYS = 592


def load(directory: Path, **settings: object) -> LoadedModel:
    return load_model(InferenceSettings(model_id=str(directory), device="cpu", **settings))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    return load(tiny_model_dir)


@pytest.fixture(scope="module")
def longrope(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load(copy_with_longrope(tiny_model_dir, tmp_path_factory.mktemp("longrope") / "tiny", SWITCH))


def pictures(count: int) -> list[Image.Image]:
    sizes = [(1280, 720), (300, 900), (64, 64)]
    colours = [(200, 30, 30), (20, 160, 40), (250, 250, 250)]
    return [Image.new("RGB", sizes[n], colours[n]) for n in range(count)]


def encode(loaded: LoadedModel, question: str, images: list[Image.Image], num_crops: int = 4) -> dict:
    loaded.processor.image_processor.num_crops = num_crops
    prompt = build_prompt(Conversation.single(question, images))
    return dict(loaded.processor(prompt, images or None, return_tensors="pt"))


def greedy(loaded: LoadedModel, inputs: dict, tokens: int = 8) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs, max_new_tokens=tokens, do_sample=False, eos_token_id=loaded.stop_token_ids
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_the_checkpoint_is_in_the_hubs_layout_with_no_code(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and "auto_map" not in config
    assert config["vision_config"]["image_size"] == 28
    assert not list(tiny_model_dir.glob("*.py"))
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.qkv_proj.weight",
        "model.layers.1.mlp.gate_up_proj.weight",
        "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.1.self_attn.q_proj.weight",
        "model.vision_embed_tokens.img_processor.vision_model.post_layernorm.weight",
        "model.vision_embed_tokens.glb_GN",
        "model.vision_embed_tokens.sub_GN",
        "model.vision_embed_tokens.img_projection.0.weight",
        "model.vision_embed_tokens.img_projection.2.bias",
    } <= keys
    assert not [key for key in keys if "wte" in key]  # the token embedding is stored once


def hub_config(**changes: object) -> dict:
    """Phi-3-vision-128k-instruct's config.json (its LongRoPE factors shortened to made-up ones)."""
    config = {
        "architectures": ["Phi3VForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig"},
        "model_type": "phi3_v",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "hidden_act": "silu",
        "hidden_size": 3072,
        "img_processor": {
            "image_dim_out": 1024,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
        },
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "long_factor": [1.0 + n for n in range(48)],
            "short_factor": [1.0 + n / 48 for n in range(48)],
            "type": "su",
        },
        "rope_theta": 10000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
        "_attn_implementation": "flash_attention_2",
    }
    config.update(changes)
    return config


@pytest.mark.parametrize(
    "changes",
    [{}, {"pad_token_id": 32000, "rope_scaling": {**hub_config()["rope_scaling"], "type": "longrope"}}],
    ids=["Phi-3-vision-128k", "Phi-3.5-vision-style"],
)
def test_the_hub_configs_give_the_hubs_model(changes: dict) -> None:
    config = Phi3VConfig(**hub_config(**changes))
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["original_max_position_embeddings"] == 4096
    assert config.pad_token_id == 32000
    assert config._attn_implementation != "flash_attention_2"  # the loader chooses
    vision = config.vision_config  # CLIP ViT-L/14-336, which the hub code hard-codes
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (
        1024,
        24,
        336,
        14,
    )
    assert vision.hidden_act == "quick_gelu" and config.img_processor["image_dim_out"] == 1024
    with torch.device("meta"):
        weights = hub_state_dict(Phi3VForCausalLM(config))
    assert len(weights) == HUB_KEYS
    assert sum(tensor.numel() for tensor in weights.values()) == HUB_PARAMETERS
    assert weights["model.vision_embed_tokens.img_projection.0.weight"].shape == (3072, 4096)


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_hf_generate_answers_with_0_to_3_images(tiny: LoadedModel, count: int) -> None:
    images = pictures(count)
    inputs = encode(tiny, "What is shown in these images?", images)
    assert int((inputs["input_ids"] < 0).sum()) == sum(
        tiny.processor.num_image_tokens(*i.size) for i in images
    )
    answer = greedy(tiny, inputs)
    assert len(answer) == 8 and not set(answer) & set(tiny.stop_token_ids)
    assert all(0 <= token < len(tiny.tokenizer) for token in answer)
    assert tiny.tokenizer.decode(answer, skip_special_tokens=True).strip()
    assert greedy(tiny, inputs) == answer  # deterministic


def test_the_images_change_the_answer(tiny: LoadedModel) -> None:
    first = encode(tiny, "Describe it.", [Image.new("RGB", (300, 200), (255, 0, 0))])
    second = encode(tiny, "Describe it.", [Image.new("RGB", (300, 200), (0, 0, 255))])
    assert first["input_ids"].tolist() == second["input_ids"].tolist()
    with torch.inference_mode():
        logits = [tiny.model(**inputs).logits[0, -1] for inputs in (first, second)]
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_embed_prompt_batches_rows_like_alone_and_leaves_input_ids_alone(
    tiny: LoadedModel, side: str
) -> None:
    tokenizer = tiny.tokenizer
    rows = [
        ("<|user|>\n<|image_1|>\nOne?<|end|>\n<|assistant|>\n", pictures(1)),
        ("<|user|>\nNo image<|end|>\n", []),
    ]
    rows.append(("<|user|>\n<|image_1|>\n<|image_2|>\nTwo?<|end|>\n<|assistant|>\n", pictures(3)[1:]))
    tiny.processor.image_processor.num_crops = 4
    before, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        batch = tiny.processor([text for text, _ in rows], [i for _, images in rows for i in images])
    finally:
        tokenizer.padding_side = before
    ids = batch["input_ids"].clone()
    with torch.inference_mode():
        embeds = tiny.model.embed_prompt(batch["input_ids"], batch["pixel_values"], batch["image_sizes"])
        assert torch.equal(batch["input_ids"], ids)
        for row, (text, images) in enumerate(rows):
            alone = tiny.processor(text, images or None)
            expected = tiny.model.embed_prompt(
                alone["input_ids"], alone.get("pixel_values"), alone.get("image_sizes")
            )
            real = batch["attention_mask"][row].bool()
            assert torch.allclose(embeds[row, real], expected[0], atol=1e-6)


def test_loads_from_a_sharded_index_and_from_bf16_weights(
    tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sharded_dir = build_tiny_model(tmp_path_factory.mktemp("sharded"), shards=3)
    assert len(list(sharded_dir.glob("model-*-of-*.safetensors"))) >= 2
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    bf16_dir = build_tiny_model(tmp_path_factory.mktemp("bf16"), dtype=torch.bfloat16)
    inputs = encode(tiny, "Describe it.", pictures(1))
    with torch.inference_mode():
        expected = tiny.model(**inputs).logits
        sharded = load(sharded_dir)
        assert torch.equal(sharded.model(**inputs).logits, expected)
        halved = load(bf16_dir)
        assert halved.model.dtype == torch.float32  # DTYPE=auto on the CPU
        assert torch.allclose(halved.model(**inputs).logits, expected, atol=0.5)
    assert greedy(sharded, inputs) == greedy(tiny, inputs)


def test_nothing_from_the_hub_runs(tiny: LoadedModel, hf_home: Path) -> None:
    assert type(tiny.model) is Phi3VForCausalLM and tiny.kind == "phi3v"
    assert tiny.attention == "sdpa"
    assert isinstance(tiny.model.model.rotary_emb, LongRopeRotaryEmbedding)
    assert not (hf_home / "modules" / "transformers_modules").exists()


def test_longrope_is_transformers_for_one_row_and_chosen_per_row(longrope: LoadedModel) -> None:
    config = longrope.model.config
    ours = longrope.model.model.rotary_emb
    theirs = Phi3RotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    short, long = torch.arange(SWITCH)[None], torch.arange(SWITCH + 5)[None]
    for positions in (short, long):
        for mine, reference in zip(ours(x, positions), theirs(x, positions), strict=True):
            assert torch.equal(mine, reference)
    # A batch of a short row (left-padded) and a long one: each row gets its own factors.
    padded_short = torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)
    batch_cos, _ = ours(x, torch.cat([padded_short, long]))
    assert torch.equal(batch_cos[0, 5:], ours(x, short)[0][0])
    assert torch.equal(batch_cos[1], ours(x, long)[0][0])
    assert not torch.equal(ours(x, short)[0][0, 1], ours(x, long)[0][0, 1])  # the factors differ


@pytest.mark.parametrize("prompt_words", [4, 80], ids=["crossing-the-switch", "past-the-switch"])
def test_generate_across_the_longrope_switch_keeps_its_cache(
    longrope: LoadedModel, prompt_words: int
) -> None:
    # Greedy generate with the cache == greedy by recomputing the whole sequence each step (the
    # factors a position gets depend only on the row's length so far, as in the hub model).
    inputs = encode(longrope, " ".join(["picture"] * prompt_words), pictures(1), num_crops=1)
    length = inputs["input_ids"].shape[1]
    assert (length < SWITCH) == (prompt_words == 4)
    tokens = SWITCH + 12 - length if length < SWITCH else 8
    answer = greedy(longrope, inputs, tokens)
    ids = inputs["input_ids"]
    recomputed: list[int] = []
    with torch.inference_mode():
        for _ in range(tokens):
            step = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            recomputed.append(int(longrope.model(**step).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[recomputed[-1]]])], dim=1)
            if recomputed[-1] in longrope.stop_token_ids:
                break
    if length >= SWITCH:
        assert answer == recomputed
    else:  # crossing: the cached keys before the switch keep their short factors (the hub's way)
        assert len(answer) == tokens and answer[: SWITCH - length] == recomputed[: SWITCH - length]


def test_an_unknown_model_id_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        load(tmp_path / "no-such-model")
    message = str(error.value)
    assert "\n" not in message and "no-such-model" in message and "MODEL_ID" in message


def test_a_directory_without_weights_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelLoadError) as error:
        load(empty)
    message = str(error.value)
    assert "\n" not in message and "safetensors" in message and str(empty) in message


def test_a_checkpoint_whose_keys_do_not_match_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_model_dir, renamed)
    weights = load_file(renamed / "model.safetensors")
    weights["model.vision_embed_tokens.glb_separator"] = weights.pop("model.vision_embed_tokens.glb_GN")
    save_file(weights, renamed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as error:
        load(renamed)
    message = str(error.value)
    assert "\n" not in message and "does not match" in message
    assert "model.vision_embed_tokens.glb_GN" in message and "glb_separator" in message


def test_a_checkpoint_of_another_shape_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-shape"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 32
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as error:
        load(other)
    assert "\n" not in str(error.value) and "does not match" in str(error.value)


def test_an_architecture_neither_path_runs_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_model_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "phi9_hologram"
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as error:
        load(unknown)
    assert "\n" not in str(error.value) and "phi9_hologram" in str(error.value)


def test_a_hub_id_loads_from_the_hub_cache_offline_at_a_pinned_revision(tiny_model_dir: Path) -> None:
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(constants.HF_HUB_CACHE) / "models--seebot-tests--tiny-phi3v"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    latest = load_model(InferenceSettings(model_id="seebot-tests/tiny-phi3v", device="cpu"))
    pinned = load_model(
        InferenceSettings(model_id="seebot-tests/tiny-phi3v", model_revision=commit, device="cpu")
    )
    assert type(latest.model) is Phi3VForCausalLM and type(pinned.model) is Phi3VForCausalLM
    with pytest.raises(ModelLoadError, match="seebot-tests/tiny-phi3v"):
        load_model(InferenceSettings(model_id="seebot-tests/tiny-phi3v", model_revision="v9", device="cpu"))


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_the_random_weights_say_only_whole_printable_text(tiny: LoadedModel, sampled: bool) -> None:
    inputs = encode(tiny, "Tell me everything.", pictures(1))
    torch.manual_seed(7)
    with torch.inference_mode():
        out = tiny.model.generate(
            **inputs, max_new_tokens=48, do_sample=sampled, temperature=1.5 if sampled else None, top_k=0
        )
    answer = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(answer) == 48
    special = set(tiny.tokenizer.all_special_ids)
    for token in answer:
        text = tiny.tokenizer.decode([token])
        assert token < len(tiny.tokenizer) and token not in special
        assert text and "\ufffd" not in text and all(c.isprintable() or c in "\n\t" for c in text)
