"""`glimp batch` and `glimp report` through the command line, on the real tiny pair with tiny budgets.

The pair runs on one thread per model (an overlay of the packaged models.yaml): llama.cpp's threads
spin-wait for each other, and with every core in use while other tests share the machine, a run
measured ~50x slower (7 minutes instead of 8 seconds for the batch below).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import GSM8K_QUESTIONS, default_sigint
from glimp_cli.cli import app
from glimp_cli.config import packaged_config
from glimp_cli.report import load_results, rows_to_json, summarize

pytestmark = pytest.mark.real

TINY = ["--max-tokens", "48", "--max-step-tokens", "32"]
MODES = ("glimp", "large", "random")
REFERENCES = ["18", "3", "540", "14", "7"]  # of GSM8K_QUESTIONS
# What every results line must hold (the report reads some, calibration and grading the rest).
FIELDS = {"id", "line", "mode", "policy", "question", "reference", "answer_text", "extracted", "correct",
          "stop_reason", "model_steps", "tokens", "wall_seconds", "large_share_steps", "timing", "settings",
          "steps"}
# Bounds for the subprocess runs: generous, since other real-model tests may share the two cores.
FIRST_LINE_SECONDS = 120
RUN_SECONDS = 300


@pytest.fixture(scope="module")
def one_thread(tmp_path_factory) -> Path:
    """The packaged models.yaml with the tiny pair as the default and its models on one thread each."""
    config = yaml.safe_load(packaged_config().read_text(encoding="utf-8"))
    config["default_pair"] = "tiny"
    pair = config["pairs"]["tiny"]
    for role in ("small", "large"):
        config["models"][pair[role]]["threads"] = 1
    path = tmp_path_factory.mktemp("config") / "models.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, one_thread) -> None:
    """No GLIMP_* setting or user models.yaml of the machine leaks in; subprocesses inherit this."""
    for key in list(os.environ):
        if key.startswith("GLIMP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("GLIMP_CONFIG", str(one_thread))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def write_questions(path: Path, n: int, bad_line_after: int | None = None) -> Path:
    lines = [json.dumps({"id": f"q{i}", "question": GSM8K_QUESTIONS[i], "answer": REFERENCES[i]}) for i in range(n)]
    if bad_line_after is not None:
        lines.insert(bad_line_after, '{"id": "broken", "question": ')
    path.write_text("\n".join(lines) + "\n")
    return path


def read_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the results file must end with a complete line"
    return [json.loads(line) for line in data.decode().splitlines()]


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, one_thread):
    """One real batch: questions q0 and q1 with a broken line between them, in glimp, large and random."""
    tmp = tmp_path_factory.mktemp("batch")
    questions = write_questions(tmp / "q.jsonl", 2, bad_line_after=1)
    out = tmp / "r.jsonl"
    args = ["batch", str(questions), "-o", str(out), "--mode", ",".join(MODES), "--config", str(one_thread), *TINY]
    # Module scope runs before the per-test `isolated`: clear the machine's settings here too.
    env = {key: None for key in os.environ if key.startswith("GLIMP_")}
    result = CliRunner().invoke(app, args, env={**env, "XDG_CONFIG_HOME": str(tmp / "xdg")})
    return questions, out, args, result


@pytest.fixture
def no_model_load(monkeypatch):
    """Engine.load replaced by a recorder that stops the command: the test says whether it was reached."""
    from glimp_cli.engine import Engine
    from glimp_cli.errors import ModelError

    calls: list[set] = []

    def load(cls, registry, pair, roles):
        calls.append(set(roles))
        raise ModelError("stopped by the test before loading models")

    monkeypatch.setattr(Engine, "load", classmethod(load))
    return calls


def test_batch_writes_one_line_per_question_and_mode(batch_run) -> None:
    questions, out, _, result = batch_run
    assert result.exit_code == 3, result.output  # finished, but an input line was skipped
    assert f"{questions}:2: invalid JSON" in result.stderr
    records = read_lines(out)
    assert sorted((r["id"], r["mode"]) for r in records) == sorted((q, m) for q in ("q0", "q1") for m in MODES)
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["settings"]["max_tokens"] == 48 and r["settings"]["max_step_tokens"] == 32
        assert r["settings"]["pair"] == "tiny" and set(r["settings"]["models"]) == {"small", "large"}
        assert r["steps"] and sum(r["model_steps"].values()) == len(r["steps"])
    by_mode = {m: [r for r in records if r["mode"] == m] for m in MODES}
    assert [r["reference"] for r in by_mode["glimp"]] == ["18", "3"]
    assert all(r["line"] == 3 for r in records if r["id"] == "q1")  # the file line, counting the broken one
    # glimp probes the small model before each step; large alone probes nothing and is a timing baseline.
    assert all(r["steps"][0]["h_init"] is not None and r["timing"] == "routed" for r in by_mode["glimp"])
    assert all(s["h_init"] is None for r in by_mode["large"] for s in r["steps"])
    assert all(r["timing"] == "baseline" and r["settings"]["baseline"] for r in by_mode["large"])
    # Without --large-share, random runs at the pooled share glimp reached on these questions among the
    # steps its policy routed (probed for an H_init), not among all its steps (the answer is large in both).
    routed = [s for r in by_mode["glimp"] for s in r["steps"] if s["h_init"] is not None]
    glimp_share = sum(s["model"] == "large" for s in routed) / len(routed)
    all_steps = (sum(r["model_steps"]["large"] for r in by_mode["glimp"])
                 / sum(sum(r["model_steps"].values()) for r in by_mode["glimp"]))
    assert glimp_share != pytest.approx(all_steps)  # else the check below could not tell the two rules apart
    assert all(r["settings"]["large_share"] == pytest.approx(glimp_share) for r in by_mode["random"])
    assert all(r["settings"]["large_share"] is None for r in by_mode["glimp"] + by_mode["large"])
    # The final report covers every mode of the file.
    for mode in MODES:
        assert f" {mode} " in result.stdout
    assert "accuracy (95% CI)" in result.stdout


def test_report_json_matches_the_file(batch_run) -> None:
    _, out, _, _ = batch_run
    result = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert result.exit_code == 0 and result.stderr == ""
    rows = json.loads(result.stdout)
    assert rows == json.loads(json.dumps(rows_to_json(summarize(load_results(out)[0]))))
    records = read_lines(out)
    assert [row["mode"] for row in rows] == list(MODES)
    for row in rows:
        mine = [r for r in records if r["mode"] == row["mode"]]
        assert row["n"] == 2 and row["correct"] == sum(bool(r["correct"]) for r in mine)
        assert row["mean_latency"] == pytest.approx(sum(r["wall_seconds"] for r in mine) / 2)
    table = CliRunner().invoke(app, ["report", str(out)])
    assert table.exit_code == 0 and all(f" {mode} " in table.stdout for mode in MODES)


def test_resume_of_a_finished_file_adds_nothing_and_loads_no_model(batch_run, no_model_load) -> None:
    _, out, args, _ = batch_run
    before = out.read_bytes()
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 3, result.output  # the broken input line is still there
    assert "nothing to do" in result.stderr and "glimp" in result.stdout
    assert out.read_bytes() == before and no_model_load == []


def test_resume_with_other_settings_is_refused(batch_run, no_model_load) -> None:
    _, out, args, _ = batch_run
    before = out.read_bytes()
    result = CliRunner().invoke(app, [*args, "--resume", "--tau", "9.5"])
    assert result.exit_code == 1
    assert stderr_lines(result)[-1].startswith("glimp: error: ")
    assert "tau=3.5" in result.stderr and "tau=9.5" in result.stderr
    assert out.read_bytes() == before and no_model_load == []


def test_resume_with_another_probe_baseline_or_questions_file_is_refused(batch_run, tmp_path, no_model_load) -> None:
    questions, out, args, _ = batch_run
    before = out.read_bytes()
    probed = CliRunner().invoke(app, [*args, "--resume", "--probe-baseline"])
    assert probed.exit_code == 1 and len(stderr_lines(probed)) == 2  # the skipped input line, then the error
    assert "probe_baseline=False but this run has probe_baseline=True" in stderr_lines(probed)[-1]
    # Another dataset whose ids are line numbers, like q0/q1 here... and ids that collide with this file's.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "q1", "question": GSM8K_QUESTIONS[3], "answer": "14"}) + "\n")
    swapped = CliRunner().invoke(app, [*args[:1], str(other), *args[2:], "--resume"])
    assert swapped.exit_code == 1 and len(stderr_lines(swapped)) == 1, swapped.output
    assert "has id 'q1'" in swapped.stderr and f"{other}:1 has id 'q1'" in swapped.stderr
    assert out.read_bytes() == before and no_model_load == []


def broken_model_config(tmp_path: Path, one_thread: Path, gguf: bytes | None) -> Path:
    """The one-thread config with the small model's file replaced: missing (None) or these bytes."""
    config = yaml.safe_load(one_thread.read_text(encoding="utf-8"))
    small = config["pairs"][config["default_pair"]]["small"]
    if gguf is not None:
        (tmp_path / "broken.gguf").write_bytes(gguf)
    config["models"][small]["source"] = {"path": str(tmp_path / "broken.gguf")}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("gguf", [None, b"GGUF" + bytes(64)], ids=["missing", "truncated"])
