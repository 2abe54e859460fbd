"""Figure helpers: a headless backend and atomic PNG writes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from reslab import runs  # noqa: E402


def new_figure(panels: int = 1, width: float = 5.0, height: float = 3.8) -> tuple[Any, Any]:
    """A figure with ``panels`` side-by-side axes."""
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), constrained_layout=True)
    return fig, axes


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    runs.write_bytes(path, buf.getvalue())
