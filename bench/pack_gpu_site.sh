#!/usr/bin/env bash
# Builds .whl/, the packages bench/gpu_run.sh installs on a lent GPU machine whose image lacks them, from a
# fresh checkout (run from the repository root after `make setup`; needs PyPI):
#   bash bench/pack_gpu_site.sh            # -> .whl/site.tar.xz + two wheels, about 29 MB
# Why a script: the carry limit is 64 MiB for the tree and the packages together, and the tree is ~37 MB (the
# embedded model's weights are tracked), so the packages travel as one xz tarball of a `pip install --target`
# for the image's Python (3.12), with what the benchmarks never import taken out: diffusers' other pipelines
# and PyAV's debug symbols. The versions are the ones this checkout's .venv runs (what CI tests), so the GPU
# runs the same code. The image's own torch, transformers, numpy, huggingface-hub and the like are used there.
set -euo pipefail
VENV=${VENV:-.venv}
DEST=${DEST:-.whl}
PKGS="diffusers grpcio grpcio-health-checking grpcio-reflection protobuf fastapi starlette uvicorn pydantic
pydantic-core annotated-types typing-inspection annotated-doc python-multipart opentelemetry-api av"
WHEELS="typing-extensions prometheus-client"   # installed over the image's older ones, as plain wheels

pinned() {  # NAME -> NAME==VERSION as this checkout's venv has it
    local version
    version=$("$VENV/bin/python" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')
    [ -n "$version" ] || { echo "pack_gpu_site: $1 is not installed in $VENV (run make setup)" >&2; exit 1; }
    echo "$1==$version"
}
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64 --platform any)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
specs=()
for p in $PKGS; do specs+=("$(pinned "$p")"); done
python3 -m pip install -q --no-deps --no-compile --target "$work/site" "${platform[@]}" "${specs[@]}"
# Only the text-to-video pipeline is ever imported (diffusers' pipelines/__init__.py imports lazily; its
# lookup of a pipeline class goes through pipelines/deprecated, so that one stays).
find "$work/site/diffusers/pipelines" -mindepth 1 -maxdepth 1 -type d \
    ! -name text_to_video_synthesis ! -name deprecated ! -name __pycache__ -exec rm -rf {} +
find "$work/site" -name "*.so*" -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
find "$work/site" -name __pycache__ -type d -prune -exec rm -rf {} +
mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/site.tar.xz
tar -C "$work/site" -cf - . | xz -9e -T0 > "$DEST/site.tar.xz"
wheels=()
for p in $WHEELS; do wheels+=("$(pinned "$p")"); done
python3 -m pip download -q --no-deps -d "$DEST" "${platform[@]}" "${wheels[@]}"
# .whl/ is in .gitignore, so it travels only when a device call names it in `carry`
du -sh "$DEST"/*
