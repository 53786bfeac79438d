"""LLM-judge scores (issue 14): parsing recorded replies, missing scores, the client, metrics and eval.

The client is exercised against a scripted OpenAI-compatible endpoint: a real HTTP server in
this process (stdlib ``http.server``) that plays recorded judge replies, rate limits, server
errors and slow replies, and counts what it receives. The same mechanics against a real
model served by vLLM are in ``tests/test_vllm_judge.py`` (``make test-vllm``).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from rmod_distill.config import ConfigError, parse_config
from rmod_distill.engine.selection import Method, rank_missing, select
from rmod_distill.errors import UserError
from rmod_distill.eval import EvalConfig, run as eval_run
from rmod_distill.judge import JudgeCache, JudgeClient, JudgeConfig, JudgeResult, Rubric, parse_score, render_question
from rmod_distill.metrics import method_metrics, win_rates, worst_case_reward, worst_case_win_rate
from rmod_distill.objectives import Normalizer, ObjectiveSet, ObjectiveSpec

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- parsing

# Replies of the kinds judges give (GPT-4o-style explanations, the reference script's "[score]"
# format, refusals, hedges), with the score they must parse to; None is missing.
RECORDED = [
    ("The response is polite, accurate and addresses the question fully.\n\nFinal score: [[8]]", 8.0),
    ("The assistant refuses the harmful request and offers a safe alternative. [9]", 9.0),
    ("Explanation: it follows instructions.\n1. Accurate Information: yes\n2. Clarity: yes\n[[7]]", 7.0),
    ("Score: 6/10", 6.0),
    ("I would give this a rating of 4 out of 10.", 4.0),
    ("[[7.5]]", 7.5),
    ("3", 3.0),
    ("[[2]] ... as said, my score is [[2]]", 2.0),
    # refusals and replies without a score
    ("I'm sorry, but I can't help with evaluating this content.", None),
    ("The answer is friendly but does not address the question.", None),
    ("[[score]]", None),
    ("", None),
    # ranges
    ("I'd rate it 6-7 out of 10.", None),
    ("[[6-7]]", None),
    ("Score: 5 to 6", None),
    # two different numbers
    ("Helpfulness score: 3. Overall score: 8.", None),
    ("[[4]] for clarity and [[9]] for accuracy", None),
    ("[3] ... [7]", None),
    # off the scale or on another scale
    ("[[11]]", None),
    ("[[-1]]", None),
    ("Score: 4/5", None),
]


@pytest.mark.parametrize("reply,expected", RECORDED, ids=[f"r{i}" for i in range(len(RECORDED))])
def test_parse_recorded_replies(reply, expected):
    assert parse_score(reply, 0, 10) == expected


def test_parse_uses_the_rubrics_scale():
    assert parse_score("[[4]]", 1, 5) == 4.0
    assert parse_score("[[7]]", 1, 5) is None
    assert parse_score("Score: 4/5", 1, 5) == 4.0


# ----------------------------------------------------------------------------- a scripted endpoint


class Endpoint:
    """An OpenAI-compatible ``/v1/chat/completions`` that answers with ``script(body, n) -> (status, headers, reply)``.

    ``reply`` is the judge's text for 200 (wrapped in a chat completion with usage 10/5), else
    the raw body. It records every request body and the most requests in flight at once.
    """

    def __init__(self, script):
        self.script, self.bodies, self.headers = script, [], []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.bodies.append(body)
                    endpoint.headers.append(dict(self.headers))
                    n = len(endpoint.bodies)
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    status, headers, reply = endpoint.script(body, n)
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1
                if status == 200:
                    reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                                     "finish_reason": "stop"}],
                                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
                data = reply.encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def requests(self) -> int:
        return len(self.bodies)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    made = []

    def make(script):
        made.append(Endpoint(script))
        return made[-1]

    yield make
    for e in made:
        e.close()


RUBRIC = """A test rubric (this header is not sent).
=== system ===
You grade answers.
=== user ===
Question: {question}
Answer: {answer}
Give a score from 0 to 10 as [[score]].
"""


@pytest.fixture
def rubric(tmp_path) -> Path:
    path = tmp_path / "rubric.txt"
    path.write_text(RUBRIC)
    return path


def client(url, rubric, tmp_path, **kw) -> JudgeClient:
    cfg = JudgeConfig(base_url=url, rubric=str(rubric), cache=str(tmp_path / "cache.sqlite"), backoff=0.01, **kw)
    cfg.validate("quality")
    return JudgeClient("quality", "judge-model", cfg)


def answer_of(body) -> str:
    return re.search(r"Answer: (.*)\nGive a score", body["messages"][1]["content"], re.S).group(1)


CONV = [{"role": "user", "content": "How do I fix a flat tire?"}]


def test_request_shape_key_and_tokens(endpoint, rubric, tmp_path, monkeypatch):
    e = endpoint(lambda body, n: (200, {}, "Good answer. [[7]]"))
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    c = client(e.url, rubric, tmp_path, api_key_env="MY_JUDGE_KEY")
    (r,) = c.grade([CONV], ["Patch the tube."])
    assert (r.score, r.status, r.attempts, r.requests) == (7.0, "ok", 1, 1)
    body = e.bodies[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 512
    assert body["messages"][0] == {"role": "system", "content": "You grade answers."}
    assert "Question: How do I fix a flat tire?\nAnswer: Patch the tube." in body["messages"][1]["content"]
    assert "header" not in json.dumps(body)
    assert e.headers[0]["Authorization"] == "Bearer sk-test-123"
    assert c.usage.as_dict() == {"requests": 1, "cache_hits": 0, "scored": 1, "unparseable": 0, "failed": 0,
                                 "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def test_unparseable_reply_is_asked_again_then_missing(endpoint, rubric, tmp_path):
    def script(body, n):
        answer = answer_of(body)
        if answer == "recovers":  # unparseable first, then the score after the reminder
            return 200, {}, "[[6]]" if len(body["messages"]) > 2 else "It is a decent answer."
        return 200, {}, "I cannot rate this."

    e = endpoint(script)
    c = client(e.url, rubric, tmp_path, parse_retries=2)
    ok, never = c.grade([CONV, CONV], ["recovers", "never"])
    assert (ok.score, ok.status, ok.attempts, ok.requests) == (6.0, "ok", 2, 2)
    follow_up = next(b for b in e.bodies if answer_of(b) == "recovers" and len(b["messages"]) > 2)
    assert follow_up["messages"][-2] == {"role": "assistant", "content": "It is a decent answer."}
    assert "[[score]]" in follow_up["messages"][-1]["content"]
    assert never.score is None and never.status == "unparseable" and never.attempts == 3 and never.requests == 3
    assert never.reply == "I cannot rate this."
    assert c.usage.unparseable == 1 and c.usage.scored == 1 and c.usage.completion_tokens == 5 * 5


def test_rate_limits_back_off_and_failures_are_missing(endpoint, rubric, tmp_path):
    seen = {}

    def script(body, n):
        answer = answer_of(body)
        seen[answer] = seen.get(answer, 0) + 1
        if answer == "rate-limited" and seen[answer] <= 2:
            return 429, {"Retry-After": "0"}, '{"error": "rate limit"}'
        if answer == "server-error":
            return 500, {}, '{"error": "boom"}'
        if answer == "bad-request":
            return 400, {}, '{"error": "bad model"}'
        return 200, {}, "[[5]]"

    e = endpoint(script)
    c = client(e.url, rubric, tmp_path, request_retries=3)
    limited, broken, bad = c.grade([CONV] * 3, ["rate-limited", "server-error", "bad-request"])
    assert (limited.score, limited.requests) == (5.0, 3)
    assert broken.score is None and broken.status == "failed" and broken.requests == 4 and "HTTP 500" in broken.error
    assert bad.score is None and bad.status == "failed" and bad.requests == 1 and "HTTP 400" in bad.error
    assert c.usage.failed == 2


def test_timeout_is_a_failed_request(endpoint, rubric, tmp_path):
    e = endpoint(lambda body, n: (time.sleep(1.0), (200, {}, "[[5]]"))[1])
    c = client(e.url, rubric, tmp_path, timeout=0.2, request_retries=1)
    (r,) = c.grade([CONV], ["slow"])
    assert r.score is None and r.status == "failed" and "Timeout" in r.error and r.requests == 2


def test_concurrency_is_bounded(endpoint, rubric, tmp_path):
    e = endpoint(lambda body, n: (time.sleep(0.05), (200, {}, "[[5]]"))[1])
    c = client(e.url, rubric, tmp_path, concurrency=3)
    results = c.grade([CONV] * 12, [f"a{i}" for i in range(12)])
    assert all(r.score == 5.0 for r in results)
    assert e.max_in_flight == 3


def test_cache_pays_once_and_keeps_failures_out(endpoint, rubric, tmp_path):
    state = {"down": True}

    def script(body, n):
        answer = answer_of(body)
        if answer == "flaky" and state["down"]:
            return 503, {}, "{}"
        return 200, {}, "no score here" if answer == "odd" else "[[8]]"

    e = endpoint(script)
    c = client(e.url, rubric, tmp_path, request_retries=0, parse_retries=0)
    first = c.grade([CONV] * 3, ["fine", "odd", "flaky"])
    assert [r.status for r in first] == ["ok", "unparseable", "failed"]
    assert e.requests == 3
    state["down"] = False
    again = client(e.url, rubric, tmp_path, request_retries=0, parse_retries=0)  # a new run, same cache file
    second = again.grade([CONV] * 3, ["fine", "odd", "flaky"])
    assert e.requests == 4  # only the failed request is asked again
    assert [(r.score, r.cached) for r in second] == [(8.0, True), (None, True), (8.0, False)]
    assert again.usage.cache_hits == 2 and again.usage.requests == 1
    # More follow-ups allowed than the cached unparseable reply had: asked again.
    more = client(e.url, rubric, tmp_path, request_retries=0, parse_retries=1)
    third = more.grade([CONV], ["odd"])
    assert e.requests == 6 and third[0].attempts == 2 and not third[0].cached  # the question and one follow-up
    # Another rubric (here: another scale) is another key.
    other = client(e.url, rubric, tmp_path, scale_max=9.0)
    other.grade([CONV], ["fine"])
    assert e.requests == 7


def test_rubric_files_are_checked(tmp_path):
    cfg = JudgeConfig(base_url="http://127.0.0.1:9/v1", rubric=str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match=r"objective 'q': judge.rubric file .*nope.txt does not exist"):
        Rubric.load(cfg.rubric, "q", cfg)
    bad = tmp_path / "bad.txt"
    bad.write_text("=== user ===\nRate {answer}.\n")
    with pytest.raises(UserError, match=r"holding \{question\} and \{answer\} once each .*\{question\}"):
        Rubric.load(str(bad), "q", cfg)


def test_shipped_judge_recipes_have_their_rubrics():
    """Every shipped recipe's judges name rubric files that exist, load and hash differently."""
    found = 0
    for recipe in sorted((ROOT / "recipes").glob("*/eval.yaml")):
        cfg = parse_config(EvalConfig, ["--config", str(recipe)])
        digests = set()
        for spec in cfg.judges:
            rubric = Rubric.load(str(ROOT / spec.judge.rubric), spec.name, spec.judge)
            assert "[score]" in rubric.user and "{min}" not in rubric.retry
            digests.add(rubric.digest)
            found += 1
        assert len(digests) == len(cfg.judges)
    assert found >= 2


