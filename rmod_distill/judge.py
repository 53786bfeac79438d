"""LLM-judge scores: an OpenAI-compatible chat endpoint grading each answer on a rubric's scale.

The paper's headline worst-case win rates come from GPT-4o scoring every response 0-10 per
objective, not from the reward models. This module is that protocol, done so that a number
can be trusted: the rubric is a text file (hashed into the cache key), the judge is asked at
temperature 0, its reply is parsed to a score on the rubric's scale or to *missing*, a reply
that cannot be parsed is asked again a bounded number of times with a format reminder, and a
reply that still cannot be parsed, or a request that fails, stays missing: never a default
score (the authors' script scores 5 there, which pulls every method towards a tie).

Requests run concurrently (bounded), with a timeout each and exponential backoff on rate
limits (HTTP 429, honouring ``Retry-After``), server errors and dropped connections. Every
answer is kept in an on-disk SQLite cache keyed by (endpoint URL and model, rubric hash, prompt,
response), so a resumed or repeated eval does not pay twice; parsed and unparseable replies
are cached, failed requests are not (the next run asks again). Tokens come from the
endpoint's ``usage`` field.

Hand-written over ``httpx`` (already what the vLLM backend speaks) because the judge needs
only one endpoint, and the OpenAI client library is not part of this project's environment.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

from rmod_distill.errors import UserError

SECTION = re.compile(r"^=== (system|user|retry) ===\s*$", re.M)
DEFAULT_RETRY = "Reply with only your final score for the answer above, as [[score]], a number from {min} to {max}."


@dataclass
class JudgeConfig:
    """The ``judge:`` section of an objective of kind ``judge`` (its ``model`` is the endpoint's model name)."""

    base_url: str = field(
        default="", metadata={"help": "OpenAI-compatible endpoint up to /v1, e.g. https://api.openai.com/v1 or "
                                      "http://127.0.0.1:8000/v1 (a vLLM server)."},
    )
    rubric: str = field(
        default="", metadata={"help": "Text file with the rubric: '=== system ===' and '=== user ===' sections; the "
                                      "user section holds {question} and {answer} (optional '=== retry ===')."},
    )
    api_key_env: str | None = field(
        default=None, metadata={"help": "Name of the environment variable holding the API key (never the key "
                                        "itself); null for an endpoint without keys (a local vLLM server)."},
    )
    scale_min: float = field(default=0.0, metadata={"help": "Lowest score the rubric allows."})
    scale_max: float = field(default=10.0, metadata={"help": "Highest score the rubric allows."})
    max_tokens: int = field(default=512, metadata={"help": "Longest judge reply in tokens (explanation and score)."})
    parse_retries: int = field(
        default=2, metadata={"help": "Follow-up turns asking for the score alone when a reply cannot be parsed."},
    )
    request_retries: int = field(
        default=5, metadata={"help": "Retries of a request on rate limits (429), server errors and timeouts."},
    )
    backoff: float = field(default=2.0, metadata={"help": "Seconds before the first retry; doubled each time, <= 60."})
    concurrency: int = field(default=8, metadata={"help": "Requests in flight at once."})
    timeout: float = field(default=120.0, metadata={"help": "Seconds to wait for one reply."})
    cache: str | None = field(
        default="", metadata={"help": "SQLite cache file ('': $RMOD_DISTILL_CACHE/judge-cache.sqlite; null: off)."},
    )

    def validate(self, objective: str) -> None:
        """Every check that needs no file or network; raises ValueError naming the objective and key."""
        where = f"objective {objective!r}: judge"
        if not self.base_url.startswith(("http://", "https://")) or len(self.base_url.split("//", 1)[1]) == 0:
            raise ValueError(f"{where}.base_url: expected http(s)://host[:port]/v1, got {self.base_url!r}")
        if not self.rubric:
            raise ValueError(f"{where}.rubric: expected the path of a rubric text file")
        if not (math.isfinite(self.scale_min) and math.isfinite(self.scale_max) and self.scale_min < self.scale_max):
            raise ValueError(f"{where}.scale_min/scale_max: expected finite numbers with scale_min < scale_max, got "
                             f"{self.scale_min} and {self.scale_max}")
        if self.max_tokens < 1 or self.concurrency < 1 or min(self.parse_retries, self.request_retries) < 0:
            raise ValueError(f"{where}: max_tokens and concurrency must be >= 1, parse_retries and request_retries "
                             ">= 0")
        if not (self.timeout > 0 and self.backoff >= 0):
            raise ValueError(f"{where}: timeout must be > 0 and backoff >= 0")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(f"{where}.api_key_env: expected the NAME of an environment variable (such as "
                             f"OPENAI_API_KEY), got {self.api_key_env!r}; never put the key in a recipe")


# ----------------------------------------------------------------------------- rubric


@dataclass
class Rubric:
    """A rubric file's messages; ``digest`` identifies it (with the scale and reply length) in the cache."""

    path: str
    system: str
    user: str
    retry: str
    digest: str

    @classmethod
    def load(cls, path: str, objective: str, cfg: JudgeConfig) -> "Rubric":
        """Read and check a rubric file; a missing or malformed one is one line naming it."""
        p = Path(path)
        if not p.is_file():
            raise UserError(f"objective {objective!r}: judge.rubric file {path} does not exist; expected a text file "
                            "with '=== system ===' and '=== user ===' sections")
        text = p.read_text(encoding="utf-8")
        parts = SECTION.split(text)
        sections = {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
        user = sections.get("user", "")
        missing = [key for key in ("{question}", "{answer}") if user.count(key) != 1]
        if not user or missing:
            raise UserError(f"objective {objective!r}: judge.rubric file {path}: expected a '=== user ===' section "
                            f"holding {{question}} and {{answer}} once each (missing or repeated: {missing or 'all'})")
        retry = sections.get("retry") or DEFAULT_RETRY
        retry = retry.replace("{min}", f"{cfg.scale_min:g}").replace("{max}", f"{cfg.scale_max:g}")
        system = sections.get("system", "")
        key = "\x1f".join([system, user, retry, f"{cfg.scale_min:g}", f"{cfg.scale_max:g}", str(cfg.max_tokens)])
        return cls(path, system, user, retry, hashlib.sha256(key.encode()).hexdigest()[:16])

    def messages(self, question: str, answer: str) -> list[dict]:
        """The judge's chat: the system message (if any) and the filled-in user message."""
        user = self.user.replace("{question}", question).replace("{answer}", answer)
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}]


