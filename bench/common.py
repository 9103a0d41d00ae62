"""What the bench scripts share: the repository root, the default evaluation questions, progress lines, a free port.

Every script runs as `python bench/NAME.py`, so bench/ is first on sys.path and `from common import ...`
finds this file (the tests put bench/ on sys.path the same way).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "gsm8k" / "test-1-1219.jsonl"  # GSM8K test rows 1-1219: no calibration row


def progress_for(script: str) -> Callable[[str], None]:
    """`progress(message)` for `script`: one line on stderr, so a run of minutes shows it is alive without
    touching the table."""
    def progress(message: str) -> None:
        print(f"{script}: {message}", file=sys.stderr, flush=True)

    return progress


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
