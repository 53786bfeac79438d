"""Putting a decoder together from a recipe: the policy on its backend, the value function it is
guided by, checked first."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from rmod_distill.engine.decoding import BlockwiseDecoder, DecodingConfig
from rmod_distill.engine.sampling import Sampler, SamplingParams, TransformersSampler
from rmod_distill.engine.value_model import LearnedValues, read_value_config
from rmod_distill.engine.vllm import BackendConfig, VLLMSampler, VLLMServer
from rmod_distill.errors import UserError
from rmod_distill.objectives import ObjectiveSet
from rmod_distill.policy import PolicyConfig, load_tokenizer, resolve_device, resolve_dtype, resolve_model_path, \
    stop_token_ids

__all__ = ["BackendConfig", "ServedPolicy", "build_decoder", "check_decoding_inputs", "serve_policy"]


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


@dataclass
class ServedPolicy:
    """The policy as a stage samples from it: a loaded model (transformers) or vLLM servers."""

    tokenizer: object
    model: object | None = None  # the transformers model; None on the vllm backend
    urls: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    adapter: bool = False
    request_timeout: float = 600.0
    samplers: list = field(default_factory=list)

    def sampler(self, params: SamplingParams) -> Sampler:
        """A sampler over this policy with the recipe's sampling settings."""
        stops = stop_token_ids(self.tokenizer)
        if self.model is not None:
            return TransformersSampler(self.model, self.tokenizer, params, stops)
        sampler = VLLMSampler(self.tokenizer, params, stops, self.urls, self.served_model_name, self.adapter,
                              self.request_timeout)
        self.samplers.append(sampler)
        return sampler

    def adapter_switch(self, decoder: BlockwiseDecoder):
        """What ``adapter_enabled`` switches: the PEFT model, or the vLLM sampler that names the adapter."""
        return self.model if self.model is not None else decoder.sampler


@contextlib.contextmanager
def serve_policy(policy: PolicyConfig, backend: BackendConfig, run_dir: Path, device: str | None = None,
                 processes: int = 1) -> Iterator[ServedPolicy]:
    """Load the policy (transformers) or reach its vLLM servers, launching one when asked.

    A launched server is stopped when the block ends, on an exception and on Ctrl-C.
    """
    if backend.kind == "transformers":
        model, tokenizer = policy.load(device)
        yield ServedPolicy(tokenizer, model)
        return
    if backend.launch and processes > 1:
        raise UserError("backend.launch starts one server for one process; with several processes "
                        "(accelerate launch) start the servers yourself and list them in backend.urls")
    backend.check()
    tokenizer = load_tokenizer(policy.model)
    served = ServedPolicy(tokenizer, urls=list(backend.urls), served_model_name=backend.served_model_name,
                          adapter=bool(policy.adapter), request_timeout=backend.request_timeout)
    with contextlib.ExitStack() as stack:
        if backend.launch:
            adapter = None
            if policy.adapter:
                from rmod_distill.adapters import fetch_adapter

                adapter = str(fetch_adapter(policy.adapter))
            dtype = str(resolve_dtype(policy.dtype, resolve_device(policy.device))).removeprefix("torch.")
            server = stack.enter_context(VLLMServer(resolve_model_path(policy.model), backend, dtype,
                                                    Path(run_dir) / "vllm-server.log", adapter,
                                                    backend.served_model_name or "policy"))
            served.urls, served.served_model_name = [server.url], server.served_model_name
        try:
            yield served
        finally:
            for sampler in served.samplers:
                sampler.close()


def build_decoder(model, tokenizer, decoding: DecodingConfig, objectives: ObjectiveSet,
                  device: str = "auto", sampler: Sampler | None = None) -> BlockwiseDecoder:
    """A decoder over the policy, guided by the recipe's value function.

    ``prefix`` and ``oracle`` values are the objectives on the partial response; ``learned``
    values come from a value model. Whole-response methods always rank by the rewards.
    ``sampler`` (from :meth:`ServedPolicy.sampler`) replaces the built-in transformers sampler.
    """

    def rewards(prompts, responses):
        return objectives.score(prompts, responses)[1]

    value_fn = rewards
    if decoding.values == "learned":
        value_fn = LearnedValues.load(decoding.value_model, objectives.names, device=device)
    if sampler is not None:
        return BlockwiseDecoder(sampler, tokenizer, decoding, value_fn, objectives.names, reward_fn=rewards)
    return BlockwiseDecoder.from_model(model, tokenizer, decoding, value_fn, objectives.names, reward_fn=rewards)
