"""The install and CLI promises of the foundation: clear failures on bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = sorted([ROOT / "pretrain_ssa.py", *(ROOT / "tools").glob("*.py")])


def test_setup_refuses_old_python_with_a_clear_message() -> None:
    code = (
        "import sys; sys.version_info = (3, 9, 18, 'final', 0); sys.argv = ['setup.py', '--version'];"
        f"exec(compile(open({str(ROOT / 'setup.py')!r}).read(), 'setup.py', 'exec'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "needs Python >= 3.10" in proc.stderr and "3.9" in proc.stderr


@pytest.mark.parametrize("cli", CLIS, ids=lambda p: p.name)
def test_cli_rejects_unknown_flags(cli: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(cli), "--definitely-not-a-flag"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert "unrecognized arguments: --definitely-not-a-flag" in proc.stderr, proc.stderr
