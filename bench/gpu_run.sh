#!/usr/bin/env bash
# bench_gpu.py on this workplace's lent GPU (the device tool's `run`), from the repository root:
#   bash bench/gpu_run.sh --phases peer,mesh --compile-rows 2,32 ...     (arguments go to bench_gpu.py)
# Needs, carried as `.whl` (about 29 MB, see docs/benchmarks.md): .whl/site.tar.xz, the packages the
# device image lacks, installed for Python 3.12 with `pip install --target` (diffusers without its
# other pipelines, PyAV with its extension modules stripped, grpcio, protobuf, fastapi and the rest),
# and typing_extensions / prometheus_client wheels. The embedded model's weights travel with the
# tree; the benchmark builds the full-size model itself in /tmp/t2v-full (kept while the machine is).
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT" /tmp/site
if [ ! -f /tmp/site/.unpacked ]; then
    tar -xJf .whl/site.tar.xz -C /tmp/site || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    touch /tmp/site/.unpacked
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, triton, grpc, diffusers, av, fastapi, pydantic; print('torch', torch.__version__, 'triton', triton.__version__, 'grpc', grpc.__version__, 'diffusers', diffusers.__version__, 'av', av.__version__)" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
python3 bench/bench_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
