#!/usr/bin/env bash
# Issue 14, case C: why the disk rows arrive slower than the disk reads.
# One device call (about 3-4 minutes), after `cargo xtask gpu-bundle`:
#
#   1. the disk alone: O_DIRECT reads of a file in the offload directory,
#      8 MiB requests (a staging slot), one stream and four at once, over
#      --probe-gib GiB (more than a decode step's 6.29 GB of disk rows, so
#      the rate is the sustained one, not a burst), and the first 157 MB
#      alone (one layer's disk rows, what the engine's own copy-rate probe
#      times);
#   2. case C (scripts/bench-cases.sh's flags) with TIERLM_GPU_PROFILE=1:
#      decode tok/s, the limit the bench computes from its own copy rates,
#      the limit from the sustained rate of step 1, the disk during decode
#      (busy share, rate while busy, operations in flight), and the profile;
#   3. case C again with TIERLM_DISK_READS=2 (two staged reads in flight per
#      copy), without the profile, if the budget leaves time;
#   4. a table of both runs last.
#
# Usage (repository root): scripts/case-c-probe.sh [options]
#   --tierlm PATH      the binary (default .gpu/tierlm)
#   --offload-dir D    the disk tier's directory (default ./offload)
#   --gen-len N        new tokens (default 8, case C's)
#   --probe-gib N      GiB the disk probe writes and reads (default 8)
#   --budget S         seconds this script may take (default 300)
#   --no-second        skip step 3
# Logs: $OUT/case-c-probe (else /tmp/case-c-probe): disk.txt, c1.json,
# c1.out (JSON and profile), c1.err, c2.*, table.md.
set -euo pipefail

tierlm=.gpu/tierlm offload=offload gen=8 gib=8 budget=300 second=1
while [ $# -gt 0 ]; do
  case $1 in
    --tierlm) tierlm=$2; shift 2 ;;
    --offload-dir) offload=$2; shift 2 ;;
    --gen-len) gen=$2; shift 2 ;;
    --probe-gib) gib=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --no-second) second=0; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "case-c-probe.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done
out=${OUT:-/tmp}/case-c-probe
mkdir -p "$out" "$offload"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
[ -x "$tierlm" ] || { echo "case-c-probe.sh: no binary at $tierlm (run cargo xtask gpu-bundle)" >&2; exit 2; }

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; offload dir $offload on $(df -P "$offload" | awk 'NR==2{print $1}')"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true

