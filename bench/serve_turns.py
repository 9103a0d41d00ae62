"""A conversation's later turns through `glimp serve`, with and without the prompt cache: time to first token.

Run from the repo root: `python bench/serve_turns.py [questions.jsonl] [--conversations 6] [--pair default]`.
Two real `glimp serve` processes on 127.0.0.1 (one worker each, one thread per model, greedy): one as shipped,
one with `--no-prompt-cache`. Each conversation is a GSM8K question and two follow-ups, sent turn by turn
with the whole history as a chat client sends it, streamed; timed from the request to the first content
delta that is not whitespace. The two servers alternate conversation by conversation (ABBA, so drift on a
shared machine hits both) and each answers the same conversation: the history a turn sends is the one that
server wrote. The table gives, per turn, the median prompt length, the tokens prefilled before the first
step was written (the small model's start and, when the large model wrote the first step, its start too),
and the median time to first token on each server, with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from time import perf_counter

from glimp_cli.questions import load_questions

from common import DEFAULT_DATA, progress_for
from serve import one_thread_config, start_server, stop_server

FOLLOW_UPS = ("Check the answer by working backwards from it.",
              "What would the answer be if every number in the question were doubled?")
progress = progress_for("serve_turns")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="GSM8K-style JSON Lines file")
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--pair", default="default")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--max-step-tokens", type=int, default=64)
    return p.parse_args()


def turn(http, url: str, model: str, messages: list[dict]) -> dict:
    """One streamed chat turn: its time to first token, content, prompt tokens and first step's prefill."""
    start = perf_counter()
    first, content, record = None, "", None
    body = {"model": model, "messages": messages, "stream": True, "temperature": 0}
    with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the server ended the stream with an error: {chunk['error']}")
            piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if piece:
                if first is None and piece.strip():
                    first = perf_counter() - start
                content += piece
            if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                record = chunk["glimp"]
    steps = record["steps"]
    return {"ttft": first if first is not None else perf_counter() - start, "content": content,
            "prompt": record["prompt_tokens"].get("small") or record["prompt_tokens"].get("large"),
            "prefill": steps[0]["prefill_tokens"] if steps else 0}


def conversation(http, url: str, model: str, question: str) -> list[dict]:
    """A question and its follow-ups, each turn sent with the history this server wrote."""
    messages, turns = [{"role": "user", "content": question}], []
    for follow_up in (None, *FOLLOW_UPS):
        if follow_up is not None:
            messages += [{"role": "assistant", "content": turns[-1]["content"]}, {"role": "user", "content": follow_up}]
        turns.append(turn(http, url, model, messages))
    return turns


def main() -> None:
    import httpx

    args = parse_args()
    loaded, _ = load_questions(args.data, limit=args.conversations + 1)
    questions = [q.question for q in loaded]
    model = f"glimp/{args.pair}"
    runs: dict[str, list[list[dict]]] = {"cache": [], "no cache": []}
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(timeout=900) as http:
        config = one_thread_config(args.pair, Path(tmp))
        servers = {}
        try:
            for name, extra in (("cache", ()), ("no cache", ("--no-prompt-cache",))):
                servers[name] = start_server(config, args.pair, 1, args, Path(tmp) / f"{name}.log", extra)
            for name, (_, url) in servers.items():  # warm each: lazy imports, the prompt's head in the cache
                conversation(http, url, model, questions[-1])
            for i, question in enumerate(questions[:args.conversations]):
                order = ("cache", "no cache") if i % 4 in (0, 3) else ("no cache", "cache")
                for name in order:
                    runs[name].append(conversation(http, servers[name][1], model, question))
                progress(f"conversation {i + 1}/{args.conversations}: " + "; ".join(
                    f"{name} TTFT " + " ".join(f"{t['ttft']:.2f}" for t in runs[name][-1]) for name in runs))
        finally:
            for proc, _ in servers.values():
                stop_server(proc)

    print("| turn | prompt tokens | prefilled before the first step: cache / no cache | TTFT s: cache | "
          "TTFT s: no cache | cache / no cache |")
    print("|---|---|---|---|---|---|")
    for k in range(1 + len(FOLLOW_UPS)):
        on = [c[k] for c in runs["cache"]]
        off = [c[k] for c in runs["no cache"]]
        ttft_on, ttft_off = statistics.median(t["ttft"] for t in on), statistics.median(t["ttft"] for t in off)
        print(f"| {k + 1} | {statistics.median(t['prompt'] for t in off):.0f} | "
              f"{statistics.median(t['prefill'] for t in on):.0f} / {statistics.median(t['prefill'] for t in off):.0f} | "
              f"{ttft_on:.2f} | {ttft_off:.2f} | {ttft_on / ttft_off:.2f}x |")
    later_on = statistics.median(c[k]["ttft"] for c in runs["cache"] for k in range(1, 1 + len(FOLLOW_UPS)))
    first_on = statistics.median(c[0]["ttft"] for c in runs["cache"])
    same = sum(a["content"] == b["content"] for x, y in zip(runs["cache"], runs["no cache"]) for a, b in zip(x, y))
    print()
    print(f"With the cache, a later turn's median time to first token is {later_on / first_on:.2f}x the first turn's.")
    print(f"Same text with and without the cache: {same} of {sum(len(c) for c in runs['cache'])} turns.")
    print(f"{args.conversations} conversations from {args.data.name} (+1 to warm up), pair {args.pair}, max_tokens "
          f"{args.max_tokens}, max_step_tokens {args.max_step_tokens}, greedy, one worker and one thread per model; "
          f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end.")


if __name__ == "__main__":
    main()
