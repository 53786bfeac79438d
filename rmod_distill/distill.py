"""Stage 2, distill: fine-tune a LoRA adapter on RMOD's outputs with TRL's SFTTrainer.

    rmod-distill distill --config recipes/default/distill.yaml [--key value ...]
    make distill RECIPE=default [ACCELERATE_CONFIG=recipes/accelerate_configs/zero2.yaml]

Reads the generate stage's ``dataset/`` (prompt/completion pairs), keeps the rows of the
chosen methods (default ``rmod``), holds out a slice of prompts for eval loss, and trains
on completion tokens only with the policy's chat template. Writes to ``output_dir``:
the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``), the tokenizer
and chat template, a model card (``README.md``), ``run.json`` (the resolved recipe,
provenance, train and held-out prompt ids), ``samples.jsonl`` (completions on held-out prompts) and
``checkpoint-*`` folders; a killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, SFTConfig, get_peft_config

from rmod_distill.adapters import (MANIFEST, PORTABLE_FILES, check_adapter_folder, hub_push_problem, hub_repo_id,
                                   publish_adapter)
from rmod_distill.artifacts import (BLOCK_PAIRINGS, RunFolder, atomic_write_text, dpo_pairs_problem, provenance,
                                    read_json, read_jsonl, read_run, write_json, write_jsonl)
from rmod_distill.cards import adapter_card
from rmod_distill.config import hide_secrets, stage_main, to_dict
from rmod_distill.engine.decoding import BlockwiseDecoder, DecodingConfig, prompt_seed
from rmod_distill.engine.runs import process_state
from rmod_distill.errors import UserError
from rmod_distill.policy import PolicyConfig, load_tokenizer, policy_fingerprint, same_policy
from rmod_distill.prompts import PromptsConfig, base_prompt_id, held_out, load_prompts
from rmod_distill.tracking import WandbConfig


OBJECTIVES = ("sft", "dpo", "sft+dpo", "grpo", "sft+grpo", "dpo+grpo", "sft+dpo+grpo")
PAIRINGS = ("reference", "reference-all", "samples", "both", *BLOCK_PAIRINGS)
# TRL 1.16 DPOConfig.loss_type's values (checked here, before a model loads); not exo_pair, which needs a
# label_smoothing that distill does not pass
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
STUDENT = "student"  # the method name of rejected_dir's rows inside distill
# TRL 1.16 GRPOConfig.loss_type's values
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "luspo", "sapo", "vespo")


@dataclass
class DistillModelConfig(ModelConfig):
    """TRL's ``ModelConfig`` (the recipe's ``model:`` section) with this project's defaults:
    the embedded policy, dtype by device, and a LoRA adapter on the attention projections."""

    model_name_or_path: str = field(
        default="embedded",
        metadata={"help": "Base policy, a hub id, a folder or `embedded` (must be the one that generated the data)."},
    )
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16"})
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the only kind distill makes)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Modules given adapters (module names, or [all-linear])."},
    )

    def __post_init__(self):
        if not self.use_peft:
            raise ValueError("model.use_peft: distill trains a LoRA adapter; set use_peft: true")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        unsupported = {"model_revision": self.model_revision != "main", "attn_implementation": self.attn_implementation,
                       "load_in_8bit": self.load_in_8bit, "load_in_4bit": self.load_in_4bit,
                       "lora_task_type": self.lora_task_type != "CAUSAL_LM"}
        for key, given in unsupported.items():
            if given:
                raise ValueError(f"model.{key}: not supported by distill (the policy is loaded by rmod-distill's "
                                 f"own loader, unquantised, as a causal LM); leave it at its default")
        for key, ok, expected in (("lora_r", self.lora_r >= 1, ">= 1"), ("lora_alpha", self.lora_alpha > 0, "> 0"),
                                  ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)")):
            if not ok:
                raise ValueError(f"model.{key} must be {expected}, got {getattr(self, key)}")
        modules = self.lora_target_modules
        super().__post_init__()
        # TRL turns a one-item list into a string, which PEFT reads as a regex over full module
        # paths: [q_proj] would then match nothing. Only all-linear must stay a bare string.
        if isinstance(modules, list) and modules != ["all-linear"]:
            self.lora_target_modules = modules


@dataclass
class DistillConfig(SFTConfig):
    """TRL's ``SFTConfig`` plus what distillation adds: the model section (TRL's ``ModelConfig``),
    the data source, filtering and W&B."""

    model: DistillModelConfig = field(
        default_factory=DistillModelConfig,
        metadata={"help": "Base policy and LoRA: TRL's ModelConfig keys (model_name_or_path, dtype, lora_r, ...)."},
    )
    generate_dir: str = field(
        default="runs/default/generate", metadata={"help": "Output folder of the generate stage to learn from."}
    )
    methods: list[str] = field(default_factory=lambda: ["rmod"], metadata={"help": "Methods whose rows are trained on."})
    min_worst_case: float | None = field(
        default=None, metadata={"help": "Keep only rows whose normalised worst-case reward is at least this."}
    )
    samples_per_prompt: int | None = field(
        default=None,
        metadata={"help": "Use at most this many of each prompt's samples (generate's '<id>#s<j>' rows, j < N; "
                          "null: all): less data from the same run, without generating again."},
    )
    keep_best: int | None = field(
        default=None,
        metadata={"help": "Of each prompt's samples (per method), SFT on the k with the highest worst case only, and "
                          "DPO's pairs reference / reference-all / both take their chosen side from those k RMOD "
                          "answers (null: all): the teacher's best answers rather than its average one."},
    )
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Share of prompts held out (by a hash of the id): SFT's eval loss, DPO's held-out pairs, and the "
                "prompts dpo_restarts chooses on; no stage trains on them."})
    objective: str = field(
        default="sft",
        metadata={"help": "sft (learn RMOD's answers) | dpo (prefer RMOD's answers, TRL's DPOTrainer; the reference "
                          "model is the adapter's starting point, no second copy) | sft+dpo (SFT, then DPO from it) | "
                          "grpo (TRL's GRPOTrainer on the student's own samples of the train prompts, rewarded by "
                          "RMOD's worst case: the lowest of generate_dir's normalised objectives, scored as its "
                          "answers were; KL to the adapter's starting point) | sft+grpo (SFT, then GRPO from it) | "
                          "dpo+grpo | sft+dpo+grpo (each stage from the one before)."},
    )
    pairs: str = field(
        default="reference",
        metadata={"help": "DPO pairs: reference (a prompt's RMOD answer over its reference answer of the same seed: "
                          "generate needs `reference` in its methods) | reference-all (each RMOD answer of a prompt "
                          "over each of its reference answers: samples_per_prompt n gives up to n*n pairs) | "
                          "samples (a prompt's best sample over its worst, by worst case, for each method of "
                          "`methods`: RMOD's by default; a generate run of the student with methods [reference] "
                          "gives an on-policy round on the student's own samples; samples_per_prompt >= 2) | both | "
                          "blocks (at every block of RMOD's answers, the candidate it kept over the one it scored "
                          "lowest, both after the same prefix: RMOD's own choices; generate with keep_candidates: "
                          "true) | reference-all+blocks (both sets)."},
    )
    rejected_dir: str | None = field(
        default=None,
        metadata={"help": "DPO's rejected side from another generate run: its `reference` rows, made by the student "
                          "being trained (generate --policy.adapter <SFT adapter> --methods [reference] "
                          "--normalization <generate_dir>/normalization.json), so that DPO pushes away from the "
                          "student's own answers; pairs reference / reference-all then match RMOD's answers with "
                          "these (null: generate_dir's own reference rows, the base policy's)."},
    )
    pair_margin: float = field(
        default=0.0,
        metadata={"help": "Keep a pair only if the chosen answer's worst case beats the other's by more (a block "
                          "pair: the kept candidate's score under the block's weights beats the other's by more)."},
    )
    pair_tolerance: float | None = field(
        default=None,
        metadata={"help": "Keep a pair only if the chosen answer is lower than the rejected one on no objective by "
                          "more than this (normalised, as the worst case; null: no such check): pairs that raise the "
                          "worst case without trading another objective away."},
    )
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO's beta (TRL's default): how far from the reference."})
    dpo_loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "TRL DPOConfig's loss_type: sigmoid (DPO), ipo, robust, apo_zero, ... and sft (the NLL of "
                          "the chosen answer, RMOD's: an anchor beside a preference loss, as in [sigmoid, sft])."},
    )
    dpo_loss_weights: list[float] | None = field(
        default=None, metadata={"help": "TRL's loss_weights: one weight per dpo_loss_type entry (null: 1 each)."}
    )
    dpo_learning_rate: float | None = field(default=None, metadata={"help": "DPO's learning rate (null: learning_rate)."})
    dpo_epochs: float | None = field(default=None, metadata={"help": "DPO's epochs (null: num_train_epochs)."})
    dpo_restarts: int = field(default=1, metadata={
        "help": "Train DPO this many times from the same start, with training seeds seed, seed+1, ... (other pair "
                "orders and dropout masks; with data_seed set, the dropout masks only), and keep the run whose plain "
                "samples have the highest mean worst case on the held-out prompts: those that eval_fraction holds "
                "out of generate_dir and of grpo_prompts, which no stage trains on (choose eval_fraction so that "
                "they are not the prompts you report on). DPO's seed moves a student further than any setting "
                "tried (docs/log/2026-12-06.md); each restart costs one DPO run and dpo_select_samples samples of each "
                "held-out prompt."})
    dpo_select_samples: int = field(default=2, metadata={
        "help": "dpo_restarts > 1: plain samples of each held-out prompt that score a restart (the same seeds for "
                "every restart, so they are compared on the same draws)."})
    grpo_beta: float = field(default=0.04, metadata={
        "help": "GRPO's KL coefficient (TRL's beta) to the adapter's starting point: the SFT adapter, init_adapter, or "
                "the base policy; 0 drops the KL term."})
    grpo_num_generations: int = field(default=4, metadata={
        "help": "GRPO's samples a prompt, compared within their group; per_device_train_batch_size x "
                "gradient_accumulation_steps must be a multiple of it."})
    grpo_loss_type: str = field(default="dapo", metadata={"help": "TRL GRPOConfig's loss_type (grpo, dapo, dr_grpo, bnpo, ...)."})
    grpo_learning_rate: float | None = field(default=None, metadata={"help": "GRPO's learning rate (null: learning_rate)."})
    grpo_epochs: float | None = field(default=None, metadata={"help": "GRPO's passes over the train prompts (null: num_train_epochs)."})
    grpo_prompts: str | None = field(default=None, metadata={
        "help": "More prompts for GRPO, which needs no teacher answers: a prompt file (or hub dataset) read with "
                "generate_dir's prompt settings (its split, columns and system prompt), whose prompts GRPO samples "
                "besides generate_dir's train prompts; ids already there and prompts held out by eval_fraction "
                "are left out (null: generate_dir's train prompts only)."})
    init_adapter: str | None = field(
        default=None,
        metadata={"help": "Continue training this LoRA adapter (any `rmod-distill download` source) instead of a "
                          "fresh one from model.lora_*: iterated distillation's 'continue' rounds."},
    )
    sample_prompts: int = field(default=8, metadata={"help": "Held-out prompts sampled after training for the card."})
    wandb: WandbConfig = field(
        default_factory=WandbConfig,
        metadata={"help": "W&B section, as in the other stages; logging goes through the Trainer's integration."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished adapter in output_dir."})

    def __post_init__(self):
        for key in ("samples_per_prompt", "keep_best"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 or null, got {getattr(self, key)}")
        if self.pair_tolerance is not None and not self.pair_tolerance >= 0:
            raise ValueError(f"pair_tolerance must be >= 0 or null, got {self.pair_tolerance}")
        if self.pair_tolerance is not None and "dpo" not in self.objective:
            raise ValueError(f"pair_tolerance filters DPO's pairs; objective {self.objective!r} trains none")
        if self.pairs in BLOCK_PAIRINGS and "dpo" not in self.objective:
            raise ValueError(f"pairs {self.pairs!r} are DPO's; objective {self.objective!r} trains none")
        if self.pairs == "blocks" and (self.keep_best is not None and self.objective == "dpo"
                                       or self.pair_tolerance is not None):
            raise ValueError("pairs blocks: keep_best and pair_tolerance pick whole answers; a block pair is "
                             "RMOD's own choice at one block (drop them, or use pairs reference-all+blocks)")
        if self.keep_best is not None and self.objective == "dpo" and self.pairs == "samples":
            raise ValueError("keep_best picks SFT rows and the chosen side of reference / reference-all / both pairs; "
                             "objective dpo on pairs samples uses neither (drop keep_best)")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for key in ("learning_rate", "dpo_learning_rate", "grpo_learning_rate"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a finite number > 0, got {value}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.pairs not in PAIRINGS:
            raise ValueError(f"pairs must be one of {', '.join(PAIRINGS)}, got {self.pairs!r}")
        pairs_with_reference = self.pairs in ("reference", "reference-all", "reference-all+blocks")
        if self.rejected_dir is not None and ("dpo" not in self.objective or not pairs_with_reference):
            raise ValueError(f"rejected_dir gives DPO's rejected answers: it needs objective dpo or sft+dpo and pairs "
                             f"reference, reference-all or reference-all+blocks (got objective {self.objective!r}, "
                             f"pairs {self.pairs!r})")
        unknown = [t for t in self.dpo_loss_type if t not in DPO_LOSSES]
        if not self.dpo_loss_type or unknown:
            raise ValueError(f"dpo_loss_type: {unknown or 'empty'} is not a loss of TRL's DPOTrainer; one or more of "
                             f"{', '.join(DPO_LOSSES)}")
        if self.dpo_loss_weights is not None and len(self.dpo_loss_weights) != len(self.dpo_loss_type):
            raise ValueError(f"dpo_loss_weights: {len(self.dpo_loss_weights)} weights for "
                             f"{len(self.dpo_loss_type)} losses {self.dpo_loss_type}")
        if not self.dpo_beta > 0:
            raise ValueError(f"dpo_beta must be > 0, got {self.dpo_beta}")
        if self.dpo_restarts < 1 or self.dpo_select_samples < 1:
            raise ValueError(f"dpo_restarts and dpo_select_samples must be >= 1, got {self.dpo_restarts} and "
                             f"{self.dpo_select_samples}")
        if self.dpo_restarts > 1 and "dpo" not in self.objective:
            raise ValueError(f"dpo_restarts repeats DPO; objective {self.objective!r} trains none")
        if self.dpo_restarts > 1 and self.eval_fraction == 0:
            raise ValueError("dpo_restarts chooses among DPO runs on the prompts eval_fraction holds out; "
                             "eval_fraction 0 holds out none")
        if self.grpo_loss_type not in GRPO_LOSSES:
            raise ValueError(f"grpo_loss_type must be one of {', '.join(GRPO_LOSSES)}, got {self.grpo_loss_type!r}")
        if not self.grpo_beta >= 0:
            raise ValueError(f"grpo_beta must be >= 0, got {self.grpo_beta}")
        if self.grpo_num_generations < 2:
            raise ValueError(f"grpo_num_generations must be >= 2 (GRPO compares a prompt's samples), "
                             f"got {self.grpo_num_generations}")
        if self.grpo_prompts is not None and "grpo" not in self.objective:
            raise ValueError(f"grpo_prompts gives GRPO more prompts: it needs an objective with grpo "
                             f"(got objective {self.objective!r})")
        if "grpo" in self.objective and (self.per_device_train_batch_size * self.gradient_accumulation_steps
                                         % self.grpo_num_generations):
            raise ValueError(f"per_device_train_batch_size x gradient_accumulation_steps "
                             f"({self.per_device_train_batch_size} x {self.gradient_accumulation_steps}) must be a "
                             f"multiple of grpo_num_generations {self.grpo_num_generations}: GRPO samples whole groups")
        if isinstance(self.wandb, dict):
            self.wandb = WandbConfig(**self.wandb)
        if isinstance(self.model, dict):
            self.model = DistillModelConfig(**self.model)
        super().__post_init__()
        # W&B logging goes through the Trainer's own integration: wandb.mode adds it to
        # report_to (other reporters a recipe names stay); asking for both is a contradiction.
        reporters = [r for r in (self.report_to or []) if r != "none"]
        if self.wandb.resolved_mode() == "disabled":
            if "wandb" in reporters:
                raise ValueError("report_to names wandb but wandb.mode is disabled; drop one of them")
        elif "wandb" not in reporters:
            reporters.append("wandb")
        self.report_to = reporters


def check_generate_dir(cfg: DistillConfig) -> tuple[dict, set[str]]:
    """The generate run's ``run.json``, checked (complete, with the recipe's methods) before any model loads,
    and the ids of the prompts its dataset holds (rejected_dir and grpo_prompts are checked against them)."""
    gen = Path(cfg.generate_dir)
    info = read_run(gen, "generate", "generate_dir")
    available = info.get("config", {}).get("methods", [])
    missing = [m for m in cfg.methods if m not in available]
    if missing:
        raise UserError(f"generate_dir {gen}: no rows for method {missing[0]!r} (methods there: {available})")
    problem = dpo_pairs_problem(cfg.objective, cfg.pairs, cfg.samples_per_prompt,
                                available + ["reference"] if cfg.rejected_dir else available,
                                info.get("config", {}).get("samples_per_prompt", 1))
    if problem:
        raise UserError(f"generate_dir {gen}: {problem}")
    dataset = _checked_dataset(gen, "generate_dir")  # a damaged dataset fails here, before the model loads
    if "dpo" in cfg.objective and cfg.pairs in BLOCK_PAIRINGS:
        scored = [r for r in read_jsonl(gen / "samples.jsonl") if r["method"] in cfg.methods]
        if not any("scores" in b for r in scored for b in r.get("candidates") or []):
            raise UserError(f"generate_dir {gen}: no block candidates in samples.jsonl for methods {cfg.methods}; "
                            f"pairs {cfg.pairs} need a generate run with --keep_candidates true (and a method that "
                            "scores blocks: rmod or cd)")
    prompt_ids = set(map(base_prompt_id, dataset["prompt_id"]))
    if cfg.rejected_dir:
        check_rejected_dir(cfg, info, prompt_ids)
    if "grpo" in cfg.objective or cfg.dpo_restarts > 1:
        WorstCaseReward.check(gen, info)
    return info, prompt_ids


def grpo_extra_prompts(cfg: DistillConfig, info: dict, known: set[str]) -> tuple[list[list[dict]], list[tuple]]:
    """The conversations of ``cfg.grpo_prompts`` that GRPO samples besides generate_dir's train prompts:
    read as generate_dir read its prompts (split, columns, text format, system prompt), without the ids in
    ``known`` (generate_dir's) and those that eval_fraction holds out; and those held out, as (id, conversation)
    pairs (:func:`train_dpo_restarts` chooses on them). Loaded before any model."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(PromptsConfig)}
    settings = {k: v for k, v in info.get("config", {}).get("prompts", {}).items() if k in names}
    settings.update(path=cfg.grpo_prompts, limit=None, subset="all")
    try:
        prompts = load_prompts(PromptsConfig(**settings))
    except UserError as exc:
        raise UserError(f"grpo_prompts: {str(exc).replace('prompts.path: ', '')}") from None
    new = [p for p in prompts if p.id not in known]
    kept = [p.messages for p in new if not held_out(p.id, cfg.eval_fraction)]
    if not kept:
        raise UserError(f"grpo_prompts {cfg.grpo_prompts}: none of its {len(prompts)} prompts is new (every id is in "
                        f"generate_dir {cfg.generate_dir} or held out by eval_fraction {cfg.eval_fraction})")
    return kept, [(p.id, p.messages) for p in new if held_out(p.id, cfg.eval_fraction)]


def selection_prompts(cfg: DistillConfig, everything, more: list[tuple]) -> list[tuple]:
    """The prompts ``dpo_restarts`` chooses on, as (id, conversation) pairs: generate_dir's prompts that
    eval_fraction holds out (one row's conversation each), then ``more`` (grpo_prompts' held-out ones)."""
    chosen: dict[str, list[dict]] = {}
    for pid, prompt in zip(everything["prompt_id"], everything["prompt"]):
        base = base_prompt_id(pid)
        if held_out(base, cfg.eval_fraction) and base not in chosen:
            chosen[base] = prompt
    for pid, prompt in more:
        chosen.setdefault(pid, prompt)
    return sorted(chosen.items())


def _checked_dataset(run: Path, key: str):
    """The generate run's ``dataset/``, memory-mapped; a missing or damaged one is refused."""
    if not (run / "dataset").is_dir():
        raise UserError(f"{key} {run}: no dataset/ folder; the run is damaged, rerun generate with --overwrite")
    return _read_dataset(run, keep_in_memory=False, key=key)


def check_rejected_dir(cfg: DistillConfig, gen_info: dict, prompt_ids: set[str]) -> dict:
    """``rejected_dir``'s run.json, checked before any model loads: a complete generate run with
    ``reference`` rows, scored with generate_dir's normalisation (or worst cases would not compare),
    on some of generate_dir's prompts (``prompt_ids``)."""
    rej = Path(cfg.rejected_dir)
    where = f"rejected_dir {rej}"
    info = read_run(rej, "generate", "rejected_dir")
    if "reference" not in info.get("config", {}).get("methods", []):
        raise UserError(f"{where}: no `reference` rows (methods there: {info.get('config', {}).get('methods')}); "
                        "generate the student's own samples with --methods '[reference]'")
    if info.get("config", {}).get("scale") != gen_info.get("config", {}).get("scale"):
        raise UserError(f"{where}: scale {info.get('config', {}).get('scale')!r}, generate_dir {cfg.generate_dir} "
                        f"{gen_info.get('config', {}).get('scale')!r}: worst cases on two scales do not compare")
    if info.get("normalization") != gen_info.get("normalization"):
        raise UserError(f"{where}: scored with another normalisation than generate_dir {cfg.generate_dir}; "
                        f"generate it with --normalization {cfg.generate_dir}/normalization.json")
    if info.get("objectives") != gen_info.get("objectives"):
        raise UserError(f"{where}: scored on other objectives than generate_dir {cfg.generate_dir} "
                        f"({info.get('objectives')} against {gen_info.get('objectives')})")
    if not set(map(base_prompt_id, _checked_dataset(rej, "rejected_dir")["prompt_id"])) & prompt_ids:
        raise UserError(f"{where}: none of its prompts is one of generate_dir {cfg.generate_dir}'s, so no pair can "
                        "be made; generate the student's samples on the same prompts")
    return info


def load_rejected(cfg: DistillConfig):
    """``rejected_dir``'s reference rows (at most ``samples_per_prompt`` a prompt) as method ``student`` (so
    they never pair with generate_dir's own reference rows), and the keys of those cut off at max_new_tokens."""
    rej = Path(cfg.rejected_dir)
    ds = _read_dataset(rej, keep_in_memory=True, key="rejected_dir")
    ds = ds.filter(lambda r: r["method"] == "reference", keep_in_memory=True)
    if cfg.samples_per_prompt is not None:  # as load_generated keeps generate_dir's
        ds = ds.filter(lambda r: sample_index(r["prompt_id"]) < cfg.samples_per_prompt, keep_in_memory=True)
    ds = ds.map(lambda r: {"method": STUDENT}, keep_in_memory=True)
    unfinished = {(pid, STUDENT) for pid, method in unfinished_answers(rej) if method == "reference"}
    return ds, unfinished


def _read_dataset(gen: Path, keep_in_memory: bool, key: str = "generate_dir"):
    import datasets

    try:
        # In memory: nothing (no cache-*.arrow) is written into the generate run's folder.
        return datasets.load_from_disk(str(gen / "dataset"), keep_in_memory=keep_in_memory)
    except Exception as exc:  # datasets raises several types for a damaged folder
        message = " ".join(str(exc).split())[:200]
        raise UserError(f"{key} {gen}/dataset could not be read ({type(exc).__name__}: {message}); "
                        "rerun generate with --overwrite") from None


def check_policy(cfg: DistillConfig, info: dict) -> None:
    """The policy to distil into is the one that generated the data (the same model, compared as
    resolved paths, and the same vocabulary and chat template); loads only its tokenizer."""
    made_with = info.get("policy_fingerprint")
    name = cfg.model.model_name_or_path
    mine = policy_fingerprint(name, load_tokenizer(name))  # a policy without a chat template fails here
    if made_with is None:
        return
    differs = [k for k in ("vocab_size", "vocab_sha256", "chat_template_sha256") if made_with.get(k) != mine[k]]
    if not same_policy(made_with.get("model"), name) or differs:
        raise UserError(
            f"generate_dir {cfg.generate_dir} was made with policy {made_with.get('model')!r}"
            f"{' (different ' + ', '.join(differs) + ')' if differs else ''}; model.model_name_or_path is "
            f"{name!r}: distil into the policy that generated the data"
        )


def load_generated(cfg: DistillConfig, tokenizer, info: dict):
    """The generate run's dataset, checked against the policy, filtered, split into train/held-out."""
    gen = Path(cfg.generate_dir)
    ds = _read_dataset(gen, keep_in_memory=True)
    if cfg.samples_per_prompt is not None:  # for DPO's pairs too
        ds = ds.filter(lambda r: sample_index(r["prompt_id"]) < cfg.samples_per_prompt, keep_in_memory=True)
    everything = ds
    ds = ds.filter(lambda r: r["method"] in cfg.methods and bool(r["completion"][0]["content"].strip()),
                   keep_in_memory=True)  # an empty answer teaches nothing, and is no prompt's best sample
    if cfg.keep_best is not None:
        best = best_samples(ds, cfg.keep_best)
        ds = ds.filter(lambda r: (r["method"], r["prompt_id"]) in best, keep_in_memory=True)
    if cfg.min_worst_case is not None:
        # A row whose worst case is unknown (a judge objective left a score missing) does not pass a threshold.
        ds = ds.filter(lambda r: r["worst_case"] is not None and r["worst_case"] >= cfg.min_worst_case,
                       keep_in_memory=True)
    if len(ds) == 0:
        raise UserError(f"generate_dir {gen}: no rows left after filtering (methods {cfg.methods}, "
                        f"samples_per_prompt {cfg.samples_per_prompt}, keep_best {cfg.keep_best}, "
                        f"min_worst_case {cfg.min_worst_case})")
    held = ds.filter(lambda r: held_out(r["prompt_id"], cfg.eval_fraction), keep_in_memory=True)
    train = ds.filter(lambda r: not held_out(r["prompt_id"], cfg.eval_fraction), keep_in_memory=True)
    if len(train) == 0:
        raise UserError(f"generate_dir {gen}: every row is held out (eval_fraction {cfg.eval_fraction}); lower it")
    return train, (held if len(held) else None), everything


def unfinished_answers(gen: Path) -> set[tuple[str, str]]:
    """``(prompt_id, method)`` of the generate run's answers cut off at ``max_new_tokens``: their text
    is a prefix of an answer, not one that ends."""
    return {(r["prompt_id"], r["method"]) for r in read_jsonl(gen / "samples.jsonl") if not r.get("finished", True)}


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt with its generation prompt, as the sampler reads it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_and_answer(tokenizer, prompt: list[dict], completion: list[dict], cut_off: bool) -> tuple[list[int], list[int]]:
    """Token ids of a chat prompt (its generation prompt included) and of one answer to it.

    A finished answer is the chat template's rendering of prompt and answer, its end-of-turn
    included (what TRL does with a conversational row). An answer cut off at ``max_new_tokens``
    (most of RMOD's, at 64 tokens) ends after its text: with the end-of-turn that the template
    appends, the student would learn to stop wherever the teacher was cut off. It is tokenised in
    context, as the conversation's text up to the end of the answer's (a tokenizer may split a word
    differently at the start of a string), so it is the finished rendering less its end-of-turn.
    """

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    text = tokenizer.apply_chat_template(prompt + completion, tokenize=False, add_generation_prompt=False)
    if cut_off:
        content = completion[0]["content"]
        if text.rfind(content) < 0 and content.strip():
            content = content.strip()  # a template that trims the answer (Gemma's, Llama 3's)
        end = text.rfind(content)
        if end < 0:  # a template that rewrites the answer otherwise: out of context, as the text is
            return prompt_ids, ids(completion[0]["content"])
        text = text[: end + len(content)]
    whole = ids(text)
    start = common_prefix_length(prompt_ids, whole)
    return whole[:start], whole[start:]


def sft_examples(ds, tokenizer, unfinished: set[tuple[str, str]]):
    """The SFT rows as token ids and labels, the loss on the completion only; a cut-off answer
    (``unfinished``: :func:`unfinished_answers`) without end-of-turn (:func:`prompt_and_answer`)."""

    def example(row):
        prompt, answer = prompt_and_answer(tokenizer, row["prompt"], row["completion"],
                                           (row["prompt_id"], row["method"]) in unfinished)
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}

    return ds.map(example, remove_columns=ds.column_names, keep_in_memory=True)


