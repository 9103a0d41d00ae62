"""Tests for glimp_cli.batch: records, the append-only results file, resume, and run_batch on the fake pair."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from conftest import FIVE_STEPS, fake_router
from glimp_cli import __version__
from glimp_cli.backends.fake import tokenize_bytes
from glimp_cli.batch import (
    BASELINE, PROBED, ROUTED, batch_settings, order_modes, pair_settings, result_record, run_batch,
)
from glimp_cli.config import PairSpec, load_registry
from glimp_cli.errors import InputError, ModelError, UsageError
from glimp_cli.policies import make_policy
from glimp_cli.questions import Question, load_questions
from glimp_cli.results_file import ResultsFile, check_writable
from glimp_cli.router import Router

# With tau = 1.0 glimp routes FIVE_STEPS small, large, small, large, then the large model answers: 3 of 5 large.
GLIMP_SHARE = 3 / 5
PAIR = PairSpec("fake", "fake-small", "fake-large", tau=1.0)
KEY = pair_settings(PAIR)
QUESTIONS = [Question(f"q{i}", f"question {i}?", "42", i) for i in range(1, 5)]


def settings_for(share: float | None = None):
    return lambda mode: {**KEY, "large_share": share if mode == "random" else None}


class Routers:
    """router_for_mode over the fake pair; remembers what it was asked for."""

    def __init__(self, probe: bool = False, **fake_kwargs):
        self.probe = probe
        self.fake_kwargs = fake_kwargs
        self.calls: list[tuple[str, float | None]] = []

    def __call__(self, mode: str, settings: dict) -> Router:
        self.calls.append((mode, settings["large_share"]))
        policy = make_policy(mode, settings["tau"], settings["large_share"] or 0.0, self.probe)
        return fake_router(FIVE_STEPS, policy, **self.fake_kwargs)


def read(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def batch(path: Path, modes: list[str], questions=QUESTIONS, routers=None, share=None, resume=True, **kwargs):
    out, done = ResultsFile.open(path, resume=resume, settings_key=KEY)
    with out:
        return run_batch(routers or Routers(), questions, modes, out, done, settings_for(share), **kwargs)


def trace_for(mode: str, probe: bool = False):
    return fake_router(FIVE_STEPS, make_policy(mode, 1.0, 0.5, probe)).run("question 1?").run()


def test_result_record_of_a_routed_trace() -> None:
    settings = {**KEY, "large_share": None}
    record = result_record(QUESTIONS[0], trace_for("glimp"), "glimp", settings)
    assert json.loads(json.dumps(record)) == record
    assert [record[k] for k in ("id", "mode", "question", "reference")] == ["q1", "glimp", "question 1?", "42"]
    assert record["answer_text"] == "The answer is 42." and record["extracted"] == "42" and record["correct"] is True
    assert [s["model"] for s in record["steps"]] == ["small", "large", "small", "large", "large"]
    assert [s["h_init"] for s in record["steps"]] == pytest.approx([0.5, 2.0, 0.3, 1.5, 0.1], abs=1e-5)
    assert record["model_steps"] == {"small": 2, "large": 3}
    # Each step is its text as the fake tokenizes it, plus two newline tokens ending it.
    n = lambda t: len(tokenize_bytes(t.encode())) + 2  # noqa: E731
    assert record["tokens"] == {"small": sum(n(t) for t in ("small one", "small three")),
                                "large": sum(n(t) for t in ("LARGE TWO", "LARGE FOUR", "The answer is 42."))}
    assert record["large_share_steps"] == pytest.approx(GLIMP_SHARE)
    assert record["wall_seconds"] > 0 and record["probe_seconds"] > 0
    assert set(record["evaluated_tokens"]) == {"small", "large"}
    assert record["stop_reason"] == "answer" and record["timing"] == ROUTED
    assert record["settings"] == {**settings, "mode": "glimp", "version": __version__, "baseline": False}


@pytest.mark.parametrize("mode, probe, timing", [
    ("small", False, BASELINE), ("large", False, BASELINE), ("large", True, PROBED), ("random", False, ROUTED),
])
def test_only_modes_without_routing_work_are_baselines(mode: str, probe: bool, timing: str) -> None:
    record = result_record(QUESTIONS[0], trace_for(mode, probe), mode, dict(KEY))
    assert record["timing"] == timing
    assert record["settings"]["baseline"] is (timing == BASELINE)
    if mode == "small":
        assert record["extracted"] == "4" and record["correct"] is False


def test_modes_are_deduplicated_and_glimp_runs_before_random() -> None:
    assert order_modes(["small", "random", "large", "glimp", "small"]) == ["small", "glimp", "random", "large"]
    assert order_modes(["glimp", "random"]) == ["glimp", "random"]
    with pytest.raises(UsageError, match="fast"):
        order_modes(["fast"])


def test_a_new_run_refuses_a_non_empty_file_unless_overwriting(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"old": 1}\n')
    with pytest.raises(InputError, match="r.jsonl"):
        ResultsFile.open(path, resume=False, settings_key=KEY)
    assert path.read_text() == '{"old": 1}\n'
    out, done = ResultsFile.open(path, resume=False, settings_key=KEY, overwrite=True)
    assert done == set() and path.read_text() == '{"old": 1}\n'  # not before the run can start
    out.start()
    out.close()
    assert path.read_text() == ""
    out, _ = ResultsFile.open(path, resume=False, settings_key=KEY)  # empty: nothing to lose
    out.close()


def test_overwrite_keeps_the_old_results_when_the_models_fail_to_load(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"old": 1}\n')

    def no_models(mode: str, settings: dict) -> Router:
        raise ModelError("model 'fake-small': GGUF file not found: /nowhere.gguf")

    out, done = ResultsFile.open(path, resume=False, settings_key=KEY, overwrite=True)
    with out, pytest.raises(ModelError):
        run_batch(no_models, QUESTIONS, ["glimp"], out, done, settings_for())
    assert path.read_bytes() == b'{"old": 1}\n'
    out, done = ResultsFile.open(path, resume=False, settings_key=KEY, overwrite=True)
    with out:
        run_batch(Routers(), QUESTIONS[:2], ["small"], out, done, settings_for())
    assert [(r["id"], r["mode"]) for r in read(path)] == [("q1", "small"), ("q2", "small")]


def test_a_second_writer_of_one_results_file_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    first, _ = ResultsFile.open(path, resume=False, settings_key=KEY)
    with first:
        for resume in (True, False):
            with pytest.raises(InputError, match=r"r\.jsonl is being written by another glimp run"):
                ResultsFile.open(path, resume=resume, settings_key=KEY, overwrite=not resume)
    second, _ = ResultsFile.open(path, resume=True, settings_key=KEY)  # released on close
    second.close()


def test_check_writable_names_the_path(tmp_path: Path) -> None:
    check_writable(tmp_path / "new.jsonl")
    assert not (tmp_path / "new.jsonl").exists()
    with pytest.raises(InputError, match="does not exist"):
        check_writable(tmp_path / "missing" / "r.jsonl")
    with pytest.raises(InputError, match="is a directory"):
        check_writable(tmp_path)


def test_check_writable_refuses_a_read_only_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    # Permission bits stop a user; root (as on our machines and CI) needs the immutable attribute.
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not root:
        locked.chmod(0o500)
    elif not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
        pytest.skip("running as root on a file system without the immutable attribute")
    try:
        with pytest.raises(InputError, match="locked"):
            check_writable(locked / "r.jsonl")
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        else:
            locked.chmod(0o700)


def test_check_writable_refuses_a_path_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(InputError, match="plain"):
        check_writable(tmp_path / "plain" / "r.jsonl")


def test_batch_writes_each_question_once_per_mode_with_one_router_per_mode(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    routers = Routers()
    seen: list[str] = []
    outcome = batch(path, ["glimp", "small"], routers=routers, resume=False, on_result=lambda r: seen.append(r["id"]))
    records = read(path)
    assert [(r["id"], r["mode"]) for r in records] == [(q.id, m) for m in ("glimp", "small") for q in QUESTIONS]
    assert [r["correct"] for r in records] == [True] * 4 + [False] * 4
    assert seen == [q.id for q in QUESTIONS] * 2
    assert [mode for mode, _ in routers.calls] == ["glimp", "small"]
    assert (outcome.written, outcome.already_done, outcome.interrupted) == (8, 0, False)


def test_resume_drops_a_torn_last_line_and_finishes_every_pair_once(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    batch(path, ["glimp"], questions=QUESTIONS[:3], resume=False)
    complete = path.read_bytes()
    with path.open("ab") as f:
        f.write(complete.splitlines()[0][:40])  # half a record, no newline
    out, done = ResultsFile.open(path, resume=True, settings_key=KEY)
    out.close()
    assert path.read_bytes() == complete
    assert out.repaired is not None and "line 4" in out.repaired
    assert done == {(q.id, "glimp") for q in QUESTIONS[:3]}

    routers = Routers()
    outcome = batch(path, ["glimp", "small"], routers=routers)
    pairs = [(r["id"], r["mode"]) for r in read(path)]
    assert sorted(pairs) == sorted((q.id, m) for q in QUESTIONS for m in ("glimp", "small"))
    assert len(pairs) == len(set(pairs)) == 8
    assert (outcome.written, outcome.already_done) == (5, 3)


def test_resume_drops_a_damaged_last_line_but_not_a_damaged_earlier_one(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    batch(path, ["small"], questions=QUESTIONS[:2], resume=False)
    complete = path.read_bytes()
    path.write_bytes(complete + b'{"id": "q3", "mo\x00\n')
    out, done = ResultsFile.open(path, resume=True, settings_key=KEY)
    out.close()
    assert path.read_bytes() == complete and len(done) == 2
    path.write_bytes(b"garbage\n" + complete)
    with pytest.raises(InputError, match="line 1"):
        ResultsFile.open(path, resume=True, settings_key=KEY)


def test_resume_refuses_other_settings_and_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    batch(path, ["glimp", "random"], questions=QUESTIONS[:1], resume=False)
    with path.open("a") as f:
        f.write('{"id": "q2", "mo')
    before = path.read_bytes()
    with pytest.raises(InputError, match=r"line 1 .*tau=1\.0 .*tau=2\.0"):
        ResultsFile.open(path, resume=True, settings_key={**KEY, "tau": 2.0})
    assert path.read_bytes() == before  # a refused resume changes nothing
    with pytest.raises(InputError, match="max_tokens"):
        ResultsFile.open(path, resume=True, settings_key={k: v for k, v in KEY.items() if k != "max_tokens"})
    # Per-mode keys (mode, large_share, baseline, version) may differ between records.
    out, done = ResultsFile.open(path, resume=True, settings_key={**KEY, "mode": "small", "large_share": 0.9})
    out.close()
    assert done == {("q1", "glimp"), ("q1", "random")}


def test_resume_refuses_a_done_id_that_now_holds_another_question(tmp_path: Path) -> None:
    source = tmp_path / "q.jsonl"
    source.write_text("".join(json.dumps({"question": f"question {i}?", "answer": "42"}) + "\n" for i in range(1, 4)))
    questions, _ = load_questions(source)  # ids are line numbers: "1", "2", "3"
    path = tmp_path / "r.jsonl"
    out, done = ResultsFile.open(path, resume=False, settings_key=KEY)
    with out:
        run_batch(Routers(), questions[:2], ["small"], out, done, settings_for())
    before = path.read_bytes() + b'{"id": "3", "mo'  # a torn line: a refused resume must not repair it
    path.write_bytes(before)
    # The same file resumed: the done ids hold their questions, and the rest is pending.
    out, done = ResultsFile.open(path, resume=True, settings_key=KEY, questions=questions, source=source)
    out.close()
    assert done == {("1", "small"), ("2", "small")}
    path.write_bytes(before)
    # A line inserted at the top: id "2" is now the old question 1, and so on.
    source.write_text(json.dumps({"question": "a new first question?"}) + "\n" + source.read_text())
    moved, _ = load_questions(source)
    with pytest.raises(InputError) as refused:
        ResultsFile.open(path, resume=True, settings_key=KEY, questions=moved, source=source)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{path}: line 1 has id '1'" in message and f"{source}:1 has id '1'" in message
    assert "'question 1?'" in message and "'a new first question?'" in message
    assert path.read_bytes() == before
    # Another dataset whose ids are not in the file at all shares nothing with it: nothing to refuse.
    other = [Question("q9", "another dataset?", "1", 1)]
    out, done = ResultsFile.open(path, resume=True, settings_key=KEY, questions=other, source=source)
    out.close()
    assert ("q9", "small") not in done


def write_model_config(tmp_path: Path, **small_extra) -> Path:
    """A registry whose small and large models are local GGUF-looking files (magic bytes only)."""
    for name, size in (("s.gguf", 16), ("l.gguf", 32)):
        (tmp_path / name).write_bytes(b"GGUF" + bytes(size - 4))
    config = {
        "prompts": {"p": {"style": "plain", "template": "Q: {question}\nA:", "answer_marker": "The answer is"}},
        "models": {
            "s": {"source": {"path": "s.gguf"}, "prompt": "p", **small_extra},
            "l": {"source": {"path": "l.gguf"}, "prompt": "p", "stop": ["Question:"]},
        },
        "pairs": {"p": {"small": "s", "large": "l", "tau": 1.0}},
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_batch_settings_name_each_used_models_file_prompt_stop_and_context(tmp_path: Path) -> None:
    registry = load_registry(write_model_config(tmp_path))
    pair = registry.pair("p")
    key = batch_settings(registry, pair, {"small", "large"}, probe_baseline=True,
                         questions={"path": "/q.jsonl", "sha256": "ab", "offset": 0, "limit": 2, "shuffle_seed": None})
    assert key["small_model"]["file"] == {"path": str(tmp_path / "s.gguf"), "size": 16}
    assert key["large_model"]["file"] == {"path": str(tmp_path / "l.gguf"), "size": 32}
    assert key["small_model"]["prompt"]["template"] == "Q: {question}\nA:"
    assert key["large_model"]["stop"] == ["Question:"] and key["small_model"]["n_ctx"] == 4096
    assert key["probe_baseline"] is True and key["questions"]["limit"] == 2
    assert "large_model" not in batch_settings(registry, pair, {"small"})  # small alone locates no large model


def resume_with(tmp_path: Path, path: Path, roles=("small", "large"), **small_extra):
    registry = load_registry(write_model_config(tmp_path, **small_extra))
    key = batch_settings(registry, registry.pair("p"), set(roles))
    return ResultsFile.open(path, resume=True, settings_key=key)


@pytest.mark.parametrize("change, setting, old, new", [
    (dict(n_ctx=1024), "small_model.n_ctx", "4096", "1024"),
    (dict(stop=["###"]), "small_model.stop", "[]", "['###']"),
    (dict(prompt={"style": "plain", "template": "Question: {question}\nAnswer:"}), "small_model.prompt.answer_marker",
     "'The answer is'", "None"),
    (dict(threads=1), None, None, None),  # how many threads run it does not change what it writes
])
def test_resume_refuses_a_changed_model_file_prompt_stop_or_context_naming_old_and_new(
        tmp_path: Path, change: dict, setting: str | None, old: str, new: str) -> None:
    path = tmp_path / "r.jsonl"
    registry = load_registry(write_model_config(tmp_path))
    key = batch_settings(registry, registry.pair("p"), {"small", "large"})
    out, done = ResultsFile.open(path, resume=False, settings_key=key)
    with out:
        run_batch(Routers(), QUESTIONS[:1], ["small"], out, done, lambda mode: {**key, "large_share": None})
    before = path.read_bytes()
    if setting is None:
        resume_with(tmp_path, path, **change)[0].close()
        return
    with pytest.raises(InputError) as refused:
        resume_with(tmp_path, path, **change)
    assert f"{setting}={old} but this run has {setting}={new}" in str(refused.value)
    assert path.read_bytes() == before


def test_resume_refuses_another_model_file_of_the_same_name(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    registry = load_registry(write_model_config(tmp_path))
    small_alone = batch_settings(registry, registry.pair("p"), {"small"})
    out, done = ResultsFile.open(path, resume=False, settings_key=small_alone)
    with out:
        run_batch(Routers(), QUESTIONS[:1], ["small"], out, done, lambda mode: {**small_alone, "large_share": None})
    # A record of small alone does not depend on the large model: a run that also uses it may resume.
    resume_with(tmp_path, path)[0].close()
    (tmp_path / "s.gguf").write_bytes(b"GGUF" + bytes(60))  # a re-quantised file under the same name
    key = batch_settings(load_registry(tmp_path / "models.yaml"), registry.pair("p"), {"small"})
    with pytest.raises(InputError, match=r"small_model\.file\.size=16 but this run has small_model\.file\.size=64"):
        ResultsFile.open(path, resume=True, settings_key=key)


def test_resume_refuses_another_probe_baseline_and_another_adaptive_target(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    key = {**KEY, "probe_baseline": False}

    def settings(adaptive_share: float):
        return lambda mode: {**key, "large_share": adaptive_share if mode == "adaptive" else None}

    out, done = ResultsFile.open(path, resume=False, settings_key=key)
    with out:
        run_batch(Routers(), QUESTIONS[:1], ["large", "adaptive"], out, done, settings(0.5))
    assert [r["settings"]["large_share"] for r in read(path)] == [None, 0.5]
    with pytest.raises(InputError, match="probe_baseline=False but this run has probe_baseline=True"):
        ResultsFile.open(path, resume=True, settings_key=lambda mode: {**settings(0.5)(mode), "probe_baseline": True})
    with pytest.raises(InputError, match="line 2 was written with large_share=0.5 but this run has large_share=0.3"):
        ResultsFile.open(path, resume=True, settings_key=settings(0.3))
    out, done = ResultsFile.open(path, resume=True, settings_key=settings(0.5))
    out.close()
    assert done == {("q1", "large"), ("q1", "adaptive")}


def test_random_runs_at_the_share_glimp_reached_on_the_same_questions(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    routers = Routers()
    outcome = batch(path, ["random", "glimp"], routers=routers, resume=False)
    records = read(path)
    assert [r["mode"] for r in records] == ["glimp"] * 4 + ["random"] * 4
    assert routers.calls == [("glimp", None), ("random", pytest.approx(GLIMP_SHARE))]
    assert outcome.random_share == pytest.approx(GLIMP_SHARE)
    for r in records[4:]:
        assert r["settings"]["large_share"] == pytest.approx(GLIMP_SHARE)
        assert r["policy"] == "random(large_share=0.6)"


def test_random_share_comes_from_resumed_glimp_records_of_these_questions_only(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    settings = {**KEY, "mode": "glimp", "baseline": False, "version": __version__}
    made = [("q1", 1, 3), ("q2", 3, 3), ("other", 10, 0)]  # (id, large steps, small steps) the policy routed

    def record(i: str, large: int, small: int) -> dict:
        routed = [{"model": "large", "h_init": 2.0}] * large + [{"model": "small", "h_init": 0.1}] * small
        answer = {"model": "large", "h_init": None}  # handed over or forced: no policy chose it, so not counted
        return {"id": i, "mode": "glimp", "model_steps": {"small": small, "large": large + 1},
                "steps": routed + [answer], "settings": settings}

    path.write_text("".join(json.dumps(record(*m)) + "\n" for m in made))
    routers = Routers()
    outcome = batch(path, ["random"], questions=QUESTIONS[:2], routers=routers)
    # Pooled over q1 and q2 (a mean of their shares would be 0.375); "other" is not in this batch.
    assert outcome.random_share == pytest.approx((1 + 3) / (4 + 6))
    assert routers.calls == [("random", pytest.approx(0.4))]


def test_random_share_given_by_the_caller_wins_and_none_at_all_is_refused_up_front(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    routers = Routers()
    outcome = batch(path, ["glimp", "random"], questions=QUESTIONS[:1], routers=routers, share=0.25, resume=False)
    assert outcome.random_share == 0.25 and routers.calls[1] == ("random", 0.25)
    routers = Routers()
    with pytest.raises(UsageError, match="large share"):
        batch(tmp_path / "fresh.jsonl", ["small", "random"], routers=routers, resume=False)
    assert routers.calls == []


class InterruptingWrite:
    """Wraps a backend's write so Ctrl-C arrives during its n-th call."""

    def __init__(self, backend, at: int):
        self.write, self.at, self.calls = backend.write, at, 0
        backend.write = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.write(*args, **kwargs)


