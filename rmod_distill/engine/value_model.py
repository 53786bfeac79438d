"""The learned value model: one head per objective on a backbone, for every prefix at once.

``ValueModel`` gives values ``[batch, seq, G]`` in one forward pass; ``ValueCache`` keeps
its KV cache beside the policy's in the engine, so each candidate block is read once;
``LearnedValues`` loads a trained model (``make values``) as RMOD's value function.
Hand-written because no library has a multi-head value model with a block-expandable cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from rmod_distill.artifacts import read_json
from rmod_distill.errors import UserError
from rmod_distill.policy import policy_fingerprint, resolve_device, resolve_model_path


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

    def __init__(self, model: ValueModel, prompt_ids: list[list[int]], pad_id: int):
        from transformers import DynamicCache

        self.model = model
        self.device = next(model.parameters()).device
        input_ids, attention_mask, _ = batch_tensors(pad_id, prompt_ids, [0] * len(prompt_ids), self.device)
        mask = attention_mask
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


def encode(tokenizer, conversation: list[dict], response_ids: list[int]) -> tuple[list[int], int]:
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids, len(prompt_ids)


def batch_tensors(pad_id: int, sequences: list[list[int]], starts: list[int], device) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, attention mask and response mask.

    The response mask covers every prefix of the response, the empty one included: the
    value read at the last prompt token is what a candidate that stops at once is scored by.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.float32)
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        pad = width - len(seq)
        ids[i, pad:] = torch.tensor(seq)
        mask[i, pad:] = 1
        response[i, pad + max(start - 1, 0):] = 1
    return ids.to(device), mask.to(device), response.to(device)


def read_value_config(path: str | Path) -> dict:
    """A value model folder's ``value_config.json``, checked before any weights load."""
    path = Path(path)
    if not (path / "value_config.json").is_file():
        raise UserError(f"decoding.value_model {path}: no value_config.json (train one with `make values`)")
    info = read_json(path / "value_config.json", "value model config")
    missing = [k for k in ("objectives", "normalization", "backbone", "head_hidden", "tokenizer_fingerprint")
               if k not in info]
    if missing:
        raise UserError(f"{path}/value_config.json: missing key {missing[0]!r}")
    return info


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
        info = read_value_config(path)
        if info["objectives"] != list(objectives):
            raise UserError(
                f"value model {path} was trained for objectives {info['objectives']}, but the recipe has "
                f"{list(objectives)}; train a value model for these objectives"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        if policy_fingerprint(info["backbone"], tokenizer) != info["tokenizer_fingerprint"]:
            raise UserError(f"value model {path}: its tokenizer files do not match the tokenizer it was trained with")
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
            raise UserError(f"{source}: value model {self.path} was trained with another tokenizer")

    def shares_tokenizer(self, tokenizer) -> bool:
        """True when the policy's token ids can be fed to the value model directly."""
        a, b = policy_fingerprint("", tokenizer), policy_fingerprint("", self.tokenizer)
        return a["vocab_sha256"] == b["vocab_sha256"] and a["chat_template_sha256"] == b["chat_template_sha256"]

    @torch.no_grad()
    def prefill(self, prompt_ids: list[list[int]]) -> ValueCache:
        """Start a :class:`ValueCache` on the prompts' token ids (the policy's own tokens)."""
        return ValueCache(self.model, prompt_ids, self.tokenizer.pad_token_id)

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], batch_size: int = 32) -> np.ndarray:
        """Values ``[n, G]`` of full token sequences (prompt + partial response), read at the last token."""
        out = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            ids, mask, _ = batch_tensors(self.tokenizer.pad_token_id, chunk, [0] * len(chunk), self.device)
            out.append(self.model(ids, mask)[:, -1].double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.names)))

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> np.ndarray:
        """The text route: re-tokenise with the value model's own tokenizer and chat template."""
        sequences = [
            encode(self.tokenizer, p, self.tokenizer(r, add_special_tokens=False)["input_ids"])[0]
            for p, r in zip(prompts, responses)
        ]
        return self.score_ids(sequences)
