"""Whether the GPU session's code imports with only what the lent H200's image holds plus the wheels
benchmarks/gpu_wheels.sh carries (a GPU session is rare and short: a missing package there costs it).

Here, in this project's environment, an import finder refuses a module outside the standard library
whose distribution is neither in the image's list (DEVICE, read from the device tool's KINDS.md on
2026-11-17) nor among the carried wheels, when this project's code or a carried wheel's imports it (the
image's own packages are other versions than this environment's, with other imports: huggingface_hub
1.33 there); then the modules benchmarks/gpu_session.sh runs are imported: the device tests and their
conftest, and the GPU benchmarks (the serving servers' side included). Optional imports that the code
guards fail over as they would there.

    python benchmarks/gpu_imports.py     # exit 0, or 1 naming the module and its distribution
    python benchmarks/gpu_imports.py --without swagger-ui-bundle   # as if that wheel were not carried
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split()
OWN = {
    "adapterkit",
    "adapterkit_registry",
    "_pytest",
    "pytest",
    "py",
}  # (and the benchmarks' and tests' modules)
ENTRY = {  # what gpu_session.sh runs, by the folder it runs from
    "tests": ["conftest", "serve_support", "test_device"],
    "benchmarks": ["bench_serve", "bench_many_domains", "bench_gpu", "adapterkit.serve", "uvicorn"],
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried() -> set[str]:
    """The distributions gpu_wheels.sh downloads (NAME==VERSION)."""
    text = (ROOT / "benchmarks" / "gpu_wheels.sh").read_text()
    return {normalise(m) for m in re.findall(r"([A-Za-z0-9_.-]+)==[0-9]", text)}


class Refuse(importlib.abc.MetaPathFinder):
    """Refuses top-level modules that neither the image nor the wheels provide, imported by this project's
    code or by a carried wheel's."""

    def __init__(self, image: set[str], wheels: set[str]) -> None:
        self.allowed, self.wheels = image | wheels, wheels
        self.dists = importlib.metadata.packages_distributions()
        self.local = {p.stem for folder in ENTRY for p in (ROOT / folder).glob("*.py")} | OWN

    def of(self, module: str) -> set[str]:
        return {normalise(d) for d in self.dists.get(module.partition(".")[0], [])}

    def importer(self) -> str:
        """The module importing now."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back
        return frame.f_globals.get("__name__", "") if frame is not None else ""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in self.local or top in sys.modules:
            return None
        dists, importer = self.of(name), self.importer()
        checked = importer.partition(".")[0] in self.local or self.of(importer) & self.wheels
        if dists and not dists & self.allowed and checked:
            raise ModuleNotFoundError(
                f"{importer} imports {name} (distribution {', '.join(sorted(dists))}), which is not on the "
                "GPU image: add it to benchmarks/gpu_wheels.sh",
                name=name,
            )
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without", action="append", default=[], help="a carried wheel to leave out")
    args = parser.parse_args()
    wheels = carried() - {normalise(w) for w in args.without}
    sys.meta_path.insert(0, Refuse({normalise(d) for d in DEVICE}, wheels))
    for folder, modules in ENTRY.items():
        sys.path.insert(0, str(ROOT / folder))
        for module in modules:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:
                print(f"{folder}/{module}: {e}")
                return 1
    print("the GPU session's modules import with the image's packages and the carried wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
