"""Samplers: where candidate blocks come from.

The engine (:mod:`rmod_distill.engine.decoding`) asks a sampler for K candidate blocks of
up to B tokens per live prompt, picks one per prompt, and tells the sampler which to keep.
Selection, scoring, rows and resumability never see how the tokens were drawn, so a second
backend (a vLLM server) plugs in by implementing :class:`Sampler`.

:class:`TransformersSampler` is the one built in: a token loop over a ``transformers``
causal LM that never recomputes the KV cache of the prompt or of accepted blocks (the
chosen rows carry into the next block, expanded K ways). Hand-written because no library
samples K continuations per prompt with cache reuse and per-prompt generators; sampling
follows ``transformers``' temperature / top-k / top-p semantics but draws its uniforms
from one generator per prompt and block, so a prompt's output does not depend on which
other prompts share its batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Block:
    """K candidate blocks for each live prompt; rows are ``j * K + k`` for live prompt j."""

    tokens: torch.Tensor  # [R, steps] long, on the CPU, padded after each candidate's end
    lengths: torch.Tensor  # [R] tokens drawn per candidate, a final stop token included
    finished: torch.Tensor  # [R] bool: the candidate ended with a stop token

    def candidate(self, row: int) -> list[int]:
        """The token ids of one candidate."""
        return self.tokens[row, : int(self.lengths[row])].tolist()


@dataclass
class SamplerTimes:
    """Seconds spent in the model's forward passes (prefill and sampling), for the benchmark."""

    forward: float = 0.0


class Sampler(Protocol):
    """What the engine needs from a sampling backend, for one batch of prompts at a time."""

    stop_ids: list[int]
    times: SamplerTimes

    def prefill(self, conversations: list[list[dict]]) -> list[list[int]]:
        """Start a batch: chat-template and read the prompts; returns each prompt's token ids."""

    def sample(self, seeds: list[int], block: int, K: int, steps: int, last: bool) -> Block:
        """Draw K candidates of up to ``steps`` tokens for every live prompt (``seeds`` in live order).

        A candidate stops early at a stop token. ``last`` says no block follows, so nothing
        need be prepared for one. Randomness comes only from ``(seeds[j], block)``.
        """

    def keep(self, rows: list[int]) -> None:
        """Continue with these candidate rows of the last block (one per still-running prompt)."""


def generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator for one prompt's seed and a salt (block number, purpose)."""
    g = torch.Generator()
    g.manual_seed((seed + 1_000_003 * sum((i + 1) * s for i, s in enumerate(salt))) % (2**63 - 1))
    return g


@dataclass
class SamplingParams:
    """Temperature, top-k and top-p, as ``transformers`` reads them (0 temperature: greedy)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


_NUCLEUS_CANDIDATES = (64, 1024)


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row with the given uniforms ``u [R]``."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    order = None
    if params.top_p < 1.0:
        # The nucleus almost always lies in the top few tokens: a partial top-k costs a
        # fraction of sorting the whole vocabulary. Widen it until every row's nucleus fits,
        # and sort everything only when none does; the kept set is the same either way.
        for k in _NUCLEUS_CANDIDATES:
            if k >= logits.shape[-1]:
                break
            top, order = torch.topk(logits, k, dim=-1)
            if k == _NUCLEUS_CANDIDATES[0]:
                peak = top[:, :1]
                norm = torch.exp(logits - peak).sum(-1, keepdim=True)
            probs = torch.exp(top - peak) / norm
            if bool((probs.sum(-1) >= params.top_p).all()):
                break
            order = None
        if order is None:
            probs, order = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        probs = probs.masked_fill(probs.cumsum(-1) - probs > params.top_p, 0.0)
    else:
        probs = torch.softmax(logits, -1)
    cdf = probs.double().cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[-1] - 1).squeeze(-1)
    return order.gather(-1, idx[:, None]).squeeze(-1) if order is not None else idx


@dataclass
class _CacheState:
    """The policy's KV cache over the live rows, with their masks, next positions and last logits."""

    cache: object
    mask: torch.Tensor
    next_pos: torch.Tensor
    logits: torch.Tensor
    rows: list[int] = field(default_factory=list)  # after a block: candidate row of each cache row


