#!/usr/bin/env bash
# The GPU training benchmark (benchmarks/gpu/train.py) on a GPU machine that can reach no package index.
#
# It installs nothing but wheels carried in .whl/ (ignored by git, sent with the device tool's `carry`).
# The GPU image already has Python 3.12, CuPy (cupy-cuda13x), nvidia-ml-py (pynvml), nvidia-nccl-cu13,
# numpy, pandas, pyarrow, numba, cloudpickle, msgpack, psutil, toolz, pyyaml; what it lacks:
#   xgboost-cu13==3.2.0       the CUDA build of the project's xgboost (59 MiB: a carry of its own)
#   dask-cuda>=26.10          LocalCUDACluster (unpinned, pip walks back to a 2020 release)
#   distributed-ucxx-cu13, ucxx-cu13, libucxx-cu13, libucx-cu13<1.22, rmm-cu13, librmm-cu13,
#   rapids-logger             protocol ucx/ucxx (libucx alone is ~40 MiB)
#   dask, distributed, prefect, prefect-aws, pydantic (+ their pure-Python deps)
#                             the project's own imports (tasks.training, infra_blocks)
# cudf / dask-cudf are NOT needed: the project's GPU path builds cupy-backed partitions on the workers.
# A carry is at most 64 MiB, so `fetch` packs the wheels into groups .whl/g1, .whl/g2, … of ≤ 60 MiB.
#
# Usage
#   here, once (PyPI reachable):      bash benchmarks/gpu/run.sh fetch
#   device call per group, in order, each within the 30 s the machine stays warm:
#       carry [".whl/g1"]  command: bash benchmarks/gpu/run.sh install g1
#       …
#       carry [".whl/gN"]  command: bash benchmarks/gpu/run.sh install gN && bash benchmarks/gpu/run.sh bench --record
#   (installed wheels stay in /tmp/site on the warm machine; `bench` passes its arguments to train.py and
#    writes $OUT/summary.json; with --record the figures go to benchmarks/results.jsonl there: copy the
#    printed lines or summary.json back and record them here with the card and date.)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WHEELS="${WHEELS:-$REPO/.whl}"
SITE="${SITE:-/tmp/site}"
PY="${PYTHON:-python3}"
GROUP_MIB="${GROUP_MIB:-60}"

# Packages the GPU image has (KINDS.md, 2026-11-17): never carried, never installed over.
IMAGE_HAS="numpy pandas pyarrow cupy-cuda13x cuda-bindings cuda-core cuda-pathfinder cuda-toolkit nvidia-ml-py
nvidia-nccl-cu13 numba numba-cuda llvmlite cloudpickle msgpack psutil toolz pyyaml jinja2 markupsafe packaging
fsspec click rich typer httpx httpcore h11 anyio idna certifi attrs requests urllib3 charset-normalizer six
python-dateutil pygments markdown-it-py mdurl typing-extensions shellingham prometheus-client humanize pathspec
filelock sortedcontainers tqdm pillow contourpy regex protobuf narwhals pluggy colorama zipp markdown uvloop wrapt
werkzeug tabulate scipy scikit-learn joblib threadpoolctl matplotlib cycler fonttools kiwisolver pyparsing
setuptools wheel pip"

NEEDS=(
  "xgboost-cu13==3.2.0"
  "dask-cuda>=26.10" "distributed-ucxx-cu13" "ucxx-cu13" "libucxx-cu13" "libucx-cu13<1.22" "rmm-cu13"
  "librmm-cu13" "rapids-logger"
  "dask[dataframe]==2026.7.1" "distributed==2026.7.1" "prefect==3.9.1" "prefect-aws==0.7.12"
  "pydantic>=2.14,<3"
)

fetch() {
  local all="$WHEELS/all"
  rm -rf "$WHEELS" && mkdir -p "$all"
  grep -qx '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.whl/' >> "$REPO/.git/info/exclude"
  "$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$all" "${NEEDS[@]}"
  IMAGE_HAS="$IMAGE_HAS" GROUP_MIB="$GROUP_MIB" "$PY" - "$all" "$WHEELS" <<'EOF'
import os, re, shutil, sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
skip = {norm(n) for n in os.environ["IMAGE_HAS"].split()}
limit = int(os.environ["GROUP_MIB"]) * 2**20
wheels = sorted((w for w in src.glob("*.whl") if norm(w.name.split("-")[0]) not in skip),
                key=lambda w: -w.stat().st_size)
groups: list[list[Path]] = []
for w in wheels:  # first fit, largest first
    for g in groups:
        if sum(x.stat().st_size for x in g) + w.stat().st_size <= limit:
            g.append(w)
            break
    else:
        groups.append([w])
for i, g in enumerate(groups, 1):
    (dst / f"g{i}").mkdir()
    for w in g:
        shutil.move(str(w), dst / f"g{i}" / w.name)
    print(f"g{i}: {sum(w.stat().st_size for w in (dst / f'g{i}').iterdir()) / 2**20:.1f} MiB, "
          f"{', '.join(sorted(w.name.split('-')[0] for w in g))}")
shutil.rmtree(src)
EOF
}

install() {
  mkdir -p "$SITE"
  for group in "$@"; do
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS/$group"/*.whl
    echo "installed $group into $SITE"
  done
}

bench() {
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" "$REPO/benchmarks/gpu/train.py" ${OUT:+--out "$OUT"} "$@"
}

case "${1:-}" in
  fetch) fetch ;;
  install) shift; install "$@" ;;
  bench) shift; bench "$@" ;;
  all) shift; install $(cd "$WHEELS" && ls -d g*) && bench "$@" ;;
  *) sed -n '2,27p' "$0"; exit 2 ;;
esac
