"""Stage 3, eval: the distilled adapter against RMOD and the baselines, on worst-case reward.

    rmod-distill eval --config recipes/default/eval.yaml [--key value ...]
    make eval RECIPE=default

Decodes the held-out prompts with every method through the generate stage's engine
(``distilled`` is the base policy with the adapter, sampled plainly; every other method
runs the frozen base policy), scores them with the generate run's objectives and
normalisation, and writes to ``output_dir``: ``metrics.json`` (every metric of rmod.md per
method with 95% bootstrap intervals, and cost), ``report.md`` (the table sorted by
worst-case reward, plots, side-by-side samples), ``plots/*.png`` and ``generations/``
(the per-sample rows, resumable like generate).

With ``judges`` (objectives of kind ``judge``: an LLM grading every answer on a rubric, the
paper's GPT-4o protocol), every answer is also graded after decoding, and the report adds a
judge table beside the reward-model one: per-objective mean scores on the rubric's scale,
win rates against ``reference`` and the paper's WCWR with intervals, missing scores per
method and objective (a method with more than ``judge_max_missing`` of them is flagged),
and the judge's requests, cache hits and tokens per method (``metrics.json`` ``judge``; the
replies in ``generations/judge.jsonl``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rmod_distill.adapters import MANIFEST, fetch_adapter
from rmod_distill.artifacts import MARKER, RunFolder, atomic_write_text, provenance, read_json, read_run, write_json, write_jsonl
from rmod_distill.cards import adapter_card
from rmod_distill.config import stage_main, to_dict
from rmod_distill.engine.decoding import REFERENCE_DECODING, DecodingConfig
from rmod_distill.engine.runs import decode_methods, merged_rows, process_state
from rmod_distill.engine.setup import BackendConfig, build_decoder, check_decoding_inputs, serve_policy
from rmod_distill.errors import UserError
from rmod_distill.metrics import bootstrap_interval, complete, format_recovery, json_safe, method_metrics, \
    paired_comparisons, median_worst_case, prompt_groups, recovery, TAIL_Z, worst_case_win_rate
from rmod_distill.objectives import (SCALES, Normalizer, ObjectiveSet, ObjectiveSpec, check_scale, default_objectives,
                                     scorer_id)
from rmod_distill.policy import PolicyConfig
from rmod_distill.prompts import PromptsConfig, load_prompts, with_samples
from rmod_distill.report import method_table, order_key, paired_lines, pct, signed
from rmod_distill.tracking import Tracker, WandbConfig, adapter_reference, dataset_reference

DEFAULT_METHODS = ["distilled", "rmod", "cd", "best-of-n", "best-of-n-maxmin", "reference"]


@dataclass
class EvalConfig:
    """Recipe of the eval stage."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    adapter: str | None = field(
        default="runs/default/distill",
        metadata={"help": "The distilled adapter (any `rmod-distill download` source); null to skip `distilled`."},
    )
    generate_dir: str = field(
        default="runs/default/generate",
        metadata={"help": "Generate run whose normalisation (and objectives) the scores reuse."},
    )
    prompts: PromptsConfig = field(default_factory=lambda: PromptsConfig(split="eval"))
    objectives: list[ObjectiveSpec] = field(default_factory=default_objectives)
    decoding: DecodingConfig = field(
        default_factory=DecodingConfig,
        metadata={"help": "Keys not set here come from generate_dir's run; of those that shape the reference answers "
                          "(the normalisation's samples: max_new_tokens, temperature, top_p, top_k) "
                          "a different value is refused."})
    scale: str = field(
        default="zscore",
        metadata={"help": "How rewards of different objectives are put on one scale for decoding and metrics: zscore "
                          "(mean/std of reference samples) | quantile (the reference samples' CDF mapped to normal "
                          "quantiles: bounded, so an outlier cannot own the mean)."},
    )
    backend: BackendConfig = field(default_factory=BackendConfig)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS), metadata={"help": "Methods compared."})
    samples_per_prompt: int = field(
        default=1,
        metadata={"help": "Answers per prompt and method (sample j > 0 as '<id>#s<j>', its own seed): tighter "
                          "figures from the same prompts; intervals resample prompts, with all their answers."},
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts decoded together."})
    seed: int = field(default=1, metadata={"help": "Run seed (differs from generate's, so samples are fresh)."})
    bootstrap_resamples: int = field(default=2000, metadata={"help": "Resamples for the 95% intervals."})
    samples_in_report: int = field(default=4, metadata={"help": "Side-by-side samples shown in report.md."})
    output_dir: str = field(default="runs/default/eval", metadata={"help": "Where the report is written."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished eval in output_dir."})
    wandb: WandbConfig = field(default_factory=WandbConfig)
    judges: list[ObjectiveSpec] = field(
        default_factory=list,
        metadata={"help": "LLM judges (objectives of kind judge) that grade every answer after decoding; the report "
                          "shows their table beside the reward-model one."},
    )
    judge_max_missing: float = field(
        default=0.05,
        metadata={"help": "Flag a method whose share of missing judge scores on any objective is above this."},
    )

    @classmethod
    def inherit(cls, data: dict) -> dict:
        """The recipe (``data``) with the ``decoding`` keys it leaves out taken from its generate run,
        whose reference answers measured the normalisation every score here is read against."""
        gen = data.get("generate_dir", cls.__dataclass_fields__["generate_dir"].default)
        try:
            made = json.loads((Path(str(gen)) / MARKER).read_text())["config"]["decoding"]
        except (OSError, ValueError, KeyError, TypeError):
            return data  # no generate run there: check() says so
        given = data.get("decoding") or {}
        if isinstance(made, dict) and isinstance(given, dict):
            known = {f.name for f in dataclasses.fields(DecodingConfig)}
            data["decoding"] = {**{k: v for k, v in made.items() if k in known}, **given}
        return data

    def __post_init__(self):
        for spec in self.judges:
            if spec.kind != "judge":
                raise ValueError(f"judges: objective {spec.name!r} has kind {spec.kind!r}; judges are objectives of "
                                 "kind judge (put other kinds under objectives)")
        if len({j.name for j in self.judges}) != len(self.judges):
            raise ValueError(f"judges: names must be unique, got {[j.name for j in self.judges]}")
        if not 0 <= self.judge_max_missing <= 1:
            raise ValueError(f"judge_max_missing must be a share in [0, 1], got {self.judge_max_missing}")
        if "distilled" in self.methods and not self.adapter:
            raise ValueError("method 'distilled' needs `adapter`; set it or drop 'distilled' from methods")
        if "reference" not in self.methods:
            raise ValueError("methods must include 'reference': win rates are measured against it")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.bootstrap_resamples < 1:
            raise ValueError(f"bootstrap_resamples must be >= 1, got {self.bootstrap_resamples}")
        check_scale(self.scale, self.decoding.values)


def check_no_overlap(adapter_dir: Path, prompt_ids: list[str]) -> None:
    """Fail when an eval prompt was among the adapter's training prompts."""
    info_path = adapter_dir / "run.json"
    if not info_path.exists():
        print(f"eval: warning: {info_path} is missing; cannot check the adapter's training prompts")
        return
    trained = set(read_json(info_path, "adapter run marker").get("train_prompt_ids", []))
    overlap = sorted(trained & set(prompt_ids))
    if overlap:
        raise UserError(
            f"{len(overlap)} eval prompts were used to train the adapter in {adapter_dir} (first: {overlap[0]}); "
            "evaluate on held-out prompts (prompts.split: eval)"
        )


def score_matrix(rows: list[dict], key: str, names: list[str], method: str) -> np.ndarray:
    """``[n, G]`` of one method's rows under ``key`` (rewards, normalized, judge); a missing score is NaN."""
    return np.array([[np.nan if r[key][g] is None else r[key][g] for g in names] for r in rows
                     if r["method"] == method], dtype=np.float64).reshape(-1, len(names))


def make_plots(metrics: dict, names: list[str], rows: list[dict], out: Path) -> dict[str, Path]:
    """Per-objective means, worst case against cost, worst case against the objectives' average, and RMOD's
    chosen weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    order = sorted(metrics, key=lambda m: order_key(metrics[m]["worst_case_reward"]))
    paths = {}

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(order)
    x = np.arange(len(names))
    for i, method in enumerate(order):
        m = metrics[method]
        means = [m["objective_means"][g] for g in names]
        # clipped at 0: a percentile interval of a skewed or constant statistic can sit beside its mean
        err = np.clip(np.array([[means[j] - m["objective_means_ci"][g][0], m["objective_means_ci"][g][1] - means[j]]
                                for j, g in enumerate(names)], dtype=float).T, 0, None)
        ax.bar(x + i * width - 0.4 + width / 2, means, width, yerr=err, capsize=2, label=method)
    ax.set_xticks(x, names)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("mean normalised reward (95% CI)")
    ax.set_title("Per-objective means by method")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    paths["objective_means"] = out / "objective_means.png"
    fig.savefig(paths["objective_means"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in order:
        m = metrics[method]
        lo, hi = m["worst_case_reward_ci"]
        ax.errorbar(m["seconds_per_response"], m["worst_case_reward"],
                    yerr=[[max(0.0, m["worst_case_reward"] - lo)], [max(0.0, hi - m["worst_case_reward"])]], fmt="o",
                    capsize=3)
        ax.annotate(method, (m["seconds_per_response"], m["worst_case_reward"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per response (log scale)")
    ax.set_ylabel("worst-case reward (95% CI)")
    ax.set_title("Worst-case reward against cost")
    fig.tight_layout()
    paths["worst_case_vs_cost"] = out / "worst_case_vs_cost.png"
    fig.savefig(paths["worst_case_vs_cost"], dpi=120)
    plt.close(fig)

    # The trade-off RMOD exists for: worst case (y) against the objectives' average (x), both with 95% intervals
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in order:
        m = metrics[method]
        x_mean, y_mean = m["average"], m["worst_case_reward"]
        if not (np.isfinite(x_mean) and np.isfinite(y_mean)):
            continue
        (xlo, xhi), (ylo, yhi) = m.get("average_ci", (x_mean, x_mean)), m["worst_case_reward_ci"]
        ax.errorbar(x_mean, y_mean, xerr=[[max(0.0, x_mean - xlo)], [max(0.0, xhi - x_mean)]],
                    yerr=[[max(0.0, y_mean - ylo)], [max(0.0, yhi - y_mean)]], fmt="o", capsize=3, label=method)
        ax.annotate(method, (x_mean, y_mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("mean of the objectives' average (95% CI)")
    ax.set_ylabel("mean worst-case reward (95% CI)")
    ax.set_title("Worst case against average")
    fig.tight_layout()
    paths["worst_case_vs_average"] = out / "worst_case_vs_average.png"
    fig.savefig(paths["worst_case_vs_average"], dpi=120)
    plt.close(fig)

    weights = np.array([w for r in rows if r["method"] == "rmod" for w in r["block_weights"]])
    if weights.size:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.boxplot([weights[:, j] for j in range(len(names))], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.set_ylabel("weight w*_g at a block")
        share = (weights.argmax(1)[:, None] == np.arange(len(names))).mean(0)
        # the share of blocks where each objective has the largest weight goes under its name: the title stays short
        ax.set_xticks(range(1, len(names) + 1), [f"{g}\n(top {s:.0%})" for g, s in zip(names, share)], fontsize=8)
        ax.set_xlabel("objective (share of blocks where its weight is the largest)", fontsize=8)
        ax.set_title("RMOD's worst-case weights per block")
        fig.tight_layout()
        paths["rmod_weights"] = out / "rmod_weights.png"
        fig.savefig(paths["rmod_weights"], dpi=120)
        plt.close(fig)
    return paths


def scale_summary(z: dict[str, np.ndarray], paired: dict, cfg: EvalConfig, groups: np.ndarray | None = None) -> dict:
    """The headline figures of every method on one scale: worst case by mean and median, the paper's WCWR
    (``groups``: the prompt of each row, resampled together)."""
    out = {}
    for method, v in z.items():
        whole = complete(v)
        worst = v[whole].min(1)
        lo, hi = bootstrap_interval(lambda i, w=worst: float(w[i].mean()), len(worst), cfg.bootstrap_resamples,
                                    cfg.seed, groups=None if groups is None else groups[whole])
        out[method] = {"worst_case_reward": float(worst.mean()) if worst.size else float("nan"),
                       "worst_case_reward_ci": [lo, hi],
                       "median_worst_case": median_worst_case(v),
                       "worst_case_win_rate": worst_case_win_rate(v, z["reference"])}
    # JSON-safe (metrics.json): a figure that cannot be computed is None, never NaN.
    return json_safe({"methods": out, "recovery": paired.get("recovery")})


def _scales_lines(scales: dict) -> list[str]:
    lines = ["Every scale (the same answers; quantile maps each raw reward through the reference samples' CDF to a "
             "normal quantile, so no single answer can own a mean):", "",
             "| method | " + " | ".join(f"{s}: worst case [95% CI] | {s}: median worst case | {s}: WCWR (paper)"
                                         for s in scales) + " |",
             "|---|" + "---|---|---|" * len(scales)]
    methods = list(next(iter(scales.values()))["methods"])
    for method in methods:
        cells = []
        for s in scales.values():
            m = s["methods"][method]
            lo, hi = m["worst_case_reward_ci"]
            wcwr = "-" if method == "reference" or m["worst_case_win_rate"] is None else \
                f"{100 * m['worst_case_win_rate']:.1f}%"
            cells += [f"{signed(m['worst_case_reward'])} [{signed(lo)}, {signed(hi)}]",
                      signed(m["median_worst_case"]), wcwr]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    rec = [f"{name}: by mean {format_recovery(s['recovery']['mean'], interval=False)}, by median "
           f"{format_recovery(s['recovery']['median'], interval=False)}" for name, s in scales.items()
           if s.get("recovery")]
    if rec:
        lines += ["", "Recovery of RMOD's worst-case lift by the adapter, " + "; ".join(rec) + "."]
    return lines + [""]


def grade_with_judges(judges: ObjectiveSet, rows: list[dict], methods: list[str]) -> tuple[dict, list[dict]]:
    """Grade every answer with every judge, method by method; adds ``judge`` scores (null: missing) to the rows.

    Returns each method's judge usage (requests, cache hits, missing scores, tokens) and one
    record per graded answer (the reply and why a score is missing) for ``generations/judge.jsonl``.
    """
    usage, records = {}, []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        before = judges.judge_usage()
        scores = judges.raw([r["messages"] for r in mine], [r["completion"] for r in mine])
        usage[method] = {g: u.minus(before[g]).as_dict() for g, u in judges.judge_usage().items()}
        for objective in judges.objectives:
            for r, res in zip(mine, objective.last):
                records.append({"prompt_id": r["prompt_id"], "method": method, "objective": objective.name,
                                "score": res.score, "status": res.status, "attempts": res.attempts,
                                "cached": res.cached, "error": res.error, "reply": res.reply})
        for r, row in zip(mine, scores):
            r["judge"] = {g: None if np.isnan(x) else float(x) for g, x in zip(judges.names, row)}
    return usage, records


def _groups(rows: list[dict]) -> np.ndarray | None:
    """The prompt of each of a method's rows (every method's are in the same prompt order) when a
    prompt has several answers (``samples_per_prompt``): intervals then resample prompts."""
    return prompt_groups([r["prompt_id"] for r in rows if r["method"] == "reference"])


def judge_metrics(cfg: EvalConfig, rows: list[dict], names: list[str], usage: dict) -> dict:
    """The judge table's figures per method, on the rubrics' own scale (the paper compares raw 0-10 scores)."""
    s = {m: score_matrix(rows, "judge", names, m) for m in cfg.methods}
    out = {}
    for method in cfg.methods:
        m = method_metrics(s[method], names, s["reference"] if method != "reference" else None,
                           cfg.bootstrap_resamples, cfg.seed, win_rate_intervals=True, groups=_groups(rows))
        n = max(m["answers"], 1)  # missing scores are counted per answer
        over = sorted(g for g in names if m["missing"][g] / n > cfg.judge_max_missing)
        total = {k: sum(u[k] for u in usage[method].values()) for k in next(iter(usage[method].values()))}
        out[method] = dict(m, usage=usage[method], tokens=total["total_tokens"], requests=total["requests"],
                           cache_hits=total["cache_hits"], flagged=bool(over), flagged_objectives=over)
    return {"objectives": names, "judges": [{"name": j.name, "model": j.model, "base_url": j.judge.base_url,
                                             "rubric": j.judge.rubric, "scale": [j.judge.scale_min, j.judge.scale_max]}
                                            for j in cfg.judges],
            "max_missing": cfg.judge_max_missing, "methods": out}


def _num(x: float) -> str:
    """A judge score for the report; "-" where no prompt had the scores to compute it."""
    return "-" if np.isnan(x) else f"{x:.2f}"


def _judge_lines(judge: dict, metrics: dict) -> list[str]:
    names, jm = judge["objectives"], judge["methods"]
    lines = ["## Judge scores", "",
             "Every answer graded by " + "; ".join(
                 f"`{j['name']}`: `{j['model']}` at {j['base_url']} on `{j['rubric']}` ({j['scale'][0]:g} to "
                 f"{j['scale'][1]:g})" for j in judge["judges"]) +
             ", temperature 0. A reply that could not be parsed (after the retries) or a failed request is a missing "
             "score, never a default: means use the scores present, a per-objective win rate leaves out the prompts "
             "missing that objective on either side, and worst-case figures (WCWR) use the prompts with every score on "
             "both sides. Methods with more than "
             f"{100 * judge['max_missing']:.0f}% missing on an objective are flagged.", "",
             "Side by side (reward models | judge):", "",
             "| method | worst-case reward (RM) | WCWR (paper, RM) | worst-case judge score | WCWR (paper, judge) "
             "[95% CI] | missing judge scores |", "|---|---|---|---|---|---|"]
    order = sorted(jm, key=lambda m: order_key(jm[m]["worst_case_reward"]))
    for method in order:
        j, r = jm[method], metrics[method]
        ref = method == "reference"
        lo, hi = j.get("worst_case_win_rate_ci", (np.nan, np.nan))
        rm_wcwr = "-" if ref else pct(r["worst_case_win_rate"])
        judge_wcwr = "-" if ref else f"{pct(j['worst_case_win_rate'])} [{pct(lo)}, {pct(hi)}]"
        lines.append(f"| `{method}` | {r['worst_case_reward']:+.3f} | {rm_wcwr} | {_num(j['worst_case_reward'])} | "
                     f"{judge_wcwr} | {sum(j['missing'].values())} |")
    head = ["method", *[f"{g}: mean [95% CI]" for g in names], *[f"{g}: win rate [95% CI]" for g in names],
            "min-objective win rate", *[f"{g}: missing" for g in names], "requests", "cache hits", "judge tokens",
            "flag"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in order:
        j = jm[method]
        ref = method == "reference"
        cells = [f"`{method}`"]
        for g in names:
            lo, hi = j["objective_means_ci"][g]
            cells.append(f"{_num(j['objective_means'][g])} [{_num(lo)}, {_num(hi)}]")
        for g in names:
            cells.append("-" if ref else f"{pct(j['win_rates'][g])} [{pct(j['win_rates_ci'][g][0])}, "
                                         f"{pct(j['win_rates_ci'][g][1])}]")
        cells.append("-" if ref else pct(j["min_objective_win_rate"]))
        cells += [f"{j['missing'][g]}/{j['answers']}" for g in names]
        cells += [str(j["requests"]), str(j["cache_hits"]), str(j["tokens"]),
                  f"**too many missing** ({', '.join(j['flagged_objectives'])})" if j["flagged"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(cfg: EvalConfig, metrics: dict, names: list[str], rows: list[dict], plots: dict, out: Path,
                 paired: dict | None = None, scales: dict | None = None, judge: dict | None = None) -> str:
    """report.md: the table, how to read it, the plots and side-by-side samples."""
    ref, rmod = metrics.get("reference"), metrics.get("rmod")
    lines = [
        "# RMOD distillation: eval report", "",
        f"{metrics['reference']['prompts']} held-out prompts ({cfg.prompts.path}, split {cfg.prompts.split}"
        + (f", subset {cfg.prompts.subset}" if cfg.prompts.subset != "all" else "")
        + (f"; {cfg.samples_per_prompt} answers each per method, intervals resampling prompts"
           if cfg.samples_per_prompt > 1 else "") + "); "
        f"objectives {', '.join(names)}, z-normalised with `{cfg.generate_dir}/normalization.json`. "
        f"K={cfg.decoding.num_candidates}, B={cfg.decoding.block_size}, lambda={cfg.decoding.lam}, "
        f"solver `{cfg.decoding.solver}`, {cfg.decoding.max_new_tokens} new tokens, temperature "
        f"{cfg.decoding.temperature}, top-p {cfg.decoding.top_p}.", "",
        "Worst-case reward is mean over prompts of the lowest normalised objective (the headline). "
        "WCWR (paper) is the share of prompts where the method's lowest objective beats `reference`'s lowest "
        "objective, ties counting half (the paper's definition); min-objective win rate is the lowest of the "
        "per-objective win rates against `reference`. The tail: the share of answers whose lowest objective is "
        f"below z = {TAIL_Z:g}, and the mean of the worst 5% of answers' worst case.", "",
        method_table(metrics, names), "",
    ]
    if paired:
        lines += paired_lines(paired)
    if scales and len(scales) > 1:
        lines += _scales_lines(scales)
    if cfg.decoding.solver == "reference":
        lines += ["Note: the `reference` solver (10 clipped gradient steps, as the public implementation) stops "
                  "far from the argmin of the weight problem and inverts the lambda trend.", ""]
    if ref and rmod and "distilled" in metrics:
        d = metrics["distilled"]
        lift = rmod["worst_case_reward"] - ref["worst_case_reward"]
        got = d["worst_case_reward"] - ref["worst_case_reward"]
        share, why = recovery(got, lift)
        kept = f"{share:.0%} of RMOD's lift" if why is None else f"the recovery is undefined: {why}"
        cost = d["seconds_per_response"] / rmod["seconds_per_response"]
        lines += [
            f"**Distillation:** RMOD lifts worst-case reward by {signed(lift)} over `reference`; the distilled "
            f"adapter lifts it by {signed(got)} ({kept}) at {cost:.0%} of RMOD's time per response "
            f"({d['tokens_sampled_per_response']:.0f} vs {rmod['tokens_sampled_per_response']:.0f} tokens sampled).", "",
        ]
    if judge:
        lines += _judge_lines(judge, metrics)
    for key, path in plots.items():
        if key == "worst_case_vs_average":
            lines += ["Worst case against average: each method's mean worst-case reward (y) against its mean over "
                      "answers of the objectives' average normalised reward (x), with 95% bootstrap intervals on "
                      "both; up is robustness, right is the plain multi-objective score.", ""]
        lines += [f"![{key}](plots/{path.name})", ""]
    by = {}
    for r in rows:
        by.setdefault(r["prompt_id"], {})[r["method"]] = r
    lines += ["## Samples", ""]
    for pid in list(by)[: cfg.samples_in_report]:
        first = next(iter(by[pid].values()))
        lines += [f"**{pid}** ({first['category']}): {first['prompt']}", ""]
        for method in ("reference", "rmod", "distilled"):
            if method in by[pid]:
                r = by[pid][method]
                text = r["completion"].replace("\n", " ")
                worst = "missing" if r["worst_case"] is None else f"{r['worst_case']:+.2f}"
                judged = "".join(f", {g} " + ("missing" if v is None else f"{v:g}") for g, v in r.get("judge", {}).items())
                lines += [f"- `{method}` (worst case {worst}{judged}): {text}"]
        lines.append("")
    text = "\n".join(lines)
    atomic_write_text(out / "report.md", text)
    return text


def update_model_card(adapter_dir: Path, metrics: dict, report: Path, prompts: str) -> bool:
    """Write the distilled adapter's model card again, now with the eval figures.

    Only a distill output folder is touched (not a hashed download copy, whose manifest
    would then fail).
    """
    info_path = adapter_dir / "run.json"
    if (adapter_dir / MANIFEST).exists() or not info_path.exists():
        return False
    info = read_json(info_path, "adapter run marker")
    if info.get("stage") != "distill" or not info.get("complete"):
        return False
    card = adapter_card(info, metrics, str(report), prompts)
    atomic_write_text(adapter_dir / "README.md", str(card))
    return True


def check_objectives(cfg: EvalConfig, norm_path: Path, gen_info: dict) -> Normalizer:
    """The recipe's objectives must be the generate run's (``gen_info``: its run.json), spec for spec, and
    match its normalisation."""
    normalizer = Normalizer.load(norm_path)
    normalizer.check_names([o.name for o in cfg.objectives], str(norm_path),
                           [scorer_id(o) for o in cfg.objectives])
    made = gen_info.get("objective_specs")
    mine = to_dict(cfg.objectives)
    if made is not None:  # keys added to ObjectiveSpec since that run (judge) count only when set
        mine = [{k: v for k, v in m.items() if k in g or v is not None} for m, g in zip(mine, made)] + mine[len(made):]
    if made is not None and made != mine:
        diff = next((m, g) for m, g in zip(mine, made) if m != g)
        keys = sorted(k for k in set(diff[0]) | set(diff[1]) if diff[0].get(k) != diff[1].get(k))
        raise UserError(
            f"objective {diff[0]['name']!r}: the recipe's spec differs from the one {cfg.generate_dir} was "
            f"normalised with (keys {keys}); scores would be read against another objective's statistics"
        )
    return normalizer


def check_decoding_matches(cfg: EvalConfig, gen_info: dict) -> None:
    """Scores are read against generate_dir's normalisation, measured on reference answers decoded
    with its settings: eval's reference answers must be decoded the same way."""
    made = gen_info.get("config", {}).get("decoding", {})
    for key in REFERENCE_DECODING:
        mine, theirs = getattr(cfg.decoding, key), made.get(key, getattr(DecodingConfig(), key))
        if mine != theirs:
            raise UserError(
                f"decoding.{key} is {mine} here but {theirs} in generate_dir {cfg.generate_dir}, whose reference "
                f"answers measured the normalisation: answers decoded otherwise cannot be scored against it; leave "
                f"decoding.{key} out of the eval recipe (it then comes from generate_dir), or generate with {mine}")


@dataclass
class Checked:
    """What :func:`check` read and built, handed to :func:`run`."""

    folder: RunFolder
    prompts: list
    objectives: ObjectiveSet
    other: Normalizer | None  # the same statistics on the other scale (both are reported)
    judges: ObjectiveSet | None
    adapter: Path | None


def check(cfg: EvalConfig, dry_run: bool = False) -> Checked:
    """Every check before the policy loads or output_dir is touched (``--dry-run`` runs the same,
    without building the objectives' and judges' models or asking a judge)."""
    folder = RunFolder(cfg.output_dir, "eval", to_dict(cfg), cfg.overwrite)
    folder.check()
    gen_info = read_run(cfg.generate_dir, "generate", "generate_dir")
    check_decoding_matches(cfg, gen_info)
    norm_path = Path(cfg.generate_dir) / "normalization.json"
    normalizer = check_objectives(cfg, norm_path, gen_info)
    normalizer.warn_degenerate("eval")
    base_prompts = load_prompts(cfg.prompts)
    prompts = with_samples(base_prompts, cfg.samples_per_prompt)
    objectives = ObjectiveSet.from_specs(cfg.objectives, load=not dry_run)
    objectives.set_normalizer(normalizer.with_scale(cfg.scale, str(norm_path)), str(norm_path))
    other_scale = next(s for s in SCALES if s != cfg.scale)
    other = normalizer.with_scale(other_scale, str(norm_path)) if normalizer.samples else None
    judges = ObjectiveSet.from_specs(cfg.judges, load=not dry_run) if cfg.judges else None
    if not dry_run:
        objectives.probe(prompts[0].messages)
        if judges is not None:
            judges.probe(prompts[0].messages)
    check_decoding_inputs(cfg.decoding, objectives)
    cfg.policy.check()
    cfg.policy.check_prompt_lengths(base_prompts, cfg.decoding.max_new_tokens, cfg.prompts.path)
    cfg.backend.check()
    adapter = None
    if "distilled" in cfg.methods:
        adapter = fetch_adapter(cfg.adapter)
        check_no_overlap(adapter, [p.id for p in base_prompts])
    cfg.wandb.check()
    return Checked(folder, prompts, objectives, other, judges, adapter)


def run(cfg: EvalConfig, checked: Checked | None = None) -> Path:
    """Run the eval stage (after :func:`check`, unless ``checked`` is its result); returns the output folder."""
    state = process_state()
    checked = checked or check(cfg)
    folder, prompts, objectives, judges, adapter = (checked.folder, checked.prompts, checked.objectives,
                                                    checked.judges, checked.adapter)
    other_scale, other = next(s for s in SCALES if s != cfg.scale), checked.other

    # ------------------------------------------------------------------ decode (the engine)
    state.wait_for_everyone()
    out = folder.begin(state.is_main_process)
    state.wait_for_everyone()
    policy = PolicyConfig(cfg.policy.model, str(adapter) if adapter else None, cfg.policy.dtype, cfg.policy.device)
    device = str(state.device) if state.num_processes > 1 else None
    with serve_policy(policy, cfg.backend, out, device, state.num_processes) as served:
        decoder = build_decoder(served.model, served.tokenizer, cfg.decoding, objectives,
                                device or cfg.policy.device, served.sampler(cfg.decoding.sampling))
        timings = decode_methods(decoder, served.adapter_switch(decoder), objectives, prompts, cfg.methods, cfg.seed,
                                 cfg.batch_size, out / "generations" / "shards", state)
    if not state.is_main_process:
        return folder.path
    rows = merged_rows(out / "generations" / "shards", cfg.methods, prompts)

    # ------------------------------------------------------------------ judges (cached: a rerun pays nothing twice)
    judge = None
    if judges is not None:
        usage, records = grade_with_judges(judges, rows, cfg.methods)
        write_jsonl(out / "generations" / "judge.jsonl", records)
        judge = judge_metrics(cfg, rows, judges.names, usage)
    write_jsonl(out / "generations" / "samples.jsonl", rows)

    # ------------------------------------------------------------------ metrics
    names = objectives.names
    z = {m: score_matrix(rows, "normalized", names, m) for m in cfg.methods}
    groups = _groups(rows)
    metrics = {}
    for method in cfg.methods:
        mrows = [r for r in rows if r["method"] == method]
        metrics[method] = dict(
            method_metrics(z[method], names, z["reference"], cfg.bootstrap_resamples, cfg.seed, groups=groups),
            tokens_sampled_per_response=float(np.mean([r["tokens_sampled"] for r in mrows])),
            forward_tokens_per_response=float(np.mean([r["forward_tokens"] for r in mrows])),
            seconds_per_response=float(np.mean([r["seconds"] for r in mrows])),
            finished_share=float(np.mean([r["finished"] for r in mrows])),
        )
        if "judge" in timings.get(method, {}):  # judge objectives guiding decoding: what they cost (this run)
            metrics[method]["judge_decoding"] = timings[method]["judge"]

    # ------------------------------------------------------------------ report
    paired = paired_comparisons(z, cfg.bootstrap_resamples, cfg.seed, groups)
    # The same answers on the other scale: a figure that holds on both is not an artefact of one.
    scales = {cfg.scale: scale_summary(z, paired, cfg, groups)}
    if other is not None:
        z_other = {m: other(score_matrix(rows, "rewards", names, m)) for m in cfg.methods}
        scales[other_scale] = scale_summary(
            z_other, paired_comparisons(z_other, cfg.bootstrap_resamples, cfg.seed, groups), cfg, groups)
    plots = make_plots(metrics, names, rows, out / "plots")
    report = write_report(cfg, metrics, names, rows, plots, out, paired, scales, judge)
    write_json(out / "metrics.json", dict(provenance(to_dict(cfg)), objectives=names, methods=metrics,
                                          paired=paired, scales=scales, **({"judge": judge} if judge else {})))
    # Lineage: the generate run's dataset and the adapter scored (use_artifact online; in the config either way)
    upstream = {}
    if cfg.wandb.resolved_mode() != "disabled":
        upstream["dataset"] = dataset_reference(cfg.generate_dir)
        if adapter is not None:
            upstream["model"] = adapter_reference(adapter)
    tracker = Tracker(cfg.wandb, f"eval-{folder.path.parent.name}", to_dict(cfg), out, "eval", cfg.output_dir,
                      upstream)
    columns = ["method", "worst_case_reward", "worst_objective", "worst_case_win_rate", "seconds_per_response",
               "tokens_sampled_per_response", *[f"mean/{g}" for g in names]]
    tracker.table("eval/summary", columns, [
        [m, v["worst_case_reward"], v["worst_objective"], v.get("worst_case_win_rate"), v["seconds_per_response"],
         v["tokens_sampled_per_response"], *[v["objective_means"][g] for g in names]] for m, v in metrics.items()])
    tracker.images({f"eval/{k}": p for k, p in plots.items()})
    tracker.table("eval/samples", ["prompt_id", "method", "prompt", "completion", "worst_case"],
                  [[r["prompt_id"], r["method"], r["prompt"], r["completion"], r["worst_case"]] for r in rows])
    tracker.summary({f"{m}/{k}": v[k] for m, v in metrics.items() for k in ("worst_case_reward", "average")})
    tracker.finish()
    info = {"objectives": names, "methods": {m: v["worst_case_reward"] for m, v in metrics.items()}}
    if judge:
        info["judge"] = {m: {"worst_case_win_rate": v.get("worst_case_win_rate"), "missing": v["missing"],
                             "flagged": v["flagged"], "tokens": v["tokens"]} for m, v in judge["methods"].items()}
    path = folder.finish(info)
    if adapter is not None and update_model_card(adapter, metrics, path / "report.md", cfg.prompts.path):
        print(f"eval: filled in the eval figures of the model card {adapter / 'README.md'}")
    print(report.split("\n## Samples")[0].split("![")[0].rstrip())
    print(f"\neval: report -> {path / 'report.md'}")
    return path


def main(argv: list[str] | None = None) -> None:
    """Parse the recipe, check it, and run the stage (``--dry-run``: check only)."""
    stage_main(EvalConfig, argv, check, run)


if __name__ == "__main__":
    main(sys.argv[1:])
