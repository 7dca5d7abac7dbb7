"""What a run's DP-SGD sites spent, for the reports: each site's ``privacy.json`` beside its run folder."""

from __future__ import annotations

import json
from pathlib import Path

#: a DP-SGD site's spending in its run folder: written by its executor each round, what a restarted run resumes
#: from and what the reports read
PRIVACY_FILE = "privacy.json"


def site_privacy(run_dir: Path, site: str) -> dict | None:
    """A DP-SGD site's spending (``privacy.json`` in its run folder), when the workspace holds the site folders."""
    path = run_dir.parent.parent / site / run_dir.name / PRIVACY_FILE
    if not path.is_file():
        return None
    spent = json.loads(path.read_text())
    return {k: v for k, v in spent.items() if k != "state"}


def privacy_table(summary: dict) -> str:
    """Epsilon spent per DP-SGD site ("" when no site trained with DP)."""
    rows = [(site, e["privacy"]) for site, e in summary["sites"].items() if e.get("privacy")]
    if not rows:
        return ""
    lines = [
        "\nDP-SGD (sample-level; RDP unless stated):\n",
        "| site | epsilon | delta | target epsilon | noise multiplier | clip | sample rate | steps | budget spent |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for site, p in rows:
        target = "-" if p.get("target_epsilon") is None else f"{p['target_epsilon']:g}"
        lines.append(
            f"| {site} | {p['epsilon']:.3f} | {p['delta']:.2g} | {target} | {p['noise_multiplier']:.3f} | "
            f"{p['max_grad_norm']:g} | {p['sample_rate']:.4f} | {p['steps']} | {'yes' if p['exhausted'] else 'no'} |"
        )
    return "\n".join(lines)
