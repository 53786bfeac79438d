"""Issue 44: the README's "your own policy and rewards" steps, run as written, end to end.

A tiny local Llama folder stands for the user's model (``models/my-model``), prompts of their
own go to ``data/prompts/mine.jsonl``, and the README's ``my_rewards.py`` block is written into
the folder the commands run from (no PYTHONPATH). Its bash block runs as written (``init``, the
dry-run), then the commands ``make demo RECIPE=mine`` runs, each in this process. The eval's
figures must be finite and its normalisation sane: the README cannot drift from a path that works.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def own_model_section() -> str:
    text = README.read_text()
    return text[text.index("## Recipes: your own policy and rewards"):text.index("## Scaling out")]


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)




def strict_json(path: Path):
    """JSON as a strict parser reads it: a bare NaN or Infinity is an error."""
    def refuse(token):
        raise AssertionError(f"{path} holds a bare {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def write_own_prompts(path: Path) -> None:
    texts = ["how do i tell my roommate to fix the plan ?", "what is a good way to ask my boss for a raise ?",
             "tell me why my cat is always cold", "how can i sleep more ?", "tell me a kind thing",
             "why is the sun warm ?", "help me fix my home", "what is the best food for a dog ?",
             "tell me a calm plan", "how do i say sorry to my boss ?", "what do you think about money ?",
             "my work is bad , help"]
    rows = [{"id": f"mine-{i:02d}", "prompt": texts[i % len(texts)], "split": "train" if i < 16 else "eval"}
            for i in range(24)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_readme_own_model_steps_run_end_to_end(tiny_policy_dir, tmp_path, monkeypatch, capsys):
    section = own_model_section()
    (module,) = [b for b in fenced(section, "python") if b.startswith("# my_rewards.py")]
    (commands,) = [b for b in fenced(section, "bash") if "rmod-distill init mine" in b]
    assert "make demo RECIPE=mine" in section

    # The user's folder: a clone's recipes, their model, prompts and reward module; nothing on PYTHONPATH.
    shutil.copytree(ROOT / "recipes" / "default", tmp_path / "recipes" / "default")
    shutil.copytree(tiny_policy_dir, tmp_path / "models" / "my-model")
    write_own_prompts(tmp_path / "data" / "prompts" / "mine.jsonl")
    (tmp_path / "my_rewards.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")

    for line in commands.strip().splitlines():
        words = shlex.split(line, comments=True)
        assert words[0] == "rmod-distill", f"README step is not an rmod-distill command: {line}"
        assert run_cli(words[1:]) == 0, capsys.readouterr().err[-3000:]
    for stage in ("generate", "distill", "eval"):
        recipe = (tmp_path / "recipes" / "mine" / f"{stage}.yaml").read_text()
        assert "models/my-model" in recipe and "runs/mine/" in recipe

    # `make demo RECIPE=mine` is these stage commands, in order.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), "demo", "RECIPE=mine", "INSTALL=0"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    stages = [shlex.split(line)[1:] for line in proc.stdout.splitlines() if line.split()[:1]
              and line.split()[0].endswith("/rmod-distill")]
    assert [s[0] for s in stages] == ["generate", "distill", "eval"]
    for argv in stages:
        assert run_cli(argv) == 0, capsys.readouterr().err[-3000:]

    # The figures: finite, strict JSON, a normalisation that scales every objective.
    norm = strict_json(tmp_path / "runs" / "mine" / "generate" / "normalization.json")
    assert norm["names"] == ["length", "echo", "concision"]
    assert all(s > 0 for s in norm["std"])
    metrics = strict_json(tmp_path / "runs" / "mine" / "eval" / "metrics.json")
    strict_json(tmp_path / "runs" / "mine" / "eval" / "run.json")
    strict_json(tmp_path / "runs" / "mine" / "generate" / "run.json")
    assert set(metrics["methods"]) == {"distilled", "rmod", "cd", "best-of-n-maxmin", "reference"}
    for method, m in metrics["methods"].items():
        assert m["worst_case_reward"] is not None and abs(m["worst_case_reward"]) < 10, (method, m)
    # Reference answers decoded as generate's were: their z-scores centre near 0, as on the samples measured.
    ref = metrics["methods"]["reference"]["objective_means"]
    assert all(abs(v) < 2 for v in ref.values()), ref
    assert "nan" not in (tmp_path / "runs" / "mine" / "eval" / "report.md").read_text().lower()

    # The adapter: a card that names the chain that ran, a tokenizer that pads as sampling needs, a PEFT snippet.
    adapter = tmp_path / "runs" / "mine" / "distill"
    card = (adapter / "README.md").read_text()
    assert "trained with TRL: SFT (SFTTrainer), then DPO (DPOTrainer)." in card
    assert "- dpo" in card and "- sft" in card and "Fine-tuned with TRL's SFTTrainer" not in card
    assert json.loads((adapter / "tokenizer_config.json").read_text())["padding_side"] == "left"
    capsys.readouterr()
    assert run_cli(["download", str(adapter), "--to", str(tmp_path / "fetched")]) == 0
    printed = capsys.readouterr().out
    assert "AutoPeftModelForCausalLM.from_pretrained(" in printed and "models/my-model" in printed


def test_init_checks_before_writing_and_never_overwrites(tiny_policy_dir, tmp_path, monkeypatch, capsys):
    shutil.copytree(ROOT / "recipes" / "default", tmp_path / "recipes" / "default")
    write_own_prompts(tmp_path / "data" / "prompts" / "mine.jsonl")
    monkeypatch.chdir(tmp_path)
    base = ["init", "mine", "--policy", str(tiny_policy_dir), "--prompts", "data/prompts/mine.jsonl"]
    cases = [
        (["--objectives", "[{name: x, kind: python, model: 'nosuch_module:fn'}]"],
         r"objective 'x': cannot import module 'nosuch_module' .*put nosuch_module\.py in the folder you run from"),
        (["--prompts", "data/prompts/nope.jsonl"], r"prompt file data/prompts/nope\.jsonl does not exist"),
        (["--objectives", "[{name: concision"], r"--objectives: not valid YAML"),
    ]
    for extra, expect in cases:
        capsys.readouterr()
        assert run_cli(base + extra) == 2
        err = capsys.readouterr().err
        assert re.search(expect, err), err
        assert not (tmp_path / "recipes" / "mine").exists()
        assert [p.name for p in (tmp_path / "recipes").iterdir()] == ["default"], "a staging folder was left"
    assert run_cli(base) == 0
    written = {p.name: p.read_text() for p in (tmp_path / "recipes" / "mine").iterdir()}
    assert sorted(written) == ["distill.yaml", "eval.yaml", "generate.yaml"]
    assert "max_new_tokens" not in written["eval.yaml"]  # eval's reference decoding is generate's
    assert run_cli(base) == 2
    assert "already exists; choose another name (init never overwrites a recipe)" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in (tmp_path / "recipes" / "mine").iterdir()} == written


@pytest.mark.parametrize("policy", ["no-template", "trailing-slash"])
def test_policy_folder_without_template_and_paths_compared_resolved(policy, tiny_policy_dir, tiny_generate_dir,
                                                                    tmp_path, monkeypatch, capsys):
    """A policy without a chat template is one line (dry-run too); distill with the generate run's
    policy written with a trailing slash is the same policy."""
    if policy == "no-template":
        folder = tmp_path / "model"
        shutil.copytree(tiny_policy_dir, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        for dry in ([], ["--dry-run"]):
            assert run_cli(["generate", "--policy.model", str(folder), "--prompts.path",
                            str(tiny_generate_dir.parent / "prompts.jsonl"), "--output_dir", str(tmp_path / "out"),
                            "--objectives", "[{name: concision}]", *dry]) == 2
            err = capsys.readouterr().err
            assert "has no chat template" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()
        return
    gen_policy = json.loads((tiny_generate_dir / "run.json").read_text())["config"]["policy"]["model"]
    assert run_cli(["distill", "--model.model_name_or_path", gen_policy.rstrip("/") + "/", "--generate_dir",
                    str(tiny_generate_dir), "--output_dir", str(tmp_path / "d"), "--max_steps", "1", "--use_cpu",
                    "--wandb.mode", "disabled", "--dry-run"]) == 0, capsys.readouterr().err
