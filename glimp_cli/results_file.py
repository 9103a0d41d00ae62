"""The results file of `glimp batch`: append-only JSON Lines, one line per finished (question, mode).

Each line is written with flush + fsync before the next question starts, so a crash or Ctrl-C loses at
most the question in flight and never leaves half a record that later lines build on. Resuming reads the
file back, drops a torn last line, checks that the run settings and the question texts are the same, and
skips every (id, mode) already present. One process writes a results file at a time: it holds an
exclusive lock on it for the whole run.
"""

from __future__ import annotations

import fcntl  # POSIX only (Linux, macOS): the results-file lock below is an flock
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from glimp_cli.errors import InputError
from glimp_cli.policies import LARGE
from glimp_cli.questions import Question

# Settings that legitimately differ between the modes of one file, or that are stamped per record:
# they are left out when a resumed file's records are compared with this run's settings.
PER_MODE_KEYS = frozenset({"mode", "large_share", "baseline", "version"})
# Recorded with every result but not compared: a resume may widen --limit or follow a moved or
# appended questions file; what must not change, each done id's question text, is checked itself.
RECORDED_ONLY_KEYS = frozenset({"questions"})
# large_share is compared for this mode only: it is the adaptive policy's target. Random's share may
# be glimp's matched share, which moves as more glimp records are written; other modes ignore it.
SHARE_MODES = frozenset({"adaptive"})
# A threshold shapes only the modes that route by it: a large-alone record stays valid whatever tau is.
THRESHOLD_MODES = {"tau": frozenset({"glimp", "adaptive"}), "tau_after_large": frozenset({"glimp"}),
                   "step_entropy_threshold": frozenset({"step_entropy"}),
                   "step_perplexity_threshold": frozenset({"step_perplexity"})}


