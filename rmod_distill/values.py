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

import json
import math
import random
import shutil
from collections import Counter
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rmod_distill.artifacts import atomic_write_text, provenance, read_jsonl, write_json
from rmod_distill.config import parse_config, to_dict
from rmod_distill.decoding import DecodingConfig
from rmod_distill.objectives import Normalizer, ObjectiveSet, ObjectiveSpec
from rmod_distill.policy import PolicyConfig, policy_fingerprint, resolve_device, resolve_model_path
from rmod_distill.prompts import Prompt, PromptsConfig, base_prompt_id, load_prompts
from rmod_distill.tracking import Tracker, WandbConfig


def _default_objectives():
    from rmod_distill.generate import default_objectives

    return default_objectives()


@dataclass
class ValuesConfig:
    """Recipe of the values stage."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    backbone: str | None = field(
        default=None, metadata={"help": "Value model backbone: a causal LM or classifier id/path (null: the policy)."}
    )
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    objectives: list[ObjectiveSpec] = field(default_factory=_default_objectives)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
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


class ValueModel(nn.Module):
    """A backbone (with LoRA) and one value head per objective: values for every prefix."""

    def __init__(self, backbone: nn.Module, num_objectives: int, head_hidden: int = 0):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size if hasattr(backbone.config, "hidden_size") else backbone.config.n_embd
        if head_hidden:
            self.heads = nn.Sequential(nn.Linear(hidden, head_hidden), nn.GELU(), nn.Linear(head_hidden, num_objectives))
        else:
            self.heads = nn.Linear(hidden, num_objectives)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values ``[batch, seq, G]``: position t holds the value of the prefix ending at token t."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.heads(out.last_hidden_state.float())

    def step(self, input_ids, attention_mask, position_ids, cache):
        """Values ``[batch, new, G]`` of new tokens on top of ``cache`` (the full mask), and the cache."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True)
        return self.heads(out.last_hidden_state.float()), out.past_key_values


