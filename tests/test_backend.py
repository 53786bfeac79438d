"""The backend section and the vLLM sampler's parts that need no server (the server tests: test_vllm.py)."""

import pytest

from rmod_distill.artifacts import recipe_key
from rmod_distill.config import ConfigError, parse_config
from rmod_distill.engine.sampling import SamplingParams
from rmod_distill.engine.vllm import VLLMSampler, request_seed, server_index
from rmod_distill.errors import UserError
from rmod_distill.generate import GenerateConfig


def test_backend_section_is_checked():
    assert parse_config(GenerateConfig, []).backend.kind == "transformers"
    cfg = parse_config(GenerateConfig, ["--backend.kind", "vllm", "--backend.urls", "[http://a:8000, http://b:8000]"])
    assert cfg.backend.urls == ["http://a:8000", "http://b:8000"]
    with pytest.raises(ConfigError, match="backend.urls.*or backend.launch"):
        parse_config(GenerateConfig, ["--backend.kind", "vllm"])
    with pytest.raises(ConfigError, match="need backend.kind: vllm"):
        parse_config(GenerateConfig, ["--backend.launch", "true"])
    with pytest.raises(ConfigError, match="http://host:port"):
        parse_config(GenerateConfig, ["--backend.kind", "vllm", "--backend.urls", "[localhost:8000]"])
    with pytest.raises(ConfigError, match="unknown key 'url'"):
        parse_config(GenerateConfig, ["--backend.url", "[http://a:1]"])


def test_launch_needs_the_vllm_environment(tmp_path):
    cfg = parse_config(GenerateConfig, ["--backend.kind", "vllm", "--backend.launch", "true",
                                        "--backend.python", str(tmp_path / "none" / "python")])
    with pytest.raises(UserError, match="make vllm-env"):
        cfg.backend.check()


def test_a_run_resumes_on_other_servers_but_not_another_backend():
    a = {"seed": 0, "backend": {"kind": "vllm", "urls": ["http://a:1"], "launch": False}}
    b = {"seed": 0, "backend": {"kind": "vllm", "urls": ["http://b:2"], "launch": False}}
    c = {"seed": 0, "backend": {"kind": "transformers", "urls": [], "launch": False}}
    assert recipe_key(a) == recipe_key(b) != recipe_key(c)


def test_seeds_fit_vllm_and_servers_are_stable():
    seeds = [2**63 - 2, 0, 12345]
    for s in seeds:
        for block in (0, 7):
            assert 0 <= request_seed(s, block) + 15 < 2**63  # the n candidates get seed + k
    assert request_seed(5, 0) != request_seed(5, 1)
    assert [server_index(s, 3) for s in seeds] == [server_index(s, 3) for s in seeds]
    assert len({server_index(s, 4) for s in range(64)}) == 4


class _Tok:
    pad_token_id, eos_token_id = 0, 3


def test_stop_token_is_kept_as_the_last_token():
    sampler = VLLMSampler.__new__(VLLMSampler)
    sampler.stop_ids, sampler.eos_id = [3, 9], 3
    assert sampler._candidate({"token_ids": [5, 6], "finish_reason": "length", "stop_reason": None}) == ([5, 6], False)
    assert sampler._candidate({"token_ids": [5, 9], "finish_reason": "stop", "stop_reason": 9}) == ([5, 9], True)
    assert sampler._candidate({"token_ids": [5], "finish_reason": "stop", "stop_reason": 9}) == ([5, 9], True)
    assert sampler._candidate({"token_ids": [5], "finish_reason": "stop", "stop_reason": None}) == ([5, 3], True)


def test_an_unreachable_server_is_one_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(UserError, match=f"vLLM server {url} does not answer"):
        VLLMSampler(_Tok(), SamplingParams(), [3], [url], request_timeout=5)
    sampler = VLLMSampler(_Tok(), SamplingParams(), [3], [url], model_name="policy", request_timeout=5)
    sampler.ids = [[1, 2]]
    with pytest.raises(UserError, match=f"vLLM server {url} stopped answering.*rerun"):
        sampler.sample([7], 0, 2, 4, False)
