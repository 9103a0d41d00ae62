"""End-to-end benchmark: `glimp batch --mode all` on a fixed GSM8K subset, then the report table.

Runs the real command in a subprocess (exactly what a user runs) and prints the report plus glimp
latency / large-alone latency and the large share at which it was reached.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from glimp_cli.report import load_results, render_table, summarize

from common import DEFAULT_DATA, progress_for

progress = progress_for("bench/batch.py")


def run_batch(data: Path, out: Path, questions: int, max_tokens: int, pair: str) -> None:
    """`glimp batch` over the first `questions` rows, every mode, into `out`."""
    command = [sys.executable, "-m", "glimp_cli", "batch", str(data), "-o", str(out), "--mode", "all",
               "--limit", str(questions), "--max-tokens", str(max_tokens), "--pair", pair]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--pair", default="tiny", help="pair of models.yaml (default: tiny, the pair docs/benchmarks.md reports)")
    parser.add_argument("--out", type=Path, help="keep the results file here (default: a temp file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "results.jsonl"
        progress(f"glimp batch --mode all --pair {args.pair} on {args.questions} questions from {args.data}")
        run_batch(args.data, out, args.questions, args.max_tokens, args.pair)
        records, _ = load_results(out)
    rows = {row.mode: row for row in summarize(records)}
    console = Console(width=160)
    console.print(render_table(list(rows.values())))
    glimp = rows.get("glimp")
    if glimp and glimp.latency_vs_large is not None:
        console.print(f"glimp latency / large-alone latency: {glimp.latency_vs_large:.2f} "
                      f"at a large share of {glimp.large_share_steps:.0%} of steps "
                      f"({glimp.large_share_tokens:.0%} of tokens), over {glimp.compared_with_large} questions")
    console.print(f"pair {args.pair}, {args.questions} GSM8K questions from {args.data.name}, max {args.max_tokens} tokens per trace")


if __name__ == "__main__":
    main()
