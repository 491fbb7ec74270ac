"""Every timm architecture family, attached and checked: the table in docs/layer-rules.md (issue 17).

A family is a timm model module (`timm.models.resnet`, `timm.models.eva`, ...; timm's `test_*` models are
left out: tests/test_model.py runs them all). Its representative is its smallest model by parameter count
(counted on the meta device, no weights built), created with random weights and, where the model takes
it, a small `img_size`. Each family runs in its own process with a time limit, so a crash or a hang is a
row of the table, not the end of the sweep, and each result is appended to a JSON-lines file as soon as it
is known: a killed sweep resumes where it stopped.

Checks per family (tests/checks.py, the invariants every test case runs): attach; identity at attach;
gradients only on the active domain; mixed batch == per sample; save -> load bit-identical; another domain
trained (3 SGD steps) leaves the first bit-identical, norm statistics included; export exact (relative
error <= 1e-5) or refused with a reason.

    OMP_NUM_THREADS=1 nohup python benchmarks/sweep_families.py > sweep.log 2>&1 &   # resumable
    python benchmarks/sweep_families.py --table        # write the table into docs/layer-rules.md
    python benchmarks/sweep_families.py --one eva      # one family, printed
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REPRESENTATIVES = RESULTS / "family_representatives.json"
OUT = RESULTS / "families.jsonl"
DOC = ROOT / "docs" / "layer-rules.md"
START, END = "<!-- sweep:start -->", "<!-- sweep:end -->"
CHECKS = (
    "identity_at_attach",
    "grads_only_active_domain",
    "mixed_batch_eq_per_sample",
    "save_load_bit_identical",
    "old_domain_kept_after_training",
)


def count_parameters() -> dict[str, dict]:
    """Family and parameter count of every timm model (meta device: shapes only, no weights)."""
    import timm
    import torch
    from timm.models import _registry
    from torch.overrides import TorchFunctionMode

    class SkipInit(TorchFunctionMode):
        """In-place ops on meta tensors (weight initialisation) do nothing: 10x faster counting."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name.endswith("_") and not name.endswith("__") and args and getattr(args[0], "is_meta", False):
                return args[0]
            return func(*args, **(kwargs or {}))

    counts = {}
    for name in timm.list_models():
        if name.startswith("test_"):
            continue
        family = _registry._model_to_module[name]
        try:
            with torch.device("meta"), SkipInit():
                model = timm.create_model(name)
            counts[name] = {"family": family, "params": sum(p.numel() for p in model.parameters())}
        except Exception as e:  # noqa: BLE001  (a model that cannot be built on meta is never picked)
            counts[name] = {"family": family, "params": None, "error": f"{type(e).__name__}: {e}"[:200]}
    return counts


def representatives(counts: dict[str, dict]) -> dict[str, dict]:
    """The smallest model of each family by parameter count (ties: the first name in sorted order)."""
    best: dict[str, dict] = {}
    for name in sorted(counts):
        row = counts[name]
        if row["params"] is None:
            continue
        current = best.get(row["family"])
        if current is None or row["params"] < current["params"]:
            best[row["family"]] = {"model": name, "params": row["params"]}
    return dict(sorted(best.items()))


# ---------------------------------------------------------------------- one family (child process)
SIZES = (64, 96)
# Families whose smallest model does not finish the checks in the time limit on one CPU thread run a
# cut-down config of it (fewer blocks, the same layer types); the table shows the kwargs.
CUT_DOWN = {"deepseek_vit": {"depth": 2}}


def probe(name: str, base: dict) -> tuple[dict, int]:
    """Create kwargs and an input size that the model runs at: a small `img_size` if it takes one,
    else a small input, else its own input size."""
    import timm
    import torch

    def runs(kwargs: dict, size: int) -> bool:
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, **kwargs).eval()
            c = model.pretrained_cfg["input_size"][0]
            with torch.no_grad():
                model(torch.randn(1, c, size, size))
            return True
        except Exception:  # noqa: BLE001  (try the next form)
            return False

    for size in SIZES:
        for kwargs in ({**base, "img_size": size}, base):
            if runs(kwargs, size):
                return kwargs, size
    model = timm.create_model(name, **base)
    return base, int(model.pretrained_cfg["input_size"][-1])


