"""Tests for glimp_cli.grading, using reference answers copied from the real benchmark files."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import pytest

from glimp_cli import grading
from glimp_cli.grading import extract_answer, grade, reference_answer

SAMPLES = [
    json.loads(line)
    for line in (Path(__file__).parent / "data" / "grading_samples.jsonl").read_text().splitlines()
    if line.strip()
]


def _sample(source: str) -> dict:
    return next(s for s in SAMPLES if s["source"] == source)


def test_samples_cover_all_three_files() -> None:
    prefixes = [s["source"].split("/")[0] for s in SAMPLES]
    assert prefixes.count("gsm8k") >= 8
    assert prefixes.count("aime24") >= 5
    assert prefixes.count("aime25") >= 5


@pytest.mark.parametrize("sample", SAMPLES, ids=[s["source"] for s in SAMPLES])
def test_reference_answer_normalises_real_rows(sample: dict) -> None:
    assert reference_answer(sample["reference"]) == sample["expected"]


@pytest.mark.parametrize("sample", SAMPLES, ids=[s["source"] for s in SAMPLES])
def test_real_reference_grades_its_own_boxed_raw_form(sample: dict) -> None:
    # The raw final answer (with commas or zero padding) must match the normalised reference.
    raw = str(sample["reference"]).rsplit("####", 1)[-1].strip()
    ref = reference_answer(sample["reference"])
    assert grade(extract_answer(f"Thus \\boxed{{{raw}}}."), ref) is True


@pytest.mark.parametrize("value", [None, "", "   ", "#### "])
def test_reference_answer_empty_is_none(value: str | None) -> None:
    assert reference_answer(value) is None


@pytest.mark.parametrize(
    ("output", "source"),
    [
        ("So the total is 1,000 + 450,000 = 1,450,000.\nThe answer is 1,450,000.", "gsm8k/test.jsonl line 612"),
        ("She makes 9 * 2 = 18 dollars.\nSo she makes $18.00 per day.", "gsm8k/test.jsonl line 1"),
        ("9 eggs at $2 each.\n#### 18", "gsm8k/test.jsonl line 1"),
        ("Answer: 2,125 blocks", "gsm8k/test.jsonl line 147"),
        ("The final answer is $-10$. I hope it is correct.", "gsm8k/test.jsonl line 490"),
        ("Hence m+n = \\boxed{033}", "aime24/test.jsonl line 25"),
        ("Hence m+n = \\boxed{33}", "aime24/test.jsonl line 25"),
        ("so the answer is \\(\\boxed{25}\\).", "aime24/test.jsonl line 8"),
        ("\\fbox{073}", "aime24/test.jsonl line 16"),
        ("We get $\\boxed 70$.", "aime25/test.jsonl line 1"),
        ("The number of ways is $\\boxed{\\text{735}}$.", "aime25/test.jsonl line 15"),
        ("Adding these, there are 240 in total.", "aime25/test.jsonl line 30"),
    ],
)
def test_model_outputs_with_right_answer_are_correct(output: str, source: str) -> None:
    sample = _sample(source)
    assert grade(extract_answer(output), reference_answer(sample["reference"])) is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{\\frac{1}{2}} then later \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
        ("The answer is 5. Wait, \\boxed{6}", "6"),
        ("The answer is 5. Actually the answer is 7.", "7"),
        ("Final Answer: The final answer is $12$. I hope it is correct.", "12"),
        ("**Answer:** 42", "42"),
        ("The answer is 1.5 hours.", "1.5 hours"),
        ("#### 1,000\n", "1,000"),
        ("I think it is 3 or maybe 4.", "4"),
        ("The ratio is 3/4.", "3/4"),
        ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ],
)
def test_extract_answer_priorities(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "I do not know.", "\\boxed{}"])
def test_extract_answer_none_when_nothing_found(text: str) -> None:
    assert extract_answer(text) is None


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("3/4", "0.75"),
        ("\\frac{3}{4}", "0.75"),
        ("\\dfrac{3}{4}", "3/4"),
        ("-\\frac{1}{2}", "-0.5"),
        ("18%", "18"),
        ("$1,000", "1000"),
        ("1\\,000", "1000"),
        ("7.0", "7"),
        ("x = 5", "5"),
        ("18 \\text{ dollars}", "18"),
    ],
)
def test_numeric_equivalents_are_correct(predicted: str, reference: str) -> None:
    assert grade(predicted, reference) is True


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("180", "18"),
        ("1.8", "18"),
        ("333", "33"),
        ("2", "1/2"),
        ("5", "-5"),
        ("7", "70"),
        ("7.0", "70"),
        ("100", "1,000"),
        ("1,000", "100"),
        ("0.18", "18%"),
        ("2 pi", "2"),
        ("0.05", "0.5"),
        ("0.333", "1/3"),
    ],
)
def test_near_misses_are_wrong(predicted: str, reference: str) -> None:
    assert grade(predicted, reference) is False


def test_near_misses_against_real_references() -> None:
    gsm = reference_answer(_sample("gsm8k/test.jsonl line 1")["reference"])
    aime = reference_answer(_sample("aime24/test.jsonl line 25")["reference"])
    assert grade(extract_answer("The answer is 180."), gsm) is False
    assert grade(extract_answer("\\boxed{333}"), aime) is False


def test_missing_reference_gives_none() -> None:
    assert grade("18", None) is None
    assert grade(None, None) is None


def test_missing_prediction_is_wrong() -> None:
    assert grade(None, "18") is False
    assert grade(extract_answer("no digits here"), "18") is False


def test_symbolic_equivalence_with_math_verify() -> None:
    pytest.importorskip("math_verify")
    assert grade("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2") is True
    assert grade("(x+1)^2", "x^2+2x+1") is True
    assert grade("\\frac{\\sqrt{3}}{2}", "\\sqrt{2}/2") is False


def test_symbolic_equivalence_off_the_main_thread() -> None:
    pytest.importorskip("math_verify")
    results: list[bool | None] = []
    worker = threading.Thread(target=lambda: results.append(grade("\\frac{\\pi}{2}", "\\pi/2")))
    worker.start()
    worker.join()
    assert results == [True]


def _missing_math_verify() -> None:
    raise ImportError("simulated absence of math_verify")


def test_fallback_warns_once_and_compares_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grading, "_load_math_verify", _missing_math_verify)
    monkeypatch.setattr(grading, "_math_verify_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = grade("\\dfrac{\\sqrt{2}}{2}", "\\frac{\\sqrt{2}}{2}")
        second = grade("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")
        third = grade("x^2 + 1", "x^2+1")
        fourth = grade("1+x^2", "x^2+1")
    assert (first, second, third, fourth) == (True, False, True, False)
    relevant = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(relevant) == 1
    assert 'pip install "glimp[grading]"' in str(relevant[0].message)


def test_fallback_numeric_grading_needs_no_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grading, "_load_math_verify", _missing_math_verify)
    monkeypatch.setattr(grading, "_math_verify_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert grade("$18.00", "18") is True
        assert grade("180", "18") is False
    assert caught == []


def test_answer_phrase_with_a_worked_equation_takes_the_result():
    assert extract_answer("The answer is 60 / 3 = 18.") == "18"
    assert grade(extract_answer("The answer is 24 / 2 = 12."), "12") is True
    assert grade(extract_answer("The answer is 60 / 3 = 18."), "20") is False
