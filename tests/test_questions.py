"""Tests for glimp_cli.questions on hand-made files and on the three benchmark files shipped in data/."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from glimp_cli.errors import InputError, UsageError
from glimp_cli.questions import Question, Skipped, load_questions, question_source

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def write(tmp_path: Path, *lines: str | bytes) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


def test_good_lines_load_with_defaults_and_normalised_references(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '\ufeff{"question": "What is 1+1?", "answer": "1 + 1 = 2\\n#### 2"}',
        '{"problem": "Find x.", "answer": "033", "id": 60}',
        "",
        '{"question": "No answer here", "id": "q-7"}',
        '{"problem": "Int answer", "answer": 70}',
    )
    questions, skipped = load_questions(path)
    assert skipped == []
    assert questions == [
        Question("1", "What is 1+1?", "2", 1),
        Question("60", "Find x.", "33", 2),
        Question("q-7", "No answer here", None, 4),
        Question("5", "Int answer", "70", 5),
    ]


@pytest.mark.parametrize("line, reason", [
    (b'{"question": "ok", ', "invalid JSON"),
    (b'["question", "a list"]', "expected a JSON object, got list"),
    (b'{"answer": "3"}', "no 'question' or 'problem' field"),
    (b'{"question": "   "}', "field 'question' is empty"),
    (b'{"question": 12}', "field 'question' is int, not a string"),
    (b'{"question": "caf\xe9?"}', "not valid UTF-8 (byte 18)"),
    (b'{"question": "q", "answer": [1]}', "field 'answer' is list"),
    (b'{"question": "q", "id": null}', "field 'id' must be a non-empty string or an integer"),
])
def test_every_bad_line_kind_is_skipped_with_its_line_number(tmp_path: Path, line: bytes, reason: str) -> None:
    path = write(tmp_path, '{"question": "first"}', line, '{"question": "third"}')
    questions, skipped = load_questions(path)
    assert [q.question for q in questions] == ["first", "third"]
    assert [q.line for q in questions] == [1, 3]
    assert len(skipped) == 1 and isinstance(skipped[0], Skipped)
    assert skipped[0].line == 2
    assert reason in skipped[0].reason and "\n" not in skipped[0].reason


def test_field_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '{"q": "Find y.", "sol": "#### 1,000", "key": "a", "question": "ignored"}',
        '{"q": "No key here", "sol": "5"}',
    )
    questions, skipped = load_questions(path, question_field="q", answer_field="sol", id_field="key")
    assert questions == [Question("a", "Find y.", "1000", 1)]
    # A named id field must be there: falling back to line numbers could collide with real ids.
    assert skipped == [Skipped(2, "no 'key' field")]


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, '{"question": "a", "id": 3}', '{"question": "b"}', '{"question": "c", "id": "3"}')
    with pytest.raises(InputError, match=r"'3'.*line 1 and line 3"):
        load_questions(path)
    # An id equal to another line's number collides too.
    path = write(tmp_path, '{"question": "a"}', '{"question": "b", "id": 1}')
    with pytest.raises(InputError, match="line 1 and line 2"):
        load_questions(path)


def test_missing_or_unreadable_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.jsonl"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match=str(tmp_path)):
        load_questions(tmp_path)


def test_shuffle_then_offset_and_limit(tmp_path: Path) -> None:
    path = write(tmp_path, *(json.dumps({"question": f"q{i}"}) for i in range(20)))
    plain, _ = load_questions(path, offset=5, limit=3)
    assert [q.id for q in plain] == ["6", "7", "8"]
    shuffled, _ = load_questions(path, shuffle=True, seed=1)
    assert sorted(q.id for q in shuffled) == sorted(q.id for q in load_questions(path)[0])
    assert [q.id for q in shuffled] != [str(i) for i in range(1, 21)]
    again, _ = load_questions(path, shuffle=True, seed=1, offset=5, limit=3)
    assert again == shuffled[5:8]
    assert load_questions(path, shuffle=True, seed=2)[0] != shuffled
    with pytest.raises(UsageError):
        load_questions(path, offset=-1)


def test_question_source_names_the_file_by_path_and_content_and_the_selection(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, '{"question": "a"}', '{"question": "b"}')
    monkeypatch.chdir(tmp_path)
    source = question_source("q.jsonl", limit=1, offset=1, shuffle=True, seed=7)
    assert source == {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                      "offset": 1, "limit": 1, "shuffle_seed": 7}
    assert question_source(path)["shuffle_seed"] is None and question_source(path)["limit"] is None
    path.write_text('{"question": "a"}\n{"question": "b!"}\n')
    assert question_source(path)["sha256"] != source["sha256"]
    with pytest.raises(InputError, match="nope.jsonl"):
        question_source(tmp_path / "nope.jsonl")


def test_gsm8k_loads_as_it_is() -> None:
    questions, skipped = load_questions(DATA / "gsm8k" / "test-1-1219.jsonl")
    assert skipped == [] and len(questions) == 1219
    assert questions[0].id == "1" and questions[0].question.startswith("Janet")
    assert questions[0].reference == "18"
    assert questions[2].reference == "70000"
    assert all(q.reference for q in questions)


def test_aime24_loads_as_it_is() -> None:
    questions, skipped = load_questions(DATA / "aime24" / "test.jsonl")
    assert skipped == [] and len(questions) == 30
    assert [q.id for q in questions[:2]] == ["60", "61"]
    assert questions[0].question.startswith("Every morning Aya")
    # Zero-padded string answers lose their padding: "025" -> "25".
    assert [q.reference for q in questions[6:9]] == ["721", "25", "809"]


def test_aime25_loads_as_it_is() -> None:
    questions, skipped = load_questions(DATA / "aime25" / "test.jsonl")
    assert skipped == [] and len(questions) == 30
    assert [q.id for q in questions] == [str(i) for i in range(30)]
    assert questions[0].reference == "70" and questions[0].question.startswith("Find the sum")


def sources_table(sources: Path) -> dict[str, tuple[int, str]]:
    """{file: (rows, sha256)} from the table of a SOURCES.md."""
    lines = [l for l in sources.read_text(encoding="utf-8").splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]
    return {r["file"]: (int(r["rows"]), r["sha256"]) for r in rows}


@pytest.mark.parametrize("sources", [DATA / "SOURCES.md", REPO / "glimp_cli" / "data" / "SOURCES.md"])
def test_shipped_data_files_match_the_rows_and_sha256_their_sources_file_credits(sources: Path) -> None:
    table = sources_table(sources)
    assert table and all(name.endswith(".jsonl") for name in table)
    shipped = {str(p.relative_to(sources.parent)) for p in sources.parent.rglob("*.jsonl")}
    assert shipped == set(table), "every data file is credited, and every credited file ships"
    for name, (rows, sha256) in table.items():
        data = (sources.parent / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha256, name
        assert data.count(b"\n") == rows and data.endswith(b"\n"), name


def test_evaluation_and_calibration_gsm8k_rows_together_are_the_whole_gsm8k_test_split() -> None:
    # Rows only selected, never edited: 1-1219 then the calibration rows 1220-1319 give back the file.
    whole = (DATA / "gsm8k" / "test-1-1219.jsonl").read_bytes() + (REPO / "glimp_cli/data/calibration.jsonl").read_bytes()
    credited = re.search(r"GSM8K's whole test split[^`]*`([0-9a-f]{64})`", (DATA / "SOURCES.md").read_text())
    assert credited and hashlib.sha256(whole).hexdigest() == credited.group(1)
