"""README smoke test: every command in README's bash blocks, run in order as a user would, on a small subset.

The commands run in a scratch checkout (the repo's .venv, jobs/ and poc_workspace/ linked in, ../shared beside it)
with its own HOME and POC workspace, so their outputs land under its runs/. Each README command gets only the
changes a small subset needs (fewer compounds, chains, rounds and steps; a free port; a one-round job copy where
the command runs the job's full rounds): a README command without a rule here fails the test.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import time

import pytest

from pharmafl.binding_sites.report import ESM_METRICS
from pharmafl.core.paths import repo_root
from pharmafl.jobs.export import JobOptions, export_run_job

pytestmark = pytest.mark.slow
README = repo_root() / "README.md"
SMALL_CHEM = "--max-compounds 1500"
SMOKE_JOBS = "runs/smoke_jobs"  # one-round copies of the jobs README runs with the plain FLARE CLI
ONE_ROUND_JOB = f"{SMOKE_JOBS}/multitask_fedavg"
ESM_SMALL = "--rounds 2 --set local_steps=2 --set max_length=128 --set batch_size=4"  # 2 rounds: a mid-run curve point


def free_port() -> int:
    """An FL port whose admin port (+1) is free too."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def readme_commands() -> list[str]:
    """The commands of README's bash blocks, continuation lines joined, comments and the two scripts left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith(("scripts/demo.sh", "scripts/test.sh")):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


# (README command pattern, the small-subset version: "{}" is the command with its [optional] parts removed)
RULES = [
    (r"^\.venv/bin/pharmafl jobs check$", "{}"),
    (r"^\.venv/bin/pharmafl prepare chem .*--partners 5", "{} " + SMALL_CHEM),
    (r"^\.venv/bin/pharmafl prepare chem ", "{} " + SMALL_CHEM),
    (r"^\.venv/bin/pharmafl simulate jobs/multitask_fedavg ", "{} --rounds 1"),
    (r"^mkdir -p runs/flare_ws/local", "{}"),
    (r"^PHARMAFL_DATA=.*nvflare simulator jobs/multitask_fedavg ", None),  # the one-round copy, below
    (r"^\.venv/bin/pharmafl baseline chem ", "{} --rounds 1"),
    (r"^\.venv/bin/pharmafl report ", "{}"),
    (r"^\.venv/bin/pharmafl experiment chem ", "{} --seeds 1 --rounds 1"),
    (
        r"^\.venv/bin/pharmafl predict ",
        "printf 'smiles\\nCCO\\nc1ccccc1O\\nnot a molecule\\n' > runs/new_compounds.csv && {}",
    ),
    (r"^\.venv/bin/pharmafl bench trunk ", "{} --data runs/data/chem --rounds 1 --workdir runs/bench"),
    (r"^\.venv/bin/pharmafl prepare binding-sites ", "{} --max-chains-per-input 30 --max-length 128"),
    (r"^M=\$\(", "{}"),
    (r"^\.venv/bin/pharmafl simulate jobs/esm2_lora_fra ", "{} " + ESM_SMALL),
    (r"^\.venv/bin/pharmafl baseline esm ", "{} " + ESM_SMALL),
    (r"^\.venv/bin/pharmafl prepare eicu ", "{}"),
    (r"^\.venv/bin/python -m pharmafl\.clinical\.mortality ", "{} --rounds 1"),
    (r"^\.venv/bin/pharmafl simulate eicu_statistics ", "{}"),
    (r"^for ws in runs/flare_eicu", "{}"),
    (r"^PHARMAFL_DATA=.*nvflare simulator jobs/eicu_statistics ", "{}"),  # one pass: no rounds to cut
    (r"^PHARMAFL_DATA=.*nvflare simulator jobs/eicu_fedavg ", None),  # the one-round copy, below
    (r"^\.venv/bin/pharmafl simulate eicu_fedavg ", "{} --rounds 1"),
    (r"^\.venv/bin/pharmafl baseline eicu ", "{} --rounds 1"),
    (r"^\.venv/bin/pharmafl experiment eicu ", "{} --seeds 1 --rounds 1"),
    (r"^\.venv/bin/pharmafl simulate jobs/multitask_secure .*--drop", "{}"),
    (r"^\.venv/bin/pharmafl simulate jobs/multitask_secure ", "{} --rounds 1"),
    (r"^\.venv/bin/pharmafl ledger verify ", "{}"),
    (r"^\.venv/bin/pharmafl privacy epsilon ", "{}"),
    (r"^\.venv/bin/pharmafl poc up ", "{} --port {port}"),
    (r"^\.venv/bin/pharmafl submit jobs/multitask_fedavg ", None),  # the approved one-round copy, below
    (r"^\.venv/bin/pharmafl poc (status|down)$", "{}"),
    (r"^\.venv/bin/pharmafl provision ", "{}"),
    (r"^\.venv/bin/pharmafl approve JOB$", None),
]


# README sections that need nothing from the chem walk-through: each runs beside it as one chain, in README order
SIDE_CHAINS = {
    "clinical": r"eicu",
    "esm_and_consortium": r"binding-sites|esm2_lora|baseline esm|runs/esm\b|^M="
    r"|--sites pharma-|pharmafl (poc|approve|submit|provision) ",
}


def small(command: str, port: int) -> str:
    plain = re.sub(r"\s*\[[^\]]*\]", "", command)  # README's [OPTIONAL] parts
    for pattern, template in RULES:
        if re.search(pattern, command):
            if template is not None:
                return template.format(plain, port=port)
            if "nvflare simulator" in plain:  # the job's one-round copy
                return re.sub(r"jobs/(\w+)", lambda m: f"{SMOKE_JOBS}/{m[1]}", plain, count=1)
            if plain.startswith(".venv/bin/pharmafl submit"):
                return plain.replace("jobs/multitask_fedavg", ONE_ROUND_JOB) + " --timeout 900"
            # approve JOB: the one-round copy, added at every POC site (before the submit above needs it)
            return f".venv/bin/pharmafl approve {ONE_ROUND_JOB} --add {shlex.quote('$KITS')}"
    raise AssertionError(f"README command without a smoke-test rule (add one to RULES): {command}")


def _timed(commands: list[str]) -> list[str]:
    lines = []
    for command in commands:
        lines += [f"echo {shlex.quote('+ ' + command)} >&2", "SECONDS=0", command, 'echo "  ($SECONDS s)" >&2']
    return lines


def test_every_readme_command_runs_on_a_small_subset(tmp_path):
    root = tmp_path / "checkout"
    root.mkdir()
    for name in (".venv", "jobs", "poc_workspace"):
        (root / name).symlink_to(repo_root() / name)
    (tmp_path / "shared").symlink_to(repo_root().parent / "shared")
    for job in ("multitask_fedavg", "eicu_fedavg"):
        export_run_job(job, root / SMOKE_JOBS, JobOptions(num_rounds=1))
    port = free_port()
    commands = [small(command, port) for command in readme_commands()]
    # approve (last in README) must come before the submit that needs it, once the POC kits exist
    approve = next(c for c in commands if " approve " in c)
    commands.remove(approve)
    kits = "$(ls -d $NVFLARE_POC_WORKSPACE/*/prod_00/pharma-*/local/approved_jobs.json)"
    approve = approve.replace(shlex.quote("$KITS"), kits)
    commands.insert(next(i for i, c in enumerate(commands) if " submit " in c), approve)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "NVFLARE_POC_WORKSPACE": str(tmp_path / "poc")}
    lines = [
        "set -euo pipefail",
        "trap 'kill $(jobs -p) 2>/dev/null || true; .venv/bin/pharmafl poc down >/dev/null 2>&1 || true' EXIT",
    ]
    # README sections that share nothing with the chem walk-through run beside it, each in order with its own log:
    # much of a simulator or POC run waits on FLARE's start-up and polling.
    side = {name: [c for c in commands if re.search(pattern, c)] for name, pattern in SIDE_CHAINS.items()}
    for name, chain in side.items():
        lines += ["(", "set -euo pipefail", *_timed(chain), f") > runs/{name}.log 2>&1 &", f"{name}=$!"]
    lines += _timed([c for c in commands if not any(c in chain for chain in side.values())])
    lines.append("status=0")
    for name in side:
        lines += [f"wait ${name} || status=$?", f"cat runs/{name}.log >&2"]
    lines.append("exit $status")
    script = "\n".join(lines) + "\n"
    (tmp_path / "readme.sh").write_text(script)
    started = time.perf_counter()
    done = subprocess.run(["bash", str(tmp_path / "readme.sh")], cwd=root, env=env, capture_output=True, text=True)
    timings = [line for line in done.stderr.splitlines() if line.startswith(("+ ", "  ("))]
    print(f"{len(commands)} README commands in {time.perf_counter() - started:.0f} s\n" + "\n".join(timings))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = root / "runs"
    for output in (
        "ws/report/report.md",
        "esm/report/summary.json",
        "secure/server/simulate_job/ledger.jsonl",
        "drops/server/simulate_job/ledger.jsonl",
        "flare_ws/server/simulate_job/cross_site_val/cross_val_results.json",
        "submissions.jsonl",
        "experiment/summary.json",
        "preds.csv",
        "eicu_stats/report/feature_distributions.png",
        "flare_eicu_stats/server/simulate_job/statistics/eicu_statistics.json",
        "flare_eicu/server/simulate_job/cross_site_val/cross_val_results.json",
        "eicu/report/roc.png",
        "eicu_exp/seed-0/statistics/report/feature_distributions.png",
    ):
        assert (runs / output).exists(), output
    # experiment eicu: FLARE's statistics, the federated run and both baselines for the seed, at every region
    eicu = json.loads((runs / "eicu_exp" / "summary.json").read_text())
    assert sorted(eicu["sites"]) == ["midwest", "northeast", "south", "west"]
    for entry in eicu["sites"].values():
        assert {"federated", "local", "centralized", "apache"} <= set(entry)
        assert entry["federated"]["auroc"]["n"] == 1
    assert {"federated", "local", "centralized", "apache"} <= set(eicu["pooled"])  # all test stays pooled
    # report esm: the federation (2 clients, 2 rounds of 2 steps) beside centralized training for the same steps,
    # every model scored on each client's test chains, and per-round curves (round 0 untrained, round 1, and the
    # final model after round 2)
    esm = json.loads((runs / "esm" / "report" / "summary.json").read_text())
    assert esm["kind"] == "esm_lora" and esm["baselines"]["centralized"]["steps"] == 2 * 2 * 2
    assert set(esm["sites"]) == {"site-1", "site-2"}
    for entry in esm["sites"].values():
        for model in ("federated", "centralized", "federated_common", "centralized_common"):
            assert set(entry[model]) == set(ESM_METRICS)
        assert entry["f1_minus_centralized"] == entry["federated"]["f1"] - entry["centralized"]["f1"]
        assert [len(entry["curves"][m]["f1"]) for m in ("federated", "centralized")] == [3, 3]
        assert entry["curves"]["federated"]["f1"][-1] == pytest.approx(entry["federated"]["f1"])
    assert (runs / "esm/report/metrics_per_round.png").stat().st_size > 0
    assert any(runs.glob("provision/*/prod_*/pharma-a/startup"))
    assert sorted(p.name for p in root.iterdir()) == [".venv", "jobs", "poc_workspace", "runs"]  # all under runs/
