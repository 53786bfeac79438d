"""Tables and lines of a report from metrics as the stages write them (eval's report.md, the
results records' pages): one place, so a figure reads the same wherever it is shown. Every
function takes what metrics.json holds, where a figure that could not be computed is null."""

from __future__ import annotations

from rmod_distill.metrics import format_recovery


def missing(x) -> bool:
    """Whether a figure could not be computed (None in JSON, NaN in memory)."""
    return x is None or x != x


def signed(x: float | None, digits: int = 3) -> str:
    """A signed figure; "-" where it could not be computed."""
    return "-" if missing(x) else f"{x:+.{digits}f}"


def pct(x: float | None) -> str:
    """A share as a percentage with one decimal; "-" where it could not be computed."""
    return "-" if missing(x) else f"{100 * x:.1f}%"


def order_key(value: float | None) -> float:
    """Sort key: best first, a metric that could not be computed last."""
    return float("inf") if missing(value) else -value


def method_table(metrics: dict, names: list[str]) -> str:
    """The methods' table, best worst case first: the worst case with its interval, median, tail, worst
    objective, each objective's mean, the win rates against ``reference``, the cost."""
    head = ["method", "worst-case reward [95% CI]", "median worst case", "below z=-3", "worst 5% (mean)",
            "worst objective", *names, "WCWR (paper) vs reference",
            "min-objective win rate", "tokens/resp", "s/resp"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, m in sorted(metrics.items(), key=lambda kv: order_key(kv[1]["worst_case_reward"])):
        lo, hi = m["worst_case_reward_ci"]
        wcwr = "-" if method == "reference" else pct(m["worst_case_win_rate"])
        minwr = "-" if method == "reference" else pct(m["min_objective_win_rate"])
        lines.append("| " + " | ".join([
            f"`{method}`", f"{signed(m['worst_case_reward'])} [{signed(lo)}, {signed(hi)}]",
            signed(m["median_worst_case"]), pct(m["tail_share"]), signed(m["worst_5pct"], 2),
            signed(m["worst_objective"]), *[signed(m["objective_means"][g]) for g in names], wcwr, minwr,
            f"{m['tokens_sampled_per_response']:.0f}", f"{m['seconds_per_response']:.2f}",
        ]) + " |")
    return "\n".join(lines)


def paired_lines(paired: dict) -> list[str]:
    """The paired comparisons: each difference of worst case with its interval, and the recovery."""
    lines = ["Paired comparisons (the same bootstrap-resampled prompts on both sides; 95% intervals):", ""]
    for label, d in paired["differences"].items():
        lo, hi = d["ci"]
        lines.append(f"- worst-case reward, `{label}`: {signed(d['mean'])} [{signed(lo)}, {signed(hi)}]")
    for label, r in paired.get("recovery", {}).items():
        lines.append(f"- recovery of RMOD's lift by the adapter, by {label}: {format_recovery(r)}")
    return lines + [""]
