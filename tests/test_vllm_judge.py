"""LLM-judge scores against a real local server (``make test-vllm``): mechanics, not quality.

The vLLM server of the session (conftest.py's ``server_url``: the embedded SmolLM2-135M)
stands in for the judge: a 135M model is no grader, but it is a real OpenAI-compatible chat
endpoint that replies in free text, often without a score. An eval of two prompts with
two judge objectives (the HH recipe's rubrics) must complete, count every reply it could not
parse as missing, and, run again, make no request at all: the server's own request counter
does not move. The policy decodes in process (transformers), so every request the server
sees is the judge's.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from rmod_distill.config import parse_config
from rmod_distill.eval import EvalConfig, run as eval_run
from rmod_distill.objectives import Normalizer

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = 2


def served_requests(url: str) -> float:
    """Chat requests the server has received, by its own Prometheus counter (every status)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts = re.findall(r'^http_requests_total\{handler="/v1/chat/completions",[^}]*\} ([0-9.e+]+)$', text, re.M)
    return sum(float(x) for x in counts)  # no line yet: no chat request yet


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def judges(url: str, cache: Path) -> str:
    items = []
    for name in ("helpfulness", "harmlessness"):
        items.append(
            f"{{name: {name}, kind: judge, model: {served_model(url)}, judge: {{base_url: '{url}/v1', "
            f"rubric: recipes/hh-gemma2-judge/rubrics/{name}.txt, max_tokens: 32, parse_retries: 1, "
            f"concurrency: 8, timeout: 300, cache: '{cache}'}}}}")
    return "[" + ", ".join(items) + "]"


@pytest.fixture
def setup(tmp_path):
    """Two eval prompts and a normalisation for one cheap reward objective (no generate run needed)."""
    prompts = tmp_path / "prompts.jsonl"
    lines = [ln for ln in (ROOT / "data/prompts/default.jsonl").read_text().splitlines() if '"eval"' in ln]
    prompts.write_text("\n".join(lines[:N_PROMPTS]) + "\n")
    gen = tmp_path / "gen"
    gen.mkdir()
    Normalizer(["concision"], [-1.5], [0.5]).save(gen / "normalization.json")
    # A complete generate run's marker: eval reads its decoding (the reference answers' settings must match).
    decoding = {"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
    (gen / "run.json").write_text(json.dumps({"stage": "generate", "complete": True, "config": {"decoding": decoding}}))
    return prompts, gen


def test_eval_with_a_served_judge_completes_caches_and_counts_missing(server_url, setup, tmp_path, monkeypatch):
    prompts, gen = setup
    monkeypatch.chdir(ROOT)  # the rubric paths are relative to the repository, as in the recipe

    def args(out):
        return ["--policy.model", "embedded", "--adapter", "null", "--generate_dir", str(gen),
                "--prompts.path", str(prompts), "--prompts.split", "eval", "--objectives", "[{name: concision}]",
                "--methods", "[cd, reference]", "--decoding.num_candidates", "2", "--decoding.block_size", "8",
                "--decoding.max_new_tokens", "16", "--decoding.temperature", "0.7", "--decoding.top_p", "0.9",
                "--batch_size", str(N_PROMPTS), "--bootstrap_resamples", "200", "--wandb.mode", "disabled",
                "--judges", judges(server_url, tmp_path / "judge.sqlite"), "--output_dir", str(out)]

    before = served_requests(server_url)
    t0 = time.perf_counter()
    first = eval_run(parse_config(EvalConfig, args(tmp_path / "eval")))
    seconds = time.perf_counter() - t0
    after_first = served_requests(server_url)
    judge = json.loads((first / "metrics.json").read_text())["judge"]
    records = [json.loads(x) for x in (first / "generations" / "judge.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (first / "generations" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * N_PROMPTS and len(samples) == 2 * N_PROMPTS
    for method, m in judge["methods"].items():
        for name in ("helpfulness", "harmlessness"):
            mine = [r for r in records if r["method"] == method and r["objective"] == name]
            missing = [r for r in mine if r["status"] != "ok"]
            assert m["missing"][name] == len(missing)
            assert all(r["score"] is None for r in missing) and all(0 <= r["score"] <= 10 for r in mine
                                                                      if r["status"] == "ok")
            # A reply asked again after an unparseable one: the follow-up counted as an attempt.
            assert all(r["attempts"] == 2 for r in mine if r["status"] == "unparseable")
            scored = {r["prompt_id"]: r["score"] for r in mine}
            assert {s["prompt_id"]: s["judge"][name] for s in samples if s["method"] == method} == scored
        assert m["requests"] > 0 and m["tokens"] > 0
    client_requests = sum(m["requests"] for m in judge["methods"].values())
    # The server saw the judge's requests and nothing else (plus the two start-up probes' requests).
    assert client_requests <= after_first - before <= client_requests + 2 * 2

    # ----------------------------------------------------------------- again: everything from the cache
    second = eval_run(parse_config(EvalConfig, args(tmp_path / "eval-again")))
    assert served_requests(server_url) == after_first, "the repeated eval sent requests to the judge"
    again = json.loads((second / "metrics.json").read_text())["judge"]["methods"]
    for method, m in again.items():
        assert m["requests"] == 0 and m["tokens"] == 0 and m["cache_hits"] == 2 * N_PROMPTS
        assert m["missing"] == judge["methods"][method]["missing"]

    # The stand-in run's figures (quoted in docs/judge.md, labelled as a stand-in's).
    statuses = {s: sum(r["status"] == s for r in records) for s in ("ok", "unparseable", "failed")}
    print(f"\nstand-in judge (SmolLM2-135M on vLLM), {N_PROMPTS} prompts x 2 methods x 2 objectives, "
          f"first eval {seconds:.0f} s: server requests {after_first - before:.0f} (client, probes excluded: "
          f"{client_requests}), replies {statuses}, attempts {sum(r['attempts'] for r in records)}")
    for method, m in judge["methods"].items():
        print(f"  {method}: missing {m['missing']}, requests {m['requests']}, tokens {m['tokens']} "
              f"(prompt {sum(u['prompt_tokens'] for u in m['usage'].values())}, completion "
              f"{sum(u['completion_tokens'] for u in m['usage'].values())}), means {m['objective_means']}, "
              f"WCWR {m.get('worst_case_win_rate')}, flagged {m['flagged']}")
    print(f"  second eval: server requests 0, cache hits {sum(m['cache_hits'] for m in again.values())}")
