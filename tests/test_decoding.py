"""The blockwise engine on a tiny in-process Llama."""

import numpy as np
import pytest
import torch

from rmod_distill.engine.decoding import BlockwiseDecoder, DecodingConfig, prompt_seed
from rmod_distill.engine.selection import parse_method

CONVS = [
    [{"role": "user", "content": "how do i fix my plan ?"}],
    [{"role": "user", "content": "tell me why my cat is always cold and what to do about it now"}],
    [{"role": "user", "content": "help"}],
    [{"role": "user", "content": "what is the best food for a dog ?"}],
]
NAMES = ["kind", "short"]
GOOD = {"kind", "good", "great", "calm", "love", "happy", "thanks"}


def values(prompts, responses):
    """Two conflicting toy objectives: kind words, and brevity."""
    kind = [sum(w in GOOD for w in r.split()) for r in responses]
    short = [-len(r.split()) / 8 for r in responses]
    return np.stack([kind, short], axis=1).astype(float)


def decoder(tiny_policy, value_fn=values, **kw):
    model, tok = tiny_policy
    cfg = DecodingConfig(**{"num_candidates": 3, "block_size": 4, "max_new_tokens": 12, **kw})
    return BlockwiseDecoder.from_model(model, tok, cfg, value_fn, NAMES)


def run(dec, method, convs=CONVS, ids=None, seed=0):
    ids = ids or [f"id{i}" for i in range(len(convs))]
    seeds = [prompt_seed(seed, i, method) for i in ids]
    return dec.decode(convs, seeds, dec.method(method))


