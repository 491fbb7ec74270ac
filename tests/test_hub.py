"""The SDK against the registry with the real huggingface_hub client over real HTTP on loopback."""

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import timm
import torch
from checks import Servers, input_for, perturb
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
    readme = Path(api.hf_hub_download(repo, "README.md")).read_text()
    assert "| a |" in readme and "| b |" in readme


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


def test_unreachable_endpoint_uses_the_cache_and_says_so(registry, published_backbone, tmp_path):
    token = registry.tokens["alice"]
    repo = f"alice/{unique('partial')}"
    family(published_backbone, ["a", "b"]).push_to_hub(repo, token=token)
    AdapterModel.from_pretrained(repo, domains=["a"], token=token)  # caches the backbone and domain a only
    result = run_python(
        f"""
        from adapterkit import AdapterModel
        print(AdapterModel.from_pretrained("{repo}").domains)
        try:
            AdapterModel.from_pretrained("{repo}", domains=["b"])
        except KeyError as e:
            print("error:", e)
        """,
        tmp_path,
        HF_ENDPOINT="http://127.0.0.1:9",  # the registry went away: nothing listens there
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "cannot reach http://127.0.0.1:9" in result.stderr
        and "only the files downloaded before" in result.stderr
    )
    assert "['a']" in result.stdout
    assert "error: \"domains ['b'] are not in the cached copy of" in result.stdout


def test_hot_add_while_serving(registry, published_backbone, monkeypatch):
    token = registry.tokens["alice"]
    repo = f"alice/{unique('hot')}"
    source = family(published_backbone, ["a", "b"])
    source.push_to_hub(repo, token=token)
    served = AdapterModel.from_pretrained(repo, domains=["a"], token=token).eval()
    x = input_for(served.backbone)
    with torch.no_grad():
        ref_a = served(x, domain="a")
        ref_b = source(x, domain="b")

    def serve(domain, ref):
        def call():
            with torch.no_grad():
                try:
                    out = served(x, domain=domain)
                except KeyError:
                    if domain == "b":  # b is loaded, unloaded and loaded again meanwhile
                        return "absent"
                    raise
            assert torch.equal(out, ref), f"{domain}: wrong output"
            return "ok"

        return call

    servers = Servers({"a1": serve("a", ref_a), "b": serve("b", ref_b), "a2": serve("a", ref_a)})
    publish, published = served.publish_domain, []

    def publish_while_serving(*args, **kwargs):
        # b's files are downloaded and its modules built: every thread serves before and after it appears
        servers.wait(2, "while b was being hot-added")
        publish(*args, **kwargs)
        published.append(args[0].name)
        servers.wait(2, "right after b was published")

    monkeypatch.setattr(served, "publish_domain", publish_while_serving)
    with servers:
        servers.wait(1, "before b was loaded", label="absent", names=["b"])
        served.load_domain(repo, "b", token=token)
        servers.wait(1, "after b was loaded", label="ok", names=["b"])
        served.unload_domain("b")
        servers.wait(1, "after b was unloaded", label="absent", names=["b"])
        served.load_domain(repo, "b", token=token)
        servers.wait(1, "after b was loaded again", label="ok", names=["b"])
    assert not servers.problems, servers.problems[:5]
    assert published == ["b", "b"], "load_domain no longer goes through publish_domain: update this test"
    assert served.domains == ["a", "b"]


