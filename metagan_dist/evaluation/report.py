"""The evaluation's outputs: a JSON record, a markdown table and plots of recognizability and KID against steps.

The table leads with "is it the task" (recognizability, precision, recall after S steps), beside
the reference rows scored exactly like samples (`real`, `shots`, `other-task`) and every init
before adaptation (S = 0); KID, FID and diversity follow, so KID reads next to the real-vs-real
and other-task levels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from metagan_dist.evaluation.harness import METRICS, REFERENCES, Method, Scores

FORMATS = {"recognizability": ".2f", "precision": ".2f", "recall": ".2f", "kid": ".3g", "fid": ".3g", "diversity": ".3g"}
HEADINGS = {"recognizability": "recognizability ↑", "precision": "precision ↑", "recall": "recall ↑",
            "kid": "KID (thousands) ↓", "fid": "FID ↓", "diversity": "diversity"}
# Markdown shows KID / 1000: the task classifier's features are large (norms near 100), and so is the cubic kernel.
KID_UNIT = 1e3
PER_TASK = ("recognizability", "kid")  # metrics whose per-(seed, task) values the JSON keeps


def summarise(values: list[list[float | None]]) -> dict[str, float | int | None]:
    """Mean, population std and standard error over all (seed, task) values, their count, and how many diverged.

    A diverged adaptation (NaN) fails the row there: mean and std are then None, not a mean of the
    rest. A metric a set is too small for (None) is not applicable: mean None, diverged 0.
    """
    flat = [v for seed in values for v in seed]
    if any(v is None for v in flat):
        return {"mean": None, "std": None, "se": None, "n": len(flat), "diverged": 0}
    array = np.asarray(flat, dtype=np.float64)
    diverged = int(np.isnan(array).sum())
    if diverged:
        return {"mean": None, "std": None, "se": None, "n": int(array.size), "diverged": diverged}
    std = float(array.std())
    return {"mean": float(array.mean()), "std": std, "se": std / math.sqrt(array.size), "n": int(array.size),
            "diverged": 0}


def _summaries(values: dict[str, list[list[float]]]) -> dict[str, dict]:
    return {metric: summarise(values[metric]) for metric in METRICS}


def build_report(
    methods: list[Method], scores: dict[str, Scores], references: dict[str, Scores], step: int, settings: dict[str, Any]
) -> dict:
    """The JSON record: settings, every row's summaries per step count, the reference rows and the best rows.

    `best` names, per method name, the row (rule) with the highest recognizability after `step` steps
    (rows that diverged on any task are out). `headline` compares the best meta-learned row with each
    baseline's best row and with its own init at S = 0.
    """
    rows = []
    for method in methods:
        values = scores[method.label].values
        rows.append({
            "label": method.label, "method": method.name, "kind": method.kind, "rule": str(method.rule),
            "source": method.source,
            "steps": {str(s): _summaries(values[s]) for s in sorted(values)},
            "per_seed_and_task": {str(s): {m: _json_floats(values[s][m]) for m in PER_TASK} for s in sorted(values)},
        })
    reference_rows = {name: _summaries(references[name].values[0]) for name in REFERENCES}
    recognised = {row["label"]: row["steps"][str(step)]["recognizability"]["mean"] for row in rows}
    best: dict[str, str] = {}
    for row in rows:
        value = recognised[row["label"]]
        if value is not None and (row["method"] not in best or value > recognised[best[row["method"]]]):
            best[row["method"]] = row["label"]
    kinds = {row["label"]: row["kind"] for row in rows}
    learned = [label for label in best.values() if kinds[label] == "meta-learned"]
    headline: dict[str, Any] = {}
    if learned:
        champion = max(learned, key=recognised.get)
        row = next(r for r in rows if r["label"] == champion)
        headline = {
            "best_meta_learned": champion, "at_steps": step, "recognizability": recognised[champion],
            "at_step_0": row["steps"]["0"]["recognizability"]["mean"] if "0" in row["steps"] else None,
            "vs": {name: {"baseline": label, "recognizability": recognised[label],
                          "difference": recognised[champion] - recognised[label]}
                   for name, label in best.items() if kinds[label] == "baseline"},
        }
    return {"settings": settings, "methods": rows, "references": reference_rows, "best": best, "headline": headline}


def _json_floats(values: list[list[float | None]]) -> list[list[float | None]]:
    """NaN (a diverged task) as None: JSON has no NaN."""
    return [[None if v is None or math.isnan(v) else v for v in seed] for seed in values]


def markdown(report: dict) -> str:
    """Every metric after S steps (mean ± std over tasks x seeds) with the reference and S = 0 rows; then curves."""
    settings, rows = report["settings"], report["methods"]
    step = str(settings["steps"])
    ways = settings["ways"]
    shifted = "" if settings["shift"] == "none" else f", every image shifted: {settings['shift']}"
    lines = [
        f"Pool `{settings['pool']}` ({settings['split']} split{shifted}), {settings['tasks']} tasks x "
        f"{len(settings['seeds'])} seeds, k = {settings['shots']} shots, S = {step} steps, "
        f"M = {settings['samples']} samples per task; "
        f"recognizability: {ways}-way nearest-prototype accuracy (chance {1 / ways:.2f}); mean ± std over tasks x seeds.",
        "",
        "| row | rule | S | " + " | ".join(HEADINGS[m] for m in METRICS) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for row in rows:
        lines.append(_line(row["method"], row["rule"], step, row["steps"][step]))
    for name, summaries in report["references"].items():
        lines.append(_line(f"*{name}*", "–", "–", summaries))
    seen = set()
    for row in rows:  # each init before adaptation: one row per init, whatever rule adapts it afterwards
        if "0" in row["steps"] and row["method"] not in seen:
            seen.add(row["method"])
            lines.append(_line(row["method"], "–", "0", row["steps"]["0"]))
    headline = report["headline"]
    if headline:
        parts = [f"{v['difference']:+.2f} vs {v['baseline']} ({v['recognizability']:.2f})" for v in headline["vs"].values()]
        gain = "" if headline["at_step_0"] is None else f"; {headline['recognizability'] - headline['at_step_0']:+.2f} vs its own S = 0"
        lines += ["", f"Best meta-learned row, {headline['best_meta_learned']}: recognizability "
                      f"{headline['recognizability']:.2f} at S = {step}" + (", " + ", ".join(parts) if parts else "") + gain + "."]
    curve = sorted(int(s) for s in rows[0]["steps"])
    for metric, unit, title in (("recognizability", 1.0, "Recognizability"), ("kid", KID_UNIT, "Mean KID (thousands)")):
        lines += ["", f"{title} after each number of adaptation steps:", "",
                  "| row | rule | " + " | ".join(str(s) for s in curve) + " |", "|---|---|" + "---|" * len(curve)]
        for row in rows:
            cells = [_mean(row["steps"][str(s)][metric], unit) for s in curve]
            lines.append(f"| {row['method']} | {row['rule']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _line(name: str, rule: str, step: str, summaries: dict[str, dict]) -> str:
    cells = [_cell(summaries[m], FORMATS[m], KID_UNIT if m == "kid" else 1.0) for m in METRICS]
    return f"| {name} | {rule} | {step} | " + " | ".join(cells) + " |"


def _mean(summary: dict, unit: float) -> str:
    if summary["mean"] is None:
        return "diverged" if summary["diverged"] else "–"
    return format(summary["mean"] / unit, ".3g")


def _cell(summary: dict, fmt: str, unit: float) -> str:
    if summary["mean"] is None:
        return f"diverged ({summary['diverged']}/{summary['n']})" if summary["diverged"] else "–"
    return f"{format(summary['mean'] / unit, fmt)} ± {format(summary['std'] / unit, fmt)}"


def plot_curves(report: dict, path: Path) -> None:
    """Recognizability and KID (mean, band ± one standard error over tasks x seeds) against adaptation steps.

    One line per row (meta-learned solid, baselines dashed); the reference rows are horizontal
    lines. The KID axis spans -0.2x to 3x the highest KID before adaptation, so one diverging row
    cannot flatten the others.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    colours = plt.get_cmap("tab20").colors
    steps = sorted(int(s) for s in report["methods"][0]["steps"])
    for ax, metric, unit in ((axes[0], "recognizability", 1.0), (axes[1], "kid", KID_UNIT)):
        first_highest = -math.inf
        for index, row in enumerate(report["methods"]):
            summaries = [row["steps"][str(s)][metric] for s in steps]
            mean = np.array([math.nan if s["mean"] is None else s["mean"] / unit for s in summaries])
            error = np.array([math.nan if s["se"] is None else s["se"] / unit for s in summaries])
            colour = colours[index % len(colours)]
            style = "-" if row["kind"] == "meta-learned" else "--"
            ax.plot(steps, mean, style, color=colour, marker="o", markersize=4, label=row["label"])
            ax.fill_between(steps, mean - error, mean + error, color=colour, alpha=0.15)
            first_highest = max(first_highest, float(np.nan_to_num(mean[0], nan=-math.inf)))
        for name, style in zip(REFERENCES, (":", "-.", (0, (1, 3)))):
            level = report["references"][name][metric]["mean"]
            if level is not None:
                ax.axhline(level / unit, color="black", linestyle=style, linewidth=0.9, label=f"{name} (reference)")
        ax.axvline(settings["steps"], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("adaptation steps")
        ax.grid(alpha=0.3)
        if metric == "recognizability":
            ax.set_ylim(0, 1)
            ax.axhline(1 / settings["ways"], color="grey", linewidth=0.8, label=f"chance (1/{settings['ways']})")
            ax.set_ylabel(f"recognizability ({settings['ways']}-way) ↑")
        else:
            if first_highest > 0:  # a diverging row's band would stretch the axis both ways
                ax.set_ylim(-0.2 * first_highest, 3 * first_highest)
            ax.set_ylabel("KID (thousands) ↓")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{Path(settings['pool']).name}: k = {settings['shots']} shots, {settings['tasks']} tasks x "
                 f"{len(settings['seeds'])} seeds (band: ± 1 s.e.)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
