"""models.yaml: a registry of models and pairs, loaded into validated frozen objects.

Lookup: the packaged models.yaml is always the base; the first of `--config`, `$GLIMP_CONFIG`
and the user's config file (`$XDG_CONFIG_HOME/glimp/models.yaml`) that exists is layered on
top of it, its entries replacing packaged entries of the same name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from glimp_cli.entropy import parse_estimator
from glimp_cli.errors import ConfigError
from glimp_cli.typed_yaml import build_dataclass, expect_mapping, expect_type

CONFIG_ENV = "GLIMP_CONFIG"


@dataclass(frozen=True)
class Part:
    """One registry package that carries a piece of a split GGUF, at its exact version."""

    package: str
    version: str


@dataclass(frozen=True)
class Source:
    """Where a model's GGUF comes from: exactly one of `path`, `package`, `hf_repo`, `parts`.

    `parts` is a GGUF split over registry packages: concatenated in order, the part files must
    give `size` bytes with the pinned `sha256`; glimp assembles them once into its cache as `file`.
    """

    path: str | None = None
    package: str | None = None
    file: str | None = None
    assemble: str | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    revision: str | None = None
    parts: tuple[Part, ...] = ()
    sha256: str | None = None
    size: int | None = None
    install: str | None = None  # what to pip install when a package is missing


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a model's prompt, and what marks its final answer.

    `chat` renders the GGUF's chat template (system + user turn, then `prefill` inside the
    assistant turn, e.g. "<think>\\n" for reasoning models); `plain` fills `template`.

    A conversation (`glimp serve`) goes through the chat template whole. A plain template holds one
    only with `turn`, an earlier exchange as written at `{question}` (with `{question}` and `{answer}`,
    ending where the next question begins), and `system_turn`, a client's system text (`{system}`)
    as written before the template; without them it holds a single question.
    """

    style: str = "chat"
    system: str | None = None
    user: str = "{question}"
    template: str | None = None
    prefill: str = ""
    answer_marker: str | None = None
    answer_until_eos: bool = False
    turn: str | None = None
    system_turn: str | None = None


# PromptFormat fields that shape only a conversation's prompt, never a single question's.
CONVERSATION_KEYS = ("turn", "system_turn")


@dataclass(frozen=True)
class ModelSpec:
    """One model of the registry."""

    name: str
    backend: str = "llama_cpp"
    source: Source | None = None
    prompt: PromptFormat = field(default_factory=PromptFormat)
    n_ctx: int = 4096
    n_batch: int = 512
    n_gpu_layers: int = 0
    threads: int | None = None
    stop: tuple[str, ...] = ()
    # HTTP backend (OpenAI-compatible servers).
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    timeout: float = 60.0
    max_retries: int = 2


@dataclass(frozen=True)
class CalibrationRecord:
    """Where a pair's tau came from, as `glimp calibrate --write` stored it (read by people, not the loop).

    `large_share` is the share of steps the tau was picked to send to the large model (by
    `--large-share`, or the sweep share of the tau an `objective` chose); `steps` the number of
    recorded H_init values; the rest names the questions or traces they came from and the settings
    they were measured with.
    """

    tau: float
    steps: int
    large_share: float | None = None
    objective: str | None = None
    mode: str = "small"
    questions: str | None = None
    traces: str | None = None
    small: str | None = None
    large: str | None = None
    estimator: str | None = None
    delimiter: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_step_tokens: int | None = None
    probe_skip: str | None = None
    probe_at: str | None = None
    date: str | None = None


# Where the probe reads H_init: the step's first token, or its first token of content.
PROBE_AT = ("first", "content")


