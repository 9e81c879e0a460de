"""Read-modify-write of ``bench/results/summary.json``, the file of headline figures.

Each figure is stored as ``{"value": v, "goal": "<= 1.05", "card": "...", "date": "...", "command": "..."}``
under ``{"figures": {NAME: ...}}``. Every benchmark that measures a headline figure calls
:func:`update_figures` so the file always holds the latest measurement, better or worse.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SUMMARY_PATH = RESULTS_DIR / "summary.json"


def card_name() -> str:
    """The name of the device the figures were measured on (GPU name, else the CPU model)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def update_figures(figures: dict[str, tuple[float, str]], card: str, command: str,
                   path: Path = SUMMARY_PATH) -> None:
    """Write figures into the summary file.

    Args:
        figures: NAME -> (value, goal), e.g. ``{"decode_time_vs_sdpa_contiguous": (1.02, "<= 1.05")}``.
        card: the device name the figures were measured on.
        command: the command that reproduces the measurement.
        path: the summary file (created if missing).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"figures": {}}
    if path.exists():
        data = json.loads(path.read_text())
        data.setdefault("figures", {})
    date = _dt.date.today().isoformat()
    for name, (value, goal) in figures.items():
        data["figures"][name] = {
            "value": round(float(value), 4),
            "goal": goal,
            "card": card,
            "date": date,
            "command": command,
        }
    data["figures"] = dict(sorted(data["figures"].items()))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def render_table(path: Path = SUMMARY_PATH) -> str:
    """The summary as a Markdown table (the README shows it between its figures-table markers)."""
    figures = json.loads(path.read_text())["figures"]
    rows = ["| figure | value | goal | card | date |", "| --- | --- | --- | --- | --- |"]
    for name, f in figures.items():
        rows.append(f"| `{name}` | {f['value']:g} | {f['goal']} | {f['card']} | {f['date']} |")
    return "\n".join(rows)


def update_readme(readme: Path = RESULTS_DIR.parent.parent / "README.md") -> None:
    """Rewrite the README's table between ``<!-- figures-table -->`` and ``<!-- /figures-table -->``."""
    text = readme.read_text()
    start, end = "<!-- figures-table -->", "<!-- /figures-table -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{render_table()}\n{end}{tail}")


if __name__ == "__main__":
    update_readme()
