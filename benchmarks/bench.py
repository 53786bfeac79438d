"""`make bench`: speed, cost and scaling of the engine, as ratios measured in one run.

    python benchmarks/bench.py [--out runs/bench/bench.json] [--models embedded,random-360m]
                               [--only solver,models,overhead,distillation]

Every figure is the median of several repetitions after a warm-up, on the embedded
default and on a randomly initialised model of a larger config (SmolLM2-360M's shape), so
the same script runs on a GPU machine (bf16 there). Rows:

1. rmod / cd wall time at the same K, B, prompts and seeds (target <= 1.03): the median of
   the ratios of adjacent runs, rows 1 and 2 taking turns so a drift of the machine's speed
   does not fall on one method;
2. engine tokens/s over one plain batched ``generate`` sampling the same sequences and
   tokens (target >= 0.8 with scoring excluded), and with scoring included;
3. cache reuse: the engine against re-running ``generate`` over the whole prefix every
   block (the reference implementation's loop), at 128 and 256 new tokens, and the time
   of block 8 over block 1 of a 128-token run;
4. the weight solvers, one thread, on 1024 problems of K=16, G=10, 64 of K=16, G=2 and 64 of
   K=4, G=4 (the default recipe's shape), taking turns, medians of 31, and how much of the gap
   the reference solver closes;
5. scaling of time per response with N, K and G, and peak memory;
6. distillation's payoff, read from the default eval report when it exists;
7. RMOD's selection overhead per block on the default recipe: the share of a block's time
   outside the policy's forward passes and the objectives.

``--vllm URL`` (or ``--vllm launch``: start a server from ``.venv-vllm``) measures instead
the vLLM backend against the transformers sampler on the same recipe (16 prompts, K=4,
B=16, 64 tokens, temperature 0.7, top-p 0.9, real stop tokens): tokens/s of ``rmod`` and
``reference`` on each, and where an RMOD block's time goes on vLLM (the server round trip,
scoring, and the rest: the weight solve, decoding candidates to text, bookkeeping). It
writes ``runs/bench/vllm.json`` and ``vllm.md``.

Sequences never stop early here (no stop tokens), so every method samples the same number
of tokens and the ratios measure overhead, not luck.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rmod_distill.engine.decoding import BlockwiseDecoder, DecodingConfig, prompt_seed
from rmod_distill.objectives import Normalizer, ObjectiveSet
from rmod_distill.policy import load_policy, load_tokenizer, resolve_device, resolve_dtype
from rmod_distill.prompts import PromptsConfig, load_prompts
from rmod_distill.weights import kkt_gap, log_mean_exp_objective, worst_case_weights

ROOT = Path(__file__).resolve().parents[1]
# The default run's objective statistics, used to normalise the embedded objectives when present.
NORMALIZATION = ROOT / "runs" / "default" / "generate" / "normalization.json"


def wall_time(fn) -> float:
    """Wall seconds of one ``fn()``, the GPU's queued work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_time(fn, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(wall_time(fn) for _ in range(reps))


# SmolLM2-360M's shape: the larger model `make bench` and the GPU check measure, randomly initialised.
SMOLLM2_360M = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                    num_key_value_heads=5, max_position_embeddings=2048, tie_word_embeddings=True)


def random_llama(tok, shape: dict = SMOLLM2_360M, device: str = "auto"):
    """A Llama of ``shape`` over ``tok``'s vocabulary, randomly initialised (seed 0); bf16 on CUDA, else fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = resolve_device(device)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **shape))
    return model.to(device=dev, dtype=resolve_dtype("auto", dev)).eval()


def load_model(name: str):
    """The embedded default, or a randomly initialised model of SmolLM2-360M's shape over its tokenizer."""
    if name == "embedded":
        return load_policy("embedded")
    tok = load_tokenizer("embedded")
    return random_llama(tok), tok


