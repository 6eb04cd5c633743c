"""Pictures the UI shows: the gate heatmap, the loss curve, schedule curves and the A/B grid.

Figures are drawn with matplotlib's Agg backend (no display) and returned as PIL images, so
handlers and tests use them without Gradio.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_BLOCK = re.compile(r"^(BASE|IN|M|OUT)(\d*)$")
_ORDER = {"BASE": 0, "IN": 1, "M": 2, "OUT": 3}


def block_order(block: str) -> tuple[int, int]:
    """Sort key of an LBW block id: BASE, IN00…, M00, OUT00… (unknown ids last)."""
    m = _BLOCK.match(block)
    if m is None:
        return (9, 0)
    return (_ORDER[m[1]], int(m[2] or 0))


def block_gates(gates: torch.Tensor, blocks: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Mean gate per (column, block, step) over the layers of each block (steps × layers × columns in).

    Returns the block ids in LBW order and an array of shape (columns, blocks, steps).
    """
    g = gates.detach().float().cpu().numpy()
    if g.ndim != 3 or g.shape[1] != len(blocks):
        raise ValueError(f"gates of shape {tuple(g.shape)} do not match {len(blocks)} layers")
    ids = sorted(set(blocks), key=block_order)
    out = np.zeros((g.shape[2], len(ids), g.shape[0]), dtype=np.float32)
    for bi, block in enumerate(ids):
        rows = [li for li, b in enumerate(blocks) if b == block]
        out[:, bi, :] = g[:, rows, :].mean(axis=1).T
    return ids, out


def _figure_image(fig: object) -> Image.Image:
    """Render a matplotlib figure to a PIL image and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def gate_heatmap(gates: torch.Tensor, blocks: Sequence[str], columns: Sequence[str]) -> Image.Image | None:
    """Heatmap of the gates actually applied: one panel per adapter, rows = UNet/text blocks (mean over
    their layers), columns = denoising steps. ``None`` when nothing was gated (no adapters)."""
    if gates.numel() == 0 or not columns:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ids, data = block_gates(gates, blocks)
    vmax = float(np.abs(data).max()) or 1.0
    n, steps = len(columns), data.shape[2]
    fig, axes = plt.subplots(
        1, n, figsize=(1.4 + 2.6 * n, 1.5 + 0.24 * len(ids)), squeeze=False, constrained_layout=True
    )
    ticks = np.unique(np.linspace(1, steps, min(steps, 6)).round().astype(int))
    im = None
    for ci, ax in enumerate(axes[0]):
        im = ax.imshow(
            data[ci],
            aspect="auto",
            cmap="RdBu_r",
            vmin=-vmax,
            vmax=vmax,
            interpolation="nearest",
            extent=(0.5, steps + 0.5, len(ids) - 0.5, -0.5),
        )
        ax.set_title(columns[ci][:28], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_xticks(ticks)
        ax.set_yticks(range(len(ids)), ids if ci == 0 else [""] * len(ids), fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="gate")
    fig.suptitle("gates applied: mean over the layers of each block, per step", fontsize=9)
    return _figure_image(fig)


def loss_curve(points: Sequence[tuple[int, float]], title: str = "training loss") -> Image.Image | None:
    """Loss per step with a moving average; ``None`` before the first step."""
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = np.array([p[0] for p in points])
    losses = np.array([p[1] for p in points], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5.0, 2.6))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.6, label=f"mean of {window}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _figure_image(fig)


def schedule_curves(curves: Sequence[tuple[str, Sequence[float]]]) -> Image.Image | None:
    """Weight of each adapter over the steps (the schedule policy's keyframes, interpolated)."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.0, 2.2))
    for name, values in curves:
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=2.5, lw=1.2, label=name[:24])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _figure_image(fig)


def labelled_grid(
    images: Sequence[Image.Image], labels: Sequence[str], columns: int | None = None, min_side: int = 128
) -> Image.Image:
    """Images side by side (``columns`` per row) with a caption strip under each; small images are
    enlarged by an integer factor (nearest neighbour) to at least ``min_side`` pixels."""
    if not images:
        raise ValueError("nothing to put in the grid")
    cols = columns or len(images)
    side = max(max(im.width, im.height) for im in images)
    scale = max(1, -(-min_side // side))
    images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    strip = 18
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (im, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        grid.paste(im.convert("RGB"), (x, y))
        draw.text((x + 3, y + h + 3), label[: max(4, w // 6)], fill="black", font=font)
    return grid
