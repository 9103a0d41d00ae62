"""The variants the traces suggested, exactly, through the scripted fakes: probe_skip (H_init read past a
leading list marker) and tau_after_large (a tau that depends on who wrote the previous step)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import FAKE_PROMPT, fake_router
from glimp_cli.backends.fake import ScriptedStep as S, tokenize_bytes
from glimp_cli.batch import pair_settings
from glimp_cli.config import PairSpec, apply_overrides, compile_probe_skip
from glimp_cli.entropy import parse_estimator
from glimp_cli.errors import ConfigError
from glimp_cli.policies import always_large, always_small, make_policy, threshold, threshold_by_writer
from glimp_cli.router import MAX_SKIP_TOKENS, RouteSettings, Router
from glimp_cli.sides import ModelSlot

MARKER = r"\s*(\d+[.)]|[-*])"
ANSWER = S(0.1, "The answer is 3.", "The answer is 4.")


def run(router):
    trace = router.run("q?")
    return trace, list(trace)


def small_text(router) -> str:
    small = router._sides["small"].backend
    return b"".join(small.token_bytes(t) for t in small.tokens).decode()


def test_a_list_number_is_read_past_and_the_next_token_decides():
    # "2." is near-certain (0.05 nats) but what follows it is not (2.0): the step goes large.
    script = [S(0.05, "2. add them", "2. ADD THEM", after=(("2.", 2.0),)), ANSWER]
    plain_trace, plain = run(fake_router(script, threshold(1.0)))
    router = fake_router(script, threshold(1.0), probe_skip=MARKER)
    trace, steps = run(router)
    assert plain[0].model == "small" and plain[0].h_init == pytest.approx(0.05, abs=1e-5)
    assert steps[0].model == "large" and steps[0].h_init == pytest.approx(2.0, abs=1e-5)
    assert steps[0].text == "2. ADD THEM"
    # The two marker tokens the small model drew were rewound: its context holds the large step only.
    assert steps[0].discarded_tokens == 2
    assert "2. ADD THEM\n\n" in small_text(router) and "2. add" not in small_text(router)
    assert trace.to_dict()["probe_skip"] == MARKER and plain_trace.to_dict()["probe_skip"] is None


def test_a_kept_marker_is_the_start_of_the_small_step_and_nothing_is_evaluated_twice():
    script = [S(3.0, "2. add them", "2. ADD THEM", after=(("2.", 0.2),)), ANSWER]
    router = fake_router(script, threshold(1.0), probe_skip=MARKER)
    trace, steps = run(router)
    assert steps[0].model == "small" and steps[0].h_init == pytest.approx(0.2, abs=1e-5)
    assert steps[0].text == "2. add them"
    assert steps[0].tokens == len(tokenize_bytes(b"2. add them\n\n"))  # the delimiter it wrote counts too
    assert steps[0].discarded_tokens == 0
    small = router._sides["small"].backend
    assert trace.evaluated["small"] == len(small.tokens) + steps[-1].discarded_tokens


def test_streamed_text_of_a_skipped_step_is_its_whole_text():
    script = [S(3.0, "- add them", "- ADD THEM", after=(("-", 0.2),)), ANSWER]
    pieces: dict[int, list[str]] = {}

    class Listener:
        current = 0

        def step_started(self, index, model, h_init):
            self.current = index
            pieces[index] = []

        def text(self, piece):
            pieces[self.current].append(piece)

        def draft_discarded(self, index, tokens):
            pieces[index] = []

    trace = fake_router(script, threshold(1.0), probe_skip=MARKER).run("q?", Listener())
    steps = list(trace)
    assert ["".join(pieces[s.index]) for s in steps] == [s.text for s in steps]


def test_text_that_only_starts_like_a_marker_keeps_the_first_token_h_init():
    # "16 - 3" begins like "16." but is not a list number: H_init is the first token's, as without skip.
    script = [S(0.3, "16 - 3 = 13", "16 - 3 = 13!"), S(1.5, "So 13.", "SO 13."), ANSWER]
    _, plain = run(fake_router(script, threshold(1.0)))
    router = fake_router(script, threshold(1.0), probe_skip=MARKER)
    trace, steps = run(router)
    assert [(s.model, s.text) for s in steps] == [(s.model, s.text) for s in plain]
    assert [s.h_init for s in steps] == pytest.approx([s.h_init for s in plain], abs=1e-6)
    # "1" and "6" were drawn while the text could still become "16.", then rewound and written again.
    assert steps[0].discarded_tokens == 2
    assert small_text(router).endswith("16 - 3 = 13\n\nSO 13.\n\n")


def test_without_a_marker_the_trace_is_the_plain_one():
    script = [S(0.5, "small one", "LARGE ONE"), S(2.0, "small two", "LARGE TWO"), ANSWER]
    plain_trace, plain = run(fake_router(script, threshold(1.0)))
    trace, steps = run(fake_router(script, threshold(1.0), probe_skip=MARKER))
    assert [(s.model, s.text, s.discarded_tokens) for s in steps] == [
        (s.model, s.text, s.discarded_tokens) for s in plain]
    assert trace.evaluated == plain_trace.evaluated


def test_a_marker_that_never_ends_stops_at_the_token_limit():
    digits = "1" * (MAX_SKIP_TOKENS + 4)
    script = [S(0.3, digits + ". go", digits + ". GO", after=((digits + ".", 2.5),)), ANSWER]
    trace, steps = run(fake_router(script, threshold(1.0), probe_skip=MARKER))
    assert steps[0].h_init == pytest.approx(0.3, abs=1e-5)  # the first token's: the match was cut
    assert steps[0].model == "small" and steps[0].text == digits + ". go"
    assert steps[0].discarded_tokens == MAX_SKIP_TOKENS


def test_a_skipped_marker_counts_against_the_step_and_trace_limits():
    script = [S(0.3, "2. add them all up", "2. ADD", after=(("2.", 0.2),)), ANSWER]
    _, steps = run(fake_router(script, threshold(1.0), probe_skip=MARKER, max_step_tokens=5))
    assert steps[0].h_init == pytest.approx(0.2, abs=1e-5) and steps[0].text == "2. ad"
    assert steps[0].tokens == 5 and steps[0].stop_reason == "max_step_tokens"
    # A limit that leaves no token after the marker: the probe does not read past it.
    _, steps = run(fake_router(script, threshold(1.0), probe_skip=MARKER, max_step_tokens=2))
    assert steps[0].h_init == pytest.approx(0.3, abs=1e-5) and steps[0].tokens == 2
    trace, steps = run(fake_router(script, threshold(1.0), probe_skip=MARKER, max_tokens=4, forced_answer_tokens=0))
    assert sum(s.tokens for s in steps) == 4 and trace.stop_reason == "max_tokens"


def test_small_alone_records_the_skipped_h_init_and_large_alone_does_no_probe():
    script = [S(0.05, "1) add", "1) ADD", after=(("1)", 1.7),)), ANSWER]
    _, small = run(fake_router(script, always_small(), probe_skip=MARKER))
    assert small[0].h_init == pytest.approx(1.7, abs=1e-5) and small[0].text == "1) add"
    router = fake_router(script, always_large(), probe_skip=MARKER)
    _, large = run(router)
    assert all(s.h_init is None for s in large) and router.probe_skip is None


def test_the_pattern_is_checked():
    with pytest.raises(ConfigError, match=r"probe_skip: not a regular expression"):
        compile_probe_skip("(", "probe_skip")
    with pytest.raises(ConfigError, match="matches the empty text"):
        compile_probe_skip(r"\d*", "probe_skip")
    pair = PairSpec("p", "s", "l")
    with pytest.raises(ConfigError, match="flag value for probe_skip: not a regular expression"):
        apply_overrides(pair, {"probe_skip": ("[", "flag")})


def test_a_served_small_model_cannot_skip():
    served = SimpleNamespace(context="text", name="served-small")
    local = fake_router([ANSWER], threshold(1.0))._sides["large"].backend
    with pytest.raises(ConfigError, match="probe_skip needs the small model in process.*served-small"):
        Router(ModelSlot("small", served, FAKE_PROMPT), ModelSlot("large", local, FAKE_PROMPT), threshold(1.0),
               RouteSettings(estimator=parse_estimator("topk:20"), probe_skip=MARKER))


def test_probe_skip_is_part_of_the_resume_key_only_when_set():
    pair = PairSpec("p", "s", "l")
    assert "probe_skip" not in pair_settings(pair)  # results written before it existed still resume
    assert pair_settings(PairSpec("p", "s", "l", probe_skip=MARKER))["probe_skip"] == MARKER


# --- the tau that depends on who wrote the previous step -------------------------------------------


def test_after_a_large_step_the_after_large_tau_decides():
    policy = threshold_by_writer(0.5, tau_after_large=1.5)
    trace = policy.for_trace()
    # 0.4 small (tau 0.5); 1.0 large (after small: 0.5); 1.0 small (after large: 1.5); 2.0 large; 1.2 small.
    assert [trace(h, None) for h in (0.4, 1.0, 1.0, 2.0, 1.2)] == ["small", "large", "small", "large", "small"]
    # A new trace starts after no step: the first step is routed at tau.
    assert policy.for_trace()(1.0, None) == "large"
    assert make_policy("glimp", 0.5, 0.5, tau_after_large=1.5).name == "glimp(tau=0.5, after_large=1.5)"
    assert make_policy("glimp", 0.5, 0.5).name == "glimp(tau=0.5)"


def test_the_router_routes_by_the_previous_writer():
    script = [S(0.4, "s one", "L ONE"), S(1.0, "s two", "L TWO"), S(1.0, "s three", "L THREE"),
              S(1.0, "s four", "L FOUR"), ANSWER]
    _, plain = run(fake_router(script, threshold(0.5)))
    _, steps = run(fake_router(script, threshold_by_writer(0.5, 1.5)))
    assert [s.model for s in plain] == ["small", "large", "large", "large", "large"]
    assert [s.model for s in steps] == ["small", "large", "small", "large", "large"]


def test_tau_after_large_is_checked_and_keyed_only_when_set():
    pair = PairSpec("p", "s", "l")
    with pytest.raises(ConfigError, match="flag value for tau_after_large: must be a number"):
        apply_overrides(pair, {"tau_after_large": (float("nan"), "flag")})
    assert "tau_after_large" not in pair_settings(pair)
    assert pair_settings(PairSpec("p", "s", "l", tau_after_large=1.5))["tau_after_large"] == 1.5


def test_both_variants_load_from_models_yaml_and_a_bad_pattern_names_file_and_key(tmp_path, isolated):
    from glimp_cli.config import load_registry

    config = tmp_path / "models.yaml"
    config.write_text("pairs:\n  mine: {small: smollm2-135m, large: gemma3-270m, probe_skip: '\\s*\\d+\\.',"
                      " tau_after_large: 1.25}\n", encoding="utf-8")
    pair = load_registry(config).pair("mine")
    assert (pair.probe_skip, pair.tau_after_large) == (r"\s*\d+\.", 1.25)
    config.write_text("pairs:\n  mine: {small: smollm2-135m, large: gemma3-270m, probe_skip: '(\\d'}\n",
                      encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{config}: pairs.mine.probe_skip: not a regular expression"):
        load_registry(config).pair("mine")


def test_glimp_models_shows_the_variant_settings_of_a_pair(tmp_path, isolated):
    from typer.testing import CliRunner

    from glimp_cli.cli import app

    config = tmp_path / "models.yaml"
    config.write_text("pairs:\n  mine: {small: smollm2-135m, large: gemma3-270m, probe_skip: '\\d+\\.',"
                      " tau_after_large: 1.25}\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["models", "--config", str(config)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "probe_skip '\\\\d+\\\\.'" in result.output and "tau_after_large 1.25" in result.output


def test_a_number_that_is_no_marker_is_routed_on_the_step_start_not_on_the_drawn_token():
    # "13 eggs" starts like "13." and is not: the probe draws "1", "3" and rewinds. The fake rewrites
    # one logits buffer per call, as llama.cpp does: H_init must be the step start's (2.0, large),
    # not the near-certain distribution after the last drawn token.
    script = [S(2.0, "13 eggs * $2", "13 EGGS * $2"), ANSWER]
    trace, steps = run(fake_router(script, threshold(1.0), probe_skip=MARKER))
    assert steps[0].h_init == pytest.approx(2.0, abs=1e-5)
    assert steps[0].model == "large" and steps[0].text == "13 EGGS * $2"


def test_a_rejected_match_leaves_the_draft_score_of_the_step_start():
    # A draft-then-verify policy scores the first token from the probe's logits: after a rewound
    # partial match they must still be the step start's, the same as without probe_skip.
    from glimp_cli.policies import step_entropy

    script = [S(2.0, "16 - 3 = 13", "16 - 3 = 13!"), ANSWER]
    _, plain = run(fake_router(script, step_entropy(10.0)))
    _, steps = run(fake_router(script, step_entropy(10.0), probe_skip=MARKER))
    assert steps[0].draft_signal is not None
    assert steps[0].draft_signal.mean_entropy == pytest.approx(plain[0].draft_signal.mean_entropy, abs=1e-6)


def test_probe_at_content_reads_past_a_list_number_and_keeps_it_as_the_step_start():
    # "2. " says nothing; the token after it (2.0) sends the step to the large model.
    script = [S(0.05, "2. add them", "2. ADD THEM", after=(("2. ", 2.0),)), ANSWER]
    router = fake_router(script, threshold(1.0), probe_at="content")
    trace, steps = run(router)
    assert steps[0].h_init == pytest.approx(2.0, abs=1e-5) and steps[0].model == "large"
    assert steps[0].discarded_tokens == 3  # "2", ".", " " drawn by the probe, rewound for the large step
    assert "2. add" not in small_text(router)
    # Kept when the small model writes the step: nothing drawn twice.
    script = [S(3.0, "2. add them", "2. ADD THEM", after=(("2. ", 0.2),)), ANSWER]
    _, steps = run(fake_router(script, threshold(1.0), probe_at="content"))
    assert steps[0].model == "small" and steps[0].text == "2. add them" and steps[0].discarded_tokens == 0
    assert steps[0].h_init == pytest.approx(0.2, abs=1e-5)


def test_probe_at_content_reads_a_bracket_line_into_the_step_it_opens():
    # "\[" is no step of its own: the step is "\[" + the next line, probed at the next line's first token.
    script = [S(0.02, "\\[", "\\["), S(1.8, "x = 5", "X = 5"), ANSWER]
    router = fake_router(script, threshold(1.0), probe_at="content")
    _, steps = run(router)
    assert steps[0].h_init == pytest.approx(1.8, abs=1e-5) and steps[0].model == "large"
    assert steps[0].text == "\\[\n\nX = 5"
    _, plain = run(fake_router(script, threshold(1.0)))
    assert plain[0].h_init == pytest.approx(0.02, abs=1e-5) and plain[0].model == "small"


def test_probe_at_content_keeps_the_first_token_h_init_for_a_number_that_is_content():
    script = [S(0.3, "16 - 3 = 13", "16 - 3 = 13!"), S(1.5, "So 13.", "SO 13."), ANSWER]
    _, plain = run(fake_router(script, threshold(1.0)))
    router = fake_router(script, threshold(1.0), probe_at="content")
    _, steps = run(router)
    assert [(s.model, s.text) for s in steps] == [(s.model, s.text) for s in plain]
    assert [s.h_init for s in steps] == pytest.approx([s.h_init for s in plain], abs=1e-6)
    assert small_text(router).endswith("16 - 3 = 13\n\nSO 13.\n\n")


def test_probe_at_is_checked_and_keyed_only_when_set():
    with pytest.raises(ConfigError, match="probe_at"):
        fake_router([ANSWER], threshold(1.0), probe_at="middle")
    with pytest.raises(ConfigError, match="set one"):
        fake_router([ANSWER], threshold(1.0), probe_at="content", probe_skip=MARKER)
    pair = PairSpec(name="p", small="s", large="l")
    assert "probe_at" not in pair_settings(pair)
    assert pair_settings(apply_overrides(pair, {"probe_at": ("content", "--probe-at")})[0])["probe_at"] == "content"
    with pytest.raises(ConfigError, match="--probe-at value for probe_at"):
        apply_overrides(pair, {"probe_at": ("middle", "--probe-at")})


def test_probe_at_content_keeps_a_character_split_over_two_tokens_whole():
    # "ü" is two one-byte tokens in the fake: the content begins in the first, which must not be dropped.
    script = [S(0.7, "über alles", "ÜBER ALLES"), ANSWER]
    router = fake_router(script, threshold(1.0), probe_at="content")
    _, steps = run(router)
    assert steps[0].text == "über alles" and steps[0].h_init == pytest.approx(0.7, abs=1e-5)
    assert "\ufffd" not in small_text(router)


def test_a_handover_after_markup_alone_leaves_no_markup_step():
    script = [S(0.1, "**The answer is 4.**", "The answer is 42."), S(0.1, "x", "y")]
    _, steps = run(fake_router(script, threshold(1.0)))
    assert [(s.model, s.text) for s in steps] == [("large", "The answer is 42.")]
