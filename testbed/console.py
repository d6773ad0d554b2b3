"""What the testbed says on the terminal: progress lines, and errors that name the log to read."""

from __future__ import annotations

import sys
from pathlib import Path


def log(message: str) -> None:
    print(f"[k8s-testbed] {message}", flush=True)


def fail(message: str, *, log_file: Path | None = None, tail: int = 30) -> SystemExit:
    """Print a clear error (and the end of the log that explains it); return the exit."""
    print(f"[k8s-testbed] ERROR: {message}", file=sys.stderr, flush=True)
    if log_file is not None:
        if log_file.exists():
            lines = log_file.read_text(errors="replace").splitlines()[-tail:]
            print(f"[k8s-testbed] last {len(lines)} lines of {log_file}:", file=sys.stderr)
            for line in lines:
                print(f"    {line}", file=sys.stderr)
        # Repeat the verdict after the tail, so it is the last thing on screen.
        print(f"[k8s-testbed] ERROR: {message}; read {log_file}", file=sys.stderr)
    sys.stderr.flush()
    return SystemExit(1)


def human(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"