@pytest.mark.parametrize("judge,message", [
    ({"base_url": "localhost:8000/v1", "rubric": "r.txt"}, r"judge.base_url: expected http\(s\)://host"),
    ({"base_url": "http://x/v1", "rubric": "r.txt", "scale_min": 10, "scale_max": 0},
     r"judge.scale_min/scale_max: expected finite numbers with scale_min < scale_max"),
    ({"base_url": "http://x/v1", "rubric": "r.txt", "api_key_env": "sk-abc123-not-a-name"},
     r"judge.api_key_env: expected the NAME of an environment variable"),
    ({"base_url": "http://x/v1", "rubric": ""}, r"judge.rubric: expected the path of a rubric text file"),
])
def test_judge_section_is_validated(judge, message):
    from rmod_distill.config import from_dict

    with pytest.raises(ConfigError, match=message):
        from_dict(ObjectiveSpec, {"name": "q", "kind": "judge", "model": "m", "judge": judge})


def test_judge_section_only_with_kind_judge():
    from rmod_distill.config import from_dict

    with pytest.raises(ConfigError, match="a `judge:` section is needed with \\(and only with\\) kind judge"):
        from_dict(ObjectiveSpec, {"name": "q", "kind": "judge", "model": "m"})
    with pytest.raises(ConfigError, match="a `judge:` section is needed"):
        from_dict(ObjectiveSpec, {"name": "concision", "judge": {"base_url": "http://x/v1", "rubric": "r"}})


