"""Third-party tools against the registry: the `hf` CLI and timm's own Hub functions."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi


def _hf_cli() -> list[str]:
    beside = Path(sys.executable).with_name("hf")  # the venv's own, when it is not on PATH
    exe = str(beside) if beside.exists() else shutil.which("hf")
    if exe is None:
        pytest.skip("the `hf` CLI is not installed")
    return [exe]


def test_hf_cli_upload_and_download(registry, tmp_path):
    repo_id = f"alice/cli-{uuid.uuid4().hex[:8]}"
    src = tmp_path / "src"
    (src / "domains").mkdir(parents=True)
    files = {"adapterkit.json": b'{"domains": {}}', "domains/a.safetensors": os.urandom(4096)}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    env = {**os.environ, "HF_TOKEN": registry.tokens["alice"], "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_HUB_DISABLE_XET", None)

    def run(*args: str) -> str:
        proc = subprocess.run([*_hf_cli(), *args], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    run("upload", repo_id, str(src), ".", "--commit-message", "from the CLI")
    assert HfApi(endpoint=registry.url).list_repo_commits(repo_id)[0].title == "from the CLI"
    run("download", repo_id, "--local-dir", str(tmp_path / "dst"))
    for rel, data in files.items():
        assert (tmp_path / "dst" / rel).read_bytes() == data
    run("upload", repo_id, str(src / "adapterkit.json"), "renamed.json")
    run("download", repo_id, "renamed.json", "--local-dir", str(tmp_path / "one"))
    assert (tmp_path / "one" / "renamed.json").read_bytes() == files["adapterkit.json"]


def test_timm_push_to_hf_hub_and_create_model(registry):
    timm = pytest.importorskip("timm")
    from timm.models import push_to_hf_hub

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False).eval()
    name = f"tiny-timm-{uuid.uuid4().hex[:6]}"
    push_to_hf_hub(model, name, token=registry.tokens["alice"])  # namespace comes from the server
    loaded = timm.create_model(f"hf-hub:alice/{name}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert "timm" in HfApi(endpoint=registry.url).model_info(f"alice/{name}").tags


def test_module_entry_point_and_token_cli(tmp_path):
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "adapterkit_registry"]
    token = subprocess.run(
        [*cmd, "token", "create", "--root", str(root), "--user", "dave", "--scope", "read"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert token.startswith("akr_") and token.encode() not in (root / "tokens.db").read_bytes()
    listing = subprocess.run(
        [*cmd, "token", "list", "--root", str(root)], capture_output=True, text=True, check=True
    )
    assert "dave" in listing.stdout and "read" in listing.stdout
    bad = subprocess.run(
        [*cmd, "token", "create", "--root", str(root), "--user", "../x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: Invalid") and "Traceback" not in bad.stderr
    fsck = subprocess.run([*cmd, "fsck", "--root", str(root)], capture_output=True, text=True)
    assert fsck.returncode == 0 and "ok" in fsck.stdout


def test_registry_cli_refusals_are_one_line(tmp_path):
    from adapterkit_registry.cli import main

    with socket.socket() as holder:  # a taken port: refused before the root is created
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--root", str(tmp_path / "new"), "--port", str(port)]) == 2
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as out_of_range:
        main(["serve", "--root", str(tmp_path / "new"), "--port", "99999"])
    assert out_of_range.value.code == 2
    assert main(["token", "revoke", "--root", str(tmp_path / "new"), "--id", "x"]) == 2  # no root
    with pytest.raises(Exception, match="not a registry root"):  # --verbose before or after the command
        main(["--verbose", "fsck", "--root", str(tmp_path / "nope")])
    with pytest.raises(Exception, match="not a registry root"):
        main(["fsck", "--root", str(tmp_path / "nope"), "--verbose"])
    assert main(["fsck", "--root", str(tmp_path / "nope")]) == 2
