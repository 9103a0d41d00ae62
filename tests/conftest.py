"""Shared fixtures: the scripted fake pair, and the real tiny pair loaded once per session."""

from __future__ import annotations

import math
import os
import threading

import pytest

from glimp_cli.backends.fake import FakeBackend, ScriptedStep
from glimp_cli.config import PromptFormat
from glimp_cli.entropy import parse_estimator
from glimp_cli.policies import Policy
from glimp_cli.router import RouteSettings, Router
from glimp_cli.sides import ModelSlot

FAKE_PROMPT = PromptFormat(style="plain", template="Q: {question}\nA:\n", answer_marker="The answer is")


# One scripted 5-step trace for tests where the script's details are not the point.
FIVE_STEPS = [
    ScriptedStep(0.5, "small one", "LARGE ONE"),
    ScriptedStep(2.0, "small two", "LARGE TWO"),
    ScriptedStep(0.3, "small three", "LARGE THREE"),
    ScriptedStep(1.5, "small four", "LARGE FOUR"),
    ScriptedStep(0.1, "The answer is 4.", "The answer is 42."),
]


def fake_router(script: list[ScriptedStep], policy: Policy, *, prompt: PromptFormat = FAKE_PROMPT,
                n_ctx: int = 4096, stop: tuple[str, ...] = (), large_prompt: PromptFormat | None = None,
                **settings) -> Router:
    """A Router over two scripted fakes that share `script`."""
    delimiter = settings.get("delimiter", "\n\n")
    small = FakeBackend("fake-small", "small", script, n_ctx=n_ctx, delimiter=delimiter)
    large = FakeBackend("fake-large", "large", script, n_ctx=n_ctx, delimiter=delimiter)
    settings.setdefault("estimator", parse_estimator("exact"))
    return Router(ModelSlot("small", small, prompt, stop), ModelSlot("large", large, large_prompt or prompt, stop),
                  policy, RouteSettings(**settings))


class GatedFake(FakeBackend):
    """A fake whose every write waits for `gate`: its worker stays busy until the test opens it."""

    def __init__(self, *args, gate: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate

    def write(self, *args, **kwargs):
        assert self.gate.wait(60), "the gate was never opened"
        return super().write(*args, **kwargs)


def default_sigint() -> None:
    """Give a child process the default Ctrl-C handling (a `preexec_fn`).

    A shell starts background jobs with SIGINT ignored, and a Python process that starts so never
    raises KeyboardInterrupt: a test that presses Ctrl-C must not depend on how pytest was started.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def isolated(monkeypatch, tmp_path) -> None:
    """No GLIMP_* setting or user models.yaml of the machine leaks in."""
    for key in list(os.environ):
        if key.startswith("GLIMP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model fails the test: a refused value, or calibrating from traces, must never need one."""
    from glimp_cli.engine import Engine

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, *a, **k: pytest.fail("a model was loaded")))


@pytest.fixture
def step():
    return ScriptedStep


LN = math.log


@pytest.fixture(scope="session")
def real_engine():
    """The packaged tiny pair (SmolLM2-135M + Gemma 3 270M, fast), loaded once for the whole session."""
    from glimp_cli.config import load_registry
    from glimp_cli.engine import Engine

    registry = load_registry()
    pair = registry.pair("tiny")
    engine = Engine.load(registry, pair, {"small", "large"})
    yield engine
    engine.close()


GSM8K_QUESTIONS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
    "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
    "per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "James decides to run 3 sprints 3 times a week. He runs 60 meters each sprint. "
    "How many total meters does he run a week?",
    "Raymond and Samantha are cousins. Raymond was born 6 years before Samantha. Raymond had a son at the "
    "age of 23. If Samantha is now 31, how many years ago was Raymond's son born?",
    "Billy sells DVDs. He has 8 customers on Tuesday. His first 3 customers buy one DVD each. His next 2 "
    "customers buy 2 DVDs each. His last 3 customers don't buy any DVDs. How many DVDs did Billy sell on Tuesday?",
]


@pytest.fixture
def serve_options(monkeypatch, isolated):
    """`options(args)`: the ServeOptions `glimp serve ARGS` would start the server with (nothing is started)."""
    from typer.testing import CliRunner

    import glimp_cli.serve
    from glimp_cli.cli import app

    asked = []
    monkeypatch.setattr(glimp_cli.serve, "serve", lambda options: asked.append(options) or "stopped")

    def options(args: list[str]):
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == 0, result.output
        return asked[-1]

    return options


@pytest.fixture
def served_state(monkeypatch):
    """`state(options)`: run the real server start-up on fake models (nothing listens) and return its ServerState."""
    import glimp_cli.serve.server as server
    from glimp_cli.engine import Engine

    built = []
    monkeypatch.setattr(Engine, "load", classmethod(
        lambda cls, registry, pair, roles: Engine(registry, pair, {"small": FakeBackend("s", "small", FIVE_STEPS),
                                                                   "large": FakeBackend("l", "large", FIVE_STEPS)})))
    monkeypatch.setattr(server, "build_app", lambda state: built.append(state) or (lambda *a: None))
    monkeypatch.setattr(server._Server, "run", lambda self, sockets=None: None)

    def state(options):
        assert server.run(options) == "stopped"
        return built[-1]

    return state
