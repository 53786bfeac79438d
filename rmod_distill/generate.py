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

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rmod_distill.artifacts import RunFolder, read_json, read_jsonl, write_jsonl
from rmod_distill.config import stage_main, to_dict
from rmod_distill.engine.decoding import DecodingConfig, adapter_enabled
from rmod_distill.engine.runs import decode_methods, decode_rows, merged_rows, process_state
from rmod_distill.engine.setup import BackendConfig, build_decoder, check_decoding_inputs, serve_policy
from rmod_distill.metrics import method_metrics, prompt_groups
from rmod_distill.objectives import Normalizer, check_scale, ObjectiveSet, ObjectiveSpec, default_objectives
from rmod_distill.policy import PolicyConfig, policy_fingerprint
from rmod_distill.prompts import Prompt, PromptsConfig, base_prompt_id, load_prompts, with_samples
from rmod_distill.tracking import Tracker, WandbConfig, dataset_files, dataset_name


@dataclass
class GenerateConfig:
    """Recipe of the generate stage."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    objectives: list[ObjectiveSpec] = field(default_factory=default_objectives)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
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
    scale: str = field(
        default="zscore",
        metadata={"help": "How rewards of different objectives are put on one scale for decoding and metrics: zscore "
                          "(mean/std of reference samples) | quantile (the reference samples' CDF mapped to normal "
                          "quantiles: bounded, so an outlier cannot own the mean)."},
    )
    normalization_prompts: int = field(
        default=48, metadata={"help": "Prompts whose reference samples measure the normalisation."}
    )
    normalization_samples: int = field(default=2, metadata={"help": "Reference samples per normalisation prompt."})
    keep_candidates: bool = field(
        default=False,
        metadata={"help": "Store every block's K candidates (token ids), their values and scores and the one kept "
                          "in each scored row of samples.jsonl (`candidates`): what distill's pairs: blocks learns "
                          "from. About K x max_new_tokens token ids a row."},
    )
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
            self.decoding.method(method, names)
        if "distilled" in self.methods and not self.policy.adapter:
            raise ValueError("method 'distilled' needs policy.adapter (the distilled LoRA adapter)")
        if "distilled" in self.methods and self.policy.merge_adapter:
            raise ValueError("method 'distilled' needs an adapter to switch on; with policy.merge_adapter every "
                             "method already decodes with it (drop 'distilled' or merge_adapter)")
        if self.policy.merge_adapter and self.backend.kind == "vllm":
            raise ValueError("policy.merge_adapter works on the transformers backend; for vLLM save the merged "
                             "model to a folder and serve that as policy.model")
        for key in ("batch_size", "samples_per_prompt", "normalization_prompts", "normalization_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        check_scale(self.scale, self.decoding.values)
        if self.normalization_prompts * self.normalization_samples < 2:
            raise ValueError("normalisation needs at least 2 reference samples")


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


def _matrix(rows: list[dict], key: str, names: list[str]) -> np.ndarray:
    """``[n, G]`` scores of the rows under ``key``; a missing one (a judge's, null in the row) is NaN."""
    return np.array([[np.nan if r[key][g] is None else r[key][g] for g in names] for r in rows],
                    dtype=np.float64).reshape(-1, len(names))


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
    raw = _matrix(rows, "rewards", objectives.names)
    normalizer = Normalizer.fit(objectives.names, raw, objectives.scorers)
    normalizer.warn_degenerate("generate")
    normalizer.save(out / "normalization.json")
    for r in rows:
        r.pop("normalized"), r.pop("worst_case")
    write_jsonl(out / "calibration.jsonl", rows)
    return normalizer


@dataclass
class Checked:
    """What :func:`check` read and built, handed to :func:`run`."""

    folder: RunFolder
    prompts: list[Prompt]
    calibration_prompts: list[Prompt]
    objectives: ObjectiveSet
    normalizer: Normalizer | None


def check(cfg: GenerateConfig, dry_run: bool = False) -> Checked:
    """Every check before the policy loads or output_dir is touched (``--dry-run`` runs the same,
    without building the objectives' models)."""
    folder = RunFolder(cfg.output_dir, "generate", to_dict(cfg), cfg.overwrite)
    folder.check()
    calibration_prompts = load_prompts(cfg.prompts)
    prompts = with_samples(calibration_prompts, cfg.samples_per_prompt)
    objectives = ObjectiveSet.from_specs(cfg.objectives, load=not dry_run)
    if not dry_run:
        objectives.probe(prompts[0].messages)
    normalizer = None
    if cfg.normalization:
        normalizer = Normalizer.load(cfg.normalization).with_scale(cfg.scale, cfg.normalization)
        objectives.set_normalizer(normalizer, cfg.normalization)
    elif not cfg.overwrite and (folder.path / "normalization.json").is_file():
        # A resumed run keeps its own statistics: refuse stale ones now, not once the policy has loaded.
        resumed = folder.path / "normalization.json"
        Normalizer.load(resumed).check_names(objectives.names, str(resumed), objectives.scorers)
    check_decoding_inputs(cfg.decoding, objectives)
    cfg.policy.check()
    cfg.policy.check_prompt_lengths(calibration_prompts, cfg.decoding.max_new_tokens, cfg.prompts.path)
    cfg.backend.check()
    cfg.wandb.check()
    return Checked(folder, prompts, calibration_prompts, objectives, normalizer)


def run(cfg: GenerateConfig, checked: Checked | None = None) -> Path:
    """Run the generate stage (after :func:`check`, unless ``checked`` is its result); returns the output folder."""
    state = process_state()
    checked = checked or check(cfg)
    folder, prompts, objectives, normalizer = checked.folder, checked.prompts, checked.objectives, checked.normalizer
    calibration_prompts = checked.calibration_prompts

    # ------------------------------------------------------------------ output folder, policy
    state.wait_for_everyone()
    out = folder.begin(state.is_main_process)
    state.wait_for_everyone()
    torch.manual_seed(cfg.seed)
    device = str(state.device) if state.num_processes > 1 else None
    with serve_policy(cfg.policy, cfg.backend, out, device, state.num_processes) as served:
        tokenizer = served.tokenizer
        fingerprint = policy_fingerprint(cfg.policy.model, tokenizer)
        decoder = build_decoder(served.model, tokenizer, cfg.decoding, objectives, device or cfg.policy.device,
                                served.sampler(cfg.decoding.sampling))
        decoder.record_candidates = cfg.keep_candidates
        policy = served.adapter_switch(decoder)

        # -------------------------------------------------------------- normalisation
        norm_path = Path(cfg.normalization) if cfg.normalization else out / "normalization.json"
        if normalizer is None:
            if state.is_main_process and not norm_path.exists():
                with adapter_enabled(policy, False):
                    measure_normalization(cfg, decoder, objectives, calibration_prompts, out)
            state.wait_for_everyone()
            objectives.set_normalizer(Normalizer.load(norm_path).with_scale(cfg.scale, str(norm_path)), str(norm_path))
        check_decoding_inputs(cfg.decoding, objectives)

        # -------------------------------------------------------------- decode what is missing
        timings = decode_methods(decoder, policy, objectives, prompts, cfg.methods, cfg.seed, cfg.batch_size,
                                 out / "shards", state)
    if state.is_main_process:
        judge_usage = {m: t["judge"] for m, t in timings.items() if "judge" in t}
        finalize(cfg, folder, out, prompts, objectives, fingerprint, norm_path, judge_usage)
    state.wait_for_everyone()
    return folder.path


def finalize(cfg: GenerateConfig, folder: RunFolder, out: Path, prompts: list[Prompt], objectives: ObjectiveSet,
             fingerprint: dict, norm_path: Path, judge_usage: dict | None = None) -> None:
    """Merge the shards into samples.jsonl and the dataset, then mark the run complete.

    ``judge_usage``: what judge objectives cost while each method decoded (this process, this session).
    """
    import datasets

    ordered = merged_rows(out / "shards", cfg.methods, prompts)
    write_jsonl(out / "samples.jsonl", ordered)
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

    z = {m: _matrix([r for r in ordered if r["method"] == m], "normalized", objectives.names) for m in cfg.methods}
    summary = {}
    for method in cfg.methods:
        mrows = [r for r in ordered if r["method"] == method]
        summary[method] = dict(
            method_metrics(z[method], objectives.names, z.get("reference"), seed=cfg.seed,
                           groups=prompt_groups([r["prompt_id"] for r in mrows])),
            tokens_sampled_per_response=float(np.mean([r["tokens_sampled"] for r in mrows])),
            seconds_per_response=float(np.mean([r["seconds"] for r in mrows])),
        )
    info = dict(
        objectives=objectives.names,
        objective_specs=to_dict(cfg.objectives),
        policy_fingerprint=fingerprint,
        normalization=read_json(norm_path, "normalisation file"),
        degenerate_objectives=Normalizer.load(norm_path).degenerate(),
        methods=summary,
    )
    if judge_usage:
        info["judge_usage"] = judge_usage
    if (out / "calibration.jsonl").exists():
        calib = read_jsonl(out / "calibration.jsonl")
        raw = _matrix(calib, "rewards", objectives.names)
        raw = raw[~np.isnan(raw).any(1)]  # correlations over the samples with every score
        calib = [r for r in calib if None not in r["rewards"].values()]
        info["objective_correlations"] = correlations(
            objectives.names, raw, [base_prompt_id(r["prompt_id"]) for r in calib]
        )
    path = folder.finish(info)
    tracker = Tracker(cfg.wandb, f"generate-{path.parent.name}", to_dict(cfg), path, "generate", cfg.output_dir)
    # The dataset as a W&B artifact (distill and eval name it as their upstream: rmod_distill/tracking.py)
    files = dataset_files(path)
    tracker.files_artifact(dict(files, **{"normalization.json": norm_path}), dataset_name(path), "dataset",
                           {"rows": len(ordered), "methods": cfg.methods, "objectives": objectives.names,
                            "sha256_of": "samples.jsonl, normalization.json (in the run folder), dataset/"},
                           digest_of=files)
    tracker.summary({f"{m}/{k}": v for m, s in summary.items() for k, v in s.items() if isinstance(v, (int, float))})
    tracker.table(
        "samples", ["prompt_id", "method", "prompt", "completion", "worst_case"],
        [[r["prompt_id"], r["method"], r["prompt"], r["completion"], r["worst_case"]] for r in ordered[:200]],
    )
    tracker.finish()
    print(f"generate: {len(ordered)} rows -> {path / 'samples.jsonl'}")
    for method, s in sorted(summary.items(), key=lambda kv: -np.nan_to_num(kv[1]["worst_case_reward"], nan=-np.inf)):
        lo, hi = s["worst_case_reward_ci"]
        print(
            f"  {method:<18} worst-case {s['worst_case_reward']:+.3f} [{lo:+.3f}, {hi:+.3f}]  "
            f"{s['tokens_sampled_per_response']:.0f} tokens/response  {s['seconds_per_response']:.2f} s/response"
        )


def main(argv: list[str] | None = None) -> None:
    """Parse the recipe, check it, and run the stage (``--dry-run``: check only)."""
    stage_main(GenerateConfig, argv, check, run)


if __name__ == "__main__":
    main(sys.argv[1:])
