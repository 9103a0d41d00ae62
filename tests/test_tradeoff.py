"""The trade-off benchmark's arithmetic on hand-made records, and its question-major loop on the fake pair."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import threading
from pathlib import Path

import pytest

from conftest import fake_router
from glimp_cli.backends.fake import ScriptedStep as S
from glimp_cli.config import PairSpec
from glimp_cli.policies import LARGE, SMALL
from glimp_cli.profile import ModelRates, Rates, bound_seconds, median_rates, trace_work
from glimp_cli.questions import Question
from glimp_cli.report import common_ids, mcnemar_p, paired_comparison, recovered_gap, run_row
from glimp_cli.results_file import ResultsFile

BENCH = Path(__file__).resolve().parents[1] / "bench" / "tradeoff.py"
sys.path.insert(0, str(BENCH.parent))  # as `python bench/tradeoff.py` has it: its parts import each other
import tradeoff  # noqa: E402
import tradeoff_runs  # noqa: E402
import tradeoff_tables  # noqa: E402
import tradeoff_thresholds  # noqa: E402


# --- McNemar and paired comparisons ---------------------------------------------------------------


def brute_mcnemar(wins: int, losses: int) -> float:
    # Two-sided exact test: the total probability of every split at most as likely as the observed one.
    n = wins + losses
    probs = [math.comb(n, k) / 2 ** n for k in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[wins] * (1 + 1e-12)))


@pytest.mark.parametrize("wins, losses, p", [(0, 0, 1.0), (5, 0, 0.0625), (0, 5, 0.0625), (1, 9, 22 / 1024),
                                             (3, 3, 1.0), (10, 2, 2 * 79 / 4096)])
def test_mcnemar_exact_values(wins, losses, p):
    assert mcnemar_p(wins, losses) == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize("wins, losses", [(w, l) for w in range(8) for l in range(8)])
def test_mcnemar_equals_the_binomial_test_by_enumeration(wins, losses):
    assert mcnemar_p(wins, losses) == pytest.approx(brute_mcnemar(wins, losses), rel=1e-12)


def graded(mode: str, outcomes: dict) -> list[dict]:
    return [{"id": qid, "mode": mode, "correct": c} for qid, c in outcomes.items()]


def test_paired_comparison_counts_discordant_questions_on_shared_graded_ids():
    a = graded("glimp", {"1": True, "2": True, "3": False, "4": True, "5": None, "6": True})
    b = graded("random", {"1": False, "2": True, "3": True, "4": False, "5": False, "7": False})
    paired = paired_comparison(a, b)
    assert (paired.n, paired.wins, paired.losses, paired.ties) == (4, 2, 1, 1)  # 5 ungraded, 6 and 7 unshared
    assert paired.p == pytest.approx(1.0)
    only = paired_comparison(a, b, ids={"1", "4"})
    assert (only.n, only.wins, only.losses, only.p) == (2, 2, 0, pytest.approx(0.5))


def test_recovered_gap():
    assert recovered_gap(0.45, 0.25, 0.60) == pytest.approx(20 / 35)
    assert recovered_gap(0.25, 0.25, 0.60) == 0.0
    assert recovered_gap(0.60, 0.25, 0.60) == pytest.approx(1.0)
    assert recovered_gap(0.5, 0.3, 0.3) is None and recovered_gap(None, 0.1, 0.5) is None


def test_common_ids():
    assert common_ids([graded("a", {"1": 1, "2": 1}), graded("b", {"2": 1, "3": 1})]) == {"2"}
    assert common_ids([]) == set()


# --- the bound for a recorded trace's work ---------------------------------------------------------

RATES = Rates(ModelRates(50.0, 200.0, 40), ModelRates(25.0, 100.0, 40), 0.01)


def record(qid: str, mode: str, correct: bool, wall: float, tokens=(0, 0), evaluated=None, discarded=0,
           probes=0, steps=(0, 1)) -> dict:
    """A hand-made results record; `tokens` and `steps` are (small, large)."""
    evaluated = evaluated if evaluated is not None else {}
    return {
        "id": qid, "mode": mode, "correct": correct, "wall_seconds": wall, "timing": "routed",
        "tokens": {SMALL: tokens[0], LARGE: tokens[1]}, "model_steps": {SMALL: steps[0], LARGE: steps[1]},
        "evaluated_tokens": evaluated, "discarded_tokens": discarded,
        "settings": {"mode": mode, "baseline": False},
        "steps": [{"h_init": 1.0}] * probes + [{"h_init": None}],
    }


def test_trace_work_and_its_bound():
    # The small model wrote 100 tokens and threw a 10-token draft away; it evaluated 150 (40 prefill);
    # the large model wrote 50 and evaluated 250 (200 prefill); 6 probed steps.
    r = record("1", "glimp", True, 9.0, tokens=(100, 50), evaluated={SMALL: 150, LARGE: 250}, discarded=10,
               probes=6)
    decoded, prefilled, probes = trace_work(r)
    assert decoded == {SMALL: 110, LARGE: 50} and prefilled == {SMALL: 40, LARGE: 200} and probes == 6
    assert bound_seconds(r, RATES) == pytest.approx(110 / 50 + 50 / 25 + 40 / 200 + 200 / 100 + 6 * 0.01)
    alone = record("1", "large", True, 3.0, tokens=(0, 50), evaluated={LARGE: 80})
    assert bound_seconds(alone, RATES) == pytest.approx(50 / 25 + 30 / 100)


def test_median_rates_takes_each_rate_on_its_own():
    other = Rates(ModelRates(10.0, 400.0, 40), ModelRates(30.0, 50.0, 40), 0.03)
    third = Rates(ModelRates(70.0, 300.0, 40), ModelRates(20.0, 90.0, 40), 0.02)
    assert median_rates([RATES, other, third]) == Rates(ModelRates(50.0, 300.0, 40), ModelRates(25.0, 90.0, 40), 0.02)


def test_run_row_needs_one_mode_and_relates_latency_to_large_by_sums():
    large = [record("1", "large", True, 2.0), record("2", "large", True, 6.0)]
    glimp = [record("1", "glimp", True, 3.0), record("2", "glimp", False, 9.0)]
    assert run_row(glimp, large).latency_vs_large == pytest.approx(12 / 8)
    assert run_row(large, large).latency_vs_large == pytest.approx(1.0)
    with pytest.raises(ValueError):
        run_row(glimp + large, large)


# --- the bench's tables on hand-made records -------------------------------------------------------

PAIR = PairSpec("fake", "fake-small", "fake-large", tau=1.0)
THRESHOLDS = tradeoff_thresholds.Thresholds({0.5: 1.0}, {0.5: 0.5}, {0.5: 2.0}, 1.0)


def runs_in(tmp_path: Path):
    return tradeoff_runs.plan_runs(PAIR, THRESHOLDS, tmp_path, adaptive_share=0.5)


def test_plan_runs_puts_each_random_run_after_its_glimp_run_with_its_own_file(tmp_path):
    runs = runs_in(tmp_path)
    assert [r.family for r in runs] == ["small", "large", "glimp", "random", "step_entropy", "step_perplexity",
                                        "adaptive"]
    glimp, random = runs[2], runs[3]
    assert random.matched == glimp.label and random.settings(0.3)["large_share"] == 0.3
    assert glimp.pair.tau == 1.0 and runs[4].pair.step_entropy_threshold == 0.5
    assert runs[5].pair.step_perplexity_threshold == 2.0
    assert runs[6].pair.large_share == 0.5 and runs[6].settings()["large_share"] == 0.5
    assert len({r.path for r in runs}) == len(runs)
    assert runs[6].policy().name.startswith("adaptive(large_share=0.5")


def test_two_shares_with_one_threshold_are_one_run(tmp_path):
    tied = tradeoff_thresholds.Thresholds({0.2: 1.0, 0.35: 1.0}, {0.2: 0.5, 0.35: 0.7}, {0.2: 2.0, 0.35: 2.0}, 1.0)
    runs = tradeoff_runs.plan_runs(PAIR, tied, tmp_path, adaptive_share=0.35)
    assert [r.label for r in runs] == ["small alone", "large alone", "glimp 20%", "random ~ glimp 20%",
                                       "step_entropy 20%", "step_entropy 35%", "step_perplexity 20%", "adaptive 35%"]


def test_tradeoff_rows_and_paired_comparisons(tmp_path):
    runs = runs_in(tmp_path)
    by = {r.family: r for r in runs}
    outcomes = {  # per family: correct on questions 1..4
        "small": (False, False, False, True), "large": (True, True, True, False),
        "glimp": (True, True, False, True), "random": (False, True, False, False),
        "step_entropy": (True, False, False, False), "step_perplexity": (True, True, False, True),
        "adaptive": (True, False, True, True),
    }
    records = {}
    for family, correct in outcomes.items():
        mode = by[family].mode
        # Every trace: the small model wrote 40 tokens, the large 20, at 10 tokens of prefill each.
        records[by[family].label] = [
            record(str(i + 1), mode, c, 2.0 if family == "large" else 3.0, tokens=(40, 20),
                   evaluated={SMALL: 50, LARGE: 30}, steps=(1, 1)) for i, c in enumerate(correct)]
    rows = tradeoff_tables.tradeoff_rows(runs, records, lambda label, qid: RATES)
    row = {r.run.family: r for r in rows}
    assert row["glimp"].stats.accuracy == 0.75 and row["small"].stats.accuracy == 0.25
    assert row["glimp"].gap == pytest.approx((0.75 - 0.25) / (0.75 - 0.25))
    assert row["random"].gap == pytest.approx((0.25 - 0.25) / 0.5)
    assert row["glimp"].stats.latency_vs_large == pytest.approx(1.5)
    # Every run did the same work here, so its bound relative to large alone is 1 and measured / bound
    # is its measured latency relative to large alone's.
    assert row["glimp"].bound == pytest.approx(1.0) and row["glimp"].vs_bound == pytest.approx(1.5)
    assert row["large"].vs_bound == pytest.approx(1.0)
    # Work that differs: twice large alone's tokens decoded at the same rates is twice its bound.
    records[by["glimp"].label] = [dict(r, tokens={SMALL: 80, LARGE: 40}, evaluated_tokens={SMALL: 90, LARGE: 50})
                                  for r in records[by["glimp"].label]]
    doubled = {r.run.family: r for r in tradeoff_tables.tradeoff_rows(runs, records, lambda label, qid: RATES)}["glimp"]
    one = 40 / 50 + 20 / 25 + 10 / 200 + 10 / 100
    assert doubled.bound == pytest.approx((80 / 50 + 40 / 25 + 10 / 200 + 10 / 100) / one)
    assert doubled.vs_bound == pytest.approx(1.5 / doubled.bound)
    assert tradeoff_tables.tradeoff_rows(runs, records, lambda label, qid: None)[0].vs_bound is None

    pairs = {(c.a.run.family, c.b.run.family): c.paired for c in tradeoff_tables.comparisons(rows, records)}
    assert set(pairs) == {("glimp", "random"), ("glimp", "step_entropy"), ("glimp", "step_perplexity"),
                          ("adaptive", "glimp"), ("adaptive", "random")}
    assert (pairs["glimp", "random"].wins, pairs["glimp", "random"].losses) == (2, 0)
    assert pairs["glimp", "random"].p == pytest.approx(0.5)
    assert (pairs["glimp", "step_perplexity"].wins, pairs["glimp", "step_perplexity"].losses) == (0, 0)
    assert (pairs["adaptive", "glimp"].wins, pairs["adaptive", "glimp"].losses) == (1, 1)

    text = tradeoff_tables.markdown(rows, list(tradeoff_tables.comparisons(rows, records)), 4, "note")
    assert "\n| glimp 50% | tau 1 | 50% | 75.0% (" in text
    assert "\n| glimp 50% | random ~ glimp 50% | 33.3% / 33.3% | 2 | 0 | 2 | 0.5 |" in text


def test_each_record_is_bounded_with_the_profile_measured_last_before_it(tmp_path):
    log = tradeoff_runs.ProfileLog(tmp_path / "profiles.jsonl")
    slow = Rates(ModelRates(5.0, 20.0, 40), ModelRates(2.5, 10.0, 40), 0.1)
    third = Rates(ModelRates(70.0, 300.0, 40), ModelRates(20.0, 90.0, 40), 0.02)

    def profile(rates: Rates) -> dict:
        return {"rates": {SMALL: vars(rates.small), LARGE: vars(rates.large)}, "probe_seconds": rates.probe_seconds}

    assert log.rates()[0]("glimp", "1") is None  # nothing measured: no bound
    log.add_profile(profile(slow))
    log.add_record("glimp", "1")
    log.add_profile(profile(RATES))
    log.add_record("glimp", "2")
    log.add_profile(profile(third))
    with log.path.open("a") as file:
        file.write('{"record": ["glimp", "3"')  # a torn last line
    rates_for, profiles = log.rates()
    assert profiles == 3
    assert rates_for("glimp", "1") == slow and rates_for("glimp", "2") == RATES
    assert rates_for("glimp", "3") == median_rates([slow, RATES, third])  # no entry: the median


def test_draft_scores_read_only_judged_small_drafts(tmp_path):
    path = tmp_path / "drafts.jsonl"
    steps = [
        {"model": "small", "stop_reason": "delimiter", "draft_signal": {"mean_entropy": 0.5, "perplexity": 1.5}},
        {"model": "small", "stop_reason": "handover", "draft_signal": {"mean_entropy": 9.0, "perplexity": 9.0}},
        {"model": "large", "stop_reason": "answer", "draft_signal": None},
        {"model": "small", "stop_reason": "max_step_tokens", "draft_signal": {"mean_entropy": 1.0, "perplexity": 2.5}},
    ]
    rows = [{**record("1", "step_entropy", True, 1.0), "steps": steps},
            {**record("2", "step_entropy", True, 1.0), "steps": steps[:1]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tradeoff_thresholds.draft_scores(path, {"1"}) == ([0.5, 1.0], [1.5, 2.5])


# --- the question-major loop on the fake pair ------------------------------------------------------

SCRIPT = [
    S(0.5, "small one", "LARGE ONE"),
    S(2.0, "small two", "LARGE TWO"),
    S(0.3, "small three", "LARGE THREE"),
    S(0.1, "The answer is 4.", "The answer is 42."),
]
QUESTIONS = [Question(f"q{i}", f"question {i}?", "42", i) for i in range(1, 4)]


def open_files(runs):
    return {r.label: ResultsFile.open(r.path, resume=True, settings_key=r.settings())[0] for r in runs}


def test_questions_go_through_every_run_before_the_next_and_a_resume_finishes_each_pair_once(tmp_path):
    runs = runs_in(tmp_path)
    calls: list[tuple[str, float | None]] = []
    stop = threading.Event()

    def router_for(run, share):
        calls.append((run.label, share))
        if len(calls) == 10:
            stop.set()  # interrupted while the 10th (question, run) is in flight: it is not written
        return fake_router(SCRIPT, run.policy(share))

    files = open_files(runs)
    outcome = tradeoff_runs.run_interleaved(runs, QUESTIONS, files, router_for, stop=stop)
    for f in files.values():
        f.close()
    assert outcome.interrupted and outcome.written == 9
    labels = [r.label for r in runs]
    assert [label for label, _ in calls] == (labels * 2)[:10]  # question-major

    calls.clear()
    seen = []
    files = open_files(runs)
    outcome = tradeoff_runs.run_interleaved(runs, QUESTIONS, files, router_for,
                                       on_question=lambda k, q, written: seen.append((q.id, len(written))))
    for f in files.values():
        f.close()
    assert not outcome.interrupted and outcome.written == 7 * 3 - 9
    assert seen == [("q1", 0), ("q2", 5), ("q3", 7)]
    for run in runs:
        lines = [json.loads(line) for line in run.path.read_text().splitlines()]
        assert sorted(r["id"] for r in lines) == ["q1", "q2", "q3"], run.label
        assert all(r["mode"] == run.mode for r in lines)


def test_random_runs_at_the_pooled_share_its_glimp_run_reached_so_far(tmp_path):
    runs = runs_in(tmp_path)[2:4]  # glimp and its random run
    glimp, random = runs
    files = open_files(runs)
    # q1's glimp record is already on file with 1 large step of the 4 its policy routed, then the answer.
    routed = [{"model": LARGE, "h_init": 2.0}] + [{"model": SMALL, "h_init": 0.2}] * 3
    files[glimp.label].append({**record("q1", "glimp", True, 1.0, steps=(3, 2)), "settings": glimp.settings(),
                               "steps": routed + [{"model": LARGE, "h_init": None}]})
    shares = []

    def router_for(run, share):
        if run.family == "random":
            shares.append(share)
        return fake_router(SCRIPT, run.policy(share))

    tradeoff_runs.run_interleaved(runs, QUESTIONS[:2], files, router_for)
    for f in files.values():
        f.close()
    # tau 1.0 on the script: small, large, small, then the large model answers: 2 of 4 steps large.
    assert shares == [pytest.approx(1 / 4), pytest.approx((1 + 2) / (4 + 4))]
    recorded = [json.loads(line)["settings"]["large_share"] for line in random.path.read_text().splitlines()]
    assert recorded == shares


def test_variants_get_their_own_taus_files_and_rivals(tmp_path):
    th = tradeoff_thresholds.Thresholds({0.5: 1.0}, {0.5: 0.5}, {0.5: 2.0}, 1.0, skip_taus={0.5: 0.8},
                             after_large_taus={0.5: 1.6})
    runs = tradeoff_runs.plan_runs(PAIR, th, tmp_path, adaptive_share=0.5, probe_skip=r"\d+\.")
    skip, writer = runs[-2], runs[-1]
    assert (skip.label, skip.pair.tau, skip.pair.probe_skip, skip.pair.tau_after_large) == (
        "glimp skip 50%", 0.8, r"\d+\.", None)
    assert (writer.label, writer.pair.tau, writer.pair.tau_after_large, writer.pair.probe_skip) == (
        "glimp by writer 50%", 1.0, 1.6, None)
    assert skip.settings()["probe_skip"] == r"\d+\." and writer.settings()["tau_after_large"] == 1.6
    assert writer.policy().name == "glimp(tau=1, after_large=1.6)"
    assert len({r.path for r in runs}) == len(runs) and tradeoff_tables._threshold(writer) == "tau 1, 1.6 after large"
    # Each variant is paired with plain glimp at its share and with the plain glimp / random run nearest
    # to it in large tokens (here the same glimp run: it is listed once).
    records = {r.label: [record("1", r.mode, True, 1.0, tokens=(40, 20 if r.variant else 10), steps=(1, 1))]
               for r in runs}
    rows = tradeoff_tables.tradeoff_rows(runs, records, lambda label, qid: None)
    pairs = [(c.a.run.label, c.b.run.label) for c in tradeoff_tables.comparisons(rows, records)]
    for variant in ("glimp skip 50%", "glimp by writer 50%"):
        assert [b for a, b in pairs if a == variant] == ["glimp 50%", "random ~ glimp 50%"]


def test_trace_analysis_classifies_steps_and_pairs_each_probe_with_the_writer_before():
    spec = importlib.util.spec_from_file_location("bench_traces", BENCH.parent / "traces.py")
    traces = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(traces)
    marker = __import__("re").compile(traces.DEFAULT_MARKER)
    kinds = [traces.step_kind(t, marker, ("The answer is",)) for t in
             ("2. Add them.", "- Then", "The answer is 5.", "16 - 3 = 13", "2.5 hours pass")]
    assert kinds == ["list item", "list item", "answer", "other", "other"]
    record = {"steps": [{"model": LARGE, "h_init": 1.7}, {"model": SMALL, "h_init": 0.1},
                        {"model": LARGE, "h_init": 0.9}, {"model": LARGE, "h_init": None}]}
    assert [(w, s["h_init"]) for w, s in traces.probed_steps(record)] == [(LARGE, 0.1), (SMALL, 0.9)]


def test_a_run_timed_in_another_session_than_large_alone_gets_a_bound_but_no_latency(tmp_path):
    runs = runs_in(tmp_path)
    by = {r.family: r for r in runs}
    later = Rates(ModelRates(100.0, 400.0, 40), ModelRates(50.0, 200.0, 40), 0.005)  # a faster machine
    records = {r.label: [record(str(i), r.mode, True, 1.0 if r.family == "glimp" else 4.0, tokens=(40, 20),
                                evaluated={SMALL: 50, LARGE: 30}, steps=(1, 1)) for i in (1, 2)] for r in runs}
    # large alone and every run but glimp were timed under RATES; glimp, later, under `later`.
    rows = {r.run.family: r for r in tradeoff_tables.tradeoff_rows(
        runs, records, lambda label, qid: later if label == by["glimp"].label else RATES)}
    glimp, random = rows["glimp"], rows["random"]
    assert not glimp.timed_with_large and glimp.stats.latency_vs_large is None and glimp.vs_bound is None
    # Its bound relates its work to large alone's at its own rates: the same work is 1 whatever the machine.
    assert glimp.bound == pytest.approx(1.0)
    assert random.timed_with_large and random.stats.latency_vs_large == pytest.approx(1.0)
    assert tradeoff_tables.row_cells(glimp)[5] == "-"
    # A resume that split one question of two between profiles still leaves the run timed with large alone
    # when most of its questions were; here one of two is not most.
    split = {r.run.family: r for r in tradeoff_tables.tradeoff_rows(
        runs, records, lambda label, qid: later if (label, qid) == (by["glimp"].label, "1") else RATES)}["glimp"]
    assert not split.timed_with_large
    three = {label: recs + [dict(recs[0], id="3")] for label, recs in records.items()}
    split = {r.run.family: r for r in tradeoff_tables.tradeoff_rows(
        runs, three, lambda label, qid: later if (label, qid) == (by["glimp"].label, "1") else RATES)}["glimp"]
    assert split.timed_with_large and split.stats.latency_vs_large is not None


def test_only_keeps_the_named_runs_and_refuses_a_random_run_without_its_glimp_run(tmp_path):
    runs = runs_in(tmp_path)
    assert [r.label for r in tradeoff.only_runs(runs, "large alone, glimp 50%")] == ["large alone", "glimp 50%"]
    with pytest.raises(tradeoff.UsageError, match="'glimp 5%': not a run of this plan"):
        tradeoff.only_runs(runs, "glimp 5%")
    with pytest.raises(tradeoff.UsageError, match="name that run too"):
        tradeoff.only_runs(runs, "random ~ glimp 50%")


def test_the_content_probe_runs_with_its_own_tau_and_a_random_run_at_its_reached_share(tmp_path):
    th = tradeoff_thresholds.Thresholds({0.5: 1.0}, {0.5: 0.5}, {0.5: 2.0}, 1.0, content_taus={0.5: 1.3})
    runs = tradeoff_runs.plan_runs(PAIR, th, tmp_path, adaptive_share=0.5)
    content, random = runs[-2], runs[-1]
    assert (content.label, content.pair.tau, content.pair.probe_at, content.variant) == (
        "glimp content 50%", 1.3, "content", "content")
    assert content.settings()["probe_at"] == "content" and "probe_at" not in runs[2].settings()
    assert (random.family, random.matched, random.pair.probe_at, random.variant) == (
        "random", "glimp content 50%", "first", "content")
    records = {r.label: [record("1", r.mode, True, 1.0, tokens=(40, 20 if r.variant else 10), steps=(1, 1))]
               for r in runs}
    rows = tradeoff_tables.tradeoff_rows(runs, records, lambda label, qid: None)
    pairs = [(c.a.run.label, c.b.run.label) for c in tradeoff_tables.comparisons(rows, records)]
    assert [b for a, b in pairs if a == "glimp content 50%"][:2] == ["random ~ glimp content 50%", "glimp 50%"]
