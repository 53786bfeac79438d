"""Stage 1, generate: RMOD (and baseline) decoding over a prompt set into a dataset.

    rmod-distill generate --config recipes/default/generate.yaml [--key value ...]
    make generate RECIPE=default
    accelerate launch -m rmod_distill.generate --config recipes/default/generate.yaml

Writes to ``output_dir``: ``samples.jsonl`` (one row per prompt and method),
``dataset/`` (the same rows in TRL's prompt/completion format, ``save_to_disk``),
``normalization.json`` (per-objective mean/std measured on reference samples, reused by
later stages), ``calibration.jsonl`` (those reference samples) and ``run.json`` (recipe,
git revision, package versions, normalisation, objective correlations, timings).
Killed at any point, the same command finishes only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rmod_distill.artifacts import ShardWriter, provenance, read_jsonl, write_json
from rmod_distill.config import parse_config, to_dict
from rmod_distill.decoding import BlockwiseDecoder, DecodingConfig, parse_method, prompt_seed
from rmod_distill.metrics import method_metrics
from rmod_distill.objectives import Normalizer, ObjectiveSet, ObjectiveSpec
from rmod_distill.policy import PolicyConfig, policy_fingerprint
from rmod_distill.prompts import Prompt, PromptsConfig, base_prompt_id, load_prompts
from rmod_distill.tracking import Tracker, WandbConfig


def default_objectives() -> list[ObjectiveSpec]:
    """The embedded objectives of the default recipe."""
    return [ObjectiveSpec(name) for name in ("harmlessness", "warmth", "relevance", "concision")]


@dataclass
class GenerateConfig:
    """Recipe of the generate stage."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    objectives: list[ObjectiveSpec] = field(default_factory=default_objectives)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    methods: list[str] = field(
        default_factory=lambda: ["rmod"],
        metadata={"help": "Methods to run: reference, cd, cd-<objective>, best-of-n, best-of-n-maxmin, rmod."},
    )
    samples_per_prompt: int = field(
        default=1,
        metadata={"help": "Responses per prompt and method (more distillation data); sample j > 0 is stored "
                          "under prompt id '<id>#s<j>' with its own seed."},
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts decoded together (each expands into K rows)."})
    seed: int = field(default=0, metadata={"help": "Run seed; each prompt's seed derives from it and the prompt id."})
    normalization: str | None = field(
        default=None, metadata={"help": "Reuse this normalization.json instead of measuring it."}
    )
    normalization_prompts: int = field(
        default=48, metadata={"help": "Prompts whose reference samples measure the normalisation."}
    )
    normalization_samples: int = field(default=2, metadata={"help": "Reference samples per normalisation prompt."})
    output_dir: str = field(default="runs/default/generate", metadata={"help": "Where the run is written."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a complete run in output_dir."})
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        if not self.methods:
            raise ValueError("methods: at least one method is needed")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: duplicates in {self.methods}")
        names = [o.name for o in self.objectives]
        for method in self.methods:
            parse_method(method, names, self.decoding)
        if "distilled" in self.methods and not self.policy.adapter:
            raise ValueError("method 'distilled' needs policy.adapter (the distilled LoRA adapter)")
        if min(self.batch_size, self.samples_per_prompt, self.normalization_prompts, self.normalization_samples) < 1:
            raise ValueError(
                "batch_size, samples_per_prompt, normalization_prompts and normalization_samples must be >= 1")
        if self.normalization_prompts * self.normalization_samples < 2:
            raise ValueError("normalisation needs at least 2 reference samples")


def _state():
    """accelerate's process state (one process when not launched through accelerate).

    Without CUDA, processes started by ``accelerate launch --multi_gpu`` (torchrun) join
    one gloo group on the CPU; accelerate only does that when asked for ``cpu=True``.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


@contextlib.contextmanager
def adapter_enabled(model, enabled: bool):
    """Run the base policy with its LoRA adapter switched off unless ``enabled``.

    Only ``distilled`` samples with the adapter; every other method decodes with the
    frozen reference policy, so one loaded model serves all of them.
    """
    if enabled or not hasattr(model, "disable_adapter"):
        yield
        return
    with model.disable_adapter():
        yield


def _conversation_rows(prompts: list[Prompt], results, objectives: ObjectiveSet, method: str, seeds, seconds) -> list[dict]:
    raw, norm = objectives.score([p.messages for p in prompts], [r.text for r in results])
    rows = []
    for p, r, raw_row, norm_row, seed in zip(prompts, results, raw, norm, seeds):
        rows.append({
            "prompt_id": p.id,
            "prompt": p.text,
            "messages": p.messages,
            "category": p.category,
            "split": p.split,
            "method": method,
            "completion": r.text,
            "rewards": dict(zip(objectives.names, map(float, raw_row))),
            "normalized": dict(zip(objectives.names, map(float, norm_row))),
            "worst_case": float(norm_row.min()),
            "block_weights": r.block_weights,
            "tokens_sampled": r.tokens_sampled,
            "forward_tokens": r.forward_tokens,
            "finished": r.finished,
            "seconds": seconds / len(prompts),
            "seed": seed,
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
    method = parse_method(method_name, objectives.names, decoder.cfg)
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        seeds = [prompt_seed(run_seed, p.id, method_name) for p in batch]
        t0 = time.perf_counter()
        results = decoder.decode([p.messages for p in batch], seeds, method)
        rows = _conversation_rows(batch, results, objectives, method_name, seeds, time.perf_counter() - t0)
        if on_batch is not None:
            on_batch(rows)
        out.extend(rows)
    return out


def correlations(names: list[str], raw: np.ndarray, groups: list[str]) -> dict:
    """Pearson correlations between objectives: pooled, and within prompt (rewards minus prompt means)."""
    within = raw.copy()
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        within[idx] -= raw[idx].mean(0)
    out = {}
    for label, data in (("pooled", raw), ("within_prompt", within)):
        std = data.std(0)
        c = np.corrcoef(data.T) if (std > 0).all() else np.full((len(names),) * 2, np.nan)
        out[label] = {a: {b: round(float(c[i, j]), 3) for j, b in enumerate(names)} for i, a in enumerate(names)}
    return out


def measure_normalization(cfg: GenerateConfig, decoder, objectives: ObjectiveSet, prompts: list[Prompt], out: Path):
    """Sample reference responses, fit per-objective mean/std, save both; returns the normaliser."""
    # Evenly spaced over the prompt set, so every category is represented.
    step = max(1, len(prompts) // cfg.normalization_prompts)
    calib_prompts = prompts[::step][: cfg.normalization_prompts]
    expanded = [
        Prompt(f"{p.id}#calibration-{j}", p.messages, p.category, p.split)
        for j in range(cfg.normalization_samples)
        for p in calib_prompts
    ]
    objectives.normalizer = Normalizer(objectives.names, [0.0] * len(objectives.names), [1.0] * len(objectives.names))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(expanded), desc="normalisation (reference samples)", unit="resp")
    rows = decode_rows(decoder, objectives, expanded, "reference", cfg.seed, cfg.batch_size, lambda r: bar.update(len(r)))
    bar.close()
    raw = np.array([[r["rewards"][n] for n in objectives.names] for r in rows])
    normalizer = Normalizer.fit(objectives.names, raw)
    normalizer.save(out / "normalization.json")
    for r in rows:
        r.pop("normalized"), r.pop("worst_case")
    (out / "calibration.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return normalizer


def _check_output_dir(cfg: GenerateConfig, out: Path, resolved: dict, is_main: bool) -> None:
    run_json = out / "run.json"
    if not run_json.exists():
        return
    previous = json.loads(run_json.read_text())
    if cfg.overwrite:
        if is_main:
            for name in ("shards", "dataset", "samples.jsonl", "run.json", "calibration.jsonl", "normalization.json"):
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        return
    if previous.get("complete"):
        raise FileExistsError(
            f"{out} already holds a complete generate run; pass --overwrite to replace it or set output_dir"
        )
    old = dict(previous.get("config", {}), overwrite=None)
    if old != dict(resolved, overwrite=None):
        changed = sorted(k for k in set(old) | set(resolved) if old.get(k) != resolved.get(k) and k != "overwrite")
        raise ValueError(
            f"{out} holds an unfinished run made with a different recipe (keys differ: {changed}); rerun with "
            "the same recipe to resume, or pass --overwrite to start again"
        )


def run(cfg: GenerateConfig) -> Path:
    """Run the generate stage; returns the output folder."""
    state = _state()
    out = Path(cfg.output_dir)
    resolved = to_dict(cfg)
    # ------------------------------------------------------------------ output folder
    _check_output_dir(cfg, out, resolved, state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "run.json").exists():
            write_json(out / "run.json", dict(provenance(resolved), complete=False))

    # ------------------------------------------------------------------ data, objectives, policy
    prompts = load_prompts(cfg.prompts)
    calibration_prompts = prompts
    if cfg.samples_per_prompt > 1:
        prompts = [Prompt(p.id if j == 0 else f"{p.id}#s{j}", p.messages, p.category, p.split)
                   for p in prompts for j in range(cfg.samples_per_prompt)]
    objectives = ObjectiveSet.from_specs(cfg.objectives)
    torch.manual_seed(cfg.seed)
    device = str(state.device) if state.num_processes > 1 else None
    model, tokenizer = cfg.policy.load(device)
    fingerprint = policy_fingerprint(cfg.policy.model, tokenizer)
    rewards = lambda p, r: objectives.score(p, r)[1]  # noqa: E731
    value_fn = rewards
    if cfg.decoding.values == "learned":
        from rmod_distill.values import LearnedValues

        value_fn = LearnedValues.load(cfg.decoding.value_model, objectives.names, device=device or cfg.policy.device)
    decoder = BlockwiseDecoder(model, tokenizer, cfg.decoding, value_fn, objectives.names, reward_fn=rewards)

    # ------------------------------------------------------------------ normalisation
    norm_path = Path(cfg.normalization) if cfg.normalization else out / "normalization.json"
    if state.is_main_process and not norm_path.exists():
        if cfg.normalization:
            raise FileNotFoundError(f"normalization: {norm_path} does not exist")
        with adapter_enabled(model, False):
            measure_normalization(cfg, decoder, objectives, calibration_prompts, out)
    state.wait_for_everyone()
    objectives.set_normalizer(Normalizer.load(norm_path), str(norm_path))
    learned_norm = getattr(value_fn, "normalization", None)
    if learned_norm is not None and not (np.allclose(learned_norm["mean"], objectives.normalizer.mean)
                                         and np.allclose(learned_norm["std"], objectives.normalizer.std)):
        raise ValueError(
            f"value model {cfg.decoding.value_model} was trained on rewards normalised differently from {norm_path}; "
            "train it with this run's normalisation (values.generate_dir)"
        )

    # ------------------------------------------------------------------ decode what is missing
    done = {(r["method"], r["prompt_id"]) for shard in sorted((out / "shards").glob("*.jsonl")) for r in read_jsonl(shard)}
    todo = {m: [p for p in prompts if (m, p.id) not in done] for m in cfg.methods}
    state.wait_for_everyone()  # every process has read the shards before any writes to them
    writer = ShardWriter(out / "shards" / f"rank-{state.process_index:05d}.jsonl")
    from tqdm.auto import tqdm

    timings = {}
    try:
        for method in cfg.methods:
            mine = todo[method][state.process_index :: state.num_processes]
            bar = tqdm(total=len(mine), desc=method, unit="prompt", disable=not state.is_main_process)
            stats = {"tokens": 0, "seconds": 0.0}

            def on_batch(rows, bar=bar, stats=stats):
                writer.append(rows)
                stats["tokens"] += sum(r["tokens_sampled"] for r in rows)
                stats["seconds"] += sum(r["seconds"] for r in rows)
                bar.update(len(rows))
                bar.set_postfix(tok_s=f"{stats['tokens'] / max(stats['seconds'], 1e-9):.0f}")

            with adapter_enabled(model, method == "distilled"):
                decode_rows(decoder, objectives, mine, method, cfg.seed, cfg.batch_size, on_batch)
            bar.close()
            timings[method] = stats
    finally:
        writer.close()
    state.wait_for_everyone()
    if state.is_main_process:
        finalize(cfg, out, prompts, objectives, resolved, fingerprint)
    state.wait_for_everyone()
    return out


def finalize(
    cfg: GenerateConfig, out: Path, prompts: list[Prompt], objectives: ObjectiveSet, resolved: dict, fingerprint: dict
) -> None:
    """Merge the shards into samples.jsonl, the dataset and a complete run.json."""
    import datasets

    rows = {}
    for shard in sorted((out / "shards").glob("*.jsonl")):
        for r in read_jsonl(shard):
            rows.setdefault((r["method"], r["prompt_id"]), r)
    ordered = []
    for method in cfg.methods:
        missing = [p.id for p in prompts if (method, p.id) not in rows]
        if missing:
            raise RuntimeError(f"{out}: method {method} is missing {len(missing)} prompts (first: {missing[0]})")
        ordered.extend(rows[(method, p.id)] for p in prompts)
    from rmod_distill.artifacts import atomic_write_text

    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    records = [
        {
            "prompt": r["messages"],
            "completion": [{"role": "assistant", "content": r["completion"]}],
            "prompt_id": r["prompt_id"],
            "method": r["method"],
            "category": r["category"],
            "worst_case": r["worst_case"],
        }
        for r in ordered
    ]
    tmp = out / ".dataset.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp))
    if (out / "dataset").exists():
        shutil.rmtree(out / "dataset")
    tmp.rename(out / "dataset")

    calib = read_jsonl(out / "calibration.jsonl")
    z = {m: np.array([[r["normalized"][n] for n in objectives.names] for r in ordered if r["method"] == m])
         for m in cfg.methods}
    summary = {}
    for method in cfg.methods:
        mrows = [r for r in ordered if r["method"] == method]
        summary[method] = dict(
            method_metrics(z[method], objectives.names, z.get("reference"), seed=cfg.seed),
            tokens_sampled_per_response=float(np.mean([r["tokens_sampled"] for r in mrows])),
            seconds_per_response=float(np.mean([r["seconds"] for r in mrows])),
        )
    run_info = dict(
        provenance(resolved),
        complete=True,
        objectives=objectives.names,
        policy_fingerprint=fingerprint,
        normalization=json.loads((Path(cfg.normalization) if cfg.normalization else out / "normalization.json").read_text()),
        methods=summary,
    )
    if calib:
        raw = np.array([[r["rewards"][n] for n in objectives.names] for r in calib])
        run_info["objective_correlations"] = correlations(
            objectives.names, raw, [base_prompt_id(r["prompt_id"]) for r in calib]
        )
    write_json(out / "run.json", run_info)
    tracker = Tracker(cfg.wandb, f"generate-{out.parent.name}", resolved, out, "generate")
    tracker.summary({f"{m}/{k}": v for m, s in summary.items() for k, v in s.items() if isinstance(v, (int, float))})
    tracker.table(
        "samples", ["prompt_id", "method", "prompt", "completion", "worst_case"],
        [[r["prompt_id"], r["method"], r["prompt"], r["completion"], r["worst_case"]] for r in ordered[:200]],
    )
    tracker.finish()
    print(f"generate: {len(ordered)} rows -> {out / 'samples.jsonl'}")
    for method, s in sorted(summary.items(), key=lambda kv: -kv[1]["worst_case_reward"]):
        lo, hi = s["worst_case_reward_ci"]
        print(
            f"  {method:<18} worst-case {s['worst_case_reward']:+.3f} [{lo:+.3f}, {hi:+.3f}]  "
            f"{s['tokens_sampled_per_response']:.0f} tokens/response  {s['seconds_per_response']:.2f} s/response"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse the recipe and run the stage."""
    run(parse_config(GenerateConfig, argv))


if __name__ == "__main__":
    main(sys.argv[1:])
