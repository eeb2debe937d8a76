"""What the export, import and evaluation command lines share: one-line errors and their exit codes.

Exit codes: 2 for usage and input errors (a flag value, a path that does not exist, an output directory
that is not empty, a tokenizer that is not the model's, data that does not fit the model), 1 for damaged
or unreadable files (a truncated weight file, an incomplete checkpoint). Either way one line on stderr
naming the value, no traceback, and nothing on disk changed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

USAGE, DAMAGED = 2, 1


class UsageError(ValueError):
    """A command-line value that cannot work; the message names it and the fix (exit code 2)."""


class ExportError(UsageError):
    """An export that would lose or mix files (non-empty output without overwrite); names the path."""


def check_output_dir(out_dir: str | Path, *, overwrite: bool) -> Path:
    """``out_dir`` as a Path when it may be written: absent, empty, or ``overwrite`` (then it is replaced
    as a whole once the new output is complete). Refuses a file or a non-empty directory otherwise.
    Imports nothing heavy, so a command line can check before it loads torch."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a directory; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"--out {out} is not empty; pass --overwrite to replace its contents, or choose a new directory"
        )
    return out


def fail(prog: str, message: object, code: int) -> NoReturn:
    """Print ``prog: error: message`` (one line) and exit with ``code``."""
    text = " ".join(str(message).split())
    print(f"{prog}: error: {text}", file=sys.stderr)
    raise SystemExit(code)
