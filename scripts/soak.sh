#!/usr/bin/env bash
# Soak run of the CPU engine (issue 13): one tierlm process doing at least
# 10,000 decode steps with half the weights and half of each batch's KV
# cache on disk, its resident memory (VmRSS) and open file descriptors
# sampled every 0.5 s. Verdict: resident memory flat after warm-up (growth
# under 1%) and the descriptor count flat.
#
#   scripts/soak.sh [BATCHES] [NEW_TOKENS]
#
# BATCHES batches of 4 prompts (100 by default), NEW_TOKENS tokens each
# (101: 100 decode steps after the prefill's token), so 10,000 decode steps
# by default. `generate --input` runs them one batch after another: each
# batch allocates its caches (in memory and on disk) and frees them, and
# the streamed layers are read back from disk at every step. The model is a
# small OPT with dummy weights (config.json written here).
#
# Environment: TIERLM_BIN (a tierlm binary; default: build the release one),
# SOAK_DIR (where to work; default a temporary directory, removed after),
# SOAK_WARMUP (fraction of the run counted as warm-up, default 0.1).
#
# Growth is the peak VmRSS of the last quarter of the run over the peak of
# the quarter after warm-up (peaks of windows, not single samples: the
# resident set rises and falls with every batch's caches).
set -euo pipefail

batches=${1:-100}
new_tokens=${2:-101}
batch_size=4
prompt_len=8
root=$(cd "$(dirname "$0")/.." && pwd)

if [[ -n ${TIERLM_BIN:-} ]]; then
    bin=$TIERLM_BIN
else
    (cd "$root" && cargo build --release --bin tierlm >&2)
    bin=$root/target/release/tierlm
fi

if [[ -n ${SOAK_DIR:-} ]]; then
    dir=$SOAK_DIR
    mkdir -p "$dir"
else
    dir=$(mktemp -d -t tierlm-soak.XXXXXX)
    trap 'rm -rf "$dir"' EXIT
fi
mkdir -p "$dir/model" "$dir/offload"
rm -f "$dir/results.jsonl"

# 4 layers of 256 wide; a vocabulary of 16,384 makes an early end of
# sequence (id 2) rare, and each batch runs until its longest sequence ends.
cat >"$dir/model/config.json" <<'EOF'
{"model_type": "opt", "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4,
 "ffn_dim": 1024, "vocab_size": 16384, "max_position_embeddings": 512}
EOF
awk -v n=$((batches * batch_size)) -v len=$prompt_len 'BEGIN {
    srand(13);
    for (i = 0; i < n; i++) {
        printf "{\"input_ids\": [2";
        for (j = 1; j < len; j++) printf ", %d", 4 + int(rand() * 16000);
        print "]}";
    }
}' >"$dir/prompts.jsonl"

cmd=("$bin" generate --model "$dir/model" --dummy --input "$dir/prompts.jsonl" --output "$dir/results.jsonl"
    --max-new-tokens "$new_tokens" --gpu-batch-size "$batch_size" --temperature 0.7 --seed 1
    --percent 0 50 0 50 0 100 --offload-dir "$dir/offload")
echo "command: ${cmd[*]}" >&2
start=$(date +%s.%N)
"${cmd[@]}" >/dev/null 2>"$dir/stderr.log" &
pid=$!

samples=$dir/samples.tsv
: >"$samples"
while kill -0 "$pid" 2>/dev/null; do
    now=$(date +%s.%N)
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l || true)
    done_lines=$({ wc -l <"$dir/results.jsonl"; } 2>/dev/null || echo 0)
    [[ -n $rss && $fds -gt 0 ]] && printf '%s\t%s\t%s\t%s\n' "$now" "$rss" "$fds" "$done_lines" >>"$samples"
    sleep 0.5
done
status=0
wait "$pid" || status=$?
end=$(date +%s.%N)
if [[ $status -ne 0 ]]; then
    echo "tierlm exited with $status:" >&2
    cat "$dir/stderr.log" >&2
    exit 1
fi
leftover=$(find "$dir/offload" -mindepth 1 | wc -l)

python3 - "$samples" "$dir/results.jsonl" "$start" "$end" "$batch_size" "${SOAK_WARMUP:-0.1}" "$leftover" <<'EOF'
import json, sys

samples_path, results_path, start, end, batch, warm, leftover = sys.argv[1:]
start, end, batch, warm, leftover = float(start), float(end), int(batch), float(warm), int(leftover)
rows = [line.split("\t") for line in open(samples_path) if line.strip()]
samples = [(float(t) - start, int(rss) * 1024, int(fds), int(n)) for t, rss, fds, n in rows]
results = [json.loads(line) for line in open(results_path)]
lens = [len(r["output_ids"]) for r in results]
# A batch decodes until its longest sequence ends: one step per token after
# the first (which the prefill gives).
steps = sum(max(lens[i:i + batch]) - 1 for i in range(0, len(lens), batch))
tokens = sum(lens)
duration = end - start
if len(samples) < 8:
    sys.exit(f"only {len(samples)} samples: the run is too short to judge")
n = len(samples)
w = max(1, int(n * warm))
after = samples[w:]
q = max(1, len(after) // 4)
early, late = after[:q], after[-q:]
early_peak = max(s[1] for s in early)
late_peak = max(s[1] for s in late)
growth = (late_peak - early_peak) / early_peak
fds_after = {s[2] for s in after}
mib = lambda b: f"{b / (1 << 20):.1f}"
print(f"{len(results)} sequences in {len(results) // batch} batches of {batch}: {steps} decode steps, "
      f"{tokens} tokens generated, {duration:.1f} s ({steps / duration:.0f} steps/s)")
print(f"{n} samples every 0.5 s; warm-up: the first {w} ({samples[w][0]:.1f} s)")
print("t (s)\tVmRSS (MiB)\topen fds\tsequences done")
for i in sorted({round(k * (n - 1) / 10) for k in range(11)}):
    t, rss, fds, done = samples[i]
    print(f"{t:.1f}\t{mib(rss)}\t{fds}\t{done}")
print(f"VmRSS peak after warm-up: first quarter {mib(early_peak)} MiB, last quarter {mib(late_peak)} MiB: "
      f"growth {growth * 100:+.2f}%; overall {mib(min(s[1] for s in after))}–{mib(max(s[1] for s in after))} MiB")
print(f"open fds after warm-up: {sorted(fds_after)}; files left in the offload directory: {leftover}")
ok = steps >= 10_000 and growth < 0.01 and len(fds_after) == 1 and leftover == 0
reasons = []
if steps < 10_000:
    reasons.append(f"only {steps} decode steps")
if growth >= 0.01:
    reasons.append(f"resident memory grew {growth * 100:.2f}%")
if len(fds_after) != 1:
    reasons.append(f"the fd count moved: {sorted(fds_after)}")
if leftover:
    reasons.append(f"{leftover} files left in the offload directory")
print("verdict: " + ("PASS: memory flat, no fd leaked" if ok else "FAIL: " + "; ".join(reasons)))
sys.exit(0 if ok else 1)
EOF