class ValueCache:
    """The value model's KV cache over the prompts and accepted blocks of a decode.

    Mirrors the policy's cache in the blockwise engine: each block it is expanded K ways,
    the candidates' tokens are read in one forward pass, and the chosen rows are kept, so
    a prefix is never encoded twice.
    """

    def __init__(self, model: ValueModel, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from transformers import DynamicCache

        self.model = model
        self.device = next(model.parameters()).device
        mask = attention_mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        values, self.cache = model.step(input_ids.to(self.device), mask, pos, DynamicCache())
        self.mask, self.next_pos, self.last = mask, pos[:, -1] + 1, values[:, -1]

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor, K: int) -> np.ndarray:
        """Values ``[rows * K, G]`` after each row's first ``lengths`` tokens of ``tokens [rows * K, S]``."""
        if K > 1:
            self.cache.batch_repeat_interleave(K)
            self.mask, self.next_pos, self.last = (t.repeat_interleave(K, 0) for t in (self.mask, self.next_pos, self.last))
        steps = tokens.shape[1]
        lengths = lengths.to(self.device)
        valid = (torch.arange(steps, device=self.device)[None, :] < lengths[:, None]).to(self.mask.dtype)
        self.mask = torch.cat([self.mask, valid], dim=1)
        pos = self.next_pos[:, None] + torch.arange(steps, device=self.device)[None, :]
        values, self.cache = self.model.step(tokens.to(self.device), self.mask, pos, self.cache)
        picked = values[torch.arange(len(lengths), device=self.device), (lengths - 1).clamp_min(0)]
        # A candidate with no text (it stopped at once) keeps the value of its prefix.
        self.last = torch.where((lengths > 0)[:, None], picked, self.last)
        # Positions count real tokens only, as the full re-encoding's do (masked slots are skipped).
        self.next_pos = self.next_pos + lengths
        return self.last.double().cpu().numpy()

    def keep(self, rows: list[int]) -> None:
        """Keep these rows (the chosen, still running candidates) for the next block."""
        idx = torch.tensor(rows, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_pos, self.last = self.mask[idx], self.next_pos[idx], self.last[idx]


def value_loss(values: torch.Tensor, targets: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo regression (CD-FUDGE): per sequence, the mean over response positions of the
    summed squared error over objectives; then the mean over sequences. Shapes: ``[B, T, G]``,
    ``[B, G]``, ``[B, T]`` (1 on response tokens, 0 on prompt and padding)."""
    err = ((values - targets[:, None, :]) ** 2).sum(-1) * response_mask
    per_sequence = err.sum(-1) / response_mask.sum(-1).clamp_min(1)
    return per_sequence.mean()


def _encode(tokenizer, conversation: list[dict], response_ids: list[int]) -> tuple[list[int], int]:
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, len(prompt_ids)


def _batch(tokenizer, sequences: list[list[int]], starts: list[int], device) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, attention mask and response mask.

    The response mask covers every prefix of the response, the empty one included: the
    value read at the last prompt token is what a candidate that stops at once is scored by.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.float32)
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        pad = width - len(seq)
        ids[i, pad:] = torch.tensor(seq)
        mask[i, pad:] = 1
        response[i, pad + max(start - 1, 0):] = 1
    return ids.to(device), mask.to(device), response.to(device)


class LearnedValues:
    """A trained value model used as RMOD's value function (``decoding.values: learned``)."""

    def __init__(self, model: ValueModel, tokenizer, names: list[str], normalization: dict, path: Path):
        self.model, self.tokenizer, self.names, self.normalization, self.path = model, tokenizer, names, normalization, path
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, path: str | Path, objectives: list[str], device: str = "auto") -> "LearnedValues":
        """Load a saved value model; refuse one built for other objectives (or in another order)."""
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        cfg_path = path / "value_config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"value model {path}: no value_config.json (train one with `make values`)")
        info = json.loads(cfg_path.read_text())
        if info["objectives"] != list(objectives):
            raise ValueError(
                f"value model {path} was trained for objectives {info['objectives']}, but the recipe has "
                f"{list(objectives)}; train a value model for these objectives"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        if policy_fingerprint(info["backbone"], tokenizer) != info["tokenizer_fingerprint"]:
            raise ValueError(f"value model {path}: its tokenizer files do not match the tokenizer it was trained with")
        tokenizer.padding_side = "left"
        torch_device = resolve_device(device)
        base = AutoModel.from_pretrained(resolve_model_path(info["backbone"]), dtype=torch.float32)
        if len(tokenizer) > base.get_input_embeddings().num_embeddings:
            base.resize_token_embeddings(len(tokenizer))
        backbone = PeftModel.from_pretrained(base, str(path / "backbone"))
        model = ValueModel(backbone, len(info["objectives"]), info["head_hidden"])
        model.heads.load_state_dict(load_file(str(path / "heads.safetensors")))
        return cls(model.to(torch_device).eval(), tokenizer, info["objectives"], info["normalization"], path)

    def check_tokenizer(self, tokenizer, source: str) -> None:
        """Refuse pairing with a tokenizer other than the value model's own."""
        if policy_fingerprint("", tokenizer)["vocab_sha256"] != policy_fingerprint("", self.tokenizer)["vocab_sha256"]:
            raise ValueError(f"{source}: value model {self.path} was trained with another tokenizer")

    def shares_tokenizer(self, tokenizer) -> bool:
        """True when the policy's token ids can be fed to the value model directly."""
        a, b = policy_fingerprint("", tokenizer), policy_fingerprint("", self.tokenizer)
        return a["vocab_sha256"] == b["vocab_sha256"] and a["chat_template_sha256"] == b["chat_template_sha256"]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ValueCache:
        """Start a :class:`ValueCache` on left-padded prompt ids (the policy's own tokens)."""
        return ValueCache(self.model, input_ids, attention_mask)

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], batch_size: int = 32) -> np.ndarray:
        """Values ``[n, G]`` of full token sequences (prompt + partial response), read at the last token."""
        out = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            ids, mask, _ = _batch(self.tokenizer, chunk, [0] * len(chunk), self.device)
            out.append(self.model(ids, mask)[:, -1].double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.names)))

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> np.ndarray:
        """The text route: re-tokenise with the value model's own tokenizer and chat template."""
        sequences = [
            _encode(self.tokenizer, p, self.tokenizer(r, add_special_tokens=False)["input_ids"])[0]
            for p, r in zip(prompts, responses)
        ]
        return self.score_ids(sequences)


# ----------------------------------------------------------------------------- the stage


def _held_out(prompt_id: str, fraction: float, seed: int) -> bool:
    return random.Random(f"{seed}:{base_prompt_id(prompt_id)}").random() < fraction


def _renormalise(rows: list[dict], objectives: ObjectiveSet, path: Path) -> list[dict]:
    """Targets from the raw rewards with this run's normalisation; refuse rows of other objectives."""
    for r in rows:
        missing = [g for g in objectives.names if g not in r.get("rewards", {})]
        if missing:
            raise ValueError(f"{path}: row {r['prompt_id']!r} has no reward for objective {missing[0]!r}; "
                             "use rollouts made with this recipe's objectives")
        raw = np.array([r["rewards"][g] for g in objectives.names])
        r["normalized"] = dict(zip(objectives.names, map(float, objectives.normalizer(raw))))
    return rows


