"""glimp calibrate: quantile and interval arithmetic, traces files, the sweep, the picture, --write, held-out checks.

Everything but the last test runs without a model: traces are written by the real batch loop over the
scripted fake pair, and the CLI is pointed at them with --traces (Engine.load is made to fail, so a
test that loads a model by mistake fails too). The last test runs a tiny real sweep on the tiny pair.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import FIVE_STEPS, GSM8K_QUESTIONS, fake_router
from glimp_cli import calibrate as cal
from glimp_cli.batch import pair_settings, run_batch
from glimp_cli.cli import app
from glimp_cli.config import PairSpec, load_registry, packaged_config
from glimp_cli.errors import ConfigError, InputError, MissingExtraError, UsageError
from glimp_cli.policies import adaptive, make_policy, share_threshold
from glimp_cli.questions import Question
from glimp_cli.report import ModeRow
from glimp_cli.results_file import ResultsFile

SCRIPT_H = [s.h_init for s in FIVE_STEPS]  # the small model's H_init at each step
PAIR = PairSpec("default", "smollm2-135m", "gemma3-270m", tau=1.0)
QUESTIONS = [Question(f"q{i}", f"question number {i}?", "42", i) for i in range(1, 5)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("isolated")



def fake_make_router(calls: list | None = None):
    def make(policy):
        if calls is not None:
            calls.append(policy.name)
        return fake_router(FIVE_STEPS, policy)
    return make


def write_traces(path: Path, modes=("small", "large"), questions=QUESTIONS) -> Path:
    """A real results file: the batch loop over the fake pair."""
    settings = {**pair_settings(PAIR), "large_share": None}
    out, done = ResultsFile.open(path, resume=False, settings_key=settings)
    with out:
        run_batch(lambda mode, s: fake_make_router()(make_policy(mode, PAIR.tau, 0.0)), questions, list(modes),
                  out, done, lambda mode: settings)
    # The fake's logits give each scripted H_init to ~1e-5: round them to the script's own numbers,
    # so the arithmetic below is on exactly the hand-made values.
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        for step in record["steps"]:
            if step["h_init"] is not None:
                step["h_init"] = round(step["h_init"], 4)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, ["calibrate", *args])


# --- arithmetic on hand-made values -------------------------------------------------------------


def test_share_threshold_is_the_kth_smallest_value() -> None:
    values = [0.9, 0.1, 0.5, 0.3, 0.7, 1.1, 1.3, 1.5, 1.7, 1.9]  # sorted: 0.1 0.3 ... 1.9
    # k = round(10 * (1 - share)) values stay at or below tau.
    assert share_threshold(values, 0.3) == 1.3  # k = 7: 1.5, 1.7, 1.9 above
    assert share_threshold(values, 0.25) == 1.5  # k = 7.5 rounds half up to 8
    assert share_threshold(values, 0.0) == 1.9
    assert share_threshold(values, 1.0) == -math.inf
    assert share_threshold(values, 0.05) == 1.9  # k = 9.5 -> 10


def test_round_tau_only_rounds_up_and_keeps_short_values() -> None:
    assert cal.round_tau(2.31) == 2.31  # 2.31 * 1e4 is not exactly 23100 in binary: no spurious bump
    assert cal.round_tau(1.23451) == 1.2346
    assert cal.round_tau(1.23449) == 1.2345
    assert cal.round_tau(-math.inf) == -math.inf


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, written out independently of glimp's."""
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = (z / (1 + z**2 / n)) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return centre - half, centre + half


def test_choose_by_share_gives_tau_the_realized_share_and_both_intervals() -> None:
    values = [round(0.1 * i, 1) for i in range(1, 21)]  # 0.1 .. 2.0, twenty steps
    at = cal.choose_by_share(values, 0.3)
    assert at.tau == 1.4 and at.above == 6 and at.n == 20 and at.share == 0.3  # k = 14
    # 6 of 20: the textbook Wilson interval, about 14.5%-51.9%.
    assert at.ci == pytest.approx(wilson(6, 20))
    assert at.ci == pytest.approx((0.1455, 0.5190), abs=1e-4)
    # Mapped back: share 51.9% -> k = floor(20 * 0.481) = 9 -> 0.9; share 14.5% -> k = ceil(20 * 0.855) = 18 -> 1.8.
    assert at.tau_ci == (0.9, 1.8)
    assert at.tau_ci[0] <= at.tau <= at.tau_ci[1]


def test_share_at_counts_only_values_strictly_above_tau() -> None:
    at = cal.share_at([1.0, 1.0, 2.0, 3.0], 1.0)
    assert (at.above, at.n, at.target, at.tau_ci) == (2, 4, None, None)


