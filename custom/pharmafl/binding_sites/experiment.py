"""``pharmafl experiment esm``: FRA-LoRA vs naive factor averaging vs centralized, over seeds and variants.

Seed S prepares its own split of the inputs (``prepare binding-sites --seed S`` with a validation share per client)
and seeds every model, batch and noise draw of every method with S. Per seed, each *variant* (a name with settings,
e.g. five times the local steps at a fifth of the rounds, or sites of lower LoRA rank) runs ``jobs/esm2_lora_fra``
and ``jobs/esm2_lora_fedavg`` in the FLARE simulator; the centralized baseline (one model on every client's
training chains, ``baseline esm --mode centralized``) runs once per seed, for the same total steps, which every
variant must share. Per-round scoring is off (``score_rounds=false``): every method's final global model is scored
here, the same way, on each client's validation and test chains: test AUPRC and AUROC, and F1 and MCC at the
threshold that maximises F1 on that client's validation chains. The FRA-LoRA runs' ``fra_lora_rounds.jsonl`` gives
per round the energy FRA-LoRA's truncation kept and how far averaging A and B separately lands from the mean of B·A
on the same uploads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pharmafl.binding_sites.audit import chain_scores, job_settings, residue_metrics
from pharmafl.binding_sites.baseline import run_esm_baseline
from pharmafl.binding_sites.dataset import load_client
from pharmafl.binding_sites.model import LoRASettings, load_esm_lora, load_lora_state
from pharmafl.binding_sites.splits import SplitConfig, prepare_binding_sites
from pharmafl.binding_sites.train import BindingSiteConfig
from pharmafl.core.errors import InputError
from pharmafl.core.metrics import mean_std, ranked_metrics, token_metrics
from pharmafl.core.outputs import check_output, staged_output
from pharmafl.core.paths import STATE_FILE, job_dir
from pharmafl.core.report import find_server_run_dir
from pharmafl.core.settings import parsed_value, settings
from pharmafl.flare.fra_lora_aggregator import ROUNDS_FILE
from pharmafl.jobs import num_rounds, prepared_sites
from pharmafl.jobs.simulate import run_simulator
from pharmafl.privacy.report import site_privacy

EXPERIMENT = "experiment esm"
FEDERATED = {"fra_lora": "esm2_lora_fra", "naive": "esm2_lora_fedavg"}  # method -> job
CENTRALIZED = "centralized"
METRICS = ("auprc", "auroc", "f1", "mcc")
POOLED = "pooled"  # every client's test residues together


@dataclass(frozen=True)
class Variant:
    """One federated setting: its name, rounds (None: the run's) and ``--set`` overrides on top of the run's."""

    name: str
    rounds: int | None = None
    overrides: Mapping = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    """``NAME`` or ``NAME:KEY=VALUE;KEY=VALUE`` (``rounds`` is the rounds; every other key a ``--set``)."""
    name, _, rest = text.partition(":")
    if not name.strip() or not name.replace("-", "").replace("_", "").isalnum():
        raise InputError(f"--variant needs a name of letters, digits, - or _ before ':', got '{text}'.")
    rounds, overrides = None, {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, equals, value = part.partition("=")
        if not equals or not key.strip():
            raise InputError(f"--variant {name}: '{part}' is not KEY=VALUE.")
        if key.strip() == "rounds":
            if not value.strip().isdigit() or int(value) < 1:
                raise InputError(f"--variant {name}: rounds must be a positive integer, got '{value}'.")
            rounds = int(value)
        else:
            overrides[key.strip()] = parsed_value(value.strip())
    return Variant(name.strip(), rounds, overrides)


def _steps_per_client(variant: Variant, rounds: int | None, base: Mapping) -> int:
    """Rounds x local steps of a variant (the job's defaults where neither it nor the run sets them)."""
    args = job_settings(job_dir(FEDERATED["fra_lora"]), _model_settings({**base, **variant.overrides}))
    local_steps = settings(BindingSiteConfig, args.get("training"), "training").local_steps
    return (variant.rounds or rounds or num_rounds(job_dir(FEDERATED["fra_lora"]))) * local_steps


def _model_settings(overrides: Mapping) -> dict:
    """The overrides ``job_settings`` knows (training, lora, model): the FLARE-side ones mean nothing to a model."""
    flare_side = {"site_ranks", "upload", "optimizer_state", "score_rounds"}
    return {k: v for k, v in overrides.items() if k not in flare_side and not k.startswith("dp.")}


def run_esm_experiment(
    inputs: Sequence[str],
    out_dir: str | Path,
    split: SplitConfig,
    seeds: int = 3,
    rounds: int | None = None,
    variants: Sequence[Variant] = (),
    overrides: Mapping | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] = print,
) -> dict:
    """Seeds 0..seeds-1 under ``out_dir/seed-S`` (``data``, ``<variant>/<method>``, ``centralized``); writes and
    returns the combined summary (``summary.json``, ``report.md``)."""
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
    if split.val_fraction <= 0:
        raise InputError("the experiment chooses thresholds on validation chains: --val-fraction must be above 0.")
    variants = list(variants) or [Variant("base")]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise InputError(f"--variant names must differ, got {', '.join(names)}.")
    base = dict(overrides or {})
    steps = {v.name: _steps_per_client(v, rounds, base) for v in variants}
    if len(set(steps.values())) > 1:
        raise InputError(
            "every variant must train the same total steps per client (rounds x local_steps), got "
            + ", ".join(f"{name} {count}" for name, count in steps.items())
        )
    check_output(out_dir, (EXPERIMENT,), overwrite, "--out", reads=list(inputs))
    with staged_output(out_dir, EXPERIMENT) as out:
        per_seed = []
        for seed in range(seeds):
            folder = out / f"seed-{seed}"
            data = folder / "data"
            prepare_binding_sites(list(inputs), str(data), replace(split, seed=seed), progress=None)
            seeded = {**base, "seed": seed, "score_rounds": False}
            states, rounds_records, privacy = {}, {}, {}
            for variant in variants:
                for method, job in FEDERATED.items():
                    progress(f"seed {seed}: {variant.name} {method}")
                    workspace = folder / variant.name / method
                    result = run_simulator(
                        job,
                        data,
                        workspace,
                        variant.rounds or rounds,
                        threads,
                        executor_overrides={**seeded, **variant.overrides},
                        quiet=True,
                    )
                    progress(f"seed {seed}: {variant.name} {method} done in {result['wall_s']:.0f} s")
                    run_dir = find_server_run_dir(workspace)
                    states[(variant.name, method)] = (run_dir / "app_server" / STATE_FILE, variant.overrides)
                    if method == "fra_lora":
                        rounds_records[variant.name] = _read_rounds(run_dir / ROUNDS_FILE)
                    spent = {site: site_privacy(run_dir, site) for site in prepared_sites(data)}
                    if any(spent.values()):
                        privacy.setdefault(variant.name, {})[method] = spent
            progress(f"seed {seed}: centralized")
            central_rounds = variants[0].rounds or rounds
            run_esm_baseline(
                data,
                folder / CENTRALIZED,
                job_dir(FEDERATED["fra_lora"]),
                CENTRALIZED,
                central_rounds,
                _model_settings({**seeded, **variants[0].overrides}) | {"score_rounds": False},
                progress=lambda _line: None,
            )
            states[(CENTRALIZED, CENTRALIZED)] = (folder / CENTRALIZED / STATE_FILE, variants[0].overrides)
            scores = score_states(data, states, seeded, seed)
            summary = {"seed": seed, "scores": scores, "rounds": rounds_records, "privacy": privacy}
            (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            per_seed.append(summary)
        combined = combine_seeds(per_seed, names)
        combined["settings"] = {
            "inputs": [str(p) for p in inputs],
            "split": {**vars(split), "skew_ratios": list(split.skew_ratios)},
            "rounds": rounds,
            "overrides": base,
            "variants": [{"name": v.name, "rounds": v.rounds, "overrides": dict(v.overrides)} for v in variants],
            "steps_per_client": next(iter(steps.values())),
        }
        (out / "summary.json").write_text(json.dumps(combined, indent=2) + "\n")
        (out / "report.md").write_text(f"# ESM-2 LoRA over {seeds} seeds\n\n{format_seeds_table(combined)}\n")
        plot_rounds(combined, out / "rounds.png")
    return combined


def plot_rounds(combined: dict, path: Path) -> None:
    """Per round and variant (mean over seeds): FRA-LoRA's retained energy (median module) and the naive error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (energy, naive) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, entry in combined["variants"].items():
        rounds = [row["round"] for row in entry["rounds"]]
        energy.plot(rounds, [row["retained_energy_median"]["mean"] for row in entry["rounds"]], "o-", label=variant)
        naive.plot(rounds, [row["naive_error"]["mean"] for row in entry["rounds"]], "o-", label=variant)
    energy.set(xlabel="round", ylabel="energy kept by the rank-r truncation", title="FRA-LoRA, median module")
    naive.set(xlabel="round", ylabel="||mean(B) mean(A) - mean(BA)|| / ||mean(BA)||", title="naive averaging error")
    for axis in (energy, naive):
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_rounds(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score_states(
    data: Path, states: Mapping[tuple[str, str], tuple[Path, Mapping]], overrides: Mapping, seed: int
) -> dict:
    """Each saved global model scored on every client's validation (threshold) and test chains, and pooled.

    ``states`` maps (variant, method) to the saved model and its variant's overrides (on top of ``overrides``): the
    model is built as that run built it (its ``lora`` settings, ``model``, crop)."""
    sites = prepared_sites(data)
    parts = {site: {part: load_client(str(data / site), part) for part in ("val", "test")} for site in sites}
    built: dict[str, tuple] = {}
    out: dict = {}
    for (variant, method), (path, variant_overrides) in states.items():
        args = job_settings(job_dir(FEDERATED["fra_lora"]), _model_settings({**overrides, **variant_overrides}))
        key = json.dumps(args, sort_keys=True, default=str)
        if key not in built:
            lora = settings(LoRASettings, args.get("lora"), "lora")
            model, tokenizer = load_esm_lora(args.get("model", ""), args.get("model_config"), lora, seed)
            built = {key: (model, tokenizer, settings(BindingSiteConfig, args.get("training"), "training").max_length)}
        model, tokenizer, max_length = built[key]
        with np.load(path) as saved:
            load_lora_state(model, {name: saved[name] for name in saved.files})
        scored = {
            site: {part: chain_scores(model, tokenizer, chains, max_length) for part, chains in site_parts.items()}
            for site, site_parts in parts.items()
        }
        flat = {
            site: {part: (np.concatenate(s.labels), np.concatenate(s.binding)) for part, s in by_part.items()}
            for site, by_part in scored.items()
        }
        entry = {site: ranked_metrics(*f["val"], *f["test"]) for site, f in flat.items()}
        # pooled: each client's residues at its own validation threshold, then every test residue together
        labels = np.concatenate([f["test"][0] for f in flat.values()])
        probabilities = np.concatenate([f["test"][1] for f in flat.values()])
        above = np.concatenate([f["test"][1] >= entry[site]["threshold"] for site, f in flat.items()])
        ranked = residue_metrics([labels], [probabilities])
        at_thresholds = token_metrics(labels, above.astype(float))
        entry[POOLED] = {
            "auprc": ranked["auc_pr"], "auroc": ranked["auc_roc"], "threshold": float("nan"),
            "f1": at_thresholds["f1"], "mcc": at_thresholds["mcc"],
        }  # fmt: skip
        out.setdefault(variant, {})[method] = entry
    return out


def combine_seeds(per_seed: list[dict], variants: Sequence[str]) -> dict:
    """Mean ± std over seeds per variant, method, client and metric; the paired FRA-LoRA - naive and FRA-LoRA -
    centralized differences; and per round the retained energy and the naive-averaging error."""
    combined: dict = {"seeds": len(per_seed), "variants": {}}
    central = [s["scores"][CENTRALIZED][CENTRALIZED] for s in per_seed]
    clients = list(central[0])
    for variant in variants:
        entry: dict = {}
        for method in FEDERATED:
            runs = [s["scores"][variant][method] for s in per_seed]
            entry[method] = {c: {m: mean_std([r[c][m] for r in runs]) for m in METRICS} for c in clients}
        entry[CENTRALIZED] = {c: {m: mean_std([r[c][m] for r in central]) for m in METRICS} for c in clients}
        fra = [s["scores"][variant]["fra_lora"] for s in per_seed]
        naive = [s["scores"][variant]["naive"] for s in per_seed]
        entry["fra_minus_naive"] = {
            c: {m: mean_std([f[c][m] - n[c][m] for f, n in zip(fra, naive, strict=True)]) for m in METRICS}
            for c in clients
        }
        entry["fra_minus_centralized"] = {
            c: {m: mean_std([f[c][m] - z[c][m] for f, z in zip(fra, central, strict=True)]) for m in METRICS}
            for c in clients
        }
        records = [s["rounds"].get(variant, []) for s in per_seed]
        per_round = []
        for index in range(min((len(r) for r in records), default=0)):
            rows = [r[index] for r in records]
            per_round.append({
                "round": rows[0].get("round", index),
                "retained_energy_min": mean_std([row.get("retained_energy", {}).get("min") for row in rows]),
                "retained_energy_median": mean_std([row.get("retained_energy", {}).get("median") for row in rows]),
                "naive_error": mean_std([row.get("naive_error") for row in rows]),
            })  # fmt: skip
        entry["rounds"] = per_round
        spent = [s.get("privacy", {}).get(variant) for s in per_seed]
        if any(spent):  # DP-SGD sites: the largest epsilon any site spent, and its noise, per seed
            entry["privacy"] = {
                method: {
                    **{
                        key: mean_std([max(p[key] for p in seed[method].values() if p) for seed in spent])
                        for key in ("epsilon", "noise_multiplier", "delta")
                    },
                    "accountant": next(p["accountant"] for p in spent[0][method].values() if p),
                }
                for method in FEDERATED
            }
        combined["variants"][variant] = entry
    return combined


def format_seeds_table(combined: dict) -> str:
    def cell(value: dict) -> str:
        return f"{value['mean']:.4f} ± {value['std']:.4f}" if value.get("n") else ""

    lines = []
    for variant, entry in combined["variants"].items():
        lines += [
            f"## {variant}",
            "",
            "| client | method | AUPRC | AUROC | F1 (val threshold) | MCC (val threshold) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for client in entry[CENTRALIZED]:
            for method in (*FEDERATED, CENTRALIZED, "fra_minus_naive", "fra_minus_centralized"):
                values = entry[method][client]
                lines.append(f"| {client} | {method} | " + " | ".join(cell(values[m]) for m in METRICS) + " |")
        if entry["rounds"]:
            lines += ["", "| round | FRA-LoRA retained energy, min module | median module | naive averaging error |",
                      "|---:|---:|---:|---:|"]  # fmt: skip
            for row in entry["rounds"]:
                lines.append(
                    f"| {row['round']} | {cell(row['retained_energy_min'])} | {cell(row['retained_energy_median'])} "
                    f"| {cell(row['naive_error'])} |"
                )
        for method, spent in entry.get("privacy", {}).items():
            lines.append(
                f"\nDP-SGD, {method}: largest epsilon any site spent {cell(spent['epsilon'])} at delta up to "
                f"{max(spent['delta']['values']):.2g}, noise multiplier {cell(spent['noise_multiplier'])} "
                f"({spent['accountant']} accountant)."
            )
        lines.append("")
    return "\n".join(lines)