def weight_reads(model) -> int:
    """Adapted layers whose parent module reads their `.weight`/`.bias` in its forward code."""
    from adapterkit.layers import DomainLayer

    sources: dict[type, str] = {}
    count = 0
    for module in model.backbone.modules():
        for child_name, child in module.named_children():
            if isinstance(child, DomainLayer):
                text = sources.setdefault(type(module), _forward_source(type(module)))
                count += f"self.{child_name}.weight" in text or f"self.{child_name}.bias" in text
    return count


def _forward_source(cls: type) -> str:
    """The source of a module class's forward methods (not its initialisation)."""
    parts = []
    for klass in cls.__mro__:
        for name, fn in vars(klass).items():
            if "forward" in name and callable(fn):
                try:
                    parts.append(inspect.getsource(fn))
                except (OSError, TypeError):
                    pass
    return "\n".join(parts)


def run_family(family: str, model_name: str) -> dict:
    """Every check on one family's representative; an exception is recorded, never raised."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from checks import INVARIANTS, CaseSpec, build_case

    torch.set_num_threads(1)
    row: dict = {"family": family, "model": model_name}
    start = time.perf_counter()
    try:
        kwargs, size = probe(model_name, CUT_DOWN.get(family, {}))
        row.update(kwargs=kwargs, size=size)
        case = build_case(CaseSpec(model_name, kwargs=tuple(kwargs.items()), size=size))
    except Exception as e:  # noqa: BLE001
        row.update(attach=f"error: {type(e).__name__}: {e}"[:400], seconds=time.perf_counter() - start)
        return row
    model = case.model
    row["attach"] = "ok"
    row["rules"] = dict(collections.Counter(t.rule for t in model.targets))
    row["norms"] = sorted({t.kind for t in model.targets if t.rule == "norm"})
    row["adds"] = model.domain_cost("b")["fraction_of_backbone"]
    row["weight_reads"] = weight_reads(model)
    for check in CHECKS:
        row[check] = _outcome(lambda c=check: INVARIANTS[c](case, Path(tempfile.mkdtemp(prefix="sweep-"))))
    row["export"] = _export(case)
    row["seconds"] = time.perf_counter() - start
    return row


def _outcome(fn) -> str:
    try:
        fn()
        return "pass"
    except AssertionError as e:
        return f"fail: {e}"[:400]
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {e}"[:400]


def _export(case) -> str:
    """`exact`, `refused: <reason>`, `differs: <relative error>` or `error: ...`."""
    import torch

    model, x = case.private(), case.x  # a copy with non-zero adapters on both domains
    try:
        with torch.no_grad():
            logits = model(x, domain="b")
        try:
            exported = model.export_domain("b")
        except ValueError as e:
            return f"refused: {e}"
        with torch.no_grad():
            folded = exported(x)
        rel = float((folded - logits).abs().max() / logits.abs().max())
        return "exact" if rel <= 1e-5 else f"differs: relative error {rel:.1e}"
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {e}"[:400]


# ---------------------------------------------------------------------- driver
def passes(row: dict) -> bool:
    """Everything but export passes (export is judged on its own: exact or a clear refusal)."""
    return row.get("attach") == "ok" and all(row.get(c) == "pass" for c in CHECKS)


def recount_reads() -> None:
    """Recompute the weight-read column of every attached family (attach only, no checks)."""
    import timm

    from adapterkit import AdapterModel

    rows = [json.loads(line) for line in OUT.read_text().splitlines()]
    for row in rows:
        if row.get("attach") == "ok":
            backbone = timm.create_model(row["model"], **row.get("kwargs", {}))
            row["weight_reads"] = weight_reads(AdapterModel(backbone))
    OUT.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _done() -> set[str]:
    return {json.loads(line)["family"] for line in OUT.read_text().splitlines()} if OUT.exists() else set()


def sweep(families: list[str] | None, timeout: float, descending: bool = False) -> None:
    reps = json.loads(REPRESENTATIVES.read_text())
    todo = sorted((f for f in (families or reps) if f not in _done()), key=lambda f: reps[f]["params"])
    print(f"{len(todo)} families to run", flush=True)
    for family in reversed(todo) if descending else todo:
        if family in _done():  # another worker (--descending) got there first
            continue
        model_name = reps[family]["model"]
        start = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", family, "--json"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            row = json.loads(lines[-1]) if lines else None
            if row is None:
                tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
                row = {
                    "family": family,
                    "model": model_name,
                    "attach": f"error: process died: {tail[0]}"[:400],
                }
        except subprocess.TimeoutExpired:
            row = {"family": family, "model": model_name, "attach": f"error: over the {timeout:.0f} s limit"}
        row["params"] = reps[family]["params"]
        row.setdefault("seconds", time.perf_counter() - start)
        with OUT.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        print(
            f"{family:28s} {model_name:40s} {'PASS' if passes(row) else 'FAIL'} {row['seconds']:.0f}s",
            flush=True,
        )


def _short(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")[:140]


def table(rows: list[dict]) -> str:
    """The markdown table (and its summary line) for docs/layer-rules.md."""
    ok = [r for r in rows if passes(r)]
    exact = sum(1 for r in rows if r.get("export") == "exact")
    refused = sum(1 for r in rows if str(r.get("export", "")).startswith("refused"))
    lines = [
        f"{len(ok)} of {len(rows)} families ({100 * len(ok) / max(len(rows), 1):.1f} %) pass every check but "
        f"export; export: {exact} exact, {refused} refused with a reason, "
        f"{len(rows) - exact - refused} other. Checks: id = identity at attach, grad = gradients only on "
        "the active domain, mix = mixed batch == per sample, io = save/load bit-identical, old = another "
        "domain trained leaves the first bit-identical; wr = adapted layers whose weight the model reads "
        "directly (adapted in weight space).",
        "",
        "| family | model (params) | input | parallel/lowrank/grouped/norm | wr | id | grad | mix | io | old | adds | export |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["family"]):
        rules = r.get("rules", {})
        counts = "/".join(str(rules.get(k, 0)) for k in ("parallel", "lowrank", "grouped", "norm"))
        marks = ["✓" if r.get(c) == "pass" else ("—" if r.get(c) is None else "✗") for c in CHECKS]
        export = str(r.get("export", ""))
        if r.get("attach") != "ok":
            export = f"attach: {r.get('attach')}"
        adds = f"{100 * r['adds']:.1f} %" if "adds" in r else ""
        lines.append(
            f"| {r['family']} | `{r['model']}` ({r.get('params', 0) / 1e6:.1f} M) | {r.get('size', '')} | "
            f"{counts if rules else ''} | {r.get('weight_reads', '')} | {' | '.join(marks)} | {adds} | "
            f"{_short(export)} |"
        )
    failing = [r for r in rows if not passes(r)]
    for r in failing:
        why = r["attach"] if r.get("attach") != "ok" else next(r[c] for c in CHECKS if r.get(c) != "pass")
        lines.append(f"\n- **{r['family']}** (`{r['model']}`): {_short(why)}")
    return "\n".join(lines)


def write_table() -> None:
    rows = {}
    for line in OUT.read_text().splitlines():
        row = json.loads(line)
        rows[row["family"]] = row  # a later run of a family replaces an earlier one
    text = DOC.read_text()
    if START not in text:
        raise SystemExit(f"{DOC} has no {START} ... {END} markers; add them where the table goes")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{START}\n{table(list(rows.values()))}\n{END}{tail}")
    print(f"wrote {len(rows)} families into {DOC}")


# ---------------------------------------------------------------------- fast paths (issue 17.4)
FAST_CASES = (("resnet18", {}, 64), ("vit_tiny_patch16_224", {"img_size": 64}, 64))


def fast_paths(repeats: int, batch: int) -> None:
    """torch.compile (inductor, eval mode, CPU) of an AdapterModel against eager, ratios in the same run."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import write_report

    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {}
    for name, kwargs, size in FAST_CASES:
        results[name] = _fast_case(name, kwargs, size, repeats, batch)
        print(name, json.dumps(results[name], indent=1), flush=True)
    config = {"repeats": repeats, "batch": batch, "threads": 1, "cases": FAST_CASES}
    write_report(RESULTS / "compile.json", "sweep_families --fast-paths", config, results, start)


