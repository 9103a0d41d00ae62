"""The routing signals and the statistics that judge them, on hand-made numbers; the outcome swap on the fake."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import fake_router
from glimp_cli.backends.fake import ScriptedStep as S
from glimp_cli.policies import threshold
from glimp_cli.report import auroc, bootstrap_auroc, spearman
from glimp_cli.signals import (content_start, content_token, first_tokens_entropy, margin_doubt, perplexity,
                               top1_doubt, top_probabilities)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import signals as bench_signals  # noqa: E402


def logits_of(p):
    return np.log(np.asarray(p, dtype=np.float64))


def test_top_probabilities_doubt_and_margin():
    z = logits_of([0.5, 0.3, 0.2])
    assert top_probabilities(z) == pytest.approx((0.5, 0.3))
    assert top1_doubt(z) == pytest.approx(0.5)
    assert margin_doubt(z) == pytest.approx(1 - 0.2)
    # Shift-invariant, and a masked token is probability 0.
    assert top1_doubt(z + 40.0) == pytest.approx(0.5)
    assert margin_doubt(np.array([0.0, -math.inf, 0.0])) == pytest.approx(1.0)  # a tie: no margin
    assert top1_doubt(np.array([9.0, -math.inf])) == 0.0


def test_first_tokens_entropy_and_perplexity():
    assert first_tokens_entropy([0.2, 1.0, 3.0, 0.4], 2) == pytest.approx(0.6)
    assert first_tokens_entropy([0.2, 1.0, 3.0, 0.4], 4, "max") == 3.0
    assert first_tokens_entropy([0.5], 4) == 0.5  # a step shorter than k
    assert perplexity([math.log(0.5), math.log(0.5)]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        first_tokens_entropy([], 2)


def test_auroc_counts_pairs_and_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert auroc([3, 2, 1], [1, 0, 0]) == 1.0 and auroc([1, 2, 3], [1, 0, 0]) == 0.0
    assert auroc([1, 2], [1, 1]) is None


def test_bootstrap_interval_holds_the_point_and_resamples_whole_questions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=400)
    y = x + rng.normal(size=400) > 0
    value, low, high = bootstrap_auroc(x, y, [str(i // 4) for i in range(400)], n=300)
    assert low < value < high and value > 0.7
    # One question holding everything: every resample is that question, the interval collapses.
    value, low, high = bootstrap_auroc(x, y, ["q"] * 400, n=50)
    assert low == pytest.approx(value) and high == pytest.approx(value)


def test_spearman_is_the_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_outcome_jobs_swap_small_steps_of_wrong_traces_and_large_steps_of_right_ones():
    def step(model, h=1.0, reason="delimiter"):
        return {"model": model, "h_init": h, "stop_reason": reason}

    wrong = {"id": "w", "correct": False, "steps": [step("large"), step("small"), step("small", reason="handover"),
                                                    step("large", None, "answer")]}
    right = {"id": "r", "correct": True, "steps": [step("large"), step("small"), step("large", None, "answer")]}
    ungraded = {"id": "u", "correct": None, "steps": [step("small")]}
    jobs = [(r["id"], j, role) for r, j, role in bench_signals.outcome_jobs([wrong, right, ungraded])]
    assert jobs == [("w", 1, "large"), ("r", 0, "small")]


def test_a_swapped_step_goes_to_the_other_model_and_the_rest_is_routed_as_before():
    script = [S(0.5, "small one", "LARGE ONE"), S(0.2, "small two", "LARGE TWO"), S(2.0, "small three", "LARGE THREE"),
              S(0.1, "The answer is 4.", "The answer is 42.")]
    base = list(fake_router(script, threshold(1.0)).run("q?"))
    assert [s.model for s in base] == ["small", "small", "large", "large"]
    router = fake_router(script, bench_signals.swapped(threshold(1.0), "large"))
    steps = list(router.run("q?", given=base[:1]))
    assert steps[0] == base[0]
    assert [(s.model, s.text) for s in steps[1:3]] == [("large", "LARGE TWO"), ("large", "LARGE THREE")]
    assert steps[1].h_init == pytest.approx(0.2, abs=1e-5)  # probed as before; only the choice was swapped
    # A fresh copy per trace: the next trace swaps its own first routed step again.
    again = list(router.run("q?", given=base[:1]))
    assert [s.model for s in again] == [s.model for s in steps]


@pytest.mark.parametrize("text, start", [
    ("2. Add", 3), ("2.", None), ("2", None), ("  - add", 4), ("**Step 1:**", 2), ("\\[\n  x = 5", 5),
    ("\\[", None), ("16 - 3", 0), ("3.5 hours", 0), ("$18.", 1), ("1000. a", 0), ("a 2. b", 0),
    ("12)\tthen", 4), ("", None), ("\n\n", None), ("é", 0),
])
def test_where_content_begins(text, start):
    assert content_start(text) == start


def test_the_token_where_content_begins():
    pieces = {1: b"2", 2: b".", 3: b" Add", 4: b"\\[", 5: b"\n", 6: b"x", 7: b"\xc3", 8: b"\xa9"}
    assert content_token(pieces.__getitem__, [1, 2, 3], 8) == 2
    assert content_token(pieces.__getitem__, [4, 5, 6], 8) == 2
    assert content_token(pieces.__getitem__, [4, 5, 6], 2) is None  # not within the cap
    assert content_token(pieces.__getitem__, [5, 7, 8], 8) == 1  # é, split over two tokens, begins in the first


def test_a_trace_scored_before_a_signal_existed_is_named_not_guessed(tmp_path):
    full = {column: 0.5 for column, _, _ in bench_signals.SIGNALS if column not in ("random", "after_large")}
    path = tmp_path / "scores.jsonl"
    old = {k: v for k, v in full.items() if k != "h_content"}
    path.write_text(json.dumps({"id": "1", "steps": [full]}) + "\n" + json.dumps({"id": "7", "steps": [old]}) + "\n")
    with pytest.raises(SystemExit, match=r"scores.jsonl: trace 7 has no h_content"):
        bench_signals.load_rows(path)
    path.write_text(json.dumps({"id": "1", "steps": [full, full]}) + "\n")
    assert len(bench_signals.load_rows(path)) == 2
