#!/usr/bin/env bash
# Train the embedded model on a lent GPU machine in one process that outlives the 10-minute device calls.
#
#   scripts/gpu_train.sh start RUN [train.py flags...]   # launch in the background, on every GPU of the host
#   scripts/gpu_train.sh watch RUN SECONDS               # wait (ends early if training ends), then pack
#
# Why: a device call lasts at most 10 minutes, but a machine stays held between calls that follow
# each other closely, and a process started in its own session (setsid) lives on between them. One
# long run with one learning-rate cosine learns more than several 9-minute runs that each restart,
# refill the latent bank and warm up again. `watch` copies the latest checkpoint (train.py
# --checkpoint-every) into $OUT in pieces of 15 MB (the device tool's file limit), so a machine taken
# back mid-run loses only the minutes since it. Rebuild a model folder here with:
#   cat DIR/RUN.tgz.* | tar xzf - -C runs
# Needs: .whl/diffusers-*.whl carried (the device image lacks diffusers), run from the repository root.
set -uo pipefail
cmd=${1:?start|watch}; run=${2:?run name, e.g. r7}
log=runs/$run.log
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
       PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

pack() {
    [ -n "${OUT:-}" ] || return 0
    cp "$log" "$OUT/" 2>/dev/null
    for _ in 1 2 3; do      # a checkpoint may be swapped in while tar reads: try again
        if [ -d "runs/$run" ] && tar czf /tmp/pack.tgz -C runs "$run" 2>/dev/null; then
            split -b 15m /tmp/pack.tgz "$OUT/$run.tgz." && return 0
        fi
        sleep 3
    done
    echo "no checkpoint of $run to pack yet"
}

case $cmd in
start)
    shift 2
    mkdir -p runs /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/diffusers-*.whl || exit 1
    python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" || exit 1
    gpus=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
    setsid nohup python3 -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m t2v.train.train --out "runs/$run" "$@" \
        > "$log" 2>&1 < /dev/null &
    echo $! > "runs/$run.pid"
    sleep 45
    tail -n 20 "$log"
    ;;
watch)
    seconds=${3:?seconds}
    pid=$(cat "runs/$run.pid" 2>/dev/null)
    for _ in $(seq "$seconds"); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$pid" 2>/dev/null && echo "training still running" || echo "training has ended"
    grep -v "kept in float32\|Writing model shards" "$log" | tail -n 25
    pack
    ;;
*)
    echo "unknown command $cmd" >&2; exit 2 ;;
esac
