"""PNG plots of a training run and of importance spectra (matplotlib, headless).

Every axis is labelled, state-index axes have integer ticks, and a legend is drawn only when
something in the panel is labelled.
"""

from __future__ import annotations

__all__ = ["plot_training", "plot_hsv_spectra", "plot_spectra_table", "plot_cut_spectra", "cut_spectra_figure",
           "spectra_table_figure", "training_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax, **kwargs) -> None:
    """A legend only when the panel has labelled artists (no empty box)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_training(report: dict, path: str) -> str:
    """Loss vs step and vs wall time, the cuts marked.  ``report``: from ``train.finetune``."""
    return _save(training_figure(report), path)


def training_figure(report: dict):
    """The matplotlib figure of ``plot_training``."""
    plt = _pyplot()
    history = report["history"]
    walls = {s["step"]: s["wall"] for s in report.get("step_times", [])}
    steps = [e["step"] for e in history]
    losses = [e["loss"] for e in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(steps, losses)
    ax1.set_xlabel("optimizer step")
    _integer_x(ax1)
    ax2.plot([walls.get(s, float("nan")) for s in steps], losses)
    ax2.set_xlabel("wall time (s)")
    for ax in (ax1, ax2):
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    for cut in report.get("cuts", []):
        step = cut["step"]
        sizes = [layer["state_after"] for layer in cut["layers"]]
        label = f"cut at step {step}: N -> {min(sizes)}..{max(sizes)}"
        ax1.axvline(step, color="red", ls="--", label=label)
        if step in walls:
            ax2.axvline(walls[step], color="red", ls="--", label=label)
    _legend(ax1, fontsize=8)
    fig.suptitle(f"{report.get('arch', '')} on {report.get('data', '')}")
    return fig


def _spectrum_axes(ax, name: str) -> None:
    ax.set_title(name, fontsize=8)
    ax.set_xlabel("state, sorted by importance", fontsize=7)
    ax.set_ylabel("importance (Hankel energy)", fontsize=7)
    _integer_x(ax)
    ax.grid(alpha=0.3)


def _grid(plt, count: int):
    cols = min(4, max(1, count))
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_spectra_table(layers: list, path: str, title: str) -> str:
    """One panel per layer: its sorted importance spectrum (log scale), the kept count marked.

    layers: [(name, spectrum (sequence, any order), kept count or None)].
    """
    return _save(spectra_table_figure(layers, title), path)


def spectra_table_figure(layers: list, title: str):
    """The matplotlib figure of ``plot_spectra_table``."""
    plt = _pyplot()
    fig, axes = _grid(plt, len(layers))
    for ax, (name, spectrum, kept) in zip(axes, layers):
        values = sorted((float(v) for v in spectrum), reverse=True)
        ax.semilogy(range(1, len(values) + 1), [max(v, 1e-30) for v in values], marker=".", ms=3)
        if kept is not None and kept < len(values):
            ax.axvline(kept + 0.5, color="red", ls="--", label=f"keep {kept} of {len(values)}")
        _spectrum_axes(ax, name)
        _legend(ax, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def plot_hsv_spectra(compression_report, path: str) -> str:
    """Per-layer importance spectra of one ``CompressionReport`` (what that cut was decided on)."""
    layers = [(d.name, d.importance.sum(0).tolist(), d.state_after) for d in compression_report.layers]
    return plot_spectra_table(layers, path, "state importance per layer (Hankel energy), kept states left of the line")


def plot_cut_spectra(reports: list, path: str) -> str:
    """Per layer, the importance spectrum at every cut (one curve per attempt, its kept count marked).

    reports: the ``CompressionReport``s of a run, in order; the title gives the final sizes, so the
    picture and the final model agree.
    """
    return _save(cut_spectra_figure(reports), path)


def cut_spectra_figure(reports: list):
    """The matplotlib figure of ``plot_cut_spectra``."""
    plt = _pyplot()
    names = [d.name for d in reports[-1].layers]
    fig, axes = _grid(plt, len(names))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes, names):
        for i, report in enumerate(reports):
            d = next((d for d in report.layers if d.name == name), None)
            if d is None:
                continue
            values = sorted((float(v) for v in d.importance.sum(0).tolist()), reverse=True)
            colour = colours[i % len(colours)]
            last = i == len(reports) - 1
            ax.semilogy(range(1, len(values) + 1), [max(v, 1e-30) for v in values], color=colour, marker=".",
                        ms=3 if last else 2, lw=1.6 if last else 0.8,
                        label=f"step {report.step}: {d.state_before} -> {d.state_after}")
            if d.cut:
                ax.axvline(d.state_after + 0.5, color=colour, ls="--", lw=0.8)
        _spectrum_axes(ax, name)
        _legend(ax, fontsize=6)
    final = "/".join(str(d.state_after) for d in reports[-1].layers)
    fig.suptitle(f"state importance at each cut (dashed: kept states to the left); final N per layer {final}",
                 fontsize=9)
    return fig
