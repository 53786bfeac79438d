"""The blockwise decoding engine that serves every method (rmod.md, "Baselines").

For a batch of prompts, each block asks the sampler for K candidates of B tokens per live
prompt, scores the candidates with a value function, keeps one candidate per prompt with
:func:`~rmod_distill.engine.selection.select` and continues. Candidates that finish (EOS
or an end-of-turn token) end their prompt's response; finished prompts leave the batch.
Hand-written because no library does blockwise selection among sampled candidates.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch

from rmod_distill.engine.sampling import Block, Sampler, SamplingParams, TransformersSampler, generator
from rmod_distill.engine.selection import Method, parse_method, rank_missing, select
from rmod_distill.weights import SOLVERS


# The decoding keys that shape a reference answer: a normalisation measured on reference answers holds only
# for answers decoded with the same values (eval takes them from its generate run; init leaves them to it).
REFERENCE_DECODING = ("max_new_tokens", "temperature", "top_p", "top_k")


@dataclass
class DecodingConfig:
    """Blockwise decoding settings shared by every method."""

    num_candidates: int = field(default=4, metadata={"help": "K: candidates per block (best-of-n: N)."})
    block_size: int = field(default=16, metadata={"help": "B: tokens per block."})
    max_new_tokens: int = field(default=64, metadata={"help": "Response length limit in tokens."})
    lam: float = field(default=1.0, metadata={"help": "lambda: the KL-regularisation strength of the game."})
    solver: str = field(default="exact", metadata={"help": "Worst-case weight solver: exact | reference."})
    selection: str = field(default="argmax", metadata={"help": "rmod: argmax (reference impl.) | sample."})
    values: str = field(
        default="prefix",
        metadata={"help": "Value function: prefix (objectives on the partial response) | oracle | learned."},
    )
    value_model: str | None = field(
        default=None, metadata={"help": "values: learned: the folder `make values` wrote."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    cd_weights: dict[str, float] | None = field(
        default=None, metadata={"help": "cd: fixed weights per objective (null: uniform)."}
    )

    def __post_init__(self):
        for key in ("num_candidates", "block_size", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"decoding.{key} must be >= 1, got {getattr(self, key)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"decoding.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.selection not in ("argmax", "sample"):
            raise ValueError(f"decoding.selection must be argmax or sample, got {self.selection!r}")
        if self.values not in ("prefix", "oracle", "learned"):
            raise ValueError(f"decoding.values must be prefix, oracle or learned, got {self.values!r}")
        if (self.values == "learned") != bool(self.value_model):
            raise ValueError("decoding.value_model is needed with (and only with) decoding.values: learned")
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"decoding.lam must be a finite number > 0, got {self.lam}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"decoding.temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"decoding.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"decoding.top_k must be >= 0, got {self.top_k}")
        if self.cd_weights is not None and any(not (math.isfinite(v) and v >= 0) for v in self.cd_weights.values()):
            raise ValueError(f"decoding.cd_weights must be finite and non-negative, got {self.cd_weights}")

    @property
    def sampling(self) -> SamplingParams:
        """The token-level sampling settings."""
        return SamplingParams(self.temperature, self.top_p, self.top_k)

    def method(self, name: str, objectives: list[str]) -> Method:
        """Resolve a method name against the objectives (see :func:`parse_method`)."""
        return parse_method(name, objectives, self.cd_weights)


def prompt_seed(run_seed: int, prompt_id: str, method: str) -> int:
    """A 63-bit seed from the run seed, the prompt id and the method (stable across runs)."""
    digest = hashlib.sha256(f"{run_seed}\x1f{prompt_id}\x1f{method}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ValueFunction(Protocol):
    """Normalised values ``[n, G]`` of (conversation, partial response) pairs."""

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> np.ndarray: ...


class ValueCache(Protocol):
    """A value model's KV cache over a batch's prompts and accepted blocks."""

    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor, K: int) -> np.ndarray:
        """Values ``[rows * K, G]`` after each candidate's first ``lengths`` tokens of ``tokens``."""

    def keep(self, rows: list[int]) -> None:
        """Keep these candidate rows for the next block."""


