"""The GPU check (scripts/gpu_check.sh, benchmarks/gpu_check.py): its smoke mode end to end on the CPU, so the
check cannot rot before a GPU machine is at hand; the carried-wheel step; and the per-part time budgets."""

import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PARTS = ["model", "solver", "speed", "blocks", "scaling", "overhead", "syncs", "cache", "sft", "dpo"]


def run_script(*args, wheels: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """scripts/gpu_check.sh with this interpreter, one torch thread and ``wheels`` as the carried folder."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_WHEELS=str(wheels), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke(tiny_policy_dir, tmp_path_factory):
    """One smoke run on the tiny policy's tokenizer, without wheels; budgets for the two slowest parts
    raised so a busy CPU does not cut them. Returns the output folder and the script's stdout."""
    out = tmp_path_factory.mktemp("gpu-check")
    proc = run_script("--out", str(out), "--device", "cpu", "--smoke", "--tokenizer", str(tiny_policy_dir),
                      "--budget", "model=60", "--budget", "cache=60", wheels=out / "no-wheels")
    return out, proc.stdout


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_smoke_measures_every_part(smoke):
    out, stdout = smoke
    report = json.loads((out / "gpu_check.json").read_text())
    assert "no wheels in" in stdout and "using the installed packages" in stdout
    parts = report["parts"]
    assert list(parts) == PARTS
    assert parts["syncs"]["status"] == "skipped" and "CUDA" in parts["syncs"]["reason"]
    assert all(p["status"] == "ok" for name, p in parts.items() if name != "syncs"), parts
    m = report["models"][0]
    for key in ("rmod_over_cd", "engine_over_generate_scoring_excluded", "generate_tok_s", "block8_over_block1",
                "peak_memory_mb", "cache_engine_seconds_256", "cache_naive_seconds_256"):
        assert finite(m[key]), key
    assert all(finite(v) and v > 0 for v in m["scaling_seconds_per_response"].values())
    assert len(m["scaling_seconds_per_response"]) == 10
    assert [s["shape"] for s in report["solver"]["shapes"]] == ["1024x16x10", "64x16x2", "64x4x4"]
    assert finite(report["overhead"]["overhead_ms_per_block"]) and report["overhead"]["blocks"] > 0
    for kind in ("sft", "dpo"):
        t = report["training"][kind]
        assert t["steps"] == 3 and t["dtype"] == "float32" and finite(t["train_loss"])
        assert finite(t["seconds_per_step"]) and t["seconds_per_step"] > 0
    machine = report["machine"]
    assert machine["smoke"] and machine["packages"]["trl"] and machine["packages"]["transformers"]
    assert machine["config"]["budgets"]["cache"] == 60 and machine["config"]["budgets"]["speed"] == 10


def test_smoke_writes_one_table(smoke):
    out, _ = smoke
    text = (out / "gpu_check.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith("| figure | target | random-tiny |")
    assert len([line for line in text.splitlines() if line.startswith("| figure")]) == 1
    for label in ("1. rmod / cd wall time", "4. solver, 1024x16x10", "7. rmod selection overhead",
                  "LoRA SFT step (TRL SFTTrainer)", "LoRA DPO step (TRL DPOTrainer)", "part `syncs` |  | skipped"):
        assert any(label in line for line in table), label


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel of one empty module."""
    module = name.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}.py", "")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_carried_wheels_install_only_what_is_missing_or_older(tmp_path):
    import numpy

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "rmod-gpu-check-probe", "1.0")
    _wheel(wheels, "numpy", "1.0")  # older than the installed numpy: stays out
    proc = run_script("--help", wheels=wheels, timeout=120)
    assert "installing 1 carried wheels" in proc.stdout and "rmod_gpu_check_probe-1.0" in proc.stdout
    assert f"numpy {numpy.__version__} is installed (carried: 1.0)" in proc.stderr


@pytest.fixture
def gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_a_part_stops_at_its_budget_and_the_rest_go_on(gpu_check):
    parts = {}
    deadline = time.monotonic() + 60
    t0 = time.monotonic()
    gpu_check.run_part("slow", lambda: time.sleep(30), 0.3, deadline, parts)
    assert time.monotonic() - t0 < 2 and parts["slow"]["status"] == "cut" and "0.3 s budget" in parts["slow"]["reason"]

    def broken():
        raise ValueError("no such column")

    gpu_check.run_part("broken", broken, 5, deadline, parts)
    assert parts["broken"] == {**parts["broken"], "status": "failed", "reason": "ValueError: no such column"}
    gpu_check.run_part("late", lambda: None, 5, time.monotonic() + 1, parts)
    assert parts["late"]["status"] == "skipped" and "total budget is spent" in parts["late"]["reason"]
