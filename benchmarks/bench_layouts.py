"""Memory layout on CPU: what made channels-last training faster (docs/benchmarks.md, issue 12.5).

1. BatchNorm forward + backward over ResNet-26's maps: train mode NCHW, eval mode NCHW, train mode NHWC.
2. A low-rank adapter's gradients on channels-last maps, the old form `grad_y.T @ (x @ gamma)` against the
   kept one `((x @ gamma).T @ grad_y).T`, with the NCHW batched form beside them.

Thread CPU time of one torch thread, median of 15 (9 for the gradients), milliseconds.

    PYTHONPATH=. python benchmarks/bench_layouts.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return 1e3 * statistics.median(times)


def batch_norm(shape: tuple[int, ...]) -> dict[str, float]:
    c = shape[1]
    w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    mean, var = torch.zeros(c), torch.ones(c)
    out = {}
    for name, fmt, train in (
        ("train NCHW", torch.contiguous_format, True),
        ("eval NCHW", torch.contiguous_format, False),
        ("train NHWC", torch.channels_last, True),
    ):
        x = torch.randn(*shape).contiguous(memory_format=fmt).requires_grad_()
        g = torch.randn(*shape).contiguous(memory_format=fmt)
        step = lambda x=x, g=g, train=train: F.batch_norm(x, mean, var, w, b, train, 0.1, 1e-5).backward(g)  # noqa: E731
        out[name] = median_ms(step)
    return out


def low_rank_grads(n: int, c: int, o: int, h: int, k: int) -> dict[str, float]:
    x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
    g = torch.randn(n, o, h, h).contiguous(memory_format=torch.channels_last)
    gamma, basis = torch.randn(c, k), torch.randn(o, k)
    xr, gr = x.permute(0, 2, 3, 1).reshape(-1, c), g.permute(0, 2, 3, 1).reshape(-1, o)
    xn, gn = x.contiguous().reshape(n, c, -1), g.contiguous().reshape(n, o, -1)

    def nchw():
        h_, q = torch.bmm(gamma.T.expand(n, -1, -1), xn), torch.bmm(basis.T.expand(n, -1, -1), gn)
        return torch.bmm(gn, h_.mT).sum(0), torch.bmm(xn, q.mT).sum(0)

    forms = {
        "NHWC, grad_y.T @ (x @ gamma)": lambda: (gr.T @ (xr @ gamma), xr.T @ (gr @ basis)),
        "NHWC, ((x @ gamma).T @ grad_y).T": lambda: (((xr @ gamma).T @ gr).T, ((gr @ basis).T @ xr).T),
        "NCHW, batched": nchw,
    }
    old, new = forms["NHWC, grad_y.T @ (x @ gamma)"](), forms["NHWC, ((x @ gamma).T @ grad_y).T"]()
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-1) for a, b in zip(old, new, strict=True))
    return {name: median_ms(fn, 9) for name, fn in forms.items()}


def main() -> None:
    torch.set_num_threads(1)
    for shape in ((32, 32, 72, 72), (32, 64, 36, 36), (32, 128, 18, 18), (32, 256, 9, 9)):
        cells = "  ".join(f"{k} {v:6.2f}" for k, v in batch_norm(shape).items())
        print(f"batch norm {shape}: {cells}")
    for n, c, o, h, k in (
        (16, 256, 64, 56, 8),
        (16, 64, 256, 56, 8),
        (16, 512, 128, 28, 8),
        (16, 1024, 256, 14, 8),
    ):
        cells = "  ".join(f"{name} {v:6.2f}" for name, v in low_rank_grads(n, c, o, h, k).items())
        print(f"low-rank grads x ({n}, {c}, {h}, {h}) -> {o}, rank {k}: {cells}")


if __name__ == "__main__":
    main()
