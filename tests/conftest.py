"""Shared fixtures: a tiny Llama policy and tokenizer built in-process, tiny prompt files.

Skip markers and environment for tests live here, in one place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "i the a and to of in is it you that for on with as are be this have not your but can do if or "
    "help good bad kind great calm sorry happy love hate stupid idiot damn thanks please yes no "
    "how what why when tell me my roommate boss raise plan money sleep work home food cat dog tree "
    "sun rain cold warm fix try think feel best worst maybe always never more less simple clear . , ! ?"
).split()
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer():
    """A word-level tokenizer with a ChatML template, built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["user", "assistant", "system", "\n"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        bos_token=None, additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0):
    """A 2-layer Llama with hidden size 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=3, bos_token_id=None, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Larger output weights give peaked, varied next-token distributions instead of uniform noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A saved tiny policy folder (model + tokenizer + chat template)."""
    path = tmp_path_factory.mktemp("tiny-policy")
    tok = build_tiny_tokenizer()
    build_tiny_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_policy(tiny_policy_dir):
    """``(model, tokenizer)`` of the tiny policy, loaded through the project's loader."""
    from rmod_distill.policy import load_policy

    return load_policy(str(tiny_policy_dir), device="cpu")


def run_cli(argv: list[str]) -> int:
    """``rmod-distill ARGV`` in this process; its exit status."""
    from rmod_distill import cli

    try:
        cli.main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch) -> Path:
    """W&B offline without a login, every folder it writes (and the temporary folder) under
    ``tmp_path/home``, the W&B variables distill sets for its Trainers unset after the test."""
    import tempfile

    home = tmp_path / "home"
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_ARTIFACT_DIR", "artifacts"), ("TMPDIR", "tmp")):
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setattr(tempfile, "tempdir", str(home / "tmp"))
    monkeypatch.delenv("WANDB_MODE", raising=False)  # W&B is disabled for the other tests; these runs are offline
    for var in ("WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return home


def write_prompts(path: Path, n_train: int = 6, n_eval: int = 3) -> Path:
    """A small prompt file in the shipped format."""
    texts = [
        "how do i tell my roommate to fix the plan ?", "what is a good way to ask my boss for a raise ?",
        "tell me why my cat is always cold", "my work is stupid , help", "how can i sleep more ?",
        "what do you think about money and love ?", "tell me a kind thing", "why is the sun warm ?",
        "help me fix my home", "what is the best food for a dog ?", "tell me a calm plan",
        "how do i say sorry to my boss ?",
    ]
    rows = []
    for i in range(n_train + n_eval):
        rows.append({"id": f"p{i:02d}", "prompt": texts[i % len(texts)], "category": "test",
                     "split": "train" if i < n_train else "eval"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    """Six train and three eval prompts."""
    return write_prompts(tmp_path / "prompts.jsonl")


@pytest.fixture(scope="session")
def tiny_generate_dir(tiny_policy_dir, tmp_path_factory) -> Path:
    """A finished generate run of the tiny policy (rmod and reference rows on 12 prompts)."""
    from rmod_distill.config import parse_config
    from rmod_distill.generate import GenerateConfig, run

    root = tmp_path_factory.mktemp("tiny-generate")
    prompts = write_prompts(root / "prompts.jsonl", n_train=12, n_eval=4)
    return run(parse_config(GenerateConfig, [
        "--policy.model", str(tiny_policy_dir), "--prompts.path", str(prompts),
        "--objectives", "[{name: harmlessness}, {name: concision}]", "--methods", "[reference, rmod]",
        "--decoding.num_candidates", "2", "--decoding.block_size", "4", "--decoding.max_new_tokens", "8",
        "--normalization_prompts", "4", "--output_dir", str(root / "generate"),
    ]))


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="session")
def server_url(tmp_path_factory):
    """The URL of one vLLM server on the embedded policy for the whole session (``-m vllm`` tests).

    Set ``RMOD_DISTILL_VLLM_URL`` to reuse a running server of the same kind while developing.
    """
    if os.environ.get("RMOD_DISTILL_VLLM_URL"):
        yield os.environ["RMOD_DISTILL_VLLM_URL"]
        return
    from rmod_distill.engine.vllm import BackendConfig, VLLMServer
    from rmod_distill.policy import embedded_model_path

    assert VLLM_PYTHON.exists(), "no .venv-vllm: run `make vllm-env` (make test-vllm does)"
    cfg = BackendConfig(kind="vllm", launch=True, python=str(VLLM_PYTHON), max_model_len=1024)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    # The tests' OMP_NUM_THREADS=1 is for torch in this process; the server uses both cores.
    threads = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        server = VLLMServer(str(embedded_model_path()), cfg, "float32", log)
        server.start()
    finally:
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = threads
    try:
        yield server.url
    finally:
        server.stop()
