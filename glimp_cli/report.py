"""Summaries of a batch results file (accuracy with a Wilson interval, latency, tokens, shares per mode) and the
statistics that compare runs (paired McNemar) and rank signals (AUROC with a bootstrap interval)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.table import Table

from glimp_cli.errors import InputError
from glimp_cli.policies import LARGE, MODES, SMALL

Z95 = 1.959963984540054  # two-sided 95% standard normal quantile
# What `summarize` reads from each record, and its JSON type.
_REQUIRED = {"id": str, "mode": str, "wall_seconds": (int, float), "tokens": dict, "model_steps": dict,
             "settings": dict}


@dataclass(frozen=True)
class ModeRow:
    """One mode's summary; latencies in seconds, shares pooled over all its steps or tokens."""

    mode: str
    n: int
    n_graded: int
    correct: int
    accuracy: float | None
    ci_low: float | None  # 95% Wilson interval of the accuracy
    ci_high: float | None
    mean_latency: float
    median_latency: float
    latency_vs_large: float | None  # mean latency / large mode's, over the question ids both have
    compared_with_large: int  # how many question ids that ratio is over
    mean_tokens: dict[str, float]
    large_share_steps: float | None
    large_share_tokens: float | None
    baseline: bool  # every record's timings are an honest baseline (no routing work)
    timing: str  # the records' timing kind, or "mixed"
    forced: int = 0  # traces whose answer was forced (they had ended without one; see router.force_answer)


def load_results(path: str | Path) -> tuple[list[dict], list[str]]:
    """The records of a results file, and a warning per line that was skipped (naming the line).

    A repeated (id, mode) keeps its first record, so a file that was appended to twice is not
    counted double.
    """
    numbered, warnings = numbered_results(path)
    return [record for _, record in numbered], warnings


