"""The Python face (glimp_cli.api): load a pair, route, batch, close; docs/python.md's example as written."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIVE_STEPS
from glimp_cli.backends.fake import FakeBackend

DOCS = Path(__file__).resolve().parent.parent / "docs" / "python.md"

FAKE_CONFIG = """
default_pair: fake
prompts:
  fake-plain: {style: plain, template: "Q: {question}\\nA:\\n", answer_marker: "The answer is"}
models:
  fake-small: {source: {path: nowhere-small.gguf}, prompt: fake-plain}
  fake-large: {source: {path: nowhere-large.gguf}, prompt: fake-plain}
pairs:
  fake: {small: fake-small, large: fake-large, tau: 1.0}
"""


@pytest.fixture
def fake_pair(tmp_path, monkeypatch, isolated):
    """A models.yaml whose pair loads two scripted fakes (FIVE_STEPS) through the real Engine seam."""
    from glimp_cli.engine import Engine

    loaded = []

    def load(cls, registry, pair, roles):
        backends = {role: FakeBackend(f"fake-{role}", role, FIVE_STEPS, delimiter=pair.delimiter)
                    for role in sorted(roles)}
        loaded.append(backends)
        return cls(registry, pair, backends)

    monkeypatch.setattr(Engine, "load", classmethod(load))
    config = tmp_path / "models.yaml"
    config.write_text(FAKE_CONFIG)
    for name in ("nowhere-small.gguf", "nowhere-large.gguf"):  # a batch record names each model's file
        (tmp_path / name).write_bytes(b"GGUF" + bytes(16))
    return config, loaded


def python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert len(blocks) == 1, "docs/python.md should hold one python example"
    return blocks[0]


def test_route_yields_the_routers_steps(fake_pair):
    from glimp_cli import Step, load_pair

    config, loaded = fake_pair
    with load_pair(config=config) as pair:
        trace = pair.route("What is 6 * 7?")
        steps = list(trace)
    assert all(isinstance(step, Step) for step in steps)
    # tau 1.0: the scripted H_init 0.5, 2.0, 0.3, 1.5 go small, large, small, large; the large model answers.
    assert [step.model for step in steps] == ["small", "large", "small", "large", "large"]
    assert [step.text for step in steps][:2] == ["small one", "LARGE TWO"]
    assert trace.answer_text == "The answer is 42." and trace.stop_reason is not None
    assert all(backend.closed for backend in loaded[0].values())


def test_settings_override_the_pair_and_a_mode_loads_only_its_models(fake_pair):
    from glimp_cli import load_pair

    config, loaded = fake_pair
    with load_pair("fake", config=config, mode="large", delimiter="\n\n") as pair:
        assert pair.spec.mode == "large" and pair.spec.tau == 1.0
        assert {step.model for step in pair.route("What is 6 * 7?")} == {"large"}
    assert set(loaded[0]) == {"large"}


def test_batch_yields_the_records_glimp_batch_writes(fake_pair):
    from glimp_cli import Question, load_pair
    from glimp_cli.report import summarize

    config, _ = fake_pair
    questions = ["What is 6 * 7?", {"id": "q2", "question": "And 2 + 2?", "answer": "4"},
                 Question("q3", "And 40 + 2?", "42", 3)]
    with load_pair(config=config) as pair:
        records = list(pair.batch(questions))
    assert [r["id"] for r in records] == ["1", "q2", "q3"]
    assert [r["correct"] for r in records] == [None, False, True]
    assert {r["mode"] for r in records} == {"glimp"} and records[0]["settings"]["pair"] == "fake"
    assert records[0]["model_steps"] == {"small": 2, "large": 3}
    assert summarize(records)  # what glimp report reads


def test_a_closed_pair_refuses_to_route(fake_pair):
    from glimp_cli import load_pair
    from glimp_cli.errors import UsageError

    config, _ = fake_pair
    pair = load_pair(config=config)
    pair.close()
    with pytest.raises(UsageError, match="closed"):
        pair.route("What is 6 * 7?")


def test_unknown_or_bad_settings_are_refused_before_loading(no_models, isolated):
    from glimp_cli import load_pair
    from glimp_cli.errors import ConfigError, UsageError

    with pytest.raises(UsageError, match="no setting named 'taux'"):
        load_pair("tiny", taux=1.0)
    with pytest.raises(ConfigError, match="top_p"):
        load_pair("tiny", top_p=0)
    with pytest.raises(ConfigError, match="no pair named 'nope'"):
        load_pair("nope")
    # A value of the wrong type is refused as models.yaml would refuse it, naming the key.
    for key, value, words in [("tau", "1", "expected a number, got '1'"), ("max_tokens", 2.5, "expected an integer"),
                              ("delimiter", 3, "expected a string"), ("temperature", True, "expected a number")]:
        with pytest.raises(ConfigError, match=f"load_pair: {key}: {words}"):
            load_pair("tiny", **{key: value})


def test_import_glimp_cli_loads_no_engine():
    code = ("import sys, glimp_cli\n"
            "assert 'numpy' not in sys.modules and 'glimp_cli.api' not in sys.modules, 'heavy import'\n"
            "assert callable(glimp_cli.load_pair)\n"
            "assert 'llama_cpp' not in sys.modules, 'llama_cpp on import'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.real
def test_the_python_docs_example_runs_as_written(isolated):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_example(), str(DOCS), "exec"), {"__name__": "__docs__"})
    printed = out.getvalue()
    assert "step 0 · " in printed and "answer:" in printed, printed
    for qid in ("robe", "sum"):  # one graded line per batch record: id, extracted answer, correct, seconds
        assert re.search(rf"^{qid} .* (True|False|None) [0-9.]+ s$", printed, re.MULTILINE), printed