def dpo_examples(pairs: list[dict], tokenizer, unfinished: set[tuple[str, str]]):
    """:func:`preference_pairs` as the token ids TRL's DPOTrainer trains on (``prompt_ids``,
    ``chosen_ids``, ``rejected_ids``), each side cut off or finished as its answer was
    (:func:`prompt_and_answer`): TRL's own tokenisation would end both with end-of-turn."""
    import datasets

    rows = []
    for p in pairs:
        if "ids" in p:  # a block pair (block_pairs): token ids already
            rows.append(dict(p["ids"]))
            continue
        prompt, chosen = prompt_and_answer(tokenizer, p["prompt"], p["chosen"], tuple(p["chosen_key"]) in unfinished)
        prompt_r, rejected = prompt_and_answer(tokenizer, p["prompt"], p["rejected"],
                                               tuple(p["rejected_key"]) in unfinished)
        common = common_prefix_length(prompt, prompt_r)  # both renderings share the prompt; keep what agrees
        rows.append({"prompt_ids": prompt[:common], "chosen_ids": prompt[common:] + chosen,
                     "rejected_ids": prompt_r[common:] + rejected})
    return datasets.Dataset.from_list(rows)


def sample_index(prompt_id: str) -> int:
    """j of generate's ``<id>#s<j>`` (0 for the first sample, stored under the bare id)."""
    suffix = prompt_id.partition("#")[2]
    return int(suffix[1:]) if suffix.startswith("s") and suffix[1:].isdigit() else 0


