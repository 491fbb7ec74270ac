"""Backbone weights on the command line (issue 11.3): pretrained by default, random only when asked,
and every later command rebuilds what the family recorded, without flags. Training a domain the family
has needs --overwrite or --resume."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import timm
import torch
from cli_support import TRAIN, digest, image_folder, table
from huggingface_hub import HfApi
from timm.models import save_for_hf
from train_support import fresh_accelerate_state  # noqa: F401  (autouse fixture)

from adapterkit.cli import main


def recorded(family) -> dict:
    return json.loads((family / "adapterkit.json").read_text())["backbone"]["weights"]


def test_pretrained_weights_by_default(registry, tmp_path, capsys):
    """A timm backbone published on the registry (hf-hub:): `train` downloads its weights unasked."""
    repo = f"alice/backbone-{uuid.uuid4().hex[:8]}"
    save_for_hf(timm.create_model("test_resnet"), tmp_path / "timm", safe_serialization=True)
    api = HfApi(token=registry.tokens["alice"])
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=tmp_path / "timm")
    data, family = image_folder(tmp_path / "data"), tmp_path / "fam"
    args = ["--family", str(family), "--domain", "pets", "--data", str(data), "--steps", "1", *TRAIN]
    assert main(["train", *args, "--backbone", f"hf-hub:{repo}"]) == 0
    assert "random" not in capsys.readouterr().err
    assert recorded(family)["kind"] == "hf-hub"
    assert main(["eval", "--family", str(family), "--data", str(data), "--no-progress"]) == 0
    assert table(capsys.readouterr().out)[1][0] == "pets"
    assert main(["info", str(family)]) == 0
    assert "hf-hub pretrained" in capsys.readouterr().out


def test_random_init_warns_and_is_rebuilt(tmp_path, capsys):
    data, family = image_folder(tmp_path / "data"), tmp_path / "fam"
    args = ["--family", str(family), "--data", str(data), "--steps", "1", *TRAIN]
    both = ["--backbone", "test_resnet", "--random-init", "--pretrained", str(tmp_path / "w.safetensors")]
    assert main(["train", *args, "--domain", "a", *both]) == 2
    assert "--random-init and --pretrained" in capsys.readouterr().err
    assert main(["train", *args, "--domain", "a", "--backbone", "test_resnet", "--random-init"]) == 0
    assert "warning: test_resnet starts from random weights (--random-init)" in capsys.readouterr().err
    assert recorded(family) == {"kind": "random", "seed": 0}
    assert main(["train", *args, "--domain", "b"]) == 0  # the same backbone, rebuilt: no flags
    out = tmp_path / "exported"
    assert main(["export", "--family", str(family), "--domain", "a", "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


def test_a_backbone_without_downloadable_weights_says_to_pass_them(tmp_path, capsys):
    data, family = image_folder(tmp_path / "data"), tmp_path / "fam"
    args = ["train", "--family", str(family), "--domain", "a", "--data", str(data), "--steps", "1", *TRAIN]
    assert main([*args, "--backbone", "cifar_resnet20"]) == 2  # timm has no source for its weights
    err = capsys.readouterr().err
    assert (
        "'cifar_resnet20' has no weights timm can download" in err and "--pretrained FILE.safetensors" in err
    )
    assert "cannot reach" not in err and not family.exists()
    assert main([*args, "--backbone", "cifar_resnet20", "--random-init"]) == 0
    out = tmp_path / "exported"
    assert main(["export", "--family", str(family), "--domain", "a", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.strip().partition(": ")[2]  # what to run to load it, in a fresh Python
    code = f"import timm; {printed}"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_an_existing_domain_needs_overwrite_or_resume(tmp_path, capsys):
    data, family = image_folder(tmp_path / "data"), tmp_path / "fam"
    args = ["train", "--family", str(family), "--domain", "pets", "--data", str(data), "--steps", "1", *TRAIN]
    assert main([*args, "--backbone", "test_resnet", "--random-init"]) == 0
    pets = family / "domains" / "pets.safetensors"
    first = digest(pets)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already has domain 'pets'" in err and "--overwrite" in err and "--resume" in err
    assert digest(pets) == first
    assert main([*args, "--overwrite", "--resume"]) == 2
    assert main([*args, "--resume", "--lr", "0.5"]) == 0  # continues from the saved tensors
    resumed = digest(pets)
    assert resumed != first
    assert main([*args, "--overwrite"]) == 0  # a fresh domain, seeded: the first training again
    assert digest(pets) == first
    threads = torch.get_num_threads()
    assert main([*args, "--resume", "--threads", str(threads + 1)]) == 0
    assert torch.get_num_threads() == threads  # --threads holds for the command only


def test_a_weights_file_that_is_not_safetensors_is_refused_by_name(tmp_path, capsys):
    """timm reads any other file with torch.load (unpickling it); a stray file failed with a bare
    `KeyError: 101` ("adapterkit train: error: 101"), a missing --backbone-weights with "[Errno 2] ..."."""
    from adapterkit import AdapterModel
    from adapterkit.inject import create_backbone

    pth = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), pth)
    broken = tmp_path / "w.safetensors"
    broken.write_bytes(b"hello")
    with pytest.raises(ValueError, match=r"w.pth is not a .safetensors file.*never pickle.*save_file"):
        create_backbone("test_resnet", pth)
    with pytest.raises(ValueError, match="w.safetensors is not a readable safetensors file"):
        AdapterModel.from_backbone("test_resnet", pretrained=broken)
    data, family = image_folder(tmp_path / "data"), tmp_path / "family"
    args = ["--family", str(family), "--domain", "pets", "--data", str(data), "--steps", "1", *TRAIN]
    assert main(["train", *args, "--backbone", "test_resnet", "--pretrained", str(pth)]) == 2
    assert f"backbone weights file {pth} is not a .safetensors file" in capsys.readouterr().err
    assert not family.exists()
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("pets", labels=["a", "b"])
    model.save_pretrained(family)
    evaluate = ["eval", "--family", str(family), "--data", f"pets={data}", "--no-progress"]
    assert main([*evaluate, "--backbone-weights", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"backbone weights file {broken} is not a readable safetensors file" in err and "online" not in err
    assert main([*evaluate, "--backbone-weights", str(tmp_path / "moved.safetensors")]) == 2
    assert "moved.safetensors does not exist; pass a .safetensors path" in capsys.readouterr().err
