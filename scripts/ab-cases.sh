#!/usr/bin/env bash
# Two builds side by side in one device call: each of scripts/bench-cases.sh's
# cases run by the previous build, then by the new one, case by case (so the
# machine's state drifts alike for both), and a table of the new build's
# decode and total throughput as a share of the previous build's.
#
# Usage (repository root): scripts/ab-cases.sh OLD NEW [--budget S] [CASE...]
#   OLD, NEW   the two tierlm binaries
#   CASE       bench-cases.sh's cases (default A D D4 B C: the short ones
#              first, so that what a tight budget skips is the long ones)
#   --budget S seconds this script may take (default 560)
# Results: bench-cases.sh's files per case and build under /tmp/ab-cases/
# {old,new}/, sent back as $OUT/ab-cases.tgz (the device returns few files),
# and the table in $OUT/ab-table.md, printed last.
set -uo pipefail
[ $# -ge 2 ] || { sed -n '2,13p' "$0"; exit 2; }
old=$1 new=$2; shift 2
budget=560 cases=()
while [ $# -gt 0 ]; do
  case $1 in
    --budget) budget=$2; shift 2 ;;
    A|B|C|D|D4) cases+=("$1"); shift ;;
    *) echo "ab-cases.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ ${#cases[@]} -gt 0 ] || cases=(A D D4 B C)
out=/tmp/ab-cases
rm -rf "$out"
mkdir -p "$out/old" "$out/new"
deadline=$((SECONDS + budget))
# Rough whole-process seconds per case and build (bench-cases.sh's estimates).
declare -A est=([A]=20 [B]=80 [C]=70 [D]=20 [D4]=30)
for c in "${cases[@]}"; do
  left=$((deadline - SECONDS))
  if [ "$left" -lt $((2 * est[$c] + 20)) ]; then
    echo "$c: skipped, $left s left" >&2
    continue
  fi
  for b in old new; do
    # bench-cases.sh gives a case its budget less 20 s; the previous build
    # leaves the new one at least as much as it had.
    if [ "$b" = old ]; then bin=$old share=$(( (deadline - SECONDS) / 2 )); else bin=$new share=$((deadline - SECONDS)); fi
    [ -f "$out/$b/doc.md" ] || cp docs/benchmarks.md "$out/$b/doc.md"
    bash "$(dirname "$0")/bench-cases.sh" --tierlm "$bin" --out "$out/$b" --doc "$out/$b/doc.md" \
      --budget "$share" "$c" >"$out/$b/$c.script.log" 2>&1
    echo "$c $b: exit $?" >&2
  done
done
python3 - "$out" "${cases[@]}" <<'EOF' | tee "$out/table.md"
import json, os, sys
out, cases = sys.argv[1], sys.argv[2:]
def read(b, c):
    try:
        t = open(os.path.join(out, b, c + ".json")).read()
        return json.loads(t[t.index("{"):])
    except (OSError, ValueError):
        return None
print("| case | decode, previous | decode, new | new / previous | total, previous | total, new | new / previous |")
print("|---|---|---|---|---|---|---|")
for c in cases:
    o, n = read("old", c), read("new", c)
    if not o or not n:
        print(f"| {c} | {'-' if not o else 'ok'} | {'-' if not n else 'ok'} | not both run | | | |")
        continue
    row = [c]
    for k in ("decode_tokens_per_s", "total_tokens_per_s"):
        a, b = o[k], n[k]
        row += [f"{a:,.1f}", f"{b:,.1f}", f"{100 * b / a:.1f}%"]
    print("| " + " | ".join(row) + " |")
EOF
cp "$out/table.md" "${OUT:-/tmp}/ab-table.md"
[ -z "${OUT:-}" ] || tar czf "$OUT/ab-cases.tgz" -C /tmp ab-cases