def best_samples(ds, k: int) -> set[tuple[str, str]]:
    """(method, prompt id) of the ``k`` samples of each prompt and method with the highest worst case
    (ties: the earlier sample); a row whose worst case is unknown (a judge's missing score) ranks last."""
    groups: dict[tuple[str, str], list[tuple[float, int, str]]] = {}
    for method, pid, worst in zip(ds["method"], ds["prompt_id"], ds["worst_case"]):
        key = -math.inf if worst is None else worst
        groups.setdefault((method, base_prompt_id(pid)), []).append((-key, sample_index(pid), pid))
    return {(method, pid) for (method, _), rows in groups.items() for _, _, pid in sorted(rows)[:k]}


def objective_scores(gen: Path, only: str | None = None, rename: str | None = None) -> dict[tuple[str, str], dict]:
    """``(prompt_id, method)`` -> the answer's normalised score per objective, from a generate run's
    ``samples.jsonl``; ``only``: that method's rows alone, named ``rename`` (as :func:`load_rejected`
    names rejected_dir's reference rows)."""
    return {(r["prompt_id"], rename or r["method"]): r.get("normalized") or {}
            for r in read_jsonl(gen / "samples.jsonl") if only is None or r["method"] == only}


def preference_pairs(cfg: DistillConfig, ds, scores: dict[tuple[str, str], dict] | None = None) -> list[dict]:
    """DPO pairs in TRL's conversational preference format, from one generate run's rows.

    ``reference``: a prompt's RMOD answer over its reference answer (same prompt id and
    sample); ``reference-all``: each RMOD answer of a prompt over each of its reference answers;
    ``samples``: of a prompt's samples of each of ``methods`` (RMOD's by default), the one with the
    best worst case over the one with the worst. A pair is kept only when the chosen answer's worst
    case is higher by more than ``pair_margin``, so no pair teaches the opposite of what RMOD's
    objective says. With ``keep_best`` k, ``reference``, ``reference-all`` and the reference half of
    ``both`` take their chosen side from each prompt's k RMOD answers with the highest worst case
    only (the rejected side stays every answer). With ``pair_tolerance`` t, a pair is kept only if
    the chosen answer is lower than the rejected one on no objective by more than t (``scores``:
    :func:`objective_scores` of the rows' runs).
    """
    if cfg.pair_tolerance is not None and scores is None:
        raise ValueError("pair_tolerance needs each answer's objective scores (objective_scores)")
    rows = [r for r in ds if r["completion"][0]["content"].strip()]
    chosen_ids = {r["prompt_id"] for r in rows if r["method"] == "rmod"}  # RMOD answers that may be chosen
    if cfg.keep_best is not None:
        teacher = [r for r in rows if r["method"] == "rmod"]
        best = best_samples({k: [r[k] for r in teacher] for k in ("method", "prompt_id", "worst_case")}, cfg.keep_best)
        chosen_ids = {pid for _, pid in best}
    by_id = {(r["method"], r["prompt_id"]): r for r in rows}
    other = STUDENT if cfg.rejected_dir else "reference"  # whose answers are rejected
    pairs = []
    unscored = 0  # pairs past the margin that pair_tolerance could not check

    def add(chosen, rejected):
        nonlocal unscored
        if chosen["worst_case"] is None or rejected["worst_case"] is None:
            return  # an unknown worst case (a judge's missing score) orders nothing
        if chosen["worst_case"] - rejected["worst_case"] <= cfg.pair_margin:
            return
        if cfg.pair_tolerance is not None:
            mine = scores.get((chosen["prompt_id"], chosen["method"])) or {}
            theirs = scores.get((rejected["prompt_id"], rejected["method"])) or {}
            if not mine or set(mine) != set(theirs) or any(v is None for v in (*mine.values(), *theirs.values())):
                unscored += 1
                return  # an objective's score unknown: the pair cannot be checked
            if any(mine[o] < theirs[o] - cfg.pair_tolerance for o in mine):
                return
        pairs.append({"prompt_id": chosen["prompt_id"], "prompt": chosen["prompt"],
                      "chosen": chosen["completion"], "rejected": rejected["completion"],
                      "chosen_key": (chosen["prompt_id"], chosen["method"]),
                      "rejected_key": (rejected["prompt_id"], rejected["method"]),
                      "margin": chosen["worst_case"] - rejected["worst_case"]})

    if cfg.pairs in ("reference", "both"):
        for (method, pid), r in by_id.items():
            if method == "rmod" and pid in chosen_ids and (other, pid) in by_id:
                add(r, by_id[(other, pid)])
    if cfg.pairs in ("reference-all", "reference-all+blocks"):
        answers: dict[tuple[str, str], list[dict]] = {}  # grouped by prompt, in the dataset's order
        for r in rows:
            if r["method"] != "rmod" or r["prompt_id"] in chosen_ids:
                answers.setdefault((r["method"], base_prompt_id(r["prompt_id"])), []).append(r)
        for (method, pid), group in answers.items():
            if method == "rmod":
                for chosen in group:
                    for rejected in answers.get((other, pid), []):
                        add(chosen, rejected)
    if cfg.pairs in ("samples", "both"):
        groups: dict[tuple[str, str], list[dict]] = {}  # each method's samples of a prompt apart
        for r in rows:
            if r["method"] in cfg.methods:  # RMOD's by default; methods [reference]: a student's own samples
                groups.setdefault((r["method"], base_prompt_id(r["prompt_id"])), []).append(r)
        for group in groups.values():
            if len(group) > 1:
                ranked = sorted((r for r in group if r["worst_case"] is not None), key=lambda r: r["worst_case"])
                if len(ranked) < 2:
                    continue
                add(ranked[-1], ranked[0])
    if cfg.pairs in BLOCK_PAIRINGS:
        return pairs  # train_dpo adds block_pairs, and refuses only if both are empty
    if not pairs:
        source = f"generate_dir {cfg.generate_dir}"
        if cfg.rejected_dir:
            source += f" and rejected_dir {cfg.rejected_dir}"
        within = ("" if cfg.pair_tolerance is None
                  else f" and no objective lower by more than pair_tolerance {cfg.pair_tolerance}"
                  + (f" ({unscored} pairs dropped for an objective score missing from samples.jsonl's `normalized`)"
                     if unscored else ""))
        raise UserError(f"{source}: no DPO pairs ({cfg.pairs}) with a worst-case margin above {cfg.pair_margin}"
                        f"{within}")
    return pairs