def test_greedy_reference_equals_generate(tiny_policy):
    """Cache reuse, positions and left padding give exactly what `generate` gives."""
    model, tok = tiny_policy
    dec = decoder(tiny_policy, temperature=0.0, max_new_tokens=10)
    ours = run(dec, "reference")
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CONVS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=False, max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=[])
    for i, r in enumerate(ours):
        assert r.token_ids == out[i, enc["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("method", ["reference", "cd", "rmod", "best-of-n"])
def test_output_does_not_depend_on_batch(tiny_policy, method):
    dec = decoder(tiny_policy, temperature=1.0)
    together = run(dec, method)
    alone = [run(dec, method, [c], [f"id{i}"])[0] for i, c in enumerate(CONVS)]
    reordered = run(dec, method, CONVS[::-1], [f"id{i}" for i in range(4)][::-1])[::-1]
    for a, b, c in zip(together, alone, reordered):
        assert a.token_ids == b.token_ids == c.token_ids
        assert a.block_weights == b.block_weights


def test_seeds_change_outputs(tiny_policy):
    dec = decoder(tiny_policy, temperature=1.0)
    assert [r.token_ids for r in run(dec, "rmod", seed=0)] != [r.token_ids for r in run(dec, "rmod", seed=1)]


def test_rmod_records_simplex_weights_per_block(tiny_policy):
    dec = decoder(tiny_policy, temperature=1.0)
    for r in run(dec, "rmod"):
        assert len(r.block_weights) == r.blocks == 3
        for w in r.block_weights:
            assert len(w) == 2 and min(w) >= 0 and sum(w) == pytest.approx(1, abs=1e-5)
        assert r.tokens_sampled == 3 * 12  # K x max_new_tokens when nothing stops early


def test_recorded_candidates_rebuild_the_response_and_its_choices(tiny_policy):
    """record_candidates keeps each block's K candidates: the kept ones, in order, are the response,
    each block starts where the kept ones so far end, and RMOD kept the best score under its weights."""
    dec = decoder(tiny_policy, temperature=1.0)
    plain = run(dec, "rmod")
    dec.record_candidates = True
    results = run(dec, "rmod")
    for r, p in zip(results, plain):
        assert r.token_ids == p.token_ids  # recording changes nothing decoded
        assert len(r.candidates) == r.blocks == 3
        rebuilt = []
        for block, w in zip(r.candidates, r.block_weights):
            assert block["start"] == len(rebuilt) and len(block["tokens"]) == 3
            scores = [sum(a * b for a, b in zip(v, w)) for v in block["values"]]
            assert block["scores"] == pytest.approx(scores, abs=1e-4)
            assert block["chosen"] == int(np.argmax(block["scores"]))
            rebuilt += block["tokens"][block["chosen"]]
        assert rebuilt == r.token_ids
    assert all(not r.candidates for r in run(dec, "reference"))  # plain methods score no block
    assert all(not r.candidates for r in run(dec, "best-of-n"))  # nor do whole-answer ones


def test_cd_objective_uses_one_hot_weights(tiny_policy):
    dec = decoder(tiny_policy, temperature=1.0)
    for r in run(dec, "cd-short"):
        assert all(w == [0.0, 1.0] for w in r.block_weights)
    for r in run(dec, "cd"):
        assert all(w == [0.5, 0.5] for w in r.block_weights)


def test_selection_keeps_the_best_candidate(tiny_policy):
    """With one block (best-of-n), the kept response is the best of the K scored ones."""
    seen = []

    def recording(prompts, responses):
        v = values(prompts, responses)
        seen.append((list(responses), v))
        return v

    dec = decoder(tiny_policy, recording, temperature=1.0, num_candidates=5)
    for method, rule in [("best-of-n", lambda v: v.mean(1)), ("best-of-n-maxmin", lambda v: v.min(1))]:
        seen.clear()
        results = run(dec, method)
        responses, v = seen[0]
        for j, r in enumerate(results):
            block = slice(j * 5, (j + 1) * 5)
            assert r.text == responses[block][int(np.argmax(rule(v[block])))]


def test_finished_rows_stop_and_leave_the_batch(tiny_policy):
    model, tok = tiny_policy
    # Use a frequent token as the stop token so sequences do finish.
    probe = run(decoder(tiny_policy, temperature=1.0), "reference")
    common = max(set(sum((r.token_ids for r in probe), [])), key=sum((r.token_ids for r in probe), []).count)
    cfg = DecodingConfig(num_candidates=3, block_size=4, max_new_tokens=24, temperature=1.0)
    dec = BlockwiseDecoder.from_model(model, tok, cfg, values, NAMES, stop_ids=[common])
    results = run(dec, "rmod")
    assert any(r.finished for r in results)
    for r in results:
        if r.finished:
            assert r.token_ids[-1] == common and common not in r.token_ids[:-1]
            assert len(r.token_ids) < 24
            assert r.tokens_sampled < 3 * 24
        else:
            assert len(r.token_ids) == 24


def test_sample_selection_is_reproducible(tiny_policy):
    dec = decoder(tiny_policy, temperature=1.0, selection="sample")
    a, b = run(dec, "rmod"), run(dec, "rmod")
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_top_k_one_is_greedy(tiny_policy):
    greedy = run(decoder(tiny_policy, temperature=0.0), "reference")
    topk = run(decoder(tiny_policy, temperature=1.0, top_k=1), "reference")
    assert [r.token_ids for r in greedy] == [r.token_ids for r in topk]


def test_unknown_method_and_objective():
    with pytest.raises(ValueError, match="unknown objective 'tone'"):
        parse_method("cd-tone", NAMES)
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("beam", NAMES)
    with pytest.raises(ValueError, match="unknown objective 'x'"):
        DecodingConfig(cd_weights={"x": 1.0}).method("cd", NAMES)


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_nucleus_sampling_matches_full_sort(scale):
    """The partial top-k nucleus gives the same tokens as sorting the whole vocabulary."""
    from rmod_distill.engine.sampling import sample_tokens

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 5000, generator=gen) * scale
    u = torch.rand(32, generator=gen)
    cfg = DecodingConfig(temperature=0.8, top_p=0.9)
    probs = torch.softmax(logits / 0.8, -1)
    sorted_p, order = torch.sort(probs, -1, descending=True)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) > 0.9] = 0
    cdf = sorted_p.double().cumsum(-1)
    idx = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True).squeeze(-1)
    assert torch.equal(sample_tokens(logits, u, cfg.sampling), order.gather(-1, idx[:, None]).squeeze(-1))


