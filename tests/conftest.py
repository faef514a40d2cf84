"""Test-wide settings: offline, one torch thread, a private HF cache, and a tiny model."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports transformers: no network, and remote code lands in a temp cache.
_HF_HOME = tempfile.mkdtemp(prefix="seebot-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
for name in ("DISCORD_TOKEN", "MODEL_ID", "DEVICE", "NUM_CROPS", "MAX_NEW_TOKENS", "TEMPERATURE"):
    os.environ.pop(name, None)

import torch  # noqa: E402

torch.set_num_threads(1)  # 2 shared cores: more threads are slower and erratic


@pytest.fixture(scope="session")
def hf_home() -> Iterator[Path]:
    yield Path(_HF_HOME)


LONG_CODE_ANSWER = (
    "Here is a long walk through the code.\n\n"
    + "\n\n".join(
        " ".join([f"Paragraph {n}: the image shows a chart with bars and text."] * 3) for n in range(12)
    )
    + "\n\n```python\n"
    + "\n".join(f"def step_{n}(value):\n    return value * {n}  # multiply" for n in range(70))
    + "\n```\n\nThat is all of it."
)

# What the tiny model answers when the last user turn contains `when` (else: random tokens).
SCRIPT: list[dict] = [
    {"when": "Say hello", "reply": "Hello there, my friend! How are you today?"},
    {"when": "count images", "reply": "I see {images} images."},
    {"when": "what do you see", "reply": "I see {images} images. You asked: {question}"},
    {"when": "slow story", "reply": "once upon a time " * 200, "seconds_per_token": 0.05},
    {"when": "take three seconds", "reply": "thinking " * 30 + "done.", "seconds_per_token": 0.1},
    {"when": "ping everyone", "reply": "Hey @everyone and @here, look at <@1234567890> and <@&42>!"},
    {"when": "long answer please", "reply": LONG_CODE_ANSWER},
    {
        "when": "shown in this chart",
        "reply": "A bar chart of sales by quarter ({images} image); Q4 is highest.",
    },
    {"when": "title and the author", "reply": "The book is ALONE by Morgan Maxwell."},
    {"when": "ramble on", "reply": "and on " * 400},
    {"when": "tell me slowly", "reply": "Slowly, about {question}.", "seconds_per_token": 0.03},
    {"when": "too big for the gpu", "reply": "", "fail": "out_of_memory"},
    {"when": "crash the worker", "reply": "", "fail": "worker_crash"},
    {"when": "Extract all the text", "reply": "ALONE\nMorgan Maxwell"},
    {
        "when": "What is difference",
        "reply": "{images} images: the first team wears red, the second blue. They differ in shirts.",
    },
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-phi3v"), script=SCRIPT)
