"""The vLLM backend against a real server on the embedded SmolLM2 (``make test-vllm``).

One server serves the whole session (the ``server_url`` fixture in conftest.py: launched once,
float32, stopped at the end even when a test fails; test_vllm_judge.py uses it too). The
pipeline's own process talks to it over HTTP; vLLM itself lives in ``.venv-vllm`` (``make
vllm-env``). Set ``RMOD_DISTILL_VLLM_URL`` to reuse a running server of the same kind while
developing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rmod_distill.artifacts import read_jsonl
from rmod_distill.engine.decoding import BlockwiseDecoder, DecodingConfig, prompt_seed
from rmod_distill.engine.runs import decode_rows
from rmod_distill.engine.vllm import VLLMSampler
from rmod_distill.objectives import Normalizer, ObjectiveSet, ObjectiveSpec
from rmod_distill.policy import load_policy, stop_token_ids
from rmod_distill.prompts import PromptsConfig, load_prompts

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
OBJECTIVES = "[{name: harmlessness}, {name: warmth}, {name: concision}]"


@pytest.fixture(scope="module")
def policy():
    return load_policy("embedded", device="cpu")


@pytest.fixture(scope="module")
def eval_prompts():
    return load_prompts(PromptsConfig(path=str(ROOT / "data/prompts/default.jsonl"), split="eval"))[:16]


@pytest.fixture(scope="module")
def values():
    objectives = ObjectiveSet.from_specs([ObjectiveSpec(name="harmlessness"), ObjectiveSpec(name="warmth"),
                                          ObjectiveSpec(name="concision")])
    objectives.set_normalizer(Normalizer(objectives.names, [0.0] * 3, [1.0] * 3))
    return objectives


def decoders(policy, url, cfg, objectives):
    model, tok = policy
    fn = lambda p, r: objectives.score(p, r)[1]  # noqa: E731
    hf = BlockwiseDecoder.from_model(model, tok, cfg, fn, objectives.names)
    vl = BlockwiseDecoder(VLLMSampler(tok, cfg.sampling, stop_token_ids(tok), [url]), tok, cfg, fn, objectives.names)
    return hf, vl


def test_greedy_agrees_with_transformers(server_url, policy, eval_prompts, values):
    cfg = DecodingConfig(num_candidates=2, block_size=8, max_new_tokens=32, temperature=0.0)
    hf, vl = decoders(policy, server_url, cfg, values)
    convs = [p.messages for p in eval_prompts]
    rates = {}
    for method in ("reference", "cd", "rmod"):
        seeds = [prompt_seed(0, p.id, method) for p in eval_prompts]
        a = hf.decode(convs, seeds, hf.method(method))
        b = vl.decode(convs, seeds, vl.method(method))
        same = [x.token_ids == y.token_ids for x, y in zip(a, b)]
        rates[method] = sum(same)
        for p, x, y, ok in zip(eval_prompts, a, b, same):
            if not ok:
                at = next((i for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids)) if s != t),
                          min(len(x.token_ids), len(y.token_ids)))
                print(f"{method} {p.id}: first difference at token {at}: {x.text!r} vs {y.text!r}")
        assert all(len(r.token_ids) > 0 for r in b)
        assert all(r.finished == (r.token_ids[-1] in stop_token_ids(policy[1])) for r in b)
    print(f"greedy agreement with transformers (of {len(eval_prompts)}): {rates}")
    assert all(n >= 15 for n in rates.values()), rates


def test_seeded_sampling_repeats_across_batch_sizes(server_url, policy, eval_prompts, values):
    cfg = DecodingConfig(num_candidates=2, block_size=8, max_new_tokens=32, temperature=0.7, top_p=0.9)
    _, vl = decoders(policy, server_url, cfg, values)
    prompts = eval_prompts[:8]
    runs = [decode_rows(vl, values, prompts, "rmod", 0, size) for size in (8, 8, 3)]
    texts = [[(r["completion"], r["block_weights"]) for r in rows] for rows in runs]
    assert texts[0] == texts[1] == texts[2]
    assert len({r["completion"] for r in runs[0]}) > 1


N_PROMPTS = 6


def generate_cmd(out: Path, *backend: str) -> list[str]:
    prompts = out.parent / "prompts.jsonl"
    if not prompts.exists():
        lines = [ln for ln in (ROOT / "data/prompts/default.jsonl").read_text().splitlines() if '"eval"' in ln]
        prompts.write_text("\n".join(lines[:N_PROMPTS]) + "\n")
    return [
        sys.executable, "-m", "rmod_distill.cli", "generate", "--config", str(ROOT / "recipes/default/generate.yaml"),
        "--objectives", OBJECTIVES, "--methods", "[reference, rmod]", "--samples_per_prompt", "1",
        "--prompts.path", str(prompts), "--prompts.split", "eval", "--decoding.num_candidates", "2", "--decoding.block_size", "8",
        "--decoding.max_new_tokens", "16", "--batch_size", "2", "--normalization_prompts", "2",
        "--normalization_samples", "1", "--output_dir", str(out), "--wandb.mode", "disabled", *backend,
    ]


def shard_rows(out: Path) -> list[dict]:
    return [r for shard in sorted((out / "shards").glob("*.jsonl")) for r in read_jsonl(shard, shard=True)]


def wait_for_rows(proc: subprocess.Popen, out: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "shards").exists() or len(shard_rows(out)) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no rows written in time"
        time.sleep(0.5)


def check_complete(out: Path, n_prompts: int) -> None:
    rows = shard_rows(out)
    keys = [(r["method"], r["prompt_id"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * n_prompts  # nothing lost, nothing duplicated
    assert len(read_jsonl(out / "samples.jsonl")) == 2 * n_prompts


def test_generate_killed_and_resumed(server_url, tmp_path):
    out = tmp_path / "gen"
    cmd = generate_cmd(out, "--backend.kind", "vllm", "--backend.urls", f"[{server_url}]")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(proc, out, 4)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    kept = shard_rows(out)
    assert 4 <= len(kept) < 2 * N_PROMPTS and not (out / "samples.jsonl").exists()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    check_complete(out, N_PROMPTS)
    after = {(r["method"], r["prompt_id"]): r["completion"] for r in shard_rows(out)}
    assert all(after[(r["method"], r["prompt_id"])] == r["completion"] for r in kept)


def test_server_dies_mid_run(server_url, tmp_path):
    """A launched server killed mid-run: one line naming its URL, rows kept, resumed on another server."""
    import psutil

    out = tmp_path / "gen"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT)
    cmd = generate_cmd(out, "--backend.kind", "vllm", "--backend.launch", "true", "--backend.python",
                       str(VLLM_PYTHON), "--backend.max_model_len", "1024")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(proc, out, 4, timeout=600)
        (server,) = [c for c in psutil.Process(proc.pid).children() if "vllm" in " ".join(c.cmdline())]
        os.killpg(server.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err[-3000:]
    errors = re.findall(r"rmod-distill generate: error[^\r\n]*", err)
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith("rmod-distill generate: error: vLLM server http://127.0.0.1:"), errors[0]
    assert "stopped answering" in errors[0] and "rerun" in errors[0] and "Traceback" not in err, err[-3000:]
    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    kept = shard_rows(out)
    assert len(kept) >= 4
    resumed = subprocess.run(generate_cmd(out, "--backend.kind", "vllm", "--backend.urls", f"[{server_url}]"),
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_complete(out, N_PROMPTS)
