"""Engine benchmark: glimp's overheads on a pair (the tiny one unless --pair), as ratios measured in one run.

Run from the repo root: `python bench/engine.py [questions.jsonl] [--questions 5] [--offset 0] [--max-tokens 256]`.
Every figure is a ratio of two timings taken in this same process, so a busy machine slows both sides.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
from pathlib import Path
from time import perf_counter

import llama_cpp
import numpy as np
from rich.console import Console
from rich.table import Table

from glimp_cli.config import load_registry
from glimp_cli.engine import Engine
from glimp_cli.policies import LARGE, SMALL, always_large, threshold
from glimp_cli.questions import load_questions

from common import DEFAULT_DATA, progress_for

progress = progress_for("bench/engine.py")

DECODE_TOKENS = 128  # per model and per measurement: contexts of prompt .. prompt+128, like a trace's
# Timings on a shared machine come with bursts (other jobs' threads take our cores): every timed run
# is repeated and the fastest kept, and per-token costs are medians.
REPEATS = 2


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="GSM8K-style JSON Lines file")
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--pair", default="tiny", help="pair of models.yaml (default: tiny, the pair bench/README.md reports)")
    return p.parse_args()


def measure_decode(backend, prompt: list[int], n: int = DECODE_TOKENS) -> list[float]:
    """Seconds per token of a greedy decode loop through the backend API, from a cold context."""
    backend.rewind(0)
    backend.extend(prompt)
    times = []
    for _ in range(n):
        t0 = perf_counter()
        backend.extend((int(np.argmax(backend.next_logits())),))
        times.append(perf_counter() - t0)
    return times


def raw_generate(llm: llama_cpp.Llama, prompt: list[int], n: int) -> float:
    """Seconds for raw llama-cpp-python to prefill `prompt` cold and greedily generate `n` tokens.

    The fairest raw baseline is the bare `Llama.eval` loop with argmax of the last logits: the same
    llama.cpp calls glimp makes (one eval per generated token, EOS ignored), with none of glimp's own
    work, so the ratio is glimp's overhead alone. `create_completion` would add its own per-token
    sampling, detokenizing and stop checks, i.e. time a different loop.
    """
    n_vocab = llm.n_vocab()
    t0 = perf_counter()
    llm.reset()  # cold: the next eval drops every KV entry and pays the whole prompt prefill
    llm.eval(prompt)
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
        llm.eval([int(np.argmax(logits))])
    return perf_counter() - t0


def run_glimp(engine: Engine, router, question: str, repeats: int):
    """The fastest of `repeats` glimp-mode traces, each from cold contexts of both models (greedy: same steps)."""
    traces = []
    for _ in range(repeats):
        for backend in engine.backends.values():
            backend.rewind(0)
        traces.append(router.run(question).run())
    return min(traces, key=lambda t: t.wall_seconds)


def run_large_pair(engine: Engine, router, question: str) -> tuple[float, float, int]:
    """Large-alone trace vs raw generation of its N tokens, timed in ABBA order; returns the fastest of each and N."""
    large = engine.backends[LARGE]
    prompt = router._sides[LARGE].prompt_tokens(question)

    def glimp() -> tuple[float, int]:
        large.rewind(0)  # cold, like the raw run
        t0 = perf_counter()
        trace = router.run(question).run()
        return perf_counter() - t0, sum(step.tokens for step in trace.steps)

    g1, n = glimp()
    r1, r2 = raw_generate(large.llm, prompt, n), raw_generate(large.llm, prompt, n)
    g2, _ = glimp()
    return min(g1, g2), min(r1, r2), n


def rss_mb() -> float:
    """Resident memory of this process (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_snapshot() -> tuple[float, float, float]:
    """(CPU-seconds busy on the whole machine, CPU-seconds of this process, wall clock) now."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = os.times()
    return busy, own.user + own.system, perf_counter()


def others_share(start: tuple[float, float, float]) -> float:
    """Share of the machine's CPU that other processes took since `start` (timings are unreliable above ~0.1)."""
    end = cpu_snapshot()
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / ((end[2] - start[2]) * (os.cpu_count() or 1))


def report(rows: list[tuple[str, float, str, float | None]], caption: str) -> None:
    """Print the one table: metric, value, goal, pass/fail (None goal = informational)."""
    table = Table(title="glimp engine benchmark (ratios from one run)", caption=caption)
    for col in ("metric", "value", "goal", "result"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, value, fmt, goal in rows:
        verdict = "info" if goal is None else ("[green]pass" if value <= goal else "[red]FAIL")
        table.add_row(metric, format(value, fmt), "-" if goal is None else f"<= {goal:g}", verdict)
    Console().print(table)


def main() -> None:
    args = parse_args()
    questions, _ = load_questions(args.data, limit=args.questions, offset=args.offset)
    progress(f"{len(questions)} questions from {args.data} (offset {args.offset}), pair {args.pair}: loading the models")
    registry = load_registry()
    pair = dataclasses.replace(registry.pair(args.pair), max_tokens=args.max_tokens)
    engine = Engine.load(registry, pair, {SMALL, LARGE})
    glimp_router = engine.router(threshold(pair.tau), pair)
    large_router = engine.router(always_large(), pair)
    cpu_start = cpu_snapshot()
    first = questions[0].question
    prompts = {role: glimp_router._sides[role].prompt_tokens(first) for role in (SMALL, LARGE)}

    # Decode cost per token, measured before and after the traces and pooled (also warms both models).
    decode = {role: measure_decode(engine.backends[role], prompts[role]) for role in (SMALL, LARGE)}

    traces, large_runs = [], []
    for i, q in enumerate(questions, 1):
        progress(f"question {i}/{len(questions)}: glimp and large-alone traces")
        traces.append(run_glimp(engine, glimp_router, q.question, REPEATS))
        large_runs.append(run_large_pair(engine, large_router, q.question))

    for role in (SMALL, LARGE):
        decode[role] += measure_decode(engine.backends[role], prompts[role])
    rss = rss_mb()
    others = others_share(cpu_start)

    # 1. probe cost per step / one small-model decode token (medians).
    probes = [s.probe_seconds for t in traces for s in t.steps if s.h_init is not None]
    probe_ratio = statistics.median(probes) / statistics.median(decode[SMALL])
    # 2. large-alone wall / raw llama-cpp-python, summed over questions.
    large_wall = sum(g for g, _, _ in large_runs)
    raw_ratio = large_wall / sum(r for _, r, _ in large_runs)
    # 3. evaluated tokens / final context length, worst question, per model.
    redundancy = {role: max(t.evaluated[role] / t.context_tokens[role] for t in traces if role in t.evaluated)
                  for role in (SMALL, LARGE)}
    # 4. measured trace time / floor (decode at the measured median rate + prefill + probe).
    spt = {role: statistics.median(decode[role]) for role in (SMALL, LARGE)}
    steps = [s for t in traces for s in t.steps]
    floor = sum(s.tokens * spt[s.model] + s.prefill_seconds + s.probe_seconds for s in steps)
    glimp_wall = sum(t.wall_seconds for t in traces)
    large_share = sum(s.model == LARGE for s in steps) / len(steps)
    written = {role: sum(s.tokens for s in steps if s.model == role) for role in (SMALL, LARGE)}

    rows = [
        ("1. probe / small decode token (medians)", probe_ratio, ".3f", 0.1),
        ("2. --mode large / raw llama-cpp-python", raw_ratio, ".3f", 1.05),
        ("3. evaluated / context, small (worst q)", redundancy[SMALL], ".3f", 1.05),
        ("3. evaluated / context, large (worst q)", redundancy[LARGE], ".3f", 1.05),
        ("4. glimp trace time / floor", glimp_wall / floor, ".3f", 1.10),
        ("5. RSS, both models loaded (MB)", rss, ".0f", None),
        ("glimp: large share of steps", large_share, ".2f", None),
        ("glimp wall / large-alone wall", glimp_wall / large_wall, ".3f", None),
        ("small / large decode cost per token", spt[SMALL] / spt[LARGE], ".3f", None),
        ("CPU used by other processes", others, ".2f", None),
    ]
    caption = (f"{len(questions)} questions from {args.data.name} (offset {args.offset}), max {args.max_tokens} "
               f"tokens; glimp wrote {written[SMALL]} small + {written[LARGE]} large tokens in {len(steps)} steps, "
               f"large-alone {sum(n for _, _, n in large_runs)} | {os.cpu_count()} CPUs, {platform.platform()}, "
               f"Python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__}")
    report(rows, caption)
    engine.close()


if __name__ == "__main__":
    main()