def test_shorter_last_block(tiny_policy):
    """max_new_tokens=10, B=4: blocks of 4, 4 and 2 tokens, the last one marked last."""
    model, tok = tiny_policy
    cfg = DecodingConfig(num_candidates=3, block_size=4, max_new_tokens=10, temperature=1.0)
    dec = BlockwiseDecoder.from_model(model, tok, cfg, values, NAMES, stop_ids=[])
    calls = []
    sample = dec.sampler.sample

    def recording(seeds, block, K, steps, last):
        calls.append((block, K, steps, last))
        return sample(seeds, block, K, steps, last)

    dec.sampler.sample = recording
    for method in ("rmod", "cd"):
        calls.clear()
        results = run(dec, method)
        assert calls == [(0, 3, 4, False), (1, 3, 4, False), (2, 3, 2, True)]
        for r in results:
            assert r.blocks == 3 and len(r.block_weights) == 3
            assert len(r.token_ids) == 10 and not r.finished
            assert r.tokens_sampled == 3 * 10


def lora_policy(tiny_policy_dir):
    """The tiny policy wrapped in a LoRA adapter whose random weights change its logits."""
    from peft import LoraConfig, get_peft_model

    from rmod_distill.policy import load_policy

    base, tok = load_policy(str(tiny_policy_dir), device="cpu")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    return get_peft_model(base, config).eval(), tok


def test_only_distilled_decodes_with_the_adapter(tiny_policy_dir, tmp_path):
    """Every method but `distilled` samples from the base policy with the adapter switched off."""
    from rmod_distill.engine.runs import decode_methods, done_rows, process_state
    from rmod_distill.objectives import Normalizer, Objective, ObjectiveSet
    from rmod_distill.policy import load_policy
    from rmod_distill.prompts import Prompt

    class Words(Objective):
        def __init__(self, name, fn):
            super().__init__(name)
            self.fn = fn

        def score_batch(self, prompts, responses):
            return self.fn(responses)

    objectives = ObjectiveSet(
        [Words("kind", lambda rs: [sum(w in GOOD for w in r.split()) for r in rs]),
         Words("short", lambda rs: [-len(r.split()) / 8 for r in rs])],
        Normalizer(NAMES, [0.0, 0.0], [1.0, 1.0]),
    )
    prompts = [Prompt(id=f"p{i}", messages=c) for i, c in enumerate(CONVS)]
    methods = ["reference", "cd", "rmod", "best-of-n", "best-of-n-maxmin", "distilled"]
    cfg = DecodingConfig(num_candidates=3, block_size=4, max_new_tokens=12, temperature=1.0)

    def decode(model, tok, name):
        dec = BlockwiseDecoder.from_model(model, tok, cfg, lambda p, r: objectives.score(p, r)[1], NAMES)
        decode_methods(dec, model, objectives, prompts, methods, 0, 2, tmp_path / name, process_state())
        return {key: (r["completion"], r["block_weights"], r["tokens_sampled"])
                for key, r in done_rows(tmp_path / name).items()}

    base_model, tok = load_policy(str(tiny_policy_dir), device="cpu")
    peft_model, _ = lora_policy(tiny_policy_dir)
    ids = tok("how do i fix my plan ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, base_model(ids).logits, atol=1e-2)

    base, adapted = decode(base_model, tok, "base"), decode(peft_model, tok, "peft")
    assert len(base) == len(adapted) == len(methods) * len(prompts)
    for (method, pid), row in base.items():
        if method != "distilled":
            assert adapted[method, pid] == row, (method, pid)
    assert any(adapted["distilled", p.id] != base["distilled", p.id] for p in prompts)
