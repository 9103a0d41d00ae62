"""Routing signals judged step by step: how well each signal the small model can read at a step's start ranks
the steps that needed the large model, on thousands of steps for minutes of CPU.

Run from the repo root: `python bench/signals.py [--pair P] [--judge-questions 300] [--outcome-questions 100]`;
`--report` reprints the tables (and `--plot`, `--markdown`) from the recorded files, loading no model.

Phases, each resumable (one JSON line per question or per swapped step, fsync'd; a rerun goes on):
1. traces: small alone, greedy, on the calibration questions (for fitting) and on held-out GSM8K test rows
   (for judging), as `glimp batch` results files.
2. score: each trace replayed in one batch through both models with every position's logits kept
   (`logits_all`): the small model's signals at every step start (H_init exact and top-20, the first token's
   top-1 probability and top-1/top-2 margin, H_init read past a leading list marker, mean and max entropy of
   the first k drafted tokens, the whole draft's entropy and perplexity, the step's position) and two cheap
   labels from the large model teacher-forced on the same text (no generation): its mean negative
   log-likelihood of the small model's step, and whether its greedy token differs from the small model's
   within the step's first tokens. The same for glimp's traces at the default tau (mixed writers).
3. outcome: the label tied to the answer, on glimp's traces at the default tau. In a trace that ended wrong,
   one step the small model wrote is written by the large model instead, and the trace goes on as glimp
   routes it: the step is critical if the answer becomes right. The mirror in traces that ended right: the
   small model writes one step the large model wrote, critical if the answer becomes wrong.
Report: AUROC (binary labels) or Spearman's rho (the NLL) per signal with a 95% bootstrap interval over
questions, the number of steps and questions, and how the cheap labels agree with the outcome label.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from glimp_cli import calibrate
from glimp_cli.batch import ResultsFile, pair_settings, run_batch
from glimp_cli.config import PairSpec, compile_probe_skip, load_registry
from glimp_cli.engine import Engine
from glimp_cli.entropy import exact_entropy, log_softmax, topk_entropy
from glimp_cli.grading import extract_answer, grade
from glimp_cli.policies import LARGE, SMALL, Policy, always_small, threshold
from glimp_cli.questions import Question, load_questions
from glimp_cli.report import bootstrap, bootstrap_auroc, spearman
from glimp_cli.router import MAX_SKIP_TOKENS
from glimp_cli.sides import TokenSide
from glimp_cli.trace import Step
from glimp_cli.signals import content_token, first_tokens_entropy, margin_doubt, perplexity, top1_doubt

from common import DEFAULT_DATA, REPO, progress_for

progress = progress_for("bench/signals.py")

DEFAULT_BASE = REPO / "bench" / "results" / "tradeoff-default" / "glimp-tau0.7131.jsonl"
MARKER = r"\s*(\d+[.)]|[-*•])"  # the probe_skip pattern bench/tradeoff.py measured
DISAGREE_TOKENS = 4  # "within the step's first tokens"
DRAFT_KS = (2, 4)


# --- phase 1: small-alone traces -----------------------------------------------------------------


def small_settings(pair: PairSpec, calibration: bool) -> dict:
    """What a small-alone record carries: bench/tradeoff.py's keys, so its files resume here.

    Its calibration run recorded no tau (it was what the run measured); small alone routes on none.
    """
    settings = {**pair_settings(dataclasses.replace(pair, mode="small")), "large_share": None}
    return {**settings, "tau": None} if calibration else settings


def record_small(engine: Engine, pair: PairSpec, questions: list[Question], path: Path, calibration: bool) -> None:
    """Small alone on `questions` into `path`, resumed."""
    settings = small_settings(pair, calibration)
    path.parent.mkdir(parents=True, exist_ok=True)
    out, done = ResultsFile.open(path, resume=True, settings_key=settings, questions=questions)
    with out:
        pending = sum((q.id, "small") not in done for q in questions)
        if pending:
            progress(f"small alone: {pending} of {len(questions)} questions into {path}")
        result = run_batch(lambda mode, s: engine.router(always_small(), pair), questions, ["small"], out, done,
                           lambda mode: settings,
                           on_result=lambda r: progress(f"small alone {r['id']}: {len(r['steps'])} steps"))
    if result.interrupted:
        raise KeyboardInterrupt


# --- phase 2: signals and cheap labels from one batched pass per model ---------------------------


class Scorer:
    """One model with every position's logits kept, to replay a trace in one batch."""

    def __init__(self, side: TokenSide, n_ctx: int, threads: int | None):
        import llama_cpp

        self.side = side
        backend = side.backend
        threads = threads or os.cpu_count() or 1
        self.llm = llama_cpp.Llama(model_path=str(backend.path), n_ctx=n_ctx, n_batch=512, logits_all=True,
                                   n_threads=threads, n_threads_batch=threads, swa_full=True, verbose=False)

    def layout(self, question: str, texts: Sequence[str]) -> tuple[list[int], list[tuple[int, list[int]]]]:
        """The trace's tokens as glimp's contexts hold them, and each step's (start, content tokens)."""
        tokens = list(self.side.prompt_tokens(question))
        steps = []
        for text in texts:
            content = self.side.continuation(text)
            steps.append((len(tokens), content))
            tokens += content + list(self.side.delim_tokens)
        return tokens, steps

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Row i: the next-token logits after tokens[: i + 1]."""
        if len(tokens) > self.llm.n_ctx():
            raise ValueError(f"{len(tokens)} tokens do not fit n_ctx {self.llm.n_ctx()}")
        self.llm.reset()
        self.llm.eval(tokens)
        return self.llm.scores[: len(tokens)]

    def close(self) -> None:
        self.llm.close()


def marker_length(side: TokenSide, content: Sequence[int], pattern) -> int:
    """Tokens of a leading `probe_skip` match, read token by token as the probe does (0: none)."""
    data = b""
    for n, token in enumerate(content[:MAX_SKIP_TOKENS], 1):
        data += side.backend.token_bytes(token)
        match = pattern.fullmatch(data.decode("utf-8", errors="ignore"), partial=True)
        if match is None:
            return 0
        if not match.partial:
            return n if n < len(content) else 0  # the step needs a token of its own after the marker
    return 0


def score_trace(small: Scorer, large: Scorer, record: dict, pattern) -> list[dict]:
    """One row per probed step of a recorded trace: the small model's signals and, for its own steps, the labels."""
    steps = [Step.from_dict(s) for s in record["steps"]]
    texts = [s.text for s in steps]
    tokens, layout = small.layout(record["question"], texts)
    rows_small = small.logits(tokens)
    large_tokens, large_layout = large.layout(record["question"], texts)
    rows_large = large.logits(large_tokens)
    out = []
    for j, step in enumerate(steps):
        if step.h_init is None or step.forced:
            continue  # the answer handed over, or a forced one: no routing decision was made
        start, content = layout[j]
        if not content:
            continue
        first = rows_small[start - 1]
        entropies, logprobs = [], []
        for i, token in enumerate(content):
            lp, p = log_softmax(rows_small[start - 1 + i])
            entropies.append(float(-(p[p > 0] * lp[p > 0]).sum()))
            logprobs.append(float(lp[token]))
        skip = marker_length(small.side, content, pattern)
        # The first token of content, read across a content-free line (`\[`) into the next step's tokens.
        at = content_token(small.side.backend.token_bytes, tokens[start:], MAX_SKIP_TOKENS)
        row = {
            "id": record["id"], "index": j, "writer": step.model,
            "previous": steps[j - 1].model if j else None, "correct": record.get("correct"),
            "tokens": len(content), "text": step.text[:80],
            "h_recorded": step.h_init,
            "h_init": entropies[0],
            "h_init_top20": topk_entropy(first, 20),
            "top1_doubt": top1_doubt(first),
            "margin_doubt": margin_doubt(first),
            "h_skip": entropies[skip] if skip else entropies[0], "skip_tokens": skip,
            "h_content": exact_entropy(rows_small[start - 1 + at]) if at is not None else entropies[0],
            "content_tokens": at,
            "position": j,
            **{f"draft_mean{k}": first_tokens_entropy(entropies, k) for k in DRAFT_KS},
            **{f"draft_max{k}": first_tokens_entropy(entropies, k, "max") for k in DRAFT_KS},
            "step_entropy": float(np.mean(entropies)),
            "step_perplexity": perplexity(logprobs),
        }
        if step.model == SMALL:
            lstart, lcontent = large_layout[j]
            nll, disagree = [], []
            for i, token in enumerate(lcontent):
                lrow = rows_large[lstart - 1 + i]
                nll.append(-float(log_softmax(lrow)[0][token]))
                if i < DISAGREE_TOKENS:
                    disagree.append(int(np.argmax(lrow)) != token)
            row["large_nll"] = float(np.mean(nll))
            row["large_disagrees"] = any(disagree)
            row["large_disagrees_first"] = disagree[0]
        out.append(row)
    return out