def embedded_values(normalizer_path: Path | None):
    """The default objectives (normalised with the default run's statistics when present)."""
    from rmod_distill.objectives import default_objectives

    objectives = ObjectiveSet.from_specs(default_objectives())
    if normalizer_path and normalizer_path.exists():
        objectives.set_normalizer(Normalizer.load(normalizer_path))
    else:
        n = len(objectives.names)
        objectives.set_normalizer(Normalizer(objectives.names, [0.0] * n, [1.0] * n))
    return (lambda p, r: objectives.score(p, r)[1]), objectives.names


def constant_values(g: int):
    """A value function that costs nothing: isolates the engine and the solver from scoring."""
    rng = np.random.default_rng(0)
    return (lambda p, r: rng.normal(size=(len(r), g))), [f"o{i}" for i in range(g)]


def run_method(model, tok, convs, method, cfg, value_fn, names, on_block=None):
    """Decode ``convs`` once with ``method``; returns the results."""
    dec = BlockwiseDecoder.from_model(model, tok, cfg, value_fn, names, stop_ids=[])
    seeds = [prompt_seed(0, f"p{i}", method) for i in range(len(convs))]
    return dec.decode(convs, seeds, dec.method(method), on_block)


def plain_generate(model, tok, convs, k, new_tokens, cfg):
    """One batched ``generate`` call sampling K sequences per prompt, no early stop."""
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_return_sequences=k,
                   pad_token_id=tok.pad_token_id)


def naive_blockwise(model, tok, convs, cfg, value_fn):
    """The reference implementation's loop: `generate` over the whole prefix for every block."""
    K, B = cfg.num_candidates, cfg.block_size
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
    for conv, text in zip(convs, texts):
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        start = ids.shape[1]
        while ids.shape[1] - start < cfg.max_new_tokens:
            out = model.generate(ids.expand(K, -1), attention_mask=torch.ones_like(ids.expand(K, -1)),
                                 do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                 max_new_tokens=B, min_new_tokens=B, pad_token_id=tok.pad_token_id)
            responses = tok.batch_decode(out[:, start:], skip_special_tokens=True)
            v = value_fn([conv] * K, responses)
            ids = out[int(np.argmax(v.mean(1)))][None]


