"""`adapterkit push / pull / list / info` against the registry (real client, real HTTP)."""

import json
import subprocess
import sys
import uuid

import pytest
import timm
import torch
from checks import input_for, perturb
from cli_support import table
from PIL import Image

from adapterkit import AdapterModel
from adapterkit.cli import main
from adapterkit.family import save_family


@pytest.fixture
def family_dir(tmp_path):
    model = AdapterModel.from_backbone("test_resnet").eval()  # random weights, seed 0 (recorded)
    for i, name in enumerate(["a", "b"]):
        model.add_domain(name, num_classes=3 + i)
        model.domain_info(name).metrics["accuracy"] = 0.9 - i / 10
        perturb(model, name, seed=i)
    save_family(model, tmp_path / "fam")
    return model, tmp_path / "fam"


def test_push_info_list_pull(registry, family_dir, tmp_path, capsys, caplog):
    model, fam = family_dir
    repo = f"alice/cli-{uuid.uuid4().hex[:8]}"
    token = registry.tokens["alice"]
    assert main(["push", str(fam), repo, "--token", token]) == 0
    assert f"to {repo}:" in capsys.readouterr().out
    assert main(["push", str(fam), repo, "--token", token]) == 0
    out, err = capsys.readouterr()
    assert f"nothing to push: {repo} already holds a, b as they are here" in out
    assert "No files have been modified" not in out + err + caplog.text  # said once, by adapterkit
    assert main(["info", repo, "--token", token]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert rows[0][:2] == ["domain", "classes"] and "accuracy" in rows[0]
    assert [row[:2] for row in rows[1:]] == [["a", "3"], ["b", "4"]]
    assert main(["list", "--domain", "b", "--token", token]) == 0
    listed = {row[0]: row for row in table(capsys.readouterr().out)[1:]}
    assert listed[repo][1:] == [model.backbone_name, "a, b"]  # (its backbone: a bare timm name)
    assert main(["pull", repo, str(tmp_path / "pulled"), "--domain", "b", "--token", token]) == 0
    files = sorted(p.name for p in (tmp_path / "pulled" / "domains").iterdir())
    assert [f for f in files if f.endswith(".safetensors")] == ["b.safetensors"]
    pulled = AdapterModel.from_pretrained(tmp_path / "pulled").eval()  # rebuilds the recorded backbone
    x = input_for(model.backbone)
    with torch.no_grad():
        assert torch.equal(pulled(x, domain="b"), model(x, domain="b"))
    # a deployment pipeline exports straight from the registry, pinned to a revision
    out = tmp_path / "exported"
    assert main(["export", "--family", f"{repo}@main", "--domain", "a", "--output", str(out)]) == 0
    assert f"exported 'a' to {out}" in capsys.readouterr().out
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(exported(x), model(x, domain="a"))
    # eval reads a family straight from the registry too, at a revision
    data = tmp_path / "data"
    for c in ("k0", "k1", "k2"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            torch.manual_seed(i)
            Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(data / c / f"{i}.png")
    result = tmp_path / "r.json"
    args = [
        "eval",
        "--family",
        f"{repo}@main",
        "--data",
        f"a={data}",
        "--output",
        str(result),
        "--no-progress",
    ]
    assert main(args) == 0
    record = json.loads(result.read_text())["families"][0]
    assert (
        record["family"] == repo and len(record["revision"]) == 40 and record["domains"]["a"]["images"] == 6
    )
    missing = f"alice/no-such-{uuid.uuid4().hex[:8]}"
    assert main(["export", "--family", missing, "--domain", "a", "--output", str(out)]) == 2
    assert f"repo '{missing}' not found" in capsys.readouterr().err


def test_push_prints_the_namespace_it_created(registry, family_dir, capsys):
    _, fam = family_dir
    name = f"bare-{uuid.uuid4().hex[:8]}"
    assert main(["push", str(fam), name, "--domain", "a", "--token", registry.tokens["bob"]]) == 0
    assert f"pushed a to bob/{name}:" in capsys.readouterr().out
    assert main(["info", f"bob/{name}"]) == 0
    assert [row[0] for row in table(capsys.readouterr().out)[1:]] == ["a"]


def test_errors_are_one_line(registry, capsys, tmp_path):
    assert main(["info", "alice/does-not-exist", "--token", registry.tokens["alice"]]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["pull", "alice/does-not-exist", str(tmp_path / "x")]) == 2


def test_console_script_lists_hub_commands():
    code = "import sys; from adapterkit.cli import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("train", "eval", "export", "push", "pull", "list", "info"):
        assert command in out.stdout


def test_list_offline_and_a_missing_absolute_path_say_what_they_are(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["list"]) == 2
    assert "list searches the Hub, which HF_HUB_OFFLINE=1 turns off" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'}: no such folder; give a family folder" in err and " in /" not in err


@pytest.mark.parametrize("missing", ["fam/", "runs/2024/fam", "alice/fam/"])
def test_a_missing_folder_with_slashes_is_named_as_a_folder(missing, tmp_path, capsys, monkeypatch):
    """`fam/` (the docs' own spelling of a folder) that does not exist is a mistyped folder, not a repo id:
    before, huggingface_hub's "Repo id must use alphanumeric chars" answered it."""
    monkeypatch.chdir(tmp_path)
    expected = f"{missing}: no such folder in {tmp_path}; give a family folder, or a Hub repo id as org/name"
    (tmp_path / "img.png").write_bytes(b"")
    commands = [["info", missing], ["predict", missing, "img.png"], ["serve", missing, "--port", "0"]]
    for args in [*commands, ["eval", "--family", missing, "--data", f"d={tmp_path}"]]:
        assert main(args) == 2
        assert expected in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such folder"):
        AdapterModel.from_pretrained(missing)


def test_pull_and_info_take_a_revision_after_the_repo_id(registry, family_dir, tmp_path, capsys):
    """`org/name@rev`, as eval, export and serve take it: pull and info answered huggingface_hub's "Repo id
    must use alphanumeric chars"."""
    _, fam = family_dir
    repo = f"alice/rev-{uuid.uuid4().hex[:8]}"
    token = registry.tokens["alice"]
    assert main(["push", str(fam), repo, "--domain", "a", "--token", token]) == 0
    first = capsys.readouterr().out.strip().rsplit("/", 1)[-1]  # the commit of the push
    assert main(["push", str(fam), repo, "--token", token]) == 0  # b arrives in a later commit
    capsys.readouterr()
    assert main(["info", f"{repo}@{first}", "--token", token]) == 0
    assert [row[0] for row in table(capsys.readouterr().out)[1:]] == ["a"]
    assert main(["pull", f"{repo}@{first}", str(tmp_path / "old"), "--token", token]) == 0
    assert sorted(p.name for p in (tmp_path / "old" / "domains").glob("*.safetensors")) == ["a.safetensors"]
    assert main(["pull", f"{repo}@{first}", str(tmp_path / "x"), "--revision", "main"]) == 2
    assert "disagree" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["pull", f"{repo}@no-such-tag", str(tmp_path / "y"), "--token", token]) == 2
    assert "revision 'no-such-tag' does not exist" in capsys.readouterr().err


def test_pull_keeps_a_domain_trained_in_the_folder_unless_overwrite(registry, family_dir, tmp_path, capsys):
    """`adapterkit pull` into a folder whose domain was retrained there since the last pull refuses, names
    --overwrite, and writes nothing; with --overwrite it takes the remote's."""
    _, fam = family_dir
    repo = f"alice/keep-{uuid.uuid4().hex[:8]}"
    token = registry.tokens["alice"]
    assert main(["push", str(fam), repo, "--token", token]) == 0
    folder = tmp_path / "pulled"
    assert main(["pull", repo, str(folder), "--token", token]) == 0
    model = AdapterModel.from_pretrained(folder)
    model.set_trainable("a", True)
    perturb(model, "a", seed=9)
    model.save_pretrained(folder)
    retrained = (folder / "domains" / "a.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["pull", repo, str(folder), "--token", token]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (folder / "domains" / "a.safetensors").read_bytes() == retrained
    assert main(["pull", repo, str(folder), "--overwrite", "--token", token]) == 0
    assert (folder / "domains" / "a.safetensors").read_bytes() == (
        fam / "domains" / "a.safetensors"
    ).read_bytes()


def test_push_of_a_family_without_domains_is_refused(registry, tmp_path, capsys):
    """It used to create the repo with a family of no domains and print "pushed  to alice/...: <url>"."""
    AdapterModel.from_backbone("test_resnet").save_pretrained(tmp_path / "empty")
    repo = f"alice/empty-{uuid.uuid4().hex[:8]}"
    assert main(["push", str(tmp_path / "empty"), repo, "--token", registry.tokens["alice"]]) == 2
    err = capsys.readouterr().err
    assert "has no domains yet, so there is nothing to push: train one first" in err
    assert main(["info", repo, "--token", registry.tokens["alice"]]) == 2  # no repo was created
    assert "not found" in capsys.readouterr().err
    model = AdapterModel.from_backbone("test_resnet")
    with pytest.raises(ValueError, match="no domain to push: the model has none"):
        model.push_to_hub(repo, token=registry.tokens["alice"])
    model.add_domain("a", num_classes=2)
    with pytest.raises(ValueError, match=r"domains=\[\] selected none"):
        model.push_to_hub(repo, domains=[], token=registry.tokens["alice"])
    assert main(["info", repo, "--token", registry.tokens["alice"]]) == 2  # still no repo
