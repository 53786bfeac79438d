"""The GPU check: the engine's `make bench` rows, the solver rows and one TRL step each of LoRA SFT and DPO,
sized to run within 8 minutes on a bare GPU machine (docs/gpu.md).

    bash scripts/gpu_check.sh --out DIR [--device auto|cuda|cpu] [--smoke] [--tokenizer DIR]
                              [--only PART,...] [--budget PART=SECONDS ...] [--total SECONDS]

(the script installs the carried wheels the machine lacks, then runs ``python benchmarks/gpu_check.py``
with the same arguments). The model is a random Llama of SmolLM2-360M's shape (``bench.random_llama``;
bf16 on CUDA, fp32 on CPU) over SmolLM2's tokenizer, which ``make gpu-wheels`` saves into
``.gpu-wheels/tokenizer`` so that nothing is downloaded. Objective values are constants
(``bench.constant_values``): the embedded scorers do not travel, and the engine is what is measured.

Each part runs under its own time budget (a SIGALRM in this process) and all of them under
``--total`` seconds: a part that runs out of time stops there and keeps what it had measured
(``cut``), a part that cannot run is ``skipped``, each with its reason, printed and written.
``gpu_check.json`` and ``gpu_check.md`` (one table) are rewritten in ``--out`` after every part,
so a run killed from outside still leaves what it measured.

``--smoke``: a 2-layer model of hidden size 64 over the tokenizer retrained to 1024 tokens, few
repetitions and 10 s a part, to run on a CPU in about a minute (``tests/test_gpu_check.py`` runs it
so that the check cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from bench import (ROOT, SMOLLM2_360M, bench_overhead, bench_solver, block_rows, cache_rows, constant_values,
                   format_table, peak_memory_mb, random_llama, run_method, scaling_rows, speed_rows)
from rmod_distill.artifacts import PACKAGES, atomic_write_text, package_versions, provenance, write_json
from rmod_distill.engine.decoding import DecodingConfig
from rmod_distill.policy import load_tokenizer, prepare_tokenizer, resolve_device
from rmod_distill.prompts import PromptsConfig, load_prompts

# Seconds each part may take on the full run: their sum, 440 s, fits the default --total of 450 s,
# which fits the script's hard limit of 480 s (8 minutes) with Python's start-up.
BUDGETS = {"model": 45, "solver": 40, "speed": 75, "blocks": 30, "scaling": 50, "overhead": 45, "syncs": 20,
           "cache": 35, "sft": 50, "dpo": 50}
# --smoke: a tiny model over the tokenizer retrained to a small vocabulary (nucleus sampling over SmolLM2's 49k
# tokens is most of a CPU's time), and any part at most 10 s, all of them 120 s: about a minute on a CPU.
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
SMOKE_VOCABULARY = 1024
SMOKE_BUDGET, SMOKE_TOTAL = 10.0, 120.0
# Recorded beside the project's packages: what the carried wheels may have replaced, and what they rely on.
MACHINE_PACKAGES = PACKAGES + ("huggingface-hub", "tokenizers", "pyarrow", "fsspec", "numba")
# A part is not started with less than this left of the total: it could measure nothing.
MIN_PART_SECONDS = 5.0


class OutOfTime(BaseException):
    """A part's budget ran out (a BaseException, so that no library's ``except Exception`` swallows it)."""


class Skip(Exception):
    """A part cannot run here; the message says why."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`OutOfTime` in the main thread once ``seconds`` have passed (SIGALRM: the
    interpreter raises it between two operations, so a part stops within one kernel or step)."""
    def expire(signum, frame):
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(name: str, fn, budget: float, deadline: float, parts: dict) -> None:
    """Run ``fn()`` as part ``name`` within ``budget`` seconds and before ``deadline`` (monotonic);
    record its status, wall time and peak memory in ``parts[name]`` and print one line."""
    left = deadline - time.monotonic()
    if left < MIN_PART_SECONDS:
        parts[name] = {"status": "skipped", "reason": f"the total budget is spent ({left:.0f} s left)"}
        print(f"gpu_check: {name}: skipped, {parts[name]['reason']}", flush=True)
        return
    limit = min(budget, left)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    record = {"budget_s": round(limit, 1)}
    t0 = time.monotonic()
    try:
        with time_limit(limit):
            fn()
        record["status"] = "ok"
    except OutOfTime:
        record.update(status="cut", reason=f"stopped at its {limit:g} s budget; what it measured before is kept")
    except Skip as exc:
        record.update(status="skipped", reason=str(exc))
    except Exception as exc:  # a failing part must not cost the others their minutes
        traceback.print_exc()
        record.update(status="failed", reason=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    record.update(seconds=round(time.monotonic() - t0, 2), peak_memory_mb=round(peak_memory_mb()))
    parts[name] = record
    print(f"gpu_check: {name}: {record['status']} in {record['seconds']:.1f} s of {record['budget_s']:g} s"
          + (f" ({record['reason']})" if "reason" in record else ""), flush=True)


@contextlib.contextmanager
def optimizer_step_times():
    """Wall-clock stamps of every optimizer step taken inside (a global torch hook: TRL's trainers
    step through accelerate's wrapper, and each step ends in the optimizer's ``step``)."""
    stamps: list[float] = []

    def stamp(optimizer, args, kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    handle = register_optimizer_step_post_hook(stamp)
    try:
        yield stamps
    finally:
        handle.remove()


def host_syncs(res: dict, model, tok, prompts) -> None:
    """Host synchronisations per token step of an RMOD decode (4 prompts, K=4, B=16, 64 tokens), counted by
    CUDA's sync debug mode; the engine's design is one per token (the stop check)."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        raise Skip("no CUDA device: host synchronisations are counted by CUDA's sync debug mode")
    cfg = DecodingConfig(num_candidates=4, block_size=16, max_new_tokens=64, temperature=0.7, top_p=0.9)
    convs = [p.messages for p in prompts[:4]]
    fn, names = constant_values(4)
    run_method(model, tok, convs, "rmod", cfg, fn, names)  # warm-up: the solver's compilation, the allocator
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_method(model, tok, convs, "rmod", cfg, fn, names)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    res.update(host_syncs=syncs, token_steps=cfg.max_new_tokens, host_syncs_per_token=syncs / cfg.max_new_tokens,
               host_syncs_per_block=syncs / (cfg.max_new_tokens // cfg.block_size))
    print(f"syncs: {syncs} host synchronisations in {cfg.max_new_tokens} token steps "
          f"({res['host_syncs_per_token']:.2f} per token)", flush=True)


def training_rows(prompts, n: int, words: int) -> list[dict]:
    """Generate-like rows for ``n`` prompts: an ``rmod`` and a ``reference`` answer each (worst case 1 and 0),
    the answers made of other prompts' text, about ``words`` words long."""
    texts = [p.messages[-1]["content"] for p in prompts]

    def answer(i: int) -> list[dict]:
        out, j = [], i
        while sum(len(t.split()) for t in out) < words:
            out.append(texts[j % len(texts)])
            j += 1
        return [{"role": "assistant", "content": " ".join(out)}]

    rows = []
    for i, p in enumerate(prompts[:n]):
        rows.append({"method": "rmod", "prompt_id": p.id, "prompt": p.messages, "completion": answer(i + 1),
                     "worst_case": 1.0})
        rows.append({"method": "reference", "prompt_id": p.id, "prompt": p.messages, "completion": answer(i + 7),
                     "worst_case": 0.0})
    return rows


def train_steps(kind: str, res: dict, tok, shape: dict, device: str, rows: list[dict], steps: int, batch: int) -> None:
    """``steps`` optimizer steps of LoRA ``sft`` (TRL's SFTTrainer, as distill runs it) or ``dpo`` (distill's
    ``train_dpo``: TRL's DPOTrainer, the reference being the adapter switched off) on a fresh random model,
    with the default recipe's LoRA and training settings; seconds per step after the first."""
    import datasets
    from trl import SFTTrainer, get_peft_config

    from rmod_distill.config import parse_config
    from rmod_distill.distill import DistillConfig, train_dpo

    cuda = resolve_device(device).type == "cuda"
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{kind}-") as tmp:
        cfg = parse_config(DistillConfig, [
            "--config", str(ROOT / "recipes" / "default" / "distill.yaml"), "--output_dir", tmp,
            "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--eval_fraction", "0",
            "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
            "--bf16", str(cuda).lower(), "--use_cpu", str(not cuda).lower(), "--wandb.mode", "disabled",
        ])
        model = random_llama(tok, shape, device)
        peft_config = get_peft_config(cfg.model)
        t0 = time.perf_counter()
        with optimizer_step_times() as stamps:
            if kind == "sft":
                keep = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows if r["method"] == "rmod"]
                trainer = SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(keep),
                                     processing_class=tok, peft_config=peft_config)
                loss = trainer.train().training_loss
            else:
                metrics: dict = {}
                train_dpo(cfg, model, tok, rows, peft_config, Path(tmp), metrics)
                loss = metrics["dpo_train_loss"]
    steps_s = np.diff(stamps).tolist()
    res.update(steps=len(stamps), batch=batch, max_length=cfg.max_length, lora_r=cfg.model.lora_r,
               dtype=str(next(model.parameters()).dtype).removeprefix("torch."), train_loss=float(loss),
               setup_and_first_step_seconds=stamps[0] - t0 if stamps else None,
               seconds_per_step=statistics.median(steps_s) if steps_s else None, step_seconds=steps_s)
    print(f"{kind}: {len(stamps)} steps of batch {batch}, {res['seconds_per_step'] or float('nan'):.3f} s/step "
          f"after the first, loss {loss:.3f}", flush=True)


