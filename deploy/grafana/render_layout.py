"""Draw the dashboard's layout (panel titles at their grid positions) as docs/dashboard-layout.png.

Run from the repository root: `make dashboard-png` (or python deploy/grafana/render_layout.py).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "memory-worker.json"
OUT = ROOT / "docs" / "dashboard-layout.png"
#: Grafana's grid: 24 columns; one row unit is about 30 px against ~80 px per column.
ROW_SCALE = 0.4
COLOURS = {"Throughput": "#dbeafe", "Sink": "#fef3c7", "Delivery": "#dcfce7", "Queues": "#fce7f3"}


def main() -> None:
    """Render the layout of deploy/grafana/memory-worker.json."""
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) * ROW_SCALE
    fig, ax = plt.subplots(figsize=(12, bottom / 2.4 + 0.3))
    colour = "#f3f4f6"
    for panel in panels:
        g = panel["gridPos"]
        x, y, w, h = g["x"], g["y"] * ROW_SCALE, g["w"], g["h"] * ROW_SCALE
        if panel["type"] == "row":
            title = panel["title"].replace("$instance", "<worker>")
            if panel.get("repeat"):
                title += "   (repeated for each worker / pod)"
            colour = next((c for k, c in COLOURS.items() if title.startswith(k)), "#f3f4f6")
            ax.text(0.1, y + h / 2, title, va="center", fontsize=10, fontweight="bold")
            ax.plot([0, 24], [y + h, y + h], color="#9ca3af", linewidth=0.8)
            continue
        ax.add_patch(Rectangle((x + 0.1, y + 0.05), w - 0.2, h - 0.1, facecolor=colour,
                               edgecolor="#6b7280", linewidth=0.8))  # fmt: skip
        label = "\n".join(textwrap.wrap(panel["title"], width=max(10, int(w * 3.2))))
        kind = panel["type"].replace("timeseries", "time series")
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=9)
        ax.text(x + w - 0.25, y + h - 0.2, kind, ha="right", va="bottom", fontsize=6.5,
                color="#6b7280")  # fmt: skip
    ax.set_xlim(0, 24)
    ax.set_ylim(bottom, 0)
    ax.axis("off")
    ax.set_title("memory-worker dashboard: variables data source, worker / pod, queue, DLQ",
                 fontsize=11, loc="left")  # fmt: skip
    fig.tight_layout()
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