@dataclass(frozen=True)
class PairSpec:
    """A small/large pair and its routing and sampling settings."""

    name: str
    small: str
    large: str
    tau: float = 1.0
    delimiter: str = "\n\n"
    estimator: str = "exact"
    mode: str = "glimp"
    large_share: float = 0.5
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 1024
    max_step_tokens: int = 256
    # Thresholds of the draft-then-verify baselines (modes step_entropy, step_perplexity).
    step_entropy_threshold: float = 1.0
    step_perplexity_threshold: float = 3.0
    # A regex of leading step text the probe reads past (e.g. a list number "2."): H_init is then the
    # entropy of the first token after it. None probes the step's first token (the paper's H_init).
    probe_skip: str | None = None
    # glimp's tau for a step that follows a large-model step; None routes every step at tau.
    tau_after_large: float | None = None
    # "content": H_init at the step's first token of content, past markup and a list number; "first":
    # at its first token (the paper's H_init).
    probe_at: str = "first"
    # Tokens the answering model gets to state an answer after the marker, when a trace ended without
    # one (a loop, max_tokens, a full context); 0 never forces an answer.
    forced_answer_tokens: int = 32
    calibration: CalibrationRecord | None = None  # written by `glimp calibrate --write`


@dataclass
class Registry:
    """Models and pairs from the layered config files, with per-entry load errors kept aside."""

    models: dict[str, ModelSpec]
    pairs: dict[str, PairSpec]
    default_pair: str
    files: list[Path]
    origin: dict[str, Path]  # "models.<name>" / "pairs.<name>" -> file it came from
    broken: dict[str, ConfigError]  # same keys -> why that entry failed to load
    pair_keys: dict[str, frozenset] = field(default_factory=dict)  # keys each pair sets in its file
    prompts: dict[str, Any] = field(default_factory=dict)  # named prompt formats, as raw mappings

    def model(self, name: str) -> ModelSpec:
        """The model called `name`, or a ConfigError naming the entry's problem."""
        return self._entry("models", name, self.models)

    def pair(self, name: str | None = None) -> PairSpec:
        """The pair called `name` (default pair when None)."""
        return self._entry("pairs", name or self.default_pair, self.pairs)

    def _entry(self, section: str, name: str, table: dict) -> Any:
        key = f"{section}.{name}"
        if key in self.broken:
            raise self.broken[key]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            where = ", ".join(str(f) for f in self.files)
            raise ConfigError(f"no {section[:-1]} named {name!r} in {where} (known: {known})")
        return table[name]


def packaged_config() -> Path:
    """The models.yaml shipped inside the package."""
    return Path(str(resources.files("glimp_cli").joinpath("models.yaml")))


