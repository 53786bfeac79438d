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

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig
from trl import SFTConfig

from rmod_distill.adapters import MANIFEST, PORTABLE_FILES, check_adapter_folder
from rmod_distill.artifacts import RunFolder, atomic_write_text, provenance, read_json, write_jsonl
from rmod_distill.cards import adapter_card
from rmod_distill.config import parse_config, to_dict
from rmod_distill.engine.decoding import BlockwiseDecoder, DecodingConfig, prompt_seed
from rmod_distill.engine.runs import process_state
from rmod_distill.errors import UserError
from rmod_distill.policy import PolicyConfig, policy_fingerprint
from rmod_distill.prompts import base_prompt_id, held_out
from rmod_distill.tracking import WandbConfig


@dataclass
class DistillConfig(SFTConfig):
    """TRL's ``SFTConfig`` plus what distillation adds: the data source, filtering, LoRA and W&B."""

    model: str = field(default="embedded", metadata={"help": "Base policy (must be the one that generated the data)."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16"})
    generate_dir: str = field(
        default="runs/default/generate", metadata={"help": "Output folder of the generate stage to learn from."}
    )
    methods: list[str] = field(default_factory=lambda: ["rmod"], metadata={"help": "Methods whose rows are trained on."})
    min_worst_case: float | None = field(
        default=None, metadata={"help": "Keep only rows whose normalised worst-case reward is at least this."}
    )
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of prompts held out for eval loss."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={"help": "Modules given adapters."}
    )
    sample_prompts: int = field(default=8, metadata={"help": "Held-out prompts sampled after training for the card."})
    wandb: WandbConfig = field(
        default_factory=WandbConfig,
        metadata={"help": "W&B section, as in the other stages; logging goes through the Trainer's integration."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished adapter in output_dir."})

    def __post_init__(self):
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if isinstance(self.wandb, dict):
            self.wandb = WandbConfig(**self.wandb)
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


def check_generate_dir(cfg: DistillConfig) -> dict:
    """The generate run's ``run.json``, checked (complete, with the recipe's methods) before any model loads."""
    gen = Path(cfg.generate_dir)
    if not gen.is_dir():
        raise UserError(f"generate_dir {gen} does not exist; run `rmod-distill generate` first (or fix the path)")
    if not (gen / "run.json").is_file():
        raise UserError(f"generate_dir {gen}: no run.json there; run `make generate` first (or fix the path)")
    info = read_json(gen / "run.json", "generate run marker")
    if info.get("stage", "generate") != "generate" or not info.get("complete"):
        raise UserError(f"generate_dir {gen}: not a complete generate run; rerun generate to complete it")
    available = info.get("config", {}).get("methods", [])
    missing = [m for m in cfg.methods if m not in available]
    if missing:
        raise UserError(f"generate_dir {gen}: no rows for method {missing[0]!r} (methods there: {available})")
    if not (gen / "dataset").is_dir():
        raise UserError(f"generate_dir {gen}: no dataset/ folder; the run is damaged, rerun generate with --overwrite")
    _read_dataset(gen, keep_in_memory=False)  # a damaged dataset fails here, before the model loads
    return info


def _read_dataset(gen: Path, keep_in_memory: bool):
    import datasets

    try:
        # In memory: nothing (no cache-*.arrow) is written into the generate run's folder.
        return datasets.load_from_disk(str(gen / "dataset"), keep_in_memory=keep_in_memory)
    except Exception as exc:  # datasets raises several types for a damaged folder
        message = " ".join(str(exc).split())[:200]
        raise UserError(f"generate_dir {gen}/dataset could not be read ({type(exc).__name__}: {message}); "
                        "rerun generate with --overwrite") from None


def load_generated(cfg: DistillConfig, tokenizer, info: dict):
    """The generate run's dataset, checked against the policy, filtered, split into train/held-out."""
    gen = Path(cfg.generate_dir)
    made_with = info.get("policy_fingerprint")
    mine = policy_fingerprint(cfg.model, tokenizer)
    if made_with is not None:
        differs = [k for k in ("vocab_size", "vocab_sha256", "chat_template_sha256") if made_with.get(k) != mine[k]]
        if made_with.get("model") != cfg.model or differs:
            raise UserError(
                f"generate_dir {gen} was made with policy {made_with.get('model')!r}"
                f"{' (different ' + ', '.join(differs) + ')' if differs else ''}; this recipe distills "
                f"{cfg.model!r}: distil into the policy that generated the data"
            )
    ds = _read_dataset(gen, keep_in_memory=True)
    ds = ds.filter(lambda r: r["method"] in cfg.methods, keep_in_memory=True)
    if cfg.min_worst_case is not None:
        ds = ds.filter(lambda r: r["worst_case"] >= cfg.min_worst_case, keep_in_memory=True)
    ds = ds.filter(lambda r: bool(r["completion"][0]["content"].strip()), keep_in_memory=True)
    if len(ds) == 0:
        raise UserError(f"generate_dir {gen}: no rows left after filtering (methods {cfg.methods}, "
                        f"min_worst_case {cfg.min_worst_case})")
    held = ds.filter(lambda r: held_out(r["prompt_id"], cfg.eval_fraction), keep_in_memory=True)
    train = ds.filter(lambda r: not held_out(r["prompt_id"], cfg.eval_fraction), keep_in_memory=True)
    if len(train) == 0:
        raise UserError(f"generate_dir {gen}: every row is held out (eval_fraction {cfg.eval_fraction}); lower it")
    return train, (held if len(held) else None)


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


def run(cfg: DistillConfig) -> Path:
    """Run the distill stage; returns the adapter folder."""
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer

    from rmod_distill.policy import load_policy

    resolved = to_dict(cfg)
    folder = RunFolder(cfg.output_dir, "distill", resolved, cfg.overwrite)
    state = process_state()

    # ------------------------------------------------------------------ check every input first
    folder.check()
    gen_info = check_generate_dir(cfg)
    PolicyConfig(cfg.model, None, cfg.dtype).check()
    cfg.wandb.check()
    state.wait_for_everyone()
    out = folder.begin(state.is_main_process)
    state.wait_for_everyone()
    cfg.output_dir = str(out)  # the Trainer writes checkpoints beside the adapter, in the folder being made
    resume = get_last_checkpoint(str(out)) if out.is_dir() else None
    if "wandb" in cfg.report_to:
        os.environ.setdefault("WANDB_PROJECT", cfg.wandb.project)
        if cfg.wandb.entity:
            os.environ.setdefault("WANDB_ENTITY", cfg.wandb.entity)
        os.environ["WANDB_MODE"] = cfg.wandb.resolved_mode()
        os.environ.setdefault("WANDB_DIR", str(out))

    # ------------------------------------------------------------------ model and data
    device = "cpu" if cfg.use_cpu else "auto"
    model, tokenizer = load_policy(cfg.model, dtype=cfg.dtype, device=device)
    train, held = load_generated(cfg, tokenizer, gen_info)
    print(f"distill: {len(train)} train rows, {len(held) if held else 0} held-out rows from {cfg.generate_dir}")
    peft_config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM",
    )
    keep = ["prompt", "completion"]
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=train.select_columns(keep),
        eval_dataset=held.select_columns(keep) if held is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )

    # ------------------------------------------------------------------ train
    if resume:
        print(f"distill: resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {"train_loss": float(result.training_loss), "train_rows": len(train)}
    if held is not None:
        metrics.update({k: float(v) for k, v in trainer.evaluate().items() if k.startswith("eval_")})

    # ------------------------------------------------------------------ save
    if trainer.is_world_process_zero():
        trainer.save_model(str(out))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return folder.path
    _check_saved_adapter(out)
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
        policy_fingerprint=policy_fingerprint(cfg.model, tokenizer),
        objectives=gen_info.get("objectives"),
    )
    card = adapter_card(dict(provenance(resolved), **info))
    atomic_write_text(out / "README.md", str(card))
    folder.finish(info, swap=False)
    _log_to_wandb(cfg, out, samples, metrics, folder.path.name)
    path = folder.swap()
    if cfg.push_to_hub:
        trainer.push_to_hub()
    print(f"distill: adapter -> {path}  ({', '.join(f'{k} {v:.4g}' for k, v in metrics.items())})")
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
    files = [name for name in PORTABLE_FILES if name != MANIFEST]
    art = wandb.Artifact(f"adapter-{name}", type="model", metadata=metrics)
    for name in files:
        if (out / name).exists():
            art.add_file(str(out / name), name=name)
    run.log_artifact(art)
    # Offline runs cannot be downloaded through the server: keep a hashed copy in the run's files.
    stage_adapter_copy(out, Path(run.dir) / "adapter", files)
    run.finish()



def main(argv: list[str] | None = None) -> None:
    """Parse the recipe and run the stage."""
    run(parse_config(DistillConfig, argv))


if __name__ == "__main__":
    main(sys.argv[1:])