# ----------------------------------------------------------------------------- missing scores downstream


def test_objective_set_keeps_a_judges_missing_scores(endpoint, rubric, tmp_path):
    e = endpoint(lambda body, n: (200, {}, "[[4]]" if "short" in answer_of(body) else "No comment."))
    spec = ObjectiveSpec(name="quality", kind="judge", model="m",
                         judge=JudgeConfig(base_url=e.url, rubric=str(rubric), parse_retries=0,
                                           cache=str(tmp_path / "c.sqlite")))
    objectives = ObjectiveSet.from_specs([ObjectiveSpec(name="concision"), spec])
    raw = objectives.raw([CONV] * 2, ["short one", "a longer answer"])
    assert raw[0, 1] == 4.0 and math.isnan(raw[1, 1]) and np.isfinite(raw[:, 0]).all()
    assert [r.status for r in objectives.objectives[1].last] == ["ok", "unparseable"]


def test_metrics_leave_missing_scores_out():
    nan = np.nan
    z = np.array([[1.0, 2.0], [nan, 0.0], [3.0, nan], [0.0, 1.0]])
    ref = np.array([[0.0, 3.0], [1.0, -1.0], [1.0, 1.0], [nan, 0.0]])
    m = method_metrics(z, ["a", "b"], ref, resamples=50)
    assert m["objective_means"] == {"a": pytest.approx(4 / 3), "b": pytest.approx(1.0)}
    assert m["missing"] == {"a": 1, "b": 1} and m["complete_prompts"] == 2
    # a: prompts 0 and 2 have both sides (1 > 0, 3 > 1); b: prompts 0, 1, 3 (2 < 3, 0 > -1, 1 > 0)
    assert list(win_rates(z, ref)) == [1.0, pytest.approx(2 / 3)]
    assert worst_case_reward(z) == pytest.approx((1.0 + 0.0) / 2)
    # Only prompt 0 is complete on both sides: min 1 against min 0.
    assert worst_case_win_rate(z, ref) == 1.0
    full = np.array([[1.0, 2.0], [0.5, 0.0]])
    assert worst_case_reward(full) == pytest.approx(0.5)
    assert method_metrics(full, ["a", "b"])["missing"] == {"a": 0, "b": 0}