def peak_memory_mb() -> float:
    """Peak GPU memory when on CUDA, else the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def block_overhead(model, decoder_for, convs, method: str, seeds, values) -> dict:
    """Seconds per block in the policy's forward passes, in scoring, and everything else.

    ``decoder_for(value_fn, names)`` builds the decoder over ``values``, a ``(value_fn, names)``
    pair; forward time is taken by hooks on the model and scoring time by wrapping the value
    function, so the same measurement applies to any engine version. What is left (sampling
    arithmetic, the stop check, bookkeeping, decoding candidates to text, the weight solve)
    is the selection overhead.
    """
    times = {"forward": 0.0, "scoring": 0.0}
    starts = []

    def pre(module, args, kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        starts.append(time.perf_counter())

    def post(module, args, kwargs, output):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times["forward"] += time.perf_counter() - starts.pop()

    value_fn, names = values

    def timed_values(prompts, responses):
        t0 = time.perf_counter()
        out = value_fn(prompts, responses)
        times["scoring"] += time.perf_counter() - t0
        return out

    blocks = []
    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    try:
        decoder = decoder_for(timed_values, names)
        decoder.decode(convs[:2], seeds[:2], decoder.method(method))  # warm-up
        times.update(forward=0.0, scoring=0.0)
        t0 = time.perf_counter()
        results = decoder.decode(convs, seeds, decoder.method(method), on_block=blocks.append)
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    n_blocks = max(len(blocks), 1)
    other = total - times["forward"] - times["scoring"]
    return {"blocks": n_blocks, "seconds_per_block": total / n_blocks, "forward_share": times["forward"] / total,
            "scoring_share": times["scoring"] / total, "overhead_share": other / total,
            "overhead_ms_per_block": 1e3 * other / n_blocks, "tokens": sum(r.tokens_sampled for r in results)}


def bench_overhead(prompts, model, tok, values) -> dict:
    """Row 7: RMOD's selection overhead per block on the default recipe (16 prompts, K=4, B=16, 64 tokens),
    scoring with ``values``, a ``(value_fn, names)`` pair."""
    cfg = DecodingConfig(num_candidates=4, block_size=16, max_new_tokens=64, temperature=0.7, top_p=0.9)
    convs = [p.messages for p in prompts[:16]]
    seeds = [prompt_seed(1, p.id, "rmod") for p in prompts[:16]]
    out = block_overhead(model, lambda fn, names: BlockwiseDecoder.from_model(model, tok, cfg, fn, names),
                         convs, "rmod", seeds, values)
    print(f"7. rmod block: {1e3 * out['seconds_per_block']:.0f} ms; forward {out['forward_share']:.0%}, scoring "
          f"{out['scoring_share']:.0%}, selection overhead {out['overhead_share']:.1%} "
          f"({out['overhead_ms_per_block']:.1f} ms/block)", flush=True)
    return out


def bench_vllm(prompts, url: str, reps: int) -> dict:
    """Row 8: tokens/s of rmod and reference on the vLLM backend and on the transformers sampler.

    Both backends decode the same prompts with the same seeds and the real stop tokens;
    tokens/s counts the tokens sampled (K per prompt and step for rmod). For rmod on vLLM,
    a block's time splits into the server round trip (sampling included), scoring, and the
    rest (the weight solve, decoding to text, bookkeeping).
    """
    from rmod_distill.engine.vllm import VLLMSampler
    from rmod_distill.policy import stop_token_ids

    model, tok = load_model("embedded")
    cfg = DecodingConfig(num_candidates=4, block_size=16, max_new_tokens=64, temperature=0.7, top_p=0.9)
    value_fn, names = embedded_values(NORMALIZATION)
    convs = [p.messages for p in prompts[:16]]
    out = {"url": url, "prompts": len(convs), "K": 4, "B": 16, "max_new_tokens": 64}
    for backend in ("transformers", "vllm"):
        for method in ("reference", "rmod"):
            if backend == "vllm":
                sampler = VLLMSampler(tok, cfg.sampling, stop_token_ids(tok), [url])
                dec = BlockwiseDecoder(sampler, tok, cfg, value_fn, names)
            else:
                dec = BlockwiseDecoder.from_model(model, tok, cfg, value_fn, names)
            seeds = [prompt_seed(1, p.id, method) for p in prompts[:16]]
            blocks, stats = [], []

            def once(dec=dec, seeds=seeds, method=method, blocks=blocks, stats=stats):
                dec.times.total = dec.times.scoring = dec.sampler.times.forward = 0.0
                blocks.clear()
                res = dec.decode(convs, seeds, dec.method(method), on_block=blocks.append)
                stats[:] = [sum(r.tokens_sampled for r in res), dec.times.total, dec.times.scoring,
                            dec.sampler.times.forward, len(blocks)]

            seconds = median_time(once, reps)
            tokens, total, scoring, forward, n_blocks = stats
            out[f"{backend}_{method}_tok_s"] = tokens / seconds
            print(f"8. {backend:<12} {method:<9} {tokens / seconds:6.1f} tok/s ({tokens} tokens, {seconds:.1f} s)",
                  flush=True)
            if backend == "vllm" and method == "rmod":
                out.update(vllm_rmod_blocks=n_blocks, vllm_rmod_seconds_per_block=total / n_blocks,
                           vllm_rmod_round_trip_share=forward / total, vllm_rmod_scoring_share=scoring / total,
                           vllm_rmod_rest_share=(total - forward - scoring) / total)
    print(f"8. vllm rmod block {1e3 * out['vllm_rmod_seconds_per_block']:.0f} ms: round trip "
          f"{out['vllm_rmod_round_trip_share']:.0%}, scoring {out['vllm_rmod_scoring_share']:.0%}, rest "
          f"{out['vllm_rmod_rest_share']:.1%}", flush=True)
    return out


def vllm_table(v: dict) -> str:
    """The --vllm comparison as a table."""
    lines = ["| method | transformers tok/s | vLLM tok/s | vLLM / transformers |", "|---|---|---|---|"]
    for method in ("reference", "rmod"):
        a, b = v[f"transformers_{method}_tok_s"], v[f"vllm_{method}_tok_s"]
        lines.append(f"| `{method}` | {a:.0f} | {b:.0f} | {b / a:.2f} |")
    lines += ["", f"An RMOD block of the {v['prompts']}-prompt batch on vLLM: "
                  f"{1e3 * v['vllm_rmod_seconds_per_block']:.0f} ms; server round trip "
                  f"{v['vllm_rmod_round_trip_share']:.0%}, scoring {v['vllm_rmod_scoring_share']:.0%}, the rest "
                  f"(weight solve, decoding to text, bookkeeping) {v['vllm_rmod_rest_share']:.1%}."]
    return "\n".join(lines)


def run_vllm(args, prompts, machine: dict) -> None:
    """``--vllm``: the backend comparison alone (a launched server is stopped at the end)."""
    import contextlib
    import os

    from rmod_distill.engine.vllm import BackendConfig, VLLMServer
    from rmod_distill.policy import embedded_model_path

    out = Path(args.out).parent
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        url = args.vllm
        if url == "launch":
            cfg = BackendConfig(kind="vllm", launch=True, python=str(ROOT / ".venv-vllm" / "bin" / "python"),
                                max_model_len=1024)
            server = stack.enter_context(VLLMServer(str(embedded_model_path()), cfg, "float32",
                                                    out / "vllm-server.log"))
            url = server.url
        report = {"machine": machine, "vllm": bench_vllm(prompts, url, args.reps),
                  "load": os.getloadavg()}
    text = (f"Measured on {machine['device']} ({machine['threads']} threads, torch {machine['torch']}), "
            f"{machine['date']}; vLLM server at {report['vllm']['url']}; load average at the end "
            f"{report['load'][1]:.1f} (5 min).\n\n{vllm_table(report['vllm'])}\n")
    (out / "vllm.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "vllm.md").write_text(text)
    print()
    print(text)


def interleaved_times(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of every ``fns[name]()`` over ``reps`` rounds after ``warmup`` rounds, the
    functions taking turns within each round, in reversed order every other round, so that a
    drift of the machine's speed (another process, a frequency change) falls on all of them
    alike instead of on whichever ran last."""
    times = {name: [] for name in fns}
    for r in range(warmup + reps):
        for name, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
            seconds = wall_time(fn)
            if r >= warmup:
                times[name].append(seconds)
    return times


