"""Answer extraction and grading for math benchmarks (GSM8K, AIME)."""

from __future__ import annotations

import re
import threading
import warnings
from fractions import Fraction
from types import ModuleType

_MATH_VERIFY_HINT = (
    "math-verify is not installed; non-numeric answers are graded by string comparison. "
    'Install it with: pip install "glimp[grading]"'
)

_MATH_VERIFY_TIMEOUT = 5
# Set after the first missing-math-verify warning so long runs warn only once.
_math_verify_warned = False

_BOX_CMD = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\s*:?|:)", re.IGNORECASE)
_GSM8K_MARK = re.compile(r"####[ \t]*([^\n]*)")
_LAST_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")

_NUM = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_NUMERIC = re.compile(
    rf"(?P<sign>[-+]?)\s*"
    rf"(?:\\[dt]?frac\{{(?P<fnum>-?{_NUM})\}}\{{(?P<fden>-?{_NUM})\}}"
    rf"|(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?)"
    rf"\s*(?P<unit>%|[A-Za-z]{{2,}}(?:[\s./]+[A-Za-z]+)*)?"
)
# Bare words that make "2 pi" or "3 sqrt" an expression, not a number with a unit.
_MATH_WORDS = frozenset({"pi", "sqrt", "inf", "infty"})
_VAR_ASSIGN = re.compile(r"^[A-Za-z]\w*\s*=\s*")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_LATEX_THOUSANDS = re.compile(r"(?<=\d)(?:\\,|\{,\})(?=\d{3})")
_LATEX_NOISE = re.compile(r"\\[!,;: ]|\\left|\\right|\^\{?\\circ\}?|\\%|\\\$")


def extract_answer(text: str) -> str | None:
    """Return the final answer stated in a model's output, or None if none is found."""
    for strategy in (_last_boxed, _last_answer_phrase, _last_gsm8k_mark, _last_number):
        answer = strategy(text)
        if answer:
            return answer
    return None


def reference_answer(value: str | int | None) -> str | None:
    """Normalise a dataset reference (GSM8K solution, AIME int or zero-padded string)."""
    if value is None:
        return None
    if isinstance(value, int):
        return str(value)
    text = value
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = _clean(text)
    if not text:
        return None
    # Integers are stored without separators or zero padding so "1,000" and "033" compare as text too.
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)", text):
        return str(int(text.replace(",", "")))
    return text


def grade(predicted: str | None, reference: str | None) -> bool | None:
    """Grade a predicted answer against a reference; None if there is no reference."""
    if reference is None:
        return None
    if predicted is None:
        return False
    pred_num, ref_num = _to_fraction(predicted), _to_fraction(reference)
    if pred_num is not None and ref_num is not None:
        # Exact comparison decides numeric answers; a lenient symbolic check could pass near misses.
        return pred_num == ref_num
    if _canonical_text(predicted) == _canonical_text(reference):
        return True
    return bool(_symbolic_equal(predicted, reference))


def _load_math_verify() -> ModuleType:
    """Import math_verify on demand; it is an optional extra and slow to import."""
    import math_verify

    return math_verify


def _symbolic_equal(predicted: str, reference: str) -> bool | None:
    """Compare with math_verify; None when it is unavailable."""
    global _math_verify_warned
    try:
        math_verify = _load_math_verify()
    except ImportError:
        if not _math_verify_warned:
            warnings.warn(_MATH_VERIFY_HINT, UserWarning, stacklevel=3)
            _math_verify_warned = True
        return None
    # math_verify times out with signal.alarm, which only works in the main thread.
    timeout = _MATH_VERIFY_TIMEOUT if threading.current_thread() is threading.main_thread() else None
    gold = math_verify.parse(f"${_clean(reference)}$", parsing_timeout=timeout)
    target = math_verify.parse(f"${_clean(predicted)}$", parsing_timeout=timeout)
    return math_verify.verify(gold, target, timeout_seconds=timeout)


def _clean(answer: str) -> str:
    """Strip the wrapping that surrounds an answer: spaces, $, markdown bold, trailing periods."""
    previous = None
    while previous != answer:
        previous = answer
        answer = answer.strip().strip("$*").rstrip(".")
        for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
            if answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left) : -len(right)]
    return answer


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOX_CMD.finditer(text))):
        answer = _clean(_box_content(text, match.end()) or "")
        if answer:
            return answer
    return None


def _box_content(text: str, start: int) -> str | None:
    """Content of \\boxed{...} (nested braces) or of \\boxed 5, starting after the command."""
    rest = text[start:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        begin = start + len(rest) - len(stripped) + 1
        depth = 1
        i = begin
        while i < len(text):
            char = text[i]
            if char == "\\":
                i += 2  # escaped braces such as \{ do not nest
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[begin:i]
            i += 1
        return None
    if stripped != rest:
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else None
    return None  # e.g. \boxedfoo: another command, not a box


def _last_answer_phrase(text: str) -> str | None:
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].lstrip()
    line = rest.split("\n", 1)[0]
    # A period followed by whitespace ends the sentence; one inside 1.5 does not.
    sentence = re.split(r"\.\s", line, maxsplit=1)[0]
    # "The answer is 60 / 3 = 18": the result is what follows the last equals sign.
    if "=" in sentence and not re.match(r"^\s*[A-Za-z]\w*\s*=", sentence):
        sentence = sentence.rsplit("=", 1)[1]
    return _clean(sentence) or None


def _last_gsm8k_mark(text: str) -> str | None:
    matches = _GSM8K_MARK.findall(text)
    if not matches:
        return None
    return _clean(matches[-1]) or None


def _last_number(text: str) -> str | None:
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _strip_latex(answer: str) -> str:
    answer = answer.replace("\u2212", "-")
    # LaTeX thousands separators: 1\,000 and 1{,}000.
    answer = _LATEX_THOUSANDS.sub(",", answer)
    answer = _TEXT_CMD.sub(r" \1", answer)
    answer = _LATEX_NOISE.sub(" ", answer)
    return _clean(answer.replace("$", ""))


def _to_fraction(answer: str) -> Fraction | None:
    """Exact value of a plain numeric answer (units and % ignored), else None."""
    answer = _VAR_ASSIGN.sub("", _strip_latex(answer))
    match = _NUMERIC.fullmatch(answer)
    if match is None:
        return None
    unit = match["unit"]
    if unit and unit.split()[0].lower() in _MATH_WORDS:
        return None
    if match["fnum"] is not None:
        numerator, denominator = match["fnum"], match["fden"]
    else:
        numerator, denominator = match["num"], match["den"] or "1"
    den = Fraction(denominator.replace(",", ""))
    if den == 0:
        return None
    value = Fraction(numerator.replace(",", "")) / den
    return -value if match["sign"] == "-" else value


def _canonical_text(answer: str) -> str:
    """Whitespace- and markup-insensitive form for the string fallback."""
    answer = re.sub(r"\\[dt]frac", r"\\frac", _strip_latex(answer))
    return re.sub(r"\s+", "", answer)
