"""Training curves as PNG files, in the manner of the VAPO paper's Figure 2.

Owns the one plotting function used both at the end of a run (the learner's rank 0 uploads the
PNGs to the run under `plots/`, through `shared.tracking.tracker.Tracker.log_plots`) and by
`vapo report RUN_ID`, so the two always draw the same figures from the same input: a run's
metric history `{key: [(step, value), ...]}` as `shared.tracking.tracker.metric_history` returns it.
Imports no mlflow (the history is plain data) and nothing of learner, actors or deploy.

Panels: reward, accuracy, response length, entropy and version lag (mean and max) over training
steps; one PNG per panel plus `training_curves.png` with all of them. A panel whose metrics were
never logged (entropy during value pretraining only, say) says so instead of being left out, so
the set of files does not depend on the run.

Decisions: matplotlib's object API with the Agg canvas (no pyplot), so nothing depends on a
display or on global figure state and plotting from a worker thread is safe. Raw values are
drawn, no smoothing: a tiny run has a handful of points and smoothing would hide them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OVERVIEW_FILE = "training_curves.png"


@dataclass(frozen=True)
class Panel:
    """One figure: a file stem, a title, a y-axis label and the metric keys drawn in it."""

    name: str
    title: str
    ylabel: str
    keys: tuple[str, ...]


PANELS: tuple[Panel, ...] = (
    Panel("reward", "Reward score", "mean reward", ("rollout/reward_mean",)),
    Panel("accuracy", "Accuracy", "fraction correct", ("rollout/acc",)),
    Panel("response_length", "Mean response length", "tokens", ("rollout/len_mean",)),
    Panel("entropy", "Generation entropy", "nats per token", ("policy/entropy",)),
    Panel("version_lag", "Version lag", "policy versions", ("async/version_lag_mean", "async/version_lag_max")),
)

PLOT_KEYS: tuple[str, ...] = tuple(key for panel in PANELS for key in panel.keys)
"""Every metric key the plots read (what to fetch from a run's history)."""


def _draw(ax: Any, panel: Panel, history: Mapping[str, Sequence[tuple[int, float]]]) -> None:
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for key in panel.keys:
        points = history.get(key, ())
        if not points:
            continue
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        ax.plot(steps, values, marker="o" if len(points) <= 50 else None, markersize=3, linewidth=1.2, label=key)
        drawn = True
    ax.set_title(panel.title)
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif len(panel.keys) > 1:
        ax.legend(fontsize="small")


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def write_plots(
    history: Mapping[str, Sequence[tuple[int, float]]], out_dir: str | Path, *, title: str | None = None
) -> list[Path]:
    """Write one PNG per panel and `training_curves.png` (all panels) to `out_dir`; returns the paths."""
    if not any(history.get(key) for key in PLOT_KEYS):
        raise ValueError(f"nothing to plot: none of {', '.join(PLOT_KEYS)} has a logged value")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for panel in PANELS:
        fig = _figure((5.0, 3.5))
        _draw(fig.add_subplot(), panel, history)
        path = out / f"{panel.name}.png"
        fig.savefig(path)
        paths.append(path)
    fig = _figure((15.0, 7.0))
    for i, panel in enumerate(PANELS):
        _draw(fig.add_subplot(2, 3, i + 1), panel, history)
    if title:
        fig.suptitle(title)
    path = out / OVERVIEW_FILE
    fig.savefig(path)
    paths.append(path)
    return paths