def bench_model(name: str, prompts, reps: int, quick: bool) -> dict:
    """Rows 1, 2, 3 and 5 for one model."""
    model, tok = load_model(name)
    values = embedded_values(NORMALIZATION)
    n = 2 if quick else 4
    cfg = DecodingConfig(num_candidates=4, block_size=16, max_new_tokens=32 if quick else 64,
                         temperature=0.7, top_p=0.9)
    res = {"model": name, "prompts": n, "K": cfg.num_candidates, "B": cfg.block_size, "new_tokens": cfg.max_new_tokens}
    convs = [p.messages for p in prompts[:n]]
    speed_rows(res, model, tok, convs, cfg, values, reps)
    if quick:
        return res
    cache_rows(res, model, tok, convs[:1], values)
    block_rows(res, model, tok, convs[:1], values)
    scaling_rows(res, model, tok, prompts, convs)
    return res


def speed_rows(res: dict, model, tok, convs, cfg, values, reps: int) -> None:
    """Rows 1 and 2 into ``res``: RMOD over CD (identical work but for the weight solve), and the
    engine over one plain batched generate of the same sequences and tokens, scoring with
    ``values`` (a ``(value_fn, names)`` pair) and without. All four take turns
    (interleaved_times); row 1 is the median of the ratios of adjacent runs."""
    name, (value_fn, names) = res["model"], values
    free_fn, free_names = constant_values(len(names))
    times = interleaved_times({
        "cd": lambda: run_method(model, tok, convs, "cd", cfg, value_fn, names),
        "rmod": lambda: run_method(model, tok, convs, "rmod", cfg, value_fn, names),
        "generate": lambda: plain_generate(model, tok, convs, cfg.num_candidates, cfg.max_new_tokens, cfg),
        "free": lambda: run_method(model, tok, convs, "cd", cfg, free_fn, free_names),
    }, reps)
    t_cd, t_rmod, t_gen, t_free = (statistics.median(times[k]) for k in ("cd", "rmod", "generate", "free"))
    each = [r / c for r, c in zip(times["rmod"], times["cd"])]
    ratio = statistics.median(each)
    res["rmod_seconds"], res["cd_seconds"], res["rmod_over_cd"], res["rmod_over_cd_each"] = t_rmod, t_cd, ratio, each
    print(f"[{name}] 1. rmod/cd = {t_rmod:.2f}/{t_cd:.2f} s, median ratio of adjacent runs {ratio:.3f} "
          f"(each: {', '.join(f'{x:.3f}' for x in res['rmod_over_cd_each'])})", flush=True)

    tokens = len(convs) * cfg.num_candidates * cfg.max_new_tokens
    res["generate_tok_s"] = tokens / t_gen
    res["engine_tok_s_scoring_excluded"] = tokens / t_free
    res["engine_tok_s_scoring_included"] = tokens / t_cd
    res["engine_over_generate_scoring_excluded"] = t_gen / t_free
    res["engine_over_generate_scoring_included"] = t_gen / t_cd
    print(f"[{name}] 2. engine/generate tok/s = {t_gen / t_free:.3f} (scoring excluded), "
          f"{t_gen / t_cd:.3f} (included); generate {tokens / t_gen:.0f} tok/s", flush=True)


