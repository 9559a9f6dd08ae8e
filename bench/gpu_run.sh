#!/usr/bin/env bash
# bench_gpu.py on this workplace's lent GPU (the device tool's `run`), from the repository root:
#   bash bench/gpu_run.sh --phases peer,mesh --compile-rows 2,32 ...     (arguments go to bench_gpu.py)
#   SCRIPT=bench/bench_deepcache.py RUN_OUT=$OUT/dc bash bench/gpu_run.sh ...   (another script, its --out)
#   WHL=../../.whl bash bench/gpu_run.sh ...   (the packages elsewhere: a branch's copy under .gl/ in the checkout)
#   GPU_TESTS="tests/unit/test_short_attention.py" bash bench/gpu_run.sh ...   (then those tests, their CUDA
#       cases included, under the image's pytest, within GPU_TESTS_TIMEOUT s; output in $RUN_OUT/pytest.txt;
#       TESTS_FIRST=1 runs them before the script, so a script cut off by the call's limit cannot take them along)
# Build .whl with bench/pack_gpu_site.sh.
# Needs, carried as `.whl` (about 29 MB, see docs/benchmarks.md): .whl/site.tar.xz, the packages the
# device image lacks, installed for Python 3.12 with `pip install --target` (diffusers without its
# other pipelines, PyAV with its extension modules stripped, grpcio, protobuf, fastapi and the rest),
# and typing_extensions / prometheus_client wheels. The embedded model's weights travel with the
# tree; the benchmark builds the full-size model itself in /tmp/t2v-full (kept while the machine is).
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
WHL=${WHL:-.whl}
SCRIPT=${SCRIPT:-bench/bench_gpu.py}
RUN_OUT=${RUN_OUT:-$OUT}
mkdir -p "$OUT" "$RUN_OUT" /tmp/site
# A machine still warm from the last call keeps /tmp/site: unpacked again only when the carried packages differ
carried=$(cat "$WHL"/* | sha256sum | cut -c1-16)
if [ "$(cat /tmp/site/.unpacked 2>/dev/null)" != "$carried" ]; then
    rm -rf /tmp/site && mkdir -p /tmp/site
    tar -xJf "$WHL/site.tar.xz" -C /tmp/site || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHL"/*.whl || exit 1
    echo "$carried" > /tmp/site/.unpacked
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, triton, grpc, diffusers, av, fastapi, pydantic; print('torch', torch.__version__, 'triton', triton.__version__, 'grpc', grpc.__version__, 'diffusers', diffusers.__version__, 'av', av.__version__)" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
run_tests() {
    [ -n "${GPU_TESTS:-}" ] || return 0
    # shellcheck disable=SC2086 - a list of test paths; written as it runs, so a call cut short keeps what ran
    timeout "${GPU_TESTS_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" $GPU_TESTS \
        > "$RUN_OUT/pytest.txt" 2>&1
    local tests=$?
    tail -40 "$RUN_OUT/pytest.txt"
    return $tests
}
tests=0
if [ "${TESTS_FIRST:-0}" = 1 ]; then run_tests; tests=$?; fi
python3 "$SCRIPT" --out "$RUN_OUT" "$@" 2>&1 | tee "$RUN_OUT/log.txt"
status=${PIPESTATUS[0]}
if [ "${TESTS_FIRST:-0}" != 1 ]; then run_tests; tests=$?; fi
[ "$status" -ne 0 ] || status=$tests
exit "$status"