def render_question(conversation: list[dict]) -> str:
    """The prompt as the judge reads it: the user's text, or the dialogue's turns for several."""
    turns = [m for m in conversation if m["role"] in ("user", "assistant")]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)


# ----------------------------------------------------------------------------- parsing

_NUM = r"[-+]?\d+(?:\.\d+)?"
_DOUBLE = re.compile(r"\[\[\s*(" + _NUM + r")\s*\]\]")
_SINGLE = re.compile(r"(?<!\[)\[\s*(" + _NUM + r")\s*\](?!\])")
_RANGE_IN_BRACKETS = re.compile(r"\[\[?\s*" + _NUM + r"\s*(?:-|–|to|,)\s*" + _NUM + r"\s*\]?\]")
_RANGE_OUT_OF = re.compile(_NUM + r"\s*(?:-|–|to)\s*" + _NUM + r"\s*(?:/|out of)\s*\d+", re.I)
_LABELLED = re.compile(r"(?:score|rating|grade)\s*(?:is|of|=|:)?\s*\**\s*(" + _NUM + r")(?:\s*(?:/|out of)\s*(\d+))?",
                       re.I)
_OUT_OF = re.compile(r"(" + _NUM + r")\s*(?:/|out of)\s*(\d+)", re.I)
_BARE = re.compile(r"^\s*\**\s*(" + _NUM + r")\s*\**\s*\.?\s*$")
_RANGE = re.compile(_NUM + r"\s*(?:-|–|to)\s*" + _NUM)


def parse_score(reply: str | None, scale_min: float = 0.0, scale_max: float = 10.0) -> float | None:
    """A judge reply's score on ``[scale_min, scale_max]``, or None when it cannot be read unambiguously.

    In order: scores in double brackets ``[[7]]`` (the format the rubrics ask for), then in
    single brackets ``[7]`` (the reference script's), then labelled ones (``Score: 7``,
    ``rating of 7/10``) or ``7/10``, then a reply that is only a number. Within the first rule
    that finds anything, every number found must agree: two different scores, a range
    (``[6-7]``, ``score: 6-7``), a denominator other than the scale's top, or a score off the
    scale is missing (None), as is a refusal or a reply with no score. Never a default.
    """
    if not reply:
        return None
    if _RANGE_IN_BRACKETS.search(reply) or _RANGE_OUT_OF.search(reply):
        return None
    for rule in (_DOUBLE, _SINGLE):
        found = {float(x) for x in rule.findall(reply)}
        if found:
            return _on_scale(found, scale_min, scale_max)
    labelled = _LABELLED.findall(reply) or _OUT_OF.findall(reply)
    if labelled:
        if any(den and float(den) != scale_max for _, den in labelled):
            return None
        for m in _LABELLED.finditer(reply):  # "score: 6-7" is a range, not a 6
            if _RANGE.match(reply, m.start(1)):
                return None
        return _on_scale({float(x) for x, _ in labelled}, scale_min, scale_max)
    bare = _BARE.match(reply)
    if bare:
        return _on_scale({float(bare.group(1))}, scale_min, scale_max)
    return None