def score_file(small: Scorer, large: Scorer, source: Path, path: Path, ids: set[str] | None, pattern) -> None:
    """Score every record of `source` (whose id is in `ids`) into `path`, one line per question, resumed."""
    done = {json.loads(line)["id"] for line in _lines(path)}
    with path.open("a", encoding="utf-8") as out:
        for record in (json.loads(line) for line in _lines(source)):
            if record["id"] in done or (ids is not None and record["id"] not in ids):
                continue
            try:
                rows = score_trace(small, large, record, pattern)
            except ValueError as exc:  # a trace longer than --scorer-ctx: said, not scored, not retried
                progress(f"{source.name} {record['id']}: not scored: {exc}")
                rows = []
            out.write(json.dumps({"id": record["id"], "steps": rows}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            progress(f"scored {source.name} {record['id']}: {len(rows)} steps")


def _lines(path: Path) -> list[str]:
    """A JSON Lines file's complete lines (a torn last line, from a kill, is left out)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    good = []
    for line in lines:
        try:
            json.loads(line)
            good.append(line)
        except ValueError:
            continue
    return good


# --- phase 3: the outcome label -----------------------------------------------------------------


def swapped(policy: Policy, role: str) -> Policy:
    """`policy` with its first routing decision made `role` (the steps before it are given)."""
    def fresh() -> Policy:
        calls = []

        def choose(h, rng):
            calls.append(h)
            return role if len(calls) == 1 else policy(h, rng)

        return dataclasses.replace(policy, name=f"{policy.name} (one step {role})", choose=choose, for_trace=None)

    return dataclasses.replace(fresh(), for_trace=fresh)


def outcome_jobs(records: list[dict]) -> list[tuple[dict, int, str]]:
    """(record, step index, who writes it instead): small steps of wrong traces, large steps of right ones.

    Only steps glimp routed (probed, before the answer): the ones a better signal could have routed otherwise.
    """
    jobs = []
    for record in records:
        if record.get("correct") is None:
            continue
        own = LARGE if record["correct"] else SMALL  # the writer a swap can change the outcome of
        for j, step in enumerate(record["steps"]):
            if step["h_init"] is None or step.get("forced"):
                break
            if step["model"] == own and step["stop_reason"] not in ("answer", "handover"):
                jobs.append((record, j, SMALL if own == LARGE else LARGE))
    return jobs


def outcome_files(runs_dir: Path) -> list[Path]:
    """The outcome label's files: one per worker (`--shard`), read together."""
    return sorted(runs_dir.glob("outcome*.jsonl"))


def run_outcomes(engine: Engine, pair: PairSpec, records: list[dict], runs_dir: Path, limit: int | None,
                 shard: tuple[int, int] = (0, 1)) -> None:
    """Each job's swapped trace (every `shard[1]`-th from `shard[0]`), graded, one line each (resumed)."""
    done = {(r["id"], r["index"]) for f in outcome_files(runs_dir) for r in map(json.loads, _lines(f))}
    k, n = shard
    path = runs_dir / ("outcome.jsonl" if n == 1 else f"outcome-{k}of{n}.jsonl")
    jobs = outcome_jobs(records)[:limit][k::n]
    todo = [job for job in jobs if (job[0]["id"], job[1]) not in done]
    progress(f"outcome: {len(jobs)} swapped steps, {len(todo)} to run")
    base = threshold(pair.tau)
    with path.open("a", encoding="utf-8") as out:
        for n, (record, j, role) in enumerate(todo, 1):
            given = [Step.from_dict(s) for s in record["steps"][:j]]
            trace = engine.router(swapped(base, role), pair).run(record["question"], given=given)
            steps = list(trace)
            if len(steps) <= j:
                progress(f"outcome: id {record['id']} step {j}: the replay ended before it ({trace.stop_reason})")
                continue
            extracted = extract_answer(trace.answer_text)
            correct = grade(extracted, record["reference"])
            line = {
                "id": record["id"], "index": j, "swapped_to": role, "base_correct": record["correct"],
                "correct": correct, "critical": bool(correct) if role == LARGE else not correct,
                "h_recorded": record["steps"][j]["h_init"], "h_replayed": steps[j].h_init,
                "step_text": steps[j].text[:120], "answer": extracted, "stop_reason": trace.stop_reason,
            }
            out.write(json.dumps(line) + "\n")
            out.flush()
            os.fsync(out.fileno())
            progress(f"outcome {n}/{len(todo)}: id {record['id']} step {j} -> {role}: "
                     f"{'critical' if line['critical'] else 'same'}")


# --- report -------------------------------------------------------------------------------------

# (column, name, tokens drawn before deciding)
SIGNALS = [
    ("random", "random (the floor)", "0"),
    ("h_init", "H_init exact", "0"),
    ("h_init_top20", "H_init, top-20 estimate (the paper's)", "0"),
    ("top1_doubt", "1 - top-1 probability", "0"),
    ("margin_doubt", "1 - (top-1 - top-2) margin", "0"),
    ("h_skip", "H_init read past a list marker (probe_skip)", "the marker (1-3)"),
    ("h_content", "H_init at the first token of content", "the markup (0-8)"),
    ("draft_mean2", "mean entropy, first 2 tokens", "1"),
    ("draft_max2", "max entropy, first 2 tokens", "1"),
    ("draft_mean4", "mean entropy, first 4 tokens", "3"),
    ("draft_max4", "max entropy, first 4 tokens", "3"),
    ("position", "step position", "0"),
    ("after_large", "previous step by the large model", "0"),
    ("step_entropy", "whole draft: mean entropy (reference)", "the step"),
    ("step_perplexity", "whole draft: perplexity (reference)", "the step"),
]


def signal_value(row: dict, column: str, rng: np.random.Generator) -> float:
    if column == "random":
        return float(rng.random())
    if column == "after_large":
        return float(row["previous"] == LARGE)
    return float(row[column])


@dataclass(frozen=True)
class Cell:
    value: float | None
    low: float | None
    high: float | None


def judge(rows: list[dict], label: Callable[[dict], object], kind: str, seed: int = 0) -> dict[str, Cell]:
    """Per signal: AUROC (kind "auroc") or Spearman's rho (kind "rho") against `label`, with a bootstrap interval."""
    rows = [r for r in rows if label(r) is not None]
    groups = [str(r["id"]) for r in rows]
    y = [label(r) for r in rows]
    cells = {}
    for column, _, _ in SIGNALS:
        rng = np.random.default_rng(seed)
        x = [signal_value(r, column, rng) for r in rows]
        if kind == "auroc":
            cells[column] = Cell(*bootstrap_auroc(x, [bool(v) for v in y], groups))
        else:
            cells[column] = Cell(*bootstrap(spearman, x, [float(v) for v in y], groups))
    return cells


def load_rows(path: Path) -> list[dict]:
    """The scored steps of a scores file; a trace scored before a signal existed is named, not guessed."""
    needed = {column for column, _, _ in SIGNALS} - {"random", "after_large"}
    rows = []
    for line in _lines(path):
        trace = json.loads(line)
        missing = sorted(needed - set(trace["steps"][0])) if trace["steps"] else []
        if missing:
            raise SystemExit(f"{path}: trace {trace['id']} has no {', '.join(missing)} (scored by an older "
                             "bench/signals.py): delete its line and run --phases score again")
        rows.extend(trace["steps"])
    return rows


def _fmt(cell: Cell) -> str:
    if cell.value is None:
        return "-"
    if cell.low is None:
        return f"{cell.value:.3f}"
    return f"{cell.value:.3f} ({cell.low:.3f}-{cell.high:.3f})"


def report(runs_dir: Path, console: Console, markdown: Path | None, plot: Path | None) -> None:
    judge_rows = [r for r in load_rows(runs_dir / "scores-judge.jsonl") if r["writer"] == SMALL]
    base_rows = load_rows(runs_dir / "scores-glimp.jsonl")
    outcomes = [json.loads(line) for f in outcome_files(runs_dir) for line in _lines(f)]
    by_key = {(r["id"], r["index"]): r for r in base_rows}
    outcome_rows = []
    for o in outcomes:
        row = by_key.get((o["id"], o["index"]))
        if row is not None:
            outcome_rows.append({**row, "critical": o["critical"], "swapped_to": o["swapped_to"]})
    columns = [
        ("large model disagrees, first 4 tokens", judge_rows, lambda r: r.get("large_disagrees"), "auroc"),
        ("large model NLL of the step (rho)", judge_rows, lambda r: r.get("large_nll"), "rho"),
        ("critical (outcome), all", outcome_rows, lambda r: r["critical"], "auroc"),
        ("critical, small steps of wrong traces", outcome_rows,
         lambda r: r["critical"] if r["swapped_to"] == LARGE else None, "auroc"),
        ("critical, large steps of right traces", outcome_rows,
         lambda r: r["critical"] if r["swapped_to"] == SMALL else None, "auroc"),
    ]
    results = [(title, judge(rows, label, kind)) for title, rows, label, kind in columns]
    counts = []
    for title, rows, label, _ in columns:
        kept = [r for r in rows if label(r) is not None]
        positives = sum(bool(label(r)) for r in kept) if columns[1][0] != title else None
        counts.append(f"{title}: {len(kept)} steps of {len({r['id'] for r in kept})} questions"
                      + (f", {positives} positive" if positives is not None else ""))
    table = Table(title="routing signals, step by step (AUROC or rho, 95% bootstrap interval over questions)")
    table.add_column("signal")
    table.add_column("drawn before deciding", justify="right")
    for title, _ in results:
        table.add_column(title, justify="right")
    for column, name, cost in SIGNALS:
        table.add_row(name, cost, *(_fmt(cells[column]) for _, cells in results))
    console.print(table)
    for line in counts:
        console.print(line)
    agreement = cheap_vs_outcome(outcome_rows)
    for line in agreement:
        console.print(line)
    if markdown is not None:
        lines = ["| signal | drawn before deciding | " + " | ".join(t for t, _ in results) + " |",
                 "|---|---|" + "---|" * len(results)]
        for column, name, cost in SIGNALS:
            lines.append(f"| {name} | {cost} | " + " | ".join(_fmt(cells[column]) for _, cells in results) + " |")
        markdown.write_text("\n".join(lines + [""] + [f"- {c}" for c in counts + agreement]) + "\n", encoding="utf-8")
    if plot is not None:
        write_plot(plot, results)


def cheap_vs_outcome(outcome_rows: list[dict]) -> list[str]:
    """How the cheap labels rank the outcome-critical steps (small-written steps, where both exist)."""
    rows = [r for r in outcome_rows if r.get("large_nll") is not None]
    if not rows:
        return ["cheap labels vs outcome: no small-written step with both"]
    groups = [str(r["id"]) for r in rows]
    y = [bool(r["critical"]) for r in rows]
    nll = Cell(*bootstrap_auroc([r["large_nll"] for r in rows], y, groups))
    dis = Cell(*bootstrap_auroc([float(r["large_disagrees"]) for r in rows], y, groups))
    return [f"cheap labels vs outcome on {len(rows)} small-written steps ({sum(y)} critical): "
            f"AUROC of the large model's NLL {_fmt(nll)}, of its disagreement {_fmt(dis)}"]


def write_plot(path: Path, results: list[tuple[str, dict[str, Cell]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(t, c) for t, c in results if "rho" not in t]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 6), sharey=True)
    names = [name for _, name, _ in SIGNALS]
    ys = np.arange(len(names))
    for ax, (title, cells) in zip(np.atleast_1d(axes), shown):
        for y, (column, _, _) in zip(ys, SIGNALS):
            cell = cells[column]
            if cell.value is None:
                continue
            colour = "grey" if column == "random" else ("C3" if column == "h_init" else "C0")
            ax.plot([cell.value], [y], "o", color=colour)
            if cell.low is not None:
                ax.plot([cell.low, cell.high], [y, y], "-", color=colour)
        ax.axvline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("AUROC")
    np.atleast_1d(axes)[0].set_yticks(ys, names, fontsize=8)
    np.atleast_1d(axes)[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", help="pair from models.yaml (default: its default pair)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="held-out questions to judge on")
    p.add_argument("--judge-questions", type=int, default=300)
    p.add_argument("--judge-offset", type=int, default=0)
    p.add_argument("--calibration-questions", type=int, help="only the first N calibration questions")
    p.add_argument("--base", type=Path, default=DEFAULT_BASE,
                   help="glimp traces at the default tau the outcome label swaps steps of (default: %(default)s)")
    p.add_argument("--outcome-steps", type=int, help="run only the first N swapped steps")
    p.add_argument("--shard", default="0/1", help="K/N: this worker runs every N-th swapped step from the K-th "
                   "(start N workers, each with its own file, to use N cores)")
    p.add_argument("--phases", default="traces,score,outcome", help="which phases to run, comma-separated")
    p.add_argument("--forced-answer-tokens", type=int, default=0,
                   help="as bench/tradeoff.py's runs were made (default 0: their files resume here)")
    p.add_argument("--threads", type=int, help="threads per model (default: every core)")
    p.add_argument("--scorer-ctx", type=int, default=2048, help="context of the logits_all replays")
    p.add_argument("--runs-dir", type=Path, help="default: bench/results/signals-<pair>")
    p.add_argument("--report", action="store_true", help="print the tables from the recorded files only")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(highlight=False, width=220)
    registry = load_registry()
    pair = dataclasses.replace(registry.pair(args.pair), forced_answer_tokens=args.forced_answer_tokens)
    if args.threads:
        for role in (SMALL, LARGE):
            name = getattr(pair, role)
            registry.models[name] = dataclasses.replace(registry.model(name), threads=args.threads)
    runs_dir = args.runs_dir or REPO / "bench" / "results" / f"signals-{pair.name}"
    if args.report:
        report(runs_dir, console, args.markdown, args.plot)
        return 0
    runs_dir.mkdir(parents=True, exist_ok=True)
    phases = set(args.phases.split(","))
    judge_questions, _ = load_questions(args.data, limit=args.judge_questions, offset=args.judge_offset)
    cal_questions, _ = load_questions(calibrate.calibration_set(), limit=args.calibration_questions)
    engine = Engine.load(registry, pair, {SMALL, LARGE})
    pattern = compile_probe_skip(MARKER, "marker")
    try:
        if "traces" in phases:
            record_small(engine, pair, cal_questions, runs_dir / "small-cal.jsonl", calibration=True)
            record_small(engine, pair, judge_questions, runs_dir / "small-judge.jsonl", calibration=False)
        if "score" in phases:
            router = engine.router(threshold(pair.tau), pair)
            small = Scorer(router._sides[SMALL], args.scorer_ctx, args.threads)
            large = Scorer(router._sides[LARGE], args.scorer_ctx, args.threads)
            try:
                # glimp's traces first: the outcome label's steps are theirs.
                score_file(small, large, args.base, runs_dir / "scores-glimp.jsonl", None, pattern)
                score_file(small, large, runs_dir / "small-judge.jsonl", runs_dir / "scores-judge.jsonl", None, pattern)
                score_file(small, large, runs_dir / "small-cal.jsonl", runs_dir / "scores-cal.jsonl", None, pattern)
            finally:
                small.close()
                large.close()
        if "outcome" in phases:
            records = [json.loads(line) for line in _lines(args.base)]
            k, n = (int(x) for x in args.shard.split("/"))
            run_outcomes(engine, pair, records, runs_dir, args.outcome_steps, (k, n))
    except KeyboardInterrupt:
        progress("interrupted: every finished line is kept; rerun the same command to go on")
        return 130
    finally:
        engine.close()
    report(runs_dir, console, args.markdown, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
