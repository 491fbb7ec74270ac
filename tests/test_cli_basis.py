"""`adapterkit train --factored`, `adapterkit append` and `adapterkit compress` (docs/basis.md) on a tiny
image folder and the real `test_resnet`."""

from __future__ import annotations

import json

import torch
from cli_support import TRAIN, cli, digest, image_folder, table, weights_file

from adapterkit import AdapterModel
from adapterkit.layers import LowRankAdapter

QUICK = [*TRAIN, "--steps", "2"]


def _family(tmp_path):
    data, family = image_folder(tmp_path / "data"), tmp_path / "family"
    weights = weights_file(tmp_path / "backbone.safetensors")
    first = cli("train", "--family", str(family), "--domain", "a", "--data", str(data),
                "--backbone", "test_resnet", "--pretrained", str(weights), *QUICK)  # fmt: skip
    assert first.returncode == 0, first.stderr
    return data, family


def test_factored_append_compress(tmp_path):
    data, family = _family(tmp_path)
    factored = cli("train", "--family", str(family), "--domain", "b", "--data", str(data), "--factored",
                   "--new-columns", "2", *QUICK)  # fmt: skip
    assert factored.returncode == 0, factored.stderr
    model = AdapterModel.from_pretrained(str(family), domains=["b"])
    own = [m.adapters["b"] for m in model.layers().values() if isinstance(m.adapters["b"], LowRankAdapter)]
    assert own and all(0 < a.beta_own.shape[1] <= 2 for a in own if a.beta_own is not None)
    before = {d: digest(family / "domains" / f"{d}.safetensors") for d in ("a", "b")}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x, domain="b")

    appended = cli("append", "--family", str(family), "--domain", "b")
    assert appended.returncode == 0, appended.stderr
    assert table(appended.stdout)[1][:2] == ["b", "yes"]  # exact
    assert digest(family / "domains" / "a.safetensors") == before["a"]  # another domain: untouched
    assert digest(family / "domains" / "b.safetensors") != before["b"]
    config = json.loads((family / "adapterkit.json").read_text())
    assert config["basis"]["history"][-1]["op"] == "append"
    reloaded = AdapterModel.from_pretrained(str(family), domains=["b"])
    with torch.no_grad():
        assert torch.equal(reloaded(x, domain="b"), logits)  # the hand-over is bit-exact

    dry = cli("compress", "--family", str(family), "--basis-rank", "0.5", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert [r[0] for r in table(dry.stdout)[1:]] == ["a", "b"]
    assert json.loads((family / "adapterkit.json").read_text()) == config  # nothing written

    out = tmp_path / "compressed"
    compressed = cli("compress", "--family", str(family), "--basis-rank", "0.5", "--output", str(out))
    assert compressed.returncode == 0, compressed.stderr
    assert json.loads((family / "adapterkit.json").read_text()) == config  # the old family is kept
    written = json.loads((out / "adapterkit.json").read_text())
    assert written["basis"]["history"] == [{"op": "refactorize", "basis_rank": 0.5, "energy": None}]
    assert sorted(AdapterModel.from_pretrained(str(out)).domains) == ["a", "b"]


def test_basis_flag_errors(tmp_path):
    data, family = _family(tmp_path)
    cases = [
        (["compress", "--family", str(family), "--basis-rank", "1.5", "--dry-run"], "--basis-rank 1.5"),
        (["compress", "--family", str(family), "--basis-rank", "x", "--dry-run"], "--basis-rank 'x'"),
        (["compress", "--family", str(family), "--dry-run"], "--basis-rank K"),
        (["compress", "--family", str(family), "--basis-rank", "2"], "--output"),
        (["compress", "--family", str(family), "--energy", "0.9", "--output", str(family)], "new folder"),
        (["compress", "--family", str(tmp_path / "none"), "--energy", "0.9", "--dry-run"], "not an adapterkit"),
        (["append", "--family", str(family), "--domain", "zz"], "no domain 'zz'"),
        (["append", "--family", str(family), "--domain", "a", "--new-columns", "2", "--energy", "0.9"],
         "pass one of them"),
        (["append", "--family", str(family), "--domain", "a", "--energy", "2"], "--energy 2"),
        (["train", "--family", str(family), "--domain", "c", "--data", str(data), "--new-columns", "2", *QUICK],
         "pass --factored"),
    ]  # fmt: skip
    config = (family / "adapterkit.json").read_bytes()
    for args, expected in cases:
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert "new_columns=" not in result.stderr and "energy=" not in result.stderr, result.stderr
    assert (family / "adapterkit.json").read_bytes() == config
    assert not (family / "domains" / "c.safetensors").exists()


def test_refusals_name_only_the_flags_the_command_has():
    """`append` has no --basis-rank: a library message naming `rank=` keeps the argument's name there."""
    from adapterkit.cli_basis import flag_error

    error = ValueError("rank=0 keeps nothing; pass new_columns= or energy=")
    assert str(flag_error(error, ("new_columns", "energy"))) == (
        "rank=0 keeps nothing; pass --new-columns or --energy"
    )
    assert str(flag_error(error, ("basis_rank", "rank", "energy"))).startswith("--basis-rank 0 keeps")
