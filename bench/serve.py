"""`glimp serve` against the same questions in process: requests per minute and time to first token.

Run from the repo root: `python bench/serve.py [questions.jsonl] [--questions 8] [--clients 2]`.
In process, each question runs through the loop `glimp batch` runs (Engine -> router -> Trace), timed from
the call to the first text piece (TTFT) and to the end of the trace. Through the server, a real
`glimp serve --workers N` process on 127.0.0.1 (a free port; stopped at the end) is driven by the
official `openai` client, streaming, timed from the request to the first content delta and to [DONE].
At one client the two alternate question by question (ABBA order, so drift on a shared machine hits
both); at N clients both run the N-wide version (N engines in N threads; N workers and N client
threads), twice each in ABBA order. Every model runs on one thread (both paths), greedy; answers are checked equal.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter

import yaml

from glimp_cli.config import apply_overrides, load_registry, packaged_config
from glimp_cli.engine import Engine, pair_policy
from glimp_cli.questions import load_questions

from common import DEFAULT_DATA, free_port


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="GSM8K-style JSON Lines file")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--clients", type=int, default=2, help="the concurrent run's clients (and workers)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--max-step-tokens", type=int, default=48)
    p.add_argument("--pair", default=None, help="default: tiny (or default, before the rename)")
    return p.parse_args()


class Timing:
    """One question's run: time to the first text, to the end, and the text it produced."""

    def __init__(self, ttft: float, wall: float, text: str):
        self.ttft, self.wall, self.text = ttft, wall, text


class _FirstText:
    """A StepListener that notes when the first text piece arrives."""

    def __init__(self, start: float):
        self.start, self.first = start, None

    def step_started(self, index, model, h_init):
        pass

    def text(self, piece):
        if self.first is None and piece.strip():
            self.first = perf_counter() - self.start

    def draft_discarded(self, index, tokens):
        pass


def in_process(engine: Engine, pair, question: str) -> Timing:
    start = perf_counter()
    listener = _FirstText(start)
    trace = engine.router(pair_policy(pair), pair).run(question, listener)
    steps = [step.text for step in trace]
    return Timing(listener.first or 0.0, perf_counter() - start, pair.delimiter.join(steps))


def through_server(client, model: str, question: str) -> Timing:
    start = perf_counter()
    first, text = None, ""
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            stream=True, temperature=0)
    for chunk in stream:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            if first is None and piece.strip():
                first = perf_counter() - start
            text += piece
    return Timing(first or 0.0, perf_counter() - start, text)


