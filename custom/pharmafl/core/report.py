"""Reading a finished FLARE run (the server's run folder, validation results, TensorBoard curves) and writing
a report folder: what every use case's report shares."""

from __future__ import annotations

import json
from pathlib import Path

from pharmafl.core.errors import InputError

CURVE_TAG = "test/auc_pr"


# Written by each site (``TrunkOnlyFilter``) in its run folder: the full validation result, per-task AUCs included,
# that never leaves the site.
SITE_METRICS_FILE = "site_metrics.json"


def find_server_run_dir(workspace: str | Path) -> Path:
    """The server's run folder of a simulator workspace or of a downloaded POC/production job result."""
    root = Path(workspace)
    if not root.is_dir():
        raise InputError(f"Workspace '{root}' does not exist.")
    candidates = sorted(root.glob("**/cross_site_val/cross_val_results.json"))
    if not candidates:
        raise InputError(f"'{root}' holds no finished run (no cross_site_val/cross_val_results.json).")
    preferred = [c for c in candidates if "server" in c.parts] or candidates
    try:
        results = json.loads(preferred[0].read_text())
    except (OSError, ValueError):
        results = None
    if not isinstance(results, dict) or not any(isinstance(v, dict) and v for v in results.values()):
        raise InputError(
            f"the run in '{root}' finished without results: no site scored the final model; see its simulate.log."
        )
    return preferred[0].parent.parent


def federated_rounds(run_dir: Path) -> int | None:
    """The number of rounds the run's server config set (None: the config is not in the run folder)."""
    for config in sorted(run_dir.glob("app_*/config/config_fed_server.json")):
        try:
            return int(json.loads(config.read_text())["num_rounds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def rounds_note(federated: int | None, baselines: dict[str, int]) -> str:
    """A line for the table: the rounds of each side, and a warning when they differ."""
    if federated is None or not baselines:
        return ""
    sides = ", ".join(f"{name} {rounds}" for name, rounds in baselines.items())
    if all(rounds == federated for rounds in baselines.values()):
        return f"\nRounds: federated {federated}, {sides}."
    return (
        f"\nWARNING: the rounds differ (federated {federated}, {sides}): the comparison is like for like only when "
        "each side's rounds were chosen on its own validation fold (as scripts/demo.sh does); else rerun the "
        f"baseline with --rounds {federated}."
    )


def federated_final(run_dir: Path) -> dict[str, dict]:
    """Each site's final metrics: the last global trunk with the site's own head, on its test fold."""
    results = json.loads((run_dir / "cross_site_val" / "cross_val_results.json").read_text())
    final = {}
    for site, by_model in results.items():
        # A job started from a checkpoint also lists the initial model (e.g. SRV_initial_trunk.pt): skip it.
        trained = [name for name in by_model if "initial" not in name.lower()] or list(by_model)
        if trained:
            final[site] = by_model[trained[0]]
    return final


def site_metrics(run_dir: Path, site: str) -> dict | None:
    """A site's full validation result from its own run folder, when the workspace holds the site folders.

    A simulator workspace does (``<workspace>/<site>/simulate_job/site_metrics.json``, beside
    ``<workspace>/server/simulate_job``); a job result downloaded from a POC or production server does not.
    """
    path = run_dir.parent.parent / site / run_dir.name / SITE_METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno}).") from err
    return metrics if isinstance(metrics, dict) else None


def tensorboard_curves(run_dir: Path, tag: str = CURVE_TAG) -> dict[str, list[float]]:
    """Per-site scalar series streamed to the server's TensorBoard, ordered by step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    curves: dict[str, list[float]] = {}
    tb_root = run_dir / "tb_events"
    if not tb_root.is_dir():
        return curves
    for site_dir in sorted(p for p in tb_root.iterdir() if p.is_dir()):
        points: dict[int, float] = {}
        for event_file in sorted(site_dir.glob("events.out.tfevents.*")):
            for event in EventFileLoader(str(event_file)).Load():
                for value in event.summary.value:
                    if value.tag == tag:
                        # The loader migrates simple_value scalars to tensors.
                        scalar = value.simple_value if value.HasField("simple_value") else make_ndarray(value.tensor)
                        points[int(event.step)] = float(scalar)
        if points:
            curves[site_dir.name] = [points[s] for s in sorted(points)]
    return curves


def write_report_files(out: Path, summary: dict, table: str, plot, plot_name: str, heading: str) -> None:
    """``summary.json``, the plot and ``report.md`` (heading, table, plot) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / plot_name)
    (out / "report.md").write_text(f"{heading}\n\n{table}\n\n![per-round metrics]({plot_name})\n")
