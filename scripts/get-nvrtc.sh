#!/usr/bin/env bash
# NVRTC and the CUDA headers it compiles against, for a machine without a
# GPU or a CUDA toolkit, from NVIDIA's pip wheels, so that the kernel
# sources' compile checks (`llm_source_compiles_or_nvrtc_is_missing` and
# the like, which skip without NVRTC) run before any device time is spent:
#
#   bash scripts/get-nvrtc.sh [DIR]        # default /tmp/cuda
#   CUDA_HOME=/tmp/cuda LD_LIBRARY_PATH=/tmp/cuda/lib \
#     cargo test -p ops -p compression -p tier-cuda --lib
#
# Needs pip and network; writes only under DIR.
set -euo pipefail
dir=${1:-/tmp/cuda}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --no-deps -q -d "$work" nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79
mkdir -p "$dir/include" "$dir/lib"
python3 - "$work" "$dir" <<'PY'
import glob, os, shutil, sys, zipfile
work, out = sys.argv[1], sys.argv[2]
for wheel in glob.glob(os.path.join(work, "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            parts = name.split("/")
            if "include" in parts[:-1] and not name.endswith("/"):
                dest = os.path.join(out, "include", *parts[parts.index("include") + 1:])
            elif "lib" in parts[:-1] and ".so" in parts[-1]:
                dest = os.path.join(out, "lib", parts[-1])
            else:
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(name) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
PY
# The loader looks for libnvrtc.so.
[ -e "$dir/lib/libnvrtc.so" ] || ln -s libnvrtc.so.12 "$dir/lib/libnvrtc.so"
echo "NVRTC in $dir/lib, headers in $dir/include: CUDA_HOME=$dir LD_LIBRARY_PATH=$dir/lib"
