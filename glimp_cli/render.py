"""The terminal view: steps stream in as they are written, coloured by model, with H_init."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from glimp_cli.trace import Step, Trace

COLOURS = {"small": "cyan", "large": "magenta"}


def _h(h_init: float | None, probing: bool, model: str) -> str:
    """H_init in nats, or what happened instead of a probe."""
    if h_init is not None:
        return f"H_init {h_init:.2f} nats"
    if not probing:
        return "no probe (large alone)"
    # A probing policy skips the probe once the answer is the large model's (handed over or forced),
    # and for a forced answer of small alone.
    return "answer handed to large" if model == "large" else "answer, no probe"


class LiveView:
    """A StepListener that prints each step as its tokens arrive.

    Rich drops colour and escape codes by itself when stdout is not a terminal, so the same
    view prints plain text into a pipe or file.
    """

    def __init__(self, console: Console, probing: bool = True):
        self.console = console
        self.probing = probing  # whether the policy probes H_init (large alone does not)
        self._model = "small"

    def step_started(self, index: int, model: str, h_init: float | None) -> None:
        self._model = model
        header = Text(f"\n▌ step {index + 1} · {model} · {_h(h_init, self.probing, model)}", style=f"bold {COLOURS[model]}")
        self.console.print(header, highlight=False)

    def text(self, piece: str) -> None:
        self.console.print(piece, end="", style=COLOURS[self._model], markup=False, highlight=False,
                           soft_wrap=True)

    def draft_discarded(self, index: int, tokens: int) -> None:
        self.console.print(Text(f"  ✗ small draft of the answer dropped ({tokens} tokens): "
                                "the large model writes the answer", style="dim"), highlight=False)

    def step_finished(self, step: Step) -> None:
        forced = f" (forced: the trace had ended on {step.forced})" if step.forced else ""
        self.console.print(Text(f"\n  {step.tokens} tokens · {step.seconds:.2f} s · {step.stop_reason}{forced}",
                                style="dim"), highlight=False)


def summary_table(trace: Trace, answer: str | None) -> Table:
    """Steps and tokens per model, then shares, probe and wall time, tokens/s."""
    s = trace.summary()
    per_model = Table(show_edge=False, box=None, padding=(0, 2))
    for column in ("model", "steps", "tokens", "evaluated"):
        per_model.add_column(column, justify="left" if column == "model" else "right")
    for role in ("small", "large"):
        per_model.add_row(Text(role, style=COLOURS[role]), str(s["steps"][role]), str(s["tokens"][role]),
                          str(s["evaluated_tokens"].get(role, "-")))  # "-": a server's, not visible
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("large share", f"{s['large_share_steps']:.0%} of steps, {s['large_share_tokens']:.0%} of tokens")
    grid.add_row("probe time", f"{s['probe_seconds'] * 1000:.1f} ms over {len(trace.steps)} steps")
    grid.add_row("prefill time", f"{s['prefill_seconds']:.2f} s")
    grid.add_row("wall time", f"{s['wall_seconds']:.2f} s ({s['tokens_per_second']:.1f} tokens/s)")
    grid.add_row("stop", str(trace.stop_reason) + (", answer forced" if trace.forced_answer else ""))
    grid.add_row("answer", answer if answer is not None else "-")
    outer = Table.grid()
    outer.add_row(per_model)
    outer.add_row("")
    outer.add_row(grid)
    return outer


def registry_tables(registry) -> list[Table]:
    """`glimp models`: one table of models and one of pairs; a broken entry shows its error."""
    from glimp_cli.sources import availability, describe

    models = Table(title="models", title_justify="left")
    for column in ("name", "source", "available here", "settings"):
        models.add_column(column, overflow="fold")
    for key, path in registry.origin.items():
        section, name = key.split(".", 1)
        if section != "models":
            continue
        if key in registry.broken:
            models.add_row(name, Text(str(registry.broken[key]), style="red"), "no", "")
            continue
        spec = registry.models[name]
        if spec.backend == "llama_cpp":
            here = availability(spec, path.parent)
            available = Text(("yes: " if here.available else "no: ") + here.where,
                             style="green" if here.available else "yellow")
        elif spec.backend == "openai":
            from glimp_cli.backends.openai_http import reachability

            up, what = reachability(spec)
            available = Text(("yes: " if up else "no: ") + what, style="green" if up else "yellow")
        else:
            available = Text(f"{spec.backend} backend", style="dim")
        settings = (f"backend {spec.backend}, prompt {spec.prompt.style}, n_ctx {spec.n_ctx}, "
                    f"n_gpu_layers {spec.n_gpu_layers}, threads {spec.threads or 'all'}")
        if spec.backend == "openai":
            settings = (f"backend openai, prompt {spec.prompt.style}, timeout {spec.timeout:g} s, "
                        f"max_retries {spec.max_retries}" + (f", key from ${spec.api_key_env}" if spec.api_key_env else ""))
        models.add_row(name, describe(spec), available, settings)
    pairs = Table(title="pairs", title_justify="left")
    for column in ("name", "small", "large", "settings"):
        pairs.add_column(column, overflow="fold")
    for key in registry.origin:
        section, name = key.split(".", 1)
        if section != "pairs":
            continue
        label = name + (" (default)" if name == registry.default_pair else "")
        if key in registry.broken:
            pairs.add_row(label, Text(str(registry.broken[key]), style="red"), "", "")
            continue
        p = registry.pairs[name]
        pairs.add_row(label, p.small, p.large,
                      f"tau {p.tau:g}, estimator {p.estimator}, temperature {p.temperature:g}, "
                      f"top_p {p.top_p:g}, max_tokens {p.max_tokens}, max_step_tokens {p.max_step_tokens}"
                      + (f", probe_skip {p.probe_skip!r}" if p.probe_skip is not None else "")
                      + (f", tau_after_large {p.tau_after_large:g}" if p.tau_after_large is not None else ""))
    return [models, pairs]
