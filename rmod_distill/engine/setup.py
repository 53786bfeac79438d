"""Putting a decoder together from a recipe: the value function it is guided by, checked first."""

from __future__ import annotations

import numpy as np

from rmod_distill.engine.decoding import BlockwiseDecoder, DecodingConfig
from rmod_distill.engine.value_model import LearnedValues, read_value_config
from rmod_distill.errors import UserError
from rmod_distill.objectives import ObjectiveSet


def check_decoding_inputs(decoding: DecodingConfig, objectives: ObjectiveSet) -> None:
    """Check a learned value model's folder against the objectives (and their normalisation,
    once attached) before any model loads."""
    if decoding.values != "learned":
        return
    info = read_value_config(decoding.value_model)
    if info["objectives"] != objectives.names:
        raise UserError(
            f"decoding.value_model {decoding.value_model} was trained for objectives {info['objectives']}, but the "
            f"recipe has {objectives.names}; train a value model for these objectives"
        )
    norm = objectives.normalizer
    if norm is not None and not (np.allclose(info["normalization"]["mean"], norm.mean)
                                 and np.allclose(info["normalization"]["std"], norm.std)):
        raise UserError(
            f"decoding.value_model {decoding.value_model} was trained on rewards normalised differently from this "
            "run's normalisation; train it with this run's normalisation (values.generate_dir)"
        )


def build_decoder(model, tokenizer, decoding: DecodingConfig, objectives: ObjectiveSet,
                  device: str = "auto") -> BlockwiseDecoder:
    """A decoder over the policy, guided by the recipe's value function.

    ``prefix`` and ``oracle`` values are the objectives on the partial response; ``learned``
    values come from a value model. Whole-response methods always rank by the rewards.
    """

    def rewards(prompts, responses):
        return objectives.score(prompts, responses)[1]

    value_fn = rewards
    if decoding.values == "learned":
        value_fn = LearnedValues.load(decoding.value_model, objectives.names, device=device)
    return BlockwiseDecoder.from_model(model, tokenizer, decoding, value_fn, objectives.names, reward_fn=rewards)