def test_pinned_revision_reads_that_commits_files(registry, published_backbone, tmp_path):
    token = registry.tokens["alice"]
    repo = f"alice/{unique('pin')}"
    model = family(published_backbone, ["a"])
    model.push_to_hub(repo, token=token)
    sha = HfApi(token=token).model_info(repo).sha
    x = input_for(model.backbone)
    with torch.no_grad():
        old_a = model(x, domain="a")
    perturb(model, "a", seed=42)  # a is trained further and pushed again under the same name
    model.add_domain("b", num_classes=2)
    model.push_to_hub(repo, token=token)
    with torch.no_grad():
        new_a = model(x, domain="a")
    assert not torch.equal(new_a, old_a)
    cache = tmp_path / "cache"
    latest = AdapterModel.from_pretrained(
        repo, token=token, cache_dir=cache
    ).eval()  # newer files cached first
    assert latest.domains == ["a", "b"]
    with torch.no_grad():
        assert torch.equal(latest(x, domain="a"), new_a)
    old = AdapterModel.from_pretrained(repo, revision=sha, token=token, cache_dir=cache).eval()
    assert old.domains == ["a"]
    with torch.no_grad():
        assert torch.equal(old(x, domain="a"), old_a), "a pinned load read a file of a later commit"
    assert list(list_domains(repo, revision=sha, token=token)) == ["a"]
    latest.load_domain(repo, "a", as_name="a_at_sha", revision=sha, token=token, cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(latest(x, domain="a_at_sha"), old_a)
        assert torch.equal(latest(x, domain="a"), new_a)


def test_a_refused_token_says_so_on_push_and_on_read(registry):
    repo = f"alice/{unique('tokens')}"
    model = AdapterModel.from_backbone("test_resnet")
    model.add_domain("a", num_classes=2)
    model.push_to_hub(repo, token=registry.tokens["alice"])
    bogus = "akr_" + "0" * 40
    with pytest.raises(PermissionError, match="refused the token.*pass a valid one as token= or HF_TOKEN"):
        model.push_to_hub(repo, token=bogus)
    with pytest.raises(PermissionError, match="refused the token.*even for public repos"):
        list_domains(repo, token=bogus)  # a public repo, read with a token the server does not know
    assert list(list_domains(repo)) == ["a"]


def test_a_push_that_changes_nothing_answers_the_current_commit_as_huggingface_hub_does(
    registry, published_backbone, caplog
):
    """`push_to_hub` of unchanged domains makes no commit and returns the repo's current commit URL, the
    same answer huggingface_hub's own `upload_file` gives for a no-op; it now also says so in a warning
    (huggingface_hub logs one; the URL alone did not tell a no-op from a push)."""
    import logging

    token = registry.tokens["alice"]
    repo = f"alice/{unique('noop')}"
    model = family(published_backbone, ["a"])
    first = model.push_to_hub(repo, token=token)
    with caplog.at_level(logging.WARNING, logger="adapterkit.hub"):
        again = model.push_to_hub(repo, token=token)
    api = HfApi(token=token)
    assert again == first == f"{api.endpoint}/{repo}/commit/{api.repo_info(repo).sha}"
    assert "already holds these files: no new commit" in caplog.text
    same = api.hf_hub_download(repo, "adapterkit.json")
    assert (
        api.upload_file(path_or_fileobj=same, path_in_repo="adapterkit.json", repo_id=repo).commit_url
        == first
    )
    perturb(model, "a", seed=5)
    assert model.push_to_hub(repo, token=token) != first


def test_hf_endpoint_set_after_import_is_named_in_the_error(registry, tmp_path):
    """huggingface_hub reads HF_ENDPOINT once, at import (`from adapterkit import AdapterModel` imports it):
    setting it afterwards used to leave only "cannot reach <the old endpoint>; check HF_ENDPOINT", while
    HF_ENDPOINT was right."""
    code = (
        "import os\n"
        "from adapterkit import AdapterModel\n"
        f"os.environ['HF_ENDPOINT'] = {registry.url!r}\n"
        "try:\n"
        "    AdapterModel.from_pretrained('alice/anything')\n"
        "except ConnectionError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "cannot reach http://127.0.0.1:9" in out.stdout, out.stderr
    assert (
        f"HF_ENDPOINT is {registry.url} now, but huggingface_hub read it when it was imported" in out.stdout
    )
    assert "set HF_ENDPOINT before importing adapterkit" in out.stdout
