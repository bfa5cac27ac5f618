"""A PNG per scenario: memory used per GPU and batch size per service over time, for every run; and a
PNG per scenario family: the distribution of safe_ratio per run, and the OOMs over the unavoidable count.

matplotlib is imported here only (with the Agg backend, no display needed), and this module is
imported only when plots are asked for, so the rest of the command line does not pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimizer.benchmark.family import REFERENCE, FamilySummary
from optimizer.benchmark.run import Run, ScenarioBenchmark

#: One colour and line style per run, stable across scenarios.
STYLES: dict[str, tuple[str, str]] = {
    "conservative": ("#9ecae1", "-"),
    "balanced": ("#3182bd", "-"),
    "aggressive": ("#08306b", "-"),
    "adaptive": ("#31a354", "-"),
    "fixed-4": ("#969696", ":"),
    "fixed-max": ("#636363", "--"),
    "accelerate": ("#e6550d", "-"),
    "lightning": ("#756bb1", "-"),
    "lightning-binsearch": ("#bcbddc", "-"),
    "vllm": ("#d6616b", "-."),
    "oracle": ("#000000", "--"),
}
MIB_PER_GIB = 1024
MAX_POINTS = 600  # memory is plotted as the peak per bucket, at most this many buckets per run


def peaks(series: list[tuple[float, float]], bucket_s: float) -> tuple[list[float], list[float]]:
    """The highest value per ``bucket_s`` seconds of ``(t, value)`` points, as (bucket starts, peaks)."""
    xs: list[float] = []
    ys: list[float] = []
    for t, v in series:
        start = (t // bucket_s) * bucket_s
        if xs and xs[-1] == start:
            ys[-1] = max(ys[-1], v)
        else:
            xs.append(start)
            ys.append(v)
    return xs, ys


def _batch_steps(run: Run, gpu: int, service: str, end_s: float) -> tuple[list[float], list[int]]:
    for s in run.services:
        if s.gpu == gpu and s.service == service:
            pts = list(s.batches)
            if not pts:
                return [], []
            return [t for t, _ in pts] + [end_s], [b for _, b in pts] + [pts[-1][1]]
    return [], []


def _save(plt: Any, fig: Any, path: Path, dpi: int) -> Path:
    """Lay ``fig`` out, write it to ``path`` as PNG (making its folder) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def plot_scenario(bench: ScenarioBenchmark, path: Path, *, dpi: int = 72) -> Path:
    """Write ``bench``'s figure to ``path`` (PNG) and return it. Memory in GiB, time in minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sc = bench.scenario
    services = [(s.gpu, s.name) for s in sc.services]
    panels = len(sc.gpus) + len(services)
    fig, axes_raw = plt.subplots(panels, 1, figsize=(10, 2.8 * panels), sharex=True, squeeze=False)
    axes: list[Any] = [a[0] for a in axes_raw]
    bucket = max(bench.interval_s, bench.duration_s / MAX_POINTS)
    minutes = 60.0
    s = bench.settings
    for ax, gpu in zip(axes, sc.gpus):
        total = gpu.total_mb / MIB_PER_GIB
        for run in bench.runs:
            colour, style = STYLES.get(run.name, ("#bdbdbd", "-"))
            xs, ys = peaks(run.trace.used_mb.get(gpu.index, []), bucket)
            ax.plot([x / minutes for x in xs], [y / MIB_PER_GIB for y in ys], color=colour, linestyle=style,
                    linewidth=1.0, label=run.name)
            ooms = [t for t, g, _ in run.trace.ooms if g == gpu.index]
            if ooms:
                ax.plot([t / minutes for t in ooms], [total] * len(ooms), linestyle="none", marker="x",
                        markersize=4, color=colour)
        ax.axhline(total, color="black", linewidth=0.8)
        ax.axhline(total * s.memory_threshold_oom, color="#de2d26", linewidth=0.8, linestyle="--",
                   label=f"oom {s.memory_threshold_oom:g}")
        ax.axhline(total * s.memory_threshold_critical, color="#fd8d3c", linewidth=0.8, linestyle=":",
                   label=f"critical {s.memory_threshold_critical:g}")
        ax.set_ylabel("GiB used")
        ax.set_title(f"GPU {gpu.index}: {gpu.name}, {total:.1f} GiB; peak per {bucket:g} s; x = OOM", fontsize=9)
        ax.set_ylim(0, total * 1.04)
    for ax, (gpu_index, name) in zip(axes[len(sc.gpus):], services):
        for run in bench.runs:
            colour, style = STYLES.get(run.name, ("#bdbdbd", "-"))
            xs, bs = _batch_steps(run, gpu_index, name, bench.duration_s)
            ax.step([x / minutes for x in xs], bs, where="post", color=colour, linestyle=style, linewidth=1.0,
                    label=run.name)
        ax.set_ylabel("batch size")
        ax.set_title(f"service {name} on GPU {gpu_index}: batch size it ran", fontsize=9)
        ax.set_ylim(0, s.max_batch_size + 1)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    axes[-1].set_xlabel("scenario time (minutes)")
    fig.suptitle(f"{sc.name}: {bench.duration_s:g} s, services poll every {bench.interval_s:g} s", fontsize=10)
    return _save(plt, fig, path, dpi)


def plot_family(summary: FamilySummary, path: Path, *, dpi: int = 72) -> Path:
    """Write a scenario family's figure to ``path`` (PNG) and return it.

    Top: a box plot of the per-service ``safe_ratio`` of every run name (adaptive filled). Bottom: per
    scenario (in family order), each run's OOMs over the unavoidable count, on a symmetric log scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = [r for r in summary.runs if r.safe_ratios]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8.5))
    boxes = top.boxplot([list(r.safe_ratios) for r in runs], patch_artist=True, whis=(10, 90), sym=".")
    top.set_xticks(range(1, len(runs) + 1), [r.name for r in runs], rotation=30, ha="right", fontsize=8)
    for box, r in zip(boxes["boxes"], runs):
        colour = STYLES.get(r.name, ("#bdbdbd", "-"))[0]
        box.set_facecolor(colour if r.name == REFERENCE else "white")
        box.set_edgecolor(colour if r.name != REFERENCE else "black")
        box.set_linewidth(2.0 if r.name == REFERENCE else 1.0)
    top.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
    top.set_ylabel("safe_ratio per service")
    top.set_title("safe_ratio (items over the safe oracle's) of every service; box: quartiles, whiskers: "
                  "10th-90th percentile", fontsize=9)
    for r in runs:
        colour, _ = STYLES.get(r.name, ("#bdbdbd", "-"))
        highlight = r.name == REFERENCE
        bottom.plot(range(len(r.excess)), list(r.excess), linestyle="-" if highlight else "none",
                    marker="o" if highlight else ".", markersize=4 if highlight else 3, linewidth=1.0,
                    color=colour, label=r.name, zorder=3 if highlight else 2)
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_yscale("symlog", linthresh=1)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("scenario (family order)")
    bottom.set_ylabel("OOMs - unavoidable")
    bottom.set_title("OOMs over the unavoidable count per scenario (below 0: fewer than the count)", fontsize=9)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    f = summary.family
    fig.suptitle(f"family gen-{f.seed}: {f.n} scenarios, oom_mode {f.oom_mode}", fontsize=10)
    return _save(plt, fig, path, dpi)
