#!/usr/bin/env bash
# One device call that verifies what landed without a GPU and measures it
# against earlier builds. Written 2026-12-08, when the op layer's views
# (`ops::gpu::view`), the hidden states' copies ahead of the copy queue
# (`CopyMatrix::copy_here`) and the plan's hidden-state bytes landed after
# the session's device time was spent. Before it, here:
#
#   cargo xtask gpu-bundle --only ops--test--llm_gpu,engine-llama--test--gpu_engine,\
#     tierlm--test--gpu_engine,tierlm--test--gpu_tiered,tierlm--test--gpu_cache,\
#     tierlm--test--gpu_compressed,tierlm--test--llama_cli
#   mkdir -p .gpu/old .gpu/prev
#   cp <tierlm built at c886cdd, before the runtime> .gpu/old/tierlm      # issue 10's A-D4 baseline
#   cp <tierlm built at 84e47a2, last GPU-measured main> .gpu/prev/tierlm # case E's and C's baseline
#   (cd .gpu && tar cf - * | xz -T2 -4 > ../pack.tar.xz) && rm -rf .gpu/* && mv pack.tar.xz .gpu/
#
# (xz keeps the bundle and the two baselines under the 64 MiB a call
# carries; strip the baselines first.) Then `run` with carry [".gpu"]:
#   TOTAL=570 bash scripts/verify-call.sh
# It runs the GPU tests, case E (previous build, new build), issue 10's
# cases old against new (scripts/ab-cases.sh: D4 B C A D), and case C's
# profile with the new build when time is left; logs in $OUT/logs.tgz, a
# summary printed last.
export TIERLM_REPO_ROOT=$PWD RUST_BACKTRACE=1
TOTAL=${TOTAL:-570}
[ -f .gpu/pack.tar.xz ] && tar xJf .gpu/pack.tar.xz -C .gpu
L=$OUT/logs; mkdir -p "$L"; T=.gpu/tests
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$L/gpu.txt"
step() { local name=$1 lim=$2; shift 2; local left=$((TOTAL - SECONDS)); [ "$lim" -gt "$left" ] && lim=$left
  [ "$lim" -lt 10 ] && { echo "$name skipped" | tee -a "$L/summary.txt"; return; }
  local t0=$SECONDS; timeout "$lim" "$@" >"$L/$name.log" 2>&1; local rc=$?
  printf "%-28s rc=%-4s %4d s  %s\n" "$name" "$rc" "$((SECONDS - t0))" "$(grep -h 'test result' "$L/$name.log" | tail -1)" \
    | tee -a "$L/summary.txt"; }
for t in ops--test--llm_gpu engine-llama--test--gpu_engine tierlm--test--gpu_engine tierlm--test--gpu_tiered \
  tierlm--test--gpu_cache tierlm--test--gpu_compressed; do
  step "$t" 60 "$T/$t" --test-threads=1
done
step llama_cli 40 "$T/tierlm--test--llama_cli" --test-threads=1 the_gpu_engine flags_the
E="--model llama-3.1-8b --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 64 --prompt-len 512 --gen-len 32 --json"
# shellcheck disable=SC2086  # the flags are words
[ -x .gpu/prev/tierlm ] && step prev_E 40 .gpu/prev/tierlm bench $E
# shellcheck disable=SC2086
step new_E 40 .gpu/tierlm bench $E
left=$((TOTAL - SECONDS - 100))
[ -x .gpu/old/tierlm ] && [ $left -gt 100 ] && step ab_cases $((left + 20)) \
  bash scripts/ab-cases.sh .gpu/old/tierlm .gpu/tierlm --budget "$left" D4 B C A D
left=$((TOTAL - SECONDS - 10))
C="--model opt-13b --dummy --percent 0 75 0 100 0 100 --gpu-batch-size 32 --num-gpu-batches 2 --cpu-cache-compute --prompt-len 512 --gen-len 8 --offload-dir offload"
# shellcheck disable=SC2086
[ $left -gt 70 ] && step profile_C "$left" env TIERLM_GPU_PROFILE=1 .gpu/tierlm bench $C
rm -rf offload
for f in "$L"/*.log; do echo "--- $f"; grep -E "FAILED|panicked|decode wait|decode attention|limit" "$f" | head -12; done
python3 - "$L" <<'PY'
import json, os, sys
for n in ['prev_E', 'new_E']:
    try:
        t = open(os.path.join(sys.argv[1], n + '.log')).read(); d = json.loads(t[t.index('{'):])
        print(n, 'prefill', round(d['prefill_tokens_per_s']), 'decode', round(d['decode_tokens_per_s']),
              'total', round(d['total_tokens_per_s']), 'limit', round(d['limits']['decode_tokens_per_s_limit']))
    except Exception as e: print(n, 'no result:', e)
PY
cat "$L/summary.txt"; cat "$OUT/ab-table.md" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
