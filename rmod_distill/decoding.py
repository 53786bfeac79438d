"""The blockwise decoding engine that serves every method (rmod.md, "Baselines").

For a batch of prompts, each block expands every live sequence into K candidates,
samples B tokens for all N x K rows with one batched forward pass per token, scores the
candidates with a value function, keeps one candidate per prompt and continues. The KV
cache of the prompt and the accepted blocks is never recomputed: the chosen rows of the
cache carry into the next block, expanded K ways. Rows that finish (EOS or an
end-of-turn token) are compacted out of the batch; finished prompts leave it.

Hand-written because no library does blockwise selection with cache reuse; sampling
follows ``transformers``' temperature / top-k / top-p semantics, but draws its uniforms
from one generator per prompt and block, so a prompt's output does not depend on which
other prompts share its batch.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from rmod_distill.weights import SOLVERS, worst_case_weights

METHOD_KINDS = ("reference", "distilled", "cd", "best-of-n", "best-of-n-maxmin", "rmod")


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
        if not self.lam > 0:
            raise ValueError(f"decoding.lam must be > 0, got {self.lam}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("decoding: temperature >= 0, 0 < top_p <= 1 and top_k >= 0 are required")
        if self.cd_weights is not None and any(v < 0 for v in self.cd_weights.values()):
            raise ValueError(f"decoding.cd_weights must be non-negative, got {self.cd_weights}")


@dataclass
class Method:
    """A decoding method resolved against the objectives: its kind and fixed weights."""

    name: str
    kind: str
    weights: np.ndarray | None = None  # cd's fixed weights over objectives

    @property
    def blockwise(self) -> bool:
        """Methods that score candidates at every block."""
        return self.kind in ("cd", "rmod")


def parse_method(name: str, objectives: list[str], cfg: DecodingConfig) -> Method:
    """Resolve ``reference | distilled | cd | cd-<objective> | best-of-n | best-of-n-maxmin | rmod``.

    ``distilled`` samples plainly like ``reference``; the caller runs it with the adapter on.
    """
    if name in METHOD_KINDS and name != "cd":
        return Method(name, name)
    if name == "cd":
        if cfg.cd_weights is None:
            w = np.full(len(objectives), 1.0 / len(objectives))
        else:
            unknown = sorted(set(cfg.cd_weights) - set(objectives))
            if unknown:
                raise ValueError(f"decoding.cd_weights: unknown objective {unknown[0]!r}; objectives are {objectives}")
            w = np.array([cfg.cd_weights.get(o, 0.0) for o in objectives], dtype=np.float64)
            if w.sum() <= 0:
                raise ValueError("decoding.cd_weights must put positive weight on some objective")
            w = w / w.sum()
        return Method(name, "cd", w)
    if name.startswith("cd-"):
        objective = name[3:]
        if objective not in objectives:
            raise ValueError(f"method {name!r}: unknown objective {objective!r}; objectives are {objectives}")
        return Method(name, "cd", np.eye(len(objectives))[objectives.index(objective)])
    raise ValueError(
        f"unknown method {name!r}; expected one of reference, cd, cd-<objective>, best-of-n, "
        f"best-of-n-maxmin, rmod, distilled"
    )


def prompt_seed(run_seed: int, prompt_id: str, method: str) -> int:
    """A 63-bit seed from the run seed, the prompt id and the method (stable across runs)."""
    digest = hashlib.sha256(f"{run_seed}\x1f{prompt_id}\x1f{method}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed: int, *salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed + 1_000_003 * sum((i + 1) * s for i, s in enumerate(salt))) % (2**63 - 1))
    return g


class ValueFunction(Protocol):
    """Normalised values ``[n, G]`` of (conversation, partial response) pairs."""

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> np.ndarray: ...


@dataclass
class DecodeResult:
    """One prompt's response and what it cost."""

    token_ids: list[int]
    text: str
    finished: bool
    block_weights: list[list[float]] = field(default_factory=list)
    tokens_sampled: int = 0
    forward_tokens: int = 0
    blocks: int = 0


_NUCLEUS_CANDIDATES = (64, 1024)


