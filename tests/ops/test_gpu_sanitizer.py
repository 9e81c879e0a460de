"""compute-sanitizer over every op on every kernel backend (see sanitize_ops.py): memcheck on all of
it, racecheck (shared-memory hazards) on a quick subset. Excluded from scripts/device_check.sh's
pytest run (``-k "not sanitizer"``), which runs the same script under the sanitizer beside it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

SCRIPT = Path(__file__).with_name("sanitize_ops.py")


def run_sanitizer(tool: str, *script_args: str) -> subprocess.CompletedProcess:
    path = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(path).exists():
        pytest.skip("compute-sanitizer not installed")
    return subprocess.run([path, "--tool", tool, "--error-exitcode", "3", sys.executable, str(SCRIPT), *script_args],
                          capture_output=True, text=True, timeout=900)


def test_sanitizer_memcheck_runs_clean_on_every_backend():
    """memcheck over every op, with out-of-range ids, slots and lengths."""
    result = run_sanitizer("memcheck")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in result.stdout


def test_sanitizer_racecheck_runs_clean_on_a_subset():
    result = run_sanitizer("racecheck", "--quick")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in result.stdout