def numbered_results(path: str | Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """Like `load_results`, with each record's line number in the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read results file {path}: {exc.strerror or exc}") from None
    records: list[tuple[int, dict]] = []
    warnings: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        if number == len(lines):
            # No newline after it: a write that never finished (the run was killed).
            warnings.append(f"{path}: line {number} is incomplete (an interrupted write); skipped")
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            warnings.append(f"{path}: line {number} is not valid JSON; skipped")
            continue
        problem = _not_a_result(record)
        if problem:
            warnings.append(f"{path}: line {number} is not a glimp result ({problem}); skipped")
            continue
        key = (record["id"], record["mode"])
        if key in seen:
            warnings.append(f"{path}: line {number} repeats id {key[0]!r} mode {key[1]!r} "
                            f"from line {seen[key]}; skipped")
            continue
        seen[key] = number
        records.append((number, record))
    return records, warnings


def _not_a_result(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    bad = next((key for key, kind in _REQUIRED.items() if not isinstance(record.get(key), kind)), None)
    return None if bad is None else f"no valid {bad!r}"


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sound at small n and near 0 or 1)."""
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(records: list[dict]) -> list[ModeRow]:
    """A row per mode (known modes in their usual order, others after, sorted)."""
    by_mode: dict[str, list[dict]] = {}
    for record in records:
        by_mode.setdefault(record["mode"], []).append(record)
    large_latency = {r["id"]: r["wall_seconds"] for r in by_mode.get(LARGE, [])}
    order = [m for m in MODES if m in by_mode] + sorted(set(by_mode) - set(MODES))
    return [_row(mode, by_mode[mode], large_latency) for mode in order]


def _row(mode: str, rows: list[dict], large_latency: dict[str, float]) -> ModeRow:
    graded = [r["correct"] for r in rows if r.get("correct") is not None]
    correct = sum(bool(c) for c in graded)
    accuracy, low, high = None, None, None
    if graded:
        accuracy = correct / len(graded)
        low, high = wilson_interval(correct, len(graded))
    latencies = [r["wall_seconds"] for r in rows]
    paired = [(r["wall_seconds"], large_latency[r["id"]]) for r in rows if r["id"] in large_latency]
    large_mean = statistics.fmean(l for _, l in paired) if paired else 0.0
    ratio = statistics.fmean(t for t, _ in paired) / large_mean if large_mean > 0 else None
    timings = {r.get("timing") for r in rows}
    return ModeRow(
        mode=mode, n=len(rows), n_graded=len(graded), correct=correct, accuracy=accuracy,
        ci_low=low, ci_high=high,
        mean_latency=statistics.fmean(latencies), median_latency=statistics.median(latencies),
        latency_vs_large=ratio, compared_with_large=len(paired),
        mean_tokens={role: statistics.fmean(r["tokens"][role] for r in rows) for role in (SMALL, LARGE)},
        large_share_steps=_pooled_share(rows, "model_steps"),
        large_share_tokens=_pooled_share(rows, "tokens"),
        baseline=all(r["settings"].get("baseline") is True for r in rows),
        timing=timings.pop() if len(timings) == 1 else "mixed",
        forced=sum(1 for r in rows if r.get("forced_answer")),
    )


def _pooled_share(rows: list[dict], key: str) -> float | None:
    large = sum(r[key][LARGE] for r in rows)
    total = large + sum(r[key][SMALL] for r in rows)
    return large / total if total else None


def rows_to_json(rows: list[ModeRow]) -> list[dict]:
    """The rows as plain data (the `--json` output)."""
    return [asdict(row) for row in rows]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render_table(rows: list[ModeRow]) -> Table:
    """The per-mode comparison as a rich table."""
    table = Table(title="glimp batch report", title_justify="left", show_edge=False)
    for name in ("mode", "n", "accuracy (95% CI)", "mean s", "median s", "vs large",
                 "tokens small / large", "large share steps / tokens", "forced answers", "timing"):
        table.add_column(name, justify="left" if name in ("mode", "timing") else "right")
    for row in rows:
        accuracy = "-" if row.accuracy is None else (
            f"{row.accuracy:.1%} ({row.ci_low:.1%}–{row.ci_high:.1%}) of {row.n_graded}")
        versus = "-" if row.latency_vs_large is None else f"{row.latency_vs_large:.2f}× ({row.compared_with_large} q)"
        table.add_row(
            row.mode, str(row.n), accuracy, f"{row.mean_latency:.2f}", f"{row.median_latency:.2f}", versus,
            f"{row.mean_tokens[SMALL]:.0f} / {row.mean_tokens[LARGE]:.0f}",
            f"{_pct(row.large_share_steps)} / {_pct(row.large_share_tokens)}", str(row.forced), row.timing,
        )
    return table


# --- paired comparisons of runs on the same questions -------------------------------------------


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar p: how likely a split of the discordant pairs this uneven is under 50/50."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)


@dataclass(frozen=True)
class Paired:
    """Run A against run B on the questions both graded: where exactly one of them was right."""

    n: int
    wins: int  # A right, B wrong
    losses: int  # A wrong, B right
    p: float  # exact McNemar, two-sided

    @property
    def ties(self) -> int:
        return self.n - self.wins - self.losses


def paired_comparison(a: list[dict], b: list[dict], ids: set[str] | None = None) -> Paired:
    """Compare two runs' records question by question (`ids`: only those questions)."""
    right_b = {r["id"]: r["correct"] for r in b if r.get("correct") is not None}
    pairs = [(bool(r["correct"]), bool(right_b[r["id"]])) for r in a
             if r.get("correct") is not None and r["id"] in right_b and (ids is None or r["id"] in ids)]
    wins = sum(x and not y for x, y in pairs)
    losses = sum(y and not x for x, y in pairs)
    return Paired(len(pairs), wins, losses, mcnemar_p(wins, losses))


def recovered_gap(accuracy: float | None, small: float | None, large: float | None) -> float | None:
    """(accuracy - small alone) / (large alone - small alone): the share of the gap a run closes."""
    if accuracy is None or small is None or large is None or large == small:
        return None
    return (accuracy - small) / (large - small)


def common_ids(runs: list[list[dict]]) -> set[str]:
    """The question ids that every run has a record of."""
    sets = [{r["id"] for r in records} for records in runs]
    return set.intersection(*sets) if sets else set()


def run_row(records: list[dict], large: list[dict]) -> ModeRow:
    """One run's summary (its records all of one mode), latency relative to the large-alone records."""
    modes = {r["mode"] for r in records}
    if len(modes) != 1:
        raise ValueError(f"a run's records must share one mode, not {sorted(modes)}")
    mode = modes.pop()
    return next(row for row in summarize(records + ([] if mode == LARGE else large)) if row.mode == mode)


# --- how well a signal ranks steps by a label ----------------------------------------------------


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: how often a positive step scores above a negative one (ties count half).

    None when one class is empty.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank (Mann-Whitney's)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def bootstrap_auroc(scores: Sequence[float], labels: Sequence[bool], groups: Sequence[str],
                    n: int = 1000, seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """AUROC and its 95% interval, resampling whole groups (a question's steps are not independent)."""
    return bootstrap(auroc, scores, [bool(v) for v in labels], groups, n, seed)


def bootstrap(stat: Callable[[np.ndarray, np.ndarray], float | None], x: Sequence[float], y: Sequence,
              groups: Sequence[str], n: int = 1000, seed: int = 0) -> tuple[float | None, float | None, float | None]:
    """`stat(x, y)` and its 95% percentile interval over `n` resamples of whole groups."""
    point = stat(x, y)
    if point is None:
        return None, None, None
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    members = [np.array(v) for v in by_group.values()]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        picked = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
        value = stat(xs[picked], ys[picked])
        if value is not None:
            draws.append(value)
    if not draws:
        return point, None, None
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    rx, ry = _average_ranks(np.asarray(x, dtype=np.float64)), _average_ranks(np.asarray(y, dtype=np.float64))
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])
