"""PNG plots made from a suite's results JSON: time and peak memory per case and provider.

``run.py`` draws one per suite after each run (``--report-only`` redraws them). Times are
shown as a multiple of the same case's floor when the suite has one (so that cases of very
different sizes share an axis, and 1.0 is the floor), else in seconds; bars are medians with
p20–p80 error bars. A provider that did not finish gets its status (``OOM``, ``skipped``, ...)
written where its bar would be.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from benchmarks.machine import describe
from benchmarks.report import provider_label


def _cases(data: dict) -> list[tuple[str, str]]:
    return list(dict.fromkeys((row["case"], row["dtype"]) for row in data["rows"]))


def _floors(data: dict) -> dict[tuple[str, str], float]:
    """The floor's median time of each case where it finished."""
    return {
        (row["case"], row["dtype"]): row["median"]
        for row in data["rows"]
        if row["provider"] == data.get("floor") and row["status"] == "ok"
    }


def _panel(ax, data: dict, metric: str, scales: dict[tuple[str, str], float]) -> list[Patch]:
    """Grouped bars of ``metric`` (divided by ``scales[case]`` where given) per case; returns
    one legend patch per provider (drawn or not)."""
    cases = _cases(data)
    providers = list(dict.fromkeys(row["provider"] for row in data["rows"]))
    width = 0.8 / max(1, len(providers))
    legend = []
    for j, provider in enumerate(providers):
        rows = {(r["case"], r["dtype"]): r for r in data["rows"] if r["provider"] == provider}
        xs, heights, low, high, label = [], [], [], [], provider
        for i, case in enumerate(cases):
            row = rows.get(case)
            if row is None:
                continue
            label = provider_label(row)
            x = i + (j - (len(providers) - 1) / 2) * width
            scale = scales.get(case, 1.0)
            if row["status"] != "ok" or row[metric] is None or scale <= 0:
                status = row["status"] if row["status"] != "ok" else "n/a"
                # x in data units, y in axes units: the status sits on the axis at any scale.
                ax.text(
                    x,
                    0.02,
                    status,
                    transform=ax.get_xaxis_transform(),
                    color=f"C{j}",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
                continue
            xs.append(x)
            heights.append(row[metric] / scale)
            if metric == "median":
                low.append((row["median"] - row["p20"]) / scale)
                high.append((row["p80"] - row["median"]) / scale)
        ax.bar(xs, heights, width, color=f"C{j}")
        legend.append(Patch(color=f"C{j}", label=label))
        if metric == "median" and xs:
            ax.errorbar(xs, heights, yerr=[low, high], fmt="none", ecolor="black", lw=0.8)
    ax.set_xlim(-0.5, len(cases) - 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{case}\n{dtype}" for case, dtype in cases], fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return legend


def plot_suite(data: dict, path: Path) -> Path:
    """Draws the time and the peak-memory panels of one suite's results into ``path``."""
    figure, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(14, 5.5))
    floors = _floors(data)
    if floors:
        legend = _panel(time_ax, data, "median", floors)
        time_ax.axhline(1.0, color="black", lw=0.8, ls="--")
        time_ax.set_ylabel(f"time / floor ({data['floor_text']})", fontsize=8)
    else:
        legend = _panel(time_ax, data, "median", {case: 1000.0 for case in _cases(data)})
        time_ax.set_ylabel("forward + backward (s)")
    _panel(memory_ax, data, "peak_mib", {})
    memory_ax.set_ylabel("peak resident memory over the inputs (MiB)")
    time_ax.legend(handles=legend, fontsize=7)
    figure.suptitle(f"{data['title']}\n{describe(data['machine'])}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
