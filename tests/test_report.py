"""Tests for glimp_cli.report: reading results files and the per-mode arithmetic, on hand-made records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from glimp_cli.batch import BASELINE, PROBED, ROUTED, pair_settings, run_batch
from glimp_cli.config import PairSpec
from glimp_cli.errors import InputError
from glimp_cli.questions import Question
from glimp_cli.report import load_results, render_table, rows_to_json, summarize, wilson_interval
from glimp_cli.results_file import ResultsFile
from test_batch import Routers, settings_for

Z = 1.959963984540054


def rec(id: str, mode: str, correct: bool | None, wall: float, steps=(1, 1), tokens=(10, 10),
        timing: str = ROUTED) -> dict:
    """A hand-made record; `steps` and `tokens` are (small, large)."""
    return {
        "id": id, "mode": mode, "correct": correct, "wall_seconds": wall, "timing": timing,
        "model_steps": {"small": steps[0], "large": steps[1]},
        "tokens": {"small": tokens[0], "large": tokens[1]},
        "settings": {"mode": mode, "baseline": timing == BASELINE},
    }


def wilson_by_roots(k: int, n: int) -> tuple[float, float]:
    # The Wilson bounds are the p where |k/n - p| = z * sqrt(p(1-p)/n): roots of a quadratic.
    p_hat = k / n
    a = 1 + Z * Z / n
    b = -(2 * p_hat + Z * Z / n)
    c = p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k, n", [(7, 10), (0, 5), (5, 5), (1, 3), (412, 1319)])
def test_wilson_interval(k: int, n: int) -> None:
    assert wilson_interval(k, n) == pytest.approx(wilson_by_roots(k, n), abs=1e-12)


def test_wilson_interval_for_7_of_10() -> None:
    assert wilson_interval(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)


def test_summary_arithmetic_on_hand_made_records() -> None:
    glimp_walls = [4.0, 6.0, 5.0, 3.0, 2.0, 9.0, 8.0, 7.0, 1.0, 10.0]
    records = [rec(f"a{i}", "glimp", i < 7, wall) for i, wall in enumerate(glimp_walls)]
    records.append(rec("ungraded", "glimp", None, 100.0, steps=(3, 1), tokens=(30, 0)))
    large_walls = [10.0, 20.0, 30.0, 40.0, 50.0]
    records += [rec(f"a{i}", "large", True, wall, steps=(0, 2), tokens=(0, 40), timing=BASELINE)
                for i, wall in enumerate(large_walls)]
    records.append(rec("only-large", "large", False, 1000.0, steps=(0, 2), tokens=(0, 40), timing=BASELINE))

    glimp, large = summarize(records)
    assert (glimp.mode, glimp.n, glimp.n_graded, glimp.correct) == ("glimp", 11, 10, 7)
    assert glimp.accuracy == pytest.approx(0.7)
    assert (glimp.ci_low, glimp.ci_high) == pytest.approx(wilson_by_roots(7, 10))
    assert glimp.mean_latency == pytest.approx((sum(glimp_walls) + 100.0) / 11)
    assert glimp.median_latency == 6.0
    # Only the ids both modes ran count: a0..a4, not "ungraded" nor "only-large".
    assert glimp.compared_with_large == 5
    assert glimp.latency_vs_large == pytest.approx((4 + 6 + 5 + 3 + 2) / 5 / ((10 + 20 + 30 + 40 + 50) / 5))
    assert large.latency_vs_large == pytest.approx(1.0) and large.compared_with_large == 6
    # Pooled, not a mean of per-question shares: (10 * 1 + 1) / (10 * 2 + 4).
    assert glimp.large_share_steps == pytest.approx(11 / 24)
    assert glimp.large_share_tokens == pytest.approx(100 / 230)
    assert glimp.mean_tokens == pytest.approx({"small": 130 / 11, "large": 100 / 11})
    assert (glimp.baseline, glimp.timing) == (False, ROUTED)
    assert (large.baseline, large.timing) == (True, BASELINE)
    assert (large.accuracy, large.large_share_steps) == (5 / 6, 1.0)


def test_without_large_rows_there_is_no_relative_latency_and_ungraded_modes_have_no_accuracy() -> None:
    rows = summarize([
        rec("a", "small", None, 1.0, timing=BASELINE),
        rec("a", "random", True, 2.0),
        rec("b", "random", True, 4.0, timing=PROBED),
    ])
    assert [r.mode for r in rows] == ["small", "random"]
    small, random = rows
    assert small.latency_vs_large is None and random.latency_vs_large is None
    assert (small.accuracy, small.ci_low, small.ci_high, small.n_graded) == (None, None, None, 0)
    assert (random.timing, random.baseline) == ("mixed", False)
    assert random.median_latency == 3.0


def test_load_results_skips_bad_lines_and_names_them(tmp_path: Path) -> None:
    good = [json.dumps(rec(i, "glimp", True, 1.0)) for i in ("a", "b", "c")]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join([good[0], "{not json", "[1, 2]", good[1], json.dumps({"id": "x", "mode": "glimp"}),
                               good[0], good[2], '{"id": "d", "mo']))
    records, warnings = load_results(path)
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert [w.split(": ", 1)[1].split(" ", 2)[:2] for w in warnings] == [
        ["line", "2"], ["line", "3"], ["line", "5"], ["line", "6"], ["line", "8"]]
    assert "incomplete" in warnings[-1] and "from line 1" in warnings[3] and "'wall_seconds'" in warnings[2]
    assert all(str(path) in w for w in warnings)
    with pytest.raises(InputError, match="missing.jsonl"):
        load_results(tmp_path / "missing.jsonl")


def test_report_on_an_interrupted_batch(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    questions = [Question(f"q{i}", f"question {i}?", "42", i) for i in range(1, 4)]
    key = pair_settings(PairSpec("fake", "s", "l", tau=1.0))
    out, done = ResultsFile.open(path, resume=False, settings_key=key)
    with out:
        run_batch(Routers(), questions, ["glimp", "small", "large"], out, done, settings_for(None))
    with path.open("a") as f:
        f.write('{"id": "q4", "mode": "glimp", "wall')  # the write that Ctrl-C cut short

    records, warnings = load_results(path)
    assert len(records) == 9 and len(warnings) == 1 and "line 10" in warnings[0]
    rows = {row.mode: row for row in summarize(records)}
    assert (rows["glimp"].accuracy, rows["small"].accuracy, rows["large"].accuracy) == (1.0, 0.0, 1.0)
    assert rows["glimp"].large_share_steps == pytest.approx(3 / 5)
    assert (rows["small"].baseline, rows["large"].baseline, rows["glimp"].baseline) == (True, True, False)
    assert rows["small"].compared_with_large == 3 and rows["small"].latency_vs_large > 0

    data = rows_to_json(list(rows.values()))
    assert json.loads(json.dumps(data)) == data
    assert {d["mode"] for d in data} == {"glimp", "small", "large"} and data[0]["n"] == 3

    console = Console(record=True, width=200)
    console.print(render_table(list(rows.values())))
    text = console.export_text()
    assert "100.0% (43.9%–100.0%) of 3" in text and "0.0% (0.0%–56.1%) of 3" in text
    assert "routed" in text and "baseline" in text


def test_forced_answers_are_counted_per_mode() -> None:
    records = [rec(f"q{i}", "glimp", True, 1.0) for i in range(4)] + [rec("q0", "large", False, 2.0)]
    records[1]["forced_answer"] = "repetition"
    records[2]["forced_answer"] = "max_tokens"
    records[-1]["forced_answer"] = None  # a trace that stated its own answer
    rows = {row.mode: row for row in summarize(records)}
    assert rows["glimp"].forced == 2 and rows["large"].forced == 0
    console = Console(record=True, width=200)
    console.print(render_table(list(rows.values())))
    assert "forced answers" in console.export_text()
