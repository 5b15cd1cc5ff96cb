"""Reports: a table for the terminal, JSON and CSV files, and PNG charts, from a list of
rows (dicts). ``fastlm eval``, ``fastlm sweep`` and cross-validation print and save their
results through these, so every report reads the same. Also ``curves_svg``, a training run's
loss curves as SVG written here directly (no plotting library to import at the end of a run)."""
from __future__ import annotations

import csv
import io
import json
import math

from xml.sax.saxutils import escape

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


# matplotlib's first colours (train, val, ...), so the curves look as they did when drawn with it
_CURVE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def _nice_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten apart) covering [lo, hi]; just
    [lo, hi] where the range is too narrow for float steps at that magnitude."""
    if not hi > lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(1, most - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    n = math.ceil((hi - first) / step - 1e-9) + 1
    ticks = [round(first + i * step, 12) for i in range(min(n, most + 2))]
    if len(ticks) < 2 or ticks[0] > lo or ticks[-1] < hi or len(set(ticks)) < len(ticks):
        return [lo, hi]
    return ticks


def _tick_label(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 or float(v).is_integer() else f"{v:.4g}"


def curves_svg(series: dict, xlabel: str, ylabel: str, title: str = "", width: int = 700, height: int = 420) -> str:
    """Line charts of ``series`` ({name: (xs, ys)}) on shared axes, as an SVG document: round
    ticks, a light grid, a marker at each point, a legend. Points whose x or y is not finite
    are left out (a curve breaks there)."""
    left, right, top, bottom = 70, 30, 40 if title else 20, 50
    pw, ph = width - left - right, height - top - bottom
    pts = {name: [(float(x), float(y)) for x, y in zip(*xy)] for name, xy in series.items()}
    finite = [(x, y) for p in pts.values() for x, y in p if math.isfinite(x) and math.isfinite(y)]
    xs_all, ys_all = [x for x, _ in finite] or [0.0], [y for _, y in finite] or [0.0]
    xt, yt = _nice_ticks(min(xs_all), max(xs_all)), _nice_ticks(min(ys_all), max(ys_all))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{left + pw / 2:.1f}" y="24" text-anchor="middle" font-size="14">{escape(title)}</text>')
    for t in xt:
        out.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{top + ph}" stroke="#000" '
                   f'stroke-opacity="0.12"/>')
        out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 18}" text-anchor="middle">{_tick_label(t)}</text>')
    for t in yt:
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#000" '
                   f'stroke-opacity="0.12"/>')
        out.append(f'<text x="{left - 8}" y="{sy(t) + 4:.1f}" text-anchor="end">{_tick_label(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#000"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 10}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text x="16" y="{top + ph / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + ph / 2:.1f})">{escape(ylabel)}</text>')
    for i, (name, p) in enumerate(pts.items()):
        colour = _CURVE_COLOURS[i % len(_CURVE_COLOURS)]
        runs, run = [], []
        for x, y in p:
            if math.isfinite(x) and math.isfinite(y):
                run.append((sx(x), sy(y)))
            elif run:
                runs, run = runs + [run], []
        runs += [run] if run else []
        for r in runs:
            if len(r) > 1:
                out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="'
                           + " ".join(f"{a:.1f},{b:.1f}" for a, b in r) + '"/>')
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{colour}"/>' for a, b in r]
        ly = top + 14 + 18 * i
        out.append(f'<line x1="{left + pw - 90}" y1="{ly}" x2="{left + pw - 66}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="1.5"/>')
        out.append(f'<text x="{left + pw - 60}" y="{ly + 4}">{escape(str(name))}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