@runtime_checkable
class TokenValueFunction(Protocol):
    """What a value function adds to read the policy's token ids through its own KV cache."""

    def shares_tokenizer(self, tokenizer) -> bool:
        """True when the policy's token ids mean the same to the value model."""

    def prefill(self, prompt_ids: list[list[int]]) -> ValueCache:
        """Start a cache on the prompts' token ids."""


@dataclass
class DecodeResult:
    """One prompt's response and what it cost."""

    token_ids: list[int]
    text: str = ""
    finished: bool = False
    block_weights: list[list[float]] = field(default_factory=list)
    tokens_sampled: int = 0
    forward_tokens: int = 0
    blocks: int = 0
    # With record_candidates: per scored block, its K candidates' token ids, their normalised values
    # [K][G] (null: missing), their scores under the block's weights (when the method has weights) and
    # the index kept. The response is the kept candidates in order, so each block's prefix is known.
    candidates: list[dict] = field(default_factory=list)


@dataclass
class DecodeTimes:
    """Where a decoder's wall time went (seconds): the benchmark's overhead figure reads this."""

    total: float = 0.0
    scoring: float = 0.0


class BlockwiseDecoder:
    """Decode batches of prompts with one of the methods; see the module docstring."""

    def __init__(
        self,
        sampler: Sampler,
        tokenizer,
        cfg: DecodingConfig,
        value_fn: ValueFunction | None,
        objective_names: list[str],
        reward_fn: ValueFunction | None = None,
    ):
        self.sampler, self.tokenizer, self.cfg = sampler, tokenizer, cfg
        # Keep every scored block's candidates in the results (generate sets it from keep_candidates).
        self.record_candidates = False
        self.value_fn = value_fn
        # Whole-response methods (best-of-n) rank by the rewards themselves, not by learned values.
        self.reward_fn = reward_fn or value_fn
        self.objective_names = list(objective_names)
        self.value_ids = isinstance(value_fn, TokenValueFunction) and value_fn.shares_tokenizer(tokenizer)
        self.times = DecodeTimes()

    @classmethod
    def from_model(cls, model, tokenizer, cfg: DecodingConfig, value_fn=None, objective_names=(), stop_ids=None,
                   reward_fn=None) -> "BlockwiseDecoder":
        """A decoder over a ``transformers`` model (the built-in :class:`TransformersSampler`)."""
        from rmod_distill.policy import stop_token_ids

        stops = stop_ids if stop_ids is not None else stop_token_ids(tokenizer)
        sampler = TransformersSampler(model, tokenizer, cfg.sampling, stops)
        return cls(sampler, tokenizer, cfg, value_fn, list(objective_names), reward_fn)

    def method(self, name: str) -> Method:
        """Resolve a method name against this decoder's objectives."""
        return self.cfg.method(name, self.objective_names)

    @torch.no_grad()
    def decode(
        self,
        conversations: list[list[dict]],
        seeds: list[int],
        method: Method,
        on_block: Callable[[int], None] | None = None,
    ) -> list[DecodeResult]:
        """Decode one batch; ``seeds[i]`` drives all randomness of prompt ``i``."""
        start = time.perf_counter()
        cfg = self.cfg
        K, B = method.shape(cfg.num_candidates, cfg.block_size, cfg.max_new_tokens)
        results = [DecodeResult([]) for _ in conversations]
        prompt_ids = self.sampler.prefill(conversations)
        for r, ids in zip(results, prompt_ids):
            r.forward_tokens += len(ids)
        scored = not method.plain and K > 1
        # A value model that reads the policy's token ids keeps its own KV cache alongside.
        cache = self.value_fn.prefill(prompt_ids) if self.value_ids and method.blockwise and scored else None
        live = list(range(len(conversations)))
        block = 0
        while live:
            generated = len(results[live[0]].token_ids)
            steps = min(B, cfg.max_new_tokens - generated)
            last = generated + steps >= cfg.max_new_tokens
            cand = self.sampler.sample([seeds[i] for i in live], block, K, steps, last)
            sampled = cand.lengths.view(len(live), K).sum(-1).tolist()
            for j, i in enumerate(live):
                results[i].tokens_sampled += sampled[j]
                results[i].forward_tokens += sampled[j]
            chosen, weights = [0] * len(live), None
            if scored:
                values = self._values(conversations, live, K, cand, method, results, cache)
                gens = ([generator(seeds[i], block, 2) for i in live]
                        if method.kind == "rmod" and cfg.selection == "sample" else None)
                chosen, weights = select(values, method, cfg.lam, cfg.solver, cfg.selection, gens)
                if self.record_candidates and method.blockwise:  # best-of-n picks whole answers: no block to pair
                    self._record(results, live, K, cand, values, chosen, weights)
            keep, next_live = [], []
            for j, i in enumerate(live):
                row = j * K + chosen[j]
                results[i].token_ids.extend(cand.candidate(row))
                results[i].blocks += 1
                if weights is not None:
                    results[i].block_weights.append([round(float(x), 6) for x in weights[j]])
                if cand.finished[row]:
                    results[i].finished = True
                elif not last:
                    keep.append(row)
                    next_live.append(i)
            live = next_live
            if live:
                self.sampler.keep(keep)
                if cache is not None:
                    cache.keep(keep)
            block += 1
            if on_block is not None:
                on_block(block)
        stops = set(self.sampler.stop_ids)
        bodies = []
        for r in results:
            cut = next((k for k, t in enumerate(r.token_ids) if t in stops), len(r.token_ids))
            bodies.append(r.token_ids[:cut])
        for r, text in zip(results, self.tokenizer.batch_decode(bodies, skip_special_tokens=True)):
            r.text = text.strip()
        self.times.total += time.perf_counter() - start
        return results

    @staticmethod
    def _record(results, live, K, cand: Block, values: np.ndarray, chosen: list[int], weights) -> None:
        """Append each live prompt's block candidates to its result (before the kept one extends it)."""
        scores = None
        if weights is not None:  # what the method maximised: the values (missing ones ranked) under its weights
            ranked = rank_missing(torch.as_tensor(values, dtype=torch.float64))
            scores = (ranked * torch.as_tensor(weights, dtype=torch.float64)[:, None, :]).sum(-1).tolist()
        for j, i in enumerate(live):
            entry = {
                "start": len(results[i].token_ids),
                "chosen": int(chosen[j]),
                "tokens": [cand.candidate(j * K + k) for k in range(K)],
                "values": [[None if math.isnan(x) else round(float(x), 6) for x in row] for row in values[j]],
            }
            if scores is not None:
                entry["scores"] = [round(float(x), 6) for x in scores[j]]
            results[i].candidates.append(entry)

    def _values(self, conversations, live, K, cand: Block, method: Method, results, cache) -> np.ndarray:
        """Normalised values ``[live, K, G]`` of every candidate (prefix plus candidate block)."""
        t0 = time.perf_counter()
        if cache is not None:
            # The stop token is not part of the response the value is asked about.
            raw = cache.extend(cand.tokens, cand.lengths - cand.finished.long(), K)
        else:
            bodies, convs = [], []
            for j, i in enumerate(live):
                prefix = results[i].token_ids
                for k in range(K):
                    row = j * K + k
                    body = cand.candidate(row)
                    if cand.finished[row]:
                        body = body[:-1]  # the stop token is not text
                    bodies.append(prefix + body)
                    convs.append(conversations[i])
            texts = [t.strip() for t in self.tokenizer.batch_decode(bodies, skip_special_tokens=True)]
            raw = (self.value_fn if method.blockwise else self.reward_fn)(convs, texts)
        self.times.scoring += time.perf_counter() - t0
        return np.asarray(raw, dtype=np.float64).reshape(len(live), K, -1)


@contextlib.contextmanager
def adapter_enabled(model, enabled: bool):
    """Run the base policy with its LoRA adapter switched off unless ``enabled``.

    Only ``distilled`` samples with the adapter; every other method decodes with the
    frozen reference policy, so one loaded model serves all of them. ``model`` is a PEFT
    model or anything with the same ``disable_adapter()`` (the vLLM sampler).
    """
    if enabled or not hasattr(model, "disable_adapter"):
        yield
        return
    with model.disable_adapter():
        yield
