"""The calibration questions: the shipped set, and the check that they are held out from evaluation."""

from __future__ import annotations

import unicodedata
from importlib import resources
from pathlib import Path
from typing import Iterable

from glimp_cli.errors import UsageError

CALIBRATION_SET = "data/calibration.jsonl"


def calibration_set() -> Path:
    """The shipped calibration questions: the last 100 GSM8K test problems (see data/SOURCES.md)."""
    return Path(str(resources.files("glimp_cli").joinpath(CALIBRATION_SET)))


def normalize_question(text: str) -> str:
    """Question text compared case-, width- and whitespace-blind."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def count_overlap(calibration: Iterable[str], evaluation: Iterable[str]) -> int:
    """How many calibration questions also appear in the evaluation questions."""
    held_out = {normalize_question(q) for q in evaluation}
    return sum(normalize_question(q) in held_out for q in calibration)


def check_held_out(calibration: list[str], eval_path: str | Path, allow: bool) -> str | None:
    """Refuse calibration questions that the evaluation file also holds (unless `allow`); a note if allowed."""
    from glimp_cli.questions import load_questions

    evaluation, _ = load_questions(eval_path)
    overlap = count_overlap(calibration, (q.question for q in evaluation))
    if not overlap:
        return None
    what = f"{overlap} of {len(calibration)} calibration questions also appear in {eval_path}"
    if not allow:
        raise UsageError(f"{what}: calibrate on held-out questions, or pass --allow-overlap")
    return f"{what} (allowed by --allow-overlap: the tau is not held out for them)"
