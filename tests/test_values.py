"""Learned value functions on the tiny policy: loss masking, training, reload, refusal, RMOD with them."""

import json
import shutil

import numpy as np
import pytest
import torch

from rmod_distill.errors import UserError
from rmod_distill.config import parse_config
from rmod_distill.engine.value_model import LearnedValues, value_loss
from rmod_distill.values import ValuesConfig, run


def test_loss_ignores_prompt_and_padding():
    values = torch.randn(2, 5, 3)
    targets = torch.randn(2, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.float32)
    base = value_loss(values, targets, mask)
    changed = values.clone()
    changed[0, :2] += 100.0  # prompt / padding positions
    changed[1, :3] -= 50.0
    assert torch.equal(value_loss(changed, targets, mask), base)
    # Averaged per sequence then over the batch: a longer response does not weigh more.
    per_seq = [((values[b] - targets[b]) ** 2).sum(-1)[mask[b].bool()].mean() for b in range(2)]
    assert base == pytest.approx(float(sum(per_seq) / 2), rel=1e-6)
    moved = values.clone()
    moved[0, 4] += 1.0
    assert value_loss(moved, targets, mask) != base


def values_args(tiny_policy_dir, tiny_generate_dir, out, *extra):
    return [
        "--policy.model", str(tiny_policy_dir), "--generate_dir", str(tiny_generate_dir),
        "--prompts.path", str(tiny_generate_dir.parent / "prompts.jsonl"),
        "--objectives", "[{name: harmlessness}, {name: concision}]",
        "--decoding.max_new_tokens", "12", "--decoding.temperature", "1.0", "--rollouts_per_prompt", "4",
        "--learning_rate", "3e-3", "--epochs", "3", "--train_batch_size", "8", "--lora_r", "4",
        "--eval_fraction", "0.3", "--wandb.mode", "disabled", "--output_dir", str(out), *extra,
    ]


