"""Commands that need no model start without torch, timm or torchvision (a fresh interpreter each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from cli_support import ROOT

from adapterkit import AdapterModel
from adapterkit.family import save_family

HEAVY = ("torch", "timm", "torchvision")
PROBE = f"""
import json, sys
from adapterkit.cli import main
code = main(sys.argv[1:])
print(json.dumps({{"code": code, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""


def probe(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.stdout.strip(), out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def published(registry, tmp_path_factory):
    """A family folder and the repo it was pushed to (alice's)."""
    folder = tmp_path_factory.mktemp("imports") / "fam"
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("a", num_classes=3)
    save_family(model, folder)
    repo = f"alice/imports-{uuid.uuid4().hex[:8]}"
    model.push_to_hub(repo, token=registry.tokens["alice"])
    return folder, repo


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["push", "--help"]])
def test_help_and_version_need_no_model(args):
    assert probe(*args) == {"code": 0, "heavy": []}


def test_info_and_list_need_no_model(published):
    folder, repo = published
    assert probe("info", str(folder)) == {"code": 0, "heavy": []}
    assert probe("info", repo) == {"code": 0, "heavy": []}
    assert probe("list", "--author", "alice") == {"code": 0, "heavy": []}


def test_pull_needs_no_model(published, tmp_path):
    _, repo = published
    assert probe("pull", repo, str(tmp_path / "pulled")) == {"code": 0, "heavy": []}


def test_push_of_a_folder_needs_no_model(published, registry):
    folder, _ = published
    repo = f"alice/imports-{uuid.uuid4().hex[:8]}"
    assert probe("push", str(folder), repo, "--token", registry.tokens["alice"]) == {"code": 0, "heavy": []}
