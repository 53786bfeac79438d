"""Learned value functions: ``make values`` and the value model RMOD can be guided by.

    rmod-distill values --config recipes/default/values.yaml [--key value ...]
    make values RECIPE=default

1. Rollouts: reference-policy responses on the train prompts, scored by every objective
   and normalised with the generate run's statistics (the generate engine's ``reference``
   method). ``reference`` rows of earlier generate output (``rollouts:``) are reused
   instead of sampled again, and a finished ``rollouts.jsonl`` is reused on a rerun.
2. Training: one value model with G heads on a backbone (the policy by default) with
   LoRA, by Monte-Carlo regression (rmod.md, the CD-FUDGE loss): every response position
   regresses onto the final normalised rewards, prompt and padding masked, averaged per
   sequence then over the batch; random prefix truncation as augmentation (a seeded data
   collator). ``transformers.Trainer`` runs it (warm-up and cosine schedule, gradient
   clipping, W&B through the recipe's ``wandb`` section); a killed run resumes from its
   last ``checkpoint-*`` folder, which are removed once the model is saved.
3. Saved as ``backbone/`` (PEFT adapter), ``heads.safetensors``, the tokenizer and
   ``value_config.json`` (objectives in order, normalisation, tokenizer fingerprint), so
   generate and eval load it with ``decoding.values: learned`` and ``decoding.value_model``.
4. ``value_report.json``: on held-out rollouts, the correlation of learned and of prefix
   values with the final rewards at 25%, 50% and 75% of each response.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rmod_distill.artifacts import RunFolder, read_json, read_jsonl, read_run, write_json, write_jsonl
from rmod_distill.config import stage_main, to_dict
from rmod_distill.engine.decoding import BlockwiseDecoder, DecodingConfig
from rmod_distill.engine.runs import decode_rows
from rmod_distill.engine.setup import BackendConfig, serve_policy
from rmod_distill.engine.value_model import LearnedValues, ValueModel, batch_tensors, encode, value_loss
from rmod_distill.errors import UserError
from rmod_distill.objectives import Normalizer, ObjectiveSet, ObjectiveSpec, default_objectives
from rmod_distill.policy import PolicyConfig, policy_fingerprint, resolve_device, resolve_model_path
from rmod_distill.prompts import Prompt, PromptsConfig, base_prompt_id, held_out, load_prompts
from rmod_distill.tracking import Tracker, WandbConfig


@dataclass
class ValuesConfig:
    """Recipe of the values stage."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    backbone: str | None = field(
        default=None, metadata={"help": "Value model backbone: a causal LM or classifier id/path (null: the policy)."}
    )
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    objectives: list[ObjectiveSpec] = field(default_factory=default_objectives)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    backend: BackendConfig = field(default_factory=BackendConfig, metadata={"help": "Where rollouts are sampled."})
    generate_dir: str = field(default="runs/default/generate", metadata={"help": "Source of the normalisation."})
    rollouts: list[str] = field(
        default_factory=list,
        metadata={"help": "JSONL files of earlier generate output (samples.jsonl, calibration.jsonl) whose "
                          "`reference` rows are reused as rollouts before any new ones are sampled."},
    )
    rollouts_per_prompt: int = field(default=2, metadata={"help": "Reference rollouts sampled per train prompt."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per rollout batch."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank on the backbone."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    head_hidden: int = field(default=0, metadata={"help": "Hidden width of each head's MLP (0: linear heads)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (reference setup: 1e-4)."})
    epochs: int = field(default=1, metadata={"help": "Passes over the rollouts."})
    train_batch_size: int = field(default=8, metadata={"help": "Sequences per optimiser step."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule after warm-up (a transformers scheduler name)."}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of the steps spent warming up, in [0, 1)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    truncate_prob: float = field(default=0.5, metadata={"help": "Chance a response is cut at a random length."})
    eval_fraction: float = field(default=0.15, metadata={"help": "Share of prompts held out for validation."})
    checkpoint_steps: int = field(
        default=20, metadata={"help": "Save a resumable checkpoint-* folder every N steps (removed once saved)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for rollouts, split, shuffling and truncation."})
    output_dir: str = field(default="runs/default/values", metadata={"help": "Where the value model is written."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished value model in output_dir."})
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not 0 <= self.truncate_prob <= 1 or not 0 < self.eval_fraction < 1:
            raise ValueError("truncate_prob must be in [0, 1] and eval_fraction in (0, 1)")
        if not 0 <= self.warmup_ratio < 1 or self.max_grad_norm < 0:
            raise ValueError(f"warmup_ratio must be in [0, 1) and max_grad_norm >= 0, got {self.warmup_ratio} and "
                             f"{self.max_grad_norm}")
        for key in ("rollouts_per_prompt", "epochs", "train_batch_size", "batch_size", "checkpoint_steps", "lora_r"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.head_hidden < 0:
            raise ValueError(f"head_hidden must be >= 0, got {self.head_hidden}")
        if self.policy.adapter:
            raise ValueError("policy.adapter: value targets are rewards of the reference policy's rollouts; "
                             "set no adapter in the values recipe")
        judged = [o.name for o in self.objectives if o.kind == "judge"]
        if judged:
            raise ValueError(f"objective {judged[0]!r}: kind judge is not supported by the values stage (a value "
                             "model regresses on every objective's reward of every rollout, and a judge can leave "
                             "one missing); guide decoding by a judge with decoding.values: prefix")


# ----------------------------------------------------------------------------- the model


# ----------------------------------------------------------------------------- the stage


def _renormalise(rows: list[dict], objectives: ObjectiveSet, path: Path) -> list[dict]:
    """Targets from the raw rewards with this run's normalisation; refuse rows of other objectives."""
    for r in rows:
        missing = [g for g in objectives.names if g not in r.get("rewards", {})]
        if missing:
            raise UserError(f"{path}: row {r['prompt_id']!r} has no reward for objective {missing[0]!r}; "
                             "use rollouts made with this recipe's objectives")
        raw = np.array([r["rewards"][g] for g in objectives.names])
        r["normalized"] = dict(zip(objectives.names, map(float, objectives.normalizer(raw))))
    return rows


def reused_rollouts(files: list[str], objectives: ObjectiveSet, prompt_ids: set[str]) -> list[dict]:
    """``reference`` rows of earlier generate output on the recipe's prompts, re-normalised."""
    rows = []
    for name in files:
        path = Path(name)
        picked = [r for r in read_jsonl(path)
                  if r.get("method") == "reference" and base_prompt_id(r["prompt_id"]) in prompt_ids]
        rows += _renormalise(picked, objectives, path)
    return rows


def _rollout_recipe(cfg: "ValuesConfig") -> dict:
    """What the rollouts depend on; a ``rollouts.jsonl`` made otherwise is not reused."""
    d = to_dict(cfg)
    return {k: d[k] for k in ("policy", "prompts", "decoding", "rollouts", "rollouts_per_prompt", "seed")}


def sample_rollouts(cfg: ValuesConfig, objectives: ObjectiveSet, out: Path) -> list[dict]:
    """Reference rollouts (``rollouts.jsonl`` when present), scored and normalised.

    Rows of ``cfg.rollouts`` count towards ``rollouts_per_prompt``; only the rest is sampled.
    """
    path = out / "rollouts.jsonl"
    recipe_path = out / "rollouts_recipe.json"
    if path.exists() and recipe_path.exists() and read_json(recipe_path) == _rollout_recipe(cfg):
        print(f"values: reusing the rollouts in {path}")
        return _renormalise(read_jsonl(path), objectives, path)
    from tqdm.auto import tqdm

    prompts = load_prompts(cfg.prompts)
    reused = reused_rollouts(cfg.rollouts, objectives, {p.id for p in prompts})
    have = Counter(base_prompt_id(r["prompt_id"]) for r in reused)
    todo = [
        Prompt(f"{p.id}#rollout-{j}", p.messages, p.category, p.split)
        for p in prompts
        for j in range(have.get(p.id, 0), cfg.rollouts_per_prompt)
    ]
    rows = list(reused)
    if todo:
        with serve_policy(cfg.policy, cfg.backend, out) as served:
            decoder = BlockwiseDecoder(served.sampler(cfg.decoding.sampling), served.tokenizer, cfg.decoding, None,
                                       objectives.names)
            bar = tqdm(total=len(todo), desc=f"rollouts (reference; {len(reused)} reused)", unit="resp")
            rows += decode_rows(decoder, objectives, todo, "reference", cfg.seed, cfg.batch_size,
                                lambda r: bar.update(len(r)))
            bar.close()
    write_jsonl(path, rows)
    write_json(recipe_path, _rollout_recipe(cfg))
    return rows


def build_value_model(cfg: ValuesConfig, num_objectives: int):
    """The backbone with LoRA and fresh heads, and its prepared tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from rmod_distill.policy import load_tokenizer

    name = cfg.backbone or cfg.policy.model
    tokenizer = load_tokenizer(name)
    if not tokenizer.chat_template:
        raise UserError(f"values.backbone {name!r}: its tokenizer has no chat template, so prompts cannot be "
                         "laid out as the policy sees them; choose a backbone with one (or save one into its folder)")
    torch.manual_seed(cfg.seed)  # before LoRA and the heads are initialised
    base = AutoModel.from_pretrained(resolve_model_path(name), dtype=torch.float32)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    backbone = get_peft_model(base, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear"))
    model = ValueModel(backbone, num_objectives, cfg.head_hidden).to(resolve_device(cfg.policy.device))
    return model, tokenizer, name


def _features(rows: list[dict], tokenizer, names: list[str]) -> list[dict]:
    """Rollouts as value-model examples: prompt and response token ids and the targets.

    The value model's own tokenizer: the backbone may tokenise differently from the policy.
    Rows whose response is empty have no position to regress and are left out.
    """
    out = []
    for r in rows:
        response = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        prompt_ids, _ = encode(tokenizer, r["messages"], [])
        if response:
            out.append({"index": len(out), "prompt_ids": prompt_ids, "response_ids": response,
                        "targets": [r["normalized"][g] for g in names]})
    return out


class TruncatingCollator:
    """Pads a batch of value-model examples, first cutting each response at a random length
    with chance ``truncate_prob`` (augmentation: the model regresses from every prefix length).

    The cut depends only on the seed, the epoch and the example, so a run resumed from a
    checkpoint truncates exactly as an uninterrupted one; :class:`EpochCallback` tells the
    collator the epoch.
    """

    def __init__(self, pad_id: int, truncate_prob: float, seed: int):
        self.pad_id, self.truncate_prob, self.seed, self.epoch = pad_id, truncate_prob, seed, 0

    def __call__(self, features: list[dict]) -> dict:
        seqs, starts = [], []
        for f in features:
            response = f["response_ids"]
            rng = random.Random(f"{self.seed}:{self.epoch}:{f['index']}")
            if len(response) > 1 and rng.random() < self.truncate_prob:
                response = response[: rng.randint(1, len(response))]
            seqs.append(f["prompt_ids"] + response)
            starts.append(len(f["prompt_ids"]))
        ids, mask, response_mask = batch_tensors(self.pad_id, seqs, starts, "cpu")
        targets = torch.tensor([f["targets"] for f in features], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "response_mask": response_mask, "targets": targets}


def _trainer_classes():
    """The Trainer subclass and callback (transformers is imported only when training)."""
    from safetensors.torch import load_file
    from transformers import Trainer, TrainerCallback

    class EpochCallback(TrainerCallback):
        """Tells the collator which epoch it is batching (the Trainer's own count, right after a resume too)."""

        def __init__(self, collator: TruncatingCollator):
            self.collator = collator

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.collator.epoch = int(state.epoch or 0)

    class ValueTrainer(Trainer):
        """``Trainer`` with the CD-FUDGE loss; checkpoints hold only the trained weights (LoRA and heads)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            values = model(inputs["input_ids"], inputs["attention_mask"])
            loss = value_loss(values, inputs["targets"], inputs["response_mask"])
            return (loss, values) if return_outputs else loss

        def _trained_keys(self) -> set[str]:
            return {name for name, p in self.model.named_parameters() if p.requires_grad}

        # The ValueModel is a plain nn.Module, so the Trainer would write its whole state dict
        # (the frozen backbone included) into every checkpoint; only the trained weights are saved.
        def _save(self, output_dir=None, state_dict=None):
            keys = self._trained_keys()
            super()._save(output_dir, {k: v for k, v in self.model.state_dict().items() if k in keys})

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            model = model if model is not None else self.model
            state = load_file(str(Path(resume_from_checkpoint) / "model.safetensors"))
            missing = sorted(self._trained_keys() - set(state))
            unexpected = sorted(set(state) - set(model.state_dict()))
            if missing or unexpected:
                raise UserError(f"{resume_from_checkpoint} does not fit this value model (missing {missing[:2]}, "
                                f"unexpected {unexpected[:2]}); delete the checkpoint-* folders to start again")
            model.load_state_dict(state, strict=False)

    return ValueTrainer, EpochCallback


def evaluate_loss(model: ValueModel, pad_id: int, features: list[dict], batch_size: int) -> np.ndarray:
    """Validation loss per objective (mean over sequences of the per-position squared error)."""
    model.eval()
    totals, count = None, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            ids, mask, response = batch_tensors(
                pad_id, [f["prompt_ids"] + f["response_ids"] for f in chunk], [len(f["prompt_ids"]) for f in chunk],
                device)
            targets = torch.tensor([f["targets"] for f in chunk], device=ids.device)
            err = ((model(ids, mask) - targets[:, None, :]) ** 2) * response[..., None]
            per = (err.sum(1) / response.sum(1, keepdim=True).clamp_min(1)).sum(0).cpu().numpy()
            totals = per if totals is None else totals + per
            count += len(chunk)
    model.train()
    return totals / max(count, 1)


def train(cfg: ValuesConfig, rows: list[dict], names: list[str], out: Path, tracker: Tracker):
    """Train the value model with ``transformers.Trainer``, resuming from the last ``checkpoint-*``
    in ``out``; returns model, tokenizer, backbone name, history and the validation rows."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    model, tokenizer, backbone_name = build_value_model(cfg, len(names))
    train_rows = [r for r in rows if not held_out(r["prompt_id"], cfg.eval_fraction)]
    val_rows = [r for r in rows if held_out(r["prompt_id"], cfg.eval_fraction)]
    if not train_rows or not val_rows:
        raise UserError(f"values: {len(train_rows)} train and {len(val_rows)} validation rollouts; both need rows "
                         f"(eval_fraction {cfg.eval_fraction} of {len(rows)} rollouts): change eval_fraction or "
                         "add prompts")
    train_set, val = _features(train_rows, tokenizer, names), _features(val_rows, tokenizer, names)
    # The model is seeded before LoRA and the heads are made, so this is the same on a resumed run.
    history = {"val_loss_before": evaluate_loss(model, tokenizer.pad_token_id, val, cfg.train_batch_size).tolist()}

    collator = TruncatingCollator(tokenizer.pad_token_id, cfg.truncate_prob, cfg.seed)
    ValueTrainer, EpochCallback = _trainer_classes()
    args = TrainingArguments(
        output_dir=str(out),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.train_batch_size,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a share of the total steps
        max_grad_norm=cfg.max_grad_norm,
        save_strategy="steps",
        save_steps=cfg.checkpoint_steps,
        save_total_limit=1,
        logging_steps=1,
        seed=cfg.seed,
        remove_unused_columns=False,  # the collator reads prompt_ids, response_ids and targets
        use_cpu=resolve_device(cfg.policy.device).type == "cpu",
        dataloader_pin_memory=resolve_device(cfg.policy.device).type != "cpu",  # on a CPU torch warns, pins nothing
        report_to="none" if tracker.mode == "disabled" else ["wandb"],  # into the Tracker's run
    )
    trainer = ValueTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                           callbacks=[EpochCallback(collator)])
    resume = get_last_checkpoint(str(out))
    if resume:
        print(f"values: resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    step = trainer.state.global_step
    history.update(steps=step,
                   val_loss_after=evaluate_loss(model, tokenizer.pad_token_id, val, cfg.train_batch_size).tolist())
    tracker.log({**{f"values/val_loss/{g}": v for g, v in zip(names, history["val_loss_after"])},
                 "train/global_step": step})
    return model.eval(), tokenizer, backbone_name, history, val_rows


def save(model: ValueModel, tokenizer, backbone_name: str, names, normalization: dict, head_hidden: int, out: Path):
    """Write the value model folder."""
    from safetensors.torch import save_file

    model.backbone.save_pretrained(str(out / "backbone"))
    save_file({k: v.contiguous() for k, v in model.heads.state_dict().items()}, str(out / "heads.safetensors"))
    tokenizer.save_pretrained(str(out))
    write_json(out / "value_config.json", {
        "objectives": list(names), "normalization": normalization, "backbone": backbone_name,
        "head_hidden": head_hidden, "tokenizer_fingerprint": policy_fingerprint(backbone_name, tokenizer),
    })


def value_report(values: LearnedValues, objectives: ObjectiveSet, rows: list[dict]) -> dict:
    """Correlation with the final rewards of learned and prefix values at 25/50/75% of responses."""
    report = {}
    names = objectives.names
    final = np.array([[r["normalized"][g] for g in names] for r in rows])
    response_ids = [values.tokenizer(r["completion"], add_special_tokens=False)["input_ids"] for r in rows]
    for frac in (0.25, 0.5, 0.75):
        cut = [ids[: max(1, int(len(ids) * frac))] for ids in response_ids]
        learned = values.score_ids([encode(values.tokenizer, r["messages"], c)[0] for r, c in zip(rows, cut)])
        texts = [values.tokenizer.decode(c, skip_special_tokens=True) for c in cut]
        prefix = objectives.score([r["messages"] for r in rows], texts)[1]
        report[f"{int(frac * 100)}%"] = {
            kind: {g: float(np.corrcoef(v[:, j], final[:, j])[0, 1]) for j, g in enumerate(names)}
            for kind, v in (("learned", learned), ("prefix", prefix))
        }
    return report


@dataclass
class Checked:
    """What :func:`check` read and built, handed to :func:`run`."""

    folder: RunFolder
    objectives: ObjectiveSet


def check(cfg: ValuesConfig, dry_run: bool = False) -> Checked:
    """Every check before the policy loads or output_dir is touched (``--dry-run`` runs the same,
    without building the objectives' models)."""
    folder = RunFolder(cfg.output_dir, "values", to_dict(cfg), cfg.overwrite)
    folder.check()
    read_run(cfg.generate_dir, "generate", "generate_dir")
    norm_path = Path(cfg.generate_dir) / "normalization.json"
    objectives = ObjectiveSet.from_specs(cfg.objectives, load=not dry_run)
    objectives.set_normalizer(Normalizer.load(norm_path), str(norm_path))
    prompts = load_prompts(cfg.prompts)
    if not dry_run:
        objectives.probe(prompts[0].messages)
    for name in cfg.rollouts:
        if not Path(name).is_file():
            raise UserError(f"rollouts: {name} does not exist (expected a generate samples.jsonl or calibration.jsonl)")
        read_jsonl(name)  # a damaged file fails here, naming its line, not after the run folder is made
    cfg.policy.check()
    cfg.policy.check_prompt_lengths(prompts, cfg.decoding.max_new_tokens, cfg.prompts.path)
    cfg.wandb.check()
    from transformers.trainer_utils import SchedulerType

    if cfg.lr_scheduler_type not in {s.value for s in SchedulerType}:
        raise UserError(f"lr_scheduler_type {cfg.lr_scheduler_type!r} is not a transformers scheduler; expected one "
                        f"of {[s.value for s in SchedulerType]}")
    return Checked(folder, objectives)


def run(cfg: ValuesConfig, checked: Checked | None = None) -> Path:
    """Run the values stage (after :func:`check`, unless ``checked`` is its result); returns the value model folder."""
    checked = checked or check(cfg)
    folder, objectives = checked.folder, checked.objectives
    norm_path = Path(cfg.generate_dir) / "normalization.json"
    out = folder.begin()
    old_rollouts = folder.path / "rollouts.jsonl"
    if out != folder.path and old_rollouts.exists() and not (out / "rollouts.jsonl").exists():
        # Overwriting: the rollouts are reused when made with the same rollout recipe.
        for name in ("rollouts.jsonl", "rollouts_recipe.json"):
            if (folder.path / name).exists():
                (out / name).write_bytes((folder.path / name).read_bytes())

    # ------------------------------------------------------------------ rollouts
    rows = sample_rollouts(cfg, objectives, out)

    # ------------------------------------------------------------------ train
    tracker = Tracker(cfg.wandb, f"values-{folder.path.parent.name}", to_dict(cfg), out, "values", cfg.output_dir)
    model, tokenizer, backbone_name, history, val_rows = train(cfg, rows, objectives.names, out, tracker)

    # ------------------------------------------------------------------ save and report
    normalization = read_json(norm_path, "normalisation file")
    save(model, tokenizer, backbone_name, objectives.names, normalization, cfg.head_hidden, out)
    for checkpoint in out.glob("checkpoint-*"):  # resumable state, not part of the value model
        shutil.rmtree(checkpoint)
    values = LearnedValues.load(out, objectives.names, device="cpu")
    report = value_report(values, objectives, val_rows) if len(val_rows) > 2 else {}
    info = dict(history=history, correlations=report, train_rollouts=len(rows) - len(val_rows),
                val_rollouts=len(val_rows))
    write_json(out / "value_report.json", info)
    tracker.summary({f"val_loss/{g}": v for g, v in zip(objectives.names, history["val_loss_after"])})
    tracker.finish()
    out = folder.finish(info)
    before, after = history["val_loss_before"], history["val_loss_after"]
    print("values: validation loss per objective " + ", ".join(
        f"{g} {b:.3f} -> {a:.3f}" for g, b, a in zip(objectives.names, before, after)))
    for frac, kinds in report.items():
        print(f"  at {frac}: " + "; ".join(
            f"{kind} " + ", ".join(f"{g} {c:+.2f}" for g, c in corr.items()) for kind, corr in kinds.items()))
    print(f"values: value model -> {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse the recipe, check it, and run the stage (``--dry-run``: check only)."""
    stage_main(ValuesConfig, argv, check, run)


if __name__ == "__main__":
    main(sys.argv[1:])
