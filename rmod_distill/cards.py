"""The distilled adapter's model card (``README.md``), from a template file.

Distill writes it from the adapter's ``run.json``; eval writes it again with the worst-case
figures it measured (in the card's text and as ``model-index`` results), from the same
template and the same ``run.json``, so no stage edits another's text.
"""

from __future__ import annotations

from pathlib import Path

from rmod_distill.artifacts import is_local_path
from rmod_distill.policy import base_model_name

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
SHOWN_RESULTS = ("train_loss", "eval_loss", "eval_mean_token_accuracy", "train_rows", "dpo_pairs", "dpo_train_loss",
                 "dpo_eval_rewards/accuracies", "dpo_held_out_worst_case", "grpo_reward_first", "grpo_reward_last",
                 "grpo_kl_last")
TRAINERS = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer"}


def _steps(cfg: dict) -> tuple[list[str], list[str]]:
    """The training chain that ran (``objective``, e.g. ``sft+dpo+grpo``): one line per step with its
    settings, and the steps' names (the card's tags)."""
    chain = [s for s in str(cfg.get("objective", "sft")).split("+") if s in TRAINERS]
    lr, epochs = cfg["learning_rate"], cfg["num_train_epochs"]
    lines = []
    for step in chain:
        if step == "sft":
            lines.append(f"SFT (TRL's SFTTrainer) on RMOD's answers, completion-only loss: lr {lr}, epochs {epochs}")
        elif step == "dpo":
            lines.append(f"DPO (TRL's DPOTrainer), RMOD's answer over the reference policy's (pairs "
                         f"{cfg.get('pairs')}): beta {cfg.get('dpo_beta')}, lr {cfg.get('dpo_learning_rate') or lr}, "
                         f"epochs {cfg.get('dpo_epochs') or epochs}, {cfg.get('dpo_restarts', 1)} seed(s), the best "
                         "kept on held-out train prompts")
        else:
            lines.append(f"GRPO (TRL's GRPOTrainer) on the student's own samples, rewarded by their worst-case "
                         f"objective: beta {cfg.get('grpo_beta')}, lr {cfg.get('grpo_learning_rate') or lr}, epochs "
                         f"{cfg.get('grpo_epochs') or epochs}, {cfg.get('grpo_num_generations')} samples a prompt")
    return lines, chain


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a hub model id (``org/name`` or ``name``), not a local folder."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if is_local_path(name) or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _eval_table(metrics: dict) -> str:
    lines = ["| method | worst-case reward | tokens sampled / response | s / response |", "|---|---|---|---|"]
    for method in ("distilled", "rmod", "reference"):
        if method in metrics:
            m = metrics[method]
            lo, hi = m["worst_case_reward_ci"]
            lines.append(f"| `{method}` | {m['worst_case_reward']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                         f"{m['tokens_sampled_per_response']:.0f} | {m['seconds_per_response']:.2f} |")
    return "\n".join(lines)


def _model_section(cfg: dict) -> dict:
    """The distill recipe's ``model:`` section (TRL's ModelConfig keys). Adapters made before
    that section existed kept ``model`` and the ``lora_*`` keys at the top level."""
    if isinstance(cfg["model"], dict):
        return cfg["model"]
    lora = {k: cfg[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")}
    return {"model_name_or_path": cfg["model"], **lora}


def adapter_card(info: dict, eval_metrics: dict | None = None, eval_report: str | None = None,
                 eval_prompts: str | None = None):
    """A ``huggingface_hub.ModelCard`` for the adapter whose distill ``run.json`` is ``info``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    cfg = info["config"]
    model = _model_section(cfg)
    base = base_model_name(model["model_name_or_path"])
    results = []
    if eval_metrics:
        for method in ("distilled", "rmod", "reference"):
            if method in eval_metrics:
                results.append(EvalResult(
                    task_type="text-generation", dataset_type="rmod-distill-prompts",
                    dataset_name=eval_prompts or "held-out prompts", dataset_split="eval",
                    metric_type="worst_case_reward", metric_name=f"worst-case reward ({method})",
                    metric_value=round(eval_metrics[method]["worst_case_reward"], 4),
                ))
    steps, chain = _steps(cfg)
    data = ModelCardData(
        # base_model only for a hub id: the hub refuses a local path there
        library_name="peft", base_model=base if is_hub_id(base) else None,
        tags=["rmod", "robust-multi-objective-decoding", "lora", "trl", *chain],
        model_name=f"rmod-distilled-{Path(cfg['output_dir']).name}" if results else None,
        eval_results=results or None,
    )
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE), base_model=base, model=model["model_name_or_path"],
        generate_dir=cfg["generate_dir"], methods=cfg["methods"], min_worst_case=cfg["min_worst_case"],
        objectives=", ".join(info.get("objectives") or []) or "n/a", decoding=info.get("decoding", {}),
        train_rows=info["rows"]["train"], eval_rows=info["rows"]["held_out"],
        lora={"r": model["lora_r"], "alpha": model["lora_alpha"], "dropout": model["lora_dropout"],
              "modules": model["lora_target_modules"]},
        chain=", then ".join(f"{s.upper()} ({TRAINERS[s]})" for s in chain), steps=steps,
        training={"batch": cfg["per_device_train_batch_size"], "accumulation": cfg["gradient_accumulation_steps"],
                  "max_length": cfg["max_length"]},
        results={k: info["metrics"][k] for k in SHOWN_RESULTS if k in info["metrics"]},
        eval_table=_eval_table(eval_metrics) if eval_metrics else None,
        eval_prompts=eval_metrics["distilled"]["prompts"] if eval_metrics and "distilled" in eval_metrics else None,
        eval_report=eval_report,
    )
