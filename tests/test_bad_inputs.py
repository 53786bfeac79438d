"""Issue 12: every bad input a user reported, through the real CLI, as one table.

Each row runs ``rmod-distill <stage> ...`` in-process on tiny inputs and checks that the
command exits with status 2, prints one line naming the file, key or objective at fault
and what was expected (the row's regex), and leaves its input files and folders exactly
as they were. Most rows fail before any model loads: inputs are validated first.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import run_cli


OBJECTIVES = "[{name: harmlessness}, {name: concision}]"
SMALL = ["--decoding.num_candidates", "2", "--decoding.block_size", "4", "--decoding.max_new_tokens", "8"]




def snapshot(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file (and the name of every folder) under ``paths``."""
    out = {}
    for root in paths:
        for p in sorted([root, *root.rglob("*")] if root.is_dir() else [root]):
            if p.is_dir():
                out[str(p)] = "<dir>"
            elif p.exists():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "<absent>"
    return out


class Ctx:
    """What a row builds its command from: the tiny policy, a complete generate run and eval."""

    def __init__(self, tmp: Path, policy: Path, gen: Path, evaldir: Path, monkeypatch):
        self.tmp, self.policy, self.gen, self.eval, self.mp = tmp, policy, gen, evaldir, monkeypatch
        self.watch: list[Path] = []  # inputs that must be unchanged
        self.absent: list[Path] = []  # outputs a refused start must not create

    def prompts(self, rows=None, text: str | bytes | None = None, name="prompts.jsonl") -> Path:
        path = self.tmp / name
        if text is not None:
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.watch.append(path)
        return path

    def out(self, name="out") -> Path:
        path = self.tmp / name
        self.absent.append(path)
        return path

    def copy_gen(self) -> Path:
        dst = self.tmp / "gen"
        shutil.copytree(self.gen, dst)
        self.watch.append(dst)
        return dst

    def generate(self, *extra, prompts=None, out=None) -> list[str]:
        prompts = prompts or self.gen.parent / "prompts.jsonl"
        self.watch += [Path(prompts), self.gen]
        return ["generate", "--policy.model", str(self.policy), "--prompts.path", str(prompts),
                "--objectives", OBJECTIVES, "--methods", "[reference, rmod]", *SMALL,
                "--normalization_prompts", "4", "--output_dir", str(out or self.out()), *extra]

    def evaluate(self, *extra, gen=None, out=None) -> list[str]:
        self.watch += [self.gen.parent / "prompts.jsonl", self.gen]
        return ["eval", *eval_args(self.policy, gen or self.gen, out or self.out()), *extra]

    def distill(self, *extra, gen=None, out=None) -> list[str]:
        self.watch.append(self.gen)
        return ["distill", "--model.model_name_or_path", str(self.policy), "--generate_dir", str(gen or self.gen),
                "--output_dir", str(out or self.out()), "--max_steps", "1", "--use_cpu", "--wandb.mode", "disabled",
                *extra]


def eval_args(policy: Path, gen: Path, out: Path) -> list[str]:
    return ["--policy.model", str(policy), "--generate_dir", str(gen), "--prompts.path",
            str(gen.parent / "prompts.jsonl"), "--prompts.split", "eval", "--objectives", OBJECTIVES,
            "--methods", "[reference]", *SMALL, "--bootstrap_resamples", "50", "--wandb.mode", "disabled",
            "--output_dir", str(out)]