def table_rows(report: dict) -> list[list[str]]:
    """The check's rows beyond bench's table: host syncs, the training steps, and every part's status."""
    rows = []
    syncs = report["syncs"]
    if "host_syncs_per_token" in syncs:
        rows.append(["host syncs per token step, rmod (CUDA sync debug mode)", "1 (the stop check)",
                     f"{syncs['host_syncs_per_token']:.2f} ({syncs['host_syncs']} in {syncs['token_steps']} steps)"])
    for kind, label in (("sft", "LoRA SFT step (TRL SFTTrainer)"), ("dpo", "LoRA DPO step (TRL DPOTrainer)")):
        t = report["training"].get(kind, {})
        if t.get("seconds_per_step") is not None:
            peak = report["parts"].get(kind, {}).get("peak_memory_mb")
            rows.append([f"{label}, batch {t['batch']}, {t['dtype']}", "",
                         f"{t['seconds_per_step']:.3f} s/step (median of {len(t['step_seconds'])}); "
                         f"peak memory {peak} MB"])
    for name, part in report["parts"].items():
        text = part["status"] + (f", {part['seconds']:.1f} s of {part['budget_s']:g} s" if "seconds" in part else "")
        rows.append([f"part `{name}`", "", text + (f": {part['reason']}" if "reason" in part else "")])
    return rows