def block_pairs(cfg: DistillConfig, tokenizer) -> list[dict]:
    """DPO pairs from RMOD's own choices, as token ids: at every block of an answer of ``methods``
    (generate's ``candidates``, from ``keep_candidates: true``), the candidate it kept over the one it
    scored lowest under that block's weights, both continuing the same prompt and prefix (the kept
    candidates before it). A pair is kept when the scores differ by more than ``pair_margin``. A
    candidate that ended the answer keeps its stop token, so ending where RMOD ended is learnt too.
    A candidate with a missing value (a judge's) is never the rejected side: its score ranked it, but
    nothing measured it; an empty answer, or a rejected candidate identical to the kept one, pairs nothing.
    """
    gen = Path(cfg.generate_dir)
    pairs = []
    blocks = 0
    for r in read_jsonl(gen / "samples.jsonl"):
        if r["method"] not in cfg.methods or not r.get("candidates") or not r["completion"].strip():
            continue
        if cfg.samples_per_prompt is not None and sample_index(r["prompt_id"]) >= cfg.samples_per_prompt:
            continue
        prompt_ids = chat_prompt_ids(tokenizer, r["messages"])
        prefix: list[int] = []
        for block in r["candidates"]:
            if block["start"] != len(prefix):
                raise UserError(f"generate_dir {gen}: row {r['prompt_id']} ({r['method']}): its block candidates "
                                f"do not follow one another (a block starts at token {block['start']}, the kept "
                                f"ones end at {len(prefix)}); rerun generate with --overwrite")
            kept, scores = block["chosen"], block.get("scores")
            if scores is not None:
                blocks += 1
                measured = [k for k, v in enumerate(block["values"]) if None not in v]
                lowest = min(measured, key=lambda k: scores[k], default=kept)
                if (scores[kept] - scores[lowest] > cfg.pair_margin
                        and block["tokens"][kept] != block["tokens"][lowest]):
                    pairs.append({"prompt_id": r["prompt_id"], "margin": scores[kept] - scores[lowest],
                                  "ids": {"prompt_ids": prompt_ids + prefix, "chosen_ids": block["tokens"][kept],
                                          "rejected_ids": block["tokens"][lowest]}})
            prefix = prefix + block["tokens"][kept]
    print(f"distill: {len(pairs)} block pairs of {blocks} scored blocks (score margin above {cfg.pair_margin})")
    if not pairs and cfg.pairs == "blocks":
        raise UserError(f"generate_dir {gen}: no block pairs with a score margin above {cfg.pair_margin} "
                        f"(methods {cfg.methods}, {blocks} scored blocks); lower pair_margin")
    return pairs


