"""`glimp profile`: the latency bound on hand-made rates (exact), and the real command on the tiny pair."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from glimp_cli.cli import app
from glimp_cli.config import load_registry
from glimp_cli.policies import LARGE, SMALL
from glimp_cli.profile import (
    ModelRates, Profile, Rates, break_even, rates_from_dict, relative_latency, routed_work, work_seconds,
)

# Small decode 50 / prefill 200, large decode 25 / prefill 100 tokens/s, a 2 ms probe.
CPU = Rates(ModelRates(50.0, 200.0, 40), ModelRates(25.0, 100.0, 40), 0.002)


def profile_of(rates: Rates, step_tokens: int = 40) -> Profile:
    return Profile("p", {SMALL: "s", LARGE: "l"}, {SMALL: 2, LARGE: 2}, rates, step_tokens)


def test_routed_work_splits_decode_and_catch_up_between_the_models():
    decoded, prefilled = routed_work(100, 0.3)
    assert decoded == pytest.approx({SMALL: 70, LARGE: 30})
    assert prefilled == pytest.approx({SMALL: 30, LARGE: 70})  # each catches up on what the other wrote


def test_work_seconds_adds_decode_prefill_and_probes():
    seconds = work_seconds(CPU, {SMALL: 50, LARGE: 25}, {SMALL: 200, LARGE: 100}, probes=10)
    assert seconds == pytest.approx(1 + 1 + 1 + 1 + 0.02)


def test_relative_latency_follows_the_formula_at_every_share():
    # per token: s/25 + (1-s)(1/50 + 1/100) + s/200 + 0.002/40, against 1/25 for large alone
    for share, expected in ((0.0, 0.75125), (0.5, 0.93875), (1.0, 1.12625)):
        assert relative_latency(CPU, share, 40) == pytest.approx(expected, rel=1e-12)
    # At share 1 glimp still probes every step and the small model catches up on every token.
    assert relative_latency(CPU, 1.0, 40) > 1.0


def test_break_even_is_where_the_bound_crosses_one():
    share = break_even(CPU, 40)
    assert share == pytest.approx(0.24875 / 0.375, rel=1e-12)
    assert relative_latency(CPU, share, 40) == pytest.approx(1.0, rel=1e-12)


def test_the_machine_case_follows_the_best_saving():
    # Prefill ~3x decode on the large model: even all-small is slower than large alone (no break-even).
    qwen_on_2_cores = Rates(ModelRates(49.0, 230.0, 40), ModelRates(34.0, 100.0, 40), 0.001)
    assert relative_latency(qwen_on_2_cores, 0.0) == pytest.approx(34 / 49 + 34 / 100 + 34 * 0.001 / 40)
    cpu = profile_of(qwen_on_2_cores)
    assert cpu.break_even is None and cpu.case == "tokens-only"
    assert "no wall time" in cpu.verdict()
    assert profile_of(CPU).case == "little-time"  # best 0.75125: saves under 25%
    gpu = profile_of(Rates(ModelRates(100.0, 10_000.0, 40), ModelRates(25.0, 2_500.0, 40), 0.0))
    assert relative_latency(gpu.rates, 0.0) == pytest.approx(0.26)
    assert gpu.case == "tokens-and-time" and "saves both" in gpu.verdict()


def test_json_round_trips_the_rates_and_lists_every_share():
    data = json.loads(json.dumps(profile_of(CPU).to_dict()))
    assert rates_from_dict(data) == CPU
    assert [row["large_share"] for row in data["bound"]] == pytest.approx([i / 10 for i in range(11)])
    assert data["probe_vs_small_decode_token"] == pytest.approx(0.1)
    assert data["break_even_share"] == pytest.approx(break_even(CPU, 40))


def test_step_tokens_below_one_is_a_usage_error():
    result = CliRunner().invoke(app, ["profile", "--step-tokens", "0"])
    assert result.exit_code == 2 and "step-tokens" in result.output


def tiny_pair() -> str:
    """The fast packaged pair: `tiny` once the reasoning pair is the default, `default` before that."""
    pairs = load_registry().pairs
    return "tiny" if "tiny" in pairs else "default"


@pytest.mark.real
def test_profile_json_measures_positive_rates_and_its_bound_follows_them():
    result = CliRunner().invoke(app, ["profile", "--pair", tiny_pair(), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rates = rates_from_dict(data)
    for role in (SMALL, LARGE):
        assert rates.of(role).decode > 0 and rates.of(role).prefill > 0
    assert rates.probe_seconds > 0
    step = data["step_tokens"]
    for row in data["bound"]:
        assert row["glimp_vs_large"] == pytest.approx(relative_latency(rates, row["large_share"], step), rel=1e-9)
    at_one = data["bound"][-1]
    d_large = rates.large.decode
    assert at_one["large_share"] == 1.0
    assert at_one["glimp_vs_large"] == pytest.approx(
        1 + d_large / rates.small.prefill + d_large * rates.probe_seconds / step, rel=1e-9)
    assert data["probe_vs_small_decode_token"] == pytest.approx(rates.probe_seconds * rates.small.decode)
    assert data["case"] in ("tokens-only", "little-time", "tokens-and-time")
