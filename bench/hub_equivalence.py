"""The native Phi-3-vision against the hub's own code: the same processor outputs, the same tokens.

Not a test (it needs the hub repository's files and transformers 4.48 in a venv of its own):

    python -m bench.hub_equivalence --hub-files DIR --hub-python /path/to/hubvenv/bin/python

``DIR`` holds the hub repository's files without weights (config, ``*.py``, processor,
tokenizer; DESIGN.md names a public mirror). This script runs itself a second time under
``--hub-python`` (transformers 4.48.3, huggingface_hub<1, tokenizers<0.22, torch,
torchvision), where the HUB code (``trust_remote_code``) builds random float32 weights,
saves them as the hub checkpoint is saved, and writes its processor outputs and greedy tokens
to files; back here, the native code (``inference.phi3v``) loads that checkpoint from a
directory without any Python file and must match:

(a) ``input_ids``, ``pixel_values`` and ``image_sizes`` of the hub processor, for images from
    1x1 to 4000x300 pixels in both orientations, at num_crops 1, 4 and 16;
(b) the hub model's greedy float32 ``generate`` tokens: text only; 1, 2 and 3 images; a prompt
    past 4,096 tokens (LongRoPE's long factors).

The model is small enough for a CPU: 2 language-model layers 384 wide (head size 96, so the
hub's own 48 LongRoPE factors apply), the hub's vocabulary and tokenizer, and a CLIP ViT-L/14-336
vision tower (1024 wide, 336 pixels, as the hub code requires) cut to 2 layers. Exit status 0
when everything matches.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = (
    (1, 1),
    (2, 1),
    (1, 2),
    (7, 300),
    (300, 7),
    (336, 336),
    (337, 335),
    (500, 672),
    (672, 500),
    (1280, 720),
    (720, 1280),
    (1920, 1080),
    (2000, 3000),
    (4000, 300),
    (300, 4000),
)
NUM_CROPS = (1, 4, 16)
PROMPT = "<|user|>\n{tags}{question}<|end|>\n<|assistant|>\n"
# (name, image sizes, num_crops, question)
GENERATIONS = (
    ("text only", (), 16, "Write a short poem about the sea."),
    ("1 image", ((1280, 720),), 16, "What is shown in this image?"),
    ("2 images", ((1280, 720), (720, 1280)), 4, "What is difference in this two images?"),
    ("3 images", ((500, 672), (4000, 300), (64, 64)), 4, "Compare the three images."),
    ("past 4096 tokens", ((1280, 720),), 16, "Describe every detail you can see. " * 260),
)
NEW_TOKENS = 24
STOP_TOKENS = [32007, 32000]  # <|end|>, <|endoftext|>
SMALL = {
    "num_hidden_layers": 2,
    "hidden_size": 384,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 1024,
    "initializer_range": 0.1,  # logits far enough apart that rounding never flips a greedy pick
}
VISION_LAYERS = 2
HUB_FILES = (
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: every resize, pad and normalisation difference shows."""
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def prompt_for(count: int, question: str) -> str:
    return PROMPT.format(tags="".join(f"<|image_{n}|>\n" for n in range(1, count + 1)), question=question)


def processor_cases() -> list[tuple[str, tuple[int, int], int]]:
    return [(f"{w}x{h}-crops{n}", (w, h), n) for (w, h) in SIZES for n in NUM_CROPS]


# --- the hub side: transformers 4.48 and the hub's code ----------------------------------------


def write_model_dirs(hub_files: Path, work: Path) -> tuple[Path, Path]:
    """``hub-model`` (the hub's code + small config) and ``native-model`` (no Python files)."""
    hub_dir, native_dir = work / "hub-model", work / "native-model"
    for directory in (hub_dir, native_dir):
        directory.mkdir(parents=True, exist_ok=True)
        for name in HUB_FILES:
            if (hub_files / name).is_file():
                shutil.copy(hub_files / name, directory / name)
    for path in hub_files.glob("*.py"):
        shutil.copy(path, hub_dir / path.name)
    config = json.loads((hub_files / "config.json").read_text())
    config.update(SMALL)
    config["_attn_implementation"] = "eager"
    # The native code's vision_config: the CLIP the hub code hard-codes, at its patched depth.
    config["vision_config"] = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": VISION_LAYERS,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    }
    for directory in (hub_dir, native_dir):
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    return hub_dir, native_dir


def hub_side(hub_files: Path, work: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoProcessor
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    hub_dir, native_dir = write_model_dirs(hub_files, work)
    config = AutoConfig.from_pretrained(hub_dir, trust_remote_code=True)
    model_class = get_class_from_dynamic_module("modeling_phi3_v.Phi3VForCausalLM", hub_dir)
    embedding = next(m for name, m in sys.modules.items() if name.endswith("image_embedding_phi3_v"))
    embedding.CLIP_VIT_LARGE_PATCH14_336_CONFIG.num_hidden_layers = VISION_LAYERS  # a CPU-sized tower
    torch.manual_seed(0)
    model = model_class(config).to(torch.float32).eval()
    with torch.no_grad():  # the separators start at zero: random, so their places are tested
        for separator in (model.model.vision_embed_tokens.glb_GN, model.model.vision_embed_tokens.sub_GN):
            separator.normal_(0.0, 1.0)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith(".wte.weight")}
    save_file(state, native_dir / "model.safetensors", metadata={"format": "pt"})

    processor = AutoProcessor.from_pretrained(hub_dir, trust_remote_code=True)
    (work / "processor").mkdir(exist_ok=True)
    for seed, (name, (width, height), num_crops) in enumerate(processor_cases()):
        processor.image_processor.num_crops = num_crops
        out = processor(prompt_for(1, "Describe it."), [picture(width, height, seed)], return_tensors="pt")
        torch.save(
            {key: out[key] for key in ("input_ids", "pixel_values", "image_sizes")},
            work / "processor" / f"{name}.pt",
        )
    results = {}
    for name, sizes, num_crops, question in GENERATIONS:
        processor.image_processor.num_crops = num_crops
        images = [picture(w, h, 1000 + n) for n, (w, h) in enumerate(sizes)]
        inputs = processor(prompt_for(len(images), question), images or None, return_tensors="pt")
        prompt_ids = inputs["input_ids"].clone()  # the hub model edits input_ids in place
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=STOP_TOKENS,
                pad_token_id=32000,
            )
        results[name] = {
            "prompt_ids": prompt_ids[0].tolist(),
            "tokens": out[0, prompt_ids.shape[1] :].tolist(),
            "seconds": time.perf_counter() - started,
        }
    (work / "hub_generate.json").write_text(json.dumps(results))


