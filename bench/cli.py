"""Command line of `python -m bench`: options, an offline environment, the run, the output.

The environment (HF_HOME in a temp dir, offline hub, one torch thread) is set before torch
or transformers is imported, which is why the measurement modules are imported late.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

SECTIONS = ("lag", "overhead", "throughput", "fastpath", "quant")
# Sections run only when named with --only (a soak takes minutes and starts the bot).
EXTRA_SECTIONS = ("soak",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure event-loop lag, bot overhead and throughput; print Markdown tables.",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"), help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument(
        "--model",
        default=None,
        help="model directory or hub id (default: build the tiny offline model in a temp dir)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS + EXTRA_SECTIONS,
        help="run only this measurement (repeatable); soak runs only when named",
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the real model's shapes on CUDA: needs --hub-files; runs HF generate vs the engine "
        "with CUDA graphs unless --only says otherwise",
    )
    parser.add_argument(
        "--hub-files",
        type=Path,
        default=None,
        help="a folder with the hub model's files but no weights (config, remote code, "
        "processor, tokenizer): the model is built from them with random weights",
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="with --hub-files: keep only this many layers (smoke runs)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="fastpath: tokens per answer (default 128, 64 with --quick)",
    )
    args = parser.parse_args(argv)
    if args.gpu:
        if args.hub_files is None:
            parser.error("--gpu needs --hub-files (the hub model's files, without weights)")
        if args.device == "cpu":
            args.device = "cuda"
        args.only = args.only or ["fastpath"]
    if args.hub_files is not None and args.model is not None:
        parser.error("--hub-files and --model are two ways to name the model: give one")
    return args


def prepare_environment(offline: bool) -> Path:
    """A private HF cache (remote code is copied there); no network for the tiny model."""
    hf_home = Path(tempfile.mkdtemp(prefix="seebot-bench-hf-"))
    os.environ["HF_HOME"] = str(hf_home)
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in ("DISCORD_TOKEN", "MODEL_ID", "DEVICE", "NUM_CROPS", "MAX_NEW_TOKENS", "TEMPERATURE"):
        os.environ.pop(name, None)
    return hf_home


async def run(args: argparse.Namespace, sections: tuple[str, ...]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # 2 shared cores: more threads are slower and erratic

    from .fast_path import FastPathConfig, measure_fast_path
    from .loop_lag import LagConfig, measure_loop_lag
    from .machine import machine_info
    from .model import BenchModel, build_tiny
    from .overhead import OverheadConfig, measure_overhead
    from .quant import QuantConfig, measure_quant
    from .random_weights import build_random_weights_model
    from .soak import SoakConfig, measure_soak
    from .throughput import ThroughputConfig, measure_throughput

    real_model = None
    if args.hub_files is not None:
        directory = Path(tempfile.mkdtemp(prefix="seebot-bench-random-"))
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        build_random_weights_model(
            args.hub_files, directory, device=args.device, dtype=dtype, layers=args.layers
        )
        model = BenchModel(str(directory), args.device, tiny=False)
    elif args.model is None:
        model = build_tiny(Path(tempfile.mkdtemp(prefix="seebot-bench-tiny-")), args.device)
        if "fastpath" in sections:  # real prompt lengths for generate vs the engine
            directory = Path(tempfile.mkdtemp(prefix="seebot-bench-tiny-real-"))
            real_model = build_tiny(directory, args.device, real_image_shapes=True)
    else:
        model = BenchModel(args.model, args.device, tiny=False)
    real_model = real_model or model
    quick = args.quick
    on_gpu = args.device.startswith("cuda")
    fast_path = FastPathConfig(
        max_new_tokens=args.max_new_tokens or (64 if quick else 128),
        concurrency=(1, 4, 8, 16),
        requests_per_client=1 if quick else 3,
        alone_runs=2 if quick else 5,
        # On a GPU the engine runs with CUDA graphs (eager decoding is for the CPU and COMPILE=off).
        modes=("engine, compiled",) if on_gpu else ("engine, eager", "engine, compiled"),
    )
    lag = LagConfig(
        generations=2 if quick else 8,
        bursts=1 if quick else 3,
        max_new_tokens=256,
        idle_seconds=0.5 if quick else 2.0,
    )
    overhead = OverheadConfig(runs=3 if quick else 9, max_new_tokens=256)
    throughput = ThroughputConfig(
        max_new_tokens=64, rounds=1 if quick else 8, min_requests=4 if quick else 32
    )
    soak = SoakConfig(
        users=20,
        questions=60 if quick else 200,
        think_seconds=(1.0, 4.0) if quick else (10.0, 26.0),
        failure_rate=0.05,
    )
    results: dict[str, Any] = {
        "machine": machine_info(args.device),
        "config": {
            "model": "tiny (tests.tiny_model, built offline; real image shapes for generate vs the engine)"
            if model.tiny
            else f"random weights from {args.hub_files}" + (f", {args.layers} layers" if args.layers else "")
            if args.hub_files
            else model.model_id,
            "device": args.device,
            "quick": quick,
            "loop_lag": vars(lag),
            "overhead": vars(overhead),
            "throughput": vars(throughput),
            "fast_path": vars(fast_path),
            "soak": vars(soak),
        },
    }
    if "lag" in sections:
        log.info("measuring event-loop lag")
        results["loop_lag"] = await measure_loop_lag(model, lag)
    if "overhead" in sections:
        log.info("measuring bot overhead (starts python -m bot against a fake Discord)")
        results["overhead"] = await measure_overhead(model, overhead)
    if "throughput" in sections:
        log.info("measuring throughput")
        results["throughput"] = await measure_throughput(model, throughput)
    if "fastpath" in sections:
        log.info("measuring HF generate against the engine")
        results["fast_path"] = await measure_fast_path(real_model, fast_path)
    if "soak" in sections:
        if not model.tiny:
            raise SystemExit("the soak runs with the tiny model only (its answers repeat the questions)")
        log.info(
            "soak: %d users ask %d questions through python -m bot and a failing fake Discord",
            soak.users,
            soak.questions,
        )
        results["soak"] = await measure_soak(None, soak)
    if "quant" in sections:
        log.info("measuring QUANTIZE none, 8bit and 4bit")
        quant = QuantConfig(
            max_new_tokens=args.max_new_tokens or (16 if quick else 32),
            requests_per_client=1 if quick else 2,
            ttft_runs=3 if quick else 5,
        )
        results["config"]["quant"] = vars(quant)
        results["quant"] = await measure_quant(model, quant)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    started = time.perf_counter()
    prepare_environment(offline=args.model is None)  # --hub-files: local files, offline too
    sections = tuple(args.only) if args.only else SECTIONS
    results = asyncio.run(run(args, sections))
    results["wall_seconds"] = time.perf_counter() - started

    from .report import render, write_json

    sys.stdout.write(render(results))
    sys.stdout.flush()
    write_json(results, args.out)
    log.info("wrote %s; wall time %.0f s", args.out, results["wall_seconds"])
    return 0
