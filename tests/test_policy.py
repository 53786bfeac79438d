"""Policy loading: tokenizer preparation, adapters, and the real embedded default (slow)."""

import pytest
import torch

from rmod_distill.errors import UserError
from rmod_distill.policy import load_policy, prepare_tokenizer, resolve_dtype, stop_token_ids


def test_tiny_policy_is_prepared(tiny_policy):
    model, tok = tiny_policy
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert stop_token_ids(tok) == [tok.eos_token_id]
    assert not model.training


def test_pad_equal_to_eos_is_replaced(tiny_policy):
    _, tok = tiny_policy
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    prepare_tokenizer(tok)
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"


def test_dtype_auto():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_lora_adapter_on_top(tiny_policy_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tok = load_policy(str(tiny_policy_dir), device="cpu")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    model, _ = load_policy(str(tiny_policy_dir), device="cpu", adapter=str(tmp_path / "adapter"))
    ids = tok("how do i fix my plan ?", return_tensors="pt")["input_ids"]
    plain, _ = load_policy(str(tiny_policy_dir), device="cpu")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, peft_model(ids).logits, atol=1e-5)
        assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-3)
    with pytest.raises(UserError, match="missing adapter_config.json"):
        load_policy(str(tiny_policy_dir), device="cpu", adapter=str(tmp_path))


@pytest.mark.slow
def test_embedded_default_loads_and_scores():
    """The README's snippet: the embedded policy and all default objectives, no downloads."""
    from rmod_distill.objectives import default_objectives
    from rmod_distill.objectives import ObjectiveSet

    model, tok = load_policy("embedded")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert len(tok) == model.get_input_embeddings().num_embeddings  # no new tokens were added
    messages = [{"role": "user", "content": "How do I fix a flat bike tire?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(answer.split()) >= 3
    raw = ObjectiveSet.from_specs(default_objectives()).raw([messages], [answer])
    assert raw.shape == (1, 4) and (raw[0, :3] > -1).all()
