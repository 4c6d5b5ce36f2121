"""PNG plots of a training run and of HSV / importance spectra (matplotlib, headless)."""

from __future__ import annotations

__all__ = ["plot_training", "plot_hsv_spectra", "plot_spectra_table"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(report: dict, path: str) -> str:
    """Loss vs step and vs wall time, the cut marked.  ``report``: from ``train.finetune``."""
    plt = _pyplot()
    history = report["history"]
    walls = {s["step"]: s["wall"] for s in report.get("step_times", [])}
    steps = [e["step"] for e in history]
    losses = [e["loss"] for e in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(steps, losses)
    ax1.set_xlabel("optimizer step")
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
    ax1.legend(fontsize=8)
    fig.suptitle(f"{report.get('arch', '')} on {report.get('data', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectra_table(layers: list, path: str, title: str) -> str:
    """One panel per layer: its sorted importance spectrum (log scale), the kept count marked.

    layers: [(name, spectrum (sequence, descending or not), kept count or None)].
    """
    plt = _pyplot()
    cols = min(4, max(1, len(layers)))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, spectrum, kept) in zip(axes.flat, layers):
        values = sorted((float(v) for v in spectrum), reverse=True)
        ax.semilogy(range(1, len(values) + 1), [max(v, 1e-30) for v in values], marker=".", ms=3)
        if kept is not None and kept < len(values):
            ax.axvline(kept + 0.5, color="red", ls="--", label=f"keep {kept}")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("state (sorted)", fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hsv_spectra(compression_report, path: str) -> str:
    """Per-layer importance spectra of a ``CompressionReport`` (what the cut was decided on)."""
    layers = [(d.name, d.importance.sum(0).tolist(), d.state_after) for d in compression_report.layers]
    return plot_spectra_table(layers, path, "state importance per layer (Hankel energy), kept states left of the line")
