"""PNG plots of the report (matplotlib, headless Agg backend; imported only here)."""

from __future__ import annotations

import os

BASE_COLOR = "black"
PALETTE = ("tab:green", "tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(arms: list[str], base_arm: str) -> dict[str, str]:
    others = iter(PALETTE * 4)
    return {a: BASE_COLOR if a == base_arm else next(others) for a in arms}


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def val_accuracy(report: dict, out_dir: str) -> str | None:
    """Held-in accuracy by step: per arm the mean over seeds (base thick, black), each seed faint;
    runs not finished are dashed."""
    curves, base = report["heldin_curves"], report["base_arm"]
    if not any(c["mean"] for c in curves.values()):
        return None
    plt, colors = _pyplot(), _colors(report["arms"], base)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, c in curves.items():
        for run in c["runs"].values():
            pts = run["points"]
            ax.plot([p["step"] for p in pts], [p["accuracy"] for p in pts], color=colors[arm], alpha=0.25, lw=0.8,
                    ls="-" if run["status"] == "finished" else "--")
        ax.plot([p["step"] for p in c["mean"]], [p["accuracy"] for p in c["mean"]], color=colors[arm],
                lw=2.6 if arm == base else 1.6, marker="o", ms=3, label=f"{arm} (n seeds={len(c['runs'])})")
    ax.set(xlabel="global step", ylabel="held-in accuracy", title="Held-in validation accuracy by step (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "val_accuracy.png")


def delta_vs_base(report: dict, out_dir: str) -> str | None:
    """arm - base held-in accuracy at shared steps; the base seed spread (held-out anchor) shaded."""
    deltas, base = report["heldin_deltas"], report["base_arm"]
    if not any(d["mean"] for d in deltas.values()):
        return None
    plt, colors = _pyplot(), _colors(report["arms"], base)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    anchor = report["summary"]["anchor"]
    if anchor and anchor["n"] >= 2:
        ax.axhspan(-anchor["range"], anchor["range"], color="gray", alpha=0.15,
                   label=f"{base} held-out seed spread (±{anchor['range']:.3f}): noise")
    ax.axhline(0, color=BASE_COLOR, lw=1)
    for arm, d in deltas.items():
        ax.plot([p["step"] for p in d["mean"]], [p["delta"] for p in d["mean"]], color=colors[arm], marker="o", ms=3, label=arm)
    ax.set(xlabel="global step", ylabel=f"held-in accuracy - {base}", title=f"Delta vs {base} at shared steps (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "delta_vs_base.png")


def _grouped_bars(ax, groups: list[str], arms: list[str], values: dict, colors: dict, labels: dict | None = None):
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        xs = [g + (i - (len(arms) - 1) / 2) * width for g in range(len(groups))]
        ys = [values[arm].get(g) for g in groups]
        bars = ax.bar(xs, [y if y is not None else 0 for y in ys], width, color=colors[arm], label=arm,
                      alpha=0.55 if colors[arm] == BASE_COLOR else 0.9)
        if labels:
            for bar, g in zip(bars, groups):
                n = labels[arm].get(g)
                if n is not None:
                    ax.annotate(f"{n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)


def _cells(report: dict, key: str, field: str) -> tuple[list[str], list[str], dict, dict]:
    table = report["breakdowns"][key]
    arms = [a for a in report["arms"] if a in table]
    groups: list[str] = []
    for arm in arms:
        groups += [g for g in table[arm] if g not in groups]
    values = {a: {g: c[field] for g, c in table[a].items()} for a in arms}
    ns = {a: {g: c["n"] for g, c in table[a].items()} for a in arms}
    return arms, groups, values, ns


def domains(report: dict, out_dir: str) -> str | None:
    arms, groups, values, ns = _cells(report, "domain", "accuracy")
    if not arms:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) + 3), 4.5))
    _grouped_bars(ax, groups, arms, values, _colors(report["arms"], report["base_arm"]), ns)
    ax.set(ylabel="held-out accuracy", title="Held-out accuracy per domain at the compared step (n samples on bars)")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "domains.png")


def bands(report: dict, out_dir: str) -> str | None:
    arms, groups, acc, ns = _cells(report, "band", "accuracy")
    if not arms:
        return None
    _, _, emission, _ = _cells(report, "band", "meta_emission_rate")
    plt, colors = _pyplot(), _colors(report["arms"], report["base_arm"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(10, 2 * len(groups) + 4), 4.5))
    _grouped_bars(a1, groups, arms, acc, colors, ns)
    a1.set(ylabel="held-out accuracy", title="Accuracy by difficulty band (n on bars)")
    _grouped_bars(a2, groups, arms, emission, colors, ns)
    a2.set(ylabel="meta emission rate", title="Meta emission by difficulty band (n on bars)")
    a1.legend(fontsize=8)
    return _save(fig, out_dir, "bands.png")


def meta_by_band(report: dict, out_dir: str) -> str | None:
    """Per arm: accuracy with vs without a meta block in each band, and pooled (the Simpson check)."""
    table, meta = report["breakdowns"]["band"], report["breakdowns"]["meta"]
    arms = [a for a in report["arms"] if a in table]
    if not arms:
        return None
    plt = _pyplot()
    cols = min(3, len(arms))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(arms):]:
        ax.set_visible(False)
    for ax, arm in zip(axes.flat, arms):
        cells = {**table[arm], "pooled": meta[arm]["pooled"]}
        groups = list(cells)
        for offset, side, color in ((-0.2, "with_meta", "tab:green"), (0.2, "without_meta", "tab:gray")):
            ys = [cells[g][side]["accuracy"] for g in groups]
            bars = ax.bar([i + offset for i in range(len(groups))], [y or 0 for y in ys], 0.4, color=color,
                          label=side.replace("_", " "))
            for bar, g in zip(bars, groups):
                ax.annotate(str(cells[g][side]["n"]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
        flag = " - REVERSAL" if meta[arm]["reversal"] else ""
        ax.set(title=f"{arm}{flag}", ylabel="held-out accuracy")
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "meta_by_band.png")


PLOTS = (val_accuracy, delta_vs_base, domains, bands, meta_by_band)


def make_plots(report: dict, out_dir: str) -> dict[str, str]:
    """Draw every plot that has data; returns {name: path relative to the report directory}."""
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    out = {}
    for draw in PLOTS:
        path = draw(report, plot_dir)
        if path:
            out[draw.__name__] = os.path.relpath(path, out_dir)
    return out
