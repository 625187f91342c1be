#!/usr/bin/env bash
# Prepares FlexLLMGen (FlexGen's code, the peer tierlm is measured against)
# for the GPU machine, as ../shared/reference/peer-baseline.md says: its
# `flexllmgen/` package at commit 004ffef, copied from a local git mirror of
# FMInference/FlexLLMGen into a git-ignored folder, with the two Hugging Face
# tokenizer downloads in `flex_opt.py` replaced by a stand-in (the GPU
# machine has no network; with `--path _DUMMY_` nothing else reads the
# tokenizer). FlexLLMGen's code never enters the repository: the folder is
# ignored, and carried to the GPU machine with `run`'s `carry`.
#
# Usage (repository root): scripts/get-flexllmgen.sh MIRROR_GIT_DIR [DEST]
#   MIRROR_GIT_DIR  a git directory holding commit 004ffef (e.g. what the
#                   search tool's `fetch github:FMInference/FlexLLMGen` gives)
#   DEST            default .peer (git-ignored; then: scripts/bench-cases.sh
#                   --flexllmgen .peer)
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,16p' "$0"; exit 2; }
mirror=$1 dest=${2:-.peer} commit=004ffef
git --git-dir="$mirror" cat-file -e "$commit^{commit}" 2>/dev/null \
  || { echo "get-flexllmgen.sh: $mirror has no commit $commit" >&2; exit 1; }
rm -rf "$dest" && mkdir -p "$dest"
git --git-dir="$mirror" archive "$commit" flexllmgen | tar -x -C "$dest"
python3 - "$dest/flexllmgen/flex_opt.py" <<'PY'
import re, sys
path = sys.argv[1]
src = open(path).read()
stand_in = '''

class _StandInTokenizer:
    """No network on the GPU machine: prompts of the asked length (OPT's
    padding id 1, then a few fixed ids), and no text back."""

    def __call__(self, prompts, padding=None, max_length=None):
        tail = [2, 32826, 16, 5, 812, 343, 9]
        ids = [[1] * max(0, max_length - len(tail)) + tail[-max_length:] for _ in prompts]
        return type("Encoded", (), {"input_ids": ids})()

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["" for _ in ids]
'''
calls = re.findall(r'AutoTokenizer\.from_pretrained\([^)]*\)', src)
if len(calls) != 2:
    sys.exit(f"get-flexllmgen.sh: expected 2 tokenizer downloads in {path}, found {len(calls)}")
for c in calls:
    src = src.replace(c, "_StandInTokenizer()")
anchor = "def get_test_inputs("
if anchor not in src:
    sys.exit(f"get-flexllmgen.sh: no {anchor} in {path}")
src = src.replace(anchor, stand_in.strip("\n") + "\n\n\n" + anchor, 1)
open(path, "w").write(src)
print(f"patched {path}: tokenizer stand-in")
PY
echo "FlexLLMGen $commit in $dest (run: cd $dest && python3 -m flexllmgen.flex_opt --help)"
