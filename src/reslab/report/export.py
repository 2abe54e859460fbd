"""Every run's metrics as one CSV table: one row per run and epoch, for pandas, spreadsheets or any plotting tool.

Columns: ``run`` (the run's directory name), then the sweep's axes (a sweep folder) or the config fields that tell
runs apart (model, residual, shortcut, seed, lr, epochs, data), then ``status`` and every metric the training loop
writes (``epoch``, ``step``, ``lr``, ``train_loss``, ``test_error``...), blank where a run has no such value.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

from reslab import runs

CONFIG_COLUMNS = ("model", "residual", "shortcut", "seed", "lr", "epochs", "data")


def _run_dirs(root: Path) -> list[Path]:
    if (root / "metrics.jsonl").exists() or (root / "config.json").exists():
        return [root]
    if (root / "runs").is_dir():
        return sorted(p for p in (root / "runs").iterdir() if (p / "config.json").exists())
    raise ValueError(f"{root} holds no run: expected a run directory (config.json) or a folder with runs/")


def rows(root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The header and the rows of :func:`export_csv`."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    dirs = _run_dirs(root)
    axes: dict[str, dict[str, Any]] = {}
    if (root / "sweep.json").exists():
        plan = runs.read_json(root / "sweep.json")
        axes = {r["id"]: r["axes"] for r in plan.get("runs", [])}
        ident = list(plan.get("axes", {}))
    else:
        ident = list(CONFIG_COLUMNS)
    out, metric_keys = [], {}
    for d in dirs:
        cfg = runs.read_json(d / "config.json").get("train", {})
        res = runs.read_json(d / "result.json") if (d / "result.json").exists() else {}
        ids = axes.get(d.name) if axes else {k: cfg.get(k) for k in ident}
        for m in runs.read_jsonl(d / "metrics.jsonl"):
            metric_keys.update(dict.fromkeys(m))
            out.append({"run": d.name, **(ids or {}), "status": res.get("status", "pending"), **m})
    return ["run", *ident, "status", *metric_keys], out


def export_csv(root: Path, dest: Path) -> int:
    """Write the metrics of every run under ``root`` to ``dest`` (``-``: standard output); return the row count."""
    header, table = rows(root)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, restval="", extrasaction="raise", lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    if str(dest) == "-":
        sys.stdout.write(buf.getvalue())
    else:
        runs.write_text(dest, buf.getvalue())
    return len(table)
