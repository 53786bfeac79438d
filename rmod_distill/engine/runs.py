"""Decoding a prompt set with several methods into rows: batched, sharded across processes, resumable.

The generate and eval stages both call :func:`decode_methods`; the values stage calls
:func:`decode_rows` for its rollouts. A row holds the prompt, the method, the completion,
raw and normalised rewards, the worst case, the weights chosen at every block and the cost.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from rmod_distill.artifacts import ShardWriter, read_jsonl
from rmod_distill.engine.decoding import BlockwiseDecoder, DecodeResult, adapter_enabled, prompt_seed
from rmod_distill.objectives import ObjectiveSet
from rmod_distill.prompts import Prompt


def process_state():
    """accelerate's process state (one process when not launched through accelerate).

    Without CUDA, processes started by ``accelerate launch --multi_gpu`` (torchrun) join
    one gloo group on the CPU; accelerate only does that when asked for ``cpu=True``.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _score(x: float) -> float | None:
    """A score as a row stores it: a missing one (NaN, a judge's) is null, never a number."""
    return None if math.isnan(x) else float(x)


def result_rows(prompts: list[Prompt], results: list[DecodeResult], objectives: ObjectiveSet, method: str, seeds,
                seconds: float) -> list[dict]:
    """Score a batch's responses and lay them out as rows."""
    raw, norm = objectives.score([p.messages for p in prompts], [r.text for r in results])
    rows = []
    for p, r, raw_row, norm_row, seed in zip(prompts, results, raw, norm, seeds):
        extra = {"candidates": r.candidates} if r.candidates else {}  # generate's keep_candidates
        rows.append({
            "prompt_id": p.id,
            "prompt": p.text,
            "messages": p.messages,
            "category": p.category,
            "split": p.split,
            "method": method,
            "completion": r.text,
            "rewards": dict(zip(objectives.names, map(_score, raw_row))),
            "normalized": dict(zip(objectives.names, map(_score, norm_row))),
            # The minimum of a row with a missing score is not known: null, and metrics leave it out.
            "worst_case": _score(norm_row.min()),
            "block_weights": r.block_weights,
            "tokens_sampled": r.tokens_sampled,
            "forward_tokens": r.forward_tokens,
            "finished": r.finished,
            "seconds": seconds / len(prompts),
            "seed": seed,
            **extra,
        })
    return rows


def decode_rows(
    decoder: BlockwiseDecoder,
    objectives: ObjectiveSet,
    prompts: list[Prompt],
    method_name: str,
    run_seed: int,
    batch_size: int,
    on_batch=None,
) -> list[dict]:
    """Decode ``prompts`` with one method in batches; ``on_batch(rows)`` sees each batch's rows."""
    method = decoder.method(method_name)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        seeds = [prompt_seed(run_seed, p.id, method_name) for p in batch]
        t0 = time.perf_counter()
        results = decoder.decode([p.messages for p in batch], seeds, method)
        rows = result_rows(batch, results, objectives, method_name, seeds, time.perf_counter() - t0)
        if on_batch is not None:
            on_batch(rows)
        out.extend(rows)
    return out


def done_rows(shards: Path) -> dict[tuple[str, str], dict]:
    """Rows already in a run's shards, by (method, prompt id); the first copy wins."""
    rows: dict[tuple[str, str], dict] = {}
    for shard in sorted(shards.glob("*.jsonl")):
        for r in read_jsonl(shard, shard=True):
            rows.setdefault((r["method"], r["prompt_id"]), r)
    return rows


def decode_methods(decoder: BlockwiseDecoder, model, objectives: ObjectiveSet, prompts: list[Prompt],
                   methods: list[str], seed: int, batch_size: int, shards: Path, state) -> dict[str, dict]:
    """Decode what the shards lack for every method, this process's share of it; returns timings.

    ``model`` is the policy, a PEFT model or a vLLM sampler (its adapter, if any, is on only for
    ``distilled``). With judge objectives, each method's timings also hold what the judges
    cost while it decoded (``judge``: requests, cache hits, missing scores, tokens).
    """
    from tqdm.auto import tqdm

    done = done_rows(shards)
    todo = {m: [p for p in prompts if (m, p.id) not in done] for m in methods}
    state.wait_for_everyone()  # every process has read the shards before any writes to them
    writer = ShardWriter(shards / f"rank-{state.process_index:05d}.jsonl")
    timings = {}
    try:
        for method in methods:
            mine = todo[method][state.process_index :: state.num_processes]
            bar = tqdm(total=len(mine), desc=method, unit="prompt", disable=not state.is_main_process)
            stats = {"tokens": 0, "seconds": 0.0}

            def on_batch(rows, bar=bar, stats=stats):
                writer.append(rows)
                stats["tokens"] += sum(r["tokens_sampled"] for r in rows)
                stats["seconds"] += sum(r["seconds"] for r in rows)
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{stats['tokens'] / max(stats['seconds'], 1e-9):.0f}")

            before = objectives.judge_usage()
            # Closed on an error too, so an error message starts on a line of its own.
            with bar, adapter_enabled(model, method == "distilled"):
                decode_rows(decoder, objectives, mine, method, seed, batch_size, on_batch)
            if before:
                stats["judge"] = {g: u.minus(before[g]).as_dict() for g, u in objectives.judge_usage().items()}
            timings[method] = stats
    finally:
        writer.close()
    state.wait_for_everyone()
    return timings


def merged_rows(shards: Path, methods: list[str], prompts: list[Prompt]) -> list[dict]:
    """Every method's rows in prompt order; a missing row is an error naming it."""
    rows = done_rows(shards)
    ordered = []
    for method in methods:
        missing = [p.id for p in prompts if (method, p.id) not in rows]
        if missing:
            raise RuntimeError(f"{shards}: method {method} is missing {len(missing)} prompts (first: {missing[0]})")
        ordered.extend(rows[(method, p.id)] for p in prompts)
    return ordered