def test_ties_make_the_realized_share_differ_from_the_target() -> None:
    at = cal.choose_by_share([1.0] * 8 + [2.0, 3.0], 0.5)  # k = 5 is a 1.0, like the four below it
    assert at.tau == 1.0 and at.share == pytest.approx(0.2)


def test_histogram_splits_the_bin_that_holds_tau() -> None:
    bins = cal.histogram([0.1, 0.2, 0.6, 0.7, 0.75, 1.9], tau=0.7, bins=4)
    assert cal.nice_width(1.8, 4) == 0.5
    assert [(b.low, b.high) for b in bins] == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, 2.0)]
    assert [(b.small, b.large) for b in bins] == [(2, 0), (2, 1), (0, 0), (0, 1)]


# --- the adaptive policy ------------------------------------------------------------------------


def test_adaptive_warms_up_at_tau0_then_routes_by_the_share_the_trace_owes() -> None:
    policy = adaptive(0.5, tau0=1.0, warmup=2)
    trace = policy.for_trace()
    routes = [trace(h, None) for h in [0.5, 2.0, 0.1, 3.0, 0.2, 0.4]]
    # Warm-up at tau0 = 1.0: small, large. Then the trace owes d = 0.5 t - L large steps, and a step
    # goes large when it is above share_threshold(seen, d):
    #   t=3: d=0.5, seen .1 .5 2 -> k=2 -> .5: 0.1 small;  t=4: d=1 -> -inf: 3.0 large;
    #   t=5: d=0.5, seen .1 .2 .5 2 3 -> k=3 -> .5: 0.2 small;  t=6: d=1: 0.4 large (the share is owed).
    assert routes == ["small", "large", "small", "large", "small", "large"]
    # A new trace starts from scratch: within warm-up 0.9 is below tau0 whatever the old trace saw.
    assert policy.for_trace()(0.9, None) == "small" and policy.for_trace()(1.5, None) == "large"


def test_adaptive_never_takes_a_step_the_trace_does_not_owe() -> None:
    trace = adaptive(0.25, tau0=1.0, warmup=0).for_trace()
    # t=1: d=0.25, seen [5] -> k=1 -> 5: small although 5 nats is hard; t=2: d=0.5, k=1 -> 5: 9 large;
    # t=3: d=-0.25 -> share 0: small whatever the step.
    assert [trace(h, None) for h in [5.0, 9.0, 9.5]] == ["small", "large", "small"]


def test_adaptive_holds_the_share_within_each_trace_where_a_fixed_tau_does_not() -> None:
    easy = [0.1, 0.2, 0.15, 0.3, 0.25, 0.1, 0.2, 0.3]
    hard = [3.0, 2.5, 3.5, 2.8, 3.2, 2.9, 3.1, 2.7]
    fixed = make_policy("glimp", 1.0, 0.0)
    assert [fixed(h, None) for h in easy].count("large") == 0 and [fixed(h, None) for h in hard].count("large") == 8
    policy = make_policy("adaptive", 1.0, 0.0, adaptive_share=0.25, adaptive_warmup=0)
    for steps in (easy, hard):
        trace = policy.for_trace()
        assert [trace(h, None) for h in steps].count("large") == 2  # 25% of 8


def test_adaptive_runs_through_the_batch_loop(tmp_path: Path) -> None:
    path = write_traces(tmp_path / "a.jsonl", modes=("adaptive",), questions=QUESTIONS[:2])
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["mode"] for r in records] == ["adaptive", "adaptive"]
    assert records[0]["policy"].startswith("adaptive(large_share=0.3")
    # Both questions see the same script, and each trace starts afresh: the same routes twice.
    assert [s["model"] for s in records[0]["steps"]] == [s["model"] for s in records[1]["steps"]]
    assert [s["model"] for s in records[0]["steps"]][:2] == ["small", "large"]  # warm-up at tau 1.0


# --- calibrating from recorded traces, without a model --------------------------------------------


def test_distribution_from_traces_reads_every_probed_step(tmp_path: Path) -> None:
    path = write_traces(tmp_path / "r.jsonl", modes=("large", "small"))
    dist = cal.distribution_from_traces(path)
    assert dist.mode == "small" and dist.n_traces == 4  # large alone records none: small is chosen
    assert list(dist.values) == pytest.approx(sorted(SCRIPT_H * 4), abs=1e-4)
    assert dist.recorded_with == {("default", "exact")}
    only_two = cal.distribution_from_traces(path, "small", {"q1", "q2"})
    assert only_two.n == 10


