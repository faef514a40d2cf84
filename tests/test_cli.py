"""`python -m inference` as a person runs it: real subprocesses, a tiny model, drawn images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.synthetic_images import save_all

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize(
    ("images", "question", "answer"),
    [
        (
            ["chart.png"],
            "What is shown in this chart?",
            "A bar chart of sales by quarter (1 image); Q4 is highest.",
        ),
        (
            ["cover.jpg"],
            "What is the title and the author of this book?",
            "The book is ALONE by Morgan Maxwell.",
        ),
        (
            ["team1.jpg", "team2.jpg"],
            "What is difference in this two images?",
            "2 images: the first team wears red, the second blue. They differ in shirts.",
        ),
    ],
    ids=["analyse-chart", "read-book-cover", "compare-teams"],
)
def test_the_cookbooks_three_scenarios(
    images: list[str],
    question: str,
    answer: str,
    pictures: dict[str, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    paths = [str(pictures[name]) for name in images]
    result = run_cli(
        *paths, "--question", question, "--model", str(tiny_model_dir), "--device", "cpu", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == answer + "\n"


def test_model_and_device_come_from_the_environment(
    pictures: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    result = run_cli(
        str(pictures["chart.png"]),
        "--question",
        "Say hello",
        cwd=tmp_path,
        env={"MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello there, my friend! How are you today?\n"


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
    assert 0 < len(result.stdout.strip()) < 60


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
    ],
    ids=["missing-image", "not-an-image", "bad-model", "no-question", "bad-device"],
)
def test_mistakes_give_one_line_and_a_nonzero_exit(
    make_args, code: int, message: str, pictures: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    result = run_cli(*make_args({**pictures, "notes": notes}, str(tiny_model_dir)), cwd=tmp_path)
    assert result.returncode == code
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]


def test_the_fast_path_gives_the_same_answer(
    pictures: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # An unscripted question: the tiny model's own (random-weight) greedy answer, 20 tokens.
    args = [str(pictures["chart.png"]), "--question", "Tell me a story", "--max-new-tokens", "20"]
    settings = {"MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu"}
    plain = run_cli(*args, cwd=tmp_path, env={**settings, "FAST_PATH": "off"})
    fast = run_cli(*args, cwd=tmp_path, env={**settings, "FAST_PATH": "on", "LOG_LEVEL": "INFO"})
    assert plain.returncode == 0 and fast.returncode == 0, plain.stderr + fast.stderr
    assert len(plain.stdout.strip()) > 20
    assert fast.stdout == plain.stdout