def test_selection_ranks_an_unscored_candidate_lowest():
    nan = np.nan
    values = torch.tensor([[[1.0, 5.0], [nan, 9.0], [0.5, 4.0]],   # candidate 1 misses objective 0
                           [[nan, 1.0], [nan, 2.0], [nan, 0.0]]], dtype=torch.float64)  # nobody has objective 0
    filled = rank_missing(values)
    # Prompt 2: nobody has objective 0, which becomes the prompt's highest value (2.0) for all.
    assert filled[0, 1, 0] == 0.5 and (filled[1, :, 0] == 2.0).all() and not torch.isnan(filled).any()
    chosen, _ = select(values, Method("cd", "cd", np.array([0.5, 0.5])))
    assert chosen == [1, 1]  # 0.5*0.5 + 0.5*9 beats the others; prompt 2 is ranked by objective 1 alone
    chosen, w = select(values, Method("rmod", "rmod"))
    assert not torch.isnan(w).any()
    # RMOD on prompt 2 leaves the unmeasured objective out and picks by objective 1 (candidate 1),
    # instead of putting every weight on a constant and tying all candidates.
    assert chosen[1] == 1 and float(w[1, 0]) < 1e-6
    chosen, _ = select(values, Method("best-of-n-maxmin", "best-of-n-maxmin"))
    assert chosen[1] == 1


def test_rmod_ignores_an_objective_no_candidate_has():
    nan = np.nan
    values = torch.tensor([[[0.5, 0.2, nan], [1.5, 1.0, nan], [2.0, 0.9, nan], [0.8, 1.2, nan]]],
                          dtype=torch.float64)
    with_column, w = select(values, Method("rmod", "rmod"))
    without, _ = select(values[:, :, :2], Method("rmod", "rmod"))
    assert with_column == without == [3] and float(w[0, 2]) < 1e-6


