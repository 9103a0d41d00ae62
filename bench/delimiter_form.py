"""Does H_init change when a step's end and the delimiter are tokenized as running text? A check on judged steps.

Run from the repo root: `python bench/delimiter_form.py [--questions 38] [--threads 1]` after `bench/signals.py`
has recorded and scored its judged traces (bench/results/signals-default). glimp's contexts end every step
with the step's own tokens and then the delimiter's (Qwen: "." then "\\n"); a text tokenized whole merges
them where the tokenizer does (".\\n" is one token). For each judged step this replays the small model's
trace both ways in one batch each and reads H_init at the step's start, then prints how far the two differ
where the forms differ, and how each ranks the large model's disagreement (the cheap label of signals.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from glimp_cli.config import load_registry
from glimp_cli.engine import Engine
from glimp_cli.entropy import exact_entropy
from glimp_cli.policies import SMALL, always_small
from glimp_cli.report import bootstrap_auroc

from common import REPO, progress_for
from signals import Scorer

RUNS = REPO / "bench" / "results" / "signals-default"
progress = progress_for("delimiter_form")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=38, help="the first N judged traces")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs-dir", type=Path, default=RUNS)
    return p.parse_args()


def step_starts(backend, texts: list[str], delimiter: str) -> list[int | None]:
    """Where each step starts among the tokens of the whole trace text (None: a token spans the start)."""
    ends, total = {0: 0}, 0
    tokens = backend.tokenize(delimiter.join(texts) + delimiter)
    for i, token in enumerate(tokens):
        total += len(backend.token_bytes(token))
        ends[total] = i + 1
    starts, offset = [], 0
    for text in texts:
        starts.append(ends.get(offset))
        offset += len(text.encode()) + len(delimiter.encode())
    return starts, tokens


def main() -> None:
    args = parse_args()
    registry = load_registry()
    pair = registry.pair("default")
    engine = Engine.load(registry, pair, {SMALL})
    side = engine.router(always_small(), pair)._sides[SMALL]
    scorer = Scorer(side, 4096, args.threads)
    judged = {}
    for line in (args.runs_dir / "scores-judge.jsonl").read_text(encoding="utf-8").splitlines():
        for row in json.loads(line)["steps"]:
            judged[(row["id"], row["index"])] = row
    rows = []
    traces = (args.runs_dir / "small-judge.jsonl").read_text(encoding="utf-8").splitlines()[: args.questions]
    for n, line in enumerate(traces, 1):
        record = json.loads(line)
        texts = [step["text"] for step in record["steps"]]
        prompt = list(side.prompt_tokens(record["question"]))
        split, layout = scorer.layout(record["question"], texts)
        split_logits = scorer.logits(split)
        h_split = [exact_entropy(split_logits[start - 1]) for start, _ in layout]
        starts, whole = step_starts(side.backend, texts, pair.delimiter)
        whole_logits = scorer.logits(prompt + whole)
        for j, start in enumerate(starts):
            row = judged.get((record["id"], j))
            if row is None or start is None:
                continue
            at = len(prompt) + start
            merged = j > 0 and whole[start - 1] not in side.delim_tokens
            rows.append({"id": record["id"], "merged": merged, "split": h_split[j],
                         "whole": exact_entropy(whole_logits[at - 1]), "label": row["large_disagrees"]})
        progress(f"{n}/{len(traces)} traces, {len(rows)} steps")
    scorer.close()
    engine.close()

    merged = [r for r in rows if r["merged"]]
    diff = np.array([r["whole"] - r["split"] for r in merged])
    print(f"{len(rows)} judged steps of {len({r['id'] for r in rows})} questions; {len(merged)} start after a "
          f"merged form (the step's last token and the delimiter in one token)")
    print(f"there H_init after the merged form minus after glimp's: mean |diff| {np.abs(diff).mean():.3f} nats, "
          f"median {np.median(np.abs(diff)):.3f}, correlation "
          f"{np.corrcoef([r['whole'] for r in merged], [r['split'] for r in merged])[0, 1]:.3f}")
    print("| H_init read after | AUROC, large model disagrees (95% CI) |")
    print("|---|---|")
    for column, name in (("split", "glimp's form (step tokens, then the delimiter's)"), ("whole", "the text tokenized whole")):
        point, lo, hi = bootstrap_auroc([r[column] for r in rows], [r["label"] for r in rows], [r["id"] for r in rows])
        print(f"| {name} | {point:.3f} ({lo:.3f}-{hi:.3f}) |")


if __name__ == "__main__":
    main()
