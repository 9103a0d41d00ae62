"""glimp on llama.cpp's `llama-server`: --concurrency against --parallel slots, and a large model split over RPC workers.

Run from the repo root: `python bench/llama_server.py [--pair tiny] [--questions 8] [--threads 1]`.
Builds (once, cached) or finds llama-server and rpc-server (tools/engines.py), then on the same GSM8K
questions, greedy, glimp mode at one tau, prints one table: questions per minute and generated tokens
per second in process (concurrency 1), through two llama-servers (one per model) at every --parallel x
--concurrency, and with the large model behind `llama-server --rpc` over two rpc-server workers on
127.0.0.1 (glimp mode and large alone), each against the same run without RPC just before it. Every
served run starts fresh processes, so no run finds its questions in a prefix cache an earlier one
filled. Ratios are within this one run; the machine is shared, so read them, not the absolute rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from types import SimpleNamespace

import llama_cpp
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_DATA, REPO, progress_for  # noqa: E402
from http_server import K, plain_template, remote_spec, router  # noqa: E402

from glimp_cli.backends import load_backend  # noqa: E402
from glimp_cli.backends.openai_http import connect  # noqa: E402
from glimp_cli.batch import ResultsFile, run_batch  # noqa: E402
from glimp_cli.config import load_registry  # noqa: E402
from glimp_cli.policies import LARGE, SMALL, always_large, threshold  # noqa: E402
from glimp_cli.questions import load_questions  # noqa: E402

_spec = importlib.util.spec_from_file_location("glimp_engines", REPO / "tools" / "engines.py")
engines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engines)

progress = progress_for("bench/llama_server.py")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="GSM8K-style JSON Lines file")
    p.add_argument("--pair", default="tiny", help="pair of models.yaml (default: %(default)s)")
    p.add_argument("--questions", type=int, default=8, help="questions per run")
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--tau", type=float, default=2.5, help="threshold on the top-20 estimate (nats)")
    p.add_argument("--parallel", default="1,2,4", help="llama-server --parallel values")
    p.add_argument("--concurrency", default="1,2,4", help="glimp batch --concurrency values")
    p.add_argument("--threads", type=int, default=1, help="threads per server and per RPC worker")
    p.add_argument("--no-rpc", action="store_true", help="skip the RPC rows")
    return p.parse_args()


def batch_rate(make_router, questions, mode: str, concurrency: int) -> tuple[float, float]:
    """(questions per minute, generated tokens per second) of one batch over `questions`."""
    settings = {"pair": "bench", "mode": mode, "large_share": None}
    tokens = []
    with tempfile.TemporaryDirectory() as tmp:
        out, done = ResultsFile.open(Path(tmp) / "r.jsonl", False, settings)
        t0 = perf_counter()
        with out:
            outcome = run_batch(lambda m, s: make_router(), questions, [mode], out, done, lambda m: settings,
                                on_result=lambda r: tokens.append(sum(r["tokens"].values())),
                                concurrency=concurrency, worker_router=lambda m, s, i: make_router())
        wall = perf_counter() - t0
    if len(tokens) != len(questions):
        raise SystemExit(f"{mode} at concurrency {concurrency}: {len(tokens)} of {len(questions)} questions "
                         f"finished ({outcome})")
    return 60 * len(questions) / wall, sum(tokens) / wall


def main() -> None:
    args = parse_args()
    parallels = [int(x) for x in args.parallel.split(",")]
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    questions, _ = load_questions(args.data, limit=args.questions)
    progress("finding (or building) llama-server and rpc-server")
    bins = engines.ensure(log=progress)
    registry = load_registry()
    pair = dataclasses.replace(registry.pair(args.pair), estimator=f"topk:{K}", tau=args.tau,
                               max_tokens=args.max_tokens)
    specs = {role: dataclasses.replace(registry.model(getattr(pair, role)), threads=args.threads)
             for role in (SMALL, LARGE)}
    local = {role: load_backend(specs[role]) for role in (SMALL, LARGE)}
    templates = {role: plain_template(specs[role], local[role]) for role in (SMALL, LARGE)}
    ggufs = {role: Path(local[role].path) for role in (SMALL, LARGE)}
    logs = Path(tempfile.mkdtemp(prefix="glimp-bench-llama-server-"))
    rows: list[tuple[str, ...]] = []

    progress(f"in process, {len(questions)} questions")
    base_qpm, base_tps = batch_rate(lambda: router(local, specs, threshold(args.tau), pair), questions, "glimp", 1)
    rows.append(("in process", "-", "1", f"{base_qpm:.1f}", f"{base_tps:.1f}", "1.00", "-"))
    for backend in local.values():
        backend.close()

    def served_run(parallel: int, concurrency: int, mode: str, workers: int = 0) -> tuple[float, float]:
        """One batch against fresh servers (and `workers` fresh RPC workers for the large model), so
        that no run finds the questions in a prefix cache an earlier run filled."""
        procs = [engines.rpc_server(bins, logs / f"rpc{i}.log", threads=args.threads).start()
                 for i in range(workers)]
        endpoints = tuple(f"127.0.0.1:{w.port}" for w in procs)
        try:
            servers = {}
            for role in (SMALL, LARGE):
                rpc = endpoints if role == LARGE else ()
                servers[role] = engines.llama_server(bins, ggufs[role], role, logs / f"{role}.log",
                                                     parallel=parallel, threads=args.threads, rpc=rpc)
                procs.append(servers[role].start())
            served = {role: SimpleNamespace(url=f"http://127.0.0.1:{servers[role].port}/v1", alias=role)
                      for role in (SMALL, LARGE)}
            rspecs = {role: remote_spec(specs[role], served[role], templates[role]) for role in (SMALL, LARGE)}
            policy = threshold(args.tau) if mode == "glimp" else always_large()
            return batch_rate(lambda: router({role: connect(rspecs[role]) for role in (SMALL, LARGE)}, rspecs,
                                             policy, pair), questions, mode, concurrency)
        finally:
            for proc in reversed(procs):
                proc.stop()

    for parallel in parallels:
        for concurrency in concurrencies:
            progress(f"llama-server --parallel {parallel}, glimp --concurrency {concurrency}")
            qpm, tps = served_run(parallel, concurrency, "glimp")
            rows.append(("llama-server", str(parallel), str(concurrency), f"{qpm:.1f}", f"{tps:.1f}",
                         f"{qpm / base_qpm:.2f}", "-"))
    if not args.no_rpc:
        for mode in ("glimp", "large"):
            progress(f"{mode} mode: the large model direct, then over 2 RPC workers")
            direct_qpm, _ = served_run(1, 1, mode)
            qpm, tps = served_run(1, 1, mode, workers=2)
            label = "large over 2 RPC workers" + (" (large alone)" if mode == "large" else "")
            rows.append((label, "1", "1", f"{qpm:.1f}", f"{tps:.1f}", f"{qpm / base_qpm:.2f}",
                         f"{qpm / direct_qpm:.2f}"))

    table = Table(title=f"glimp on llama-server (pair {args.pair}, glimp mode tau {args.tau:g} on top-{K}, greedy)",
                  caption=f"{len(questions)} GSM8K questions ({args.data.name}), max {args.max_tokens} tokens, "
                          f"{args.threads} thread(s) per server and RPC worker, one server per model | "
                          f"{os.cpu_count()} CPUs, {platform.platform()}, llama-cpp-python {llama_cpp.__version__} "
                          f"(the servers: its vendored llama.cpp)")
    for col in ("engine", "--parallel", "--concurrency", "questions/min", "tokens/s", "vs in process",
                "RPC vs direct"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
