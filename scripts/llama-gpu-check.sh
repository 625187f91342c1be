#!/usr/bin/env bash
# The first checks of the Llama family's GPU engine on the GPU machine, in
# one call (after `cargo xtask gpu-bundle`): the op layer's f16/bf16 kernels
# against the CPU reference, the engine against transformers on the
# fixtures (4-bit weights included), the command's GPU path, case E with
# its limits from the same run and its profile, then OPT's GPU engine and
# 4-bit tests and the dequantizer's (bf16 output included). Logs and a summary in $OUT/logs (else
# /tmp/logs). The device tool carries at most 64 MiB: bundle only the
# executables named here:
#   cargo xtask gpu-bundle --only ops--test--llm_gpu,engine-llama--test--gpu_engine,\
#     tierlm--test--llama_cli,tierlm--test--gpu_engine,tierlm--test--gpu_compressed,\
#     compression--test--gpu,compression--test--gpu_quant,tierlm--test--gpu_cache,\
#     tierlm--test--gpu_tiered
#
# Usage (repository root): bash scripts/llama-gpu-check.sh
export TIERLM_REPO_ROOT=$PWD RUST_BACKTRACE=1
L=${OUT:-/tmp}/logs; mkdir -p "$L"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$L/gpu.txt"
T=.gpu/tests
[ -d $T ] || { mkdir -p $T && tar -C .gpu -xzf .gpu/tests.tar.gz; }
step() {  # name limit command...
  local name=$1 lim=$2; shift 2; local t0=$SECONDS
  timeout "$lim" "$@" >"$L/$name.log" 2>&1; local rc=$?
  printf "%-22s rc=%-4s %4d s\n" "$name" "$rc" "$((SECONDS - t0))" | tee -a "$L/summary.txt"
}
step ops_llm_gpu 60 $T/ops--test--llm_gpu --test-threads=1 --nocapture
step llama_gpu_engine 150 $T/engine-llama--test--gpu_engine --test-threads=1 --nocapture
step llama_cli 120 $T/tierlm--test--llama_cli --test-threads=1 --nocapture the_gpu_engine flags_the
# Case E with its limits from the same run, then where a step's time goes.
step bench_E 120 .gpu/tierlm bench --model llama-3.1-8b --dummy --percent 100 0 100 0 100 0 \
  --gpu-batch-size 64 --prompt-len 512 --gen-len 32 --json
step profile_E 120 env TIERLM_GPU_PROFILE=1 .gpu/tierlm bench --model llama-3.1-8b --dummy \
  --percent 100 0 100 0 100 0 --gpu-batch-size 64 --prompt-len 512 --gen-len 32
# OPT's GPU tests, unchanged by the Llama work but sharing its ops.
step opt_gpu_engine 150 $T/tierlm--test--gpu_engine --test-threads=1
# OPT's 4-bit weights, now through the runtime's Unpacker, and the bf16
# build of the dequantizer against the CPU.
step opt_gpu_compressed 150 $T/tierlm--test--gpu_compressed --test-threads=1
# The runtime's tiered cache under OPT (4-bit on the GPU included).
step opt_gpu_cache 150 $T/tierlm--test--gpu_cache --test-threads=1 --nocapture
step opt_gpu_tiered 150 $T/tierlm--test--gpu_tiered --test-threads=1
step dequant_gpu 120 $T/compression--test--gpu --test-threads=1
step quant_gpu 120 $T/compression--test--gpu_quant --test-threads=1
for f in "$L"/*.log; do
  echo "--- $f"; grep -E "test result|panicked|FAILED|worst|within|tokens_per_s|error|limit| ms$" "$f" | head -40
done
cat "$L/summary.txt"

# The device returns at most 8 files from $OUT: under it, the logs travel
# as one archive (tar xzf logs.tgz to read them).
if [ -n "${OUT:-}" ] && [ -d "$L" ] && [ "${L#"$OUT"/}" != "$L" ]; then
  tar czf "$OUT/logs.tgz" -C "$(dirname "$L")" "$(basename "$L")" && rm -rf "$L"
fi
