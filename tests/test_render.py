"""The live view on the scripted fake: what each step's header says."""

from __future__ import annotations

import io

from rich.console import Console

from conftest import FIVE_STEPS, fake_router
from glimp_cli.backends.fake import ScriptedStep as S
from glimp_cli.policies import always_large, threshold
from glimp_cli.render import LiveView


def render(router) -> str:
    out = io.StringIO()
    view = LiveView(Console(file=out, width=120, color_system=None), probing=router.policy.needs_probe)
    for step in router.run("q?", view):
        view.step_finished(step)
    return out.getvalue()


def test_each_probed_step_shows_its_h_init():
    text = render(fake_router(FIVE_STEPS, threshold(1.0)))
    assert "step 1 · small · H_init 0.50 nats" in text and "step 2 · large · H_init 2.00 nats" in text


def test_a_step_without_a_probe_says_why():
    # The small model reaches the marker: the large model's answer steps are handed over, not probed.
    script = [S(0.1, "so 4. The answer is 4.", "X"), S(0.1, "zzz", "Let me check."), S(0.1, "zzz", "The answer is 4.")]
    text = render(fake_router(script, threshold(1.0)))
    assert "step 2 · large · answer handed to large" in text
    assert "step 3 · large · answer handed to large" in text
    assert "H_init -" not in text
    text = render(fake_router(FIVE_STEPS, always_large()))
    assert text.count("no probe (large alone)") == 5


def test_a_forced_answer_says_why_it_was_forced():
    from glimp_cli.policies import always_small

    loop = [S(0.1, "a = 1", "A = 1"), S(0.1, "a = 1", "A = 1"), S(0.1, "The answer is 1.", "The answer is 2.")]
    text = render(fake_router(loop, threshold(1.0)))
    assert "step 3 · large · answer handed to large" in text and "(forced: the trace had ended on repetition)" in text
    text = render(fake_router(loop, always_small()))
    assert "step 3 · small · answer, no probe" in text and "The answer is 1." in text
