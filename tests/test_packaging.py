"""The wheel a user installs (`pip install adapterkit`, not an editable checkout) holds every file the code reads."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_package_data_and_builds_without_warnings(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    # setuptools' deprecations turn into build failures on their stated date
    assert "deprecated" not in run.stderr.lower(), run.stderr
    from adapterkit import __version__

    (wheel,) = tmp_path.glob(f"adapterkit-{__version__}-*.whl")  # the version is written once, in the package
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {
        f"adapterkit_registry/templates/{p.name}" for p in (ROOT / "registry/templates").glob("*.html")
    }
    assert templates and templates <= names, sorted(templates - names)
    assert "adapterkit/py.typed" in names
    sources = {
        f"adapterkit/{p.relative_to(ROOT / 'adapterkit')}" for p in (ROOT / "adapterkit").rglob("*.py")
    }
    sources |= {f"adapterkit_registry/{p.name}" for p in (ROOT / "registry").glob("*.py")}
    assert sources <= names, sorted(sources - names)[:5]