def cache_rows(res: dict, model, tok, one, values) -> None:
    """Row 3's cache reuse into ``res``: the engine against the naive loop, on one prompt, at 128 and 256 tokens."""
    name, (value_fn, names) = res["model"], values
    for length in (128, 256):
        c = DecodingConfig(num_candidates=4, block_size=16, max_new_tokens=length, temperature=0.7, top_p=0.9)
        t_engine = median_time(lambda c=c: run_method(model, tok, one, "cd", c, value_fn, names), 2, warmup=0)
        t_naive = median_time(lambda c=c: naive_blockwise(model, tok, one, c, value_fn), 2, warmup=0)
        res[f"cache_engine_seconds_{length}"], res[f"cache_naive_seconds_{length}"] = t_engine, t_naive
        print(f"[{name}] 3. {length} tokens: engine {t_engine:.1f} s, naive re-encoding {t_naive:.1f} s "
              f"({t_naive / t_engine:.2f}x)", flush=True)


def block_rows(res: dict, model, tok, one, values) -> None:
    """Row 3's per-block cost along a 128-token RMOD response on one prompt into ``res``."""
    name, (value_fn, names) = res["model"], values
    c = DecodingConfig(num_candidates=4, block_size=16, max_new_tokens=128, temperature=0.7, top_p=0.9)
    stamps = []
    run_method(model, tok, one, "rmod", c, value_fn, names, on_block=lambda b: stamps.append(time.perf_counter()))
    stamps = []
    t0 = time.perf_counter()
    run_method(model, tok, one, "rmod", c, value_fn, names, on_block=lambda b: stamps.append(time.perf_counter()))
    blocks = np.diff([t0] + stamps)
    # Block 1 also pays the prompt's prefill; compare block 2 with block 8 as well.
    res["block_seconds_128"] = blocks.tolist()
    res["block8_over_block1"] = float(blocks[7] / blocks[0])
    res["block8_over_block2"] = float(blocks[7] / blocks[1])
    print(f"[{name}] 3. block 8 / block 1 = {blocks[7] / blocks[0]:.3f}, block 8 / block 2 = "
          f"{blocks[7] / blocks[1]:.3f}", flush=True)