@pytest.fixture(scope="module")
def complete_eval(tiny_policy_dir, tiny_generate_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad-inputs-eval") / "eval"
    assert run_cli(["eval", *eval_args(tiny_policy_dir, tiny_generate_dir, out)]) == 0
    return out


# ----------------------------------------------------------------------------- the rows


def _typo_over_complete_run(c: Ctx):
    c.watch.append(c.gen)
    return c.generate("--overwrite", prompts=c.gen.parent / "promts.jsonl", out=c.gen)


def _bad_objective_over_complete_eval(c: Ctx):
    c.watch.append(c.eval)
    return c.evaluate("--overwrite", "--objectives", "[{name: harmlessness}, {name: concision, model: concisness}]",
                      out=c.eval)


def _distill_into_foreign_folder(c: Ctx):
    out = c.tmp / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (out / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (out / "README.md").write_text("# my adapter\n")
    c.watch.append(out)
    return c.distill(out=out)


def _hash_in_ids(c: Ctx):
    return c.generate(prompts=c.prompts([{"id": "a", "prompt": "tell me a kind thing", "split": "train"},
                                         {"id": "a#s1", "prompt": "help me fix my home", "split": "train"}]))


def _resumed_generate_stale_scorer(c: Ctx):
    """An unfinished generate run whose statistics are of an earlier scorer: refused before the policy loads."""
    run = _unfinished_copy(c.gen, c.tmp / "gen")
    norm = json.loads((run / "normalization.json").read_text())
    (run / "normalization.json").write_text(json.dumps(dict(norm, scorers=["harmlessness/v1", "concision/v1"])))
    c.watch.append(run)

    def no_policy(*args, **kwargs):
        raise AssertionError("the policy loaded before the stale normalisation was refused")

    c.mp.setattr("rmod_distill.generate.serve_policy", no_policy)
    return c.generate(out=run)


def _torn_shard(c: Ctx):
    """An unfinished eval whose shard has a damaged row before its end (not a torn last line)."""
    run = c.tmp / "eval"
    shutil.copytree(c.eval, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(info, complete=False)))
    shard = run / "generations" / "shards" / "rank-00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"
    shard.write_text("".join(lines))
    c.watch.append(run)
    return c.evaluate(out=run)


def _damaged_rollouts(c: Ctx):
    rollouts = c.tmp / "samples.jsonl"
    lines = (c.gen / "samples.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:40] + "\n"
    rollouts.write_text("".join(lines))
    c.watch += [rollouts, c.gen]
    return ["values", "--policy.model", str(c.policy), "--generate_dir", str(c.gen), "--prompts.path",
            str(c.gen.parent / "prompts.jsonl"), "--objectives", OBJECTIVES, "--rollouts", f"[{rollouts}]", *SMALL,
            "--wandb.mode", "disabled", "--output_dir", str(c.out())]


def _wandb_online_without_login(c: Ctx):
    c.mp.setenv("WANDB_API_KEY", "")
    c.mp.setenv("NETRC", str(c.tmp / "no-netrc"))
    c.mp.delenv("WANDB_MODE", raising=False)
    return c.generate("--wandb.mode", "online")


def _broken_gen(damage: Callable[[Path], None]):
    def build(c: Ctx):
        gen = c.copy_gen()
        damage(gen)
        return gen
    return build


def _corrupt_arrow(c: Ctx):
    gen = c.copy_gen()
    for arrow in (gen / "dataset").glob("*.arrow"):
        arrow.write_bytes(b"this is not an arrow file" * 10)
    return c.distill(gen=gen)


def _broken_normalization(c: Ctx):
    gen = c.copy_gen()
    (gen / "normalization.json").write_text('{"names": ["harmlessness", "concision"], "mean": [0.1,')
    return c.evaluate(gen=gen)


def _missing_adapter(c: Ctx):
    (c.tmp / "runs").mkdir()
    c.mp.chdir(c.tmp)
    return c.evaluate("--methods", "[reference, distilled]", "--adapter", "runs/distil")


def _download_typo(c: Ctx):
    (c.tmp / "runs").mkdir()
    c.mp.chdir(c.tmp)
    return ["download", "runs/distil", "--to", str(c.out())]


def _override_error(c: Ctx):
    recipe = c.tmp / "recipe.yaml"
    recipe.write_text("seed: 3\ndecoding: {num_candidates: 2}\n")
    c.watch.append(recipe)
    return c.generate("--config", str(recipe), "--decoding.num_candidates", "two")


def _python_objective(fn: str):
    def build(c: Ctx):
        return c.generate("--objectives", f"[{{name: harmlessness}}, {{name: mine, kind: python, model: '{fn}'}}]")
    return build


def _empty_recipe(text: str):
    def build(c: Ctx):
        recipe = c.tmp / "recipe.yaml"
        recipe.write_text(text)
        c.watch.append(recipe)
        return ["generate", "--config", str(recipe)]
    return build


def _long_prompt(c: Ctx):
    words = ("tell me why my cat is always cold and what i can do " * 60).split()[:600]
    return c.generate(prompts=c.prompts([{"id": "short", "prompt": "tell me a kind thing", "split": "train"},
                                         {"id": "long", "prompt": " ".join(words), "split": "train"}]))


def _judge(c: Ctx, rubric: str | None = "ok", **judge) -> str:
    """A ``judges`` list of one judge; ``rubric`` "ok" writes a valid rubric file beside the run."""
    if rubric == "ok":
        path = c.tmp / "rubric.txt"
        path.write_text("=== user ===\nQuestion: {question}\nAnswer: {answer}\nScore 0-10 as [[score]].\n")
        c.watch.append(path)
        rubric = str(path)
    fields = {"base_url": "http://127.0.0.1:9/v1", "rubric": rubric, **judge}
    inner = ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items())
    return f"[{{name: quality, kind: judge, model: judge-model, judge: {{{inner}}}}}]"


def _judge_key_unset(c: Ctx):
    c.mp.delenv("RMOD_TEST_JUDGE_KEY", raising=False)
    return c.evaluate("--judges", _judge(c, api_key_env="RMOD_TEST_JUDGE_KEY"))


def _judge_in_generate_key_unset(c: Ctx):
    c.mp.delenv("RMOD_TEST_JUDGE_KEY", raising=False)
    spec = _judge(c, api_key_env="RMOD_TEST_JUDGE_KEY")[1:-1]
    return c.generate("--objectives", f"[{{name: harmlessness}}, {spec}]")


def _rubric_without_answer(c: Ctx):
    path = c.tmp / "rubric.txt"
    path.write_text("=== system ===\nYou grade.\n=== user ===\nRate the reply to {question} from 0 to 10.\n")
    c.watch.append(path)
    return c.evaluate("--judges", _judge(c, rubric=str(path)))


@dataclass
class Row:
    id: str
    build: Callable[[Ctx], list[str]]
    expect: str  # regex the one error line must match (after "rmod-distill <stage>: error: ")
    dry: bool = True  # --dry-run refuses it too (False: found only by scoring, decoding or a request)
    hidden: str | None = None  # text that must appear nowhere in the output (a secret)


# ----------------------------------------------------------------------------- issue 43's rows


def _foreign_run_json(c: Ctx):
    """Another tool's folder: a run.json without `stage`, its model and notes."""
    out = c.tmp / "theirs"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model": "theirs", "epochs": 3}))
    (out / "model.bin").write_bytes(b"\1" * 32)
    (out / "NOTES.md").write_text("my notes\n")
    c.watch.append(out)
    return c.generate("--overwrite", out=out)


def _user_file_in_complete_run(c: Ctx):
    run = c.tmp / "gen"
    shutil.copytree(c.gen, run)
    (run / "my_notes.txt").write_text("what I saw\n")
    (run / "plots").mkdir(exist_ok=True)
    (run / "plots" / "compare.md").write_text("# mine\n")
    c.watch.append(run)
    return c.generate("--overwrite", out=run)


def _below_a_file(stage: str):
    def build(c: Ctx):
        blocker = c.tmp / "afile"
        blocker.write_text("not a folder\n")
        c.watch.append(blocker)
        out = blocker / "sub"
        return c.generate(out=out) if stage == "generate" else c.distill(out=out)
    return build


def _recipe(text: str, stage: str = "generate"):
    def build(c: Ctx):
        recipe = c.tmp / "recipe.yaml"
        recipe.write_text(text)
        c.watch.append(recipe)
        return c.generate("--config", str(recipe)) if stage == "generate" else [stage, "--config", str(recipe)]
    return build


def _reward_model(model: str, offline: bool = False, empty: bool = False):
    def build(c: Ctx):
        target = model.format(tmp=c.tmp)
        if empty:
            Path(target).mkdir(parents=True)
        if offline:
            c.mp.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        return c.generate("--objectives", f"[{{name: harmlessness}}, {{name: rm, kind: reward_model, model: '{target}'}}]")
    return build


def _unfinished_generate_for_eval(c: Ctx):
    run = _unfinished_copy(c.gen, c.tmp / "gen")
    c.watch.append(run)
    return c.evaluate(gen=run)


def _distill_run_as_generate_dir(c: Ctx):
    run = c.copy_gen()
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(info, stage="distill")))
    return c.distill(gen=run)


