#!/usr/bin/env bash
# Issue 12's sweep on the GPU machine: hand policies on a coarse grid for
# OPT-30B (dummy weights, 64 prompts of 512 tokens, a few new tokens each)
# against the policy `--policy auto` chooses for the same work, measured in
# the same call(s). Each run is `tierlm bench --json`; a placement the
# machine cannot hold is refused by the placement check in about a second
# and counted as "does not fit".
#
# Usage (repository root): scripts/policy-sweep.sh [--tierlm PATH]
#          [--first N] [--last N] [--budget S] [--list]
#   --first/--last  run grid entries N..M only (1-based), to split the
#                   sweep over calls; the auto run goes with the first part
#   --budget S      stop starting runs once S seconds have passed (570)
#   --list          print the grid and exit
# Results: $OUT/policy-sweep/ (else /tmp/policy-sweep): NN.json/.log per
# entry, auto.json, and table.md (printed last; rebuilt from every result
# in the directory, so parts run in separate calls can be put together by
# copying their files into one directory and running with --first 0).
set -uo pipefail

tierlm=.gpu/tierlm out=${OUT:-/tmp}/policy-sweep first=1 last=1000 budget=570 list=0
while [ $# -gt 0 ]; do
  case $1 in
    --tierlm) tierlm=$2; shift 2 ;;
    --first) first=$2; shift 2 ;;
    --last) last=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --list) list=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "policy-sweep.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

work="--model opt-30b --dummy --prompt-len 512 --gen-len 4"
# The grid: weights (GPU%, host%; the rest on disk) x KV cache placement x
# block shape (GPU batch size x batches), 64 prompts in every block.
grid=()
for w in "100 0" "50 50" "40 60" "25 75" "0 100"; do
  for c in "100 0" "50 50" "0 100 --cpu-cache-compute"; do
    for b in "16 4" "32 2" "64 1"; do
      set -- $w; wg=$1 wc=$2
      set -- $b; bs=$1 nb=$2
      grid+=("--percent $wg $wc ${c%% --*} 100 0 --gpu-batch-size $bs --num-gpu-batches $nb$( [[ $c == *cpu-cache* ]] && echo ' --cpu-cache-compute')")
    done
  done
done
if [ "$list" = 1 ]; then
  for i in "${!grid[@]}"; do printf '%2d %s\n' $((i + 1)) "${grid[$i]}"; done
  exit 0
fi

mkdir -p "$out"
deadline=$((SECONDS + budget))
if [ "$first" -le 1 ] && [ "$first" -ge 0 ]; then
  echo "auto: $tierlm bench $work --num-prompts 64 --json" >&2
  # shellcheck disable=SC2086
  timeout 300 "$tierlm" bench $work --num-prompts 64 --json >"$out/auto.json" 2>"$out/auto.log"
fi
for i in "${!grid[@]}"; do
  n=$((i + 1))
  [ "$n" -ge "$first" ] && [ "$n" -le "$last" ] || continue
  left=$((deadline - SECONDS))
  if [ "$left" -lt 45 ]; then echo "stopping at $n: ${left} s left" >&2; break; fi
  limit=$(( left - 10 < 240 ? left - 10 : 240 ))
  name=$(printf '%02d' "$n")
  echo "$name: ${grid[$i]}" >&2
  echo "${grid[$i]}" >"$out/$name.flags"
  # shellcheck disable=SC2086
  timeout --kill-after=5 "$limit" "$tierlm" bench $work ${grid[$i]} --policy manual --json \
    >"$out/$name.json" 2>"$out/$name.log"
  rm -f offload/.tierlm-disk*.arena 2>/dev/null
done

python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        text = open(os.path.join(out, name + ".json")).read().strip().splitlines()
        return json.loads(text[-1]) if text else None
    except (OSError, ValueError):
        return None
rows, best = [], None
for f in sorted(x for x in os.listdir(out) if x.endswith(".flags")):
    name = f[:-6]
    flags = open(os.path.join(out, f)).read().strip()
    r = load(name)
    if r is None:
        log = open(os.path.join(out, name + ".log")).read() if os.path.exists(os.path.join(out, name + ".log")) else ""
        why = "does not fit" if any(s in log for s in ("does not fit", "out of GPU memory", "out of host memory")) else "failed (see log)"
        rows.append(f"| {name} | `{flags}` | {why} | | |")
        continue
    t, d = r.get("total_tokens_per_s"), r.get("decode_tokens_per_s")
    rows.append(f"| {name} | `{flags}` | {t:,.1f} | {d:,.1f} | |" if d else f"| {name} | `{flags}` | {t:,.1f} | - | |")
    if best is None or t > best[1]:
        best = (name, t, flags)
auto = load("auto")
lines = ["| # | hand policy | total tok/s | decode tok/s | |", "|---|---|---|---|---|"] + rows
if best:
    lines.append(f"\nbest hand policy: {best[0]} (`{best[2]}`), {best[1]:,.1f} total tok/s")
if auto:
    t = auto.get("total_tokens_per_s")
    lines.append(f"auto: {t:,.1f} total tok/s" + (f" = {100 * t / best[1]:.1f}% of the best hand policy" if best else ""))
open(os.path.join(out, "table.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

# The device returns at most 8 files from $OUT: under it, the results
# travel as one archive (tar xzf policy-sweep.tgz to read them).
if [ -n "${OUT:-}" ] && [ -d "$out" ] && [ "${out#"$OUT"/}" != "$out" ]; then
  tar czf "$OUT/$(basename "$out").tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
fi
