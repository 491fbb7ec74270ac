#!/usr/bin/env bash
# Before a GPU session (here, with PyPI reachable): the wheels the lent H200's Python 3.12 image lacks
# (the web stack, datasets; benchmarks/gpu_imports.py checks the list), pinned to the versions CI tests,
# into .whl/ (git-ignored through .git/info/exclude; about 8 MB), and this machine's wrk with its luajit
# in .whl/bin (the image has no wrk; gpu_session.sh falls back to the Python load generator). Then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 python-multipart==0.0.34 timm==1.0.31 \
  swagger-ui-bundle==1.1.0 opentelemetry-api==1.45.2 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
if command -v wrk >/dev/null; then
    mkdir -p .whl/bin
    cp "$(command -v wrk)" .whl/bin/
    cp "$(ldd "$(command -v wrk)" | awk '/libluajit/ {print $3}')" .whl/bin/
fi
ls -R .whl
