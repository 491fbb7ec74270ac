"""Two CPU processes (torchrun, gloo) train the same domain as one process with the same global batch.

BatchNorm policy under DDP (docs/training.md): each process normalises with its own batch statistics
(no SyncBatchNorm), and the domain's running statistics are averaged over processes at the end. So a
model with BatchNorm is compared across ranks only (bit-identical tensors), and the comparison with a
single-process run uses a model without BatchNorm (test_vit: LayerNorm), where the only difference is
the order of the gradient reduction (allclose).

Run as a script, this file is the worker that torchrun starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
STEPS, PER_RANK = 3, 4


def _run(name: str, batch_size: int, out: Path | None = None) -> dict[str, torch.Tensor]:
    from train_support import SIZE, Toy, cfg, make_model

    from adapterkit.data import DomainDataset, open_data
    from adapterkit.train import evaluate, train_domain
    from adapterkit.transforms import Preprocess

    model = make_model(name)
    config = cfg(steps=STEPS, batch_size=batch_size, eval_batch_size=4)
    metrics = train_domain(model, "d", Toy(32, 3), Toy(13, 3, seed=1), config, data_config=SIZE)
    state = {k: v.contiguous() for k, v in model.domain_state_dict("d").items()}
    if out is not None:
        rank = int(os.environ["RANK"])
        save_file(state, out / f"{name}-rank{rank}.safetensors")
        again = evaluate(model, Toy(13, 3, seed=1), "d", config=config)
        # 13 images on 2 ranks: gather_for_metrics must drop the duplicate that pads the last batch
        test = DomainDataset(open_data(Toy(13, 3, seed=1)), Preprocess(model.domain_info("d").data_config))
        x, y = torch.stack([test[i][0] for i in range(13)]), torch.tensor([test[i][1] for i in range(13)])
        with torch.no_grad():
            local = int((model.eval()(x, domain="d").argmax(-1) == y).sum())
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        record = {**metrics, "evaluate": again, "local_correct": local, "world": world}
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(record))
    return state


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*torchrun, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("test_vit", "test_resnet"):
        ranks = [load_file(tmp_path / f"{name}-rank{r}.safetensors") for r in (0, 1)]
        for key, value in ranks[0].items():  # DDP keeps the ranks identical, BN statistics included
            assert torch.equal(ranks[1][key], value), f"{name}: {key} differs between ranks"
        metrics = [json.loads((tmp_path / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
        assert metrics[0]["accuracy"] == metrics[1]["accuracy"] == metrics[0]["evaluate"]
        assert round(metrics[0]["accuracy"] * 13) == metrics[0]["local_correct"]
        assert metrics[0]["steps"] == STEPS and metrics[0]["world"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run("test_vit", 2 * PER_RANK)  # one process, the same global batch
    finally:
        torch.set_num_threads(threads)
    ranks = load_file(tmp_path / "test_vit-rank0.safetensors")
    for key, value in single.items():
        torch.testing.assert_close(ranks[key], value, rtol=1e-4, atol=1e-6, msg=f"test_vit: {key}")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name in ("test_vit", "test_resnet"):
        _run(name, PER_RANK, out)