def _on_scale(found: set[float], lo: float, hi: float) -> float | None:
    if len(found) != 1:
        return None
    (x,) = found
    return x if lo <= x <= hi else None


# ----------------------------------------------------------------------------- cache


class JudgeCache:
    """Judge answers on disk (SQLite), keyed by (model, rubric hash, prompt, response).

    One connection guarded by a lock: lookups and writes are tiny next to a judge request.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        with self.lock, self.db:
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS judge (model TEXT, rubric TEXT, prompt TEXT, response TEXT, score REAL, "
                "status TEXT, reply TEXT, attempts INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER, "
                "PRIMARY KEY (model, rubric, prompt, response))")

    def get(self, model: str, rubric: str, prompt: str, response: str) -> "JudgeResult | None":
        """The stored answer, or None."""
        with self.lock:
            row = self.db.execute("SELECT score, status, reply, attempts FROM judge WHERE model=? AND rubric=? AND "
                                  "prompt=? AND response=?", (model, rubric, prompt, response)).fetchone()
        if row is None:
            return None
        return JudgeResult(row[0], row[1], row[2], row[3], cached=True)

    def put(self, model: str, rubric: str, prompt: str, response: str, result: "JudgeResult") -> None:
        """Store an answer (its tokens too, for the record)."""
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO judge VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (model, rubric, prompt, response, result.score, result.status, result.reply,
                             result.attempts, result.prompt_tokens, result.completion_tokens))

    def close(self) -> None:
        """Close the database."""
        self.db.close()


def default_cache_path() -> Path:
    """``$RMOD_DISTILL_CACHE/judge-cache.sqlite`` (default ``~/.cache/rmod-distill``), beside the converted models."""
    return Path(os.environ.get("RMOD_DISTILL_CACHE", Path.home() / ".cache" / "rmod-distill")) / "judge-cache.sqlite"


# ----------------------------------------------------------------------------- the client


@dataclass
class JudgeResult:
    """One graded answer: ``score`` is None when missing (``status`` says why)."""

    score: float | None
    status: str  # ok | unparseable | failed
    reply: str = ""
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    cached: bool = False
    error: str = ""


@dataclass
class JudgeUsage:
    """What a judge has cost and found so far (summed over calls); ``minus`` gives one stretch's share."""

    requests: int = 0
    cache_hits: int = 0
    scored: int = 0
    unparseable: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, r: JudgeResult) -> None:
        """Count one graded answer."""
        self.requests += r.requests
        self.cache_hits += int(r.cached)
        self.scored += int(r.status == "ok")
        self.unparseable += int(r.status == "unparseable")
        self.failed += int(r.status == "failed")
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens

    def minus(self, before: "JudgeUsage") -> "JudgeUsage":
        """The usage since ``before`` was taken."""
        return JudgeUsage(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def copy(self) -> "JudgeUsage":
        """A snapshot."""
        return self.minus(JudgeUsage())

    def as_dict(self) -> dict:
        """JSON-ready, with the total tokens."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["total_tokens"] = self.prompt_tokens + self.completion_tokens
        return out


class _RequestFailed(Exception):
    pass


class JudgeClient:
    """Grades (conversation, answer) pairs with one rubric on one endpoint; see the module docstring."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, objective: str, model: str, cfg: JudgeConfig):
        import httpx

        self.objective, self.model, self.cfg = objective, model, cfg
        self.rubric = Rubric.load(cfg.rubric, objective, cfg)
        headers = {}
        if cfg.api_key_env is not None:
            key = os.environ.get(cfg.api_key_env, "")
            if not key:
                raise UserError(f"objective {objective!r}: judge.api_key_env names {cfg.api_key_env}, which is not set "
                                f"(or empty); export {cfg.api_key_env}=<your key> (set api_key_env: null for an "
                                "endpoint without keys)")
            headers["Authorization"] = f"Bearer {key}"
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        # The cache knows a judge by its endpoint and model name: another URL (a wrong one too)
        # asks again. Other weights served under the same name at the same URL are not noticed.
        self.cache_model = f"{cfg.base_url.rstrip('/')} {model}"
        self.client = httpx.Client(timeout=cfg.timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=cfg.concurrency))
        self.cache = None
        if cfg.cache is not None:
            self.cache = JudgeCache(cfg.cache or default_cache_path())
        self.usage = JudgeUsage()

    def close(self) -> None:
        """Close connections and the cache."""
        self.client.close()
        if self.cache is not None:
            self.cache.close()

    # -------------------------------------------------------------- one request
    def _post(self, messages: list[dict], retries: int) -> tuple[str, int, int, int]:
        """``(reply, prompt_tokens, completion_tokens, requests)``; raises :class:`_RequestFailed`."""
        import httpx

        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.cfg.max_tokens}
        requests = 0
        for attempt in range(retries + 1):
            wait = min(60.0, self.cfg.backoff * 2**attempt)
            requests += 1
            try:
                reply = self.client.post(self.url, json=body)
            except httpx.HTTPError as exc:  # timeouts, refused or dropped connections
                error = f"{type(exc).__name__}: {exc}"
            else:
                if reply.status_code == 200:
                    try:
                        data = reply.json()
                        content = data["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        raise _RequestFailed(f"unreadable reply ({type(exc).__name__}: {reply.text[:200]})",
                                             requests) from None
                    usage = data.get("usage") or {}
                    return content, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), \
                        requests
                error = f"HTTP {reply.status_code}: {reply.text[:200].strip()}"
                if reply.status_code not in self.RETRY_STATUS:
                    raise _RequestFailed(error, requests)
                after = reply.headers.get("retry-after")
                if after is not None:
                    try:
                        wait = min(60.0, max(0.0, float(after)))
                    except ValueError:
                        pass
            if attempt < retries:
                time.sleep(wait)
        raise _RequestFailed(error, requests)

    def _grade(self, question: str, answer: str, retries: int) -> JudgeResult:
        """Ask, parse, and ask again with the format reminder while the reply cannot be parsed."""
        messages = self.rubric.messages(question, answer)
        result = JudgeResult(None, "unparseable")
        for attempt in range(self.cfg.parse_retries + 1):
            try:
                reply, pt, ct, n = self._post(messages, retries)
            except _RequestFailed as exc:
                result.status, result.error = "failed", str(exc.args[0])
                result.requests += exc.args[1]
                return result
            result.attempts, result.reply = attempt + 1, reply
            result.prompt_tokens += pt
            result.completion_tokens += ct
            result.requests += n
            score = parse_score(reply, self.cfg.scale_min, self.cfg.scale_max)
            if score is not None:
                result.score, result.status = score, "ok"
                return result
            messages = messages + [{"role": "assistant", "content": reply},
                                   {"role": "user", "content": self.rubric.retry}]
        return result

    # -------------------------------------------------------------- many
    def grade(self, conversations: list[list[dict]], answers: list[str], probe: bool = False) -> list[JudgeResult]:
        """Grade every pair (cached ones from the cache, the rest concurrently), in order.

        ``probe`` (the start-up check) does not retry and raises, naming the objective and
        the endpoint, when the endpoint cannot be reached or refuses the request.
        """
        questions = [render_question(c) for c in conversations]
        results: list[JudgeResult | None] = [None] * len(answers)
        todo = []
        for i, (q, a) in enumerate(zip(questions, answers)):
            hit = self.cache.get(self.cache_model, self.rubric.digest, q, a) if self.cache is not None else None
            if hit is not None and hit.status == "unparseable":
                # Read the stored reply with today's parser; ask again if this run allows more follow-ups.
                score = parse_score(hit.reply, self.cfg.scale_min, self.cfg.scale_max)
                if score is not None:
                    hit.score, hit.status = score, "ok"
                elif hit.attempts < self.cfg.parse_retries + 1:
                    hit = None
            if hit is not None:
                results[i] = hit
            else:
                todo.append(i)
        if todo:
            retries = 0 if probe else self.cfg.request_retries
            with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(todo))) as pool:
                graded = list(pool.map(lambda i: self._grade(questions[i], answers[i], retries), todo))
            for i, r in zip(todo, graded):
                results[i] = r
                if probe and r.status == "failed":
                    raise UserError(f"objective {self.objective!r}: the judge endpoint {self.url} (model "
                                    f"{self.model!r}) failed a test request ({r.error}); expected an OpenAI-compatible "
                                    "server at judge.base_url serving that model")
                if self.cache is not None and r.status != "failed":
                    self.cache.put(self.cache_model, self.rubric.digest, questions[i], answers[i], r)
        for r in results:
            self.usage.add(r)
        return results  # type: ignore[return-value]
