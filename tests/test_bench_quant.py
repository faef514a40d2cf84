"""The bench's QUANTIZE section on the CPU, small: one engine per setting on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cli import parse_args
from bench.model import BenchModel
from bench.quant import QuantConfig, measure_quant, quant_tables
from tests.tiny_model import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_gpu_run_options_for_the_quant_section() -> None:
    args = parse_args(["--gpu", "--hub-files", "/somewhere", "--only", "quant"])
    assert args.device == "cuda" and args.only == ["quant"]


async def test_none_8bit_4bit_table(tmp_path: Path) -> None:
    model = BenchModel(str(build_tiny_model(tmp_path / "tiny")), "cpu", tiny=True)
    result = await measure_quant(model, QuantConfig(max_new_tokens=4, requests_per_client=1, ttft_runs=1))
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["none", "8bit", "4bit"]
    assert rows["none"]["weight_bytes"] > rows["8bit"]["weight_bytes"] > rows["4bit"]["weight_bytes"]
    assert {row["kv_bytes_per_token"] for row in rows.values()} == {1024}  # QUANTIZE leaves the cache
    assert all(row["tokens_per_s_1"] > 0 and row["tokens_per_s_8"] > 0 for row in rows.values())
    table = quant_tables(result)
    assert "| `4bit` | 2.9 GiB |" in table  # the real shapes' weights, in the GPU table
