"""A vLLM backend: candidate blocks drawn by OpenAI-compatible vLLM servers.

:class:`VLLMSampler` implements the engine's :class:`~rmod_distill.engine.sampling.Sampler`
over ``/v1/completions``. Every block sends one request per live prompt, all at once, so the
server batches N x K sequences: the prompt as token ids (the chat-templated prompt plus
every accepted token, tokenised once in this process exactly as the transformers sampler
does, never text re-tokenised), ``n=K``, ``max_tokens`` the block's steps, the recipe's
temperature / top-p / top-k, the policy's stop token ids and a seed derived from the
prompt's seed and the block. The server's automatic prefix caching plays the part of the
transformers sampler's KV-cache reuse: a block's prompt is the last block's prompt plus one
accepted candidate, so only the new tokens are computed. Selection, scoring, rows and
resumability are the engine's, unchanged.

Several servers (``backend.urls``) are data parallel: each prompt is pinned to one server
by a stable hash of its seed, so its prefix stays in that server's cache. ``backend.launch``
starts one server for the run (:class:`VLLMServer`) and stops it at the end, on Ctrl-C and
on an exception.

The distilled adapter is served as a LoRA module named ``distilled`` (``--enable-lora``;
this works on the CPU build too); ``distilled`` requests ask for that model, every other
method for the base model. The server needs vLLM in its own environment (``make vllm-env``:
``.venv-vllm``), since vLLM pins other ``transformers`` versions than the pipeline.
Hand-written because no library turns a vLLM server into a blockwise candidate sampler.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rmod_distill.engine.sampling import Block, SamplerTimes, SamplingParams
from rmod_distill.errors import UserError

ADAPTER_NAME = "distilled"  # the LoRA module name the distilled adapter is served under
BACKENDS = ("transformers", "vllm")


@dataclass
class BackendConfig:
    """Where candidate blocks are sampled: in process (transformers) or by vLLM servers."""

    kind: str = field(default="transformers", metadata={"help": "transformers (in process) | vllm (servers)."})
    urls: list[str] = field(
        default_factory=list,
        metadata={"help": "vllm: running OpenAI-compatible servers (http://host:port); several are data parallel, "
                          "each prompt pinned to one by a hash of its seed."},
    )
    launch: bool = field(default=False, metadata={"help": "vllm: start one server on the policy for this run."})
    python: str = field(
        default=".venv-vllm/bin/python", metadata={"help": "vllm: the interpreter that has vLLM (make vllm-env)."}
    )
    startup_timeout: float = field(default=600.0, metadata={"help": "vllm: seconds to wait for a launched server."})
    request_timeout: float = field(default=600.0, metadata={"help": "vllm: seconds to wait for one block's reply."})
    served_model_name: str | None = field(
        default=None, metadata={"help": "vllm: the model name the servers serve (null: the first in /v1/models)."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "launch: GPUs one server shards the model over."})
    gpu_memory_utilization: float | None = field(
        default=None, metadata={"help": "launch: share of GPU memory (on CPU: of RAM) vLLM takes (null: 0.9 on a "
                                        "GPU, 0.2 on a CPU)."},
    )
    max_model_len: int = field(default=2048, metadata={"help": "launch: longest prompt plus response in tokens."})
    cpu_kvcache_space: int = field(default=2, metadata={"help": "launch on a CPU: GiB of KV cache "
                                                                "(VLLM_CPU_KVCACHE_SPACE)."})
    server_args: list[str] = field(
        default_factory=list, metadata={"help": "launch: further vLLM server flags, e.g. [--data-parallel-size, '8']."}
    )

    def __post_init__(self):
        if self.kind not in BACKENDS:
            raise ValueError(f"backend.kind must be transformers or vllm, got {self.kind!r}")
        if self.kind == "vllm" and bool(self.urls) == self.launch:
            raise ValueError("backend.kind: vllm needs either backend.urls (running servers) or backend.launch: true, "
                             "not both")
        if self.kind == "transformers" and (self.urls or self.launch):
            raise ValueError("backend.urls and backend.launch need backend.kind: vllm")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"backend.urls: expected http://host:port, got {url!r}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"backend.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if min(self.startup_timeout, self.request_timeout) <= 0 or min(self.tensor_parallel_size,
                                                                       self.max_model_len) < 1:
            raise ValueError("backend timeouts must be > 0, tensor_parallel_size and max_model_len >= 1")

    def check(self) -> None:
        """What can be checked before anything loads: the launch interpreter exists."""
        if self.launch and not Path(self.python).is_file():
            raise UserError(f"backend.python: {self.python} does not exist; run `make vllm-env` to make .venv-vllm "
                            "or point backend.python at an interpreter that has vLLM")


def request_seed(seed: int, block: int) -> int:
    """A block's sampling seed, derived like :func:`~rmod_distill.engine.sampling.generator`'s.

    vLLM takes a signed 64-bit seed and gives the n candidates seed, seed + 1, ...: kept below 2**62.
    """
    return (seed + 1_000_003 * (block + 2)) % (2**63 - 1) % 2**62


def server_index(seed: int, n_servers: int) -> int:
    """The server a prompt is pinned to: a stable hash of its seed (the same in every process and run)."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    return int.from_bytes(digest[:8], "little") % n_servers