def _check_saved_adapter(path: Path) -> None:
    """Refuse an adapter file without weights (the known ZeRO-3 trap: tensors of size 0)."""
    from safetensors import safe_open

    check_adapter_folder(path)
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        empty = [k for k in keys if f.get_slice(k).get_shape() in ([], [0]) or 0 in f.get_slice(k).get_shape()]
    if not keys or empty:
        raise RuntimeError(
            f"{path}/adapter_model.safetensors holds no LoRA weights ({len(keys)} tensors, {len(empty)} empty): "
            "under ZeRO-3 set zero3_save_16bit_model: true in the accelerate config"
        )


def sample_completions(model, tokenizer, rows, max_new_tokens: int, seed: int) -> list[dict]:
    """Plain samples from the trained policy on held-out prompts (for the card and W&B)."""
    import torch

    if not rows:
        return []
    cfg = DecodingConfig(num_candidates=1, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9)
    decoder = BlockwiseDecoder.from_model(model, tokenizer, cfg)
    model.eval()
    with torch.no_grad():
        results = decoder.decode(
            [r["prompt"] for r in rows], [prompt_seed(seed, r["prompt_id"], "distilled") for r in rows],
            decoder.method("reference"),
        )
    return [
        {"prompt_id": r["prompt_id"], "prompt": r["prompt"][-1]["content"], "teacher": r["completion"][0]["content"],
         "distilled": res.text}
        for r, res in zip(rows, results)
    ]


class WorstCaseReward:
    """GRPO's reward: each answer's worst case, the lowest of generate_dir's objectives after its
    normalisation, scored with the same objective specs, statistics and scale as the answers
    distill learns from (RMOD's headline metric, on the student's own samples). An answer with
    an unknown score (a judge's missing one) gets None, which TRL leaves out of its group."""

    __name__ = "worst_case"  # TRL names the reward's log column after the function

    @staticmethod
    def check(gen: Path, info: dict) -> None:
        """What the reward needs from the generate run, checked before any model loads."""
        if not info.get("objective_specs"):
            raise UserError(f"generate_dir {gen}: run.json has no objective_specs (made by an older version); GRPO "
                            "(and dpo_restarts) score the student as generate scored its answers: rerun generate")
        if not (gen / "normalization.json").is_file():
            raise UserError(f"generate_dir {gen}: no normalization.json; GRPO's reward (and dpo_restarts' score) is "
                            "on its scale: rerun generate")

    def __init__(self, gen: Path, info: dict, load: bool = True):
        from rmod_distill.config import from_dict
        from rmod_distill.objectives import Normalizer, ObjectiveSet, ObjectiveSpec

        where = f"{gen}/run.json objective_specs"
        specs = [from_dict(ObjectiveSpec, s, where) for s in info["objective_specs"]]
        self.objectives = ObjectiveSet.from_specs(specs, load=load)  # load=False (--dry-run): checked, not loaded
        norm = gen / "normalization.json"
        scale = info.get("config", {}).get("scale", "zscore")
        self.objectives.set_normalizer(Normalizer.load(norm).with_scale(scale, str(norm)), str(norm))

    def __call__(self, prompts, completions, **_) -> list[float | None]:
        import numpy as np

        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        z = self.objectives.normalizer(self.objectives.raw(prompts, texts))
        return [None if np.isnan(row).any() else float(row.min()) for row in z]


