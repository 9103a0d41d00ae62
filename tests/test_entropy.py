"""Entropy on hand-made numbers: one rule everywhere (-inf is a masked token, NaN is an error)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from glimp_cli.backends.base import StepStop, _score, write_tokens
from glimp_cli.backends.logprobs import parse_logprobs, position_entropy, topk_score
from glimp_cli.entropy import (
    entropy_and_logprob, exact_entropy, log_softmax, parse_estimator, topk_entropy, topk_entropy_from_logprobs,
)
from glimp_cli.errors import BackendError
from glimp_cli.policies import DraftScore, step_entropy
from glimp_cli.sampling import Sampling

NINF, NAN = -math.inf, math.nan


def shannon(p) -> float:
    """-sum p ln p over the nonzero entries, written out independently of glimp's code."""
    return -sum(x * math.log(x) for x in p if x > 0)


@pytest.mark.parametrize("n", [1, 2, 7, 49152])
def test_uniform_over_n_is_ln_n(n):
    assert exact_entropy(np.full(n, 3.25)) == pytest.approx(math.log(n), abs=1e-12)


def test_one_hot_is_zero():
    assert exact_entropy(np.array([0.0, 1000.0, -5.0])) == 0.0
    assert exact_entropy(np.array([NINF, 2.0, NINF])) == 0.0


def test_a_known_distribution():
    p = [0.5, 0.25, 0.125, 0.125]
    assert exact_entropy(np.log(p) + 17.0) == pytest.approx(shannon(p), abs=1e-12)  # shift-invariant
    assert exact_entropy(np.log(np.array(p, dtype=np.float32))) == pytest.approx(1.75 * math.log(2), abs=1e-6)


def test_minus_inf_logits_are_masked_tokens():
    # Masking two of four equal tokens leaves a fair coin.
    assert exact_entropy(np.array([1.0, NINF, 1.0, NINF])) == pytest.approx(math.log(2), abs=1e-12)
    logp, p = log_softmax(np.array([0.0, NINF, math.log(3.0)]))
    assert p.tolist() == pytest.approx([0.25, 0.0, 0.75]) and logp[1] == NINF


@pytest.mark.parametrize("logits, what", [
    ([1.0, NAN, 0.0], "1 NaN logit"),
    ([NAN, NAN], "2 NaN logits"),
    ([NAN, NINF], "1 NaN logit"),
    ([0.0, math.inf], "+inf logit"),
    ([NINF, NINF], "no finite logit"),
    ([], "no finite logit"),
])
def test_broken_logits_raise_one_clear_error(logits, what):
    for estimate in (exact_entropy, lambda z: topk_entropy(z, 2), topk_entropy_from_logprobs,
                     lambda z: _score(z, 0), lambda z: topk_score(np.asarray(z), 0)):
        with pytest.raises(BackendError) as info:
            estimate(np.array(logits, dtype=np.float64))
        assert what in str(info.value) and "\n" not in str(info.value)


def test_nan_outside_the_top_k_is_still_an_error():
    # A NaN among 1000 logits whose top 20 are fine: the top-K estimate must not route on it.
    z = np.linspace(-10, 0, 1000)
    z[3] = NAN
    with pytest.raises(BackendError):
        topk_entropy(z, 20)
    with pytest.raises(BackendError):
        parse_estimator("topk:20").from_logits(z)


def test_topk_renormalises_the_k_largest():
    z = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04]))
    # The 3 best, renormalised, computed by hand.
    assert topk_entropy(z, 3) == pytest.approx(shannon([4 / 9, 3 / 9, 2 / 9]), abs=1e-12)
    assert topk_entropy(z, 5) == pytest.approx(shannon([0.4, 0.3, 0.2, 0.06, 0.04]), abs=1e-12)
    assert topk_entropy(z, 50) == pytest.approx(exact_entropy(z), abs=1e-12)
    assert topk_entropy(np.zeros(100), 20) == pytest.approx(math.log(20), abs=1e-12)  # capped at ln K
    # Fewer finite entries than K: the masked ones are simply not there.
    assert topk_entropy(np.array([0.0, 0.0, NINF, NINF]), 3) == pytest.approx(math.log(2), abs=1e-12)


def test_the_server_top_logprobs_follow_the_same_rule_in_both_formats():
    cat, dog = math.log(0.6), math.log(0.3)
    legacy = {"tokens": [" cat"], "token_logprobs": [cat],
              "top_logprobs": [{" cat": cat, " dog": dog, "x": None, "y": NINF}]}
    listed = {"content": [{"token": " cat", "logprob": cat, "top_logprobs": [
        {"token": " cat", "logprob": cat}, {"token": " dog", "logprob": dog}, {"token": "x", "logprob": None},
        {"token": "y", "logprob": NINF}]}]}
    for logprobs in (legacy, listed):  # llama-cpp-python's server and vLLM; llama-server
        (position,) = parse_logprobs(logprobs)
        assert position.text == " cat" and position.logprob == cat
        assert position_entropy(position.top, 20) == pytest.approx(shannon([2 / 3, 1 / 3]), abs=1e-12)
    assert position_entropy([("a", -1.0), ("b", -1.0), ("c", -9.0)], 2) == pytest.approx(math.log(2), abs=1e-12)
    with pytest.raises(BackendError):
        position_entropy([("a", -0.1), ("b", NAN)], 20)
    with pytest.raises(BackendError):
        position_entropy([], 20)


def test_draft_score_with_minus_inf_logits():
    logits = np.array([math.log(0.5), math.log(0.5), NINF, NINF])
    entropy, logprob = _score(logits, 1)
    assert entropy == pytest.approx(math.log(2), abs=1e-12) and logprob == pytest.approx(math.log(0.5))
    assert entropy_and_logprob(logits, 2)[1] == NINF
    # The server's top-K scores: renormalised entropy, the chosen entry's reported log-probability.
    entropy, logprob = topk_score(np.array([-0.2, -2.0, NINF]), 1)
    assert entropy == pytest.approx(topk_entropy_from_logprobs(np.array([-0.2, -2.0]))) and logprob == -2.0


class MaskedVocab:
    """A token backend whose logits mask most of the vocabulary with -inf (a grammar or a banned-token list)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.evaluated = 0

    def next_logits(self) -> np.ndarray:
        z = np.full(16, NINF)
        z[4:8] = [2.0, 2.0, 0.0, 0.0]
        return z

    def is_eog(self, token: int) -> bool:
        return False

    def extend(self, tokens) -> None:
        self.tokens += list(tokens)

    def token_bytes(self, token: int) -> bytes:
        return b"ab"[token % 2: token % 2 + 1]


def test_a_scored_draft_over_masked_logits_has_finite_entropies_and_a_policy_can_reject_it():
    backend = MaskedVocab()
    first = backend.next_logits()
    written = write_tokens(backend, 4, StepStop("\n\n", max_new_tokens=5), Sampling(), np.random.default_rng(0),
                           None, first)
    e = 2 / (2 + 2 * math.exp(-2))  # the probability of each of the two best tokens is e / 2
    expected = shannon([e / 2, e / 2, (1 - e) / 2, (1 - e) / 2])
    assert len(written.entropies) == 5 and written.entropies == pytest.approx([expected] * 5, abs=1e-12)
    draft = DraftScore(float(np.mean(written.entropies)), float(np.exp(-np.mean(written.logprobs))))
    # With nan here the comparison was False and step_entropy never sent a draft to the large model.
    assert step_entropy(1.0).rewrite(draft) and not step_entropy(2.0).rewrite(draft)
