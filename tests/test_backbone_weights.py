"""A backbone's pretrained weights are read as safetensors only, never unpickled.

timm picks the weights source of `pretrained=True` itself and reads several of them with `torch.load`:
a Hub repo without `model.safetensors` (`pytorch_model.bin`), a `local-dir:` folder without one, a
pretrained config's URL. adapterkit resolves the source first and refuses a pickle before reading it.
The pickles here are real malicious payloads (unpickling one would create `marker`), served by the
registry to the real huggingface_hub client over HTTP on loopback.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import timm
import torch
from cli_support import TRAIN, image_folder
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
from timm.models import save_for_hf
from train_support import fresh_accelerate_state  # noqa: F401  (autouse fixture)

from adapterkit import AdapterModel
from adapterkit.cli import main
from adapterkit.inject import create_backbone, fingerprint

REFUSED = r"has no safetensors weights: .*never pickle.*safetensors\.torch\.save_file"
PICKLE = r"never pickle.*safetensors\.torch\.save_file"


class Payload:
    """Unpickling it opens (creates) the marker file: what a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def timm_folder(folder: Path, safetensors: bool = True, seed: int = 0) -> tuple[Path, str]:
    """`save_for_hf`'s folder of a seeded `test_resnet` (config.json + model.safetensors); without
    `safetensors`, a malicious `pytorch_model.bin` instead. Returns the folder and the weights' fingerprint."""
    torch.manual_seed(seed)
    backbone = timm.create_model("test_resnet").eval()
    save_for_hf(backbone, folder, safe_serialization=True)
    if not safetensors:
        (folder / "model.safetensors").unlink()
        torch.save(Payload(folder.parent / "marker"), folder / "pytorch_model.bin")
    return folder, fingerprint(backbone)


def hub_repo(registry, folder: Path) -> str:
    repo = f"alice/backbone-{uuid.uuid4().hex[:8]}"
    api = HfApi(token=registry.tokens["alice"])
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=folder)
    return repo


def test_an_hf_hub_backbone_loads_from_its_safetensors(registry, tmp_path):
    folder, expected = timm_folder(tmp_path / "timm")
    repo = hub_repo(registry, folder)
    assert fingerprint(create_backbone(f"hf-hub:{repo}", True)) == expected
    family = AdapterModel.from_backbone(f"hf-hub:{repo}", pretrained=True)
    assert family.backbone_weights["kind"] == "hf-hub"
    other, theirs = timm_folder(tmp_path / "other", seed=1)  # a weights file given wins over the repo's
    assert fingerprint(create_backbone(f"hf-hub:{repo}", other / "model.safetensors")) == theirs


def test_an_hf_hub_repo_with_only_a_pickle_is_refused_before_reading_it(registry, tmp_path):
    """Before: timm fell back to `pytorch_model.bin` and read it with `torch.load`."""
    folder, _ = timm_folder(tmp_path / "timm", safetensors=False)
    repo = hub_repo(registry, folder)
    refused = rf"the Hub repo {repo} has no model\.safetensors \(timm would fall back to pytorch_model\.bin"
    with pytest.raises(ValueError, match=rf"{refused}.*{PICKLE}"):
        create_backbone(f"hf-hub:{repo}", True)
    with pytest.raises(ValueError, match=REFUSED):
        AdapterModel.from_backbone(f"hf-hub:{repo}", pretrained=True)
    with pytest.raises(ValueError, match=REFUSED):  # a timm name whose config names the repo
        create_backbone("test_resnet", True, pretrained_cfg_overlay={"hf_hub_id": repo})
    assert not (tmp_path / "marker").exists()


def test_an_hf_hub_revision_is_the_one_read(registry, tmp_path):
    """`hf-hub:org/name@rev` reads that commit's safetensors; main, which has only a pickle, is refused."""
    folder, expected = timm_folder(tmp_path / "timm")
    repo = hub_repo(registry, folder)
    api = HfApi(token=registry.tokens["alice"])
    first = api.model_info(repo).sha
    torch.save(Payload(tmp_path / "marker"), tmp_path / "pytorch_model.bin")
    operations = [
        CommitOperationDelete("model.safetensors"),
        CommitOperationAdd("pytorch_model.bin", tmp_path / "pytorch_model.bin"),
    ]
    api.create_commit(repo, operations, commit_message="weights as a pickle")
    assert fingerprint(create_backbone(f"hf-hub:{repo}@{first}", True)) == expected
    with pytest.raises(ValueError, match=REFUSED):
        create_backbone(f"hf-hub:{repo}", True)
    assert not (tmp_path / "marker").exists()


def test_a_family_on_an_hf_hub_backbone_loads_again(registry, tmp_path, monkeypatch):
    """Online, and offline from the cache (as the command line does when the Hub cannot be reached)."""
    folder, _ = timm_folder(tmp_path / "timm")
    repo = hub_repo(registry, folder)
    model = AdapterModel.from_backbone(f"hf-hub:{repo}", pretrained=True).eval()
    model.add_domain("pets", num_classes=3)
    model.save_pretrained(tmp_path / "family")
    again = AdapterModel.from_pretrained(tmp_path / "family").eval()
    assert again.backbone_weights == model.backbone_weights
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x, domain="pets"), model(x, domain="pets"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cached = AdapterModel.from_pretrained(tmp_path / "family").eval()
    with torch.no_grad():
        assert torch.equal(cached(x, domain="pets"), model(x, domain="pets"))


def test_a_local_dir_backbone_reads_only_safetensors(tmp_path):
    folder, expected = timm_folder(tmp_path / "safe")
    assert fingerprint(create_backbone(f"local-dir:{folder}", True)) == expected
    pickled, _ = timm_folder(tmp_path / "pickled" / "timm", safetensors=False)
    with pytest.raises(
        ValueError, match=rf"{pickled} has no model\.safetensors \(it holds pytorch_model\.bin.*{PICKLE}"
    ):
        create_backbone(f"local-dir:{pickled}", True)
    assert not (tmp_path / "pickled" / "marker").exists()


def test_a_weights_url_is_refused_before_downloading_it(tmp_path):
    """A pretrained config's URL (not the Hub) is a pickle timm reads with torch.hub."""
    url = "http://127.0.0.1:9/test_resnet.pth"
    with pytest.raises(ValueError, match=rf"would download them from {url}.*{PICKLE}"):
        create_backbone("test_resnet", True, pretrained_cfg_overlay={"hf_hub_id": None, "url": url})


def test_the_command_line_says_how_to_convert_a_pickled_backbone(registry, tmp_path, capsys):
    folder, _ = timm_folder(tmp_path / "timm", safetensors=False)
    repo = hub_repo(registry, folder)
    data, family = image_folder(tmp_path / "data"), tmp_path / "fam"
    args = ["--family", str(family), "--domain", "pets", "--data", str(data), "--steps", "1", *TRAIN]
    assert main(["train", *args, "--backbone", f"hf-hub:{repo}"]) == 2
    err = capsys.readouterr().err
    assert "has no safetensors weights" in err and "--pretrained PATH" in err and "go online" not in err
    assert not family.exists() and not (tmp_path / "marker").exists()