def user_config() -> Path:
    """The user's models.yaml under the XDG config directory."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "glimp" / "models.yaml"


def config_overlay(explicit: str | Path | None) -> Path | None:
    """The file layered over the packaged default: --config, $GLIMP_CONFIG, or the user file."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (from --config)")
        return path
    env = os.environ.get(CONFIG_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (from ${CONFIG_ENV})")
        return path
    path = user_config()
    return path if path.is_file() else None


def load_registry(explicit: str | Path | None = None) -> Registry:
    """Load the packaged registry and layer the user's file over it."""
    registry = Registry({}, {}, "default", [], {}, {})
    files = [packaged_config()]
    overlay = config_overlay(explicit)
    if overlay is not None:
        files.append(overlay)
    for path in files:
        _layer(registry, path)
    if f"pairs.{registry.default_pair}" not in registry.origin:
        raise ConfigError(f"{files[-1]}: default_pair {registry.default_pair!r} names no pair")
    return registry


def _layer(registry: Registry, path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(data) - {"default_pair", "models", "pairs", "prompts"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {sorted(unknown)[0]!r}")
    registry.files.append(path)
    # Named prompts accumulate over the layers, so a user's model can use a packaged prompt.
    registry.prompts.update(expect_mapping(data.get("prompts"), path, "prompts"))
    prompts = registry.prompts
    for name, raw in expect_mapping(data.get("models"), path, "models").items():
        _add(registry, "models", name, path, lambda: _model(name, raw, prompts, path))
    for name, raw in expect_mapping(data.get("pairs"), path, "pairs").items():
        _add(registry, "pairs", name, path, lambda: _pair(name, raw, path))
        registry.pair_keys[name] = frozenset(raw) if isinstance(raw, dict) else frozenset()
    if "default_pair" in data:
        registry.default_pair = expect_type(data["default_pair"], str, path, "default_pair")


def _add(registry: Registry, section: str, name: str, path: Path, build) -> None:
    key = f"{section}.{name}"
    table = getattr(registry, section)
    registry.origin[key] = path
    table.pop(name, None)
    registry.broken.pop(key, None)
    try:
        table[name] = build()
    except ConfigError as exc:
        registry.broken[key] = exc


def _model(name: str, raw: Any, prompts: dict, path: Path) -> ModelSpec:
    where = f"models.{name}"
    raw = dict(expect_mapping(raw, path, where))
    if isinstance(raw.get("source"), dict) and isinstance(raw["source"].get("parts"), dict):
        raw["source"] = {**raw["source"], "parts": _expand_parts(raw["source"]["parts"], path, f"{where}.source.parts")}
    prompt = raw.get("prompt")
    if isinstance(prompt, str):
        if prompt not in prompts:
            raise ConfigError(f"{path}: {where}.prompt: no prompt named {prompt!r} under prompts")
        raw["prompt"] = prompts[prompt]
        prompt_where = f"prompts.{prompt}"
    else:
        prompt_where = f"{where}.prompt"
    spec = build_dataclass(ModelSpec, {"name": name, **raw}, path, where, {"prompt": prompt_where})
    if spec.prompt.style not in ("chat", "plain"):
        raise ConfigError(f"{path}: {prompt_where}.style: {spec.prompt.style!r} is not 'chat' or 'plain'")
    if spec.prompt.style == "plain" and "{question}" not in (spec.prompt.template or ""):
        raise ConfigError(f"{path}: {prompt_where}.template: a plain prompt needs a template with {{question}}")
    _check_conversation_keys(spec.prompt, path, prompt_where)
    if spec.backend == "llama_cpp":
        _check_source(spec.source, path, where)
    elif spec.backend == "openai":
        _check_remote(spec, path, where, prompt_where)
    for key in ("n_ctx", "n_batch"):
        if getattr(spec, key) < 1:
            raise ConfigError(f"{path}: {where}.{key}: must be a positive integer")
    return spec


def _check_conversation_keys(prompt: PromptFormat, path: Path, where: str) -> None:
    """`turn` and `system_turn` belong to plain prompts and name the places they fill."""
    for key, places in (("turn", ("{question}", "{answer}")), ("system_turn", ("{system}",))):
        value = getattr(prompt, key)
        if value is None:
            continue
        if prompt.style != "plain":
            raise ConfigError(f"{path}: {where}.{key}: only a plain prompt has {key} (a chat template writes "
                              "the conversation itself)")
        missing = [p for p in places if p not in value]
        if missing:
            raise ConfigError(f"{path}: {where}.{key}: needs {' and '.join(missing)}")


def _check_remote(spec: ModelSpec, path: Path, where: str, prompt_where: str) -> None:
    """An HTTP model: a base URL, a plain prompt (a server's chat template is not visible), sane limits."""
    if not spec.base_url or not spec.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{path}: {where}.base_url: backend openai needs an http(s) URL such as http://127.0.0.1:8080/v1")
    if spec.prompt.style != "plain":
        raise ConfigError(f"{path}: {prompt_where}.style: backend openai needs style: plain with the chat "
                          "template written out (glimp cannot read the served model's template)")
    if not 0 < spec.timeout < math.inf:
        raise ConfigError(f"{path}: {where}.timeout: must be a positive, finite number of seconds")
    if spec.max_retries < 0:
        raise ConfigError(f"{path}: {where}.max_retries: must be >= 0")


def _expand_parts(raw: dict, path: Path, where: str) -> list[dict]:
    """The compact parts form {package: "name-part{n}", count: N, version: V} as the list form."""
    unknown = set(raw) - {"package", "count", "first", "version"}
    if unknown:
        raise ConfigError(f"{path}: {where}: unknown key {sorted(unknown)[0]!r}")
    for key in ("package", "count", "version"):
        if key not in raw:
            raise ConfigError(f"{path}: {where}: missing key {key!r}")
    pattern = expect_type(raw["package"], str, path, f"{where}.package")
    count = expect_type(raw["count"], int, path, f"{where}.count")
    first = expect_type(raw.get("first", 1), int, path, f"{where}.first")
    version = expect_type(raw["version"], str, path, f"{where}.version")
    if pattern.count("{n}") != 1:
        raise ConfigError(f"{path}: {where}.package: the compact form needs one {{n}} where the part number goes")
    if count < 1:
        raise ConfigError(f"{path}: {where}.count: must be a positive integer")
    return [{"package": pattern.replace("{n}", str(n)), "version": version} for n in range(first, first + count)]


def _check_source(source: Source | None, path: Path, where: str) -> None:
    kinds = [k for k in ("path", "package", "hf_repo", "parts") if source and getattr(source, k)]
    if len(kinds) != 1:
        raise ConfigError(f"{path}: {where}.source: give exactly one of path, package, hf_repo, parts")
    if source.package and not (source.file or source.assemble):
        raise ConfigError(f"{path}: {where}.source: a package source needs `file` (and `assemble` to build it)")
    if source.hf_repo and not source.hf_file:
        raise ConfigError(f"{path}: {where}.source.hf_file: required with hf_repo")
    if source.parts:
        _check_parts(source, path, f"{where}.source")
    else:
        for key in ("sha256", "size"):
            if getattr(source, key) is not None:
                raise ConfigError(f"{path}: {where}.source.{key}: only a parts source is checked against {key}")


def _check_parts(source: Source, path: Path, where: str) -> None:
    for key in ("file", "sha256", "size"):
        if getattr(source, key) is None:
            raise ConfigError(f"{path}: {where}.{key}: required with parts")
    if source.assemble:
        raise ConfigError(f"{path}: {where}.assemble: a parts source is assembled by glimp, not by a package")
    if Path(source.file).name != source.file or not source.file.endswith(".gguf"):
        raise ConfigError(f"{path}: {where}.file: a plain file name ending in .gguf, got {source.file!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", source.sha256):
        raise ConfigError(f"{path}: {where}.sha256: expected 64 lowercase hex digits, got {source.sha256!r}")
    if source.size < 1:
        raise ConfigError(f"{path}: {where}.size: must be a positive number of bytes")
    seen = set()
    for i, part in enumerate(source.parts):
        name = _canonical(part.package)
        if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name):
            raise ConfigError(f"{path}: {where}.parts[{i}].package: {part.package!r} is not a package name")
        if name in seen:
            raise ConfigError(f"{path}: {where}.parts[{i}].package: {part.package!r} is listed twice")
        seen.add(name)


def _canonical(package: str) -> str:
    """A distribution name as the registry compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", package).lower()


def _pair(name: str, raw: Any, path: Path) -> PairSpec:
    where = f"pairs.{name}"
    spec = build_dataclass(PairSpec, {"name": name, **expect_mapping(raw, path, where)}, path, where)
    try:
        parse_estimator(spec.estimator)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {where}.estimator: {exc}") from None
    check_pair_values(spec, lambda key: f"{path}: {where}.{key}")
    record = spec.calibration
    if record is not None:
        if record.steps < 1:
            raise ConfigError(f"{path}: {where}.calibration.steps: must be a positive integer")
        if record.large_share is not None and not 0 <= record.large_share <= 1:
            raise ConfigError(f"{path}: {where}.calibration.large_share: must be between 0 and 1")
    return spec


def check_pair_values(spec: PairSpec, where) -> None:
    """Range checks shared by the file loader and command-line overrides."""
    if not spec.delimiter:
        raise ConfigError(f"{where('delimiter')}: must not be empty")
    # NaN compares false with everything: a threshold of NaN would route every step one way silently.
    for key in ("tau", "step_entropy_threshold", "step_perplexity_threshold"):
        if math.isnan(getattr(spec, key)):
            raise ConfigError(f"{where(key)}: must be a number (inf and -inf are allowed), not NaN")
    if not (0 <= spec.temperature < math.inf):
        raise ConfigError(f"{where('temperature')}: must be a finite number >= 0")
    if not 0 < spec.top_p <= 1:
        raise ConfigError(f"{where('top_p')}: must be in (0, 1]")
    if not 0 <= spec.large_share <= 1:
        raise ConfigError(f"{where('large_share')}: must be between 0 and 1")
    for key in ("max_tokens", "max_step_tokens"):
        if getattr(spec, key) < 1:
            raise ConfigError(f"{where(key)}: must be a positive integer")
    if spec.forced_answer_tokens < 0:
        raise ConfigError(f"{where('forced_answer_tokens')}: must be an integer >= 0 (0: never force an answer)")
    if spec.tau_after_large is not None and math.isnan(spec.tau_after_large):
        raise ConfigError(f"{where('tau_after_large')}: must be a number (inf and -inf are allowed), not NaN")
    if spec.probe_skip is not None:
        compile_probe_skip(spec.probe_skip, where("probe_skip"))
    if spec.probe_at not in PROBE_AT:
        raise ConfigError(f"{where('probe_at')}: {spec.probe_at!r} is not one of {', '.join(PROBE_AT)}")
    if spec.probe_at != "first" and spec.probe_skip is not None:
        raise ConfigError(f"{where('probe_at')}: probe_at {spec.probe_at} and probe_skip both choose what the probe "
                          "reads past: set one")


# The escapes a delimiter may be written with; any other backslash is a mistake, never kept as a literal.
DELIMITER_ESCAPE = re.compile(r"\\(?:([ntr\\])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")
SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
BAD_ESCAPE = re.compile(r"\\(?:[xuU][0-9a-fA-F]*|.)?", re.DOTALL)  # what to quote in the error
ESCAPE_HELP = r"write \n, \t, \r, \\ (a backslash), \xHH, \uXXXX or \UXXXXXXXX"


def parse_delimiter(text: str, where: str) -> str:
    """A delimiter as typed (`\\n\\n`, `\\u2192`, `→`): its escapes read, every other character kept as it is."""
    out, i = [], 0
    while (j := text.find("\\", i)) >= 0:
        out.append(text[i:j])
        match = DELIMITER_ESCAPE.match(text, j)
        if match is None:
            bad = BAD_ESCAPE.match(text, j).group()
            what = f"a lone '{bad}' at the end" if bad == "\\" else f"bad escape '{bad}'"
            raise ConfigError(f"{where}: {what} ({ESCAPE_HELP})")
        simple, *hex_digits = match.groups()
        if simple:
            out.append(SIMPLE_ESCAPES[simple])
        else:
            code = int(next(h for h in hex_digits if h), 16)
            # A lone surrogate cannot be encoded to UTF-8 like the models' text; past U+10FFFF is no character.
            if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                raise ConfigError(f"{where}: '{match.group()}' is not a character")
            out.append(chr(code))
        i = match.end()
    out.append(text[i:])
    return "".join(out)


def compile_probe_skip(pattern: str, where: str):
    """The compiled `probe_skip` regex; it must compile and must not match the empty text."""
    import regex

    try:
        compiled = regex.compile(pattern)
    except regex.error as exc:
        raise ConfigError(f"{where}: not a regular expression ({exc})") from None
    if compiled.fullmatch(""):
        raise ConfigError(f"{where}: {pattern!r} matches the empty text, so it would skip nothing")
    return compiled


def apply_overrides(pair: PairSpec, overrides: dict[str, tuple[Any, str]],
                    file_keys: frozenset = frozenset()) -> tuple[PairSpec, dict[str, str]]:
    """Apply command-line/environment values over a pair; returns it and where each setting came from.

    Precedence: flag > environment > models.yaml > built-in default.
    """
    sources = {
        f.name: ("models.yaml" if f.name in file_keys else "default")
        for f in dataclasses.fields(PairSpec) if f.name != "name"
    }
    values = {}
    for key, (value, source) in overrides.items():
        values[key] = value
        sources[key] = source
    spec = dataclasses.replace(pair, **values)
    if "estimator" in values:
        parse_estimator(spec.estimator)
    check_pair_values(spec, lambda key: f"{sources[key]} value for {key}")
    return spec, sources
