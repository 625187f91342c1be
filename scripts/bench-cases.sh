#!/usr/bin/env bash
# Issue 6's benchmark cases on the GPU machine, with FlexLLMGen's flags
# (../shared/reference/peer-baseline.md): one `tierlm bench --json` per case,
# then a markdown table (scripts/bench_table.py) in $OUT/bench-cases/table.md
# and in docs/benchmarks.md between the bench-cases markers (a copy of the
# updated file goes to $OUT/bench-cases/benchmarks.md to be brought back).
#
# Usage (repository root): scripts/bench-cases.sh [options] [CASE...]
#   CASE             A B C D D4 G (default: A B C D D4, in that order; G,
#                    OPT-175B, only when named: it takes a call of its own)
#   --tierlm PATH    the binary (default .gpu/tierlm)
#   --offload-dir D  disk tier's directory (default ./offload; tierlm's arena
#                    files in it are removed after each case, and D itself
#                    if empty); no spaces in D
#   --out DIR        results (default $OUT/bench-cases, else /tmp/bench-cases)
#   --doc PATH       file whose marked section is replaced (default docs/benchmarks.md)
#   --budget S       seconds this call may take (default 570, under the
#                    device's 600 s a command); a case gets
#                    min(540, what is left - 20) and is skipped below 60
#   --flexllmgen DIR run FlexLLMGen (prepared by scripts/get-flexllmgen.sh)
#                    right after tierlm for each case it has flags for (A B
#                    C D): the table's ratios come from that same call, and
#                    a case without the peer in the call shows none
#   --dry-run        print the plan and the commands, run nothing
#   --from DIR       run nothing: render the table from DIR's .meta/.json/.log
#
# One 600 s call fits A B D D4 (about 5 minutes); run C (3-4 minutes) in a
# call of its own. Rows of cases not run in a call stay in the docs table.
set -euo pipefail

tierlm=.gpu/tierlm offload=offload out=${OUT:-/tmp}/bench-cases doc=docs/benchmarks.md
budget=570 dry=0 from="" peer="" cases=()
while [ $# -gt 0 ]; do
  case $1 in
    --tierlm) tierlm=$2; shift 2 ;;
    --offload-dir) offload=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --doc) doc=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --flexllmgen) peer=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    A|B|C|D|D4|G) cases+=("$1"); shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "bench-cases.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[ ${#cases[@]} -gt 0 ] || cases=(A B C D D4)
table=(python3 "$(dirname "$0")/bench_table.py" --out "$out" --doc "$doc")

if [ -n "$from" ]; then
  "${table[@]}" --dir "$from" "${cases[@]}"
  mkdir -p "$out" && cp "$doc" "$out/benchmarks.md"
  exit 0
fi