def _fast_case(name: str, kwargs: dict, size: int, repeats: int, batch: int) -> dict:
    import timm
    import torch
    from _common import calibrated_backbone, interleaved, perturb

    from adapterkit import AdapterModel

    backbone = calibrated_backbone(name, size) if not kwargs else timm.create_model(name, **kwargs).eval()
    plain = timm.create_model(name, **kwargs).eval()
    plain.load_state_dict(backbone.state_dict())
    model = AdapterModel(backbone).eval()
    model.add_domain("a", num_classes=10)
    perturb(model.trainable_parameters("a"))
    x = torch.randn(batch, 3, size, size)
    compiled, compiled_plain = torch.compile(model), torch.compile(plain)
    with torch.no_grad():
        t0 = time.perf_counter()
        y_compiled = compiled(x, domain="a")
        compile_s = time.perf_counter() - t0
        compiled_plain(x)
        error = float((y_compiled - model(x, domain="a")).abs().max())
        res = interleaved(
            {
                "backbone_eager": lambda: plain(x),
                "adapted_eager": lambda: model(x, domain="a"),
                "adapted_compiled": lambda: compiled(x, domain="a"),
                "backbone_compiled": lambda: compiled_plain(x),
            },
            repeats,
            "adapted_eager",
        )
    return {
        "size": size,
        "batch": batch,
        "first_compiled_call_s": compile_s,
        "max_abs_error_compiled_vs_eager": error,
        **{k: {"ms": v["ms"], "ratio_to_adapted_eager": v["ratio"]} for k, v in res.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", help="only these families (default: all)")
    parser.add_argument("--one", help="run one family in this process and print its row")
    parser.add_argument("--json", action="store_true", help="with --one: print the row as JSON")
    parser.add_argument("--table", action="store_true", help="write the table into docs/layer-rules.md")
    parser.add_argument("--count", action="store_true", help="recount parameters and pick representatives")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per family")
    parser.add_argument("--recount-reads", action="store_true", help="recompute the weight-read column")
    parser.add_argument("--descending", action="store_true", help="largest families first (a second worker)")
    parser.add_argument("--fast-paths", action="store_true", help="measure torch.compile against eager")
    parser.add_argument("--repeats", type=int, default=20, help="with --fast-paths: timed repeats")
    parser.add_argument("--batch", type=int, default=8, help="with --fast-paths: batch size")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.count or not REPRESENTATIVES.exists():
        REPRESENTATIVES.write_text(json.dumps(representatives(count_parameters()), indent=1) + "\n")
    if args.recount_reads:
        recount_reads()
    elif args.fast_paths:
        fast_paths(args.repeats, args.batch)
    elif args.one:
        reps = json.loads(REPRESENTATIVES.read_text())
        row = run_family(args.one, reps[args.one]["model"])
        print(json.dumps(row, sort_keys=True) if args.json else json.dumps(row, indent=1))
    elif args.table:
        write_table()
    else:
        sweep(args.families, args.timeout, args.descending)


if __name__ == "__main__":
    main()
