"""The GPU session's preparation, checked without a GPU: benchmarks/gpu_session.sh's code imports with only
the lent image's packages and the wheels benchmarks/gpu_wheels.sh carries (benchmarks/gpu_imports.py),
and the check names a wheel left out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_imports.py"


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_the_gpu_sessions_code_imports_with_the_images_packages_and_the_carried_wheels():
    done = check()
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_wheel_left_out_is_named_with_the_module_that_needs_it():
    done = check("--without", "swagger-ui-bundle")
    assert done.returncode == 1
    assert "adapterkit.serve_routes imports swagger_ui_bundle" in done.stdout
    assert "benchmarks/gpu_wheels.sh" in done.stdout