def one_thread_config(pair_name: str, folder: Path) -> Path:
    config = yaml.safe_load(packaged_config().read_text(encoding="utf-8"))
    pair = config["pairs"][pair_name]
    for role in ("small", "large"):
        config["models"][pair[role]]["threads"] = 1
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start_server(config: Path, pair: str, workers: int, args, log: Path,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """A `glimp serve` process on a free port of 127.0.0.1 with `extra` flags; returns it and its URL once healthy."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLIMP_")}
    proc = subprocess.Popen([sys.executable, "-m", "glimp_cli", "serve", "--config", str(config), "--pair", pair,
                             "--port", str(port), "--workers", str(workers), "--queue", str(workers),
                             "--max-tokens", str(args.max_tokens), "--max-step-tokens", str(args.max_step_tokens), *extra],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    import urllib.request

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            sys.exit(f"glimp serve exited: {log.read_text()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                sys.exit("glimp serve did not start")
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def concurrent(run, questions: list[str], clients: int) -> tuple[float, list[Timing]]:
    """Run `run(worker, question)` for every question over `clients` threads; returns (elapsed, timings)."""
    slots = list(range(clients))
    lock = threading.Lock()

    def task(question: str) -> Timing:
        with lock:
            slot = slots.pop()
        try:
            return run(slot, question)
        finally:
            with lock:
                slots.append(slot)

    start = perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        timings = list(pool.map(task, questions))
    return perf_counter() - start, timings


def _merged(runs: list[tuple[float, list[Timing]]]) -> tuple[float, list[Timing]]:
    return sum(elapsed for elapsed, _ in runs), [t for _, timings in runs for t in timings]


def main() -> None:
    args = parse_args()
    from openai import OpenAI

    registry = load_registry()
    pair_name = args.pair or ("tiny" if "tiny" in registry.pairs else "default")
    loaded, _ = load_questions(args.data, limit=args.questions)
    questions = [q.question for q in loaded]
    with tempfile.TemporaryDirectory() as tmp:
        config = one_thread_config(pair_name, Path(tmp))
        registry = load_registry(config)
        pair, _ = apply_overrides(registry.pair(pair_name), {"max_tokens": (args.max_tokens, "flag"),
                                                             "max_step_tokens": (args.max_step_tokens, "flag")})
        engines = [Engine.load(registry, pair, {"small", "large"}) for _ in range(args.clients)]
        proc, url = start_server(config, pair_name, 1, args, Path(tmp) / "serve1.log")
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        model = f"glimp/{pair_name}"
        try:
            in_process(engines[0], pair, questions[0])  # warm both paths: caches, lazy imports
            through_server(client, model, questions[0])
            local, served = [], []
            for i, question in enumerate(questions):
                order = (0, 1) if i % 4 in (0, 3) else (1, 0)
                for which in order:
                    if which == 0:
                        local.append(in_process(engines[0], pair, question))
                    else:
                        served.append(through_server(client, model, question))
        finally:
            stop_server(proc)
        proc, url = start_server(config, pair_name, args.clients, args, Path(tmp) / "serveN.log")
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            for slot in range(args.clients):  # warm every engine and worker
                in_process(engines[slot], pair, questions[0])
            concurrent(lambda slot, q: through_server(client, model, q), questions[:args.clients], args.clients)
            runs = {"local": [], "served": []}
            for which in ("local", "served", "served", "local"):  # ABBA against drift
                run = (lambda slot, q: in_process(engines[slot], pair, q)) if which == "local" else \
                    (lambda slot, q: through_server(client, model, q))
                runs[which].append(concurrent(run, questions, args.clients))
            wide_local, wide_served = (_merged(runs[k]) for k in ("local", "served"))
        finally:
            stop_server(proc)
            for engine in engines:
                engine.close()

    same = sum(a.text == b.text for a, b in zip(local, served))
    same_wide = sum(a.text == b.text for a, b in zip(wide_local[1], wide_served[1]))  # same question order
    rows = []

    def row(clients, path, elapsed, timings):
        rows.append((clients, path, 60 * len(timings) / elapsed, statistics.mean(t.wall for t in timings),
                     statistics.median(t.ttft for t in timings)))

    row(1, "in process", sum(t.wall for t in local), local)
    row(1, "glimp serve", sum(t.wall for t in served), served)
    row(args.clients, "in process", *wide_local)
    row(args.clients, "glimp serve", *wide_served)
    print(f"| clients | path | requests/min | mean s per request | median TTFT s |")
    print("|---|---|---|---|---|")
    for clients, path, rpm, wall, ttft in rows:
        print(f"| {clients} | {path} | {rpm:.1f} | {wall:.2f} | {ttft:.3f} |")
    for k in (0, 2):
        (clients, _, rpm_in, wall_in, ttft_in), (_, _, rpm_srv, wall_srv, ttft_srv) = rows[k], rows[k + 1]
        print(f"| {clients} | serve / in process | {rpm_srv / rpm_in:.3f}x | {wall_srv / wall_in:.3f}x | "
              f"{ttft_srv / ttft_in:.3f}x |")
    print()
    wall_ratio = sum(t.wall for t in served) / sum(t.wall for t in local)
    ttft_ratio = statistics.median(t.ttft for t in served) / statistics.median(t.ttft for t in local)
    print(f"At 1 client the server adds {100 * (wall_ratio - 1):+.1f}% to the in-process wall time (goal <= +5%); "
          f"its median time to first token is {ttft_ratio:.2f}x the in-process one (goal <= 1.2x).")
    print(f"Same text through the server and in process: {same}/{len(local)} at 1 client, "
          f"{same_wide}/{len(wide_local[1])} at {args.clients} (two runs each).")
    print(f"{len(questions)} questions from {args.data.name}, pair {pair_name}, max_tokens {args.max_tokens}, "
          f"max_step_tokens {args.max_step_tokens}, greedy, one thread per model; "
          f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end.")


if __name__ == "__main__":
    main()
