"""sample_token and the nucleus filter on hand-made distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from glimp_cli.errors import BackendError
from glimp_cli.sampling import Sampling, _nucleus, sample_token


def full_sort_nucleus(p: np.ndarray, top_p: float) -> set[int]:
    """The nucleus by the definition: sort everything, keep the shortest head whose mass reaches top_p."""
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    return set(kept)


def frequencies(logits, sampling, n=20000, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.bincount([sample_token(np.asarray(logits), sampling, rng) for _ in range(n)], minlength=len(logits))
    return counts / n


def test_greedy_is_the_argmax_whatever_the_rng():
    logits = np.array([0.1, 3.0, -2.0, 2.9])
    assert {sample_token(logits, Sampling(0.0, 0.5), np.random.default_rng(s)) for s in range(20)} == {1}
    assert sample_token(np.array([-math.inf, -1.0, -math.inf]), Sampling(), np.random.default_rng(0)) == 1


def test_broken_logits_are_an_error_not_a_token():
    for temperature in (0.0, 0.7):
        for top_p in (1.0, 0.9):
            with pytest.raises(BackendError, match="NaN"):
                sample_token(np.array([0.0, math.nan, 1.0]), Sampling(temperature, top_p), np.random.default_rng(0))


def test_seeded_draws_are_reproducible_and_seeds_differ():
    logits = np.log(np.full(50, 1 / 50))

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [sample_token(logits, Sampling(0.8, 0.9), rng) for _ in range(40)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_draws_follow_the_tempered_distribution():
    p = np.array([0.6, 0.3, 0.1])
    for temperature in (1.0, 0.5, 2.0):
        want = p ** (1 / temperature) / (p ** (1 / temperature)).sum()
        assert frequencies(np.log(p), Sampling(temperature, 1.0)) == pytest.approx(want, abs=0.015)


def test_top_p_is_cut_before_the_temperature_as_llama_cpp_does():
    # At temperature 1 the nucleus for 0.85 is {0, 1} (0.5 + 0.4). Tempering first (T = 3) would flatten
    # the distribution to about (0.39, 0.36, 0.25) and keep all three tokens; llama.cpp's order keeps two.
    p = np.array([0.5, 0.4, 0.1])
    seen = frequencies(np.log(p), Sampling(3.0, 0.85))
    assert seen[2] == 0.0
    tempered = p[:2] ** (1 / 3)
    assert seen[:2] == pytest.approx(tempered / tempered.sum(), abs=0.015)
    # Low temperature sharpens inside the same set: still only tokens 0 and 1.
    seen = frequencies(np.log(p), Sampling(0.25, 0.85))
    assert seen[2] == 0.0 and seen[0] > 0.65


@pytest.mark.parametrize("p, top_p", [
    ([0.5, 0.3, 0.15, 0.05], 0.7),
    ([0.5, 0.3, 0.15, 0.05], 0.5),  # the first token alone reaches it (>=, as llama.cpp)
    ([0.5, 0.3, 0.15, 0.05], 0.1),
    ([0.5, 0.3, 0.15, 0.05], 1.0),
    ([0.25, 0.25, 0.25, 0.25], 0.6),  # ties: any three of four would do; the count must be three
    ([0.4, 0.2, 0.2, 0.1, 0.1], 0.7),
])
def test_nucleus_matches_a_full_sort_on_small_distributions(p, top_p):
    p = np.array(p)
    got = _nucleus(p, top_p)
    want = full_sort_nucleus(p, top_p)
    assert len(got) == len(want) and len(set(got.tolist())) == len(got)
    # On ties the members may differ, never the probabilities kept.
    assert sorted(p[got]) == pytest.approx(sorted(p[list(want)]))
    assert list(p[got]) == sorted(p[got], reverse=True)  # most likely first


def test_nucleus_widens_past_its_first_partial_selection():
    # A flat 262k vocabulary: the nucleus holds far more than the first 64 candidates looked at.
    rng = np.random.default_rng(3)
    for n, top_p in ((262144, 0.5), (5000, 0.95), (300, 0.999)):
        logits = rng.normal(size=n)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        got = _nucleus(p, top_p)
        want = full_sort_nucleus(p, top_p)
        assert set(got.tolist()) == want, n  # continuous values: no ties, the same ids


def test_nucleus_with_top_p_one_keeps_every_token_with_mass():
    p = np.array([0.7, 0.2, 0.1, 0.0])
    assert set(_nucleus(p, 1.0).tolist()) >= {0, 1, 2}
    # sample_token skips the filter at top_p 1: a draw can reach any token with mass.
    assert (frequencies(np.log(p + 1e-300), Sampling(1.0, 1.0))[:3] > 0).all()
