"""Every ```python and ```bash block of README.md and docs/*.md runs, as written, and succeeds.

Each Markdown file is one bash session: its blocks run in order in one working folder, so a later block
may use what an earlier one built (a folder, a variable, a server started with `&`); consecutive Python
blocks run as one program and share a namespace. The folder holds what
the docs assume a user has: `gtsrb_images/` and `mnist_images/` (small class-folder splits of the real
data in ../shared/data, which `../shared` points at), and the environment points the Hub client at the
test registry with alice's token (`HF_ENDPOINT`, `HF_TOKEN`).

Two commands are not run here because CI runs them before this test and a test cannot run itself:
`pip install ...` and `python -m pytest -q`; the test checks that `.ci/run` runs exactly those. A command
that ends with `&` is a server: it runs in the background until the block ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
RUN_BY_CI = ("pip install", "python -m pytest -q")


def blocks(path: Path) -> list[tuple[str, str, int]]:
    text = path.read_text()
    return [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1) for m in BLOCK.finditer(text)]


def runnable(command: str) -> bool:
    return not command.strip().startswith(RUN_BY_CI)


def shell_script(code: str) -> str:
    """The block with CI's own commands left out (`a && b`: only the parts that are not)."""
    lines = []
    for line in code.splitlines():
        body = line.partition("  #")[0]
        parts = body.split("&&")
        if all(runnable(p) for p in parts):
            lines.append(line)  # verbatim: heredocs keep their indentation
        else:
            lines.append(" && ".join(p.strip() for p in parts if runnable(p)))
    return "\n".join(lines)


def test_commands_left_out_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]"' in ci and "python -m pytest -q" in ci
    readme = dict((c, n) for _, c, n in blocks(ROOT / "README.md"))
    assert any('pip install -e ".[test]" && python -m pytest -q' in c for c in readme)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, registry):
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not here; the docs' examples use its real data and weights")
    root = tmp_path_factory.mktemp("docs-data")
    # the command the README gives for them, with its defaults
    script = [sys.executable, str(ROOT / "examples" / "image_folders.py"), "--out", str(root)]
    subprocess.run(script, check=True, capture_output=True, timeout=300)
    env = {
        **os.environ,
        "HF_TOKEN": registry.tokens["alice"],
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    return root, env


def session_folder(data: Path, name: str) -> Path:
    """A fresh working folder for one file: `../shared`, `examples/` and the image folders beside it, as
    from the repository root; what one file writes never meets another's."""
    top = data.parent / f"doc-{name}"
    (top / "work").mkdir(parents=True)
    (top / "shared").symlink_to(SHARED)
    (top / "work" / "examples").symlink_to(ROOT / "examples")
    for folder in ("gtsrb_images", "mnist_images"):
        (top / "work" / folder).symlink_to(data / folder)
    return top / "work"


def doc_script(path: Path) -> str:
    """The whole file as one bash session (its variables, folders and background servers carry from block
    to block); consecutive Python blocks run as one Python program, so they share a namespace."""
    parts, python = [], []
    for lang, code, line in blocks(path) + [("end", "", 0)]:
        if lang == "python":
            python.append(f"# --- {path.name}:{line}\n{code}")
            continue
        if python:
            parts.append(f"python - <<'ADAPTERKIT_DOC_PY'\n{''.join(python)}ADAPTERKIT_DOC_PY")
            python = []
        if lang == "bash":
            parts.append(f"echo '### {path.name}:{line}' >&2\n{shell_script(code)}")
    return "set -euo pipefail\n" + "\n".join(parts) + "\n"


def run_file(path: Path, cwd: Path, env: dict[str, str]) -> None:
    script = doc_script(path)
    with tempfile.TemporaryFile("w+") as out:  # a file, not a pipe: a server left running keeps a pipe open
        bash = subprocess.Popen(
            ["bash", "-c", script],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # servers started with `&` share its process group, ended below
        )
        try:
            bash.wait(timeout=900)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(bash.pid, signal.SIGTERM)
        out.seek(0)
        log = out.read()
    assert bash.returncode == 0, f"{path.name} failed (the last '###' line names the block):\n{log[-5000:]}"


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d)], ids=lambda d: d.name)
def test_doc_blocks_run(doc, workspace):
    data, env = workspace
    run_file(doc, session_folder(data, doc.stem), env)
