"""report.md and PNG plots of a `moeserve bench` run, from its rows (results.json).

In:  the rows and settings header written by bench.py. Out: DIR/report.md (the uncompressed baseline
first, then accuracy versus bound per layer group for each codec and mode, quality measures, and the
mean drop of each layer group), DIR/accuracy_vs_bound.png and DIR/accuracy_vs_bits.png.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from moeserve.eval.perturb import BASELINE

GROUP_ORDER = ("all", "shallow", "middle", "deep")


def write_report(rows: list[dict], header: dict, out_dir: Path) -> list[Path]:
    """Writes report.md and the plots (nothing before the baseline row exists)."""
    out_dir = Path(out_dir)
    stored_bits = header.get("stored_bits_per_value")
    baseline = next((r for r in rows if r["codec"] == BASELINE), None)
    if baseline is None:
        return []
    paths = [out_dir / "report.md", out_dir / "accuracy_vs_bound.png", out_dir / "accuracy_vs_bits.png"]
    paths[0].write_text(format_report(rows, header, baseline))
    _plot_accuracy_vs_bound(rows, baseline, paths[1])
    _plot_accuracy_vs_bits(rows, baseline, paths[2], stored_bits)
    return paths


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _groups(rows: list[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["layers"] for r in rows if r["codec"] != BASELINE))
    return sorted(seen, key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), seen.index(g)))


def _bounded_series(rows: list[dict]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """(codec, mode) → group → rows ascending in bound."""
    series: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["error_bound"] is not None:
            series[(r["codec"], r["mode"])][r["layers"]].append(r)
    for by_group in series.values():
        for group_rows in by_group.values():
            group_rows.sort(key=lambda r: r["error_bound"])
    return series


def format_report(rows: list[dict], header: dict, baseline: dict) -> str:
    groups = _groups(rows)
    lines = [
        "# moeserve bench",
        "",
        f"Model `{header['model']}`; {header['split']} split, {header['items_per_task']} items per task "
        f"({', '.join(header['tasks'])}); KL, top-1 agreement and perplexity on {header['quality_items_per_task']} "
        f"held-out chats per task; perturbed experts: {header['experts']}; compute dtype {header['dtype']}.",
        "Accuracy is exact match averaged over tasks; Δ is the change from the uncompressed model in points.",
        "",
        "## Uncompressed baseline",
        "",
        "| average | " + " | ".join(baseline["per_task"]) + " | perplexity |",
        "|---:|" + "---:|" * (len(baseline["per_task"]) + 1),
        f"| {_pct(baseline['accuracy'])} | " + " | ".join(_pct(a) for a in baseline["per_task"].values())
        + f" | {baseline['perplexity']:.3f} |",
    ]
    for (codec, mode), by_group in _bounded_series(rows).items():
        bounds = sorted({r["error_bound"] for g in by_group.values() for r in g})
        present = [g for g in groups if g in by_group]
        lines += ["", f"## {codec}, mode {mode}: accuracy (Δ) versus error bound per layer group", "",
                  "| error bound | " + " | ".join(present) + " |", "|---:|" + "---:|" * len(present)]
        for eb in bounds:
            cells = []
            for g in present:
                r = next((r for r in by_group[g] if r["error_bound"] == eb), None)
                cells.append("" if r is None else f"{_pct(r['accuracy'])} ({100 * (r['accuracy'] - baseline['accuracy']):+.1f})")
            lines.append(f"| {eb:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Every configuration", "",
              "| codec | mode | bound | layers | accuracy | Δ | KL | top-1 agree | perplexity | bits/value | max err / bound |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["codec"] == BASELINE:
            continue
        bits = "" if r["bits_per_value"] is None else f"{r['bits_per_value']:.2f}"
        err = "" if r["max_error_over_bound"] is None else f"{r['max_error_over_bound']:.3f}"
        bound = "" if r["error_bound"] is None else f"{r['error_bound']:g}"
        lines.append(
            f"| {r['codec']} | {r['mode'] or ''} | {bound} | {r['layers']} | {_pct(r['accuracy'])} | "
            f"{100 * (r['accuracy'] - baseline['accuracy']):+.1f} | {r['kl']:.2e} | {_pct(r['top1_agreement'])} | "
            f"{r['perplexity']:.3f} | {bits} | {err} |"
        )
    lines += _group_sensitivity(rows, baseline)
    return "\n".join(lines) + "\n"


def _group_sensitivity(rows: list[dict], baseline: dict) -> list[str]:
    """Mean accuracy change of each third over the bounds every third was measured at."""
    thirds = [g for g in ("shallow", "middle", "deep") if any(r["layers"] == g for r in rows)]
    if len(thirds) < 2:
        return []
    lines = ["", "## Which layer group is most sensitive", "",
             "Mean accuracy change (points) over the bounds measured for every group; more negative is more sensitive.",
             "", "| codec, mode | " + " | ".join(thirds) + " | most sensitive |", "|---|" + "---:|" * (len(thirds) + 1)]
    for (codec, mode), by_group in _bounded_series(rows).items():
        if not all(g in by_group for g in thirds):
            continue
        common = set.intersection(*({r["error_bound"] for r in by_group[g]} for g in thirds))
        if not common:
            continue
        means = {g: sum(100 * (r["accuracy"] - baseline["accuracy"]) for r in by_group[g] if r["error_bound"] in common)
                 / len(common) for g in thirds}
        lines.append(f"| {codec}, {mode} | " + " | ".join(f"{means[g]:+.2f}" for g in thirds)
                     + f" | {min(means, key=means.get)} |")
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def _plot_accuracy_vs_bound(rows: list[dict], baseline: dict, path: Path) -> None:
    plt = _pyplot()
    series = _bounded_series(rows)
    panels = max(1, len(series))
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    for ax, ((codec, mode), by_group) in zip(axes[0], series.items()):
        for group in _groups(rows):
            if group in by_group:
                pts = by_group[group]
                ax.plot([r["error_bound"] for r in pts], [100 * r["accuracy"] for r in pts], marker="o", label=group)
        ax.axhline(100 * baseline["accuracy"], color="black", linestyle="--", linewidth=1, label="uncompressed")
        ax.set_xscale("log")
        ax.set_xlabel(f"error bound ({mode})")
        ax.set_ylabel("exact-match accuracy (%)")
        ax.set_title(f"{codec}: accuracy vs error bound per layer group")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if not series:
        axes[0][0].text(0.5, 0.5, "no bounded codec in this run", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_accuracy_vs_bits(rows: list[dict], baseline: dict, path: Path, stored_bits: float | None) -> None:
    plt = _pyplot()
    groups = _groups(rows)
    group = "all" if "all" in groups else (groups[0] if groups else None)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_codec: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["layers"] == group and r["bits_per_value"] is not None:
            by_codec[f"{r['codec']} {r['mode']}" if r["mode"] and r["mode"] != "none" else r["codec"]].append(r)
    for label, pts in by_codec.items():
        pts.sort(key=lambda r: r["bits_per_value"])
        ax.plot([r["bits_per_value"] for r in pts], [100 * r["accuracy"] for r in pts], marker="o", label=label)
    if stored_bits is not None:
        ax.plot([stored_bits], [100 * baseline["accuracy"]], marker="*", markersize=12, color="black",
                linestyle="none", label=f"uncompressed ({stored_bits:g} bits)")
    ax.axhline(100 * baseline["accuracy"], color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("bits per value of the compressed experts")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(f"accuracy vs bits/value, layers: {group}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
