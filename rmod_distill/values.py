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
   sequence then over the batch; random prefix truncation as augmentation.
3. Saved as ``backbone/`` (PEFT adapter), ``heads.safetensors``, the tokenizer and
   ``value_config.json`` (objectives in order, normalisation, tokenizer fingerprint), so
   generate and eval load it with ``decoding.values: learned`` and ``decoding.value_model``.
4. ``value_report.json``: on held-out rollouts, the correlation of learned and of prefix
   values with the final rewards at 25%, 50% and 75% of each response.
"""

from __future__ import annotations

import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rmod_distill.artifacts import RunFolder, read_json, read_jsonl, write_json, write_jsonl
from rmod_distill.config import parse_config, to_dict
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
    truncate_prob: float = field(default=0.5, metadata={"help": "Chance a response is cut at a random length."})
    eval_fraction: float = field(default=0.15, metadata={"help": "Share of prompts held out for validation."})
    checkpoint_steps: int = field(default=20, metadata={"help": "Save a resumable checkpoint every N steps."})
    seed: int = field(default=0, metadata={"help": "Seed for rollouts, split, shuffling and truncation."})
    output_dir: str = field(default="runs/default/values", metadata={"help": "Where the value model is written."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished value model in output_dir."})
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        if not 0 <= self.truncate_prob <= 1 or not 0 < self.eval_fraction < 1:
            raise ValueError("truncate_prob must be in [0, 1] and eval_fraction in (0, 1)")
        if min(self.rollouts_per_prompt, self.epochs, self.train_batch_size, self.batch_size, self.checkpoint_steps,
               self.lora_r) < 1 or self.head_hidden < 0:
            raise ValueError("rollouts_per_prompt, epochs, train_batch_size, batch_size, checkpoint_steps and lora_r "
                             "must be >= 1, and head_hidden >= 0")
        if self.policy.adapter:
            raise ValueError("policy.adapter: value targets are rewards of the reference policy's rollouts; "
                             "set no adapter in the values recipe")


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


def _examples(rows, tokenizer, names, rng: random.Random | None, truncate_prob: float):
    out = []
    for r in rows:
        # The value model's own tokenizer: the backbone may tokenise differently from the policy.
        response = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        if rng is not None and len(response) > 1 and rng.random() < truncate_prob:
            response = response[: rng.randint(1, len(response))]
        seq, start = encode(tokenizer, r["messages"], response)
        if len(seq) > start:
            out.append((seq, start, [r["normalized"][g] for g in names]))
    return out


def evaluate_loss(model: ValueModel, tokenizer, examples, batch_size: int) -> np.ndarray:
    """Validation loss per objective (mean over sequences of the per-position squared error)."""
    model.eval()
    totals, count = None, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            device = next(model.parameters()).device
            ids, mask, response = batch_tensors(tokenizer.pad_token_id, [c[0] for c in chunk], [c[1] for c in chunk], device)
            targets = torch.tensor([c[2] for c in chunk], device=ids.device)
            err = ((model(ids, mask) - targets[:, None, :]) ** 2) * response[..., None]
            per = (err.sum(1) / response.sum(1, keepdim=True).clamp_min(1)).sum(0).cpu().numpy()
            totals = per if totals is None else totals + per
            count += len(chunk)
    model.train()
    return totals / max(count, 1)


def train(cfg: ValuesConfig, rows: list[dict], names: list[str], out: Path, tracker: Tracker):
    """Train the value model (resumable from ``checkpoint.pt``); returns model, tokenizer, backbone name, history."""
    model, tokenizer, backbone_name = build_value_model(cfg, len(names))
    train_rows = [r for r in rows if not held_out(r["prompt_id"], cfg.eval_fraction)]
    val_rows = [r for r in rows if held_out(r["prompt_id"], cfg.eval_fraction)]
    if not train_rows or not val_rows:
        raise UserError(f"values: {len(train_rows)} train and {len(val_rows)} validation rollouts; both need rows "
                         f"(eval_fraction {cfg.eval_fraction} of {len(rows)} rollouts): change eval_fraction or "
                         "add prompts")
    val = _examples(val_rows, tokenizer, names, None, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.train_batch_size)
    total = steps_per_epoch * cfg.epochs
    step, history = 0, {"val_loss_before": evaluate_loss(model, tokenizer, val, cfg.train_batch_size).tolist()}
    ckpt = out / "checkpoint.pt"
    shape = {k: to_dict(cfg)[k] for k in ("backbone", "policy", "lora_r", "lora_alpha", "head_hidden",
                                          "learning_rate", "epochs", "train_batch_size", "seed")}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("recipe") != shape:
            raise UserError(f"{ckpt} was saved by a run with another recipe ({state.get('recipe')}); rerun with "
                             "that recipe to resume, or delete the checkpoint to start again")
        result = model.load_state_dict(state["model"], strict=False)
        if result.unexpected_keys or any("lora_" in k or k.startswith("heads.") for k in result.missing_keys):
            raise ValueError(f"{ckpt} does not fit this value model (missing {result.missing_keys[:2]}, "
                             f"unexpected {result.unexpected_keys[:2]})")
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        print(f"values: resuming from step {step}")
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc="value model", unit="step")
    model.train()
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        order = list(range(len(train_rows)))
        random.Random(cfg.seed + epoch).shuffle(order)
        batch_rows = [train_rows[i] for i in order[offset * cfg.train_batch_size : (offset + 1) * cfg.train_batch_size]]
        chunk = _examples(batch_rows, tokenizer, names, random.Random(f"{cfg.seed}:{step}"), cfg.truncate_prob)
        ids, mask, response = batch_tensors(tokenizer.pad_token_id, [c[0] for c in chunk], [c[1] for c in chunk], next(model.parameters()).device)
        targets = torch.tensor([c[2] for c in chunk], device=ids.device)
        loss = value_loss(model(ids, mask), targets, response)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        tracker.log({"values/train_loss": loss.item()}, step=step)
        if step % cfg.checkpoint_steps == 0 and step < total:
            trainable = {k: v for k, v in model.state_dict().items() if "lora_" in k or k.startswith("heads.")}
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": trainable, "optimizer": opt.state_dict(), "step": step, "history": history,
                        "recipe": shape}, tmp)
            tmp.replace(ckpt)
    bar.close()
    history["val_loss_after"] = evaluate_loss(model, tokenizer, val, cfg.train_batch_size).tolist()
    tracker.log({f"values/val_loss/{g}": v for g, v in zip(names, history["val_loss_after"])}, step=step)
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


def run(cfg: ValuesConfig) -> Path:
    """Run the values stage; returns the value model folder."""
    folder = RunFolder(cfg.output_dir, "values", to_dict(cfg), cfg.overwrite)

    # ------------------------------------------------------------------ check every input first
    folder.check()
    norm_path = Path(cfg.generate_dir) / "normalization.json"
    objectives = ObjectiveSet.from_specs(cfg.objectives)
    objectives.set_normalizer(Normalizer.load(norm_path), str(norm_path))
    prompts = load_prompts(cfg.prompts)
    objectives.probe(prompts[0].messages)
    for name in cfg.rollouts:
        if not Path(name).is_file():
            raise UserError(f"rollouts: {name} does not exist (expected a generate samples.jsonl or calibration.jsonl)")
    cfg.policy.check()
    cfg.wandb.check()
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
    tracker = Tracker(cfg.wandb, f"values-{folder.path.parent.name}", to_dict(cfg), out, "values")
    model, tokenizer, backbone_name, history, val_rows = train(cfg, rows, objectives.names, out, tracker)

    # ------------------------------------------------------------------ save and report
    normalization = read_json(norm_path, "normalisation file")
    save(model, tokenizer, backbone_name, objectives.names, normalization, cfg.head_hidden, out)
    (out / "checkpoint.pt").unlink(missing_ok=True)
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
    """Parse the recipe and run the stage."""
    run(parse_config(ValuesConfig, argv))


if __name__ == "__main__":
    main(sys.argv[1:])