def _prompts_folder(c: Ctx):
    folder = c.tmp / "myprompts"
    folder.mkdir()
    c.watch.append(folder)
    return c.generate(prompts=folder)


def _judge_with(c: Ctx, **judge) -> list[str]:
    inner = ", ".join(f"{k}: {json.dumps(v)}" for k, v in {"base_url": "http://127.0.0.1:9/v1", **judge}.items())
    return c.evaluate("--judges", f"[{{name: quality, kind: judge, model: judge-model, judge: {{{inner}}}}}]")


def _values(c: Ctx, *extra) -> list[str]:
    return ["values", "--policy.model", str(c.policy), "--generate_dir", str(c.gen), "--prompts.path",
            str(c.gen.parent / "prompts.jsonl"), "--objectives", OBJECTIVES, *SMALL, "--wandb.mode", "disabled",
            "--output_dir", str(c.out()), *extra]


ISSUE_43 = [
    # 1. a folder no rmod-distill run wrote (another tool's run.json) is refused, --overwrite or not
    Row("43.1-foreign-run-json-overwrite", _foreign_run_json,
        r"output_dir .*theirs holds files that no rmod-distill run wrote \(run\.json is not an rmod-distill run "
        r"marker\); choose another output_dir \(it is refused with --overwrite too\)"),
    # 2. --overwrite over a complete run that holds a user's files: refused, naming them
    Row("43.2-overwrite-keeps-user-files", _user_file_in_complete_run,
        r"gen holds files the generate run did not write \(my_notes\.txt, plots/compare\.md\); --overwrite would "
        r"delete them: move them out"),
    # 5. a secret in a judge section: the key is named, its value is not printed
    Row("43.5-judge-api-key-in-recipe", lambda c: _judge_with(c, rubric="x.txt", api_key="sk-PLANTEDsecret123"),
        r"unknown key 'api_key' for JudgeConfig: put the key in an environment variable and give its name as "
        r"api_key_env", hidden="sk-PLANTEDsecret123"),
    Row("43.5-hub-token-of-wrong-type", lambda c: c.distill("--hub_token", "[hf_PLANTEDtoken]"),
        r"key 'hub_token': expected .*, got a value that is not shown", hidden="PLANTED"),
    # 6. malformed YAML in an override value
    Row("43.6-methods-yaml", lambda c: c.generate("--methods", "[rmod, reference"),
        r"^--methods: the value '\[rmod, reference' is not valid YAML: .*\(line 1, column \d+\)"),
    Row("43.6-objectives-yaml", lambda c: c.generate("--objectives", "[{name: concision"),
        r"^--objectives: the value .* is not valid YAML"),
    Row("43.6-cd-weights-yaml", lambda c: c.generate("--decoding.cd_weights", "[1, 2"),
        r"^--decoding\.cd_weights: the value '\[1, 2' is not valid YAML"),
    Row("43.6-iterate-distill-args-yaml", lambda c: ["iterate", "--distill_args", "[--pairs, reference"],
        r"^--distill_args: the value .* is not valid YAML"),
    # 7. a reward model that is not there: one line naming the objective
    Row("43.7-reward-model-missing-path", _reward_model("{tmp}/models/rm"),
        r"objective 'rm': reward model .*models/rm does not exist \(expected a model folder with config\.json"),
    Row("43.7-reward-model-empty-folder", _reward_model("{tmp}/models/rm", empty=True),
        r"objective 'rm': reward model .*models/rm is not a model folder \(no config\.json there\)"),
    Row("43.7-reward-model-hub-id-offline", _reward_model("nosuch-org/nosuch-reward-model", offline=True),
        r"objective 'rm': reward model nosuch-org/nosuch-reward-model is not in the hub cache and HF_HUB_OFFLINE is "
        r"set"),
    # 8, 9, 10 (and 18: --dry-run refuses them too, as every row here with dry=True)
    Row("43.8-lora-r-0", lambda c: c.distill("--model.lora_r", "0"), r"model\.lora_r must be >= 1, got 0"),
    Row("43.8-lora-r-negative", lambda c: c.distill("--model.lora_r", "-4"), r"model\.lora_r must be >= 1, got -4"),
    Row("43.9-learning-rate-negative", lambda c: c.distill("--learning_rate", "-1"),
        r"learning_rate must be a finite number > 0, got -1"),
    Row("43.9-values-learning-rate-negative", lambda c: _values(c, "--learning_rate", "-1"),
        r"learning_rate must be a finite number > 0, got -1"),
    Row("43.10-bootstrap-resamples-0", lambda c: c.evaluate("--bootstrap_resamples", "0"),
        r"bootstrap_resamples must be >= 1, got 0"),
    Row("43.10-bootstrap-resamples-negative", lambda c: c.evaluate("--bootstrap_resamples", "-5"),
        r"bootstrap_resamples must be >= 1, got -5"),
    # 13. an output_dir below a file
    Row("43.13-generate-output-below-a-file", _below_a_file("generate"),
        r"output_dir .*afile/sub cannot be made: .*afile is a file, not a folder"),
    Row("43.13-distill-output-below-a-file", _below_a_file("distill"),
        r"output_dir .*afile/sub cannot be made: .*afile is a file, not a folder"),
    # 14. a prompt row without an id
    Row("43.14-prompt-without-id",
        lambda c: c.generate(prompts=c.prompts([{"prompt": "tell me a kind thing", "split": "train"},
                                                {"id": "b", "prompt": "help me fix my home", "split": "train"}])),
        r"prompts\.jsonl: row 1 has no 'id' \(missing, null or empty\)"),
    Row("43.14-prompt-id-null",
        lambda c: c.generate(prompts=c.prompts([{"id": "a", "prompt": "tell me a kind thing", "split": "train"},
                                                {"id": None, "prompt": "help me fix my home", "split": "train"}])),
        r"prompts\.jsonl: row 2 has no 'id'"),
    # 15. a key given twice in a recipe
    Row("43.15-recipe-key-twice", _recipe("seed: 1\ndecoding:\n  num_candidates: 4\n  num_candidates: 8\n"),
        r"recipe\.yaml: key 'num_candidates' is given twice \(lines 3 and 4\); keep one"),
    # 16. eval on an unfinished generate run
    Row("43.16-eval-unfinished-generate-dir", _unfinished_generate_for_eval,
        r"generate_dir .*gen is an unfinished generate run; rerun that `rmod-distill generate` command"),
    # 18. --dry-run on an empty prompt file (with the dry-run pass below)
    Row("43.18-empty-prompt-file", lambda c: c.generate(prompts=c.prompts(text="")),
        r"prompts\.jsonl: the file is empty"),
    # 20. unclear messages made clear
    Row("43.20-top-level-key-of-a-section", lambda c: c.distill("--lora_r", "8"),
        r"unknown key 'lora_r' for DistillConfig; did you mean 'model\.lora_r'\?"),
    Row("43.20-unknown-key-in-judge", lambda c: _judge_with(c, rubrik="x.txt"),
        r"unknown key 'rubrik' for JudgeConfig; did you mean 'rubric'\?"),
    Row("43.20-batch-size-0", lambda c: c.generate("--batch_size", "0"), r"batch_size must be >= 1, got 0"),
    Row("43.20-numeric-prompt", lambda c: c.generate(prompts=c.prompts([{"id": "a", "prompt": 12345,
                                                                          "split": "train"}])),
        r"row 1 \(id 'a'\): 'prompt' must be a string, got int '12345'"),
    Row("43.20-prompts-path-is-a-folder", _prompts_folder,
        r"prompts\.path: .*myprompts is a folder; expected a \.jsonl, \.json or \.parquet prompt file"),
    Row("43.20-flag-without-value", lambda c: c.generate("--seed"), r"^--seed needs a value \(expected int\)"),
    Row("43.18-iterate-checks-round-one", lambda c: ["iterate", "--generate_args",
                                                    f"[--policy.model, {c.tmp / 'nowhere'}]", "--output_dir",
                                                    str(c.out())],
        r"policy\.model: folder .*nowhere does not exist"),
    Row("44.2-eval-decodes-otherwise-than-generate", lambda c: c.evaluate("--decoding.max_new_tokens", "16"),
        r"decoding\.max_new_tokens is 16 here but 8 in generate_dir .*leave decoding\.max_new_tokens out of the eval "
        r"recipe"),
    Row("43.20-distill-run-as-generate-dir", _distill_run_as_generate_dir,
        r"generate_dir .*gen holds a distill run, not a generate run"),
]