def test_calibrate_from_traces_prints_tau_share_and_histogram(tmp_path: Path, no_models) -> None:
    path = write_traces(tmp_path / "r.jsonl")
    result = invoke("--traces", str(path), "--large-share", "0.4")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "H_init of 20 steps in 4 traces (small mode)" in out
    # Four each of 0.1 0.3 0.5 1.5 2.0: k = 12 -> the 12th smallest is 0.5, and 8 steps lie above it.
    assert "tau 0.5000 for a large share of 40%: 8 of 20 recorded steps (40.0%) are above it" in out
    assert "┄┄ tau 0.5000 ┄┄" in out and "small 60.0% (12)" in out and "large 40.0% (8)" in out


def test_calibrate_marks_the_pairs_tau_without_a_target(tmp_path: Path, no_models) -> None:
    path = write_traces(tmp_path / "r.jsonl")
    result = invoke("--traces", str(path), "--tau", "0.4")
    assert result.exit_code == 0, result.output
    assert "tau 0.4000: 12 of 20 recorded steps (60.0%) are above it" in result.stdout


def one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("glimp: error: "), result.stderr
    return lines[0]


def test_a_torn_last_line_is_a_one_line_error_naming_it(tmp_path: Path, no_models) -> None:
    path = write_traces(tmp_path / "r.jsonl")
    data = path.read_bytes()
    path.write_bytes(data + data.splitlines(keepends=True)[0][:50])  # a ninth line cut off mid-write
    line = one_line_error(invoke("--traces", str(path)))
    assert f"{path}: line 9 is incomplete" in line and "--resume" in line