def reused_rollouts(files: list[str], objectives: ObjectiveSet, prompt_ids: set[str]) -> list[dict]:
    """``reference`` rows of earlier generate output on the recipe's prompts, re-normalised."""
    rows = []
    for name in files:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"rollouts: {path} does not exist (expected a generate samples.jsonl or "
                                    "calibration.jsonl)")
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
    if path.exists() and recipe_path.exists() and json.loads(recipe_path.read_text()) == _rollout_recipe(cfg):
        print(f"values: reusing the rollouts in {path}")
        return _renormalise(read_jsonl(path), objectives, path)
    from tqdm.auto import tqdm

    from rmod_distill.decoding import BlockwiseDecoder
    from rmod_distill.generate import decode_rows

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
        model, tokenizer = cfg.policy.load()
        decoder = BlockwiseDecoder(model, tokenizer, cfg.decoding, None, objectives.names)
        bar = tqdm(total=len(todo), desc=f"rollouts (reference; {len(reused)} reused)", unit="resp")
        rows += decode_rows(decoder, objectives, todo, "reference", cfg.seed, cfg.batch_size,
                            lambda r: bar.update(len(r)))
        bar.close()
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
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
        raise ValueError(f"values.backbone {name!r}: its tokenizer has no chat template, so prompts cannot be "
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
        seq, start = _encode(tokenizer, r["messages"], response)
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
            ids, mask, response = _batch(tokenizer, [c[0] for c in chunk], [c[1] for c in chunk], device)
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
    train_rows = [r for r in rows if not _held_out(r["prompt_id"], cfg.eval_fraction, cfg.seed)]
    val_rows = [r for r in rows if _held_out(r["prompt_id"], cfg.eval_fraction, cfg.seed)]
    if not train_rows or not val_rows:
        raise ValueError(f"values: {len(train_rows)} train and {len(val_rows)} validation rollouts; both need rows "
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
            raise ValueError(f"{ckpt} was saved by a run with another recipe ({state.get('recipe')}); rerun with "
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
        ids, mask, response = _batch(tokenizer, [c[0] for c in chunk], [c[1] for c in chunk], next(model.parameters()).device)
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
        learned = values.score_ids([_encode(values.tokenizer, r["messages"], c)[0] for r, c in zip(rows, cut)])
        texts = [values.tokenizer.decode(c, skip_special_tokens=True) for c in cut]
        prefix = objectives.score([r["messages"] for r in rows], texts)[1]
        report[f"{int(frac * 100)}%"] = {
            kind: {g: float(np.corrcoef(v[:, j], final[:, j])[0, 1]) for j, g in enumerate(names)}
            for kind, v in (("learned", learned), ("prefix", prefix))
        }
    return report


def run(cfg: ValuesConfig) -> Path:
    """Run the values stage; returns the value model folder."""
    out = Path(cfg.output_dir)
    # The report is written last: a folder without one holds an unfinished run, which resumes.
    finished = (out / "value_report.json").exists()
    if finished and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds a value model; pass --overwrite or set output_dir")
    norm_path = Path(cfg.generate_dir) / "normalization.json"
    objectives = ObjectiveSet.from_specs(cfg.objectives)
    objectives.set_normalizer(Normalizer.load(norm_path), str(norm_path))
    load_prompts(cfg.prompts)  # a bad prompt file fails before anything is replaced
    if finished:
        # rollouts.jsonl stays: it is reused only if made with the same rollout recipe.
        for name in ("backbone", "heads.safetensors", "value_config.json", "value_report.json", "checkpoint.pt"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ rollouts
    rows = sample_rollouts(cfg, objectives, out)

    # ------------------------------------------------------------------ train
    tracker = Tracker(cfg.wandb, f"values-{out.parent.name}", to_dict(cfg), out, "values")
    model, tokenizer, backbone_name, history, val_rows = train(cfg, rows, objectives.names, out, tracker)

    # ------------------------------------------------------------------ save and report
    normalization = json.loads(norm_path.read_text())
    save(model, tokenizer, backbone_name, objectives.names, normalization, cfg.head_hidden, out)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    values = LearnedValues.load(out, objectives.names, device="cpu")
    report = value_report(values, objectives, val_rows) if len(val_rows) > 2 else {}
    write_json(out / "value_report.json", dict(provenance(to_dict(cfg)), history=history, correlations=report,
                                               train_rollouts=len(rows) - len(val_rows), val_rollouts=len(val_rows)))
    tracker.summary({f"val_loss/{g}": v for g, v in zip(objectives.names, history["val_loss_after"])})
    tracker.finish()
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