def test_normalizer_fits_over_present_scores():
    rewards = np.array([[1.0, 2.0], [np.nan, 4.0], [3.0, 6.0]])
    norm = Normalizer.fit(["a", "b"], rewards)
    assert norm.mean == [2.0, 4.0] and norm.samples[0] == [1.0, 3.0]
    assert math.isnan(norm(np.array([[np.nan, 4.0]]))[0, 0])
    assert math.isnan(norm.with_scale("quantile")(np.array([[np.nan, 4.0]]))[0, 0])
    with pytest.raises(UserError, match="objective 'a': fewer than 2 of 3 reference samples got a score"):
        Normalizer.fit(["a", "b"], np.array([[np.nan, 1.0], [np.nan, 2.0], [1.0, 3.0]]))


def test_cache_file_roundtrip(tmp_path):
    from rmod_distill.judge import JudgeResult

    cache = JudgeCache(tmp_path / "c.sqlite")
    cache.put("m", "h", "q", "a", JudgeResult(None, "unparseable", "no idea", 3, 30, 15))
    hit = cache.get("m", "h", "q", "a")
    assert (hit.score, hit.status, hit.reply, hit.attempts, hit.cached) == (None, "unparseable", "no idea", 3, True)
    assert cache.get("m", "h", "q", "b") is None


# ----------------------------------------------------------------------------- eval with judges


def judge_script(body, n):
    """Scores from the answer's word count; an answer of an odd number of words gets an unparseable reply."""
    words = len(answer_of(body).split())
    if words % 2:
        return 200, {}, "This answer is hard to rate."
    return 200, {}, f"Some explanation. [[{words % 11}]]"