ROWS = [
    # 1. a prompts typo with --overwrite over a complete run: refused, the run intact
    Row("1-generate-overwrite-prompts-typo", _typo_over_complete_run,
        r"prompts\.path: prompt file .*promts\.jsonl does not exist"),
    # 2. --overwrite with a bad objective over a complete eval: refused, generations/ and metrics intact
    Row("2-eval-overwrite-bad-objective", _bad_objective_over_complete_eval,
        r"objective 'concision': unknown embedded scorer 'concisness'; expected one of \[.*'concision'"),
    # 3. distill into a folder holding someone's adapter and README.md
    Row("3-distill-into-foreign-folder", _distill_into_foreign_folder,
        r"output_dir .*adapter holds files that no rmod-distill run wrote \(no run\.json\)"),
    # 4. ids 'a' and 'a#s1'
    Row("4-hash-in-prompt-id", _hash_in_ids, r"row 2 \(id 'a#s1'\): '#' is not allowed in prompt ids"),
    # 5. NaN/inf decoding settings
    Row("5-temperature-nan", lambda c: c.generate("--decoding.temperature", ".nan"),
        r"command line: key 'decoding': decoding\.temperature must be a finite number >= 0, got nan"),
    Row("5-lam-inf", lambda c: c.generate("--decoding.lam", ".inf"),
        r"decoding\.lam must be a finite number > 0, got inf"),
    # 6. a damaged row inside a shard (resume) and a damaged rollouts file given to values
    Row("6-eval-shard-damaged-mid-file", _torn_shard,
        r"rank-00000\.jsonl: line 2 is not valid JSON .*the file is damaged"),
    Row("6-values-damaged-rollouts", _damaged_rollouts,
        r"samples\.jsonl: line 3 is not valid JSON .*the file is damaged"),
    # 7. eval objectives spec differing from generate's
    Row("7-eval-objective-spec-differs",
        lambda c: c.evaluate("--objectives", "[{name: harmlessness, model: concision}, {name: concision}]"),
        r"normalization\.json: objective 'harmlessness' was normalised with scorer 'harmlessness/v2', the "
        r"recipe's is 'concision/v1'"),
    Row("7-resumed-generate-stale-scorer", _resumed_generate_stale_scorer,
        r"gen/normalization\.json: objective 'harmlessness' was normalised with scorer 'harmlessness/v1', the "
        r"recipe's is 'harmlessness/v2'; generate again \(--overwrite\)"),
    # 8. online without a login: refused before any work
    Row("8-wandb-online-without-login", _wandb_online_without_login,
        r"wandb\.mode online needs a W&B login .*use auto, offline or disabled"),
    # 9. a failed start writes nothing (out is checked absent), so the corrected rerun is not locked out
    Row("9-failed-start-writes-nothing", lambda c: c.generate(prompts=c.tmp / "nope.jsonl"),
        r"prompt file .*nope\.jsonl does not exist"),
    # 10. messages
    Row("10-prompts-not-utf8",
        lambda c: c.generate(prompts=c.prompts(text=b'{"id": "a", "prompt": "hi", "split": "train"}\n'
                                                    b'{"id": "b", "prompt": "caf\xe9", "split": "train"}\n')),
        r"prompt file .*prompts\.jsonl: line 2 is not UTF-8 text \(byte 0xe9\)"),
    Row("10-distill-corrupt-arrow", _corrupt_arrow,
        r"generate_dir .*gen/dataset could not be read \(.*\); rerun generate with --overwrite"),
    Row("10-broken-normalization-json", _broken_normalization,
        r"normalisation file .*gen/normalization\.json is not valid JSON"),
    Row("10-empty-prompts-file", lambda c: c.generate(prompts=c.prompts(text="")),
        r"prompt file .*prompts\.jsonl: the file is empty; expected one JSON object per line"),
    Row("10-prompts-invalid-json-line",
        lambda c: c.generate(prompts=c.prompts(text='{"id": "a", "prompt": "hi", "split": "train"}\n'
                                                    '{"id": "b", "prompt": "hi" "split": "train"}\n')),
        r"prompt file .*prompts\.jsonl: line 2 is not valid JSON \(Expecting ',' delimiter"),
    Row("10-missing-adapter-folder", _missing_adapter, r"adapter folder runs/distil does not exist"),
    Row("10-download-missing-adapter-folder", _download_typo,
        r"adapter folder runs/distil does not exist"),
    Row("10-download-unknown-hub-repo", lambda c: ["download", "nosuch-org/nosuch-adapter", "--to", str(c.out())],
        r"adapter 'nosuch-org/nosuch-adapter' is not a local folder and could not be fetched from the hub"),
    Row("10-missing-prompt-key",
        lambda c: c.generate(prompts=c.prompts([{"id": "a", "text": "hi", "split": "train"}])),
        r"prompts\.jsonl: no column 'prompt' or 'messages' for the prompt \(columns: \['id', 'split', 'text'\]\)"),
    Row("10-missing-model-folder", lambda c: c.generate("--policy.model", str(c.tmp / "models" / "tiny")),
        r"policy\.model: folder .*models/tiny does not exist"),
    Row("10-override-error-blames-command-line", _override_error,
        r"^command line \(--decoding\.num_candidates\): key 'decoding': key 'num_candidates': expected an "
        r"integer, got 'two'$"),
    Row("10-python-objective-raises", _python_objective("helpers_objectives:broken_raise"),
        r"objective 'mine' failed: KeyError: 'score'"),
    Row("10-python-objective-module-missing", _python_objective("helpers_nosuch:fn"),
        r"objective 'mine': cannot import module 'helpers_nosuch'"),
    Row("10-python-objective-function-missing", _python_objective("helpers_objectives:nosuch"),
        r"objective 'mine': 'helpers_objectives' has no function 'nosuch'"),
    Row("10-python-objective-nan", _python_objective("helpers_objectives:broken_nan"),
        r"objective 'mine' returned nan for response 0 .*rewards must be finite"),
    Row("10-python-objective-wrong-length", _python_objective("helpers_objectives:broken_shape"),
        r"objective 'mine' returned shape \(1,\) for 2 responses; expected \(2,\)"),
    Row("10-distill-missing-generate-dir", lambda c: c.distill(gen=c.tmp / "runs" / "generat"),
        r"generate_dir .*runs/generat does not exist; run `rmod-distill generate` first"),
    # 11. an empty recipe file is refused, not read as "all defaults"
    Row("11-empty-recipe", _empty_recipe(""), r"recipe file .*recipe\.yaml is empty \(no keys\)"),
    Row("11-comments-only-recipe", _empty_recipe("# generate: TODO\n\n# seed: 1\n"),
        r"recipe file .*recipe\.yaml is empty \(no keys\)"),
    # 12. a prompt longer than the context allows with max_new_tokens more
    Row("12-prompt-longer-than-context", _long_prompt,
        r"prompt 'long' is 6\d\d tokens long .*decoding\.max_new_tokens 8 that is 6\d\d tokens, more than the "
        r"policy's context of 512"),
    # 14. LLM judges: every bad setting is one line naming the objective and key, before any model loads
    Row("14-judge-rubric-missing", lambda c: c.evaluate("--judges", _judge(c, rubric=str(c.tmp / "rubrics/nope.txt"))),
        r"objective 'quality': judge\.rubric file .*rubrics/nope\.txt does not exist; expected a text file with "
        r"'=== system ===' and '=== user ===' sections"),
    Row("14-judge-rubric-without-answer", _rubric_without_answer,
        r"objective 'quality': judge\.rubric file .*rubric\.txt: expected a '=== user ===' section holding "
        r"\{question\} and \{answer\} once each \(missing or repeated: \['\{answer\}'\]\)"),
    Row("14-judge-api-key-unset", _judge_key_unset,
        r"objective 'quality': judge\.api_key_env names RMOD_TEST_JUDGE_KEY, which is not set \(or empty\); export "
        r"RMOD_TEST_JUDGE_KEY=<your key>"),
    Row("14-generate-judge-objective-api-key-unset", _judge_in_generate_key_unset,
        r"objective 'quality': judge\.api_key_env names RMOD_TEST_JUDGE_KEY, which is not set"),
    Row("14-judge-url-without-scheme", lambda c: c.evaluate("--judges", _judge(c, base_url="localhost:8000/v1")),
        r"objective 'quality': judge\.base_url: expected http\(s\)://host\[:port\]/v1, got 'localhost:8000/v1'"),
    Row("14-judge-url-unreachable", lambda c: c.evaluate("--judges", _judge(c)),
        r"objective 'quality': the judge endpoint http://127\.0\.0\.1:9/v1/chat/completions \(model 'judge-model'\) "
        r"failed a test request \(ConnectError.*\); expected an OpenAI-compatible server at judge\.base_url"),
    Row("14-judge-bad-scale", lambda c: c.evaluate("--judges", _judge(c, scale_min=10, scale_max=0)),
        r"objective 'quality': judge\.scale_min/scale_max: expected finite numbers with scale_min < scale_max, got "
        r"10\.0 and 0\.0"),
    Row("14-judge-key-in-recipe", lambda c: c.evaluate("--judges", _judge(c, api_key_env="sk-proj-abc123")),
        r"judge\.api_key_env: expected the NAME of an environment variable .*never put the key in a recipe"),
    Row("14-judges-of-another-kind", lambda c: c.evaluate("--judges", "[{name: concision}]"),
        r"judges: objective 'concision' has kind 'embedded'; judges are objectives of kind judge"),
]


