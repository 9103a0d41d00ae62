"""Shared fixtures: the scripted fake pair, and the real default pair loaded once per session."""

from __future__ import annotations

import math

import pytest

from glimp_cli.backends.fake import FakeBackend, ScriptedStep
from glimp_cli.config import PromptFormat
from glimp_cli.entropy import parse_estimator
from glimp_cli.policies import Policy
from glimp_cli.router import ModelSlot, RouteSettings, Router

FAKE_PROMPT = PromptFormat(style="plain", template="Q: {question}\nA:\n", answer_marker="The answer is")


def fake_router(script: list[ScriptedStep], policy: Policy, *, prompt: PromptFormat = FAKE_PROMPT,
                n_ctx: int = 4096, stop: tuple[str, ...] = (), **settings) -> Router:
    """A Router over two scripted fakes that share `script`."""
    small = FakeBackend("fake-small", "small", script, n_ctx=n_ctx)
    large = FakeBackend("fake-large", "large", script, n_ctx=n_ctx)
    settings.setdefault("estimator", parse_estimator("exact"))
    return Router(ModelSlot("small", small, prompt, stop), ModelSlot("large", large, prompt, stop),
                  policy, RouteSettings(**settings))


@pytest.fixture
def step():
    return ScriptedStep


LN = math.log