# 1. The disk alone (O_DIRECT; the file is removed after).
echo "== 1. disk alone: O_DIRECT reads in $offload"
python3 - "$offload" "$gib" <<'PY' | tee "$out/disk.txt"
import mmap, os, sys, threading, time
d, gib = sys.argv[1], int(sys.argv[2])
path = os.path.join(d, "case-c-probe.bin")
block = 8 << 20
total = gib << 30
n = total // block
buf = mmap.mmap(-1, block)
buf.write(os.urandom(block))
st = os.statvfs(d)
free = st.f_bavail * st.f_frsize
if free < total + (8 << 30):
    n = max(1, (free - (8 << 30)) // block) if free > (9 << 30) else 16
    total = n * block
    print(f"only {free/1e9:.1f} GB free: probing {total/1e9:.2f} GB")
try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
except OSError as e:
    print(f"O_DIRECT refused here ({e}): buffered reads, the page cache's rate, not the disk's")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
try:
    t = time.time()
    for i in range(n):
        os.pwritev(fd, [buf], i * block)
    os.fsync(fd)
    w = time.time() - t
    print(f"write {total/1e9:.2f} GB: {total/w/1e9:.2f} GB/s")
    def read(streams, blocks):
        nxt = [0]
        lock = threading.Lock()
        def worker():
            b = mmap.mmap(-1, block)
            while True:
                with lock:
                    i = nxt[0]; nxt[0] += 1
                if i >= blocks:
                    return
                os.preadv(fd, [b], i * block)
        ts = [threading.Thread(target=worker) for _ in range(streams)]
        t = time.time()
        for x in ts: x.start()
        for x in ts: x.join()
        return blocks * block / (time.time() - t)
    layer = max(1, 157_000_000 // block)
    for streams in (1, 4):
        burst = read(streams, layer)
        sustained = read(streams, n)
        print(f"read, {streams} stream(s) of 8 MiB requests: first {layer*block/1e6:.0f} MB {burst/1e9:.2f} GB/s; "
              f"{total/1e9:.2f} GB sustained {sustained/1e9:.2f} GB/s")
        print(f"RATE streams={streams} burst={burst:.0f} sustained={sustained:.0f}")
finally:
    os.close(fd)
    os.unlink(path)
PY

flags="--model opt-13b --dummy --percent 0 75 0 100 0 100 --gpu-batch-size 32 --num-gpu-batches 2 --cpu-cache-compute --prompt-len 512 --gen-len $gen --offload-dir $offload"

# One run of case C: `run_c NAME LIMIT [VAR=VALUE...]` (the variables set
# for the bench only); sets rc to its exit status.
run_c() {
  local name=$1 limit=$2; shift 2
  set +e
  env "$@" timeout "$limit" "$tierlm" bench $flags --json >"$out/$name.out" 2>"$out/$name.err"
  rc=$?
  set -e
  echo "exit $rc"; tail -3 "$out/$name.err" | sed 's/^/  stderr: /'
  grep -m1 '^{' "$out/$name.out" >"$out/$name.json" || true
}

# 2. Case C with the profile.
t=$(( $(left) - 20 ))
echo "== 2. case C, TIERLM_GPU_PROFILE=1 (limit ${t} s): $tierlm bench $flags --json"
run_c c1 "$t" TIERLM_GPU_PROFILE=1
rc1=$rc
sed -n '/^profile/,$p' "$out/c1.out"

# 3. Case C with two staged reads in flight per copy.
rc2=skipped
if [ "$second" = 1 ] && [ "$(left)" -gt 110 ]; then
  t=$(( $(left) - 15 ))
  echo "== 3. case C, TIERLM_DISK_READS=2 (limit ${t} s)"
  run_c c2 "$t" TIERLM_DISK_READS=2
  rc2=$rc
else
  echo "== 3. skipped ($(left) s left)"
fi

# 4. The table.
echo "== 4. summary"
python3 - "$out" <<'PY' | tee "$out/table.md"
import json, os, re, sys
out = sys.argv[1]
rates = {}
for line in open(os.path.join(out, "disk.txt")):
    m = re.match(r"RATE streams=(\d+) burst=(\S+) sustained=(\S+)", line)
    if m:
        rates[int(m[1])] = (float(m[2]), float(m[3]))
best = max((s for _, s in rates.values()), default=None)
print("| run | decode tok/s | bench's limit (disk copy rate) | % | limit at the sustained disk rate | % | disk during decode: busy, GB/s while busy, GB/s overall, mean / peak in flight |")
print("|---|---|---|---|---|---|---|")
for name, label in (("c1", "default (1 read per copy), profiled"), ("c2", "TIERLM_DISK_READS=2")):
    p = os.path.join(out, name + ".json")
    if not os.path.exists(p) or os.path.getsize(p) == 0:
        print(f"| {label} | no result | | | | | |")
        continue
    r = json.load(open(p))
    t = r.get("tiers") or {}
    dec = r.get("decode_tokens_per_s") or 0.0
    lim = t.get("decode_tokens_per_s_stream_limit") or 0.0
    rate = t.get("disk_copy_bytes_per_s") or 0.0
    disk_step = t.get("disk_bytes_per_step") or 0
    sus = r["prompts"] / (disk_step / best) if best and disk_step else 0.0
    dd = t.get("disk_decode") or {}
    pct = lambda a, b: f"{100*a/b:.0f}%" if b else "-"
    dtxt = (f"{100*dd['busy_fraction']:.0f}%, {dd['busy_bytes_per_s']/1e9:.2f}, {dd['bytes_per_s']/1e9:.2f}, "
            f"{dd['mean_depth']:.1f} / {dd['peak_in_flight']}") if dd else "-"
    print(f"| {label} | {dec:.1f} | {lim:.1f} ({rate/1e9:.2f} GB/s) | {pct(dec, lim)} | {sus:.1f} ({(best or 0)/1e9:.2f} GB/s) | {pct(dec, sus)} | {dtxt} |")
for s, (b, su) in sorted(rates.items()):
    print(f"\ndisk alone, {s} stream(s) of 8 MiB O_DIRECT reads: first ~157 MB (a layer's disk rows) {b/1e9:.2f} GB/s, sustained {su/1e9:.2f} GB/s", end="")
print()
PY
echo "logs in $out; $(( $(date +%s) - start )) s"