def test_a_damaged_line_in_the_middle_is_an_error_naming_it(tmp_path: Path, no_models) -> None:
    path = write_traces(tmp_path / "r.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][:40] + "\n"
    path.write_text("".join(lines))
    assert f"{path}: line 3 is not valid JSON" in one_line_error(invoke("--traces", str(path)))


@pytest.mark.parametrize("damage, message", [
    (lambda step: step.pop("h_init"), "line 2: step 3 has no h_init"),
    (lambda step: step.update(h_init="high"), "line 2: step 3 has h_init 'high', not an entropy in nats"),
    (lambda step: step.update(h_init=-1.0), "line 2: step 3 has h_init -1.0"),
])
def test_a_step_without_a_valid_h_init_names_its_line(tmp_path: Path, no_models, damage, message) -> None:
    path = write_traces(tmp_path / "r.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    damage(records[1]["steps"][2])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert f"{path}: {message}" in one_line_error(invoke("--traces", str(path)))


def test_traces_with_no_h_init_anywhere_are_refused_naming_the_lines(tmp_path: Path, no_models) -> None:
    path = write_traces(tmp_path / "large.jsonl", modes=("large",))  # large alone probes nothing
    line = one_line_error(invoke("--traces", str(path)))
    assert f"{path}: no step on lines 1-4 carries an h_init" in line and "--mode small" in line
    line = one_line_error(invoke("--traces", str(path), "--traces-mode", "small"), 2)
    assert f"{path} holds no small traces (it has large)" in line


# --- held-out honesty -----------------------------------------------------------------------------


def test_overlap_with_the_evaluation_file_is_refused_and_counted(tmp_path: Path, no_models) -> None:
    path = write_traces(tmp_path / "r.jsonl")
    evaluation = tmp_path / "eval.jsonl"
    rows = [{"question": "QUESTION   number 2?"}, {"question": "question number 4?"}, {"question": "unrelated"}]
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_line_error(invoke("--traces", str(path), "--exclude", str(evaluation)), code=2)
    assert "2 of 4 calibration questions also appear in" in line and "--allow-overlap" in line
    allowed = invoke("--traces", str(path), "--exclude", str(evaluation), "--allow-overlap")
    assert allowed.exit_code == 0 and "glimp: warning: 2 of 4 calibration questions" in allowed.stderr
    evaluation.write_text(json.dumps({"question": "unrelated"}) + "\n")
    assert invoke("--traces", str(path), "--exclude", str(evaluation)).exit_code == 0


def test_the_shipped_calibration_set_is_kept_apart_from_the_benchmark_questions() -> None:
    from glimp_cli.questions import load_questions

    shipped, skipped = load_questions(cal.calibration_set())
    assert len(shipped) == 100 and not skipped and all(q.reference for q in shipped)
    # The benchmarks and the real-model tests evaluate on the first GSM8K test rows.
    assert cal.count_overlap((q.question for q in shipped), GSM8K_QUESTIONS) == 0
    # ... and on data/gsm8k/test-1-1219.jsonl, the rows of GSM8K's test split before the calibration rows.
    evaluation, _ = load_questions(Path(__file__).resolve().parents[1] / "data/gsm8k/test-1-1219.jsonl")
    assert len(evaluation) == 1219
    assert cal.count_overlap((q.question for q in shipped), (q.question for q in evaluation)) == 0


# --- the sweep on the fake pair -------------------------------------------------------------------


def test_sweep_writes_one_file_per_run_and_a_rerun_reuses_them(tmp_path: Path) -> None:
    calls: list[str] = []
    result = cal.run_calibration(QUESTIONS, PAIR, fake_make_router(calls), tmp_path / "runs", [0.2, 0.6],
                                 adaptive=True)
    values = sorted(SCRIPT_H * 4)
    assert list(result.dist.values) == pytest.approx(values, abs=1e-4)
    # 20 values: share 0.2 -> k = 16 -> 1.5; share 0.6 -> k = 8 -> 0.3 (as the fake's logits give them,
    # to ~1e-5, rounded up to 4 decimals).
    taus = [run.tau for run in result.runs]
    assert taus[1:3] == [pytest.approx(1.5, abs=2e-4), pytest.approx(0.3, abs=2e-4)]
    assert [run.label for run in result.runs] == [
        "small alone", f"glimp tau {taus[1]:.4f}", f"glimp tau {taus[2]:.4f}", "adaptive 20%", "adaptive 60%",
        "large alone"]
    assert [run.tau for run in result.runs[3:5]] == taus[1:3]  # adaptive warms up at the same share's tau
    assert len(calls) == 6 and all(run.path.exists() for run in result.runs)
    rows = cal.frontier(result.runs, QUESTIONS)
    share = {row.run.label: row.stats.large_share_steps for row in rows}
    # tau 0.3: 0.5, 2.0, 1.5 go large, plus the answer step; tau 1.5: only 2.0 and the answer.
    assert share[f"glimp tau {taus[2]:.4f}"] == pytest.approx(4 / 5)
    assert share[f"glimp tau {taus[1]:.4f}"] == pytest.approx(2 / 5)
    assert share["small alone"] == 0 and share["large alone"] == 1
    # Every step of these traces is probed; the fifth (H_init 0.1) is kept by the small model, which writes
    # only the answer marker, so the large model writes it: tau 0.3 -> 4 of 5 by the large model, tau 1.5 -> 2.
    routed = {row.run.label: row.routed_large for row in rows}
    assert routed[f"glimp tau {taus[2]:.4f}"] == pytest.approx(4 / 5)
    assert routed[f"glimp tau {taus[1]:.4f}"] == pytest.approx(2 / 5)
    assert routed["small alone"] == 0 and routed["large alone"] is None  # large alone probes nothing
    assert all(row.stats.n == 4 for row in rows)
    assert next(r for r in rows if r.run.mode == "large").stats.latency_vs_large == pytest.approx(1.0)
    # glimp's files carry their tau; a rerun opens and reuses each file, running nothing.
    assert {json.loads(line)["settings"]["tau"] for line in result.runs[1].path.read_text().splitlines()} == {taus[1]}
    again: list[str] = []
    rerun = cal.run_calibration(QUESTIONS, PAIR, fake_make_router(again), tmp_path / "runs", [0.2, 0.6],
                                adaptive=True)
    assert again == [] and [r.path for r in rerun.runs] == [r.path for r in result.runs]


def test_a_runs_dir_of_another_question_file_is_refused(tmp_path: Path) -> None:
    cal.run_calibration(QUESTIONS[:1], PAIR, fake_make_router(), tmp_path)
    other = [Question("q1", "a different question?", "1", 1)]
    with pytest.raises(InputError, match="another question file"):
        cal.run_calibration(other, PAIR, fake_make_router(), tmp_path)


def row(label: str, mode: str, accuracy: float, latency: float, tau: float | None = None) -> cal.FrontierRow:
    stats = ModeRow(mode=mode, n=100, n_graded=100, correct=round(accuracy * 100), accuracy=accuracy,
                    ci_low=max(0.0, accuracy - 0.1), ci_high=min(1.0, accuracy + 0.1), mean_latency=latency,
                    median_latency=latency, latency_vs_large=latency / 10.0, compared_with_large=100,
                    mean_tokens={"small": 1.0, "large": 1.0}, large_share_steps=0.5, large_share_tokens=0.5,
                    baseline=False, timing="routed")
    return cal.FrontierRow(cal.Run(label, mode, tau, 0.5, Path(f"{label}.jsonl")), stats)


ROWS = [row("small", "small", 0.40, 5.0), row("t1", "glimp", 0.50, 6.0, 1.0), row("t2", "glimp", 0.58, 7.5, 2.0),
        row("t3", "glimp", 0.60, 9.0, 3.0), row("ad", "adaptive", 0.59, 7.0, 2.0), row("large", "large", 0.60, 10.0)]


def test_objectives_pick_from_the_frontier() -> None:
    fastest = cal.pick_tau(ROWS, "fastest-within-drop", max_drop=2.0)
    assert fastest.row.run.label == "t2"  # 58% is within 2 points of 60%; t1 at 50% is not
    assert fastest.note.startswith("ad meets it better")  # adaptive is within the drop and faster still
    assert cal.pick_tau(ROWS, "fastest-within-drop", max_drop=0.0).row.run.label == "t3"
    accurate = cal.pick_tau(ROWS, "most-accurate-under-latency", max_latency_ratio=0.8)
    assert accurate.row.run.label == "t2" and accurate.note  # t3 at 0.9x is over; adaptive beats t2
    nothing = cal.pick_tau(ROWS, "most-accurate-under-latency", max_latency_ratio=0.5)
    assert nothing.row is None and "no tau" in nothing.reason


def test_the_frontier_flags_dominated_rows(tmp_path: Path) -> None:
    result = cal.run_calibration(QUESTIONS[:2], PAIR, fake_make_router(), tmp_path, [0.5])
    assert [run.mode for run in result.runs] == ["small", "glimp", "large"]  # adaptive is opt-in
    rows = cal.frontier(result.runs, QUESTIONS[:2])
    fastest = min(rows, key=lambda r: r.stats.mean_latency)
    assert fastest.pareto  # nothing is both faster and at least as accurate
    table = cal.render_frontier(rows)
    assert [c.header for c in table.columns][:6] == ["run", "tau", "picked for", "routed large", "n",
                                                      "accuracy (95% CI)"]


# --- the picture ----------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_the_histogram_and_the_frontier(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = cal.run_calibration(QUESTIONS, PAIR, fake_make_router(), tmp_path / "runs", [0.2, 0.6])
    rows = cal.frontier(result.runs, QUESTIONS)
    at = cal.choose_by_share(result.dist.values, 0.2)
    alone = cal.write_plot(tmp_path / "h.png", result.dist, at, title="histogram")
    both = cal.write_plot(tmp_path / "hf.png", result.dist, at, rows, rows[2], title="sweep")
    width, height = png_size(alone)
    assert width >= 600 and height >= 400 and alone.stat().st_size > 10_000
    wide, high = png_size(both)
    assert wide > 1.8 * width and high == height  # a second panel beside the first


def test_plot_without_matplotlib_is_a_clear_message(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    dist = cal.Distribution((0.1, 0.2), 1, "small", "x")
    with pytest.raises(MissingExtraError, match=r"pip install 'glimp\[plot\]'"):
        cal.write_plot(tmp_path / "x.png", dist, cal.share_at(dist.values, 0.15))
    assert not (tmp_path / "x.png").exists()


# --- --write ----------------------------------------------------------------------------------------

USER_YAML = """\
# my glimp models: keep this comment
default_pair: mine

pairs:
  # the pair I use every day
  mine:
    small: smollm2-135m   # tiny
    large: gemma3-270m
    tau: 3.5              # set by hand
    max_tokens: 256
  other:
    small: "smollm2-135m"   # quoted: a rewrite keeps the quotes
    large: 'gemma3-270m'
    tau: 0.75
"""


def test_write_changes_tau_adds_the_calibration_and_keeps_comments_and_other_entries(tmp_path: Path, no_models) -> None:
    traces = write_traces(tmp_path / "r.jsonl")
    records = [json.loads(line) for line in traces.read_text().splitlines()]
    for r in records:
        r["settings"]["pair"] = "mine"
    traces.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tmp_path / "models.yaml"
    config.write_text(USER_YAML)
    result = invoke("--traces", str(traces), "--large-share", "0.2", "--write", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "pairs.mine.tau = 1.5 (was 3.5)" in result.stdout
    changed = [line for line in difflib.ndiff(USER_YAML.splitlines(), config.read_text().splitlines())
               if line[:1] in "+-"]
    # The traces were recorded with the settings "mine" has: nothing but tau and the record changes.
    assert changed[:2] == ["-     tau: 3.5              # set by hand", "+     tau: 1.5              # set by hand"]
    assert changed[2] == "+     calibration:" and all(line.startswith("+       ") for line in changed[3:])
    assert "also set" not in result.stdout
    assert f"recorded pairs.mine.calibration: large share 20%, 20 steps (small mode) from {traces}" in result.stdout
    mine = load_registry(config).pair("mine")
    assert mine.tau == 1.5 and load_registry(config).pair("other").tau == 0.75
    record = mine.calibration
    assert (record.tau, record.large_share, record.steps, record.mode, record.traces) == (1.5, 0.2, 20, "small", str(traces))
    assert (record.delimiter, record.estimator, record.small) == ("\n\n", "exact", "smollm2-135m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.yaml", "r.jsonl"]  # no temp file left


def test_write_through_a_symlink_rewrites_its_target_and_keeps_the_link(tmp_path: Path, no_models) -> None:
    traces = write_traces(tmp_path / "r.jsonl")
    records = [json.loads(line) for line in traces.read_text().splitlines()]
    for r in records:
        r["settings"]["pair"] = "mine"
    traces.write_text("".join(json.dumps(r) + "\n" for r in records))
    real = tmp_path / "dotfiles" / "models.yaml"
    real.parent.mkdir()
    real.write_text(USER_YAML)
    link = tmp_path / "models.yaml"
    link.symlink_to(real)
    result = invoke("--traces", str(traces), "--large-share", "0.2", "--write", "--config", str(link))
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and load_registry(real).pair("mine").tau == 1.5


def test_write_adds_a_full_entry_for_a_pair_that_lives_in_the_packaged_file(tmp_path: Path, no_models) -> None:
    default = load_registry(packaged_config()).pair("default")
    # Traces of the packaged default pair's own models, whatever they are.
    traces = retrace(write_traces(tmp_path / "r.jsonl"), models={"small": default.small, "large": default.large})
    user = tmp_path / "xdg" / "glimp" / "models.yaml"  # the user file, as glimp ask finds it
    user.parent.mkdir(parents=True)
    user.write_text("# mine\npairs:\n  other:\n    small: smollm2-135m\n    large: gemma3-270m\n")
    result = invoke("--traces", str(traces), "--large-share", "0.2", "--write")
    assert result.exit_code == 0, result.output
    packaged = yaml.safe_load(packaged_config().read_text())["pairs"]["default"]
    assert f"added the pair's entry with pairs.default.tau = 1.5 (was {packaged['tau']:g})" in result.stdout
    text = user.read_text()
    assert text.startswith("# mine\n") and "other:" in text
    # The traces' settings that the packaged entry does not hold are written with tau.
    differs = {key: getattr(PAIR, key) for key in cal.MEASURED_KEYS if getattr(PAIR, key) != getattr(default, key)}
    assert differs  # e.g. the fake traces' blank-line delimiter, the packaged pair's newline
    written = yaml.safe_load(text)["pairs"]["default"]
    without_record = lambda entry: {k: v for k, v in entry.items() if k != "calibration"}  # noqa: E731
    assert without_record(written) == {**without_record(packaged), "tau": 1.5, **differs}
    assert written["calibration"]["steps"] == 20 and written["calibration"]["large_share"] == 0.2
    assert load_registry().pair("default").tau == 1.5  # the layered registry sees it


def test_write_refuses_traces_of_another_small_model(tmp_path: Path, no_models) -> None:
    traces = write_traces(tmp_path / "r.jsonl")
    config = tmp_path / "models.yaml"
    config.write_text(USER_YAML.replace("small: smollm2-135m   # tiny", "small: gemma3-270m"))
    before = config.read_text()
    line = one_line_error(invoke("--traces", str(traces), "--large-share", "0.2", "--write", "--config", str(config)), 2)
    assert "measured with the small model 'smollm2-135m', but pair 'mine' uses 'gemma3-270m'" in line
    assert config.read_text() == before


def retrace(path: Path, **settings) -> Path:
    """The traces file with these settings in every line, as a batch run with them records them."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r["settings"].update(settings)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_write_stores_the_delimiter_and_estimator_the_traces_were_recorded_with(tmp_path: Path, no_models) -> None:
    traces = retrace(write_traces(tmp_path / "r.jsonl"), pair="mine", delimiter="\n", estimator="topk:20",
                     questions={"path": "/data/calib.jsonl", "sha256": "ab", "offset": 0, "limit": 4})
    config = tmp_path / "models.yaml"
    config.write_text(USER_YAML)
    result = invoke("--traces", str(traces), "--large-share", "0.2", "--write", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert ("also set delimiter = '\\n' (was '\\n\\n'), estimator = 'topk:20' (was 'exact'): the recorded "
            "H_init values depend on them") in result.stdout
    mine = load_registry(config).pair("mine")
    assert (mine.tau, mine.delimiter, mine.estimator, mine.max_tokens) == (1.5, "\n", "topk:20", 256)
    assert (mine.calibration.questions, mine.calibration.delimiter, mine.calibration.estimator) == (
        "/data/calib.jsonl", "\n", "topk:20")
    assert mine.calibration.date  # an ISO timestamp, kept a string through YAML
    # Written again from the same traces: the pair now agrees, so only tau and the record are set.
    again = invoke("--traces", str(traces), "--large-share", "0.2", "--write", "--config", str(config))
    assert again.exit_code == 0 and "also set" not in again.stdout


def test_write_refuses_traces_recorded_with_two_delimiters(tmp_path: Path, no_models) -> None:
    traces = write_traces(tmp_path / "r.jsonl")
    lines = traces.read_text().splitlines(keepends=True)
    other = json.loads(lines[0])
    assert other["mode"] == "small"  # the mode whose steps are read
    other["settings"]["delimiter"] = "\n"
    traces.write_text(json.dumps(other) + "\n" + "".join(lines[1:]))
    line = one_line_error(invoke("--traces", str(traces), "--large-share", "0.2", "--write"), 1)
    assert "its small traces were recorded with delimiter='\\n' and with delimiter='\\n\\n'" in line


def test_settings_to_write_compares_the_large_model_only_where_it_shaped_the_steps() -> None:
    measured = cal.Measured({key: getattr(PAIR, key) for key in cal.MEASURED_KEYS}, PAIR.small, "another-large")
    assert cal.settings_to_write(PAIR, measured, uses_large=False) == {}
    with pytest.raises(UsageError, match="large model 'another-large', but pair 'default' uses 'gemma3-270m'"):
        cal.settings_to_write(PAIR, measured, uses_large=True)
    sampled = replace(measured, large=PAIR.large, settings={**measured.settings, "temperature": 0.6})
    assert cal.settings_to_write(PAIR, sampled, uses_large=True) == {"temperature": (0.0, 0.6)}


def test_a_tau_measured_with_probe_skip_is_written_with_it_and_traces_without_it_still_calibrate() -> None:
    skipping = replace(PAIR, probe_skip=r"\d+\.")
    measured = cal.measured_by_run(skipping, "questions.jsonl")
    assert measured.settings["probe_skip"] == r"\d+\."
    # --write to a pair that probes the first token: the tau is stored with the probe it was measured by.
    assert cal.settings_to_write(PAIR, measured, uses_large=False) == {"probe_skip": (None, r"\d+\.")}
    record = cal.calibration_record(measured, 1.2, 40, 0.35)
    assert record["probe_skip"] == r"\d+\." and "probe_skip" not in cal.calibration_record(
        cal.measured_by_run(PAIR, "questions.jsonl"), 1.2, 40, 0.35)
    # Traces written before probe_skip existed record no such key: that means it was unset, not unknown.
    plain = cal.recorded_settings(pair_settings(PAIR))
    assert plain["probe_skip"] is None and "probe_skip" in cal.UNSET_MEANS


def test_a_tau_measured_at_the_first_token_of_content_is_written_with_it() -> None:
    content = replace(PAIR, probe_at="content")
    measured = cal.measured_by_run(content, "questions.jsonl")
    assert cal.settings_to_write(PAIR, measured, uses_large=False) == {"probe_at": ("first", "content")}
    assert cal.calibration_record(measured, 1.2, 40, 0.35)["probe_at"] == "content"
    # Traces recorded before probe_at existed (or at the first token) leave it out: they were probed at "first".
    assert cal.recorded_settings(pair_settings(PAIR))["probe_at"] == "first"
    assert cal.recorded_settings(pair_settings(content))["probe_at"] == "content"


@pytest.mark.parametrize("calibration, problem", [
    ({"tau": 1.0, "steps": 10, "colour": "red"}, "calibration: unknown key 'colour'"),
    ({"tau": 1.0}, "calibration: missing key 'steps'"),
    ({"tau": 1.0, "steps": "many"}, "calibration.steps: expected an integer"),
    ({"tau": 1.0, "steps": 10, "large_share": 1.5}, "calibration.large_share: must be between 0 and 1"),
    ({"tau": 1.0, "steps": 10, "date": datetime.date(2026, 1, 2)}, "calibration.date: expected a string"),
])
def test_a_calibration_record_is_validated_like_the_rest_of_the_pair(tmp_path: Path, calibration, problem) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({"pairs": {"mine": {"small": "smollm2-135m", "large": "gemma3-270m",
                                                          "calibration": calibration}}}))
    with pytest.raises(ConfigError, match=f"{config}: pairs.mine.{problem}"):
        load_registry(config).pair("mine")


def test_write_needs_a_chosen_tau() -> None:
    assert "--write needs a tau" in one_line_error(invoke("--write"), 2)


# --- a real sweep on the tiny pair ------------------------------------------------------------------


@pytest.fixture
def one_thread(tmp_path) -> Path:
    """The packaged models.yaml with the tiny pair as the default, one thread per model (see test_cli_batch)."""
    config = yaml.safe_load(packaged_config().read_text(encoding="utf-8"))
    config["default_pair"] = "tiny"
    pair = config["pairs"]["tiny"]
    for role in ("small", "large"):
        config["models"][pair[role]]["threads"] = 1
    path = tmp_path / "one-thread.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.real
def test_a_real_sweep_writes_the_frontier_and_reuses_its_runs(tmp_path: Path, one_thread, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    questions = tmp_path / "q.jsonl"
    answers = ["18", "3"]
    questions.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                 for q, a in zip(GSM8K_QUESTIONS, answers)))
    runs, png = tmp_path / "runs", tmp_path / "sweep.png"
    args = [str(questions), "--sweep", "--shares", "0.3,0.7", "--runs-dir", str(runs), "--config", str(one_thread),
            "--max-tokens", "48", "--max-step-tokens", "32", "--adaptive", "--objective", "fastest-within-drop",
            "--max-drop", "100", "--plot", str(png)]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    out = first.stdout
    assert "calibration sweep: accuracy / latency frontier" in out
    for label in ("small alone", "adaptive 30%", "adaptive 70%", "large alone"):
        assert label in out
    glimp_files = sorted(runs.glob("glimp-tau*.jsonl"))
    assert 1 <= len(glimp_files) <= 2 and (runs / "small.jsonl").exists() and (runs / "large.jsonl").exists()
    for path in runs.glob("*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert sorted(r["id"] for r in records) == ["1", "2"]
    assert "fastest-within-drop: the fastest tau" in out and "← chosen" in out
    assert png_size(png)[0] > 1000 and png.stat().st_size > 20_000
    # A rerun reuses every run: no model is loaded, and the files are unchanged.
    sizes = {p.name: p.stat().st_size for p in runs.iterdir()}
    from glimp_cli.engine import Engine

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a: pytest.fail("a model was loaded on the rerun")))
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "reused 2 results" in again.stderr
    assert {p.name: p.stat().st_size for p in runs.iterdir()} == sizes


@pytest.mark.real
def test_a_written_calibration_is_what_ask_then_runs_with(tmp_path: Path) -> None:
    config = yaml.safe_load(packaged_config().read_text(encoding="utf-8"))
    name = "tiny" if "tiny" in config["pairs"] else config["default_pair"]  # the smallest packaged pair
    for role in ("small", "large"):
        config["models"][config["pairs"][name][role]]["threads"] = 1
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert config["pairs"][name].get("delimiter", "\n\n") != "\n"
    assert config["pairs"][name].get("estimator", "exact") != "topk:20"
    short = ["--max-tokens", "48", "--max-step-tokens", "32"]
    written = invoke("--config", str(path), "--pair", name, "--limit", "2", "--large-share", "0.3",
                     "--delimiter", "\\n", "--estimator", "topk:20", "--runs-dir", str(tmp_path / "runs"),
                     "--write", *short)
    assert written.exit_code == 0, written.output
    assert "also set delimiter = '\\n'" in written.stdout and "estimator = 'topk:20'" in written.stdout
    pair = load_registry(path).pair(name)
    record = pair.calibration
    assert (record.delimiter, record.estimator, pair.delimiter, pair.estimator) == ("\n", "topk:20", "\n", "topk:20")
    assert record.questions == str(cal.calibration_set().resolve()) and record.steps >= 2
    assert record.large_share == 0.3 and record.tau == pair.tau

    asked = CliRunner().invoke(app, ["ask", GSM8K_QUESTIONS[1], "--config", str(path), "--pair", name, "--json",
                                     "--verbose", *short])
    assert asked.exit_code == 0, asked.output
    trace = json.loads(asked.stdout)
    assert (trace["estimator"], trace["delimiter"], trace["tau"]) == (record.estimator, record.delimiter, record.tau)
    assert "delimiter = '\\n'  (models.yaml)" in asked.stderr  # --verbose says where it came from
    assert all("\n" not in step["text"].strip("\n") for step in trace["steps"] if step["stop_reason"] == "delimiter")