@pytest.fixture(scope="module")
def value_dir(tiny_policy_dir, tiny_generate_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("values") / "v"
    return run(parse_config(ValuesConfig, values_args(tiny_policy_dir, tiny_generate_dir, out)))


def test_training_lowers_validation_loss(value_dir):
    report = json.loads((value_dir / "value_report.json").read_text())
    before, after = report["history"]["val_loss_before"], report["history"]["val_loss_after"]
    assert sum(after) < sum(before)
    assert set(report["correlations"]["50%"]) == {"learned", "prefix"}
    info = json.loads((value_dir / "value_config.json").read_text())
    assert info["objectives"] == ["harmlessness", "concision"]


def test_reload_gives_identical_outputs(value_dir):
    a = LearnedValues.load(value_dir, ["harmlessness", "concision"], device="cpu")
    b = LearnedValues.load(value_dir, ["harmlessness", "concision"], device="cpu")
    prompts = [[{"role": "user", "content": "how do i fix my plan ?"}]] * 2
    out_a, out_b = a(prompts, ["you are kind", "the sun"]), b(prompts, ["you are kind", "the sun"])
    assert out_a.shape == (2, 2) and np.array_equal(out_a, out_b)
    # Text and token-id routes agree.
    ids = [a.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    seqs = [a.tokenizer(x, add_special_tokens=False)["input_ids"] + a.tokenizer(r, add_special_tokens=False)["input_ids"]
            for x, r in zip(ids, ["you are kind", "the sun"])]
    assert np.allclose(a.score_ids(seqs), out_a, atol=1e-6)


def test_kv_cached_values_equal_full_reencoding(value_dir):
    """The token-id route reads each candidate once on top of a cache; it must equal re-encoding."""
    lv = LearnedValues.load(value_dir, ["harmlessness", "concision"], device="cpu")
    tok = lv.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("how do i fix my plan ?", "tell me a kind thing about my cat")]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompts = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    assert len(prompts[0]) != len(prompts[1])  # left padding is exercised
    words = torch.tensor(tok.convert_tokens_to_ids(["you", "are", "kind", "the", "sun", "plan", "fix", "warm"]))
    gen = torch.Generator().manual_seed(0)
    K, cache = 2, lv.prefill(prompts)
    prefixes = [prompts[0], prompts[1]]
    for lengths, keep in (([3, 3, 1, 3], [1, 3]), ([4, 0, 4, 2], None)):
        block = words[torch.randint(len(words), (2 * K, 4), generator=gen)]
        lengths = torch.tensor(lengths)
        got = cache.extend(block, lengths, K)
        seqs = [prefixes[r // K] + block[r, : lengths[r]].tolist() for r in range(2 * K)]
        assert np.allclose(got, lv.score_ids(seqs), atol=1e-5)
        if keep:
            cache.keep(keep)
            prefixes = [seqs[r] for r in keep]


class _ReencodingValues:
    """An oracle for the engine's token-id route: re-encodes every full sequence, no cache."""

    def __init__(self, lv):
        self.lv = lv

    def shares_tokenizer(self, tokenizer):
        return True

    def prefill(self, prompt_ids):
        oracle = self

        class Prefixes:
            rows = [list(ids) for ids in prompt_ids]

            def extend(self, tokens, lengths, K):
                self.rows = [self.rows[r // K] + tokens[r, : lengths[r]].tolist() for r in range(len(tokens))]
                return oracle.lv.score_ids(self.rows)

            def keep(self, rows):
                self.rows = [self.rows[r] for r in rows]

        return Prefixes()


def test_engine_value_cache_matches_reencoding(tiny_policy, value_dir):
    """RMOD guided by the value model's KV cache decodes exactly as with full re-encoding."""
    from rmod_distill.engine.decoding import BlockwiseDecoder, DecodingConfig

    model, tok = tiny_policy
    names = ["harmlessness", "concision"]
    lv = LearnedValues.load(value_dir, names, device="cpu")
    cfg = DecodingConfig(num_candidates=3, block_size=4, max_new_tokens=12)
    cached = BlockwiseDecoder.from_model(model, tok, cfg, lv, names)
    oracle = BlockwiseDecoder.from_model(model, tok, cfg, _ReencodingValues(lv), names)
    assert cached.value_ids
    convs = [[{"role": "user", "content": q}] for q in ("how do i fix my plan ?", "tell me a kind thing", "why ?")]
    a = cached.decode(convs, [1, 2, 3], cached.method("rmod"))
    b = oracle.decode(convs, [1, 2, 3], cached.method("rmod"))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert sum(r.blocks for r in a) > 3  # several blocks, so the cache carried over
    assert np.allclose(sum((r.block_weights for r in a), []), sum((r.block_weights for r in b), []), atol=1e-4)


def test_refuses_other_objectives_and_tokenizer(value_dir, tmp_path):
    with pytest.raises(ValueError, match=r"trained for objectives \['harmlessness', 'concision'\]"):
        LearnedValues.load(value_dir, ["warmth", "concision"], device="cpu")
    tampered = tmp_path / "tampered"
    shutil.copytree(value_dir, tampered)
    tok = json.loads((tampered / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zebra"] = len(tok["model"]["vocab"]) + 10
    (tampered / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="do not match the tokenizer it was trained with"):
        LearnedValues.load(tampered, ["harmlessness", "concision"], device="cpu")


def test_rmod_guided_by_learned_values(tiny_policy_dir, tiny_generate_dir, value_dir, tmp_path):
    from rmod_distill.artifacts import read_jsonl
    from rmod_distill.generate import GenerateConfig
    from rmod_distill.generate import run as generate

    out = generate(parse_config(GenerateConfig, [
        "--policy.model", str(tiny_policy_dir), "--prompts.path", str(tiny_generate_dir.parent / "prompts.jsonl"),
        "--prompts.split", "eval", "--objectives", "[{name: harmlessness}, {name: concision}]",
        "--methods", "[rmod, best-of-n]", "--decoding.values", "learned", "--decoding.value_model", str(value_dir),
        "--decoding.num_candidates", "2", "--decoding.block_size", "4", "--decoding.max_new_tokens", "8",
        "--normalization", str(tiny_generate_dir / "normalization.json"), "--output_dir", str(tmp_path / "g"),
        "--wandb.mode", "disabled",
    ]))
    rows = read_jsonl(out / "samples.jsonl")
    assert len(rows) == 8 and all(len(r["block_weights"]) == 2 for r in rows if r["method"] == "rmod")


def test_existing_value_model_not_overwritten(tiny_policy_dir, tiny_generate_dir, value_dir):
    with pytest.raises(UserError, match="--overwrite"):
        run(parse_config(ValuesConfig, values_args(tiny_policy_dir, tiny_generate_dir, value_dir)))


def test_overwrite_retrains_on_the_same_rollouts(tiny_policy_dir, tiny_generate_dir, value_dir, tmp_path, capsys):
    again = tmp_path / "again"
    shutil.copytree(value_dir, again)
    rollouts = (again / "rollouts.jsonl").read_text()
    with pytest.raises(UserError, match="is not a generate run"):  # bad input: nothing is removed
        run(parse_config(ValuesConfig, values_args(tiny_policy_dir, tmp_path, again, "--overwrite")))
    assert (again / "value_report.json").exists() and (again / "heads.safetensors").exists()
    run(parse_config(ValuesConfig, values_args(tiny_policy_dir, tiny_generate_dir, again, "--overwrite",
                                               "--lora_r", "2")))
    assert "reusing the rollouts" in capsys.readouterr().out
    assert (again / "rollouts.jsonl").read_text() == rollouts
    assert json.loads((again / "backbone" / "adapter_config.json").read_text())["r"] == 2


def test_unknown_scheduler_is_refused_before_any_work(tiny_policy_dir, tiny_generate_dir, tmp_path):
    with pytest.raises(UserError, match="lr_scheduler_type 'cosinus'"):
        run(parse_config(ValuesConfig, values_args(tiny_policy_dir, tiny_generate_dir, tmp_path / "v",
                                                   "--lr_scheduler_type", "cosinus")))
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint_steps", "0"], "checkpoint_steps"),
    (["--warmup_ratio", "1.0"], "warmup_ratio"),
    (["--policy.adapter", "some/adapter"], "policy.adapter"),
])
def test_bad_values_recipes(tiny_policy_dir, tiny_generate_dir, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        parse_config(ValuesConfig, values_args(tiny_policy_dir, tiny_generate_dir, tmp_path / "v", *extra))


def test_killed_run_resumes_to_the_same_model(tiny_policy_dir, tiny_generate_dir, value_dir, tmp_path, monkeypatch,
                                              capsys):
    """Killed mid-training, the same command resumes from the Trainer's last checkpoint-* and
    ends with the model an uninterrupted run makes; no checkpoint is left in the result."""
    from safetensors.torch import load_file

    from rmod_distill import values

    out = tmp_path / "v"
    args = values_args(tiny_policy_dir, tiny_generate_dir, out, "--checkpoint_steps", "2")
    collate, calls = values.TruncatingCollator.__call__, []

    def dies_after_five_batches(self, features):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return collate(self, features)

    monkeypatch.setattr(values.TruncatingCollator, "__call__", dies_after_five_batches)
    with pytest.raises(KeyboardInterrupt):
        run(parse_config(ValuesConfig, args))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    monkeypatch.setattr(values.TruncatingCollator, "__call__", collate)
    run(parse_config(ValuesConfig, args))
    assert "resuming from" in capsys.readouterr().out
    assert not list(out.glob("checkpoint-*"))
    for name in ("heads.safetensors", "backbone/adapter_model.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(value_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    report = json.loads((out / "value_report.json").read_text())["history"]
    assert report == json.loads((value_dir / "value_report.json").read_text())["history"]
