"""HTTP backend benchmark: a pair (tiny unless --pair) in process vs behind two llama.cpp servers, same GSM8K questions.

Run from the repo root: `python bench/http_server.py [questions.jsonl] [--questions 5] [--batch-questions 8]`.
Starts one `python -m llama_cpp.server` per model on 127.0.0.1 (free ports, every core, killed at the end)
and prints one table: latency per mode (remote / in process), probe cost, H_init agreement of the server's
top-K with the in-process values, and batch throughput at concurrency 1, 2, 4 against the servers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from time import perf_counter

import llama_cpp
import numpy as np
from rich.console import Console
from rich.table import Table

from glimp_cli.backends import load_backend
from glimp_cli.backends.openai_http import Endpoint, connect
from glimp_cli.batch import ResultsFile, run_batch
from glimp_cli.config import load_registry
from glimp_cli.engine import route_settings
from glimp_cli.entropy import exact_entropy, topk_entropy, topk_entropy_from_logprobs
from glimp_cli.errors import BackendError
from glimp_cli.policies import LARGE, SMALL, always_large, always_small, threshold
from glimp_cli.prompts import render_prompt
from glimp_cli.questions import load_questions
from glimp_cli.router import ModelSlot, Router

from common import DEFAULT_DATA, free_port, progress_for

progress = progress_for("bench/http_server.py")

K = 20
REPEATS = 2  # timed traces are repeated and the fastest kept (bursts from other jobs on a shared machine)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="GSM8K-style JSON Lines file")
    p.add_argument("--questions", type=int, default=5, help="questions for the latency comparison")
    p.add_argument("--batch-questions", type=int, default=8, help="questions per throughput run")
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--pair", default="tiny", help="pair of models.yaml (default: tiny, the pair bench/README.md reports)")
    p.add_argument("--tau", type=float, default=2.5, help="threshold on the top-20 estimate (nats)")
    p.add_argument("--server-cache", action="store_true",
                   help="start the servers with --cache true (llama.cpp server's RAM cache of saved states)")
    return p.parse_args()


class Server:
    """`python -m llama_cpp.server` for one GGUF on a free 127.0.0.1 port."""

    def __init__(self, gguf: Path, alias: str, logits_all: bool, threads: int, log: Path, cache: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.alias = alias
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
               "--logits_all", "true" if logits_all else "false", "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--interrupt_requests", "false", "--verbose", "false"]
        if cache:
            cmd += ["--cache", "true"]
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        endpoint = Endpoint(alias, self.url, timeout=1.0, max_retries=0)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server for {alias} exited: {log.read_text()[-1000:]}")
            try:
                endpoint.get_json("/models")
                return
            except BackendError:
                time.sleep(0.25)
        self.kill()
        raise SystemExit(f"server for {alias} not ready in 90 s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def remote_spec(spec, server: Server, template: str):
    """The model `spec` as served by `server`, with its prompt written out as a plain template."""
    prompt = dataclasses.replace(spec.prompt, style="plain", template=template, system=None, prefill="")
    return dataclasses.replace(spec, backend="openai", base_url=server.url, model=server.alias, prompt=prompt,
                               source=None, timeout=120.0)


def plain_template(spec, backend) -> str:
    """The model's prompt with {question} left in (a chat prompt rendered through the GGUF's template)."""
    return render_prompt(spec.prompt, "{question}", backend.chat_template, backend.bos_token, backend.eos_token)


def router(backends: dict, specs: dict, policy, pair) -> Router:
    slots = [ModelSlot(role, backends.get(role), specs[role].prompt, specs[role].stop) for role in (SMALL, LARGE)]
    return Router(slots[0], slots[1], policy, route_settings(pair))


def fastest(make_router, question: str) -> object:
    return min((make_router().run(question).run() for _ in range(REPEATS)), key=lambda t: t.wall_seconds)


def h_init_rows(local_small, remote_small, spec, remote_template: str, pair, questions) -> np.ndarray:
    """(exact, in-process top-K, server running form, server text-end form) at each step boundary of the
    small model's own greedy traces."""
    slot = ModelSlot(SMALL, local_small, spec.prompt)
    none = ModelSlot(LARGE, None, spec.prompt)
    rows = []
    for q in questions:
        steps = [s.text for s in Router(slot, none, always_small(), route_settings(pair)).run(q.question)]
        for k in range(1, len(steps)):
            side = Router(slot, none, always_small(), route_settings(pair))._sides[SMALL]
            side.start(q.question)
            side.sync(steps[:k])
            logits = np.array(local_small.next_logits(), dtype=np.float64)
            remote_small.text = remote_template.replace("{question}", q.question) + "".join(t + "\n\n" for t in steps[:k])
            running = topk_entropy_from_logprobs(remote_small.next_logits())
            text_end = topk_entropy_from_logprobs(np.array([lp for _, lp in remote_small._probe(remote_small.text, ())]))
            rows.append((exact_entropy(logits), topk_entropy(logits, K), running, text_end))
    return np.array(rows)


def throughput(make_router, questions, concurrency: int, pair) -> tuple[float, float]:
    """(questions per minute, generated tokens per second) of glimp mode over `questions`."""
    settings = {"pair": "bench", "mode": "glimp", "large_share": None}
    with tempfile.TemporaryDirectory() as tmp:
        out, done = ResultsFile.open(Path(tmp) / "r.jsonl", False, settings)
        tokens = []
        t0 = perf_counter()
        with out:
            run_batch(lambda m, s: make_router(), questions, ["glimp"], out, done, lambda m: settings,
                      on_result=lambda r: tokens.append(sum(r["tokens"].values())),
                      concurrency=concurrency, worker_router=lambda m, s, i: make_router())
        wall = perf_counter() - t0
    return 60 * len(questions) / wall, sum(tokens) / wall