def test_ctrl_c_mid_question_leaves_no_partial_record(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"

    def interrupting(mode: str, settings: dict) -> Router:
        router = Routers()(mode, settings)
        # Large alone writes five steps per question: call 12 is the 2nd step of the 3rd question.
        InterruptingWrite(router._sides["large"].backend, at=12)
        return router

    outcome = batch(path, ["large", "small"], routers=interrupting, resume=False)
    assert outcome.interrupted and outcome.written == 2
    assert [(r["id"], r["mode"]) for r in read(path)] == [("q1", "large"), ("q2", "large")]

    outcome = batch(path, ["large", "small"])
    pairs = [(r["id"], r["mode"]) for r in read(path)]
    assert len(pairs) == len(set(pairs)) == 8 and not outcome.interrupted


def test_stop_event_ends_the_batch_between_questions(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    stop = threading.Event()
    outcome = batch(path, ["small"], resume=False, stop=stop, on_result=lambda r: stop.set())
    assert outcome.interrupted and outcome.written == 1 and len(read(path)) == 1


def test_a_question_too_long_for_the_context_is_reported_not_written(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    questions = [QUESTIONS[0], Question("long", "x" * 300, "1", 9), QUESTIONS[1]]
    outcome = batch(path, ["small"], questions=questions, routers=Routers(n_ctx=200), resume=False)
    assert [r["id"] for r in read(path)] == ["q1", "q2"]
    assert [(i, m) for i, m, _ in outcome.failed] == [("long", "small")]
    assert "context of 200" in outcome.failed[0][2]


def test_a_threshold_is_compared_only_for_the_modes_it_routes(tmp_path: Path) -> None:
    # Large alone and small alone do not depend on tau: their records resume under another tau.
    path = tmp_path / "r.jsonl"
    batch(path, ["small", "large"], questions=QUESTIONS[:1], resume=False)
    out, done = ResultsFile.open(path, resume=True, settings_key={**KEY, "tau": 2.0, "step_entropy_threshold": 9.0})
    out.close()
    assert done == {("q1", "small"), ("q1", "large")}
    glimp = tmp_path / "g.jsonl"
    batch(glimp, ["glimp"], questions=QUESTIONS[:1], resume=False)
    with pytest.raises(InputError, match=r"tau=1\.0 .*tau=2\.0"):
        ResultsFile.open(glimp, resume=True, settings_key={**KEY, "tau": 2.0})