def held_out_worst_case(model, tokenizer, prompts: list[tuple], reward: WorstCaseReward, decoding: dict,
                        samples: int, seed: int, batch_size: int = 16) -> tuple[float, int]:
    """The mean worst case (``reward``'s objectives and normalisation) of ``samples`` plain samples of ``model``
    for each (id, conversation) of ``prompts``, decoded as eval decodes ``distilled`` (:func:`decode_rows`) with
    generate_dir's length, temperature and top-p, and seeds from ``seed`` and the prompt ids only: every model
    scored with the same seed meets the same draws. Returns the mean and the number of answers it is over (an
    unknown score is left out)."""
    import numpy as np
    import torch

    from rmod_distill.engine.runs import decode_rows
    from rmod_distill.prompts import Prompt

    cfg = DecodingConfig(num_candidates=1, max_new_tokens=decoding.get("max_new_tokens", 64),
                         temperature=decoding.get("temperature", 1.0), top_p=decoding.get("top_p", 1.0),
                         top_k=decoding.get("top_k", 0))
    jobs = [Prompt(f"{pid}#select-{j}", messages) for pid, messages in prompts for j in range(samples)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        rows = decode_rows(BlockwiseDecoder.from_model(model, tokenizer, cfg), reward.objectives, jobs, "distilled",
                           seed, batch_size)
    model.train(was_training)
    scores = [r["worst_case"] for r in rows if r["worst_case"] is not None]
    return (float(np.mean(scores)) if scores else float("-inf")), len(scores)


def _from_main_process(*values):
    """``values`` as the main process has them (a distributed run: every process then keeps the same run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    shared = list(values)
    dist.broadcast_object_list(shared, src=0)
    return tuple(shared)


def train_dpo_restarts(cfg: DistillConfig, model, tokenizer, ds, peft_config, out: Path, metrics: dict,
                       unfinished: set[tuple[str, str]], scores: dict | None, reward: WorstCaseReward,
                       prompts: list[tuple], decoding: dict):
    """``dpo_restarts`` DPO runs from the same adapter with training seeds ``seed``, ``seed + 1``, ... (each in
    ``dpo-seed<N>/``, resumable), each scored by :func:`held_out_worst_case` on ``prompts``; the model ends with
    the best run's adapter. Returns that run's trainer."""
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if not isinstance(model, PeftModel):  # a fresh adapter, made once so that every run starts from the same one
        from transformers import set_seed

        set_seed(cfg.seed)  # as TRL seeds its own fresh adapter: the run with seed `seed` is a plain DPO run's
        model = get_peft_model(model, peft_config)
    start = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    scored, best = {}, None  # each run's score by seed; the best run's (score, seed, metrics, adapter, trainer)
    for seed in range(cfg.seed, cfg.seed + cfg.dpo_restarts):
        set_peft_model_state_dict(model, start)
        run_metrics: dict = {}
        trainer = train_dpo(cfg, model, tokenizer, ds, None, out, run_metrics, unfinished, scores,
                            seed=seed, folder=f"dpo-seed{seed}")
        model = trainer.model
        if "ref" in model.peft_config:
            model.delete_adapter("ref")  # this run's reference; the next run copies the start again
        record = out / f"dpo-seed{seed}" / "held_out_worst_case.json"
        if record.is_file():  # scored before an interruption: the same choice on resuming, even where sampling is not exact
            score, n = (lambda r: (r["score"], r["answers"]))(read_json(record, "dpo_restarts' score"))
        else:
            score, n = held_out_worst_case(model, tokenizer, prompts, reward, decoding, cfg.dpo_select_samples,
                                           cfg.seed)
            score, n = _from_main_process(score, n)  # every process keeps the run the main process chose
            if trainer.is_world_process_zero():
                write_json(record, {"seed": seed, "score": score, "answers": n, "prompts": len(prompts),
                                    "samples_per_prompt": cfg.dpo_select_samples})
        print(f"distill: DPO with seed {seed}: mean worst case {score:+.3f} over {n} held-out answers "
              f"({len(prompts)} prompts x {cfg.dpo_select_samples})")
        scored[seed] = score
        if best is None or score > best[0]:  # the first of equals
            state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            best = (score, seed, run_metrics, state, trainer)
    score, seed, run_metrics, state, trainer = best
    set_peft_model_state_dict(model, state)
    metrics.update(run_metrics, dpo_seed=seed, dpo_held_out_worst_case=score,
                   **{f"dpo_held_out_worst_case_seed{s}": v for s, v in scored.items()})
    print(f"distill: keeping DPO's seed {seed} ({score:+.3f})")
    return trainer


def train_grpo(cfg: DistillConfig, model, tokenizer, train, peft_config, out: Path, metrics: dict, gen_info: dict,
               reward: WorstCaseReward, extra: list[list[dict]] = ()):
    """GRPO with TRL's GRPOTrainer on ``train``'s prompts (each once), rewarded by ``reward``
    (:class:`WorstCaseReward` of generate_dir), then on ``extra``'s (:func:`grpo_extra_prompts`); the student
    samples with generate_dir's decoding settings (length, temperature, top-p), as eval samples it. Returns the
    trainer."""
    import dataclasses

    import datasets
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    prompts, seen = [], set()
    for pid, prompt in zip(train["prompt_id"], train["prompt"]):
        if base_prompt_id(pid) not in seen:
            seen.add(base_prompt_id(pid))
            prompts.append({"prompt": prompt})
    prompts += [{"prompt": messages} for messages in extra]
    decoding = gen_info.get("config", {}).get("decoding", {})
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    args = GRPOConfig(**dict(
        shared, output_dir=str(out / "grpo"), beta=cfg.grpo_beta, num_generations=cfg.grpo_num_generations,
        loss_type=cfg.grpo_loss_type, max_completion_length=decoding.get("max_new_tokens", 64),
        temperature=decoding.get("temperature", 1.0), top_p=decoding.get("top_p", 1.0),
        learning_rate=cfg.grpo_learning_rate or cfg.learning_rate,
        num_train_epochs=cfg.grpo_epochs or cfg.num_train_epochs,
        eval_strategy="no", remove_unused_columns=False,
    ))
    print(f"distill: GRPO on {len(prompts)} train prompts ({len(extra)} of them from grpo_prompts) x "
          f"{cfg.grpo_num_generations} samples, reward: worst case of {', '.join(gen_info.get('objectives') or [])}")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                          train_dataset=datasets.Dataset.from_list(prompts), processing_class=tokenizer,
                          peft_config=peft_config)
    resume = get_last_checkpoint(str(out / "grpo")) if (out / "grpo").is_dir() else None
    trainer.train(resume_from_checkpoint=resume)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    if rewards:  # the mean worst case of the student's samples, at the first and the last logging step
        metrics.update(grpo_reward_first=float(rewards[0]), grpo_reward_last=float(rewards[-1]))
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    if kl:
        metrics["grpo_kl_last"] = float(kl[-1])
    return trainer


def train_dpo(cfg: DistillConfig, model, tokenizer, ds, peft_config, out: Path, metrics: dict,
              unfinished: set[tuple[str, str]] = frozenset(), scores: dict | None = None, seed: int | None = None,
              folder: str = "dpo"):
    """DPO with TRL's DPOTrainer on :func:`preference_pairs`; returns the trainer. ``unfinished``:
    the answers cut off at ``max_new_tokens`` (:func:`unfinished_answers`), learnt without end-of-turn;
    ``scores``: the answers' objective scores (:func:`objective_scores`), for ``pair_tolerance``; ``seed``:
    the training seed (null: the run's); ``folder``: its checkpoints' folder in ``out``.

    ``model`` is the base policy (a fresh adapter from ``peft_config``) or a PEFT model (SFT-
    trained here, or ``init_adapter``), in which case TRL keeps a frozen copy of its adapter as
    the reference.
    """
    import dataclasses

    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint
    from trl import DPOConfig, DPOTrainer

    pairs = preference_pairs(cfg, ds, scores)
    if cfg.pairs in BLOCK_PAIRINGS:
        pairs += block_pairs(cfg, tokenizer)
        if not pairs:
            raise UserError(f"generate_dir {cfg.generate_dir}: no DPO pairs ({cfg.pairs}): no answer pair with a "
                            f"worst-case margin and no block pair with a score margin above {cfg.pair_margin}")
    held = [p for p in pairs if held_out(p["prompt_id"], cfg.eval_fraction)]
    train = [p for p in pairs if not held_out(p["prompt_id"], cfg.eval_fraction)]
    if not train:
        raise UserError(f"generate_dir {cfg.generate_dir}: every DPO pair is held out; lower eval_fraction")
    print(f"distill: DPO on {len(train)} pairs ({cfg.pairs}), {len(held)} held out")
    # The run's TrainingArguments carry over (batch, schedule, precision, logging); DPO's own keys on top.
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    args = DPOConfig(**dict(
        shared, output_dir=str(out / folder), beta=cfg.dpo_beta, max_length=cfg.max_length,
        loss_type=list(cfg.dpo_loss_type), loss_weights=cfg.dpo_loss_weights,
        learning_rate=cfg.dpo_learning_rate or cfg.learning_rate,
        num_train_epochs=cfg.dpo_epochs or cfg.num_train_epochs,
        eval_strategy=cfg.eval_strategy if held else "no", seed=cfg.seed if seed is None else seed,
    ))
    class PreTokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on rows already tokenised by :func:`dpo_examples` (its own tokenisation
        would end a cut-off answer with end-of-turn); anything else goes through TRL's."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if args.max_length is not None and args.truncation_mode == "keep_start":
                # as TRL does: a prompt that fills max_length leaves no completion token to learn from
                dataset = dataset.filter(lambda r: len(r["prompt_ids"]) < args.max_length, keep_in_memory=True)
            return dataset

    trainer = PreTokenizedDPOTrainer(
        model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=dpo_examples(train, tokenizer, unfinished),
        eval_dataset=dpo_examples(held, tokenizer, unfinished) if held else None,
    )
    resume = get_last_checkpoint(str(out / folder)) if (out / folder).is_dir() else None
    result = trainer.train(resume_from_checkpoint=resume)
    metrics.update(dpo_pairs=len(train), dpo_train_loss=float(result.training_loss))
    if held:
        metrics.update({f"dpo_{k}": float(v) for k, v in trainer.evaluate().items()
                        if k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")})
    return trainer


@dataclass
class Checked:
    """What :func:`check` read and built, handed to :func:`run`."""

    folder: RunFolder
    gen_info: dict
    reward: "WorstCaseReward | None"  # GRPO's reward and the DPO restarts' score (checked only, in --dry-run)
    extra: list  # grpo_prompts' conversations GRPO samples besides generate_dir's
    extra_held: list  # and those held out (the DPO restarts are chosen on them)


def check(cfg: DistillConfig, dry_run: bool = False) -> Checked:
    """Every check before the policy loads or output_dir is touched (``--dry-run`` runs the same,
    without loading GRPO's scorers)."""
    folder = RunFolder(cfg.output_dir, "distill", to_dict(cfg), cfg.overwrite)
    folder.check()
    gen_info, gen_prompt_ids = check_generate_dir(cfg)
    PolicyConfig(cfg.model.model_name_or_path, cfg.init_adapter, cfg.model.dtype).check()
    check_policy(cfg, gen_info)
    # GRPO's scorers load before the policy: one that cannot (a reward model not there) fails before any training
    scored = "grpo" in cfg.objective or cfg.dpo_restarts > 1
    reward = WorstCaseReward(Path(cfg.generate_dir), gen_info, load=not dry_run) if scored else None
    extra, extra_held = grpo_extra_prompts(cfg, gen_info, gen_prompt_ids) if cfg.grpo_prompts else ([], [])
    from transformers.integrations import is_deepspeed_zero3_enabled

    if cfg.dpo_restarts > 1 and (os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
                                 or is_deepspeed_zero3_enabled()):
        raise UserError(f"dpo_restarts {cfg.dpo_restarts}: the restarts are scored on the student's own samples, "
                        "which ZeRO-3's sharded weights do not give outside a trainer; use ZeRO-2 or DDP, or set "
                        "dpo_restarts: 1")
    if cfg.dpo_restarts > 1 and not extra_held and not any(held_out(i, cfg.eval_fraction) for i in gen_prompt_ids):
        raise UserError(f"dpo_restarts {cfg.dpo_restarts}: no prompt of generate_dir {cfg.generate_dir}"
                        f"{' or grpo_prompts' if cfg.grpo_prompts else ''} is held out by eval_fraction "
                        f"{cfg.eval_fraction}, and the restarts are chosen on those; raise eval_fraction or set "
                        "dpo_restarts: 1")
    cfg.wandb.check()
    if cfg.push_to_hub and (problem := hub_push_problem(cfg.hub_token, hub_repo_id(cfg))):
        raise UserError(problem)
    return Checked(folder, gen_info, reward, extra, extra_held)


def run(cfg: DistillConfig, checked: Checked | None = None) -> Path:
    """Run the distill stage (after :func:`check`, unless ``checked`` is its result); returns the adapter folder."""
    from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint
    from trl import SFTTrainer

    from rmod_distill.policy import load_policy

    resolved = to_dict(cfg)
    state = process_state()
    checked = checked or check(cfg)
    folder, gen_info, reward, extra, extra_held = (checked.folder, checked.gen_info, checked.reward, checked.extra,
                                                   checked.extra_held)
    # Distill publishes the finished adapter folder itself (publish_adapter); the trainers would push their own
    # output_dir (a staging folder, or DPO's / GRPO's checkpoint folder) under its name, at every save, and
    # pickle the token into training_args.bin: they get neither.
    publish = (hub_repo_id(cfg), cfg.hub_token) if cfg.push_to_hub else None
    cfg.push_to_hub, cfg.hub_token = False, None
    state.wait_for_everyone()
    out = folder.begin(state.is_main_process)
    state.wait_for_everyone()
    cfg.output_dir = str(out)  # the Trainer writes checkpoints beside the adapter, in the folder being made
    resume = get_last_checkpoint(str(out)) if out.is_dir() else None
    import torch

    from rmod_distill import quiet
    from rmod_distill.tracking import trainer_wandb

    # The Trainers start W&B, which records the command line: its secrets (--hub_token) are hidden first.
    hide_secrets(publish[1] if publish else None)
    quiet.install()  # `accelerate launch -m rmod_distill.distill` does not pass through the CLI's main

    if cfg.use_cpu or not torch.accelerator.is_available():
        cfg.dataloader_pin_memory = False  # nothing to pin for (torch warns, and pins nothing); DPO/GRPO copy it
    if "wandb" in cfg.report_to:
        trainer_wandb()  # one W&B run for SFT, DPO and GRPO (rmod_distill/tracking.py)
        os.environ.setdefault("WANDB_PROJECT", cfg.wandb.project)
        if cfg.wandb.entity:
            os.environ.setdefault("WANDB_ENTITY", cfg.wandb.entity)
        os.environ["WANDB_MODE"] = cfg.wandb.resolved_mode()
        os.environ.setdefault("WANDB_DIR", str(out))
        # One group a pipeline (the experiment of output_dir, or wandb.group), the stage as job type, and a name as
        # the other stages' (the Trainer's run_name wins when given); read by wandb.init in the Trainer's callback.
        from rmod_distill.tracking import experiment

        group, _ = experiment(folder.path)
        os.environ["WANDB_RUN_GROUP"] = cfg.wandb.group or group
        os.environ["WANDB_JOB_TYPE"] = "distill"
        os.environ["WANDB_NAME"] = cfg.wandb.run_name or f"distill-{folder.path.parent.name}"

    # ------------------------------------------------------------------ model and data
    device = "cpu" if cfg.use_cpu else "auto"
    model, tokenizer = load_policy(cfg.model.model_name_or_path, dtype=cfg.model.dtype, device=device)
    train, held, everything = load_generated(cfg, tokenizer, gen_info)
    print(f"distill: {len(train)} train rows, {len(held) if held else 0} held-out rows from {cfg.generate_dir}")
    eval_strategy = cfg.eval_strategy
    if held is None and "sft" in cfg.objective and eval_strategy != IntervalStrategy.NO:
        # No prompt of this run falls in the held-out split (e.g. generate ran on prompts.subset: fit):
        # nothing to measure eval loss on, which the Trainer would refuse after the model loaded.
        for key in ("load_best_model_at_end", "eval_on_start"):
            if getattr(cfg, key):
                raise UserError(f"{key}: needs held-out rows, and generate_dir {cfg.generate_dir} has none at "
                                f"eval_fraction {cfg.eval_fraction}; drop {key} or generate on held-out prompts too")
        print(f"distill: no held-out rows (eval_fraction {cfg.eval_fraction}); SFT's eval loss is not measured")
        cfg.eval_strategy = IntervalStrategy.NO
    peft_config = get_peft_config(cfg.model)
    if cfg.init_adapter:  # continue an adapter: its own LoRA config, trainable, no fresh one
        from peft import PeftModel

        from rmod_distill.adapters import fetch_adapter

        model = PeftModel.from_pretrained(model, str(fetch_adapter(cfg.init_adapter)), is_trainable=True)
        peft_config = None
        print(f"distill: continuing adapter {cfg.init_adapter}")
    metrics: dict = {"train_rows": len(train)}

    # ------------------------------------------------------------------ train: SFT
    trainer = None
    unfinished = unfinished_answers(Path(cfg.generate_dir))
    if "sft" in cfg.objective:
        trainer = SFTTrainer(
            model=model,
            args=cfg,
            train_dataset=sft_examples(train, tokenizer, unfinished),
            eval_dataset=sft_examples(held, tokenizer, unfinished) if held is not None else None,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        if resume:
            print(f"distill: resuming from {resume}")
        result = trainer.train(resume_from_checkpoint=resume)
        metrics["train_loss"] = float(result.training_loss)
        if held is not None:
            metrics.update({k: float(v) for k, v in trainer.evaluate().items() if k.startswith("eval_")})

    # ------------------------------------------------------------------ train: DPO
    cfg.eval_strategy = eval_strategy  # DPO measures its held-out pairs whenever it has some
    if "dpo" in cfg.objective:
        # the restarts choose on generate_dir's held-out prompts (not rejected_dir's) and grpo_prompts'
        chooser = selection_prompts(cfg, everything, extra_held) if cfg.dpo_restarts > 1 else []
        scores = objective_scores(Path(cfg.generate_dir)) if cfg.pair_tolerance is not None else None
        if cfg.rejected_dir:
            import datasets

            student, student_unfinished = load_rejected(cfg)
            everything = datasets.concatenate_datasets([everything, student.cast(everything.features)])
            unfinished = unfinished | student_unfinished
            if scores is not None:
                scores.update(objective_scores(Path(cfg.rejected_dir), "reference", STUDENT))
            print(f"distill: DPO's rejected answers: {len(student)} student rows from {cfg.rejected_dir}")
        start, fresh = (trainer.model if trainer is not None else model), (
            None if trainer is not None or cfg.init_adapter else peft_config)
        if cfg.dpo_restarts > 1:
            trainer = train_dpo_restarts(cfg, start, tokenizer, everything, fresh, out, metrics, unfinished, scores,
                                         reward, chooser,
                                         gen_info.get("config", {}).get("decoding", {}))
        else:
            trainer = train_dpo(cfg, start, tokenizer, everything, fresh, out, metrics, unfinished, scores)

    # ------------------------------------------------------------------ train: GRPO
    if "grpo" in cfg.objective:
        if trainer is not None and "ref" in getattr(trainer.model, "peft_config", {}):
            trainer.model.delete_adapter("ref")  # DPO's reference; GRPO's is a copy of the adapter DPO made
        trainer = train_grpo(cfg, trainer.model if trainer is not None else model, tokenizer, train,
                             None if trainer is not None or cfg.init_adapter else peft_config, out, metrics, gen_info,
                             reward, extra)

    # ------------------------------------------------------------------ save
    if trainer.is_world_process_zero():
        if "ref" in getattr(trainer.model, "peft_config", {}):
            trainer.model.delete_adapter("ref")  # DPO's / GRPO's frozen copy of the start is not part of the result
        trainer.save_model(str(out))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return folder.path
    _check_saved_adapter(out)
    # Saved as padding on the left, as sampling in batches needs (the trainers may have set it to the right, and
    # transformers writes only what was given at init): a user's AutoTokenizer then pads as load_policy does.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    tokenizer.save_pretrained(str(out))
    rows = list(held.select(range(min(cfg.sample_prompts, len(held))))) if held is not None else []
    samples = sample_completions(trainer.model, tokenizer, rows, 64, cfg.seed)
    write_jsonl(out / "samples.jsonl", samples)
    info = dict(
        metrics=metrics,
        generate_dir=cfg.generate_dir,
        rows={"train": len(train), "held_out": len(held) if held is not None else 0},
        decoding=gen_info.get("config", {}).get("decoding", {}),
        held_out_prompt_ids=sorted(set(map(base_prompt_id, held["prompt_id"]))) if held is not None else [],
        train_prompt_ids=sorted(set(map(base_prompt_id, train["prompt_id"]))),
        policy_fingerprint=policy_fingerprint(cfg.model.model_name_or_path, tokenizer),
        objectives=gen_info.get("objectives"),
    )
    card = adapter_card(dict(provenance(resolved), **info))
    atomic_write_text(out / "README.md", str(card))
    folder.finish(info, swap=False)
    _log_to_wandb(cfg, out, samples, metrics, folder.path.name)
    path = folder.swap()
    print(f"distill: adapter -> {path}  ({', '.join(f'{k} {v:.4g}' for k, v in metrics.items())})")
    if publish:
        repo = publish_adapter(path, *publish, private=cfg.hub_private_repo, revision=cfg.hub_revision)
        print(f"distill: adapter pushed to the hub: {repo}")
    return path


def _log_to_wandb(cfg: DistillConfig, out: Path, samples: list[dict], metrics: dict, name: str) -> None:
    """Samples table (``name``: the output folder the user chose, not a staging folder), the adapter as a `model` artifact, and a hashed copy for server-free download."""
    if "wandb" not in cfg.report_to:
        return
    import wandb

    from rmod_distill.adapters import stage_adapter_copy

    run = wandb.run
    if run is None:
        return
    if samples:
        run.log({"distill/samples": wandb.Table(
            columns=["prompt_id", "prompt", "teacher (RMOD)", "distilled"],
            data=[[s["prompt_id"], s["prompt"], s["teacher"], s["distilled"]] for s in samples])})
    run.summary.update(metrics)
    # Lineage: the dataset trained on (use_artifact online; names and digests in the config either way)
    from rmod_distill.tracking import (adapter_files, adapter_reference, dataset_reference, declare_upstream,
                                       digest_alias, experiment, files_digest, run_output_dir)

    _, round_ = experiment(run_output_dir(out))  # the recipe's output_dir (run.json's), not a staging folder
    if round_ is not None:
        run.config.update({"round": round_}, allow_val_change=True)
    upstream = {"dataset": dataset_reference(cfg.generate_dir)}
    if cfg.rejected_dir:
        upstream["rejected_dataset"] = dataset_reference(cfg.rejected_dir)
    if cfg.init_adapter and adapter_files(cfg.init_adapter):
        upstream["init_model"] = adapter_reference(cfg.init_adapter)
    declare_upstream(run, upstream, run.settings.mode)
    files = [name for name in PORTABLE_FILES if name != MANIFEST]
    digest = files_digest(adapter_files(out))
    art = wandb.Artifact(f"adapter-{name}", type="model", metadata=dict(metrics, sha256=digest))
    for name in files:
        if (out / name).exists():
            art.add_file(str(out / name), name=name)
    run.log_artifact(art, aliases=["latest", digest_alias(digest)])
    # Offline runs cannot be downloaded through the server: keep a hashed copy in the run's files.
    stage_adapter_copy(out, Path(run.dir) / "adapter", files)
    run.finish()
    wandb.teardown()  # a later distill in this process (iterate's next round) reads its own WANDB_* (group, name)



def main(argv: list[str] | None = None) -> None:
    """Parse the recipe, check it, and run the stage (``--dry-run``: check only)."""
    stage_main(DistillConfig, argv, check, run)


if __name__ == "__main__":
    main(sys.argv[1:])