def _sample(logits: torch.Tensor, u: torch.Tensor, cfg: DecodingConfig) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row with the given uniforms ``u [R]``."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    order = None
    if cfg.top_p < 1.0:
        # The nucleus almost always lies in the top few tokens: a partial top-k costs a
        # fraction of sorting the whole vocabulary. Widen it until every row's nucleus fits,
        # and sort everything only when none does; the kept set is the same either way.
        order = None
        for k in _NUCLEUS_CANDIDATES:
            if k >= logits.shape[-1]:
                break
            top, order = torch.topk(logits, k, dim=-1)
            if k == _NUCLEUS_CANDIDATES[0]:
                peak = top[:, :1]
                norm = torch.exp(logits - peak).sum(-1, keepdim=True)
            probs = torch.exp(top - peak) / norm
            if bool((probs.sum(-1) >= cfg.top_p).all()):
                break
            order = None
        if order is None:
            probs, order = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        probs = probs.masked_fill(probs.cumsum(-1) - probs > cfg.top_p, 0.0)
    else:
        probs = torch.softmax(logits, -1)
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[-1] - 1).squeeze(-1)
    return order.gather(-1, idx[:, None]).squeeze(-1) if order is not None else idx


class BlockwiseDecoder:
    """Decode batches of prompts with one of the methods; see the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        cfg: DecodingConfig,
        value_fn: ValueFunction | None,
        objective_names: list[str],
        stop_ids: list[int] | None = None,
        reward_fn: ValueFunction | None = None,
    ):
        from rmod_distill.policy import stop_token_ids

        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.value_fn = value_fn
        # Whole-response methods (best-of-n) rank by the rewards themselves, not by learned values.
        self.reward_fn = reward_fn or value_fn
        self.objective_names = objective_names
        self.device = next(model.parameters()).device
        self.stop_ids = torch.tensor(stop_ids if stop_ids is not None else stop_token_ids(tokenizer), device=self.device)
        self.pad_id = tokenizer.pad_token_id
        shares = getattr(value_fn, "shares_tokenizer", None)
        self.value_ids = bool(shares is not None and shares(tokenizer))

    # ------------------------------------------------------------------ model calls
    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1].float(), out.past_key_values

    def _prefill(self, conversations: list[list[dict]]):
        texts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
        ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        mask = enc["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        from transformers import DynamicCache

        logits, cache = self._forward(enc["input_ids"], mask, pos, DynamicCache())
        return logits, cache, mask, pos[:, -1] + 1, enc["input_ids"]

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(
        self,
        conversations: list[list[dict]],
        seeds: list[int],
        method: Method,
        on_block: Callable[[int], None] | None = None,
    ) -> list[DecodeResult]:
        """Decode one batch; ``seeds[i]`` drives all randomness of prompt ``i``."""
        cfg = self.cfg
        n = len(conversations)
        if method.kind in ("reference", "distilled"):
            K, B = 1, cfg.max_new_tokens
        elif method.kind in ("best-of-n", "best-of-n-maxmin"):
            K, B = cfg.num_candidates, cfg.max_new_tokens
        else:
            K, B = cfg.num_candidates, cfg.block_size
        results = [DecodeResult([], "", False) for _ in range(n)]
        logits, cache, mask, next_pos, prompt_ids = self._prefill(conversations)
        for i, length in enumerate(mask.sum(-1).tolist()):
            results[i].forward_tokens += length
        # A value model that reads the policy's token ids keeps its own KV cache alongside.
        values = None
        if self.value_ids and method.blockwise and K > 1:
            values = self.value_fn.prefill(prompt_ids, mask)
        live = list(range(n))  # prompt index of each cache row
        block = 0
        while live:
            generated = len(results[live[0]].token_ids)
            steps = min(B, cfg.max_new_tokens - generated)
            last_block = generated + steps >= cfg.max_new_tokens
            cand, lens, done, cache, mask, next_pos, logits, rows_left = self._sample_block(
                live, seeds, block, K, steps, last_block, logits, cache, mask, next_pos, results
            )
            chosen = self._select(conversations, live, seeds, block, K, cand, lens, done, method, results, values)
            # Keep the chosen rows that are still running; finished prompts leave the batch.
            keep_rows, keep_candidates, next_live = [], [], []
            for j, i in enumerate(live):
                row = j * K + chosen[j]
                toks = cand[row, : lens[row]].tolist()
                results[i].token_ids.extend(toks)
                results[i].blocks += 1
                if done[row]:
                    results[i].finished = True
                elif not last_block:
                    keep_rows.append(rows_left.index(row))
                    keep_candidates.append(row)
                    next_live.append(i)
            live = next_live
            if live:
                idx = torch.tensor(keep_rows, device=self.device)
                cache.batch_select_indices(idx)
                mask, next_pos, logits = mask[idx], next_pos[idx], logits[idx]
                if values is not None:
                    values.keep(keep_candidates)
            block += 1
            if on_block is not None:
                on_block(block)
        for r in results:
            stop = [k for k, t in enumerate(r.token_ids) if t in set(self.stop_ids.tolist())]
            body = r.token_ids[: stop[0]] if stop else r.token_ids
            r.text = self.tokenizer.decode(body, skip_special_tokens=True).strip()
        return results

    def _sample_block(self, live, seeds, block, K, steps, last_block, logits, cache, mask, next_pos, results):
        """Sample ``steps`` tokens for every live prompt's K candidates, reusing the cache."""
        n = len(live)
        R = n * K
        if K > 1:
            cache.batch_repeat_interleave(K)
            mask, next_pos, logits = (t.repeat_interleave(K, 0) for t in (mask, next_pos, logits))
        gens = [_generator(seeds[i], block, 1) for i in live]
        cand = torch.full((R, steps), self.pad_id, dtype=torch.long, device=self.device)
        lens = torch.zeros(R, dtype=torch.long)
        done = torch.zeros(R, dtype=torch.bool)
        rows = torch.arange(R)  # which candidate each cache row holds
        running = torch.ones(R, dtype=torch.bool)  # per cache row: not yet finished
        for s in range(steps):
            # K uniforms per live prompt and step, whatever else is in the batch.
            u = torch.stack([torch.rand(K, generator=g) for g in gens]).reshape(-1)[rows].to(self.device)
            tok = _sample(logits, u, self.cfg)
            tok = torch.where(running.to(self.device), tok, torch.full_like(tok, self.pad_id))
            cand[rows[running], s] = tok[running.to(self.device)]
            lens[rows[running]] += 1
            stopped = torch.isin(tok, self.stop_ids).cpu() & running
            done[rows[stopped]] = True
            running &= ~stopped
            if not running.any() or (s == steps - 1 and last_block):
                break
            if (~running).sum() * 4 >= len(rows):
                # Compact finished rows out of the batch (amortised: only once a quarter finished).
                keep = torch.nonzero(running).squeeze(-1)
                cache.batch_select_indices(keep.to(self.device))
                rows, running, tok = rows[keep], running[keep], tok[keep.to(self.device)]
                mask, next_pos = mask[keep.to(self.device)], next_pos[keep.to(self.device)]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = self._forward(tok[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        sampled = lens.view(n, K).sum(-1)
        for j, i in enumerate(live):
            results[i].tokens_sampled += int(sampled[j])
            results[i].forward_tokens += int(sampled[j])
        return cand.cpu(), lens, done, cache, mask, next_pos, logits, rows.tolist()

    def _select(self, conversations, live, seeds, block, K, cand, lens, done, method, results, cached) -> list[int]:
        """Pick one candidate per live prompt; record the block's weights.

        ``cached`` is the value model's KV cache (token-id route) or None (text route).
        """
        n = len(live)
        if method.kind in ("reference", "distilled") or K == 1:
            return [0] * n
        if cached is not None:
            # The stop token is not part of the response the value is asked about.
            raw = cached.extend(cand, lens - done.long(), K)
        else:
            texts, convs = [], []
            for j, i in enumerate(live):
                prefix = results[i].token_ids
                for k in range(K):
                    row = j * K + k
                    body = cand[row, : lens[row]].tolist()
                    if done[row]:
                        body = body[:-1]  # the stop token is not text
                    texts.append(self.tokenizer.decode(prefix + body, skip_special_tokens=True).strip())
                    convs.append(conversations[i])
            raw = (self.value_fn if method.blockwise else self.reward_fn)(convs, texts)
        values = torch.as_tensor(np.asarray(raw), dtype=torch.float64).view(n, K, -1)
        if method.kind == "best-of-n":
            return values.mean(-1).argmax(-1).tolist()
        if method.kind == "best-of-n-maxmin":
            return values.min(-1).values.argmax(-1).tolist()
        if method.kind == "rmod":
            w = worst_case_weights(values, self.cfg.lam, self.cfg.solver)
        else:
            w = torch.as_tensor(method.weights, dtype=torch.float64).expand(n, -1)
        scores = (values * w[:, None, :]).sum(-1)  # [n, K]
        for j, i in enumerate(live):
            results[i].block_weights.append([round(float(x), 6) for x in w[j]])
        if method.kind == "rmod" and self.cfg.selection == "sample":
            probs = torch.softmax(self.cfg.lam * scores, -1)
            return [
                int(torch.multinomial(probs[j].float(), 1, generator=_generator(seeds[i], block, 2)))
                for j, i in enumerate(live)
            ]
        return scores.argmax(-1).tolist()


def timed_decode(decoder: BlockwiseDecoder, conversations, seeds, method, on_block=None):
    """Decode and return ``(results, seconds)``."""
    start = time.perf_counter()
    results = decoder.decode(conversations, seeds, method, on_block)
    return results, time.perf_counter() - start
