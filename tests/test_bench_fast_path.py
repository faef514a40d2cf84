"""The bench's generate-vs-engine section on the CPU: the code path `python -m bench --gpu`
runs on a GPU (there: the real shapes, compiled), here on the tiny model, small and eager."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cli import parse_args
from bench.fast_path import FastPathConfig, measure_fast_path
from bench.model import BenchModel
from bench.report import fast_path_tables, fast_path_target_lines
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_gpu_run_options() -> None:
    args = parse_args(["--gpu", "--hub-files", "/somewhere"])
    assert args.device == "cuda" and args.only == ["fastpath"]
    with pytest.raises(SystemExit):
        parse_args(["--gpu"])  # the hub files are needed


async def test_generate_vs_the_engine_table_and_targets(tmp_path: Path) -> None:
    directory = build_tiny_model(tmp_path / "tiny", real_image_shapes=True)
    model = BenchModel(str(directory), "cpu", tiny=True)
    config = FastPathConfig(
        max_new_tokens=4, concurrency=(1, 2), requests_per_client=1, alone_runs=1, modes=("engine, eager",)
    )
    result = await measure_fast_path(model, config)
    assert result["prompt_tokens"] > 2000  # the real processor's numbers: 2,377 for the picture
    assert [m["mode"] for m in result["modes"]] == ["generate", "engine, eager"]
    for mode in result["modes"]:
        for kind in ("one image", "text only"):
            assert [row["concurrency"] for row in mode[kind]["rows"]] == [1, 2]
            assert all(row["tokens"] == 4 * row["requests"] for row in mode[kind]["rows"])
    table = fast_path_tables(result)
    assert "| one image | engine, eager | eager |" in table and "| text only | generate |" in table
    cpu = fast_path_target_lines(result, on_gpu=False)
    assert any("decode alone (one picture)" in line and "target >= 1.5x" in line for line in cpu)
    gpu = fast_path_target_lines(result, on_gpu=True)
    assert any(line.startswith("- GPU, engine, eager, decode alone") for line in gpu)
    assert any("first token, one picture" in line for line in gpu)
