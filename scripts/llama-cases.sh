#!/usr/bin/env bash
# The Llama family's benchmark cases on the GPU machine (issue 11), in one
# call: each tierlm case and, where one exists, its baseline, side by side.
#
#   E  llama-3.1-8b, bf16, everything on the GPU, 64 prompts of 512 tokens,
#      32 new: tierlm against Hugging Face transformers' generate
#      (scripts/hf_llama_bench.py, the same shapes with random weights).
#   F  llama-3.1-70b, bf16 (141 GB), the weights that do not fit the GPU
#      streamed from pinned host memory, cache on the GPU, 2 GPU batches:
#      tierlm with the policy search choosing the split (--policy auto),
#      and with a hand split; then transformers with accelerate's
#      dispatch over the GPU (52 GiB of weights, leaving room for the
#      cache and the prefill) and host memory (the other ~85 GB), random
#      weights materialised in place (hf_llama_bench.py --gpu-weights-gib),
#      4 new tokens (each of its decode steps moves the host layers over
#      PCIe; its rate per step is what is compared).
#   F1 F without the policy search's run (the hand split and transformers).
#   F4 llama-3.1-70b with 4-bit weights (--compress-weight, FlexGen's groups
#      of 64 from bf16), every packed layer resident, 64 prompts: the
#      search's choice with --compress auto, and the same flags by hand.
#
# Usage (repository root): scripts/llama-cases.sh [--tierlm PATH] [CASE...]
# Results: $OUT/llama-cases/ (else /tmp/llama-cases): one .json and .log a
# run, and table.md, printed last.
set -uo pipefail

tierlm=.gpu/tierlm out=${OUT:-/tmp}/llama-cases cases=()
while [ $# -gt 0 ]; do
  case $1 in
    --tierlm) tierlm=$2; shift 2 ;;
    E|F|F1|F4) cases+=("$1"); shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "llama-cases.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
[ ${#cases[@]} -gt 0 ] || cases=(E F F4)
mkdir -p "$out"
common="--dummy --prompt-len 512 --gen-len 32 --json"

run() {  # name limit command...
  local name=$1 limit=$2; shift 2
  echo "$name: $*" >&2
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.json" 2>"$out/$name.log"
  echo "$name: exit $?" >&2
}

for c in "${cases[@]}"; do
  case $c in
    E)
      # shellcheck disable=SC2086
      run E-tierlm 180 "$tierlm" bench --model llama-3.1-8b $common --percent 100 0 100 0 100 0 --gpu-batch-size 64
      run E-transformers 300 python3 "$(dirname "$0")/hf_llama_bench.py" --preset llama-3.1-8b --prompts 64 \
        --prompt-len 512 --gen-len 32
      ;;
    F|F1)
      # shellcheck disable=SC2086
      [ "$c" = F1 ] || run F-tierlm-auto 540 "$tierlm" bench --model llama-3.1-70b $common --num-prompts 64 --num-gpu-batches 2
      # shellcheck disable=SC2086
      run F-tierlm-hand 540 "$tierlm" bench --model llama-3.1-70b $common --percent 40 60 100 0 100 0 \
        --gpu-batch-size 32 --num-gpu-batches 2
      run F-transformers 540 python3 "$(dirname "$0")/hf_llama_bench.py" --preset llama-3.1-70b --prompts 64 \
        --prompt-len 512 --gen-len 4 --gpu-weights-gib 52
      ;;
    F4)
      # shellcheck disable=SC2086
      run F4-tierlm-auto 400 "$tierlm" bench --model llama-3.1-70b $common --num-prompts 64 --compress auto
      # shellcheck disable=SC2086
      run F4-tierlm-hand 400 "$tierlm" bench --model llama-3.1-70b $common --percent 100 0 100 0 100 0 \
        --gpu-batch-size 64 --compress-weight
      ;;
  esac
done

python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
rows = ["| run | prompts | load s | prefill tok/s | decode tok/s | total tok/s | predicted total |",
        "|---|---|---|---|---|---|---|"]
for name in sorted(f[:-5] for f in os.listdir(out) if f.endswith(".json")):
    try:
        r = json.loads(open(os.path.join(out, name + ".json")).read().strip().splitlines()[-1])
    except (IndexError, ValueError):
        rows.append(f"| {name} | failed: see {name}.log | | | | | |")
        continue
    f = lambda v: "-" if v is None else f"{v:,.1f}"
    rows.append(f"| {name} | {r.get('prompts')} | {f(r.get('load_s'))} | {f(r.get('prefill_tokens_per_s'))} | "
                f"{f(r.get('decode_tokens_per_s'))} | {f(r.get('total_tokens_per_s'))} | "
                f"{f(r.get('predicted_total_tokens_per_s'))} |")
open(os.path.join(out, "table.md"), "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
EOF

# The device returns at most 8 files from $OUT: under it, the results
# travel as one archive (tar xzf llama-cases.tgz to read them).
if [ -n "${OUT:-}" ] && [ -d "$out" ] && [ "${out#"$OUT"/}" != "$out" ]; then
  tar czf "$OUT/$(basename "$out").tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
fi
