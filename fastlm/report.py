"""Reports: a table for the terminal, JSON and CSV files, and a PNG chart, from a list of
rows (dicts). ``fastlm eval``, ``fastlm sweep`` and cross-validation print and save their
results through these, so every report reads the same."""
from __future__ import annotations

import csv
import io
import json
import math

from ._io import atomic_write_bytes


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """The rows as an aligned text table (numbers right-aligned, text left-aligned)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_csv(path, rows: list[dict], columns: list[str] | None = None) -> None:
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: (json.dumps(r[c]) if isinstance(r.get(c), (dict, list)) else r.get(c)) for c in columns})
    atomic_write_bytes(path, buf.getvalue().encode())


def bar_png(path, labels: list[str], values: list[float], ylabel: str, title: str = "") -> None:
    """A bar chart, one bar a label (matplotlib, needs ``pip install matplotlib``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("a PNG report needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 4.2), dpi=100)
    bars = ax.bar(range(len(values)), values, color="tab:blue")
    ax.bar_label(bars, labels=[_cell(float(v)) for v in values], fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center",
                  fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def points_png(path, labels: list[str], values: list[float], ylabel: str, title: str = "") -> None:
    """One point a label, the axis fitted to the values (small differences between close values
    stay visible), the lowest value marked: for losses of several trials."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("a PNG report needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 4.2), dpi=100)
    xs = list(range(len(values)))
    ax.plot(xs, values, "o", color="tab:blue")
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if finite:
        best, i = min(finite)
        ax.plot([i], [best], "o", color="tab:red", markersize=9, label=f"lowest: {_cell(float(best))}")
        ax.legend()
    for x, v in zip(xs, values):
        if math.isfinite(v):
            ax.annotate(_cell(float(v)), (x, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(xs, labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center",
                  fontsize=8)
    ax.set_xlim(-0.5, len(values) - 0.5)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
