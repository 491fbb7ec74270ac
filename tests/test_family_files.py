"""The family on disk and on the Hub: format version 2 (each domain's entry beside its tensors), the
version-1 reader, the recorded backbone weights, file permissions, and pushes and pulls that can never
drop a domain (the real client over real HTTP against the registry fixture)."""

from __future__ import annotations

import copy
import json
import os
import uuid

import pytest
import torch
from checks import input_for, perturb
from huggingface_hub import HfApi
from safetensors.torch import save_file

from adapterkit import AdapterModel
from adapterkit.family import save_family
from adapterkit.format import FORMAT_VERSION, read_safetensors
from adapterkit.hub import list_domains, pull_family, push_folder
from adapterkit.inject import create_backbone


def make(names=("a", "b"), **kwargs) -> AdapterModel:
    model = AdapterModel.from_backbone("test_resnet", **kwargs)
    for i, name in enumerate(names):
        model.add_domain(name, num_classes=3 + i)
        perturb(model, name, seed=i)
    return model.eval()


def logits(model: AdapterModel, domain: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_for(model.backbone), domain=domain)


def test_version_2_layout_and_readable_files(tmp_path):
    old = os.umask(0o022)
    try:
        make().save_pretrained(tmp_path / "fam")
    finally:
        os.umask(old)
    files = sorted(p.relative_to(tmp_path / "fam").as_posix() for p in (tmp_path / "fam").rglob("*"))
    assert files == [
        "README.md",
        "adapterkit.json",
        "domains",
        "domains/a.json",
        "domains/a.safetensors",
        "domains/b.json",
        "domains/b.safetensors",
    ]
    config = json.loads((tmp_path / "fam" / "adapterkit.json").read_text())
    assert config["format_version"] == FORMAT_VERSION == 4 and "domains" not in config
    entry = json.loads((tmp_path / "fam" / "domains" / "a.json").read_text())
    assert entry["name"] == "a" and entry["num_classes"] == 3 and len(entry["sha256"]) == 64
    modes = {oct((tmp_path / "fam" / f).stat().st_mode & 0o777) for f in files if "." in f}
    assert modes == {"0o644"}  # a web server or another user can read a published family


def test_version_1_family_still_loads_and_upgrades_on_save(tmp_path):
    model = make()
    path = tmp_path / "fam"
    model.save_pretrained(path)
    config = json.loads((path / "adapterkit.json").read_text())
    table = {}
    for name in ("a", "b"):
        entry = json.loads((path / "domains" / f"{name}.json").read_text())
        table[name] = {
            k: entry[k] for k in ("file", "sha256", "num_classes", "labels", "metrics", "parameters", "bytes")
        }
        (path / "domains" / f"{name}.json").unlink()
    config |= {"format_version": 1, "domains": table}
    config["backbone"].pop("weights")
    (path / "adapterkit.json").write_text(json.dumps(config))
    # version 1 recorded no weights: the caller gives them
    loaded = AdapterModel.from_pretrained(path, backbone=create_backbone("test_resnet", False))
    assert loaded.domains == ["a", "b"]
    assert torch.equal(logits(loaded, "b"), logits(model, "b"))
    loaded.add_domain("c", num_classes=2)
    loaded.save_pretrained(path)  # upgrades: a and b get their own entries, nothing is lost
    again = AdapterModel.from_pretrained(path, backbone=create_backbone("test_resnet", False))
    assert again.domains == ["a", "b", "c"]


def test_random_backbone_is_recorded_and_rebuilt_without_arguments(tmp_path):
    model = make(seed=7)
    model.save_pretrained(tmp_path / "fam")
    assert json.loads((tmp_path / "fam" / "adapterkit.json").read_text())["backbone"]["weights"] == {
        "kind": "random",
        "seed": 7,
    }
    loaded = AdapterModel.from_pretrained(tmp_path / "fam")  # no backbone=, no force=
    assert loaded.fingerprint == model.fingerprint
    assert torch.equal(logits(loaded, "a"), logits(model, "a"))


