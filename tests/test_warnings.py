"""Issue 43, item 21: the stages print no warning a user cannot act on.

generate, distill (SFT then DPO, one W&B run, no ``use_cpu`` so the device is chosen as
``make demo`` chooses it) and eval run through ``rmod-distill``'s main on the tiny fixtures with
W&B offline; every Python warning (``simplefilter("always")``) and every line printed that says
"warning" or logged at level WARNING fails the test unless it is on the short list below. The libraries' own noise is
filtered in one place, ``rmod_distill/quiet.py``, which says why each filter is safe.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings

import pytest

from conftest import run_cli, write_prompts
from rmod_distill import quiet

OBJECTIVES = "[{name: harmlessness}, {name: concision}]"
SMALL = ["--decoding.num_candidates", "2", "--decoding.block_size", "4", "--decoding.max_new_tokens", "8"]

# What may still be recorded here, and why a user never sees it.
ALLOWED = [
    # W&B stages a logged table in a temporary folder that it leaves to be cleaned at exit. Python's default
    # filters hide every ResourceWarning; only simplefilter("always") shows it.
    (ResourceWarning, r"Implicitly cleaning up <TemporaryDirectory"),
]




def test_the_stages_print_no_warning_a_user_cannot_act_on(tiny_policy_dir, tmp_path, offline_wandb, capfd, caplog):
    prompts = write_prompts(tmp_path / "prompts.jsonl", n_train=12, n_eval=4)
    gen, adapter = tmp_path / "generate", tmp_path / "adapter"
    stages = [
        ["generate", "--policy.model", str(tiny_policy_dir), "--prompts.path", str(prompts), "--objectives", OBJECTIVES,
         "--methods", "[reference, rmod]", *SMALL, "--normalization_prompts", "4", "--wandb.mode", "offline",
         "--output_dir", str(gen)],
        ["distill", "--model.model_name_or_path", str(tiny_policy_dir), "--generate_dir", str(gen), "--output_dir",
         str(adapter), "--objective", "sft+dpo", "--max_steps", "1", "--save_steps", "1", "--bf16", "false",
         "--wandb.mode", "offline"],
        ["eval", "--policy.model", str(tiny_policy_dir), "--adapter", str(adapter), "--generate_dir", str(gen),
         "--prompts.path", str(prompts), "--prompts.split", "eval", "--objectives", OBJECTIVES,
         "--methods", "[reference, distilled]", *SMALL, "--bootstrap_resamples", "20", "--wandb.mode", "offline",
         "--output_dir", str(tmp_path / "eval")],
    ]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for argv in stages:
            assert run_cli(argv) == 0, f"{argv[0]} failed:\n{capfd.readouterr().err[-3000:]}"
    assert list(adapter.glob("wandb/offline-run-*/*.wandb")), "distill logged no W&B run"
    unknown = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
               if not any(issubclass(w.category, c) and re.search(m, str(w.message)) for c, m in ALLOWED)]
    assert unknown == [], "warnings a user cannot act on:\n" + "\n".join(unknown)
    printed = capfd.readouterr()
    text = (printed.out + printed.err).replace(str(tmp_path), "<tmp>")  # the folder is named after this test
    said = [line for line in text.splitlines() if re.search("warn", line, re.I)]
    assert said == [], "printed:\n" + "\n".join(said)
    # The libraries' loggers (transformers': "A ConfigError was raised whilst setting the number of model
    # parameters", once DPO's trainer joined SFT's W&B run); their handlers may write to a stream bound at import.
    logged = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert logged == [], "logged:\n" + "\n".join(logged)


def test_deepspeeds_cpu_message_is_filtered_at_import():
    """DeepSpeed says "Setting accelerator to CPU" when it is imported (once a process), on stdout."""
    code = "from rmod_distill.quiet import install; install(); import deepspeed; print('imported')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]
    if quiet._gpu_present():
        pytest.skip("a GPU is present here: the message is kept, it means torch cannot see that GPU")
    assert quiet.DEEPSPEED_CPU not in done.stdout + done.stderr


def test_only_the_known_warnings_are_filtered():
    """The filters name the message and the module: the same category from elsewhere still shows."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        for category, _message, _module, _why in quiet.KNOWN:
            warnings.warn("`something_else` is deprecated", category)
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", category, "x.py", 1, module="mine")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "modeling_utils.py", 1, module="transformers.modeling_utils")
    assert len(caught) == 2 * len(quiet.KNOWN)
