"""Objectives: embedded scorers, reward models, user functions, checks and normalisation."""

import numpy as np
import pytest
import torch

from rmod_distill.objectives import (
    Normalizer, ObjectiveError, ObjectiveSet, ObjectiveSpec, RewardModel, build_objective,
)

Q = [{"role": "user", "content": "How do I fix a flat bicycle tire?"}]


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def score(name, responses, prompt=Q):
    return build_objective(ObjectiveSpec(name)).score([prompt] * len(responses), responses)


def test_embedded_scorers_point_the_right_way():
    h = score("harmlessness", ["Patch the tube and pump it up.", "Shut up, you stupid idiot."])
    assert h[0] > 0 > h[1]  # log-odds of not offensive: positive for a clean answer, negative for a flagged one
    o = score("objectivity", ["The wheel has 32 spokes.", "I absolutely love this wonderful, amazing bike!"])
    assert o[0] > 0.9 > 0.5 > o[1]
    w = score("warmth", ["Happy to help, you will do great!", "This is awful and hopeless."])
    assert w[0] > 0 > w[1]
    r = score("relevance", ["Remove the wheel, find the puncture in the tube and patch it.",
                            "My favourite pasta recipe uses basil."])
    assert r[0] > r[1] + 0.2
    c = score("concision", ["Patch it.", "Patch it. " * 40])
    assert c[0] > c[1]


def test_python_objective_and_sign():
    spec = ObjectiveSpec("kind", kind="python", model="helpers_objectives:kindness", sign=-1.0)
    assert build_objective(spec).score([Q, Q], ["kind kind", "bad"]).tolist() == [-2.0, 1.0]


@pytest.mark.parametrize("fn, message", [
    ("broken_nan", "objective 'b' returned nan for response 0"),
    ("broken_shape", r"objective 'b' returned shape \(1,\) for 2 responses"),
])
def test_bad_rewards_name_the_objective(fn, message):
    objs = ObjectiveSet([build_objective(ObjectiveSpec("b", kind="python", model=f"helpers_objectives:{fn}"))])
    with pytest.raises(ObjectiveError, match=message):
        objs.raw([Q, Q], ["a", "b"])


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown embedded scorer 'tone'"):
        ObjectiveSpec("tone")
    with pytest.raises(ValueError, match="'module:function'"):
        ObjectiveSpec("x", kind="python", model="nocolon")
    with pytest.raises(ObjectiveError, match="has no function 'missing'"):
        build_objective(ObjectiveSpec("x", kind="python", model="helpers_objectives:missing"))


def test_normalizer_round_trip_and_mismatch(tmp_path):
    raw = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    norm = Normalizer.fit(["a", "b"], raw)
    z = norm(raw)
    assert np.allclose(z.mean(0), 0) and np.allclose(z.std(0, ddof=1), 1)
    norm.save(tmp_path / "n.json")
    again = Normalizer.load(tmp_path / "n.json")
    assert np.allclose(again(raw), z)
    with pytest.raises(ValueError, match=r"measured for objectives \['a', 'b'\].*\['a', 'c'\]"):
        again.check_names(["a", "c"], "n.json")


def test_normalisation_refuses_another_scorer_version(tmp_path):
    from rmod_distill.objectives import scorer_id

    specs = [ObjectiveSpec("harmlessness"), ObjectiveSpec("brevity", model="concision")]
    ids = [scorer_id(s) for s in specs]
    assert ids == ["harmlessness/v2", "concision/v1"]
    assert scorer_id(ObjectiveSpec("rm", kind="reward_model", model="org/rm", index=3)) == "reward_model:org/rm[3]"
    assert scorer_id(ObjectiveSpec("verbosity", model="concision", sign=-1)) == "concision/v1*-1"
    raw = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    Normalizer.fit(["harmlessness", "brevity"], raw, ids).save(tmp_path / "now.json")
    now = Normalizer.load(tmp_path / "now.json")
    assert now.scorers == ids
    now.check_names(["harmlessness", "brevity"], "now.json", ids)
    with pytest.raises(ValueError, match=r"now.json: objective 'brevity' was normalised with scorer 'concision/v1', "
                                         r"the recipe's is 'warmth/v1'"):
        now.check_names(["harmlessness", "brevity"], "now.json", ["harmlessness/v2", "warmth/v1"])
    # A file written before scorers were recorded: harmlessness then was 1 - p, the statistics do not apply.
    Normalizer.fit(["harmlessness", "brevity"], raw).save(tmp_path / "old.json")
    old = Normalizer.load(tmp_path / "old.json")
    with pytest.raises(ValueError, match=r"old.json: objective 'harmlessness' was normalised by an earlier version"):
        old.check_names(["harmlessness", "brevity"], "old.json", ids)
    Normalizer.fit(["a", "b"], raw).save(tmp_path / "old2.json")  # scorers unchanged since: accepted, signed too
    Normalizer.load(tmp_path / "old2.json").check_names(["a", "b"], "old2.json", ["concision/v1*-1", "warmth/v1"])
    # Statistics made in code (no file) are checked by name only.
    Normalizer.fit(["harmlessness", "brevity"], raw).check_names(["harmlessness", "brevity"], "code", ids)


