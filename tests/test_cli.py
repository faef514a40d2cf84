"""`python -m inference` as a person runs it: real subprocesses, a tiny native model, drawn images.

The tiny model's answers are its random weights' own greedy tokens: the CLI must print exactly
what HF ``generate`` says on the same native model, with no code from the hub and no warning.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from inference.conversation import Conversation, build_prompt
from inference.loading import load_model
from inference.prompt_inputs import default_num_crops
from inference.settings import InferenceSettings
from tests.synthetic_images import save_all

ROOT = Path(__file__).resolve().parent.parent
ANSWER_TOKENS = 12
# transformers' progress bar while it reads the weights: the only thing a normal run prints.
PROGRESS_BAR = re.compile(r"^Loading weights: +\d+%\|.*\|.*\]$")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_all(tmp_path_factory.mktemp("pictures"))


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "inference", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def oracle(model_dir: Path, question: str, image_paths: list[Path], max_new_tokens: int) -> str:
    """HF generate's greedy answer on the native model, for the prompt the CLI builds."""
    loaded = load_model(InferenceSettings(model_id=str(model_dir), device="cpu"))
    images = [Image.open(path).convert("RGB") for path in image_paths]
    loaded.processor.image_processor.num_crops = default_num_crops(len(images))
    prompt = build_prompt(Conversation.single(question, images))
    inputs = loaded.processor(prompt, images or None, return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=loaded.stop_token_ids
        )
    return loaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<dir>/tiny`` (the tiny model), ``tiny-no-weights`` (no safetensors) and ``tiny-renamed``
    (a weight under another name)."""
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(tiny_model_dir, root / "tiny")
    shutil.copytree(tiny_model_dir, root / "tiny-no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(tiny_model_dir, root / "tiny-renamed")
    weights = load_file(root / "tiny-renamed" / "model.safetensors")
    weights["model.norm.scale"] = weights.pop("model.norm.weight")
    save_file(weights, root / "tiny-renamed" / "model.safetensors", metadata={"format": "pt"})
    return root / "tiny"


def noise(stderr: str) -> list[str]:
    """What stderr holds besides the weights' progress bar."""
    return [part for part in re.split(r"[\r\n]+", stderr) if part.strip() and not PROGRESS_BAR.match(part)]


@pytest.mark.parametrize(
    ("images", "question"),
    [
        (["chart.png"], "What is shown in this chart?"),
        (["cover.jpg"], "What is the title and the author of this book?"),
        (["team1.jpg", "team2.jpg"], "What is difference in this two images?"),
        ([], "Tell me a joke."),
    ],
    ids=["analyse-chart", "read-book-cover", "compare-teams", "no-image"],
)
def test_the_cli_answers_as_hf_generate_on_the_native_model_with_no_remote_code_and_no_warnings(
    images: list[str],
    question: str,
    pictures: dict[str, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    paths = [pictures[name] for name in images]
    hf_home = tmp_path / "hf-home"
    result = run_cli(
        *map(str, paths),
        "--question",
        question,
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--max-new-tokens",
        str(ANSWER_TOKENS),
        cwd=tmp_path,
        env={"HF_HOME": str(hf_home)},
    )
    assert result.returncode == 0, result.stderr
    expected = oracle(tiny_model_dir, question, paths, ANSWER_TOKENS)
    assert expected.strip()
    assert result.stdout.strip() == expected.strip()
    assert noise(result.stderr) == []
    assert not (hf_home / "modules" / "transformers_modules").exists()


def test_model_and_device_come_from_the_environment(
    pictures: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = [str(pictures["chart.png"]), "--question", "Say hello", "--max-new-tokens", "5"]
    from_env = run_cli(*args, cwd=tmp_path, env={"MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu"})
    from_args = run_cli(*args, "--model", str(tiny_model_dir), "--device", "cpu", cwd=tmp_path)
    assert from_env.returncode == 0 and from_args.returncode == 0, from_env.stderr + from_args.stderr
    assert from_env.stdout == from_args.stdout and from_env.stdout.strip()


def test_max_new_tokens_limits_the_answer(
    pictures: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = run_cli(
        str(pictures["cover.jpg"]),
        "--question",
        "Tell me a story",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    expected = oracle(tiny_model_dir, "Tell me a story", [pictures["cover.jpg"]], 3)
    assert result.stdout.strip() == expected.strip()


@pytest.mark.parametrize(
    ("make_args", "code", "message"),
    [
        (lambda p, m: ["missing.png", "--question", "hi", "--model", m], 1, "image not found: missing.png"),
        (lambda p, m: [str(p["notes"]), "--question", "hi", "--model", m], 1, "cannot read image"),
        (
            lambda p, m: [str(p["chart.png"]), "-q", "hi", "--model", m + "-gone", "--device", "cpu"],
            1,
            "cannot load model",
        ),
        (lambda p, m: [str(p["chart.png"]), "--model", m], 2, "no question"),
        (
            lambda p, m: [str(p["chart.png"]), "-q", "hi", "--model", m, "--device", "gpu"],
            2,
            "DEVICE must be",
        ),
        (
            lambda p, m: [str(p["chart.png"]), "-q", "hi", "--model", m + "-no-weights", "--device", "cpu"],
            1,
            "safetensors",
        ),
        (
            lambda p, m: [str(p["chart.png"]), "-q", "hi", "--model", m + "-renamed", "--device", "cpu"],
            1,
            "does not match its config.json",
        ),
    ],
    ids=[
        "missing-image",
        "not-an-image",
        "bad-model",
        "no-question",
        "bad-device",
        "no-weights",
        "wrong-keys",
    ],
)
def test_mistakes_give_one_line_and_a_nonzero_exit(
    make_args, code: int, message: str, pictures: dict[str, Path], broken_models: Path, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    result = run_cli(*make_args({**pictures, "notes": notes}, str(broken_models)), cwd=tmp_path)
    assert result.returncode == code
    assert result.stdout == ""
    lines = noise(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