# --- the native side: transformers 5 and inference.phi3v ---------------------------------------


def native_side(work: Path) -> bool:
    from inference.phi3v import Phi3VProcessor, load_phi3v

    native_dir = work / "native-model"
    assert not list(native_dir.glob("*.py"))
    processor = Phi3VProcessor.from_pretrained(str(native_dir))
    same_ids = same_sizes = 0
    worst = 0.0
    failures: list[str] = []
    cases = processor_cases()
    for seed, (name, (width, height), num_crops) in enumerate(cases):
        hub = torch.load(work / "processor" / f"{name}.pt")
        processor.image_processor.num_crops = num_crops
        ours = processor(prompt_for(1, "Describe it."), [picture(width, height, seed)], return_tensors="pt")
        ids_equal = torch.equal(ours["input_ids"], hub["input_ids"])
        sizes_equal = torch.equal(ours["image_sizes"], torch.as_tensor(hub["image_sizes"]))
        shapes_equal = ours["pixel_values"].shape == hub["pixel_values"].shape
        difference = (
            float((ours["pixel_values"] - hub["pixel_values"]).abs().max()) if shapes_equal else float("inf")
        )
        same_ids += ids_equal
        same_sizes += sizes_equal
        worst = max(worst, difference)
        if not (ids_equal and sizes_equal and difference == 0.0):
            failures.append(f"{name}: ids {ids_equal}, sizes {sizes_equal}, pixels max |diff| {difference}")
    print(
        f"(a) processor, {len(cases)} cases ({len(SIZES)} sizes from 1x1 to 4000x300, both orientations, "
        f"num_crops {'/'.join(map(str, NUM_CROPS))}): input_ids equal {same_ids}/{len(cases)}, "
        f"image_sizes equal {same_sizes}/{len(cases)}, pixel_values max |diff| {worst:g}"
    )
    for failure in failures:
        print("    MISMATCH", failure)

    hub_results = json.loads((work / "hub_generate.json").read_text())
    model, processor = load_phi3v(str(native_dir), dtype=torch.float32, attention="sdpa")
    print("(b) greedy float32 generate, hub code (4.48, eager) vs native (5.x, sdpa):")
    all_equal = not failures
    for name, sizes, num_crops, question in GENERATIONS:
        processor.image_processor.num_crops = num_crops
        images = [picture(w, h, 1000 + n) for n, (w, h) in enumerate(sizes)]
        inputs = processor(prompt_for(len(images), question), images or None, return_tensors="pt")
        hub = hub_results[name]
        ids_equal = inputs["input_ids"][0].tolist() == hub["prompt_ids"]
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=STOP_TOKENS
            )
        tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
        seconds = time.perf_counter() - started
        same = sum(a == b for a, b in zip(tokens, hub["tokens"], strict=False))
        equal = ids_equal and tokens == hub["tokens"]
        all_equal &= equal
        print(
            f"    {name:<17} prompt {inputs['input_ids'].shape[1]:>5} tokens (ids equal: {ids_equal}), "
            f"{same}/{len(hub['tokens'])} answer tokens equal{'' if equal else '  MISMATCH'} "
            f"(hub {hub['seconds']:.0f} s, native {seconds:.0f} s)"
        )
        if not equal:
            print(f"      hub    {hub['tokens']}\n      native {tokens}")
    print("ALL EQUAL" if all_equal else "DIFFERENCES FOUND")
    return all_equal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hub-files", type=Path, required=True, help="the hub repository's files, no weights"
    )
    parser.add_argument("--hub-python", default="python", help="python of a venv with transformers 4.48.3")
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: a temporary one)"
    )
    parser.add_argument("--hub-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.hub_side:
        hub_side(args.hub_files.resolve(), args.work)
        return 0
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="hub-equivalence-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HOME": str(work / "hf-home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    command = [args.hub_python, str(Path(__file__).resolve()), "--hub-side"]
    command += ["--hub-files", str(args.hub_files), "--work", str(work)]
    started = time.perf_counter()
    with open(work / "hub_side.log", "w") as log:
        hub = subprocess.run(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    if hub.returncode != 0:
        print(f"the hub side failed (exit {hub.returncode}); its log: {work / 'hub_side.log'}")
        return 1
    print(f"hub side (transformers 4.48.3, trust_remote_code): {time.perf_counter() - started:.0f} s")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return 0 if native_side(work) else 1


if __name__ == "__main__":
    sys.exit(main())