def main() -> None:
    args = parse_args()
    questions, _ = load_questions(args.data, limit=args.questions)
    batch_questions, _ = load_questions(args.data, limit=args.batch_questions, offset=args.questions)
    progress(f"{len(questions)} + {len(batch_questions)} questions from {args.data}, pair {args.pair}: "
             "loading the models and starting the servers")
    registry = load_registry()
    pair = dataclasses.replace(registry.pair(args.pair), estimator=f"topk:{K}", tau=args.tau, max_tokens=args.max_tokens)
    specs = {role: registry.model(getattr(pair, role)) for role in (SMALL, LARGE)}
    local = {role: load_backend(specs[role]) for role in (SMALL, LARGE)}
    templates = {role: plain_template(specs[role], local[role]) for role in (SMALL, LARGE)}
    threads = os.cpu_count() or 1
    logs = Path(tempfile.mkdtemp(prefix="glimp-bench-"))
    servers = {}
    try:
        servers[SMALL] = Server(local[SMALL].path, "small", True, threads, logs / "small.log", args.server_cache)
        servers[LARGE] = Server(local[LARGE].path, "large", False, threads, logs / "large.log", args.server_cache)
        rspecs = {role: remote_spec(specs[role], servers[role], templates[role]) for role in (SMALL, LARGE)}

        def remote_backends() -> dict:
            return {role: connect(rspecs[role]) for role in (SMALL, LARGE)}

        remote = remote_backends()
        rows = []
        latency = {}
        probes = {}
        for mode, policy in (("glimp", threshold(args.tau)), ("large", always_large())):
            for where, backends, sp in (("in process", local, specs), ("server", remote, rspecs)):
                progress(f"{mode} mode, {where}")
                traces = [fastest(lambda: router(backends, sp, policy, pair), q.question) for q in questions]
                latency[mode, where] = sum(t.wall_seconds for t in traces)
                if mode == "glimp":
                    probes[where] = statistics.median(s.probe_seconds for t in traces for s in t.steps
                                                      if s.h_init is not None)
                    if where == "server":
                        steps = [s for t in traces for s in t.steps]
                        share = sum(s.model == LARGE for s in steps) / len(steps)
        for mode in ("glimp", "large"):
            rows.append((f"{mode} mode: wall, server / in process ({args.questions} q, sum)",
                         f"{latency[mode, 'server'] / latency[mode, 'in process']:.2f}",
                         f"{latency[mode, 'server']:.1f} s / {latency[mode, 'in process']:.1f} s"))
        rows.append(("probe per step, median: server / in process", f"{probes['server'] / probes['in process']:.1f}",
                     f"{probes['server'] * 1000:.0f} ms / {probes['in process'] * 1000:.1f} ms"))
        rows.append(("glimp large share of steps (server run)", f"{share:.2f}", f"tau {args.tau:g} on top-{K}"))

        h = h_init_rows(local[SMALL], remote[SMALL], specs[SMALL], templates[SMALL], pair, questions)
        running, text_end = np.abs(h[:, 2] - h[:, 1]), np.abs(h[:, 3] - h[:, 1])
        rows.append((f"H_init: |server top-{K} (delimiter held back) - in-process top-{K}|",
                     f"{np.median(running):.3f}", f"median; mean {running.mean():.3f}, max {running.max():.3f}, "
                                                  f"{len(h)} boundaries"))
        rows.append((f"H_init: |server top-{K} (text-end delimiter) - in-process top-{K}|",
                     f"{text_end.mean():.3f}", f"mean; r = {np.corrcoef(h[:, 3], h[:, 1])[0, 1]:.2f}"))
        rows.append((f"H_init: in-process exact - top-{K}", f"{np.mean(h[:, 0] - h[:, 1]):.3f}",
                     f"mean; r = {np.corrcoef(h[:, 0], h[:, 1])[0, 1]:.2f}"))

        progress("batch throughput, in process and through the servers")
        qpm, tps = throughput(lambda: router(local, specs, threshold(args.tau), pair), batch_questions, 1, pair)
        rows.append((f"batch, in process, concurrency 1 ({len(batch_questions)} q)", f"{qpm:.1f} q/min",
                     f"{tps:.1f} tokens/s"))
        for concurrency in (1, 2, 4):
            qpm, tps = throughput(lambda: router(remote_backends(), rspecs, threshold(args.tau), pair),
                                  batch_questions, concurrency, pair)
            rows.append((f"batch, servers, concurrency {concurrency} ({len(batch_questions)} q)", f"{qpm:.1f} q/min",
                         f"{tps:.1f} tokens/s"))
    finally:
        for server in servers.values():
            server.kill()
        for backend in local.values():
            backend.close()

    table = Table(title=f"glimp HTTP backend vs in process (pair {args.pair}, greedy)",
                  caption=f"GSM8K {args.data.name}, max {args.max_tokens} tokens | servers: llama_cpp.server, "
                          f"{threads} threads each, --logits_all true (small) / false (large)"
                          f"{', --cache true' if args.server_cache else ''} | {os.cpu_count()} CPUs, "
                          f"{platform.platform()}, Python {platform.python_version()}, "
                          f"llama-cpp-python {llama_cpp.__version__}")
    for col in ("metric", "value", "detail"):
        table.add_column(col, justify="left" if col != "value" else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
