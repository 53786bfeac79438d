#!/usr/bin/env bash
# `make gpu-check`: the GPU check in one command (docs/gpu.md). Installs the carried wheels of
# .gpu-wheels/ whose package this machine lacks (or has older) into a temporary folder (nothing is fetched),
# then runs benchmarks/gpu_check.py with the given arguments under a hard limit of 480 s.
#
#     bash scripts/gpu_check.sh --out DIR [--device cpu --smoke] [...]    (see benchmarks/gpu_check.py)
#
# PYTHON picks the interpreter (default python3, else python), GPU_WHEELS the wheel folder.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
WHEELS="${GPU_WHEELS:-$ROOT/.gpu-wheels}"
LIMIT_S=480

TARGET="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-packages.XXXXXX")"
trap 'rm -rf "$TARGET"' EXIT
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_check: no wheels in $WHEELS; using the installed packages"
else
    # A carried wheel goes in where the machine's copy of its package is missing or older; a newer one stays.
    mapfile -t install < <("$PYTHON" - "${wheels[@]}" <<'PY'
import sys
from importlib import metadata
from pathlib import Path
from packaging.version import Version
for wheel in sys.argv[1:]:
    name, carried = Path(wheel).name.split("-")[:2]
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(wheel)
        continue
    if Version(installed) < Version(carried):
        print(wheel)
    else:
        print(f"gpu_check: {name} {installed} is installed (carried: {carried})", file=sys.stderr)
PY
)
    if [ ${#install[@]} -gt 0 ]; then
        echo "gpu_check: installing ${#install[@]} carried wheels into $TARGET: $(for w in "${install[@]}"; do basename "$w"; done | tr '\n' ' ')"
        if "$PYTHON" -m pip --version >/dev/null 2>&1; then
            PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
                --target "$TARGET" "${install[@]}"
        else  # no pip: a wheel is a zip of its files, laid out as they install
            for w in "${install[@]}"; do "$PYTHON" -m zipfile -e "$w" "$TARGET"; done
        fi
    fi
fi
export PYTHONPATH="$TARGET:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

status=0
timeout --kill-after=15 "$LIMIT_S" "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "gpu_check: stopped at the ${LIMIT_S} s limit; gpu_check.json and .md hold the parts finished before"
fi
exit "$status"