def test_overwrite_keeps_the_old_results_byte_for_byte_when_a_model_cannot_load(tmp_path, one_thread, gguf) -> None:
    questions = write_questions(tmp_path / "q.jsonl", 2)
    out = tmp_path / "r.jsonl"
    old = b'{"earlier": "results", "kept": "\xc3\xa9"}\n{"torn'
    out.write_bytes(old)
    config = broken_model_config(tmp_path, one_thread, gguf)
    result = CliRunner().invoke(app, ["batch", str(questions), "-o", str(out), "--overwrite", "--mode", "glimp",
                                      "--config", str(config), *TINY])
    assert result.exit_code == 1, result.output
    assert stderr_lines(result)[0].startswith("glimp: error: ") and "broken.gguf" in result.stderr
    assert out.read_bytes() == old


@pytest.mark.parametrize("case", ["missing directory", "directory", "exists"])
def test_an_unusable_output_fails_in_one_line_before_loading_models(tmp_path, no_model_load, case) -> None:
    questions = write_questions(tmp_path / "q.jsonl", 2)
    out = {"missing directory": tmp_path / "nowhere" / "r.jsonl", "directory": tmp_path,
           "exists": tmp_path / "old.jsonl"}[case]
    if case == "exists":
        out.write_text('{"earlier": "results"}\n')
    result = CliRunner().invoke(app, ["batch", str(questions), "-o", str(out), *TINY])
    assert result.exit_code == 1
    assert len(stderr_lines(result)) == 1 and result.stderr.startswith("glimp: error: ")
    assert str(out) in result.stderr
    assert no_model_load == []
    if case == "exists":
        assert out.read_text() == '{"earlier": "results"}\n'


