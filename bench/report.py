"""Markdown tables and target lines from the measured numbers (stdout), and the JSON file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _s(value: float) -> str:
    return f"{value:.3f}"


def loop_lag_table(result: dict[str, Any]) -> str:
    rows = []
    for phase in result["phases"]:
        lag = phase["lag_ms"]
        name = f"{phase['phase']} ({phase['seconds']:.1f} s)"
        rows.append([name, f"{lag['count']:.0f}", _ms(lag["p50"]), _ms(lag["p99"]), _ms(lag["max"])])
    header = ["event loop while", "ticks", "lag p50 (ms)", "lag p99 (ms)", "lag max (ms)"]
    return f"### Event-loop lag ({result['tick_ms']:.0f} ms ticker)\n\n" + table(header, rows)


def overhead_table(result: dict[str, Any]) -> str:
    def row(name: str, key: str) -> list[str]:
        values = result[key]
        return [name, _s(values["median"]), _s(values["p95"]), _s(values["min"]), _s(values["max"])]

    rows = [
        row("engine alone: whole answer", "engine_alone_s"),
        row("through the bot: user message -> final content", "through_bot_s"),
        row("engine alone: first piece", "engine_first_piece_s"),
        row("through the bot: user message -> first message", "first_discord_message_s"),
    ]
    body = table(["measure", "median (s)", "p95 (s)", "min (s)", "max (s)"], rows)
    lines = [
        f"### Bot overhead ({result['runs']} runs, `python -m bot` + fake Discord vs LocalEngine)",
        "",
        body,
        "",
        f"Overhead (median bot - median engine): {result['overhead_s'] * 1000:.0f} ms = "
        f"{result['overhead_percent']:.1f}% of the engine's {result['engine_alone_s']['median']:.2f} s.",
    ]
    gaps = result.get("heartbeat_gap_ms")
    if gaps:
        lines.append(
            f"Bot heartbeats every {result['heartbeat_interval_ms']} ms: gap p99 {gaps['p99']:.0f} ms, "
            f"max {gaps['max']:.0f} ms over {gaps['count'] + 1:.0f} heartbeats."
        )
    return "\n".join(lines)


def throughput_table(result: dict[str, Any]) -> str:
    speedups = result["batched_speedup_tokens_per_s"]
    rows = []
    for r in result["rows"]:
        speedup = "1.00x" if r["max_batch_size"] == 1 else f"{speedups[str(r['concurrency'])]:.2f}x"
        rows.append(
            [
                r["mode"],
                str(r["max_batch_size"]),
                str(r["concurrency"]),
                str(r["requests"]),
                f"{r['tokens_per_s']:.0f}",
                f"{r['requests_per_s']:.2f}",
                _s(r["latency_p50_s"]),
                _s(r["latency_p95_s"]),
                speedup,
            ]
        )
    header = [
        "mode",
        "MAX_BATCH_SIZE",
        "concurrent",
        "requests",
        "tokens/s",
        "requests/s",
        "latency p50 (s)",
        "latency p95 (s)",
        "tokens/s vs one at a time",
    ]
    title = f"### Throughput ({result['max_new_tokens']} new tokens per request, one small image)"
    return title + "\n\n" + table(header, rows)


def _times(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def fast_path_tables(result: dict[str, Any]) -> str:
    modes = result["modes"]
    alone = []
    for m in modes:
        decode = m["decode_tokens_per_s"]
        warm = m["warm_up_s"]
        alone.append(
            [
                m["mode"],
                m["decoding"],
                f"{m['start_s']:.1f}",
                "" if warm is None else f"{warm:.1f}",
                f"{m['first_piece_s']['median'] * 1000:.0f}",
                "" if decode is None else f"{decode['median']:.1f}",
                _times(m["decode_vs_plain"]),
            ]
        )
    header = [
        "path",
        "ran as",
        "start (s)",
        "warm-up (s)",
        "first piece alone, p50 (ms)",
        "decode tokens/s alone, p50",
        "decode vs plain",
    ]
    load = []
    for m in modes:
        for row in m["rows"]:
            peak = row["peak_memory_gib"]
            load.append(
                [
                    m["mode"],
                    str(row["concurrency"]),
                    str(row["requests"]),
                    f"{row['tokens_per_s']:.0f}",
                    _times(m["tokens_per_s_vs_plain"][str(row["concurrency"])]),
                    _s(row["first_piece_p50_s"]),
                    _s(row["latency_p50_s"]),
                    "n/a (CPU)" if peak is None else f"{peak:.1f}",
                ]
            )
    load_header = [
        "path",
        "concurrent",
        "requests",
        "tokens/s",
        "vs plain",
        "first piece p50 (s)",
        "latency p50 (s)",
        "peak GPU memory (GiB)",
    ]
    title = (
        f"### Plain vs fast path ({result['max_new_tokens']} new tokens per request, one "
        f"{result['picture']} picture = {result['prompt_tokens']} prompt tokens, MAX_BATCH_SIZE="
        f"{result['max_batch_size']}, MAX_BATCH_TOKENS={result['max_batch_tokens']}; requests "
        "arrive at random times)"
    )
    return "\n\n".join([title, table(header, alone), table(load_header, load)])


def fast_path_target_lines(result: dict[str, Any], on_gpu: bool) -> list[str]:
    modes = {m["mode"]: m for m in result["modes"]}
    best = modes["fast, compiled"]
    lines = []
    if on_gpu:
        decode = (best["decode_tokens_per_s"] or {}).get("median") or 0.0
        ratio = best["decode_vs_plain"] or 0.0
        at_8 = next((r for r in best["rows"] if r["concurrency"] == 8), None)
        at_16 = next((r for r in best["rows"] if r["concurrency"] == 16), None)
        first = best["first_piece_s"]["median"] * 1000
        lines.append(
            f"- Fast path decode alone: {decode:.0f} tokens/s = {ratio:.1f}x plain "
            f"(target >= 170 and >= 10x): {_verdict(decode >= 170 and ratio >= 10)}"
        )
        if at_8:
            lines.append(
                f"- Fast path at 8 concurrent: {at_8['tokens_per_s']:.0f} tokens/s "
                f"(target >= 700): {_verdict(at_8['tokens_per_s'] >= 700)}"
            )
        lines.append(
            f"- First token, one picture: {first:.0f} ms (target <= 150 ms): {_verdict(first <= 150)}"
        )
        if at_16 and at_16["peak_memory_gib"] is not None:
            peak = at_16["peak_memory_gib"]
            lines.append(
                f"- Peak memory at 16 concurrent: {peak:.1f} GiB (target <= 30): {_verdict(peak <= 30)}"
            )
    for name in ("fast, eager", "fast, compiled"):
        ratios = modes[name]["tokens_per_s_vs_plain"]
        worst = min(ratios.values())
        decode = modes[name]["decode_vs_plain"]
        lines.append(
            f"- {name} vs plain: decode alone {_times(decode)}, tokens/s "
            + ", ".join(f"{_times(r)} at {c}" for c, r in ratios.items())
            + f" (target: not slower): {_verdict(worst >= 1.0 and (decode or 0) >= 1.0)}"
        )
    return lines


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def target_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    lag = results.get("loop_lag")
    if lag:
        lines.append(
            f"- Event-loop lag p99 during generation (worst phase): "
            f"{lag['worst_p99_ms_during_generation']:.2f} ms "
            f"(target < {lag['target_p99_ms']:.0f} ms): {_verdict(lag['target_met'])}"
        )
    overhead = results.get("overhead")
    if overhead:
        lines.append(
            f"- Bot overhead: {overhead['overhead_s'] * 1000:.0f} ms = {overhead['overhead_percent']:.1f}% "
            f"of a {overhead['engine_alone_s']['median']:.2f} s generation "
            f"(target < {overhead['target_overhead_percent']:.0f}%): {_verdict(overhead['target_met'])}"
        )
    throughput = results.get("throughput")
    if throughput:
        rows = {(r["max_batch_size"] > 1, r["concurrency"]): r for r in throughput["rows"]}
        single, batched = rows[(False, 8)], rows[(True, 8)]
        lines.append(
            f"- Batched throughput at 8 concurrent: {batched['tokens_per_s']:.0f} tokens/s vs "
            f"{single['tokens_per_s']:.0f} one at a time = "
            f"{throughput['batched_speedup_tokens_per_s']['8']:.2f}x "
            f"(target >= {throughput['target_speedup_at_8']:.0f}x): {_verdict(throughput['target_met'])}"
        )
    fast = results.get("fast_path")
    if fast:
        lines += fast_path_target_lines(fast, str(results["machine"]["device"]).startswith("cuda"))
    soak = results.get("soak")
    if soak:
        from .soak import soak_target_line

        lines.append(soak_target_line(soak))
    return lines


def render(results: dict[str, Any]) -> str:
    parts = []
    machine = results["machine"]
    parts.append(
        f"## Benchmark ({machine['cpu_count']} CPUs, torch {machine['torch']}, device "
        f"{machine['device']}{', ' + machine['gpu'] if machine.get('gpu') else ''}, "
        f"model {results['config']['model']}, wall {results['wall_seconds']:.0f} s)"
    )
    if "loop_lag" in results:
        parts.append(loop_lag_table(results["loop_lag"]))
    if "overhead" in results:
        parts.append(overhead_table(results["overhead"]))
    if "throughput" in results:
        parts.append(throughput_table(results["throughput"]))
    if "fast_path" in results:
        parts.append(fast_path_tables(results["fast_path"]))
    if "soak" in results:
        from .soak import soak_table

        parts.append(soak_table(results["soak"]))
    parts.append("### Targets\n\n" + "\n".join(target_lines(results)))
    return "\n\n".join(parts) + "\n"


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