def test_weights_file_is_recorded_and_a_moved_file_is_named(tmp_path):
    import timm

    save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "w-v1.safetensors")
    weights = tmp_path / "w.safetensors"
    weights.symlink_to(tmp_path / "w-v1.safetensors")  # recorded as given, not as the link's target
    model = make(pretrained=weights)
    model.save_pretrained(tmp_path / "fam")
    recorded = json.loads((tmp_path / "fam" / "adapterkit.json").read_text())["backbone"]["weights"]
    assert (
        recorded["kind"] == "file"
        and recorded["path"] == str(weights.absolute())
        and len(recorded["sha256"]) == 64
    )
    assert torch.equal(logits(AdapterModel.from_pretrained(tmp_path / "fam"), "a"), logits(model, "a"))
    moved = weights.rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="backbone_weights=PATH"):
        AdapterModel.from_pretrained(tmp_path / "fam")
    loaded = AdapterModel.from_pretrained(tmp_path / "fam", backbone_weights=moved)
    assert torch.equal(logits(loaded, "a"), logits(model, "a"))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_pull_merges_into_a_folder_and_keeps_its_domains(registry, tmp_path):
    token = registry.tokens["alice"]
    model = make(("gtsrb", "mnist"))
    repo = f"alice/{unique('merge')}"
    model.push_to_hub(repo, domains=["mnist"], token=token)
    save_family(model, tmp_path / "local", domains=["gtsrb"])
    assert pull_family(repo, tmp_path / "local", domains=["mnist"], token=token) == ["mnist"]
    merged = AdapterModel.from_pretrained(tmp_path / "local")
    assert merged.domains == ["gtsrb", "mnist"]
    assert torch.equal(logits(merged, "gtsrb"), logits(model, "gtsrb"))
    assert torch.equal(logits(merged, "mnist"), logits(model, "mnist"))


def test_pull_updates_a_domain_it_wrote_and_keeps_one_trained_there(registry, tmp_path):
    """A domain unchanged since the last pull is updated to the remote's newer version; one retrained in
    the folder since is kept and the pull refused (nothing written) unless overwrite."""
    token = registry.tokens["alice"]
    repo = f"alice/{unique('update')}"
    first = make(("a", "b"))
    first.push_to_hub(repo, token=token)
    folder = tmp_path / "fam"
    pull_family(repo, folder, token=token)
    newer = copy.deepcopy(first)
    newer.set_trainable("a", True)
    perturb(newer, "a", seed=7)
    newer.push_to_hub(repo, domains=["a"], token=token)
    pull_family(repo, folder, token=token)  # "a" was as pulled: updated
    assert torch.equal(logits(AdapterModel.from_pretrained(folder), "a"), logits(newer, "a"))
    local = AdapterModel.from_pretrained(folder)
    local.set_trainable("b", True)
    perturb(local, "b", seed=8)  # trained here, not pushed
    local.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in (folder / "domains").iterdir()}
    with pytest.raises(ValueError, match="'b' changed since it was last pulled"):
        pull_family(repo, folder, token=token)
    assert {p.name: p.read_bytes() for p in (folder / "domains").iterdir()} == before
    pull_family(repo, folder, token=token, domains=["a"])  # the other domain still pulls
    pull_family(repo, folder, token=token, overwrite=True)
    assert torch.equal(logits(AdapterModel.from_pretrained(folder), "b"), logits(first, "b"))


def test_pushing_or_uploading_a_subset_never_shrinks_the_remote_family(registry, tmp_path):
    token = registry.tokens["alice"]
    model = make(("a", "b", "c"))
    repo = f"alice/{unique('grow')}"
    model.push_to_hub(repo, domains=["a", "b"], token=token)
    pull_family(repo, tmp_path / "subset", domains=["a"], token=token)
    HfApi(token=token).upload_folder(
        repo_id=repo, folder_path=tmp_path / "subset"
    )  # as docs/registry.md shows
    assert sorted(list_domains(repo, token=token)) == ["a", "b"]
    save_family(model, tmp_path / "only-c", domains=["c"])
    result = push_folder(tmp_path / "only-c", repo.split("/")[1], token=token)
    assert result.repo_id == repo and result.domains == ["c"]  # the namespace the Hub chose
    assert sorted(list_domains(repo, token=token)) == ["a", "b", "c"]
    readme = HfApi(token=token).hf_hub_download(repo, "README.md", cache_dir=tmp_path / "cache")
    assert all(f"domain:{d}" in open(readme).read() for d in ("a", "b", "c"))


def test_push_refuses_a_family_on_other_weights(registry, tmp_path):
    token = registry.tokens["alice"]
    repo = f"alice/{unique('other')}"
    make(("a",)).push_to_hub(repo, token=token)
    other = make(("b",), seed=1)
    with pytest.raises(ValueError, match="other backbone weights"):
        other.push_to_hub(repo, token=token)
    assert sorted(list_domains(repo, token=token)) == ["a"]
    # another architecture: refused even with force, whose domains could not load beside these
    vit = AdapterModel.from_backbone("test_vit")
    vit.add_domain("v", num_classes=2)
    for force in (False, True):
        with pytest.raises(ValueError, match="another backbone architecture"):
            vit.push_to_hub(repo, token=token, force=force)
        vit.save_pretrained(tmp_path / "vit")
        with pytest.raises(ValueError, match="another backbone architecture"):
            pull_family(repo, tmp_path / "vit", token=token, force=force)
    assert sorted(list_domains(repo, token=token)) == ["a"]
    assert AdapterModel.from_pretrained(repo, token=token).domains == ["a"]