class TransformersSampler:
    """The built-in sampler: a KV-cached token loop over a ``transformers`` causal LM."""

    def __init__(self, model, tokenizer, params: SamplingParams, stop_ids: list[int]):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.device = next(model.parameters()).device
        self.stop_ids = list(stop_ids)
        self._stop = torch.tensor(self.stop_ids, dtype=torch.long, device=self.device)
        self.pad_id = tokenizer.pad_token_id
        self.times = SamplerTimes()
        self.state: _CacheState | None = None

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        t0 = time.perf_counter()
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True,
        )
        logits = out.logits[:, -1].float()
        self.times.forward += time.perf_counter() - t0
        return logits, out.past_key_values

    def prefill(self, conversations: list[list[dict]]) -> list[list[int]]:
        """Encode the chat-templated prompts (left-padded) into a fresh cache."""
        from transformers import DynamicCache

        texts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
        ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        mask = enc["attention_mask"]
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        logits, cache = self._forward(enc["input_ids"], mask, pos, DynamicCache())
        self.state = _CacheState(cache, mask, pos[:, -1] + 1, logits)
        return [row[m.bool()].tolist() for row, m in zip(enc["input_ids"].cpu(), mask.cpu())]

    def sample(self, seeds: list[int], block: int, K: int, steps: int, last: bool) -> Block:
        """Sample ``steps`` tokens for every live prompt's K candidates, reusing the cache."""
        st = self.state
        n = len(seeds)
        R = n * K
        if K > 1:
            st.cache.batch_repeat_interleave(K)
            st.mask, st.next_pos, st.logits = (t.repeat_interleave(K, 0) for t in (st.mask, st.next_pos, st.logits))
        # All of a block's uniforms at once: the same numbers as one draw of K per step and prompt.
        u_all = torch.stack([torch.rand(steps, K, generator=generator(s, block, 1)) for s in seeds], dim=1)
        u_all = u_all.reshape(steps, R).to(self.device)
        cand = torch.full((R, steps), self.pad_id, dtype=torch.long, device=self.device)
        lens = torch.zeros(R, dtype=torch.long, device=self.device)
        done = torch.zeros(R, dtype=torch.bool, device=self.device)
        rows = torch.arange(R, device=self.device)  # which candidate each cache row holds
        running = torch.ones(R, dtype=torch.bool, device=self.device)  # per cache row: not yet finished
        logits, cache, mask, next_pos = st.logits, st.cache, st.mask, st.next_pos
        pad = torch.full((R,), self.pad_id, dtype=torch.long, device=self.device)
        for s in range(steps):
            tok = sample_tokens(logits, u_all[s, rows], self.params)
            tok = torch.where(running, tok, pad[: len(rows)])
            # Written through the integer row map, never a boolean mask: masked indexing needs the
            # number of selected rows on the host, a device synchronisation per use on a GPU.
            cand[rows, s] = tok
            lens[rows] += running.long()
            stopped = torch.isin(tok, self._stop) & running
            done[rows] |= stopped
            running &= ~stopped
            n_running = int(running.sum())  # the one host sync per token
            if n_running == 0 or (s == steps - 1 and last):
                break
            if (len(rows) - n_running) * 4 >= len(rows):
                # Compact finished rows out of the batch (amortised: only once a quarter finished).
                keep = torch.nonzero(running).squeeze(-1)
                cache.batch_select_indices(keep)
                rows, running, tok = rows[keep], running[keep], tok[keep]
                mask, next_pos = mask[keep], next_pos[keep]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = self._forward(tok[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        self.state = _CacheState(cache, mask, next_pos, logits, rows.tolist())
        return Block(cand.cpu(), lens.cpu(), done.cpu())

    def keep(self, rows: list[int]) -> None:
        """Keep the cache rows that hold the chosen candidates."""
        st = self.state
        where = {r: i for i, r in enumerate(st.rows)}  # candidate row -> cache row (a list lookup was O(rows))
        idx = torch.tensor([where[r] for r in rows], device=self.device)
        st.cache.batch_select_indices(idx)
        st.mask, st.next_pos, st.logits = st.mask[idx], st.next_pos[idx], st.logits[idx]