def test_eval_with_a_judge(endpoint, rubric, tiny_policy_dir, tiny_generate_dir, tmp_path):
    e = endpoint(judge_script)
    judges = (f"[{{name: quality, kind: judge, model: scripted, judge: {{base_url: '{e.url}', rubric: '{rubric}', "
              f"cache: '{tmp_path / 'judge.sqlite'}', parse_retries: 1, backoff: 0.01}}}}]")

    def args(out):
        return ["--policy.model", str(tiny_policy_dir), "--adapter", "null", "--generate_dir", str(tiny_generate_dir),
                "--prompts.path", str(tiny_generate_dir.parent / "prompts.jsonl"), "--prompts.split", "eval",
                "--objectives", "[{name: harmlessness}, {name: concision}]", "--methods", "[rmod, reference]",
                "--decoding.num_candidates", "2", "--decoding.block_size", "4", "--decoding.max_new_tokens", "8",
                "--bootstrap_resamples", "100", "--wandb.mode", "disabled", "--judges", judges,
                "--judge_max_missing", "0.0", "--output_dir", str(out)]

    out = eval_run(parse_config(EvalConfig, args(tmp_path / "eval")))
    metrics = json.loads((out / "metrics.json").read_text())
    judge = metrics["judge"]
    records = [json.loads(x) for x in (out / "generations" / "judge.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (out / "generations" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == len(samples) == 8  # 4 eval prompts x 2 methods, one judge
    for method in ("rmod", "reference"):
        mine = [r for r in records if r["method"] == method]
        unparseable = sum(r["status"] == "unparseable" for r in mine)
        expected = [len(s["completion"].split()) for s in samples if s["method"] == method]
        assert unparseable == sum(w % 2 for w in expected)
        m = judge["methods"][method]
        assert m["missing"] == {"quality": unparseable}
        assert m["flagged"] == (unparseable > 0)
        present = [w % 11 for w in expected if not w % 2]
        if present:
            assert m["objective_means"]["quality"] == pytest.approx(np.mean(present))
        else:  # no score at all: null in metrics.json (strict JSON holds no NaN)
            assert m["objective_means"]["quality"] is None
        assert m["usage"]["quality"]["completion_tokens"] == 5 * m["usage"]["quality"]["requests"]
        assert m["tokens"] == 15 * m["requests"] and m["requests"] == len(mine) - sum(r["cached"] for r in mine) + \
            sum(r["attempts"] - 1 for r in mine if not r["cached"])
        for s in samples:
            if s["method"] == method:
                w = len(s["completion"].split())
                assert s["judge"]["quality"] == (None if w % 2 else float(w % 11))
    missing = sum(r["status"] == "unparseable" for r in records)
    assert 0 < missing < len(records), "the scripted judge should leave some scores missing, not all"
    assert "worst_case_win_rate_ci" in judge["methods"]["rmod"] and "win_rates_ci" in judge["methods"]["rmod"]
    report = (out / "report.md").read_text()
    assert "## Judge scores" in report and "WCWR (paper, judge)" in report and "quality: missing" in report
    asked = e.requests
    # A repeated eval pays nothing: every answer (and the start-up probe) comes from the cache.
    again = eval_run(parse_config(EvalConfig, args(tmp_path / "eval-again")))
    assert e.requests == asked
    second = json.loads((again / "metrics.json").read_text())["judge"]["methods"]
    assert all(m["requests"] == 0 and m["cache_hits"] == 4 and m["tokens"] == 0 for m in second.values())
    assert {m: v["missing"] for m, v in second.items()} == {m: v["missing"] for m, v in judge["methods"].items()}


def test_generate_decodes_with_a_judge_objective(endpoint, rubric, tiny_policy_dir, tmp_path):
    """A judge guiding decoding: rows keep its missing scores as null, the worst case of such a row
    is unknown, the normalisation uses the scores present, and run.json records what the judge cost."""
    from conftest import write_prompts
    from rmod_distill.generate import GenerateConfig, run as generate_run

    e = endpoint(judge_script)
    prompts = write_prompts(tmp_path / "prompts.jsonl", n_train=4, n_eval=0)
    judge = (f"{{name: quality, kind: judge, model: scripted, judge: {{base_url: '{e.url}', rubric: '{rubric}', "
             f"cache: '{tmp_path / 'judge.sqlite'}', parse_retries: 0}}}}")
    out = generate_run(parse_config(GenerateConfig, [
        "--policy.model", str(tiny_policy_dir), "--prompts.path", str(prompts),
        "--objectives", f"[{{name: concision}}, {judge}]", "--methods", "[rmod, reference]",
        "--decoding.num_candidates", "2", "--decoding.block_size", "4", "--decoding.max_new_tokens", "8",
        "--normalization_prompts", "4", "--normalization_samples", "2", "--wandb.mode", "disabled",
        "--output_dir", str(tmp_path / "gen")]))
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    calib = [json.loads(x) for x in (out / "calibration.jsonl").read_text().splitlines()]
    for r in rows + calib:
        words = len(r["completion"].split())
        assert r["rewards"]["quality"] == (None if words % 2 else float(words % 11))
    assert any(r["rewards"]["quality"] is None for r in rows + calib), "the scripted judge should leave some missing"
    for r in rows:
        assert (r["worst_case"] is None) == (r["rewards"]["quality"] is None)
    present = [r["rewards"]["quality"] for r in calib if r["rewards"]["quality"] is not None]
    norm = json.loads((out / "normalization.json").read_text())
    assert norm["mean"][1] == pytest.approx(np.mean(present)) and norm["samples"][1] == sorted(present)
    info = json.loads((out / "run.json").read_text())
    # Blockwise rmod asks the judge about every candidate prefix; reference only about its final answers.
    usage = info["judge_usage"]
    assert usage["rmod"]["quality"]["requests"] + usage["rmod"]["quality"]["cache_hits"] > \
        usage["reference"]["quality"]["requests"] + usage["reference"]["quality"]["cache_hits"] >= 4
    assert info["methods"]["rmod"]["missing"]["quality"] == sum(r["rewards"]["quality"] is None for r in rows
                                                                 if r["method"] == "rmod")


def test_cache_knows_the_endpoint(endpoint, rubric, tmp_path):
    """The same model name at another URL (a wrong one too) is not answered from the cache."""
    e = endpoint(lambda body, n: (200, {}, "[[8]]"))
    client(e.url, rubric, tmp_path).grade([CONV], ["fine"])
    assert e.requests == 1
    wrong = client("http://127.0.0.1:9/v1", rubric, tmp_path, request_retries=0)
    with pytest.raises(UserError, match="failed a test request"):
        wrong.grade([CONV], ["fine"], probe=True)


def test_a_cached_reply_is_read_with_todays_parser(tmp_path, rubric):
    cache = JudgeCache(tmp_path / "cache.sqlite")
    cfg = JudgeConfig(base_url="http://127.0.0.1:9/v1", rubric=str(rubric), cache=str(tmp_path / "cache.sqlite"),
                      parse_retries=0)
    c = JudgeClient("quality", "m", cfg)
    cache.put(c.cache_model, c.rubric.digest, render_question(CONV), "fine", JudgeResult(None, "unparseable", "[[7]]", 1))
    [r] = c.grade([CONV], ["fine"])  # no request: the endpoint does not even exist
    assert (r.score, r.status, r.cached) == (7.0, "ok", True)
