#!/usr/bin/env bash
# One device call that verifies what landed without a GPU and measures it
# against the previous build (written 2026-12-07 when no machine could be
# had; see that day's fourth closing note). Before it, here:
#   cp <previous build's tierlm> .gpu/base/tierlm        # the baseline
#   cargo xtask gpu-bundle --only ops--test--llm_gpu,engine-llama--test--gpu_engine,\
#     tierlm--test--llama_cli,tierlm--test--gpu_engine,tierlm--test--gpu_cache,tierlm--test--gpu_tiered
# then `run` with carry [".gpu"] (the working tree and .gpu under 64 MiB):
#   TOTAL=560 bash scripts/verify-call.sh
# It runs the ops and Llama GPU tests, case E (previous build, new build,
# batch 8, profile), case G when time is left, OPT's GPU tests, the
# command's Llama GPU tests and case C's probe when time is left; logs in $OUT/logs.tgz, a summary printed last.
export TIERLM_REPO_ROOT=$PWD RUST_BACKTRACE=1
TOTAL=${TOTAL:-560}
L=$OUT/logs; mkdir -p $L; T=.gpu/tests
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $L/gpu.txt
step() { local name=$1 lim=$2; shift 2; local left=$((TOTAL - SECONDS)); [ $lim -gt $left ] && lim=$left
  [ $lim -lt 10 ] && { echo "$name skipped" | tee -a $L/summary.txt; return; }
  local t0=$SECONDS; timeout "$lim" "$@" >"$L/$name.log" 2>&1; local rc=$?
  printf "%-18s rc=%-4s %4d s\n" "$name" "$rc" "$((SECONDS - t0))" | tee -a $L/summary.txt; }
E="--model llama-3.1-8b --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 64 --prompt-len 512 --gen-len 32"
step ops_llm 40 $T/ops--test--llm_gpu --test-threads=1
step llama_engine 90 $T/engine-llama--test--gpu_engine --test-threads=1
step base_E 40 .gpu/base/tierlm bench $E --json
step new_E 40 .gpu/tierlm bench $E --json
step new_b8 30 .gpu/tierlm bench ${E/--gpu-batch-size 64/--gpu-batch-size 8} --json
step profile_E 40 env TIERLM_GPU_PROFILE=1 .gpu/tierlm bench $E
left=$((TOTAL - SECONDS - 45))
[ $left -gt 170 ] && step case_G $left bash scripts/bench-cases.sh --budget $((left - 5)) G
step opt_engine 40 $T/tierlm--test--gpu_engine --test-threads=1
step opt_cache 40 $T/tierlm--test--gpu_cache --test-threads=1
step llama_cli 40 $T/tierlm--test--llama_cli --test-threads=1 the_gpu_engine flags_the
step opt_tiered 40 $T/tierlm--test--gpu_tiered --test-threads=1
left=$((TOTAL - SECONDS - 10))
[ $left -gt 150 ] && step case_C $left bash scripts/case-c-probe.sh --budget $((left - 10)) --no-second --probe-gib 4
for f in $L/*.log; do echo "--- $f"; grep -E "test result|panicked|FAILED|error|limit| ms$" "$f" | head -30; done
python3 - <<PY
import json
for n in ['base_E','new_E','new_b8']:
    try:
        t=open('$L/%s.log'%n).read(); i=t.find('{'); d=json.loads(t[i:])
        print(n, {k:v for k,v in d.items() if not isinstance(v,(dict,list))})
    except Exception as e: print(n,'parse',e)
PY
cat $L/summary.txt; tail -4 $OUT/bench-cases/table.md 2>/dev/null
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
