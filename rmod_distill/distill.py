"""Stage 2, distill: fine-tune a LoRA adapter on RMOD's outputs with TRL's SFTTrainer.

    rmod-distill distill --config recipes/default/distill.yaml [--key value ...]
    make distill RECIPE=default [ACCELERATE_CONFIG=recipes/accelerate_configs/zero2.yaml]

Reads the generate stage's ``dataset/`` (prompt/completion pairs), keeps the rows of the
chosen methods (default ``rmod``), holds out a slice of prompts for eval loss, and trains
on completion tokens only with the policy's chat template. Writes to ``output_dir``:
the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``), the tokenizer
and chat template, a model card (``README.md``), ``distill_config.json`` (the resolved
recipe and provenance), ``samples.jsonl`` (completions on held-out prompts) and
``checkpoint-*`` folders; a killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import SFTConfig

from rmod_distill.artifacts import provenance, read_jsonl, write_json
from rmod_distill.config import parse_config, to_dict
from rmod_distill.hub import CARD_PLACEHOLDER, check_adapter_folder
from rmod_distill.policy import base_model_name, policy_fingerprint
from rmod_distill.prompts import base_prompt_id


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
    wandb_mode: str = field(default="auto", metadata={"help": "auto | online | offline | disabled"})
    wandb_project: str = field(default="rmod-distill", metadata={"help": "W&B project."})
    wandb_entity: str | None = field(default=None, metadata={"help": "W&B entity."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished adapter in output_dir."})

    def __post_init__(self):
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"wandb_mode must be auto, online, offline or disabled, got {self.wandb_mode!r}")
        from rmod_distill.tracking import WandbConfig

        mode = WandbConfig(self.wandb_mode).resolved_mode()
        # W&B logging goes through the Trainer's own integration.
        self.report_to = [] if mode == "disabled" else ["wandb"]
        super().__post_init__()


def _held_out(prompt_id: str, fraction: float) -> bool:
    """A stable split by prompt (every sample of a prompt on one side), independent of row order."""
    h = int.from_bytes(hashlib.sha256(base_prompt_id(prompt_id).encode()).digest()[:8], "little")
    return (h % 10_000) < fraction * 10_000


def load_generated(cfg: DistillConfig, tokenizer):
    """The generate run's dataset, checked against the policy, filtered, split into train/eval."""
    import datasets

    gen = Path(cfg.generate_dir)
    run_json = gen / "run.json"
    if not run_json.exists():
        raise FileNotFoundError(f"generate_dir {gen}: no run.json; run `make generate` first")
    info = json.loads(run_json.read_text())
    if not info.get("complete"):
        raise ValueError(f"generate_dir {gen}: the generate run is unfinished; rerun it to complete")
    made_with = info.get("policy_fingerprint")
    mine = policy_fingerprint(cfg.model, tokenizer)
    if made_with is not None:
        differs = [k for k in ("vocab_size", "vocab_sha256", "chat_template_sha256") if made_with.get(k) != mine[k]]
        if made_with.get("model") != cfg.model or differs:
            raise ValueError(
                f"generate_dir {gen} was made with policy {made_with.get('model')!r}"
                f"{' (different ' + ', '.join(differs) + ')' if differs else ''}; this recipe distills "
                f"{cfg.model!r}: distil into the policy that generated the data"
            )
    ds = datasets.load_from_disk(str(gen / "dataset"))
    available = sorted(set(ds["method"]))
    missing = [m for m in cfg.methods if m not in available]
    if missing:
        raise ValueError(f"generate_dir {gen}: no rows for method {missing[0]!r} (methods there: {available})")
    ds = ds.filter(lambda r: r["method"] in cfg.methods)
    if cfg.min_worst_case is not None:
        ds = ds.filter(lambda r: r["worst_case"] >= cfg.min_worst_case)
    ds = ds.filter(lambda r: bool(r["completion"][0]["content"].strip()))
    if len(ds) == 0:
        raise ValueError(f"generate_dir {gen}: no rows left after filtering (methods {cfg.methods}, "
                         f"min_worst_case {cfg.min_worst_case})")
    held = ds.filter(lambda r: _held_out(r["prompt_id"], cfg.eval_fraction))
    train = ds.filter(lambda r: not _held_out(r["prompt_id"], cfg.eval_fraction))
    return train, (held if len(held) else None), info


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