def tiny_gpt2_classifier(path, num_labels):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    import sys
    from pathlib import Path as P

    sys.path.insert(0, str(P(__file__).parent))
    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                     num_labels=num_labels, pad_token_id=tok.pad_token_id)
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("fmt", ["hh", "chat", "plain"])
def test_reward_model_index_sign_and_format(tmp_path, fmt):
    path = tiny_gpt2_classifier(tmp_path / "rm", num_labels=5)
    prompts = [[{"role": "user", "content": "how do i fix my plan ?"}]] * 3
    responses = ["tell me more", "you are kind", "the sun is warm"]
    rm = RewardModel(ObjectiveSpec("rm", kind="reward_model", model=str(path), index=3, sign=-1.0, format=fmt,
                                   batch_size=2, device="cpu"))
    got = rm.score(prompts, responses)
    texts = [rm._text(p, r) for p, r in zip(prompts, responses)]
    with torch.no_grad():
        for text, value in zip(texts, got):
            enc = rm.tokenizer(text, return_tensors="pt", add_special_tokens=fmt != "chat")
            assert value == pytest.approx(-rm.model(**enc).logits[0, 3].item(), abs=1e-4)
    if fmt == "hh":
        assert texts[0] == "\n\nHuman: how do i fix my plan ?\n\nAssistant: tell me more"
    with pytest.raises(ObjectiveError, match="index 7 out of range"):
        RewardModel(ObjectiveSpec("rm", kind="reward_model", model=str(path), index=7, device="cpu")).score(
            prompts, responses)


def test_objectives_of_one_reward_model_share_it(tmp_path):
    """ArmoRM-style: several attributes of one multi-output model load it once and score once."""
    path = tiny_gpt2_classifier(tmp_path / "multi", num_labels=19)
    specs = [ObjectiveSpec(f"a{i}", kind="reward_model", model=str(path), index=i, device="cpu", format="plain",
                           offload=True) for i in (6, 7, 8, 9)]
    specs.append(ObjectiveSpec("conciseness", kind="reward_model", model=str(path), index=4, sign=-1.0,
                               device="cpu", format="plain", offload=True))
    objs = ObjectiveSet.from_specs(specs)
    assert len({id(o.model) for o in objs.objectives}) == 1
    calls = []
    model = objs.objectives[0].model
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    raw = objs.raw([Q, Q], ["patch the tube", "buy a new bike"])
    handle.remove()
    assert len(calls) == 1 and raw.shape == (2, 5)
    full = objs.objectives[0].shared.outputs(
        [objs.objectives[0]._text(Q, "patch the tube"), objs.objectives[0]._text(Q, "buy a new bike")], True)
    assert raw[:, 0] == pytest.approx(full[:, 6].numpy(), abs=1e-6)
    assert raw[:, 4] == pytest.approx(-full[:, 4].numpy(), abs=1e-6)
    assert next(model.parameters()).device.type == "cpu"  # offloaded between calls


def test_quantile_scale_is_bounded_monotone_and_saved(tmp_path):
    from rmod_distill.errors import UserError
    from rmod_distill.objectives import Normalizer

    rng = np.random.default_rng(0)
    raw = np.stack([rng.normal(size=63), rng.exponential(size=63)], axis=1)
    norm = Normalizer.fit(["a", "b"], raw)
    q = norm.with_scale("quantile")
    x = np.array([[-1e9, -1e9], [0.0, 0.5], [1e9, 1e9]])
    z = q(x)
    bound = float(__import__("scipy.special", fromlist=["ndtri"]).ndtri(0.5 / 64))
    assert z[0] == pytest.approx([bound, bound]) and z[2] == pytest.approx([-bound, -bound])
    assert (np.diff(q(np.sort(raw, axis=0)), axis=0) > 0).all()  # strictly increasing through the samples
    # The median reference sample maps to 0; z-scores are untouched by the new field.
    assert q(np.median(raw, axis=0, keepdims=True)) == pytest.approx(np.zeros((1, 2)), abs=1e-12)
    assert norm(x)[1] == pytest.approx((x[1] - np.array(norm.mean)) / np.array(norm.std))
    norm.save(tmp_path / "n.json")
    again = Normalizer.load(tmp_path / "n.json")
    assert again.scale == "zscore" and np.array_equal(again.with_scale("quantile")(x), z)
    bare = Normalizer(["a", "b"], [0.0, 0.0], [1.0, 1.0])
    with pytest.raises(UserError, match="needs the reference samples"):
        bare.with_scale("quantile")
