"""models.yaml values and command-line numbers: NaN and other meaningless numbers are refused like any bad value."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from glimp_cli.cli import app
from glimp_cli.config import PairSpec, apply_overrides, load_registry, parse_delimiter
from glimp_cli.errors import ConfigError

PAIR_YAML = """\
pairs:
  mine:
    small: smollm2-135m
    large: gemma3-270m
    {key}: {value}
"""

REMOTE_YAML = """\
models:
  remote:
    backend: openai
    base_url: http://127.0.0.1:1/v1
    prompt: {{style: plain, template: "Q: {{question}}"}}
    timeout: {value}
"""


pytestmark = pytest.mark.usefixtures("isolated")



def pair_file(tmp_path: Path, key: str, value: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(PAIR_YAML.format(key=key, value=value))
    return path


@pytest.mark.parametrize("key", ["tau", "temperature", "top_p", "large_share", "step_entropy_threshold",
                                 "step_perplexity_threshold"])
def test_nan_in_a_pair_value_is_refused_naming_file_and_key(tmp_path: Path, key: str) -> None:
    path = pair_file(tmp_path, key, ".nan")
    with pytest.raises(ConfigError, match=rf"^{path}: pairs\.mine\.{key}: expected a number, got NaN$"):
        load_registry(path).pair("mine")


def test_an_infinite_tau_means_something_and_an_infinite_temperature_does_not(tmp_path: Path) -> None:
    assert load_registry(pair_file(tmp_path, "tau", "-.inf")).pair("mine").tau == -math.inf
    assert load_registry(pair_file(tmp_path, "tau", ".inf")).pair("mine").tau == math.inf
    with pytest.raises(ConfigError, match=r"pairs\.mine\.temperature: must be a finite number >= 0"):
        load_registry(pair_file(tmp_path, "temperature", ".inf")).pair("mine")


@pytest.mark.parametrize("value, problem", [(".nan", "expected a number, got NaN"),
                                            (".inf", "must be a positive, finite number of seconds")])
def test_a_meaningless_timeout_is_refused(tmp_path: Path, value: str, problem: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(REMOTE_YAML.format(value=value))
    with pytest.raises(ConfigError, match=rf"{path}: models\.remote\.timeout: {problem}"):
        load_registry(path).model("remote")


@pytest.mark.parametrize("key", ["tau", "temperature", "step_entropy_threshold"])
def test_nan_from_a_flag_is_refused_naming_where_it_came_from(key: str) -> None:
    pair = PairSpec("p", "s", "l")
    with pytest.raises(ConfigError, match=rf"^flag value for {key}: must be"):
        apply_overrides(pair, {key: (math.nan, "flag")})
    assert apply_overrides(pair, {"tau": (math.inf, "flag")})[0].tau == math.inf


@pytest.mark.parametrize("args", [
    ["ask", "What is 2+2?", "--tau", "nan"],
    ["ask", "What is 2+2?", "--temperature", "nan"],
    ["ask", "What is 2+2?", "--temperature", "inf"],
    ["ask", "What is 2+2?", "--top-p", "nan"],
    ["ask", "What is 2+2?", "--large-share", "nan", "--mode", "random"],
    ["batch", "q.jsonl", "-o", "r.jsonl", "--tau", "nan"],
    ["calibrate", "--tau", "NaN"],
    ["calibrate", "--large-share", "nan"],
    ["calibrate", "--sweep", "--objective", "fastest-within-drop", "--max-drop", "nan"],
    ["calibrate", "--sweep", "--objective", "most-accurate-under-latency", "--max-latency-ratio", "inf"],
])
def test_nan_on_the_command_line_is_refused_in_one_line_before_any_model_loads(
        tmp_path: Path, monkeypatch, no_models, args: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text('{"question": "What is 2+2?", "answer": "4"}\n')
    result = CliRunner().invoke(app, args)
    assert result.exit_code in (1, 2), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("glimp: error: "), result.output
    assert not (tmp_path / "r.jsonl").exists()


def test_nan_from_the_environment_is_refused_too(no_models) -> None:
    result = CliRunner().invoke(app, ["ask", "What is 2+2?"], env={"GLIMP_TAU": "nan"})
    assert result.exit_code == 1
    assert result.stderr.strip() == "glimp: error: environment value for tau: must be a number (inf and -inf are allowed), not NaN"


@pytest.mark.parametrize("written, meant", [
    ("\\n", "\n"), ("\\n\\n", "\n\n"), ("\\t", "\t"), ("\\r\\n", "\r\n"),
    ("\\\\", "\\"), ("\\\\n", "\\n"),  # an escaped backslash, then a plain n
    ("\\x41", "A"), ("\\u2192", "→"), ("\\U0001F600", "😀"), ("\\u12345", "\u1234" + "5"),
    ("→", "→"), ("é\\n", "é\n"), ("😀", "😀"), ("Step:", "Step:"), ("\n", "\n"),  # kept as they are
])
def test_a_delimiter_reads_the_usual_escapes_and_keeps_every_other_character(written: str, meant: str) -> None:
    assert parse_delimiter(written, "--delimiter") == meant


@pytest.mark.parametrize("written, bad", [
    ("\\x", "'\\x'"), ("\\xZ1", "'\\x'"), ("\\x4", "'\\x4'"), ("\\u12", "'\\u12'"), ("\\U0001F6", "'\\U0001F6'"),
    ("\\q", "'\\q'"), ("\\0", "'\\0'"), ("end\\", "'\\' at the end"),
    ("\\ud800", "'\\ud800' is not a character"), ("\\U00110000", "'\\U00110000' is not a character"),
])
def test_a_malformed_escape_in_a_delimiter_is_one_line_naming_where_it_came_from(written: str, bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_delimiter(written, "GLIMP_DELIMITER")
    message = str(err.value)
    assert message.startswith("GLIMP_DELIMITER: ") and bad in message and "\n" not in message, message