def write_outputs(out: Path, report: dict) -> None:
    """``gpu_check.json`` and ``gpu_check.md``: the machine, then one table (bench's rows and the check's)."""
    m = report["machine"]
    table = format_table(report, table_rows(report))
    size = f"{m['parameters_m']:.1f}M parameters, vocabulary {m['vocabulary']}, " if m["parameters_m"] else ""
    text = (f"GPU check on {m['device']} ({m['dtype']}, torch {m['torch']}, CUDA {m['cuda']}, transformers "
            f"{m['packages']['transformers']}, trl {m['packages']['trl']}, peft {m['packages']['peft']}, "
            f"datasets {m['packages']['datasets']}), {m['date']}{', smoke sizes' if m['smoke'] else ''}; "
            f"model {m['model']} ({size}random weights), objective values constant.\n\n{table}\n")
    write_json(out / "gpu_check.json", report)
    atomic_write_text(out / "gpu_check.md", text)


def main(argv=None) -> None:
    """Run every part within its budget, writing the outputs after each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cuda | cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny model and repetitions: the CPU run of the check")
    parser.add_argument("--tokenizer", default=str(ROOT / ".gpu-wheels" / "tokenizer"),
                        help="a tokenizer folder with a chat template (`make gpu-wheels` saves SmolLM2's there)")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help=f"override a part's budget; parts: {', '.join(BUDGETS)}")
    parser.add_argument("--only", default=",".join(BUDGETS),
                        help="the parts to run, a comma list (the model part always runs: the others need its "
                             "tokenizer); default: all")
    parser.add_argument("--total", type=float, default=None,
                        help=f"seconds for all parts together (default 450, with --smoke {SMOKE_TOTAL:.0f})")
    args = parser.parse_args(argv)
    budgets = {name: min(s, SMOKE_BUDGET) if args.smoke else s for name, s in BUDGETS.items()}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in BUDGETS or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(BUDGETS)}")
        budgets[name] = float(seconds)
    only = {"model", *args.only.split(",")}
    if only - set(BUDGETS):
        parser.error(f"--only: unknown part(s) {sorted(only - set(BUDGETS))}; expected some of {', '.join(BUDGETS)}")
    total = args.total or (SMOKE_TOTAL if args.smoke else 450.0)
    deadline = time.monotonic() + total
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.tokenizer) / "tokenizer_config.json").is_file():
        raise SystemExit(f"gpu_check: no tokenizer in {args.tokenizer}: run `make gpu-wheels` (it saves SmolLM2's "
                         "there) or pass --tokenizer a folder with a tokenizer and chat template")

    # ------------------------------------------------------------------ the machine and the sizes
    shape = SMOKE_SHAPE if args.smoke else SMOLLM2_360M
    reps, n_speed, speed_tokens = (1, 2, 32) if args.smoke else (3, 4, 64)
    steps, batch = (3, 2) if args.smoke else (4, 8)
    prompts = load_prompts(PromptsConfig(path=str(ROOT / "data" / "prompts" / "default.jsonl"), split="eval"))
    model_res = {"model": "random-tiny" if args.smoke else "random-360m", "prompts": n_speed, "K": 4, "B": 16,
                 "new_tokens": speed_tokens}
    report = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cuda": torch.version.cuda, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "dtype": "bf16" if device.type == "cuda" else "fp32", "smoke": args.smoke, "model": model_res["model"],
            "vocabulary": None, "parameters_m": None,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **provenance(vars(args) | {"budgets": budgets, "total": total}),
            "packages": package_versions(MACHINE_PACKAGES),
        },
        "parts": {}, "solver": None, "models": [model_res], "overhead": None, "syncs": {}, "training": {},
    }
    print(f"gpu_check: {report['machine']['device']}, torch {torch.__version__}, transformers "
          f"{report['machine']['packages']['transformers']}, trl {report['machine']['packages']['trl']}; "
          f"total budget {total:.0f} s", flush=True)
    ctx: dict = {}

    def engine(fn):
        """A part that needs the model: skipped when the model part did not finish."""
        def part():
            if "model" not in ctx:
                raise Skip("no model: the model part did not finish")
            fn(ctx["model"], ctx["tok"])
        return part

    def build_model():
        tok = load_tokenizer(args.tokenizer)
        if args.smoke:  # the same tokenizer retrained to a small vocabulary: sampling over 49k tokens is the CPU's cost
            tok = prepare_tokenizer(tok.train_new_from_iterator([p.messages[-1]["content"] for p in prompts],
                                                                vocab_size=SMOKE_VOCABULARY))
        ctx["tok"] = tok
        ctx["model"] = random_llama(ctx["tok"], shape, str(device))
        report["machine"].update(vocabulary=len(tok),
                                 parameters_m=sum(p.numel() for p in ctx["model"].parameters()) / 1e6)

    def overhead(model, tok):
        report["overhead"] = bench_overhead(prompts, model, tok, constant_values(4))

    def solver():
        report["solver"] = bench_solver(3 if args.smoke else 31)

    def training(kind):
        def part():
            ctx.pop("model", None)  # the engine's parts are done: each training part builds its own model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if "tok" not in ctx:
                raise Skip("no tokenizer: the model part did not finish")
            report["training"][kind] = {}
            train_steps(kind, report["training"][kind], ctx["tok"], shape, str(device),
                        training_rows(prompts, 2 * steps * batch, 120), steps, batch)
        return part

    # ------------------------------------------------------------------ the parts, the engine's first
    speed_cfg = DecodingConfig(num_candidates=4, block_size=16, max_new_tokens=speed_tokens, temperature=0.7,
                               top_p=0.9)
    speed_convs = [p.messages for p in prompts[:n_speed]]
    plan = [
        ("model", build_model),
        ("solver", solver),
        ("speed", engine(lambda m, t: speed_rows(model_res, m, t, speed_convs, speed_cfg, constant_values(4), reps))),
        ("blocks", engine(lambda m, t: block_rows(model_res, m, t, speed_convs[:1], constant_values(4)))),
        ("scaling", engine(lambda m, t: scaling_rows(model_res, m, t, prompts, speed_convs))),
        ("overhead", engine(overhead)),
        ("syncs", engine(lambda m, t: host_syncs(report["syncs"], m, t, prompts))),
        ("cache", engine(lambda m, t: cache_rows(model_res, m, t, speed_convs[:1], constant_values(4)))),
        ("sft", training("sft")),
        ("dpo", training("dpo")),
    ]
    write_outputs(out, report)
    for name, fn in plan:
        if name in only:
            run_part(name, fn, budgets[name], deadline, report["parts"])
        else:
            report["parts"][name] = {"status": "skipped", "reason": "not asked for (--only)"}
        write_outputs(out, report)
    print()
    print((out / "gpu_check.md").read_text())
    print(f"gpu_check -> {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
