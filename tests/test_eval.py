"""The eval stage on the tiny policy: metrics, report, plots, and the train/eval overlap check."""

import json

import pytest

from rmod_distill.errors import UserError
from rmod_distill.artifacts import read_jsonl
from rmod_distill.config import parse_config
from rmod_distill.distill import DistillConfig
from rmod_distill.distill import run as distill_run
from rmod_distill.eval import EvalConfig, run


@pytest.fixture(scope="module")
def adapter(tiny_policy_dir, tiny_generate_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-adapter") / "adapter"
    distill_run(parse_config(DistillConfig, [
        "--model.model_name_or_path", str(tiny_policy_dir), "--generate_dir", str(tiny_generate_dir),
        "--output_dir", str(out),
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--model.lora_r", "4", "--use_cpu",
        "--eval_strategy", "no", "--activation_checkpointing", "false", "--wandb.mode", "disabled", "--sample_prompts", "1",
    ]))
    return out


def eval_args(tiny_policy_dir, tiny_generate_dir, adapter, out, *extra):
    return [
        "--policy.model", str(tiny_policy_dir), "--adapter", str(adapter), "--generate_dir", str(tiny_generate_dir),
        "--prompts.path", str(tiny_generate_dir.parent / "prompts.jsonl"), "--prompts.split", "eval",
        "--objectives", "[{name: harmlessness}, {name: concision}]",
        "--decoding.num_candidates", "2", "--decoding.block_size", "4", "--decoding.max_new_tokens", "8",
        "--bootstrap_resamples", "200", "--output_dir", str(out), *extra,
    ]


def test_eval_writes_metrics_report_and_plots(tiny_policy_dir, tiny_generate_dir, adapter, tmp_path):
    out = run(parse_config(EvalConfig, eval_args(tiny_policy_dir, tiny_generate_dir, adapter, tmp_path / "e")))
    metrics = json.loads((out / "metrics.json").read_text())
    methods = metrics["methods"]
    assert set(methods) == {"distilled", "rmod", "cd", "best-of-n", "best-of-n-maxmin", "reference"}
    for m in methods.values():
        lo, hi = m["worst_case_reward_ci"]
        assert lo <= m["worst_case_reward"] <= hi
        assert m["prompts"] == 4 and m["seconds_per_response"] > 0
    assert methods["reference"]["worst_case_win_rate"] == 0.5  # against itself: every pair ties
    assert methods["rmod"]["tokens_sampled_per_response"] > methods["distilled"]["tokens_sampled_per_response"]
    rows = read_jsonl(out / "generations" / "samples.jsonl")
    assert len(rows) == 6 * 4 and {r["split"] for r in rows} == {"eval"}
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| `"))
    table = [line for line in lines[first:first + 6] if line.startswith("| `")]  # the main table
    wc = [float(line.split("|")[2].split()[0]) for line in table]
    assert len(table) == 6 and wc == sorted(wc, reverse=True)
    assert len(lines) > first + 6 and not lines[first + 6].startswith("| `")  # exactly six methods
    assert "**Distillation:**" in report and "## Samples" in report
    assert "recovery of RMOD's lift by the adapter, by median" in report and "`rmod - cd`" in report
    recovery = metrics["paired"]["recovery"]["mean"]
    lift = methods["rmod"]["worst_case_reward"] - methods["reference"]["worst_case_reward"]
    got = methods["distilled"]["worst_case_reward"] - methods["reference"]["worst_case_reward"]
    assert recovery["value"] == pytest.approx(got / lift)
    assert set(metrics["scales"]) == {"zscore", "quantile"} and "quantile: worst case" in report
    assert metrics["scales"]["zscore"]["methods"]["rmod"]["worst_case_reward"] == methods["rmod"]["worst_case_reward"]
    for m in methods.values():  # the objectives' average, with its interval (the new plot's x)
        lo, hi = m["average_ci"]
        assert lo <= m["average"] <= hi
    for name in ("objective_means", "worst_case_vs_cost", "worst_case_vs_average", "rmod_weights"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
        assert f"plots/{name}.png" in report
    card = (adapter / "README.md").read_text()
    assert "see the eval stage's report.md" not in card and "| `distilled` | " in card  # the card is filled in
    assert f"{methods['rmod']['worst_case_reward']:+.3f}" in card
    with pytest.raises(UserError, match="--overwrite"):
        run(parse_config(EvalConfig, eval_args(tiny_policy_dir, tiny_generate_dir, adapter, out)))


def test_eval_on_training_prompts_fails(tiny_policy_dir, tiny_generate_dir, adapter, tmp_path):
    cfg = parse_config(EvalConfig, eval_args(tiny_policy_dir, tiny_generate_dir, adapter, tmp_path / "x",
                                             "--prompts.split", "train"))
    with pytest.raises(ValueError, match="eval prompts were used to train the adapter"):
        run(cfg)


def test_eval_refuses_other_objectives(tiny_policy_dir, tiny_generate_dir, adapter, tmp_path):
    cfg = parse_config(EvalConfig, eval_args(tiny_policy_dir, tiny_generate_dir, adapter, tmp_path / "x",
                                             "--objectives", "[{name: warmth}, {name: concision}]"))
    with pytest.raises(ValueError, match="normalisation was measured for objectives"):
        run(cfg)


def test_eval_samples_per_prompt(tiny_policy_dir, tiny_generate_dir, adapter, tmp_path):
    out = run(parse_config(EvalConfig, eval_args(tiny_policy_dir, tiny_generate_dir, adapter, tmp_path / "s",
                                                 "--methods", "[distilled, reference]", "--samples_per_prompt", "3")))
    rows = read_jsonl(out / "generations" / "samples.jsonl")
    ids = sorted(r["prompt_id"] for r in rows if r["method"] == "distilled")
    assert len(ids) == 12 and sum("#s2" in i for i in ids) == 4  # 4 eval prompts x 3 answers
    seeds = [r["seed"] for r in rows if r["method"] == "distilled"]
    assert len(set(seeds)) == 12  # every answer its own seed
    methods = json.loads((out / "metrics.json").read_text())["methods"]
    assert methods["distilled"]["prompts"] == 4 and methods["distilled"]["answers"] == 12
    assert "3 answers each per method" in (out / "report.md").read_text()


def test_report_says_recovery_is_undefined_without_rmod_lift(tmp_path):
    """Issue 43 item 19: RMOD below `reference` (a lift <= 0): the report says the recovery is undefined (it printed
    a share of two negative lifts, "200% of RMOD's lift"), and metrics.json's recovery is null with the reason."""
    import numpy as np

    from rmod_distill.eval import scale_summary, write_report
    from rmod_distill.metrics import method_metrics, paired_comparisons

    names = ["harmlessness", "concision"]
    ref = np.array([[0.0, -2.0], [1.0, -1.0], [0.0, 0.0], [-3.0, 1.0]])
    z = {"reference": ref, "rmod": ref - 0.5, "distilled": ref - 1.0}
    cfg = EvalConfig(methods=list(z))
    metrics = {m: dict(method_metrics(v, names, ref, 50), tokens_sampled_per_response=8.0,
                       forward_tokens_per_response=8.0, seconds_per_response=1.0, finished_share=1.0)
               for m, v in z.items()}
    paired = paired_comparisons(z, 50)
    scales = {"zscore": scale_summary(z, paired, cfg), "quantile": scale_summary(z, paired, cfg)}
    report = write_report(cfg, metrics, names, [], {}, tmp_path, paired, scales)
    assert "% of RMOD's lift" not in report and "200%" not in report
    assert "the recovery is undefined: RMOD's lift over reference is -0.500 <= 0" in report
    assert "recovery of RMOD's lift by the adapter, by mean: undefined (RMOD's lift over reference by mean" in report
    assert "zscore: by mean undefined (" in report
    saved = json.loads(json.dumps({"paired": paired, "scales": scales}, allow_nan=False))
    assert saved["paired"]["recovery"]["mean"]["value"] is None
    assert "<= 0" in saved["scales"]["zscore"]["recovery"]["median"]["undefined"]


def test_worst_case_against_average_plot(tmp_path):
    """Issue 47: each method's mean worst case (y) against its mean of the objectives' average (x), with both
    intervals, is a PNG in the report beside the earlier plots (whose keys and files stay); every title fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from rmod_distill.eval import make_plots, write_report
    from rmod_distill.metrics import method_metrics

    names = ["harmlessness", "warmth", "objectivity", "relevance", "concision"]
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 5))
    z = {"reference": ref, "rmod": ref + 0.3, "distilled": ref + 0.2}
    metrics = {m: dict(method_metrics(v, names, ref, 50), tokens_sampled_per_response=8.0,
                       forward_tokens_per_response=8.0, seconds_per_response=1.0 + i, finished_share=1.0)
               for i, (m, v) in enumerate(z.items())}
    for m, v in metrics.items():
        assert v["average"] == pytest.approx(z[m].mean(1).mean())  # the mean over answers of the objectives' mean
        assert v["average_ci"][0] <= v["average"] <= v["average_ci"][1]
    rows = [{"method": "rmod", "block_weights": [list(rng.dirichlet(np.ones(5))) for _ in range(3)]} for _ in range(4)]
    titles = []
    save = plt.Figure.savefig

    def check_titles(fig, *args, **kwargs):  # every title inside its image, after tight_layout
        fig.canvas.draw()
        box = fig.bbox
        for ax in fig.axes:
            extent = ax.title.get_window_extent()
            titles.append(ax.get_title())
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and extent.y1 <= box.y1, ax.get_title()
        return save(fig, *args, **kwargs)

    plt.Figure.savefig = check_titles
    try:
        plots = make_plots(metrics, names, rows, tmp_path / "plots")
    finally:
        plt.Figure.savefig = save
    assert list(plots) == ["objective_means", "worst_case_vs_cost", "worst_case_vs_average", "rmod_weights"]
    assert "Worst case against average" in titles
    png = plots["worst_case_vs_average"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    report = write_report(EvalConfig(methods=list(z)), metrics, names, [], plots, tmp_path)
    assert "![worst_case_vs_average](plots/worst_case_vs_average.png)" in report