# The flags of each case (dummy weights, prompt 512); A, B, D and D4 are the
# commands of docs/benchmarks.md's earlier runs, C is FlexLLMGen's.
flags() {
  case $1 in
    # A: OPT-6.7B all on the GPU, 32 prompts (FlexLLMGen with its --overlap False, its faster
    #    setting here; tierlm always overlaps). Target (issue 14): decode >= 90% and total >= 88%
    #    of the run's own limits.
    A) echo "--model opt-6.7b --dummy --percent 100 0 100 0 100 0 --gpu-batch-size 32 --prompt-len 512 --gen-len 32" ;;
    # B: OPT-30B weights on pinned host memory (--pin-weight defaults to true),
    #    cache and activations on the GPU, 2 x 32 prompts (FlexLLMGen: 54.8 / 51.9).
    #    Target: decode >= 95% of the weight-streaming limit, start-up < 30 s.
    B) echo "--model opt-30b --dummy --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2 --prompt-len 512 --gen-len 32 --offload-dir $offload" ;;
    # C: OPT-13B weights 1/4 disk 3/4 host, cache on the host with attention on
    #    the CPU, 2 x 32 prompts, 8 new tokens (FlexLLMGen: 21.9 / 19.5).
    #    Target: decode >= 90% of the limit of the links' bytes over their rates.
    C) echo "--model opt-13b --dummy --percent 0 75 0 100 0 100 --gpu-batch-size 32 --num-gpu-batches 2 --cpu-cache-compute --prompt-len 512 --gen-len 8 --offload-dir $offload" ;;
    # D: OPT-6.7B weights on pinned host memory, cache on the GPU, 32 prompts
    #    (FlexLLMGen: 113.0 / 111.1).
    D) echo "--model opt-6.7b --dummy --percent 0 100 100 0 100 0 --gpu-batch-size 32 --prompt-len 512 --gen-len 32 --offload-dir $offload" ;;
    # D4: D with 4-bit weights (no FlexLLMGen run to compare).
    D4) echo "$(flags D) --compress-weight" ;;
    # G: OPT-175B, 4-bit weights streamed from page-locked host memory (about 98 GB packed),
    #    a 4-bit cache resident on the GPU, 2 x 40 prompts: the most the H100's 80 GB holds
    #    by the plan (cache 0.7 GB a prompt packed, two slots of one GPU batch's layer
    #    unpacked, the prefill's scratch); two GPU batches let one batch's cache and
    #    compute overlap the other's while the weights stream once per step.
    #    Target (issue 14): decode >= 90% of the packed bytes over the pinned rate, start-up < 90 s.
    G) echo "--model opt-175b --dummy --percent 0 100 100 0 100 0 --compress-weight --compress-cache --gpu-batch-size 40 --num-gpu-batches 2 --prompt-len 512 --gen-len 32 --offload-dir $offload" ;;
  esac
}
# Rough seconds per case on the H100 (whole process: roofline, load, warm-up, run).
declare -A est=([A]=60 [B]=120 [C]=240 [D]=60 [D4]=60 [G]=240)

# FlexLLMGen's flags for the same work (peer-baseline.md): A with its
# --overlap False, its faster setting there. D4 has no peer run.
peer_flags() {
  case $1 in
    A) echo "--model facebook/opt-6.7b --percent 100 0 100 0 100 0 --gpu-batch-size 32 --overlap False" ;;
    B) echo "--model facebook/opt-30b --percent 0 100 100 0 100 0 --gpu-batch-size 32 --num-gpu-batches 2" ;;
    C) echo "--model facebook/opt-13b --percent 0 75 0 100 0 100 --gpu-batch-size 32 --num-gpu-batches 2 --cpu-cache-compute --gen-len 8" ;;
    D) echo "--model facebook/opt-6.7b --percent 0 100 100 0 100 0 --gpu-batch-size 32" ;;
    G) echo "--model facebook/opt-175b --percent 0 100 100 0 100 0 --gpu-batch-size 40 --num-gpu-batches 2 --compress-weight --compress-cache" ;;
  esac
}
# Rough seconds of FlexLLMGen's run per case (its B initialises for ~100 s).
declare -A peer_est=([A]=40 [B]=150 [C]=90 [D]=60 [D4]=0 [G]=240)

total=0
for c in "${cases[@]}"; do
  total=$((total + est[$c]))
  [ -z "$peer" ] || total=$((total + peer_est[$c]))
done
echo "plan: ${cases[*]}, about ${total} s of the ${budget} s budget (A ~60, B ~120, C ~240, D ~60, D4 ~60;" \
  "one call fits A B D D4, C goes alone)" >&2
[ "$total" -le "$budget" ] || echo "warning: may not fit; the cases at the end are skipped if time runs out" >&2

if [ "$dry" = 1 ]; then
  for c in "${cases[@]}"; do
    echo "$c: timeout 540 $tierlm bench $(flags "$c") --json"
    if [ -n "$peer" ] && [ -n "$(peer_flags "$c")" ]; then
      echo "$c peer: (cd $peer && python3 -m flexllmgen.flex_opt --path _DUMMY_ --offload-dir OFFLOAD $(peer_flags "$c"))"
    fi
  done
  exit 0
fi

