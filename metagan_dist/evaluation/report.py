"""The evaluation's outputs: a JSON record, a markdown table and a plot of KID against adaptation steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from metagan_dist.evaluation.harness import METRICS, Method, MethodScores

FORMATS = {"kid": ".3g", "fid": ".3g", "precision": ".2f", "recall": ".2f", "diversity": ".3g"}
# Markdown shows KID / 1000: the task classifier's features are large (norms near 100), and so is the cubic kernel.
KID_UNIT = 1e3
Y_CEILING = 3.0  # the plot's y axis ends at this multiple of the highest KID before adaptation


def summarise(values: list[list[float]]) -> dict[str, float | int | None]:
    """Mean and population standard deviation over all (seed, task) values, their count, and how many diverged.

    A diverged adaptation (NaN) fails the method there: mean and std are then None, not a mean of the rest.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    diverged = int(np.isnan(flat).sum())
    mean, std = (None, None) if diverged else (float(flat.mean()), float(flat.std()))
    return {"mean": mean, "std": std, "n": int(flat.size), "diverged": diverged}


def build_report(methods: list[Method], scores: dict[str, MethodScores], step: int, settings: dict[str, Any]) -> dict:
    """The JSON record: settings, every method's summaries per step count (and per-task KID), the best rows.

    `best` names, per method name, the row (rule) with the lowest mean KID after `step` steps (rows that
    diverged on any task are out); `kid_ratios` divides the best meta-learned row's KID by each baseline's best.
    """
    rows = []
    for method in methods:
        values = scores[method.label].values
        rows.append({
            "label": method.label, "method": method.name, "kind": method.kind, "rule": str(method.rule),
            "source": method.source,
            "steps": {str(s): {m: summarise(values[s][m]) for m in METRICS} for s in sorted(values)},
            "kid_per_seed_and_task": {str(s): _json_floats(values[s]["kid"]) for s in sorted(values)},
        })
    kid_at = {row["label"]: row["steps"][str(step)]["kid"]["mean"] for row in rows}
    best: dict[str, str] = {}
    for row in rows:
        if kid_at[row["label"]] is None:
            continue
        if row["method"] not in best or kid_at[row["label"]] < kid_at[best[row["method"]]]:
            best[row["method"]] = row["label"]
    learned = [label for name, label in best.items() if _kind(rows, label) == "meta-learned"]
    ratios: dict[str, Any] = {}
    if learned:
        champion = min(learned, key=kid_at.get)
        ratios = {"best_meta_learned": champion, "at_steps": step, "vs": {
            name: {"baseline": label, "ratio": kid_at[champion] / kid_at[label]}
            for name, label in best.items() if _kind(rows, label) == "baseline"
        }}
    return {"settings": settings, "methods": rows, "best": best, "kid_ratios": ratios}


def _json_floats(values: list[list[float]]) -> list[list[float | None]]:
    """NaN (a diverged task) as None: JSON has no NaN."""
    return [[None if math.isnan(v) else v for v in seed] for seed in values]


def _kind(rows: list[dict], label: str) -> str:
    return next(row["kind"] for row in rows if row["label"] == label)


def markdown(report: dict) -> str:
    """Table of every metric after S steps (mean ± std over tasks x seeds), then mean KID per step count."""
    settings, rows = report["settings"], report["methods"]
    step = str(settings["steps"])
    lines = [
        f"Pool `{settings['pool']}` ({settings['split']} split), {settings['tasks']} tasks x {len(settings['seeds'])} "
        f"seeds, k = {settings['shots']} shots, S = {step} steps, M = {settings['samples']} samples per task; "
        f"mean ± std over tasks x seeds. KID is the primary metric (lower is better).",
        "",
        "| method | rule | " + " | ".join(_heading(m) for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for row in rows:
        cells = [_cell(row["steps"][step][m], FORMATS[m], KID_UNIT if m == "kid" else 1.0) for m in METRICS]
        lines.append(f"| {row['method']} | {row['rule']} | " + " | ".join(cells) + " |")
    ratios = report["kid_ratios"]
    if ratios.get("vs"):
        parts = [f"{v['ratio']:.2f}x {v['baseline']}" for v in ratios["vs"].values()]
        lines += ["", f"Best meta-learned row, {ratios['best_meta_learned']}: KID = " + ", ".join(parts) + "."]
    curve = sorted(int(s) for s in rows[0]["steps"])
    lines += ["", "Mean KID (in thousands) after each number of adaptation steps:", "",
              "| method | rule | " + " | ".join(str(s) for s in curve) + " |", "|---|---|" + "---|" * len(curve)]
    for row in rows:
        cells = [_mean(row["steps"][str(s)]["kid"], KID_UNIT) for s in curve]
        lines.append(f"| {row['method']} | {row['rule']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean(summary: dict, unit: float) -> str:
    return "diverged" if summary["mean"] is None else format(summary["mean"] / unit, ".3g")


def _heading(metric: str) -> str:
    return {"kid": "KID (thousands) ↓", "fid": "FID ↓", "precision": "precision ↑", "recall": "recall ↑", "diversity": "diversity"}[metric]


def _cell(summary: dict, fmt: str, unit: float) -> str:
    if summary["mean"] is None:
        return f"diverged ({summary['diverged']}/{summary['n']})"
    return f"{format(summary['mean'] / unit, fmt)} ± {format(summary['std'] / unit, fmt)}"


def plot_kid_curves(report: dict, path: Path) -> None:
    """KID (mean, band ± one standard error over tasks x seeds) against adaptation steps, one line per row.

    The y axis stops at Y_CEILING x the highest KID before adaptation, so one diverging row cannot
    flatten the others; the title says so when a curve leaves the top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = plt.get_cmap("tab20").colors
    lowest, highest, first_highest = math.inf, -math.inf, -math.inf
    for index, row in enumerate(report["methods"]):
        steps = sorted(int(s) for s in row["steps"])
        kid = [row["steps"][str(s)]["kid"] for s in steps]
        mean = np.array([math.nan if k["mean"] is None else k["mean"] for k in kid])  # a diverged step is a gap
        error = np.array([math.nan if k["std"] is None else k["std"] / math.sqrt(k["n"]) for k in kid])
        style = "-" if row["kind"] == "meta-learned" else "--"
        colour = colours[index % len(colours)]
        ax.plot(steps, mean, style, color=colour, marker="o", markersize=4, label=row["label"])
        ax.fill_between(steps, mean - error, mean + error, color=colour, alpha=0.15)
        lowest = min(lowest, float(np.nanmin(mean - error, initial=math.inf)))
        highest = max(highest, float(np.nanmax(mean + error, initial=-math.inf)))
        first_highest = max(first_highest, float(np.nan_to_num(mean[0], nan=-math.inf)))
    ax.axvline(settings["steps"], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlim(-0.2, steps[-1] * 1.2)
    ax.set_xlabel("adaptation steps")
    if lowest > 0:  # methods can differ by orders of magnitude; the unbiased KID can dip below 0, though
        ax.set_yscale("log")
    note = ""
    if first_highest > 0 and highest > Y_CEILING * first_highest:
        ax.set_ylim(top=Y_CEILING * first_highest)
        note = f"; curves leaving the top exceed {Y_CEILING:g}x the highest initial KID"
    ax.set_ylabel("KID (lower is better)")
    ax.set_title(f"{Path(settings['pool']).name}: k = {settings['shots']} shots, {settings['tasks']} tasks x "
                 f"{len(settings['seeds'])} seeds (band: ± 1 s.e.{note})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