def _last_lines(path: Path | None, n: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()[-n:]
    return "\n".join("    " + line for line in lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process: receive SIGTERM when the process that launched it dies (Linux).

    A run killed with ``kill -9`` then leaves no server behind; vLLM's own worker processes
    follow their front end.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class VLLMServer:
    """One vLLM OpenAI-compatible server started for a run; a context manager that always stops it."""

    def __init__(self, model_path: str, cfg: BackendConfig, dtype: str, log_path: Path,
                 adapter: str | None = None, served_model_name: str = "policy"):
        self.cfg, self.log_path = cfg, Path(log_path)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.served_model_name = served_model_name
        cuda = torch.cuda.is_available() or shutil.which("nvidia-smi") is not None
        gpu_mem = cfg.gpu_memory_utilization or (0.9 if cuda else 0.2)
        self.command = [
            cfg.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
            "--served-model-name", served_model_name, "--dtype", dtype, "--enable-prefix-caching",
            "--tensor-parallel-size", str(cfg.tensor_parallel_size), "--gpu-memory-utilization", str(gpu_mem),
            "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(cfg.max_model_len),
            "--disable-log-stats",
        ]
        self.env = dict(os.environ)
        if not cuda:
            # The CPU build: no CUDA graphs, and chunked prefill off (concurrent seeded requests
            # crashed its bookkeeping: "CPU Generator does not use offset"; environment.md).
            self.command += ["--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "16384"]
            self.env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_space)
            self.env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if adapter:
            # vLLM accepts only these maximum ranks.
            rank = min((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= _lora_rank(adapter)), default=512)
            self.command += ["--enable-lora", "--lora-modules", f"{ADAPTER_NAME}={adapter}",
                             "--max-lora-rank", str(rank)]
        self.command += list(cfg.server_args)
        self.process: subprocess.Popen | None = None

    def start(self) -> "VLLMServer":
        """Start the server and wait for ``/health``; on failure stop it and raise with its last log lines."""
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        print(f"vllm: starting a server on {self.url} (log: {self.log_path})", file=sys.stderr)
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + self.cfg.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self.process = None
                raise UserError(f"vLLM server ({' '.join(self.command[:4])} ...) exited with status {code} while "
                                f"starting; last lines of {self.log_path}:\n{_last_lines(self.log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"vLLM server on {self.url} was not healthy after backend.startup_timeout="
                                f"{self.cfg.startup_timeout:.0f} s; last lines of {self.log_path}:\n"
                                f"{_last_lines(self.log_path)}")
            time.sleep(1.0)

    def stop(self) -> None:
        """Stop the server and its workers (its own process group): SIGTERM, then SIGKILL."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _lora_rank(adapter: str) -> int:
    import json

    config = Path(adapter) / "adapter_config.json"
    try:
        return int(json.loads(config.read_text()).get("r", 16))
    except (OSError, ValueError):
        return 16


class VLLMSampler:
    """Candidate blocks from vLLM servers; see the module docstring."""

    def __init__(self, tokenizer, params: SamplingParams, stop_ids: list[int], urls: list[str],
                 model_name: str | None = None, adapter: bool = False, request_timeout: float = 600.0):
        import httpx

        self.tokenizer, self.params = tokenizer, params
        self.stop_ids = list(stop_ids)
        self.urls = [u.rstrip("/") for u in urls]
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.times = SamplerTimes()
        self.client = httpx.Client(timeout=request_timeout,
                                   limits=httpx.Limits(max_connections=512, max_keepalive_connections=256))
        self.model_name = model_name or self._served_model(self.urls[0])
        # With an adapter loaded the policy samples with it unless switched off, as a PEFT model does.
        self.has_adapter, self.adapter_on = adapter, adapter
        self.ids: list[list[int]] = []
        self._last: tuple[Block, int] | None = None

    def _served_model(self, url: str) -> str:
        import httpx

        try:
            reply = self.client.get(f"{url}/v1/models")
            reply.raise_for_status()
            models = [m["id"] for m in reply.json()["data"]]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise UserError(f"vLLM server {url} does not answer /v1/models ({type(exc).__name__}: {exc}); "
                            "is it running? (backend.urls)") from exc
        base = [m for m in models if m != ADAPTER_NAME]
        if not base:
            raise UserError(f"vLLM server {url} serves no model")
        return base[0]

    @contextlib.contextmanager
    def disable_adapter(self):
        """Sample from the base model inside this block, as ``PeftModel.disable_adapter`` does."""
        before, self.adapter_on = self.adapter_on, False
        try:
            yield
        finally:
            self.adapter_on = before

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    def prefill(self, conversations: list[list[dict]]) -> list[list[int]]:
        """Chat-template and tokenise the prompts here, exactly as the transformers sampler does."""
        texts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
        ]
        self.ids = [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        self._last = None
        return [list(ids) for ids in self.ids]

    def _body(self, ids: list[int], seed: int, block: int, K: int, steps: int) -> dict:
        p = self.params
        greedy = p.temperature == 0
        return {
            "model": ADAPTER_NAME if self.adapter_on else self.model_name,
            "prompt": ids,
            # Greedy candidates are all the same: draw one and copy it K times.
            "n": 1 if greedy else K,
            "max_tokens": steps,
            "temperature": p.temperature,
            "top_p": 1.0 if greedy else p.top_p,
            "top_k": -1 if greedy or p.top_k == 0 else p.top_k,
            "seed": request_seed(seed, block),
            "stop_token_ids": self.stop_ids,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }

    def _post(self, url: str, body: dict) -> dict:
        import httpx

        try:
            reply = self.client.post(f"{url}/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise UserError(f"vLLM server {url} stopped answering ({type(exc).__name__}); the rows written so far "
                            "are kept: restart the server (or the run) and rerun the same command to resume") from exc
        if reply.status_code == 404 and body["model"] == ADAPTER_NAME:
            raise UserError(f"vLLM server {url} does not serve the distilled adapter: start it with --enable-lora "
                            f"--lora-modules {ADAPTER_NAME}=ADAPTER_FOLDER (backend.launch does)")
        if reply.status_code != 200:
            raise UserError(f"vLLM server {url} refused a request (HTTP {reply.status_code}): "
                            f"{reply.text[:300].strip()}")
        return reply.json()

    def _candidate(self, choice: dict) -> tuple[list[int], bool]:
        tokens = list(choice.get("token_ids") or [])
        finished = choice.get("finish_reason") == "stop"
        if finished and (not tokens or tokens[-1] not in self.stop_ids):
            # vLLM leaves the stop token out of the ids; put it back as the transformers sampler keeps it.
            reason = choice.get("stop_reason")
            tokens.append(int(reason) if isinstance(reason, int) else int(self.eos_id))
        return tokens, finished

    def sample(self, seeds: list[int], block: int, K: int, steps: int, last: bool) -> Block:
        """K candidates per live prompt from the servers, one concurrent request per prompt."""
        t0 = time.perf_counter()
        jobs = [(self.urls[server_index(s, len(self.urls))], self._body(ids, s, block, K, steps))
                for ids, s in zip(self.ids, seeds)]
        workers = min(len(jobs), 256)
        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            replies = list(pool.map(lambda job: self._post(*job), jobs))
        R = len(jobs) * K
        tokens = torch.full((R, steps), self.pad_id, dtype=torch.long)
        lengths = torch.zeros(R, dtype=torch.long)
        finished = torch.zeros(R, dtype=torch.bool)
        for j, reply in enumerate(replies):
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            if len(choices) == 1 and K > 1:
                choices = choices * K
            for k, choice in enumerate(choices[:K]):
                cand, done = self._candidate(choice)
                row = j * K + k
                tokens[row, : len(cand)] = torch.tensor(cand, dtype=torch.long)
                lengths[row], finished[row] = len(cand), done
        self.times.forward += time.perf_counter() - t0
        out = Block(tokens, lengths, finished)
        self._last = (out, K)
        return out

    def keep(self, rows: list[int]) -> None:
        """Append each chosen candidate to its prompt's token ids (the next block's prompt)."""
        block, K = self._last
        self.ids = [self.ids[r // K] + block.candidate(r) for r in rows]