ROWS += ISSUE_43
# Found only by scoring with the objective, reading a run being resumed or asking a judge: not --dry-run's checks.
NOT_DRY = {"6-eval-shard-damaged-mid-file", "10-python-objective-raises", "10-python-objective-nan",
           "10-python-objective-wrong-length", "14-judge-url-unreachable"}
for _row in ROWS:
    _row.dry = _row.dry and _row.id not in NOT_DRY
RECIPE_STAGES = ("generate", "distill", "eval", "values", "iterate")


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, dry_run, tiny_policy_dir, tiny_generate_dir, complete_eval, tmp_path, monkeypatch, capsys):
    """Each bad input is one line naming what is wrong, exit 2, nothing changed; ``--dry-run`` makes the
    same checks as the run (issue 43: one check function per stage)."""
    c = Ctx(tmp_path, tiny_policy_dir, tiny_generate_dir, complete_eval, monkeypatch)
    argv = row.build(c)
    if dry_run:
        if not row.dry or argv[0] not in RECIPE_STAGES:
            pytest.skip("not a check --dry-run makes (it loads no model and sends no request)")
        argv = [*argv, "--dry-run"]
    before = snapshot(c.watch)
    capsys.readouterr()
    code = run_cli(argv)
    err = capsys.readouterr().err
    stage = argv[0]
    lines = [line for line in err.splitlines() if line.startswith("rmod-distill ")]
    assert code == 2, f"exit {code}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err
    assert len(lines) == 1, err
    prefix = f"rmod-distill {stage}: error: "
    assert lines[0].startswith(prefix), lines[0]
    message = lines[0][len(prefix):]
    assert re.search(row.expect, message), f"{message!r} does not match {row.expect!r}"
    if row.hidden:
        assert row.hidden not in err, "a secret was printed"
    assert snapshot(c.watch) == before, "an input file or folder changed"
    for path in c.absent:
        assert not path.exists(), f"{path} was created by a refused start"