def model_card(cfg: DistillConfig, gen_info: dict, train_rows: int, eval_rows: int, metrics: dict) -> str:
    """The adapter's README.md."""
    objectives = gen_info.get("objectives", [])
    decoding = gen_info.get("config", {}).get("decoding", {})
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base_model_name(cfg.model)}",
        "tags: [rmod, robust-multi-objective-decoding, lora, trl, sft]",
        "---",
        "",
        f"# RMOD-distilled LoRA adapter for `{base_model_name(cfg.model)}`",
        "",
        "Fine-tuned with TRL's SFTTrainer on responses chosen by Robust Multi-Objective Decoding",
        "(RMOD; Son et al., arXiv 2503.08796), so that one plain sample behaves like RMOD's",
        "K-candidate blockwise search. Made with rmod-distill.",
        "",
        "## Data",
        f"- Generate run: `{cfg.generate_dir}` (methods {cfg.methods}, min worst-case {cfg.min_worst_case})",
        f"- Objectives (worst case lifted): {', '.join(objectives) or 'n/a'}",
        f"- Decoding: K={decoding.get('num_candidates')}, B={decoding.get('block_size')}, "
        f"lambda={decoding.get('lam')}, solver={decoding.get('solver')}, max_new_tokens={decoding.get('max_new_tokens')}",
        f"- Rows: {train_rows} train, {eval_rows} held out (by prompt id)",
        "",
        "## Training",
        f"- LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout={cfg.lora_dropout}, modules {cfg.lora_target_modules}",
        f"- lr {cfg.learning_rate}, epochs {cfg.num_train_epochs}, batch {cfg.per_device_train_batch_size} x "
        f"{cfg.gradient_accumulation_steps} accumulation, completion-only loss, max_length {cfg.max_length}",
        "",
        "## Results",
    ]
    shown = ("train_loss", "eval_loss", "eval_mean_token_accuracy", "train_rows")
    lines += [f"- {k}: {metrics[k]:.4g}" for k in shown if k in metrics]
    lines += [
        CARD_PLACEHOLDER,
        "",
        "## Use",
        "```python",
        "from rmod_distill.policy import load_policy",
        f"model, tokenizer = load_policy({cfg.model!r}, adapter='PATH/TO/THIS/FOLDER')",
        "```",
        "",
    ]
    return "\n".join(lines)


def sample_completions(model, tokenizer, rows, max_new_tokens: int, seed: int) -> list[dict]:
    """Plain samples from the trained policy on held-out prompts (for the card and W&B)."""
    import torch

    from rmod_distill.decoding import BlockwiseDecoder, DecodingConfig, parse_method, prompt_seed

    if not rows:
        return []
    cfg = DecodingConfig(num_candidates=1, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9)
    decoder = BlockwiseDecoder(model, tokenizer, cfg, None, [])
    model.eval()
    with torch.no_grad():
        results = decoder.decode(
            [r["prompt"] for r in rows], [prompt_seed(seed, r["prompt_id"], "distilled") for r in rows],
            parse_method("reference", [], cfg),
        )
    return [
        {"prompt_id": r["prompt_id"], "prompt": r["prompt"][-1]["content"], "teacher": r["completion"][0]["content"],
         "distilled": res.text}
        for r, res in zip(rows, results)
    ]


def run(cfg: DistillConfig) -> Path:
    """Run the distill stage; returns the adapter folder."""
    from peft import LoraConfig
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer

    from rmod_distill.policy import load_policy

    out = Path(cfg.output_dir)
    # ------------------------------------------------------------------ output folder
    if (out / "distill_config.json").exists() and json.loads((out / "distill_config.json").read_text()).get("complete"):
        if not cfg.overwrite:
            raise FileExistsError(f"{out} already holds a distilled adapter; pass --overwrite or set output_dir")
    resume = get_last_checkpoint(str(out)) if out.is_dir() and not cfg.overwrite else None
    os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
    if cfg.wandb_entity:
        os.environ.setdefault("WANDB_ENTITY", cfg.wandb_entity)
    if cfg.report_to:
        from rmod_distill.tracking import WandbConfig

        os.environ["WANDB_MODE"] = WandbConfig(cfg.wandb_mode).resolved_mode()
        os.environ.setdefault("WANDB_DIR", str(out))
        out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ model and data
    device = "cpu" if cfg.use_cpu else "auto"
    model, tokenizer = load_policy(cfg.model, dtype=cfg.dtype, device=device)
    train, held, gen_info = load_generated(cfg, tokenizer)
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
        return out
    _check_saved_adapter(out)
    tokenizer.save_pretrained(str(out))
    rows = list(held.select(range(min(cfg.sample_prompts, len(held))))) if held is not None else []
    samples = sample_completions(trainer.model, tokenizer, rows, 64, cfg.seed)
    (out / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    (out / "README.md").write_text(model_card(cfg, gen_info, len(train), len(held) if held else 0, metrics))
    info = dict(
        provenance(to_dict(cfg)),
        complete=True,
        metrics=metrics,
        generate_dir=cfg.generate_dir,
        held_out_prompt_ids=sorted(set(map(base_prompt_id, held["prompt_id"]))) if held is not None else [],
        train_prompt_ids=sorted(set(map(base_prompt_id, train["prompt_id"]))),
        policy_fingerprint=policy_fingerprint(cfg.model, tokenizer),
        objectives=gen_info.get("objectives"),
    )
    write_json(out / "distill_config.json", info)
    _log_to_wandb(cfg, out, samples, metrics)
    if cfg.push_to_hub:
        trainer.push_to_hub()
    print(f"distill: adapter -> {out}  ({', '.join(f'{k} {v:.4g}' for k, v in metrics.items())})")
    return out


def _log_to_wandb(cfg: DistillConfig, out: Path, samples: list[dict], metrics: dict) -> None:
    """Samples table, the adapter as a `model` artifact, and a hashed copy for server-free download."""
    if not cfg.report_to:
        return
    import wandb

    from rmod_distill.hub import stage_adapter_copy

    run = wandb.run
    if run is None:
        return
    if samples:
        run.log({"distill/samples": wandb.Table(
            columns=["prompt_id", "prompt", "teacher (RMOD)", "distilled"],
            data=[[s["prompt_id"], s["prompt"], s["teacher"], s["distilled"]] for s in samples])})
    run.summary.update(metrics)
    files = ["adapter_config.json", "adapter_model.safetensors", "README.md", "distill_config.json",
             "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    art = wandb.Artifact(f"adapter-{out.name}", type="model", metadata=metrics)
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
