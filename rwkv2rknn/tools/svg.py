"""Plain inline SVG for the report page: an element builder, linear and log scales, and four
small charts (horizontal bars against a reference line, stacked bars, a line plot, a
histogram of columns).

Everything is text generated from the data; nothing refers outside the page.
"""

from __future__ import annotations

import math
from html import escape
from typing import Callable, List, Optional, Sequence, Tuple

FONT = 11
GRID = "#d0d0d0"
INK = "#222222"
MAX_POINTS = 256  # marked (and hoverable) points of a line plot; longer series are a line only


def esc(text) -> str:
    return escape(str(text), quote=True)


def fmt(v: float, digits: int = 3) -> str:
    """A short number: 0.0123, 41.4, 1.2e-05."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}"


class Svg:
    """Collects elements; ``render()`` gives one <svg> with a role and an accessible name."""

    def __init__(self, width: float, height: float, label: str, cls: str = "chart"):
        self.width, self.height, self.label, self.cls = width, height, label, cls
        self.parts: List[str] = []

    def add(self, tag: str, title: Optional[str] = None, text: Optional[str] = None, **attrs) -> None:
        a = " ".join(
            f'{k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None
        )
        inner = (f"<title>{esc(title)}</title>" if title else "") + (esc(text) if text else "")
        self.parts.append(f"<{tag} {a}>{inner}</{tag}>" if inner else f"<{tag} {a}/>")

    def rect(self, x, y, w, h, fill, title=None, **attrs) -> None:
        self.add("rect", title, x=_n(x), y=_n(y), width=_n(max(w, 0)), height=_n(h), fill=fill, **attrs)

    def text(self, x, y, s, anchor="start", size=FONT, fill=INK, **attrs) -> None:
        self.add(
            "text", None, str(s), x=_n(x), y=_n(y), text_anchor=anchor, font_size=size, fill=fill, **attrs
        )

    def line(self, x1, y1, x2, y2, stroke=INK, width=1, dash=None, title=None, **attrs) -> None:
        self.add(
            "line",
            title,
            x1=_n(x1),
            y1=_n(y1),
            x2=_n(x2),
            y2=_n(y2),
            stroke=stroke,
            stroke_width=width,
            stroke_dasharray=dash,
            **attrs,
        )

    def reference(self, ref: Tuple[float, str], x1, y1, x2, y2, **style) -> None:
        """The dashed line of a reference ``ref`` (value, title), its value in ``data-value``."""
        self.line(x1, y1, x2, y2, dash="5 3", title=ref[1], class_="ref", data_value=repr(ref[0]), **style)

    def render(self) -> str:
        return (
            f'<svg class="{esc(self.cls)}" role="img" '
            f'aria-label="{esc(self.label)}" width="{_n(self.width)}" height="{_n(self.height)}" '
            f'viewBox="0 0 {_n(self.width)} {_n(self.height)}">' + "".join(self.parts) + "</svg>"
        )


def _n(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def linear(d0: float, d1: float, r0: float, r1: float) -> Callable[[float], float]:
    span = (d1 - d0) or 1.0
    return lambda v: r0 + (v - d0) * (r1 - r0) / span


def ticks(hi: float, n: int = 5) -> List[float]:
    """Round tick values from 0 to at least ``hi``."""
    if hi <= 0:
        return [0.0, 1.0]
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(hi / step - 1e-9)) + 1)]


def _bar_frame(
    hi: float, n_rows: int, left: int, right: int, row: int, top: int, unit: str, label: str, width: int
):
    """An Svg with a value axis from 0 to past ``hi`` under ``n_rows`` rows, and its x scale."""
    tv = ticks(hi)
    x = linear(0, tv[-1], left, width - right)
    height = top + n_rows * row + 32
    s = Svg(width, height, label)
    for t in tv:
        s.line(x(t), top, x(t), height - 28, stroke=GRID)
        s.text(x(t), height - 14, fmt(t), anchor="middle", size=10)
    s.text(width - right, height - 2, unit, anchor="end", size=10)
    return s, x


def hbars(
    rows: Sequence[Tuple[str, float, str, str]],
    unit: str,
    label: str,
    ref: Optional[Tuple[float, str]] = None,
    width: int = 760,
) -> str:
    """Horizontal bars (label, value, colour, hover) with an optional dashed reference line."""
    left, bar, gap, top = 300, 20, 8, 8
    hi = max([v for _, v, _, _ in rows] + ([ref[0]] if ref else []) + [0.0])
    s, x = _bar_frame(hi, len(rows), left, 60, bar + gap, top, unit, label, width)
    for i, (name, v, colour, hover) in enumerate(rows):
        y = top + i * (bar + gap)
        s.text(left - 6, y + bar * 0.7, name, anchor="end")
        s.rect(left, y, x(v) - left, bar, colour, title=hover, class_="bar", data_value=repr(v))
        s.text(width - 4, y + bar * 0.7, f"{v:.2f}", anchor="end", size=10)
    if ref:
        s.reference(ref, x(ref[0]), top - 4, x(ref[0]), s.height - 28, stroke=INK, width=2)
    return s.render()


def stacked(
    rows: Sequence[Tuple[str, Sequence[Tuple[str, float, str]]]], unit: str, label: str, width: int = 760
) -> str:
    """One horizontal bar per row, cut into parts (name, value, colour), total at the end."""
    left, bar, gap, top = 170, 24, 12, 6
    hi = max([sum(v for _, v, _ in parts) for _, parts in rows] + [0.0])
    s, x = _bar_frame(hi, len(rows), left, 90, bar + gap, top, unit, label, width)
    for i, (name, parts) in enumerate(rows):
        y, at = top + i * (bar + gap), 0.0
        s.text(left - 6, y + bar * 0.68, name, anchor="end")
        for pname, v, colour in parts:
            s.rect(
                x(at),
                y,
                x(at + v) - x(at),
                bar,
                colour,
                title=f"{name}: {pname} {v:.2f} {unit}",
                class_="part",
                data_part=pname,
                data_value=repr(v),
            )
            at += v
        s.text(x(at) + 5, y + bar * 0.68, f"{at:.2f} {unit}", size=10)
    return s.render()


def line_plot(
    ys: Sequence[float],
    label: str,
    y_name: str,
    ref: Optional[Tuple[float, str]] = None,
    width: int = 760,
    height: int = 180,
) -> str:
    """y per step (x = 0, 1, ...) on a log scale, points with hovers, optional dashed limit."""
    left, right, top, bottom = 60, 20, 24, 30
    vals = [v for v in ys if v is not None and math.isfinite(v) and v > 0]
    if ref and ref[0] > 0:
        vals.append(ref[0])
    lo = math.floor(math.log10(min(vals))) if vals else -6
    hi = math.ceil(math.log10(max(vals))) if vals else 0
    hi = hi if hi > lo else lo + 1
    x = linear(0, max(len(ys) - 1, 1), left, width - right)
    yl = linear(lo, hi, height - bottom, top)

    def y(v):
        return yl(math.log10(v)) if v > 0 else height - bottom

    s = Svg(width, height, label)
    for e in range(lo, hi + 1):
        s.line(left, yl(e), width - right, yl(e), stroke=GRID)
        s.text(left - 6, yl(e) + 4, f"1e{e}", anchor="end", size=10)
    s.text(width - right, height - 4, "step", anchor="end", size=10)
    s.text(4, 10, y_name, size=10)
    pts = [(x(i), y(v)) for i, v in enumerate(ys) if v is not None and math.isfinite(v)]
    if pts:
        s.add(
            "polyline",
            points=" ".join(f"{_n(a)},{_n(b)}" for a, b in pts),
            fill="none",
            stroke="#2c7bb6",
            stroke_width=1.5,
        )
    for i, v in enumerate(ys if len(ys) <= MAX_POINTS else []):  # a long check: the line only
        ok = v is not None and math.isfinite(v)
        s.add(
            "circle",
            f"step {i}: {y_name} {fmt(v)}",
            cx=_n(x(i)),
            cy=_n(y(v) if ok else top),
            r=2.5,
            fill="#2c7bb6" if ok else "#000000",
            class_="point",
            data_value=repr(v),
        )
    if ref and ref[0] > 0:
        s.reference(ref, left, y(ref[0]), width - right, y(ref[0]), stroke="#555555")
    return s.render()


def columns(
    groups: Sequence[Tuple[str, str, Sequence[int]]],
    labels: Sequence[str],
    label: str,
    unit: str = "tokens",
    width: int = 760,
    height: int = 190,
) -> str:
    """A histogram: one group of columns per bin (``labels``, left to right), one column per
    series (name, colour, counts) within it; hovers give the bin, the series and the count."""
    left, right, top, bottom = 44, 10, 22, 40
    n_bins = len(labels)
    hi = max([c for _, _, counts in groups for c in counts] + [1])
    tv = ticks(hi, 4)
    y = linear(0, tv[-1], height - bottom, top)
    s = Svg(width, height, label)
    for t in tv:
        s.line(left, y(t), width - right, y(t), stroke=GRID)
        s.text(left - 6, y(t) + 4, fmt(t), anchor="end", size=10)
    s.text(4, 10, unit, size=10)
    slot = (width - left - right) / max(n_bins, 1)
    col = slot * 0.8 / max(len(groups), 1)
    for b, name in enumerate(labels):
        x0 = left + b * slot + slot * 0.1
        for k, (series, colour, counts) in enumerate(groups):
            c = counts[b] if b < len(counts) else 0
            s.rect(
                x0 + k * col,
                y(c),
                col - 1,
                y(0) - y(c),
                colour,
                title=f"{series}, {name}: {c} {unit}",
                class_="col",
                data_series=series,
                data_bin=name,
                data_value=c,
            )
        s.text(left + (b + 0.5) * slot, height - bottom + 14, name, anchor="middle", size=9)
    for k, (series, colour, _) in enumerate(groups):
        s.rect(left + k * 90, height - 14, 10, 10, colour)
        s.text(left + k * 90 + 14, height - 5, series, size=10)
    return s.render()