# ----------------------------------------------------------------------------- what must keep working


def _unfinished_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    info = json.loads((dst / "run.json").read_text())
    (dst / "run.json").write_text(json.dumps(dict(info, complete=False)))
    return dst


def test_failed_start_then_resume_with_trailing_slash_and_other_wandb_mode(tiny_policy_dir, tiny_generate_dir,
                                                                            tmp_path, monkeypatch):
    """Issue 12, case 9: a refused start leaves the unfinished run as it was, and the corrected
    command resumes it although output_dir ends in '/' and wandb.mode differs."""
    run = _unfinished_copy(tiny_generate_dir, tmp_path / "gen")
    c = Ctx(tmp_path, tiny_policy_dir, tiny_generate_dir, tmp_path, monkeypatch)
    marker = (run / "run.json").read_bytes()
    assert run_cli(c.generate("--wandb.mode", "offline", prompts=tmp_path / "typo.jsonl", out=run)) == 2
    assert (run / "run.json").read_bytes() == marker
    assert run_cli(c.generate("--wandb.mode", "offline", out=f"{run}/")) == 0
    assert json.loads((run / "run.json").read_text())["complete"] is True


def test_eval_rewrites_a_torn_samples_jsonl(tiny_policy_dir, tiny_generate_dir, complete_eval, tmp_path):
    """Issue 12, case 6: eval decodes into generations/shards; a samples.jsonl cut mid-line in an
    unfinished eval is simply written again from them."""
    run = _unfinished_copy(complete_eval, tmp_path / "eval")
    samples = run / "generations" / "samples.jsonl"
    whole = samples.read_bytes()
    samples.write_bytes(whole[: len(whole) // 2 + 7])
    assert run_cli(["eval", *eval_args(tiny_policy_dir, tiny_generate_dir, run)]) == 0
    assert samples.read_bytes() == whole


@pytest.mark.parametrize("stage", ["generate", "eval", "values", "distill"])
def test_help_shows_real_defaults(stage, capsys):
    """Issue 12, case 11: list defaults are shown as values, not '<factory>'; objectives list theirs."""
    assert run_cli([stage, "--help"]) == 0
    out = capsys.readouterr().out
    assert "<factory>" not in out
    if stage != "distill":
        assert ("--objectives  (a list of a mapping of ObjectiveSpec keys, default [{name: harmlessness}, "
                "{name: warmth}, {name: objectivity}, {name: relevance}, {name: concision}]): A list of ObjectiveSpec "
                "mappings") in out
        assert "      objectives[i].kind  (str, default 'embedded')" in out
    else:
        assert "--model.lora_target_modules  (a list of str, default ['q_proj', 'k_proj', 'v_proj', 'o_proj'])" in out
    if stage == "generate":
        assert "--methods  (a list of str, default ['rmod'])" in out


def test_overwrite_sets_an_unfinished_run_aside_with_what_a_user_put_in_it(tmp_path):
    """Issue 43, items 1-2: --overwrite over an unfinished run (another recipe) never deletes it."""
    from rmod_distill.artifacts import RunFolder

    out = tmp_path / "run"
    RunFolder(out, "generate", {"seed": 1}, False).begin()
    (out / "notes.txt").write_text("mine\n")
    again = RunFolder(out, "generate", {"seed": 2}, True)
    again.check()
    again.begin()
    again.finish({})
    (aside,) = tmp_path.glob(".run.unfinished-*")
    assert (aside / "notes.txt").read_text() == "mine\n"
    assert json.loads((out / "run.json").read_text())["complete"] is True


def test_a_file_written_into_a_run_while_it_is_overwritten_is_kept(tmp_path):
    from rmod_distill.artifacts import RunFolder

    out = tmp_path / "run"
    first = RunFolder(out, "generate", {"seed": 1}, False)
    (first.begin() / "samples.jsonl").write_text("old\n")
    first.finish({})
    again = RunFolder(out, "generate", {"seed": 1}, True)
    again.check()
    (again.begin() / "samples.jsonl").write_text("new\n")
    (out / "mine.txt").write_text("written while the new run ran\n")
    again.finish({})
    assert (out / "samples.jsonl").read_text() == "new\n" and not (out / "mine.txt").exists()
    (kept,) = tmp_path.glob(".run.replaced-*")
    assert (kept / "mine.txt").read_text() == "written while the new run ran\n"
    # Without a file of the user's, the old run is removed as before.
    third = RunFolder(out, "generate", {"seed": 1}, True)
    third.check()
    third.begin()
    third.finish({})
    assert len(list(tmp_path.glob(".run.replaced-*"))) == 1