def test_random_without_a_share_is_refused_up_front_and_with_one_loads_both_models(tmp_path, no_model_load) -> None:
    questions = write_questions(tmp_path / "q.jsonl", 2)
    out = tmp_path / "r.jsonl"
    out.write_text('{"earlier": "results"}\n')
    args = ["batch", str(questions), "-o", str(out), "--mode", "random", "--overwrite"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "needs a large share" in refused.stderr
    assert no_model_load == [] and out.read_text() == '{"earlier": "results"}\n'  # --overwrite emptied nothing
    given = CliRunner().invoke(app, args, env={"GLIMP_LARGE_SHARE": "0.25"})
    assert given.exit_code == 1 and "stopped by the test" in given.stderr
    assert no_model_load == [{"small", "large"}]


def test_mode_list_is_checked_and_small_alone_loads_only_the_small_model(tmp_path, no_model_load) -> None:
    questions = write_questions(tmp_path / "q.jsonl", 2)
    bad = CliRunner().invoke(app, ["batch", str(questions), "-o", str(tmp_path / "a.jsonl"), "--mode", "glimp,fast"])
    assert bad.exit_code == 2 and "'fast'" in bad.stderr and no_model_load == []
    CliRunner().invoke(app, ["batch", str(questions), "-o", str(tmp_path / "b.jsonl"), "--mode", "small"])
    assert no_model_load == [{"small"}]


def glimp_process(questions: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "glimp_cli", "batch", str(questions), "-o", str(out), "--mode", "glimp,large",
         *TINY, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
    )


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def signal_after(process: subprocess.Popen, path: Path, lines: int, sig: int) -> tuple[str, str]:
    """Wait until `path` holds `lines` complete lines, then send `sig`; returns the process's output."""
    deadline = time.monotonic() + FIRST_LINE_SECONDS
    try:
        while complete_lines(path) < lines:
            assert process.poll() is None, f"the batch ended early:\n{process.communicate()[1]}"
            assert time.monotonic() < deadline, f"no {lines} results within {FIRST_LINE_SECONDS} s"
            time.sleep(0.02)
        process.send_signal(sig)
        return process.communicate(timeout=RUN_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ctrl_c_then_kill_then_resume_gives_every_pair_exactly_once(tmp_path) -> None:
    questions = write_questions(tmp_path / "q.jsonl", 4)
    out = tmp_path / "r.jsonl"
    wanted = sorted((f"q{i}", m) for i in range(4) for m in ("glimp", "large"))

    # Ctrl-C: finished results stay, the question in flight is dropped, exit 130.
    process = glimp_process(questions, out)
    _, stderr = signal_after(process, out, 1, signal.SIGINT)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr
    after_ctrl_c = read_lines(out)
    assert 1 <= len(after_ctrl_c) < len(wanted), "Ctrl-C did not land mid-run"

    # SIGKILL of a resumed run: nothing runs on the way out.
    process = glimp_process(questions, out, "--resume")
    signal_after(process, out, len(after_ctrl_c) + 1, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    killed = read_lines(out)
    assert len(after_ctrl_c) < len(killed) < len(wanted), "the kill did not land mid-run"
    # A kill in the middle of a write leaves half a line; report skips it with a warning.
    with out.open("ab") as f:
        f.write(b'{"id": "q3", "mode": "large", "answer_te')
    report = CliRunner().invoke(app, ["report", str(out), "--json"])
    assert report.exit_code == 0 and "incomplete" in report.stderr
    assert sum(row["n"] for row in json.loads(report.stdout)) == len(killed)

    # Resume to the end: the torn line is dropped, every (id, mode) is there exactly once.
    process = glimp_process(questions, out, "--resume")
    stdout, stderr = process.communicate(timeout=RUN_SECONDS)
    assert process.returncode == 0, stderr
    assert "dropped the incomplete last line" in stderr
    final = read_lines(out)
    assert sorted((r["id"], r["mode"]) for r in final) == wanted
    assert final[: len(killed)] == killed  # earlier results are kept as they were
    assert "glimp" in stdout and "large" in stdout


def test_a_second_batch_on_the_same_file_is_refused_while_the_first_runs(tmp_path) -> None:
    questions = write_questions(tmp_path / "q.jsonl", 3)
    out = tmp_path / "r.jsonl"
    first = glimp_process(questions, out)
    try:
        deadline = time.monotonic() + FIRST_LINE_SECONDS
        while complete_lines(out) < 1:
            assert first.poll() is None, f"the batch ended early:\n{first.communicate()[1]}"
            assert time.monotonic() < deadline, f"no result within {FIRST_LINE_SECONDS} s"
            time.sleep(0.02)
        # Paused mid-run, so it certainly still holds the file while the second one tries.
        first.send_signal(signal.SIGSTOP)
        second = glimp_process(questions, out, "--resume")
        _, stderr = second.communicate(timeout=RUN_SECONDS)
        first.send_signal(signal.SIGCONT)
        _, first_stderr = first.communicate(timeout=RUN_SECONDS)
    finally:
        for process in (first,):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()
    assert second.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0] == (f"glimp: error: {out} is being written by another glimp run: "
                                              "wait for it to finish, or write to another file")
    assert first.returncode == 0, first_stderr
    pairs = [(r["id"], r["mode"]) for r in read_lines(out)]
    assert sorted(pairs) == sorted((f"q{i}", m) for i in range(3) for m in ("glimp", "large"))
