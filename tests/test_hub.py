"""The SDK against the registry with the real huggingface_hub client over real HTTP on loopback."""

import os
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest
import timm
import torch
from checks import input_for, perturb
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from adapterkit import AdapterModel
from adapterkit.hub import list_domains, list_families


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def published_backbone(registry):
    """A timm backbone published with timm's own push_to_hf_hub, as a real family would use."""
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet").eval()
    repo = f"alice/{unique('backbone')}"
    timm.models.push_to_hf_hub(backbone, repo, token=registry.tokens["alice"])
    return f"hf-hub:{repo}"


def family(backbone_name, names, seed=0):
    model = AdapterModel.from_backbone(backbone_name, pretrained=True).eval()
    for i, n in enumerate(names):
        model.add_domain(n, num_classes=3 + i)
        model.domain_info(n).metrics["accuracy"] = 0.5 + i / 100
        perturb(model, n, seed=seed + i)
    return model


def run_python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    script = tmp_path / f"{uuid.uuid4().hex}.py"
    script.write_text(textwrap.dedent(code))
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, str(script)], env=full_env, capture_output=True, text=True, timeout=300
    )


def test_round_trip_into_a_fresh_process_is_bit_identical(registry, published_backbone, tmp_path):
    model = family(published_backbone, ["gtsrb", "omniglot"])
    repo = f"alice/{unique('family')}"
    model.push_to_hub(repo, token=registry.tokens["alice"])
    x = input_for(model.backbone, batch=4)
    save_file({"x": x}, tmp_path / "x.safetensors")
    with torch.no_grad():
        expected = {d: model(x, domain=d) for d in model.domains}
    result = run_python(
        f"""
        from safetensors.torch import load_file, save_file
        import torch
        from adapterkit import AdapterModel
        model = AdapterModel.from_pretrained("{repo}").eval()
        x = load_file("{tmp_path / "x.safetensors"}")["x"]
        with torch.no_grad():
            save_file({{d: model(x, domain=d) for d in model.domains}}, "{tmp_path / "out.safetensors"}")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = load_file(tmp_path / "out.safetensors")
    assert set(got) == set(expected)
    assert all(torch.equal(got[d], expected[d]) for d in expected)


def test_pulling_one_domain_of_five_downloads_one_domain_file(registry, published_backbone, tmp_path):
    names = [f"d{i}" for i in range(5)]
    model = family(published_backbone, names)
    repo = f"alice/{unique('five')}"
    model.push_to_hub(repo, token=registry.tokens["alice"])
    cache = tmp_path / "cache"
    one = AdapterModel.from_pretrained(repo, domains=["d3"], cache_dir=cache).eval()
    assert one.domains == ["d3"]
    snapshots = list((cache / f"models--alice--{repo.split('/')[1]}" / "snapshots").iterdir())
    domain_files = sorted(p.name for s in snapshots for p in (s / "domains").iterdir())
    assert domain_files == ["d3.json", "d3.safetensors"]  # that domain's entry and tensors only
    x = input_for(model.backbone)
    with torch.no_grad():
        assert torch.equal(one(x, domain="d3"), model(x, domain="d3"))


def test_push_keeps_remote_domains_and_old_files(registry, published_backbone):
    token = registry.tokens["alice"]
    repo = f"alice/{unique('grow')}"
    first = family(published_backbone, ["a"])
    first.push_to_hub(repo, token=token)
    api = HfApi(token=token)
    blob_a = {
        f.path: f.blob_id for f in api.list_repo_tree(repo, recursive=True) if f.path.startswith("domains/")
    }
    HfApi(token=token).create_tag(repo, tag="v1")
    second = AdapterModel.from_pretrained(repo, token=token)  # a service pulls, adds a domain, pushes only it
    second.add_domain("b", num_classes=2)
    perturb(second, "b", seed=9)
    second.push_to_hub(repo, domains=["b"], token=token)
    assert set(list_domains(repo, token=token)) == {"a", "b"}
    after = {
        f.path: f.blob_id for f in api.list_repo_tree(repo, recursive=True) if f.path.startswith("domains/")
    }
    assert after["domains/a.safetensors"] == blob_a["domains/a.safetensors"]
    assert AdapterModel.from_pretrained(repo, revision="v1", token=token).domains == ["a"]
    card = api.model_info(repo).card_data
    assert card["library_name"] == "adapterkit"
    assert card["base_model"] == published_backbone.removeprefix("hf-hub:")
    assert {"domain:a", "domain:b"} <= set(card["tags"])
    readme = (api.hf_hub_download(repo, "README.md") if hasattr(api, "hf_hub_download") else None) or ""
    assert "| a |" in open(readme).read()


def test_discovery_by_backbone_and_domain(registry, published_backbone):
    token = registry.tokens["alice"]
    repo = f"alice/{unique('disc')}"
    family(published_backbone, ["flowers"]).push_to_hub(repo, token=token)
    by_backbone = {m.id for m in list_families(published_backbone, token=token)}
    assert repo in by_backbone
    assert repo in {m.id for m in list_families(domain="flowers", token=token)}
    assert repo not in {m.id for m in list_families(domain="no-such-domain", token=token)}


def test_private_family_is_invisible_without_token(registry, published_backbone, tmp_path):
    token = registry.tokens["alice"]
    repo = f"alice/{unique('secret')}"
    family(published_backbone, ["a"]).push_to_hub(repo, private=True, token=token)
    with pytest.raises(FileNotFoundError, match="not found|private"):
        AdapterModel.from_pretrained(repo, token=False, cache_dir=tmp_path / "anon")
    with pytest.raises(FileNotFoundError, match="not found|private"):
        AdapterModel.from_pretrained(repo, token=registry.tokens["bob"], cache_dir=tmp_path / "bob")
    assert repo not in {m.id for m in list_families(token=False)}
    assert AdapterModel.from_pretrained(repo, token=token, cache_dir=tmp_path / "alice").domains == ["a"]


def test_offline_from_cache(registry, published_backbone, tmp_path):
    token = registry.tokens["alice"]
    repo = f"alice/{unique('offline')}"
    family(published_backbone, ["a"]).push_to_hub(repo, token=token)
    AdapterModel.from_pretrained(repo, token=token)  # fills the cache (backbone and family)
    result = run_python(
        f"""
        from adapterkit import AdapterModel
        print(AdapterModel.from_pretrained("{repo}").domains)
        """,
        tmp_path,
        HF_HUB_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",  # nothing listens there: any request would fail
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "['a']" in result.stdout


def test_hot_add_while_serving(registry, published_backbone):
    token = registry.tokens["alice"]
    repo = f"alice/{unique('hot')}"
    source = family(published_backbone, ["a", "b"])
    source.push_to_hub(repo, token=token)
    served = AdapterModel.from_pretrained(repo, domains=["a"], token=token).eval()
    x = input_for(served.backbone)
    with torch.no_grad():
        ref_a = served(x, domain="a")
        ref_b = source(x, domain="b")
    stop = threading.Event()
    problems = []

    def serve(domain, ref):
        with torch.no_grad():
            while not stop.is_set():
                try:
                    out = served(x, domain=domain)
                except KeyError as e:
                    if domain != "b":  # b is loaded, unloaded and loaded again meanwhile
                        problems.append(f"{domain}: {e}")
                    continue
                if not torch.equal(out, ref):
                    problems.append(f"{domain}: wrong output")

    threads = [threading.Thread(target=serve, args=a) for a in (("a", ref_a), ("b", ref_b), ("a", ref_a))]
    for t in threads:
        t.start()
    served.load_domain(repo, "b", token=token)
    served.unload_domain("b")
    served.load_domain(repo, "b", token=token)
    stop.set()
    for t in threads:
        t.join()
    assert not problems, problems[:5]
    assert served.domains == ["a", "b"]


def test_pinned_files_come_from_one_commit(registry, published_backbone, tmp_path):
    token = registry.tokens["alice"]
    repo = f"alice/{unique('pin')}"
    model = family(published_backbone, ["a"])
    model.push_to_hub(repo, token=token)
    sha = HfApi(token=token).model_info(repo).sha
    model.add_domain("b", num_classes=2)
    model.push_to_hub(repo, token=token)
    old = AdapterModel.from_pretrained(repo, revision=sha, token=token, cache_dir=tmp_path / "c")
    assert old.domains == ["a"]
    assert list(list_domains(repo, revision=sha, token=token)) == ["a"]