def scaling_rows(res: dict, model, tok, prompts, convs) -> None:
    """Row 5 into ``res``: seconds per response as N, K and G grow (cheap values isolate the engine),
    each figure stored as soon as it is measured, and the peak memory."""
    name, n = res["model"], len(convs)
    free_fn, free_names = constant_values(4)
    small = DecodingConfig(num_candidates=4, block_size=8, max_new_tokens=16, temperature=0.7, top_p=0.9)
    scaling = res.setdefault("scaling_seconds_per_response", {})
    for n_ in (1, 4, 16):
        cv = [p.messages for p in prompts[:n_]]
        scaling[f"N={n_}"] = median_time(lambda cv=cv: run_method(model, tok, cv, "rmod", small, free_fn, free_names),
                                         1) / n_
    for k in (2, 4, 8, 16):
        c = DecodingConfig(num_candidates=k, block_size=8, max_new_tokens=16, temperature=0.7, top_p=0.9)
        scaling[f"K={k}"] = median_time(lambda c=c: run_method(model, tok, convs, "rmod", c, free_fn, free_names), 1) / n
    for g in (2, 4, 10):
        fn, gn = constant_values(g)
        scaling[f"G={g}"] = median_time(lambda fn=fn, gn=gn: run_method(model, tok, convs, "rmod", small, fn, gn), 1) / n
    res["peak_memory_mb"] = peak_memory_mb()
    print(f"[{name}] 5. seconds/response: " + ", ".join(f"{k} {v:.2f}" for k, v in scaling.items())
          + f"; peak memory {res['peak_memory_mb']:.0f} MB", flush=True)