def test_push_twice_and_private_on_a_public_repo(registry, tmp_path):
    token = registry.tokens["alice"]
    make(("a",)).save_pretrained(tmp_path / "fam")
    repo = f"alice/{unique('twice')}"
    first = push_folder(tmp_path / "fam", repo, token=token)
    again = push_folder(tmp_path / "fam", repo, token=token)  # the same files: no new commit
    assert first.changed and not again.changed and again.commit_url == first.commit_url
    with pytest.raises(PermissionError, match="exists and is public.*nothing was pushed"):
        make(("a", "b")).push_to_hub(repo, private=True, token=token)
    assert sorted(list_domains(repo, token=token)) == ["a"]


def test_model_card_is_valid_hub_metadata_with_a_snippet_that_runs(registry, tmp_path):
    import re
    import subprocess
    import sys

    from huggingface_hub import ModelCard

    token = registry.tokens["alice"]
    repo = f"alice/{unique('card')}"
    model = make(("a", "b"))
    model.domain_info("a").metrics["accuracy"] = 0.75  # b has no metrics: the table must stay whole
    model.domain_info("a").data_config = {"input_size": [3, 40, 40]}  # the snippet's images are that size
    model.push_to_hub(repo, token=token)
    text = open(HfApi(token=token).hf_hub_download(repo, "README.md", cache_dir=tmp_path / "c")).read()
    card = ModelCard(text)
    assert card.data.library_name == "adapterkit"
    assert card.data.base_model is None  # test_resnet names no Hub repo
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("a", "accuracy", 0.75)
    ]
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # every row has the header's cells
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert repo in snippet and "<repo_id>" not in snippet and "torch.randn(2, 3, 40, 40)" in snippet
    env = {**os.environ, "HF_TOKEN": token}
    done = subprocess.run(
        [sys.executable, "-c", snippet + "\nprint(logits.shape)"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([2, 3])" in done.stdout


def test_saving_into_a_folder_of_another_family_is_refused(tmp_path):
    make(("a",)).save_pretrained(tmp_path / "fam")
    before = {p: p.read_bytes() for p in (tmp_path / "fam").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="other backbone weights.*new folder to save into"):
        make(("b",), seed=3).save_pretrained(tmp_path / "fam")
    assert {p: p.read_bytes() for p in (tmp_path / "fam").rglob("*") if p.is_file()} == before


def test_hf_hub_backbone_is_recorded_at_its_commit(registry, tmp_path):
    import timm

    token = registry.tokens["alice"]
    repo = f"alice/{unique('backbone')}"
    timm.models.push_to_hf_hub(timm.create_model("test_resnet"), repo, token=token)
    sha = HfApi(token=token).model_info(repo).sha
    model = AdapterModel.from_backbone(f"hf-hub:{repo}", pretrained=True)
    assert model.backbone_weights == {"kind": "hf-hub", "repo": repo, "revision": sha}
    model.add_domain("a", num_classes=2)
    model.save_pretrained(tmp_path / "fam")
    other = timm.create_model("test_resnet")  # new weights on main: the family must still get its own
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    timm.models.push_to_hf_hub(other, repo, token=token)
    assert AdapterModel.from_pretrained(tmp_path / "fam").fingerprint == model.fingerprint


def test_building_a_random_backbone_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    AdapterModel.from_backbone("test_resnet", seed=5)  # timm's initialisation runs on a fork of the RNG
    assert torch.equal(torch.rand(3), expected)


def test_saving_another_layout_or_a_refactorised_basis_into_a_family_is_refused(tmp_path):
    from adapterkit import AdapterConfig
    from adapterkit.compress import refactorize

    fam = tmp_path / "fam"
    model = make(("a", "b"))
    refactorize(model, basis_rank=0.5, apply=True)
    model.save_pretrained(fam)
    before = {p: p.read_bytes() for p in fam.rglob("*") if p.is_file()}
    series = make(("s",), config=AdapterConfig(topology="series"))  # the same backbone weights
    with pytest.raises(ValueError, match="adapter layout.*AdapterConfig.*new folder to save into"):
        series.save_pretrained(fam)
    again = make(("a", "b"))
    refactorize(again, basis_rank=0.25, apply=True)  # another basis: a and b would change
    with pytest.raises(ValueError, match="does not extend"):
        again.save_pretrained(fam)
    assert {p: p.read_bytes() for p in fam.rglob("*") if p.is_file()} == before
    loaded = AdapterModel.from_pretrained(fam)
    assert torch.equal(logits(loaded, "a"), logits(model, "a"))
    # a file where the folder would go: named, nothing written
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file.*folder"):
        model.save_pretrained(tmp_path / "file")


def test_saving_a_cast_model_over_its_own_folder_is_refused(tmp_path):
    """`model.half()` then `save_pretrained` into the folder it loaded from silently rewrote every domain
    file in fp16; now refused (naming the dtypes and the fix), nothing written, unless overwrite."""
    fam = tmp_path / "fam"
    make().save_pretrained(fam)
    files = {p.name: p.read_bytes() for p in (fam / "domains").iterdir()}
    model = AdapterModel.from_pretrained(fam).half()
    with pytest.raises(ValueError, match=r"'a' \(F32 -> F16\).* another dtype .*overwrite=True"):
        model.save_pretrained(fam)
    assert {p.name: p.read_bytes() for p in (fam / "domains").iterdir()} == files
    model.save_pretrained(tmp_path / "fp16")  # another folder: as asked
    model.save_pretrained(fam, overwrite=True)  # the explicit rewrite
    tensors, _ = read_safetensors(fam / "domains" / "a.safetensors", "domain a")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}


def test_saving_another_domain_of_the_same_name_is_refused(tmp_path):
    """A fresh model whose `a` differs from the folder's `a` silently replaced it on save; now that is
    refused (naming the domain and the fix) and nothing is written. The same bytes are a no-op, and a
    domain this model loaded from the folder, or saved there, may be updated in place."""
    fam = tmp_path / "fam"
    torch.manual_seed(0)
    make().save_pretrained(fam)
    files = {p.name: p.read_bytes() for p in (fam / "domains").iterdir()}
    config = (fam / "adapterkit.json").read_bytes()
    torch.manual_seed(0)
    make().save_pretrained(fam)  # the same domains, bit for bit (another model): nothing to refuse
    other = make(("a",))
    perturb(other, "a", seed=7)
    with pytest.raises(
        ValueError, match=r"already holds a different domain 'a' .* overwrite=True .*--overwrite"
    ):
        other.save_pretrained(fam)
    assert {p.name: p.read_bytes() for p in (fam / "domains").iterdir()} == files
    assert (fam / "adapterkit.json").read_bytes() == config
    other.save_pretrained(fam, overwrite=True)  # the explicit replacement
    assert torch.equal(logits(AdapterModel.from_pretrained(fam, domains=["a"]), "a"), logits(other, "a"))
    assert (fam / "domains" / "b.safetensors").read_bytes() == files["b.safetensors"]

    loaded = AdapterModel.from_pretrained(fam)  # loaded from the folder, changed deliberately: saved
    perturb(loaded, "b", seed=9)
    loaded.save_pretrained(fam)
    perturb(loaded, "b", seed=10)  # and again: the folder now holds what this model saved there
    loaded.save_pretrained(fam)
    assert torch.equal(logits(AdapterModel.from_pretrained(fam, domains=["b"]), "b"), logits(loaded, "b"))
    stale = AdapterModel.from_pretrained(fam, domains=["b"])
    perturb(loaded, "b", seed=11)
    loaded.save_pretrained(fam)  # the folder's `b` is no longer the one `stale` loaded: refused
    perturb(stale, "b", seed=12)
    with pytest.raises(ValueError, match="different domain 'b'"):
        stale.save_pretrained(fam)
    copied = copy.deepcopy(loaded)  # the record travels with the model, copies included
    perturb(copied, "b", seed=13)
    copied.save_pretrained(fam)


def test_cli_retraining_into_a_family_still_saves(tmp_path):
    """`adapterkit train --overwrite` and `--resume` replace the family's own domain, as before."""
    from cli_support import TRAIN, cli, digest, image_folder

    data, fam = image_folder(tmp_path / "data"), tmp_path / "fam"
    args = ["train", "--family", str(fam), "--domain", "a", "--data", str(data), "--steps", "1", *TRAIN]
    assert cli(*args, "--backbone", "test_resnet", "--random-init").returncode == 0
    before = digest(fam / "domains" / "a.safetensors")
    for flag in ("--overwrite", "--resume"):
        run = cli(*args, flag, "--seed", "3" if flag == "--overwrite" else "0")
        assert run.returncode == 0, run.stderr
        assert digest(fam / "domains" / "a.safetensors") != before
        before = digest(fam / "domains" / "a.safetensors")


def test_a_family_missing_a_file_it_records_says_it_is_incomplete(tmp_path):
    """A copied folder without its basis file asked "is fam an adapterkit family folder?", while its
    adapterkit.json was right there."""
    from adapterkit.compress import refactorize

    model = make(("a", "b"))
    refactorize(model, basis_rank=0.5, apply=True)
    model.save_pretrained(tmp_path / "fam")
    (tmp_path / "fam" / "basis.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="records it: the family folder is incomplete; copy the file"):
        AdapterModel.from_pretrained(tmp_path / "fam")
    with pytest.raises(FileNotFoundError, match="is .* an adapterkit family folder"):
        AdapterModel.from_pretrained(tmp_path)  # no adapterkit.json: not a family
