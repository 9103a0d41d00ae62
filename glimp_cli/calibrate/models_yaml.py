"""Storing a calibration in models.yaml: tau, the settings it was measured with, and where it came from."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glimp_cli.calibrate.traces import MEASURED_KEYS, UNSET_MEANS, Distribution
from glimp_cli.config import PairSpec, Registry, load_registry
from glimp_cli.errors import ConfigError, InputError, UsageError
from glimp_cli.policies import LARGE, SMALL


@dataclass(frozen=True)
class Measured:
    """What a tau was measured with: the MEASURED_KEYS settings, the models, where the steps came from."""

    settings: dict
    small: str
    large: str
    mode: str = SMALL
    questions: str | None = None
    traces: str | None = None


def measured_by_run(pair: PairSpec, questions: str | Path) -> Measured:
    """A calibration run of `pair` (with its command-line overrides) over the questions file `questions`."""
    return Measured({key: getattr(pair, key) for key in MEASURED_KEYS}, pair.small, pair.large, SMALL,
                    str(Path(questions).resolve()))


def measured_in_traces(dist: Distribution) -> Measured:
    """The settings a traces file's traces were recorded with; refused unless they are one set, known."""
    if not dist.recorded:
        raise InputError(f"{dist.source}: its traces record no settings")
    first = dist.recorded[0]
    for other in dist.recorded[1:]:
        for key in (k for k in first if k != "questions" and first[k] != other[k]):
            raise InputError(f"{dist.source}: its {dist.mode} traces were recorded with {key}={first[key]!r} "
                             f"and with {key}={other[key]!r}: calibrate on traces of one setting")
    for key in (*MEASURED_KEYS, SMALL, LARGE):
        if first[key] is None and key not in UNSET_MEANS:
            raise InputError(f"{dist.source}: its traces do not record {key}, so their tau cannot be stored "
                             "with what it was measured with")
    questions = {r["questions"] for r in dist.recorded}
    return Measured({key: first[key] for key in MEASURED_KEYS}, first[SMALL], first[LARGE], dist.mode,
                    questions.pop() if len(questions) == 1 else None, str(Path(dist.source).resolve()))


def settings_to_write(pair: PairSpec, measured: Measured, uses_large: bool) -> dict[str, tuple[Any, Any]]:
    """key -> (the pair's value, the measured one) for each measured setting the pair holds otherwise.

    The models are not rewritten: a tau measured on another small model (or, when the large model
    shaped the steps, another large one) belongs to another pair, so that is refused.
    """
    roles = (SMALL, LARGE) if uses_large else (SMALL,)
    for role in roles:
        have, used = getattr(pair, role), getattr(measured, role)
        if have != used:
            raise UsageError(f"tau was measured with the {role} model {used!r}, but pair {pair.name!r} uses "
                             f"{have!r}: calibrate the pair's own models (no --{role}), or --write to a pair "
                             f"whose {role} model is {used!r}")
    return {key: (getattr(pair, key), value) for key, value in measured.settings.items()
            if getattr(pair, key) != value}


def calibration_record(measured: Measured, tau: float, steps: int, share: float | None,
                       objective: str | None = None, date: str | None = None) -> dict:
    """The `calibration:` mapping of a pair entry (config.CalibrationRecord), without empty fields."""
    from datetime import datetime, timezone

    record = {"tau": tau, "large_share": share, "objective": objective, "steps": steps, "mode": measured.mode,
              "questions": measured.questions, "traces": measured.traces, "small": measured.small,
              "large": measured.large, **measured.settings,
              "date": date or datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return {key: value for key, value in record.items() if value is not None}


@dataclass(frozen=True)
class TauWrite:
    """What `write_tau` changed."""

    path: Path
    pair: str
    old: float
    new: float
    added: bool  # the pair had no entry in that file: a full copy of it was added
    changed: dict = field(default_factory=dict)  # other pair settings written: key -> (old, new)
    calibration: dict | None = None  # the calibration record written with tau


def write_tau(path: str | Path, registry: Registry, pair_name: str, tau: float,
              changed: dict[str, tuple[Any, Any]] | None = None, calibration: dict | None = None) -> TauWrite:
    """Store `tau` (with the `changed` settings' new values and the `calibration` record) in the pair's
    entry of the models.yaml at `path`, keeping comments and other entries.

    A pair the file does not hold (it lives in the packaged file only) gets a full copy of its keys
    there, since an entry in a layered file replaces the packaged entry whole. The file is written to
    a temporary file beside it, checked to load with those values, and moved into place (os.replace).
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    path = Path(path).expanduser()
    yaml = YAML()  # round-trip: comments, order and quoting are kept
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines of the user's file
    old = registry.pair(pair_name).tau
    changed = dict(changed or {})
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        data = yaml.load(text) if text.strip() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except Exception as exc:  # ruamel's parser errors share no public base class
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if data.get("pairs") is None:
        data["pairs"] = CommentedMap()
    pairs = data["pairs"]
    added = pair_name not in pairs or pairs[pair_name] is None
    if added:
        origin = registry.origin.get(f"pairs.{pair_name}")
        raw = YAML(typ="safe").load(origin.read_text(encoding="utf-8"))["pairs"][pair_name]
        pairs[pair_name] = CommentedMap(raw)
    entry = pairs[pair_name]
    entry["tau"] = tau
    for key, (_, new) in changed.items():
        entry[key] = new
    if calibration is not None:
        entry["calibration"] = CommentedMap(calibration)
    want = {"tau": tau, **{key: new for key, (_, new) in changed.items()}}
    _replace_atomically(path, yaml, data, pair_name, want, calibration is not None)
    return TauWrite(path, pair_name, old, tau, added, changed, calibration)


def describe_write(change: TauWrite) -> str:
    """What --write did, in a line for tau and one for each kind of thing stored with it."""
    where = f"{change.path}: "
    what = "added the pair's entry with" if change.added else "set"
    lines = [f"{where}{what} pairs.{change.pair}.tau = {change.new:g} (was {change.old:g})"]
    if change.changed:
        settings = ", ".join(f"{key} = {new!r} (was {old!r})" for key, (old, new) in change.changed.items())
        lines.append(f"{where}also set {settings}: the recorded H_init values depend on them")
    record = change.calibration
    if record is not None:
        share = "" if record.get("large_share") is None else f"large share {record['large_share']:.0%}, "
        how = f" by {record['objective']}" if record.get("objective") else ""
        origin = record.get("traces") or record.get("questions") or "?"
        lines.append(f"{where}recorded pairs.{change.pair}.calibration: {share}{record['steps']} steps "
                     f"({record['mode']} mode) from {origin}{how}")
    return "\n".join(lines)


def _replace_atomically(path: Path, yaml, data, pair_name: str, want: dict, calibrated: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path = path.resolve()  # a symlinked models.yaml (dotfiles) is rewritten where it lives, the link kept
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            yaml.dump(data, file)
            file.flush()
            os.fsync(file.fileno())
        written = load_registry(temp).pair(pair_name)
        for key, value in want.items():
            got = getattr(written, key)
            if not (got == value or (isinstance(got, float) and math.isnan(got) and math.isnan(value))):
                raise ConfigError(f"{path}: the rewritten file gives {key} {got!r}, not {value!r}; left unchanged")
        if calibrated and written.calibration is None:
            raise ConfigError(f"{path}: the rewritten file lost the calibration record; left unchanged")
        if path.exists():
            os.chmod(temp, path.stat().st_mode & 0o7777)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
