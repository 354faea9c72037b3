"""Accuracy-per-timestep tables (Markdown) and plots (PNG drawn with Pillow, no matplotlib)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def accuracy_table(timesteps: list[int], metrics: dict, every: int = 5) -> str:
    """Markdown: step index, timestep, validation accuracy per attribute (every k-th step + last)."""
    attrs = list(metrics["attributes"])
    lines = ["| step | t | " + " | ".join(attrs) + " |", "|---|---|" + "---|" * len(attrs)]
    rows = sorted(set(list(range(0, len(timesteps), every)) + [len(timesteps) - 1]))
    for i in rows:
        accs = [metrics["attributes"][a]["val_accuracy_per_step"][i] for a in attrs]
        lines.append(f"| {i} | {timesteps[i]} | " + " | ".join(f"{v:.3f}" for v in accs) + " |")
    return "\n".join(lines)


def line_plot(path: Path, xs: list[float], series: dict[str, list[float]], title: str,
              xlabel: str, ylabel: str, y_range: tuple[float, float] | None = None,
              size: tuple[int, int] = (640, 400), x_format=None,
              x_ticks: list[float] | None = None) -> None:
    """A minimal line chart with axes, ticks and a legend (``x_format``: x value -> tick label;
    ``x_ticks``: where the x ticks go, default six evenly spaced)."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    allv = [v for s in series.values() for v in s]
    lo, hi = y_range or (min(allv), max(allv))
    hi = hi if hi > lo else lo + 1
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - lo) / (hi - lo) * (h - top - bottom))
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(6):
        y = lo + k * (hi - lo) / 5
        d.text((5, px(x0, y)[1] - 6), f"{y:.2f}", fill="black")
    for x in (x_ticks if x_ticks is not None else [x0 + k * (x1 - x0) / 5 for k in range(6)]):
        d.text((px(x, lo)[0] - 10, h - bottom + 5), x_format(x) if x_format else f"{x:.0f}", fill="black")
    for n, (name, ys) in enumerate(series.items()):
        c = COLOURS[n % len(COLOURS)]
        pts = [px(x, y) for x, y in zip(xs, ys)]
        d.line(pts, fill=c, width=2)
        for x, y in pts:                      # a dot per point (a series of one point shows too)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        d.text((left + 10 + 110 * n, top + 5), name, fill=c)
    d.text((w // 2 - 60, h - 20), xlabel, fill="black")
    d.text((left, 8), f"{title} ({ylabel})", fill="black")
    img.save(path)


def accuracy_plot(timesteps: list[int], metrics: dict, path: Path) -> None:
    series = {a: m["val_accuracy_per_step"] for a, m in metrics["attributes"].items()}
    line_plot(path, [float(t) for t in timesteps], series, "ADP validation accuracy per timestep",
              "timestep t (999 = start of sampling)", "accuracy", (0.0, 1.0))
