"""`glimp ask` and `glimp models` through typer's runner: JSON output, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import default_sigint
from glimp_cli.cli import app
from glimp_cli.config import load_registry
from glimp_cli.sources import resolve

runner = CliRunner()
QUESTION = "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?"


def smollm2_path() -> Path:
    return resolve(load_registry().model("smollm2-135m"))


def write_config(tmp_path: Path, model_source: str, n_ctx: int = 2048) -> Path:
    config = tmp_path / "models.yaml"
    config.write_text(f"""
default_pair: mine
models:
  mine-small:
    source: {{{model_source}}}
    prompt: chat-steps
    n_ctx: {n_ctx}
pairs:
  mine:
    small: mine-small
    large: gemma3-270m
    max_tokens: 48
""".replace("prompt: chat-steps", "prompt: {style: chat, answer_marker: 'The answer is'}"))
    return config


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("glimp: error:"), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.real
def test_ask_json_matches_the_trace():
    result = runner.invoke(app, ["ask", QUESTION, "--pair", "tiny", "--json", "--max-tokens", "64", "--tau", "3.5"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    steps = record["steps"]
    assert steps and record["stop_reason"] in ("answer", "eos", "stop_string", "max_tokens", "repetition")
    assert record["summary"]["steps"]["small"] == sum(s["model"] == "small" for s in steps)
    assert record["summary"]["tokens"]["large"] == sum(s["tokens"] for s in steps if s["model"] == "large")
    assert sum(s["tokens"] for s in steps) <= 64
    for s in steps:
        assert {"model", "h_init", "text", "tokens", "probe_seconds", "generate_seconds", "prefill_seconds",
                "stop_reason"} <= set(s)
        if s["model"] == "small":
            assert s["h_init"] <= 3.5
    assert record["tau"] == 3.5 and record["timing"] == "routed"


@pytest.mark.real
def test_ask_streams_plain_text_without_escape_codes():
    result = runner.invoke(app, ["ask", QUESTION, "--pair", "tiny", "--max-tokens", "48", "--mode", "large"])
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.stdout
    assert "step 1 · large" in result.stdout and "wall time" in result.stdout


def test_unknown_key_in_config_names_file_and_key(tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("pairs:\n  default:\n    small: smollm2-135m\n    large: gemma3-270m\n    tua: 1.0\n")
    one_line_error(runner.invoke(app, ["ask", QUESTION, "--config", str(config)]), str(config), "tua")


def test_wrong_type_in_config_names_the_key(tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  gemma3-270m:\n    source: {path: x.gguf}\n    prompt: fewshot-qa\n    n_ctx: big\n")
    one_line_error(runner.invoke(app, ["ask", QUESTION, "--config", str(config), "--pair", "tiny"]),
                   "models.gemma3-270m.n_ctx")


def test_missing_gguf_file(tmp_path):
    config = write_config(tmp_path, "path: nowhere.gguf")
    one_line_error(runner.invoke(app, ["ask", QUESTION, "--config", str(config)]), "not found", "nowhere.gguf")


def test_file_that_is_not_a_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"this is not a model" * 100)
    config = write_config(tmp_path, "path: junk.gguf")
    one_line_error(runner.invoke(app, ["ask", QUESTION, "--config", str(config)]), "not a GGUF")


@pytest.mark.real
def test_truncated_gguf_is_refused_by_llama_cpp_without_a_crash(tmp_path):
    with open(smollm2_path(), "rb") as src:
        (tmp_path / "cut.gguf").write_bytes(src.read(4_000_000))
    config = write_config(tmp_path, "path: cut.gguf")
    one_line_error(runner.invoke(app, ["ask", QUESTION, "--config", str(config)]), "could not load", "cut.gguf")


def test_package_that_is_not_installed(tmp_path):
    config = write_config(tmp_path, "package: no_such_glimp_pkg, file: m.gguf, install: glimp-extra-x")
    one_line_error(runner.invoke(app, ["ask", QUESTION, "--config", str(config)]),
                   "no_such_glimp_pkg", "pip install glimp-extra-x")


@pytest.mark.real
def test_question_longer_than_the_context(tmp_path):
    shutil.copy(smollm2_path(), tmp_path / "small.gguf")
    config = write_config(tmp_path, "path: small.gguf", n_ctx=128)
    one_line_error(runner.invoke(app, ["ask", "how many? " * 100, "--config", str(config)]),
                   "has a context of", "n_ctx")


def test_empty_question_is_a_usage_error():
    result = runner.invoke(app, ["ask", "   "])
    assert result.exit_code == 2 and "question is empty" in result.output


@pytest.mark.parametrize("flag, value, needle", [("--top-p", "0", "top_p"), ("--estimator", "topk:1", "topk:1"),
                                                 ("--probe-skip", "(", "probe_skip: not a regular expression"),
                                                 ("--tau-after-large", "nan", "tau_after_large")])
def test_bad_flag_values_are_refused_before_loading(tmp_path, flag, value, needle):
    # A model that cannot be loaded: trying to load it first would give "not found" instead.
    config = write_config(tmp_path, "path: nowhere.gguf")
    one_line_error(runner.invoke(app, ["ask", QUESTION, "--config", str(config), flag, value]), needle)
    # With the packaged pair, which would load: llama.cpp is never even imported.
    code = ("import sys; from glimp_cli.cli import main\n"
            f"sys.argv = ['glimp', 'ask', 'q?', {flag!r}, {value!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
            "assert 'llama_cpp' not in sys.modules, 'llama_cpp was imported'\n"
            "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and needle in result.stderr + result.stdout, (result.stdout, result.stderr)


def test_a_delimiter_arrives_as_written_and_a_bad_escape_is_one_line(tmp_path, monkeypatch, isolated):
    from glimp_cli.engine import Engine
    from glimp_cli.errors import ModelError

    loaded = []

    def load(cls, registry, pair, roles):
        loaded.append(pair.delimiter)
        raise ModelError("stopped by the test before loading models")

    monkeypatch.setattr(Engine, "load", classmethod(load))
    config = write_config(tmp_path, "path: nowhere.gguf")
    ask = ["ask", QUESTION, "--config", str(config)]
    result = runner.invoke(app, [*ask, "--delimiter", "→", "--verbose"])
    assert loaded == ["→"] and "delimiter = '→'  (flag)" in result.output, result.output
    result = runner.invoke(app, ask, env={"GLIMP_DELIMITER": "\\u2192\\n"})
    assert loaded[-1] == "→\n", result.output
    # A malformed escape names the option or variable it came from, before any model loads.
    one_line_error(runner.invoke(app, [*ask, "--delimiter", "\\x"]), "--delimiter: bad escape '\\x'")
    one_line_error(runner.invoke(app, ask, env={"GLIMP_DELIMITER": "\\u12"}), "GLIMP_DELIMITER: bad escape '\\u12'")
    assert len(loaded) == 2


def test_models_lists_a_broken_entry_with_its_error(tmp_path):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  broken-one:\n    source: {path: a.gguf}\n    n_ctx: -3\n")
    result = runner.invoke(app, ["models", "--config", str(config)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "broken-one" in result.output and "n_ctx" in result.output
    assert "smollm2-135m" in result.output and "gemma3-270m" in result.output


def test_verbose_says_which_source_won(tmp_path, monkeypatch):
    monkeypatch.setenv("GLIMP_TAU", "2.5")
    config = write_config(tmp_path, "path: nowhere.gguf")
    result = runner.invoke(app, ["ask", QUESTION, "--config", str(config), "--verbose", "--seed", "3"])
    assert "tau = 2.5  (environment)" in result.output
    assert "seed = 3  (flag)" in result.output
    assert "max_tokens = 48  (models.yaml)" in result.output
    assert "top_p = 1.0  (default)" in result.output


def _declared_closure(dist: str) -> set[str]:
    """`dist` and every distribution its non-extra requirements pull in, normalized names."""
    from importlib import metadata

    from packaging.requirements import Requirement

    norm = lambda name: name.lower().replace("_", "-").replace(".", "-")  # noqa: E731
    seen, todo = set(), [dist]
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_the_cli_imports_only_what_its_declared_dependencies_install():
    # typer vendors click now: a direct `import click` worked here only because an extra pulled it in.
    code = ("import sys; before = set(sys.modules)  # what the interpreter itself started with\n"
            "from glimp_cli.cli import main; sys.argv = ['glimp', 'ask', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    from importlib import metadata

    owners = metadata.packages_distributions()
    norm = lambda name: name.lower().replace("_", "-").replace(".", "-")  # noqa: E731
    imported = {norm(d) for top in result.stderr.split() for d in owners.get(top, [])}
    assert imported, "no imported module maps to a distribution"
    assert imported - _declared_closure("glimp") == set()


def test_help_does_not_import_llama_cpp():
    code = ("import sys; from glimp_cli.cli import main; sys.argv = ['glimp', 'ask', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'llama_cpp' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--tau" in result.stdout


def test_hub_model_that_cannot_be_downloaded_is_one_line(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    # The hub client reads HF_HUB_OFFLINE once, at import: set both so no request leaves the machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = write_config(tmp_path, "hf_repo: nobody/nothing-GGUF, hf_file: x.gguf")
    one_line_error(runner.invoke(app, ["ask", QUESTION, "--config", str(config)]),
                   "download of nobody/nothing-GGUF/x.gguf failed")


@pytest.mark.real
def test_ctrl_c_prints_what_was_written_and_exits_130():
    import os
    import signal
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "glimp_cli", "ask", QUESTION, "--pair", "tiny", "--mode", "large", "--max-tokens", "2000",
         "--max-step-tokens", "2000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)
    seen = ""
    deadline = time.monotonic() + 120
    while "step 1" not in seen and time.monotonic() < deadline:
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, errors = proc.communicate(timeout=60)
    assert proc.returncode == 130, errors
    assert "interrupted" in out and "wall time" in out
    assert "Traceback" not in errors


def test_the_pair_options_are_one_set_and_commands_differ_only_where_they_say():
    import typer

    from glimp_cli.cli_options import PAIR_OPTIONS

    commands = typer.main.get_command(app).commands
    # What each command declares its own way: batch's --mode lists modes, calibrate's --large-share picks tau
    # (and it records the small model alone), serve's --pair repeats.
    own = {"ask": set(), "batch": {"mode"}, "calibrate": {"mode", "large_share", "tau_after_large"},
           "serve": {"pair"}}
    for name, declared_here in own.items():
        params = {p.name: p for p in commands[name].params}
        for key, (_, option) in PAIR_OPTIONS.items():
            if key in declared_here:
                assert key not in params or params[key].help != option.help, (name, key)
            else:
                assert (params[key].opts, params[key].envvar, params[key].help) == (
                    list(option.param_decls), option.envvar, option.help), (name, key)
