"""`glimp calibrate`: pick tau from recorded H_init values, and show what it trades.

Everything here reads batch results files (the JSONL that `glimp batch` writes, each step with its
h_init). The distribution comes from a small-mode run over calibration questions (the probe is the
small model's first token, so small mode records every step's H_init for free) or from any recorded
traces; a tau for a target large share is a quantile of it; a sweep is a set of batch runs, one
results file per tau, that a rerun resumes and reuses.

One module per concern: `traces` (H_init from results files), `shares` (tau for a share and its
intervals), `questions` (the shipped set, held-out checks), `sweep` (planning and running the runs),
`frontier` (choosing from a sweep), `drawing` (terminal and PNG), `models_yaml` (storing tau),
`command` (the command's flow). Their public names are gathered here.
"""

from glimp_cli.calibrate.command import CalibrateOptions, check_options, run_command
from glimp_cli.calibrate.drawing import (
    COLOURS, Bin, describe_choice, describe_distribution, histogram, nice_width, render_frontier,
    render_histogram, write_plot,
)
from glimp_cli.calibrate.frontier import OBJECTIVES, FrontierRow, Pick, frontier, pick_tau
from glimp_cli.calibrate.models_yaml import (
    Measured, TauWrite, calibration_record, describe_write, measured_by_run, measured_in_traces,
    settings_to_write, write_tau,
)
from glimp_cli.calibrate.questions import (
    CALIBRATION_SET, calibration_set, check_held_out, count_overlap, normalize_question,
)
from glimp_cli.calibrate.shares import (
    TauShare, choose_by_share, order_statistic, round_tau, share_at, tau_for_share, tau_text,
)
from glimp_cli.calibrate.sweep import (
    DEFAULT_SHARES, Calibration, ModelsOnDemand, Run, default_runs_dir, execute_run, parse_shares, plan_sweep,
    recording_run, run_calibration, run_policy, run_settings,
)
from glimp_cli.calibrate.traces import (
    MEASURED_KEYS, TRACE_MODES, UNSET_MEANS, Distribution, distribution_from_traces, read_traces, recorded_settings,
    trace_questions, trace_values,
)

__all__ = [
    "CALIBRATION_SET", "COLOURS", "DEFAULT_SHARES", "MEASURED_KEYS", "OBJECTIVES", "TRACE_MODES", "UNSET_MEANS",
    "Bin", "CalibrateOptions", "Calibration", "Distribution", "FrontierRow", "Measured", "ModelsOnDemand", "Pick",
    "Run", "TauShare", "TauWrite",
    "calibration_record", "calibration_set", "check_held_out", "check_options", "choose_by_share", "count_overlap",
    "default_runs_dir", "describe_choice", "describe_distribution", "describe_write", "distribution_from_traces",
    "execute_run", "frontier", "histogram", "measured_by_run", "measured_in_traces", "nice_width",
    "normalize_question", "order_statistic", "parse_shares", "pick_tau", "plan_sweep", "read_traces",
    "recorded_settings", "recording_run", "render_frontier", "render_histogram", "round_tau", "run_calibration",
    "run_command", "run_policy", "run_settings", "settings_to_write", "share_at", "tau_for_share", "tau_text",
    "trace_questions", "trace_values", "write_plot", "write_tau",
]
