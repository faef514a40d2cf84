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


def _median(summary: dict[str, Any] | None) -> str:
    return "" if not summary else f"{summary['median']:.1f}"


def _times(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def fast_path_tables(result: dict[str, Any]) -> str:
    modes = result["modes"]
    parts = [
        f"### HF generate vs the engine ({result['max_new_tokens']} new tokens per request; one "
        f"{result['picture']} picture = {result['prompt_tokens']} prompt tokens, text only = "
        f"{result['text_prompt_tokens']}; MAX_BATCH_SIZE={result['max_batch_size']}, MAX_BATCH_TOKENS="
        f"{result['max_batch_tokens']}; requests arrive at random times)"
    ]
    header = (
        [
            "question",
            "path",
            "ran as",
            "start (s)",
            "warm-up (s)",
            "first token alone, p50 (ms)",
            "decode alone, tokens/s",
            "generate between its requests, tokens/s",
            "vs generate",
        ]
        + [f"tokens/s at {row['concurrency']}" for row in modes[0][result["kinds"][0]]["rows"]]
        + ["generate around each (mean of before and after), tokens/s", "peak GPU memory (GiB)"]
    )
    rows = []
    for kind in result["kinds"]:
        for m in modes:
            part = m[kind]
            decode = part["decode_tokens_per_s"]
            start, warm = m.get("start_s"), m.get("warm_up_s")
            peaks = [r["peak_memory_gib"] for r in part["rows"] if r["peak_memory_gib"] is not None]
            beside = part.get("generate_tokens_per_s_beside") or {}  # engines only
            rows.append(
                [
                    kind,
                    m["mode"],
                    m["decoding"],
                    "" if start is None else f"{start:.1f}",
                    "" if warm is None else f"{warm:.1f}",
                    f"{part['first_piece_s']['median'] * 1000:.0f}",
                    "" if decode is None else f"{decode['median']:.1f}",
                    _median(part.get("generate_decode_tokens_per_s")),
                    _times(part["decode_vs_generate"]),
                ]
                + [_rate(r, part["tokens_per_s_vs_generate"]) for r in part["rows"]]
                + [" / ".join(f"{rate:.0f}" for rate in beside.values())]
                + ["n/a (CPU)" if not peaks else f"{max(peaks):.1f}"]
            )
    parts.append(table(header, rows))
    return "\n\n".join(parts)


def _rate(row: dict[str, Any], versus: dict[str, float]) -> str:
    return f"{row['tokens_per_s']:.0f} ({_times(versus[str(row['concurrency'])])})"


def fast_path_target_lines(result: dict[str, Any], on_gpu: bool) -> list[str]:
    modes = {m["mode"]: m for m in result["modes"]}
    kind = "one image"
    lines = []
    if on_gpu:
        best = modes.get("engine, compiled") or modes["engine, eager"]
        part = best[kind]
        decode = (part["decode_tokens_per_s"] or {}).get("median") or 0.0
        at = {r["concurrency"]: r for r in part["rows"]}
        first = part["first_piece_s"]["median"] * 1000
        lines.append(
            f"- GPU, {best['mode']}, decode alone: {decode:.0f} tokens/s (target >= 170): "
            f"{_verdict(decode >= 170)}"
        )
        for concurrency, target in ((8, 700), (16, 1500)):
            if concurrency in at:
                rate = at[concurrency]["tokens_per_s"]
                lines.append(
                    f"- GPU, {concurrency} concurrent: {rate:.0f} tokens/s (target >= {target}): "
                    f"{_verdict(rate >= target)}"
                )
        lines.append(
            f"- GPU, first token, one picture: {first:.0f} ms (target <= 150 ms): {_verdict(first <= 150)}"
        )
        if 16 in at and at[16]["peak_memory_gib"] is not None:
            peak = at[16]["peak_memory_gib"]
            lines.append(
                f"- GPU, peak memory at 16 concurrent: {peak:.1f} GiB (target <= 30): {_verdict(peak <= 30)}"
            )
        if best.get("warm_up_s") is not None:
            lines.append(f"- GPU, warm-up at start-up: {best['warm_up_s']:.0f} s")
        return lines
    for name in ("engine, eager", "engine, compiled"):
        if name not in modes:
            continue
        ratio = modes[name][kind]["decode_vs_generate"] or 0.0
        lines.append(
            f"- {name}, decode alone (one picture): {ratio:.2f}x generate (target >= 1.5x): "
            f"{_verdict(ratio >= 1.5)}"
        )
        at_8 = modes[name][kind]["tokens_per_s_vs_generate"].get("8")
        if at_8 is not None:
            lines.append(
                f"- {name}, tokens/s at 8 (one picture): {at_8:.2f}x generate one at a time (target >= 3x): "
                f"{_verdict(at_8 >= 3)}"
            )
    if "engine, eager" in modes and "engine, compiled" in modes:
        eager, compiled = (modes[name][kind] for name in ("engine, eager", "engine, compiled"))
        # Each against the generate requests interleaved with it: a phase's drift cancels out.
        ratios = compiled["decode_vs_generate"], eager["decode_vs_generate"]
        rates = compiled["decode_tokens_per_s"]["median"], eager["decode_tokens_per_s"]["median"]
        lines.append(
            f"- compiled vs eager, decode alone (one picture): {ratios[0]:.2f}x vs {ratios[1]:.2f}x "
            f"generate ({rates[0]:.0f} vs {rates[1]:.0f} tokens/s) (target: compiled >= eager): "
            f"{_verdict(ratios[0] >= ratios[1])}"
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
    if "quant" in results:
        from .quant import quant_tables

        parts.append(quant_tables(results["quant"]))
    parts.append("### Targets\n\n" + "\n".join(target_lines(results)))
    return "\n\n".join(parts) + "\n"


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
