"""Helpers for benchmark scripts: print a table and save it as Markdown and JSON under runs/bench/<name>/."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Render a list of dicts (same keys) as a GitHub Markdown table."""
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0].keys())
    for row in rows[1:]:
        columns += [key for key in row if key not in columns]

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(col)) for col in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere): results differ by CPU
    (MKL's fp32 kernels, for one, are 2-3x slower on AMD than on Intel at decode shapes)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def save_table(name: str, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None,
               root: str | os.PathLike = "runs/bench", notes: str = "") -> Path:
    """Print ``rows`` as a table and write ``<root>/<name>/results.{md,json}``; returns the folder."""
    import torch

    meta = dict(meta or {})
    meta.setdefault("date", time.strftime("%Y-%m-%d %H:%M:%S"))
    meta.setdefault("machine", f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, torch "
                    f"{torch.__version__}, {torch.get_num_threads()} threads")
    table = markdown_table(rows)
    print(f"\n## {name}\n")
    print(table)
    if notes:
        print(notes)
    out_dir = Path(root) / name
    header = f"# {name}\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n"
    _atomic_write(out_dir / "results.md", header + table + ("\n" + notes + "\n" if notes else ""))
    _atomic_write(out_dir / "results.json", json.dumps({"name": name, "meta": meta, "rows": rows}, indent=2, default=str))
    return out_dir
