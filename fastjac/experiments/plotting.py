"""PNG figures, written atomically (matplotlib's Agg backend; no display needed)."""
from __future__ import annotations

from pathlib import Path

from .results import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the figures need matplotlib: pip install 'fastjac[experiments]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path) -> Path:
    """Write ``fig`` to ``path`` (PNG) atomically and close it."""
    plt = pyplot()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight"))
    plt.close(fig)
    return path


def panels(rows: int, cols: int, *, width: float = 3.2, height: float = 2.6, dpi: int = 80, **kw):
    """A figure with a rows × cols grid of axes (always a 2-D array)."""
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=dpi,
                             squeeze=False, **kw)
    return fig, axes
