"""fastlm.report: the text table and the SVG loss curves."""
import math
import re
import xml.dom.minidom

from fastlm.report import _nice_ticks, curves_svg, format_table


def test_nice_ticks_cover_the_range_with_round_steps():
    for lo, hi in [(2.41, 5.55), (250, 300), (0, 1), (-3.2, 7.9), (1e-4, 3e-4), (5, 5), (0, 0)]:
        t = _nice_ticks(lo, hi)
        assert t[0] <= lo and t[-1] >= hi and len(t) >= 2
        steps = {round(b - a, 9) for a, b in zip(t, t[1:])}
        assert len(steps) == 1
        step = steps.pop()
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5, 10)), step


def test_curves_svg_is_a_document_with_one_line_per_unbroken_run():
    xs = list(range(0, 110, 10))
    ys = [4.0 - 0.2 * i for i in range(len(xs))]
    broken = list(ys)
    broken[5] = float("nan")  # a non-finite point: the curve breaks there
    svg = curves_svg({"train": (xs, ys), "val <&>": (xs, broken)}, "step", "loss", "a & b")
    doc = xml.dom.minidom.parseString(svg)  # well-formed, names and title escaped
    assert doc.documentElement.tagName == "svg"
    assert svg.count("<polyline") == 3  # train whole, val in two runs
    assert svg.count("<circle") == len(xs) + len(xs) - 1
    assert "val &lt;&amp;&gt;" in svg and "a &amp; b" in svg
    # every point inside the plot area
    w, h = 700, 420
    for cx, cy in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', svg):
        assert 0 < float(cx) < w and 0 < float(cy) < h


def test_nice_ticks_end_at_ranges_float_steps_cannot_split():
    # a range narrow for its magnitude (1 at 1e16 is below float32's and near float64's step)
    # and one near the top of float64: a few ticks covering it, never an endless loop
    for lo, hi in [(1e16, 1e16 + 4), (-1e300, 1e300), (1e-300, 2e-300)]:
        t = _nice_ticks(lo, hi)
        assert 2 <= len(t) <= 8 and t[0] <= lo and t[-1] >= hi


def test_curves_svg_single_point_and_empty_series():
    assert "<circle" in curves_svg({"val": ([300], [2.4])}, "step", "loss")
    svg = curves_svg({"val": ([], [])}, "step", "loss")
    xml.dom.minidom.parseString(svg)
    assert "<polyline" not in svg and "<circle" not in svg


def test_format_table_aligns_numbers_right():
    out = format_table([{"name": "a", "loss": 1.5}, {"name": "bb", "loss": 12.25}])
    lines = out.splitlines()
    assert lines[0].split() == ["name", "loss"] and lines[2].endswith("1.5000") and lines[3].endswith("12.2500")