clean_offload() {  # tierlm's disk arenas, then the directory if that left it empty
  rm -f "$offload"/.tierlm-disk*.arena 2>/dev/null || true
  rmdir "$offload" 2>/dev/null || true
}
trap clean_offload EXIT
mkdir -p "$out"
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) || device=""
deadline=$((SECONDS + budget))
for c in "${cases[@]}"; do
  limit=$((deadline - SECONDS - 20)); [ "$limit" -le 540 ] || limit=540
  cmd="$tierlm bench $(flags "$c") --json"
  rc=0 start=$(date +%s.%N) date=$(date -u '+%Y-%m-%d %H:%M UTC')
  if [ "$limit" -lt 60 ]; then
    rc=skipped; echo "$c: skipped, ${limit} s left" >&2
  else
    echo "$c: timeout $limit $cmd" >&2
    # shellcheck disable=SC2086  # the flags are words
    timeout --kill-after=10 "$limit" $cmd >"$out/$c.json" 2>"$out/$c.log" || rc=$?
    echo "$c: exit $rc, $(tail -n 1 "$out/$c.log" 2>/dev/null)" >&2
  fi
  printf 'case=%s\nrc=%s\nstart=%s\nend=%s\ndate=%s\ndevice=%s\ncmd=timeout %s %s\n' \
    "$c" "$rc" "$start" "$(date +%s.%N)" "$date" "$device" "$limit" "$cmd" >"$out/$c.meta"
  clean_offload
  rm -f "$out/$c.peer.meta" "$out/$c.peer.log"
  if [ -n "$peer" ] && [ -n "$(peer_flags "$c")" ]; then
    limit=$((deadline - SECONDS - 20)); [ "$limit" -le 540 ] || limit=540
    mkdir -p "$offload"
    pcmd="python3 -m flexllmgen.flex_opt --path _DUMMY_ --offload-dir $(cd "$offload" && pwd) $(peer_flags "$c")"
    prc=0
    if [ "$limit" -lt 60 ]; then
      prc=skipped; echo "$c peer: skipped, ${limit} s left" >&2
    else
      # G: FlexLLMGen's 175B initialisation alone can outlast a call; give
      # it 300 s and report how far it got.
      [ "$c" != G ] || [ "$limit" -le 300 ] || limit=300
      echo "$c peer: timeout $limit $pcmd (in $peer)" >&2
      # The machine's host memory in use (MemTotal - MemAvailable) every
      # 2 s while the peer runs: its peak goes to the end of its log.
      (while sleep 2; do
        awk '/^MemTotal/{t=$2} /^MemAvailable/{a=$2} END{printf "%.2f\n", (t-a)/1048576}' /proc/meminfo
      done) >"$out/$c.peer.mem" 2>/dev/null &
      sampler=$!
      # shellcheck disable=SC2086  # the flags are words
      (cd "$peer" && timeout --kill-after=10 "$limit" $pcmd) >"$out/$c.peer.log" 2>&1 || prc=$?
      kill "$sampler" 2>/dev/null || true
      echo "peak host memory in use while it ran: $(sort -n "$out/$c.peer.mem" | tail -n 1) GiB" >>"$out/$c.peer.log"
      echo "$c peer: exit $prc, $(grep -h 'total throughput' "$out/$c.peer.log" | tail -n 1)" >&2
      rm -rf "${offload:?}"/* 2>/dev/null || true
    fi
    printf 'rc=%s\ncmd=(cd %s \&\& timeout %s %s)\n' "$prc" "$peer" "$limit" "$pcmd" >"$out/$c.peer.meta"
    clean_offload
  fi
done

"${table[@]}" --dir "$out" "${cases[@]}"
cp "$doc" "$out/benchmarks.md"

# The device returns at most 8 files from $OUT: under it, the results
# travel as one archive (tar xzf bench-cases.tgz to read them).
if [ -n "${OUT:-}" ] && [ -d "$out" ] && [ "${out#"$OUT"/}" != "$out" ]; then
  tar czf "$OUT/$(basename "$out").tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
fi
