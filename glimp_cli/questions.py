"""Question files: JSON Lines, one problem a line, with the field names of the common benchmarks."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from glimp_cli.errors import InputError, UsageError
from glimp_cli.grading import reference_answer

# Looked up in this order when no question field is named: GSM8K says `question`, AIME `problem`.
QUESTION_FIELDS = ("question", "problem")
ANSWER_FIELD = "answer"
ID_FIELD = "id"


@dataclass(frozen=True)
class Question:
    """One problem: its id, text, normalised reference answer (None if ungraded) and file line."""

    id: str
    question: str
    reference: str | None
    line: int


@dataclass(frozen=True)
class Skipped:
    """A line that holds no usable question, and why (one line)."""

    line: int
    reason: str


def load_questions(path: str | Path, question_field: str | None = None, answer_field: str | None = None,
                   id_field: str | None = None, limit: int | None = None, offset: int = 0,
                   shuffle: bool = False, seed: int = 0) -> tuple[list[Question], list[Skipped]]:
    """Read a JSON Lines question file; bad lines are returned as `Skipped`, blank lines ignored.

    The id is the `id` field (int or string) or, when a line has none, its 1-based line number;
    an explicitly named `id_field` must be present. `shuffle` (seeded), then `offset` and `limit`
    select the questions; `Skipped` always covers the whole file.
    """
    if offset < 0 or (limit is not None and limit < 0):
        raise UsageError("offset and limit must not be negative")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read questions file {path}: {exc.strerror or exc}") from None
    questions: list[Question] = []
    skipped: list[Skipped] = []
    first_line: dict[str, int] = {}
    # Split on b"\n" only: str.splitlines would also break inside text at U+2028 and friends.
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        parsed = _parse_line(raw, number, question_field, answer_field, id_field)
        if isinstance(parsed, Skipped):
            skipped.append(parsed)
            continue
        if parsed.id in first_line:
            raise InputError(f"{path}: id {parsed.id!r} appears on line {first_line[parsed.id]} and line {number}")
        first_line[parsed.id] = number
        questions.append(parsed)
    if shuffle:
        random.Random(seed).shuffle(questions)
    end = None if limit is None else offset + limit
    return questions[offset:end], skipped


def question_source(path: str | Path, limit: int | None = None, offset: int = 0, shuffle: bool = False,
                    seed: int = 0) -> dict:
    """Which questions a run took: the file (absolute path, sha256 of its bytes) and the selection."""
    path = Path(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise InputError(f"cannot read questions file {path}: {exc.strerror or exc}") from None
    return {"path": str(path.resolve()), "sha256": digest, "offset": offset, "limit": limit,
            "shuffle_seed": seed if shuffle else None}


def _parse_line(raw: bytes, number: int, question_field: str | None, answer_field: str | None,
                id_field: str | None) -> Question | Skipped:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Skipped(number, f"not valid UTF-8 (byte {exc.start + 1})")
    if number == 1:
        text = text.removeprefix("\ufeff")  # editors on Windows start files with a byte-order mark
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return Skipped(number, f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(row, dict):
        return Skipped(number, f"expected a JSON object, got {type(row).__name__}")
    return question_from_row(row, number, question_field, answer_field, id_field)


def question_from_row(row: dict, number: int, question_field: str | None = None, answer_field: str | None = None,
                      id_field: str | None = None) -> Question | Skipped:
    """The question a row of a question file holds (`number` is its line, the id when it names none)."""
    fields = (question_field,) if question_field else QUESTION_FIELDS
    name = next((f for f in fields if f in row), None)
    if name is None:
        return Skipped(number, f"no {' or '.join(repr(f) for f in fields)} field")
    question = row[name]
    if not isinstance(question, str):
        return Skipped(number, f"field {name!r} is {type(question).__name__}, not a string")
    if not question.strip():
        return Skipped(number, f"field {name!r} is empty")

    answer = row.get(answer_field or ANSWER_FIELD)
    # bool is an int subclass, but `true` is no answer to a math problem.
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        return Skipped(number, f"field {answer_field or ANSWER_FIELD!r} is {type(answer).__name__}, "
                               "not a string or number")
    reference = reference_answer(str(answer) if isinstance(answer, float) else answer)

    key = id_field or ID_FIELD
    if key not in row:
        if id_field:
            return Skipped(number, f"no {id_field!r} field")
        return Question(str(number), question, reference, number)
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        return Skipped(number, f"field {key!r} must be a non-empty string or an integer")
    return Question(str(value), question, reference, number)