def check_writable(path: str | Path) -> None:
    """Raise InputError unless results can be written to `path`; call it before loading models."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    try:
        # Really open something: permission bits say nothing about read-only mounts or root.
        if path.exists():
            with path.open("ab"):
                pass
        else:
            with tempfile.TemporaryFile(dir=path.parent):
                pass
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


class ResultsFile:
    """An append-only JSONL results file; every record is on disk before `append` returns."""

    def __init__(self, path: Path, file: BinaryIO, repaired: str | None = None, empty_on_start: bool = False):
        self.path = path
        self.repaired = repaired  # what resume cut away from a torn last line, if anything
        self.done: set[tuple[str, str]] = set()
        # (id, mode) -> (large steps, steps) among the steps a policy routed (those probed for an H_init):
        # what the random mode's matched share is made of. The steps no policy chooses (the answer after a
        # handover, a forced answer) stay out, as random mode gets the same ones on top of its own choices.
        self.step_counts: dict[tuple[str, str], tuple[int, int]] = {}
        self._file = file
        self._empty_on_start = empty_on_start  # --overwrite: emptied by `start`, not before

    @classmethod
    def open(cls, path: str | Path, resume: bool, settings_key: dict | Callable[[str], dict],
             overwrite: bool = False, questions: Iterable[Question] | None = None,
             source: str | Path | None = None) -> tuple["ResultsFile", set[tuple[str, str]]]:
        """Lock the file and open it for appending; returns it and the (id, mode) pairs it already holds.

        A file another process holds open this way is refused. Without `resume` a non-empty file is
        refused unless `overwrite`, and then kept as it is until `start` (so a run that cannot start
        loses nothing). With `resume` every record's settings must equal `settings_key` (one dict,
        or a function of the record's mode) except PER_MODE_KEYS and RECORDED_ONLY_KEYS, each record
        whose id is one of `questions` (read from `source`) must hold that question's text, and
        only then is a torn last line truncated away.
        """
        path = Path(path)
        check_writable(path)
        try:
            file = path.open("ab")
        except OSError as exc:
            raise InputError(f"cannot open results file {path}: {exc.strerror or exc}") from None
        try:
            _lock(file, path)
            if not resume:
                if not overwrite and path.stat().st_size > 0:
                    raise InputError(f"{path} already holds results: resume it or overwrite it")
                return cls(path, file, empty_on_start=overwrite), set()
            records, keep, torn = _read_records(path)
            key = settings_key if callable(settings_key) else (lambda mode: settings_key)
            wants: dict[str, dict] = {}
            for number, record in records:
                mode = record["mode"]
                if mode not in wants:
                    wants[mode] = _run_key(key(mode), mode)
                _check_settings(path, number, _run_key(record["settings"], mode), wants[mode])
            if questions is not None:
                _check_questions(path, records, questions, source)
            repaired = None
            if torn is not None:  # only now: a refused resume leaves the file as it was
                _truncate(path, keep)
                repaired = f"{path}: dropped the incomplete last line {torn} (an interrupted write)"
            results = cls(path, file, repaired)
        except OSError as exc:
            file.close()
            raise InputError(f"cannot open results file {path}: {exc.strerror or exc}") from None
        except BaseException:
            file.close()
            raise
        for _, record in records:
            results._index(record)
        return results, set(results.done)

    def start(self) -> None:
        """The run can start (its models are loaded): empty the file now if it is being overwritten."""
        if self._empty_on_start:
            self._file.truncate(0)
            os.fsync(self._file.fileno())
            self._empty_on_start = False

    def append(self, record: dict) -> None:
        """Write one record as one line and make it durable."""
        self.start()
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._index(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _index(self, record: dict) -> None:
        key = (record["id"], record["mode"])
        self.done.add(key)
        steps = record.get("steps")
        if isinstance(steps, list):
            routed = [s for s in steps if isinstance(s, dict) and s.get("h_init") is not None]
            self.step_counts[key] = (sum(s.get("model") == LARGE for s in routed), len(routed))


def _read_records(path: Path) -> tuple[list[tuple[int, dict]], int, int | None]:
    """(line number, record) pairs, the byte length of the good part, and the torn line if any."""
    if not path.exists():
        return [], 0, None
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")  # `tail` is empty when the file ends with a newline
    keep = len(data) - len(tail)
    torn = len(lines) + 1 if tail else None
    records = []
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw)
        except ValueError:  # also UnicodeDecodeError
            if number == len(lines) and not tail:
                # Written up to its newline but damaged: the only line a crash can have touched.
                keep -= len(raw) + 1
                torn = number
                continue
            raise InputError(f"{path}: line {number} is not valid JSON (only a torn last line is repaired)") from None
        if not (isinstance(record, dict) and isinstance(record.get("id"), str)
                and isinstance(record.get("mode"), str) and isinstance(record.get("settings"), dict)):
            raise InputError(f"{path}: line {number} is not a glimp result (needs id, mode and settings)")
        records.append((number, record))
    return records, keep, torn


def _lock(file: BinaryIO, path: Path) -> None:
    """Hold an exclusive lock on the open results file until it is closed, or refuse if another run has it.

    flock, on the results file itself: the lock ends with the process however it ends (no stale
    lock file after a kill), and no second file sits beside the results. It is POSIX-only.
    """
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{path} is being written by another glimp run: wait for it to finish, "
                         "or write to another file") from None


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as file:
        file.truncate(size)
        os.fsync(file.fileno())


def _run_key(settings: dict, mode: str) -> dict:
    """The settings compared for one mode's records (through JSON, so tuples equal the lists a file gives)."""
    skip = (PER_MODE_KEYS - ({"large_share"} if mode in SHARE_MODES else set())) | RECORDED_ONLY_KEYS
    skip |= {key for key, modes in THRESHOLD_MODES.items() if mode not in modes}
    return {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in skip}


def _flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings as dotted names (`small_model.prompt.system`), so a refusal names the one that differs."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _check_settings(path: Path, number: int, have: dict, want: dict) -> None:
    # A model's details count only where both sides used that model: a small-alone record does not
    # depend on the large model's, and a run that loads only the small one does not locate the large.
    one_sided = {k for k in set(have) ^ set(want) if k.endswith("_model")}
    have = _flatten({k: v for k, v in have.items() if k not in one_sided})
    want = _flatten({k: v for k, v in want.items() if k not in one_sided})
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            raise InputError(
                f"{path}: line {number} was written with {key}={have.get(key)!r} but this run has "
                f"{key}={want.get(key)!r}; resume only with the same settings, or use another file"
            )


def _check_questions(path: Path, records: list[tuple[int, dict]], questions: Iterable[Question],
                     source: str | Path | None) -> None:
    """Refuse a record whose id is one of `questions` but whose question text is another one's."""
    by_id = {q.id: q for q in questions}
    for number, record in records:
        question = by_id.get(record["id"])
        if question is not None and record.get("question") != question.question:
            where = f"{source}:{question.line}" if source else f"question line {question.line}"
            raise InputError(
                f"{path}: line {number} has id {record['id']!r} for the question {_brief(record.get('question'))}, "
                f"but {where} has id {record['id']!r} for {_brief(question.question)}: it was written for another "
                "question file (or the lines moved); use another output file"
            )


def _brief(text: object, width: int = 40) -> str:
    if not isinstance(text, str):
        return repr(text)
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")