def bench_solver(reps: int) -> dict:
    """Row 4: both solvers, one thread, on 1024 x K16 x G10, 64 x K16 x G2 and 64 x K4 x G4 (the default recipe).

    Per shape: median ms of each solver (after a warm-up, the two taking turns), their ratio and the exact solver's
    largest KKT gap; for the first shape also how much of the gap from uniform the reference closes.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shapes = []
        for P, K, G in ((1024, 16, 10), (64, 16, 2), (64, 4, 4)):
            A = torch.randn(P, K, G, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            times = interleaved_times({"exact": lambda: worst_case_weights(A, 1.0, "exact"),
                                       "reference": lambda: worst_case_weights(A, 1.0, "reference")}, reps)
            t_exact, t_ref = statistics.median(times["exact"]), statistics.median(times["reference"])
            w_exact, w_ref = worst_case_weights(A, 1.0, "exact"), worst_case_weights(A, 1.0, "reference")
            shapes.append({
                "shape": f"{P}x{K}x{G}", "exact_ms": 1e3 * t_exact, "reference_ms": 1e3 * t_ref,
                "exact_over_reference": t_exact / t_ref, "exact_max_kkt_gap": float(kkt_gap(A, w_exact, 1.0).max()),
            })
            if not shapes[1:]:
                f_exact = log_mean_exp_objective(A, w_exact, 1.0)
                f_ref = log_mean_exp_objective(A, w_ref, 1.0)
                f_uniform = log_mean_exp_objective(A, torch.full_like(w_exact, 1.0 / G), 1.0)
                closed = ((f_uniform - f_ref) / (f_uniform - f_exact).clamp_min(1e-12)).median()
                gap_mean = float((f_ref - f_exact).mean())
    finally:
        torch.set_num_threads(threads)
    out = {**shapes[0], "reference_gap_mean": gap_mean, "reference_share_of_gap_closed_median": float(closed),
           "shapes": shapes}
    for r in shapes:
        print(f"4. solver ({r['shape']}, 1 thread): exact {r['exact_ms']:.2f} ms, reference {r['reference_ms']:.2f} ms, "
              f"ratio {r['exact_over_reference']:.2f}, exact max KKT gap {r['exact_max_kkt_gap']:.1e}", flush=True)
    print(f"4. reference closes {closed:.0%} of the gap from uniform (mean objective gap {gap_mean:.4f})", flush=True)
    return out


def distillation_payoff() -> dict | None:
    """Row 6 from the default eval report."""
    path = ROOT / "runs" / "default" / "eval" / "metrics.json"
    if not path.exists():
        print("6. distillation payoff: no runs/default/eval/metrics.json (run `make demo` first)")
        return None
    methods = json.loads(path.read_text())["methods"]
    d, r, ref = methods["distilled"], methods["rmod"], methods["reference"]
    out = {
        "distilled_seconds": d["seconds_per_response"], "rmod_seconds": r["seconds_per_response"],
        "distilled_tokens": d["tokens_sampled_per_response"], "rmod_tokens": r["tokens_sampled_per_response"],
        "distilled_worst_case": d["worst_case_reward"], "rmod_worst_case": r["worst_case_reward"],
        "reference_worst_case": ref["worst_case_reward"],
    }
    print(f"6. distilled vs rmod: {d['seconds_per_response']:.2f} vs {r['seconds_per_response']:.2f} s/response, "
          f"{d['tokens_sampled_per_response']:.0f} vs {r['tokens_sampled_per_response']:.0f} tokens; worst case "
          f"{d['worst_case_reward']:+.3f} vs {r['worst_case_reward']:+.3f} (reference {ref['worst_case_reward']:+.3f})")
    return out


def format_table(report: dict, extra_rows=()) -> str:
    """The one table ``make bench`` prints: a row per measured figure, a column per model; ``extra_rows``
    (``[figure, target, text]`` each, the text in the first model's column) go at the end."""
    models = report["models"]
    heads = [m["model"] for m in models] or ["value"]
    rows = []

    def row(label, target, key, fmt):
        cells = [fmt.format(m[key]) if key in m else "-" for m in models]
        rows.append([label, target, *cells])

    if models:  # rows 1-3 and 5 (--only without models skips them)
        def ratio_cell(m):  # the median ratio and, when recorded, each run's
            runs = ", ".join(f"{x:.3f}" for x in m.get("rmod_over_cd_each", []))
            return "-" if "rmod_over_cd" not in m else f"{m['rmod_over_cd']:.3f}" + (f" (runs: {runs})" if runs else "")

        rows.append(["1. rmod / cd wall time (same K, B, prompts, seeds)", "<= 1.03", *map(ratio_cell, models)])
        row("2. engine / plain generate tok/s, scoring excluded", ">= 0.8", "engine_over_generate_scoring_excluded", "{:.3f}")
        row("2. engine / plain generate tok/s, scoring included", "", "engine_over_generate_scoring_included", "{:.3f}")
        row("   plain generate tok/s (K x N sequences)", "", "generate_tok_s", "{:.0f}")
        for n in (128, 256):
            cells = [f"{m[f'cache_engine_seconds_{n}']:.1f} s vs {m[f'cache_naive_seconds_{n}']:.1f} s "
                     f"({m[f'cache_naive_seconds_{n}'] / m[f'cache_engine_seconds_{n}']:.2f}x)"
                     if f"cache_engine_seconds_{n}" in m else "-" for m in models]
            rows.append([f"3. engine vs naive re-encoding loop, {n} tokens", "engine faster", *cells])
        row("3. block 8 / block 1 time, 128-token rmod", "< 1.25", "block8_over_block1", "{:.3f}")
        row("3. block 8 / block 2 time, 128-token rmod", "< 1.25", "block8_over_block2", "{:.3f}")
        for key in ("N=1", "N=4", "N=16", "K=2", "K=4", "K=8", "K=16", "G=2", "G=4", "G=10"):
            cells = [f"{m['scaling_seconds_per_response'][key]:.3f}" if key in m.get("scaling_seconds_per_response", {})
                     else "-" for m in models]
            rows.append([f"5. s/response, rmod, {key}", "", *cells])
        row("5. peak memory (MB)", "", "peak_memory_mb", "{:.0f}")
    s = report["solver"] or {"shapes": []}
    for r in s.get("shapes", [s | {"shape": "1024x16x10"}]):
        ratio = r.get("exact_over_reference", r["exact_ms"] / r["reference_ms"])
        solver = (f"{ratio:.2f}: exact {r['exact_ms']:.2f} ms (max KKT gap {r['exact_max_kkt_gap']:.1e}), reference "
                  f"{r['reference_ms']:.2f} ms")
        rows.append([f"4. solver, {r['shape']}, 1 thread, exact / reference", "<= 2", solver] + [""] * (len(heads) - 1))
    if "reference_share_of_gap_closed_median" in s:
        rows.append(["4. reference's share of the gap from uniform closed (1024x16x10)", "",
                     f"{s['reference_share_of_gap_closed_median']:.0%}"] + [""] * (len(heads) - 1))
    o = report.get("overhead")
    if o:
        text = (f"{1e3 * o['seconds_per_block']:.0f} ms/block: forward {o['forward_share']:.0%}, scoring "
                f"{o['scoring_share']:.0%}, overhead {o['overhead_share']:.1%} ({o['overhead_ms_per_block']:.1f} ms)")
        rows.append(["7. rmod selection overhead per block (default recipe)", "", text] + [""] * (len(heads) - 1))
    d = report.get("distillation")
    if d:
        text = (f"{d['distilled_seconds']:.2f} vs {d['rmod_seconds']:.2f} s/resp "
                f"({d['distilled_seconds'] / d['rmod_seconds']:.0%}); {d['distilled_tokens']:.0f} vs "
                f"{d['rmod_tokens']:.0f} tokens; worst case {d['distilled_worst_case']:+.3f} vs "
                f"{d['rmod_worst_case']:+.3f} (reference {d['reference_worst_case']:+.3f})")
        rows.append(["6. distilled vs rmod (default eval)", "", text] + [""] * (len(heads) - 1))
    rows += [list(r) + [""] * (len(heads) - 1) for r in extra_rows]
    lines = ["| figure | target | " + " | ".join(heads) + " |", "|" + "---|" * (2 + len(heads))]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    """Run every row and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench/bench.json")
    parser.add_argument("--models", default="embedded,random-360m")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="solver,models,overhead,distillation",
                        help="the parts to run, a comma list of solver (row 4), models (rows 1-3 and 5), overhead "
                             "(row 7), distillation (row 6); default: all")
    parser.add_argument("--vllm", default=None,
                        help="a vLLM server URL, or 'launch': compare the vLLM backend with transformers only")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    unknown = parts - {"solver", "models", "overhead", "distillation"}
    if unknown:
        parser.error(f"--only: unknown part(s) {sorted(unknown)}; expected solver, models, overhead, distillation")
    device = resolve_device("auto")
    prompts = load_prompts(PromptsConfig(path=str(ROOT / "data" / "prompts" / "default.jsonl"), split="eval"))
    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.vllm:
        run_vllm(args, prompts, machine)
        return
    report = {
        "machine": machine,
        "solver": bench_solver(max(args.reps, 31)) if "solver" in parts else None,  # milliseconds each
        "models": [bench_model(m, prompts, args.reps, quick=(m != "embedded" and device.type == "cpu"))
                   for m in args.models.split(",")] if "models" in parts else [],
        "overhead": bench_overhead(prompts, *load_model("embedded"), embedded_values(NORMALIZATION))
        if "overhead" in parts and "embedded" in args.models.split(",") else None,
        "distillation": distillation_payoff() if "distillation" in parts else None,
    }
    table = format_table(report)
    text = (f"Measured on {report['machine']['device']} ({report['machine']['threads']} threads, "
            f"torch {report['machine']['torch']}), {report['machine']['date']}.\n\n{table}\n")
    # The latest run under the given name, and every run kept under its own time stamp.
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{out.stem}-{report['machine']['date'].replace(':', '')}"
    stamped = out.parent / stamp
    for path in (out, out.parent / f"{stamp}.json"):
        path.write_text(json.dumps(report, indent=2) + "\n")
    for path in (out.parent / f"{out.stem}.md", out.parent / f"{stamp}.md"):
        path.write_text(text)
    print()
    print(table)
    print(f"\nbench -> {out}, {out.parent / (out.stem + '.md')} (and {stamped.name}.*)")


if __name__ == "__main__":
    main(sys.argv[1:])
