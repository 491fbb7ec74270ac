"""Expected failures: exit code 2, at most two lines on stderr, naming the problem and the fix.

Real processes against the registry fixture over real HTTP (and a port where nothing listens)."""

from __future__ import annotations

import socket
import uuid

import pytest
from cli_support import TRAIN, cli, image_folder

from adapterkit import AdapterModel
from adapterkit.family import save_family


def fails(*args: str, **env: str) -> str:
    """stderr of a command that must fail as expected: exit 2, one or two lines."""
    result = cli(*args, **env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert 1 <= len(lines) <= 2, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    folder = tmp_path_factory.mktemp("errors") / "fam"
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("a", num_classes=3)
    save_family(model, folder)
    return folder


@pytest.fixture(scope="module")
def dead_endpoint() -> str:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_push_without_a_token(registry, family):
    err = fails("push", str(family), f"alice/e-{uuid.uuid4().hex[:8]}")
    assert "token" in err and "--token" in err and "HF_TOKEN" in err


def test_push_into_another_users_namespace(registry, family):
    err = fails("push", str(family), "alice/theirs", "--token", registry.tokens["bob"])
    assert "'bob'" in err and "namespace 'alice'" in err and "bob/theirs" in err


def test_push_with_a_read_only_token(registry, family):
    err = fails("push", str(family), "alice/ro", "--token", registry.tokens["read"])
    assert "read-only" in err and "write token" in err


@pytest.mark.parametrize(
    "args",
    [
        ["info", "alice/fam"],
        ["pull", "alice/fam", "out"],
        ["list"],
        ["push", "FAMILY", "alice/fam", "--token", "t"],
    ],
    ids=["info", "pull", "list", "push"],
)
def test_registry_down_fails_at_once_naming_hf_endpoint(args, family, dead_endpoint, tmp_path):
    args = [str(family) if a == "FAMILY" else str(tmp_path / a) if a == "out" else a for a in args]
    err = fails(*args, HF_ENDPOINT=dead_endpoint)  # two lines at most: no retry was logged
    assert f"cannot reach {dead_endpoint}" in err and "HF_ENDPOINT" in err


def test_registry_down_while_creating_a_family(dead_endpoint, tmp_path):
    data = image_folder(tmp_path / "data")
    args = [
        "--family",
        str(tmp_path / "fam"),
        "--domain",
        "d",
        "--data",
        str(data),
        "--backbone",
        "test_resnet",
    ]
    warning, error = fails("train", *args, *TRAIN, HF_ENDPOINT=dead_endpoint).strip().splitlines()
    assert f"cannot reach {dead_endpoint}: using cached weights only" in warning
    assert "no pretrained weights for backbone 'test_resnet'" in error and "--random-init" in error


def test_no_pretrained_weights_offline(tmp_path):
    data = image_folder(tmp_path / "data")
    args = [
        "--family",
        str(tmp_path / "fam"),
        "--domain",
        "d",
        "--data",
        str(data),
        "--backbone",
        "test_resnet",
    ]
    err = fails("train", *args, *TRAIN, HF_HUB_OFFLINE="1")
    assert "no pretrained weights for backbone 'test_resnet'" in err
    assert "--pretrained FILE.safetensors" in err and "--random-init" in err
    assert not (tmp_path / "fam").exists()


def test_unknown_domain(registry, family, tmp_path):
    err = fails("eval", "--family", str(family), "--data", f"nope={tmp_path}")
    assert "no domain 'nope'" in err and "it has: a" in err
    err = fails("export", "--family", str(family), "--domain", "nope", "--output", str(tmp_path / "x"))
    assert "no domain 'nope'" in err
    repo = f"alice/e-{uuid.uuid4().hex[:8]}"
    assert cli("push", str(family), repo, "--token", registry.tokens["alice"]).returncode == 0
    err = fails("pull", repo, str(tmp_path / "pulled"), "--domain", "nope")
    assert "nope" in err and "it has: a" in err and "--domain" in err


def test_not_a_family_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    err = fails("eval", "--family", str(tmp_path / "empty"), "--data", str(tmp_path))
    assert "is not an adapterkit family" in err and "adapterkit pull" in err and "--backbone" in err
    err = fails("push", str(tmp_path / "empty"), "alice/x", "--token", "t")
    assert "is not an adapterkit family" in err
    err = fails("info", str(tmp_path / "empty"))
    assert "adapterkit family" in err


def test_existing_family_refuses_backbone_flags(family, tmp_path):
    data = image_folder(tmp_path / "data")
    args = ["train", "--family", str(family), "--domain", "b", "--data", str(data), *TRAIN]
    assert "drop --random-init" in fails(*args, "--random-init")
    assert "drop --backbone" in fails(*args, "--backbone", "resnet18")
    assert "pass --backbone NAME" in fails(
        "train", "--family", str(tmp_path / "new"), "--domain", "b", "--data", str(data)
    )


def test_bad_learning_rate_factors(family, tmp_path):
    data = image_folder(tmp_path / "data")
    args = ["train", "--family", str(family), "--domain", "b", "--data", str(data), *TRAIN]
    assert "--adapter-lr-scale 'fast' is not a number" in fails(*args, "--adapter-lr-scale", "fast")
    assert "--head-lr-scale=-1.0 must be a positive number" in fails(*args, "--head-lr-scale", "-1")


def test_flag_errors_are_one_line_and_write_nothing(tmp_path):
    data = image_folder(tmp_path / "data")
    args = ["train", "--family", str(tmp_path / "new"), "--domain", "a", "--data", str(data), *TRAIN]
    missing = fails(*args, "--backbone", "test_resnet", "--pretrained", "nope.safetensors")
    assert "--pretrained nope.safetensors: no such file" in missing
    assert "--weight-decay 'x' is not a number" in fails(
        *args, "--backbone", "test_resnet", "--weight-decay", "x"
    )
    assert cli(*args, "--backbone", "test_resnet", "--steps", "0").returncode == 2  # (typer's range check)
    assert not (tmp_path / "new").exists()


def test_verbose_shows_the_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    quiet = cli("info", str(tmp_path / "empty"))
    loud = cli("--verbose", "info", str(tmp_path / "empty"))
    assert quiet.returncode == loud.returncode == 2
    assert "Traceback" not in quiet.stderr and "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()
    after = cli("info", str(tmp_path / "empty"), "--verbose")  # also after the command, as errors suggest
    assert after.returncode == 2 and "Traceback (most recent call last)" in after.stderr
