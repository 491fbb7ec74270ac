"""Contract: the registry's web page and its listing read the families adapterkit itself writes.

Only over HTTP (the web page, and the real `huggingface_hub` client for the API): the registry's
internals may change, what a family written by `save_pretrained` / `push_to_hub` shows may not.
"""

import html
import re
import urllib.parse
import urllib.request
import uuid

import pytest
from huggingface_hub import HfApi

from adapterkit import AdapterModel

BACKBONE = "test_resnet"
# domain -> (classes, metrics) as adapterkit records them in the family
DOMAINS = {
    "gtsrb": (43, {"accuracy": 0.8125, "train_loss": 0.5}),
    "omniglot": (5, {"accuracy": 0.625}),
}


def write_family(registry, tmp_path, how: str) -> str:
    """A two-domain family written by adapterkit and published to the registry; returns the repo id."""
    model = AdapterModel.from_backbone(BACKBONE)
    for name, (classes, metrics) in DOMAINS.items():
        model.add_domain(name, num_classes=classes)
        model.domain_info(name).metrics.update(metrics)
    repo = f"alice/contract-{how}-{uuid.uuid4().hex[:8]}"
    token = registry.tokens["alice"]
    if how == "push_to_hub":
        model.push_to_hub(repo, token=token)
    else:  # the folder save_pretrained writes, uploaded as it is with the Hub client
        model.save_pretrained(tmp_path / "family")
        api = HfApi(token=token)
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=tmp_path / "family")
    return repo


@pytest.fixture(scope="module", params=["push_to_hub", "save_pretrained"])
def family_repo(request, registry, tmp_path_factory):
    return write_family(registry, tmp_path_factory.mktemp("family"), request.param)


def repo_block(page: str, repo: str) -> str:
    """The part of the web page about one repo (its `<div class="repo">`)."""
    match = re.search(rf"<h2>{re.escape(html.escape(repo))}</h2>(.*?)</div>", page, flags=re.S)
    assert match, f"{repo} is not on the web page"
    return match.group(1)


def test_web_page_shows_backbone_domains_and_metrics(registry, family_repo):
    query = urllib.parse.urlencode({"search": family_repo})
    with urllib.request.urlopen(f"{registry.url}/?{query}") as response:
        assert response.status == 200
        page = response.read().decode("utf-8")
    block = repo_block(page, family_repo)
    assert f"backbone: <code>{BACKBONE}</code>" in block
    for name, (classes, metrics) in DOMAINS.items():
        row = re.search(rf"<tr><td>{name}</td><td>(\d+)</td>(.*?)</tr>", block)
        assert row, f"no row for domain {name}"
        assert int(row.group(1)) == classes
        for value in metrics.values():
            assert f"<td>{value:.4g}</td>" in row.group(2), f"{name}: metric {value} missing"


def check_card(info, repo: str) -> None:
    """Library, backbone (its `backbone:` tag), domains (`domain:` tags) and each domain's accuracy
    (the card's model-index), as adapterkit wrote them."""
    assert info.id == repo
    assert info.library_name == "adapterkit"
    expected_tags = {"adapterkit", f"backbone:{BACKBONE}"} | {f"domain:{name}" for name in DOMAINS}
    assert expected_tags <= set(info.tags)
    card = info.card_data
    assert card is not None, "no cardData"
    assert card.library_name == "adapterkit"
    assert expected_tags <= set(card.tags)
    accuracy = {
        r.dataset_name: r.metric_value for r in card.eval_results or [] if r.metric_type == "accuracy"
    }
    assert accuracy == {name: metrics["accuracy"] for name, (_, metrics) in DOMAINS.items()}


def test_listing_shows_domains_and_backbone(family_repo):
    listed = {m.id: m for m in HfApi().list_models(filter="adapterkit", cardData=True)}
    assert family_repo in listed
    check_card(listed[family_repo], family_repo)
    for name in DOMAINS:
        found = HfApi().list_models(filter=["adapterkit", f"domain:{name}"])
        assert family_repo in {m.id for m in found}


def test_model_info_shows_domains_backbone_and_files(family_repo):
    info = HfApi().model_info(family_repo)
    check_card(info, family_repo)
    files = {s.rfilename for s in info.siblings}
    assert {"adapterkit.json", "README.md"} <= files
    assert {f"domains/{name}.{ext}" for name in DOMAINS for ext in ("json", "safetensors")} <= files
