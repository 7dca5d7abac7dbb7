"""End to end in FLARE POC mode: 3 sites on loopback with the consortium's policies, jobs submitted through the API."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pharmafl.cli import main
from pharmafl.consortium.approval import add_entries, job_entries
from pharmafl.consortium.poc import flare_processes, poc_down, poc_status, poc_up, poc_workspace
from pharmafl.consortium.submit import submit_job
from pharmafl.core.errors import UserError
from pharmafl.core.paths import repo_root
from pharmafl.flare.fedavg_aggregator import CONTRIBUTIONS_LOG
from pharmafl.jobs import CLIENT_CONFIG, read_json
from pharmafl.jobs.export import JobOptions, export_run_job
from pharmafl.secure_sum.ledger import LEDGER_FILE, read_ledger, verify_run
from pharmafl.testing.secure_sum import MEANS_DIR, RECORD_DIR, FaultySecureSumSite, RecordingSecureSumWorkflow

from .conftest import SITES, free_port_pair

pytestmark = pytest.mark.slow
JOB = repo_root() / "jobs" / "multitask_fedavg"


def _rename(job: Path, name: str) -> Path:
    meta = read_json(job / "meta.json")
    meta["name"] = name
    (job / "meta.json").write_text(json.dumps(meta, indent=2))
    return job


def _approve(job: Path, kits: Path, sites: list[str]) -> None:
    for site in sites:
        add_entries(kits / site / "local" / "approved_jobs.json", job_entries(job))


def checkout_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=repo_root(), capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def checkout_before():
    """`git status --porcelain` of the checkout before the POC: up, submit and down must leave it as it was."""
    return checkout_status()


@pytest.fixture(scope="module")
def consortium(tmp_path_factory, chembl_consortium, checkout_before):
    """A running POC (isolated HOME and workspace, free ports), taken down whatever happens."""
    root = tmp_path_factory.mktemp("poc")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(root / "home"))
        patch.setenv("NVFLARE_POC_WORKSPACE", str(root / "poc"))
        try:
            info = poc_up(data_dir=chembl_consortium, port=free_port_pair())
            yield {**info, "root": root, "kits": Path(info["admin_kits"]["lead@pharma-a.com"]).parent}
        finally:
            poc_down(quiet=True)


@pytest.fixture(scope="module")
def one_round_job(consortium, tmp_path_factory):
    """multitask_fedavg with 1 round, approved at every site (a changed config is a new job to approve)."""
    job = export_run_job(JOB, tmp_path_factory.mktemp("jobs"), JobOptions(num_rounds=1, sites=3))
    _approve(job, consortium["kits"], SITES)
    return job


def test_poc_is_up_with_policies(consortium):
    assert consortium["sites"] == SITES
    status = poc_status()
    assert set(status["running"]) == {"server", *SITES}
    assert status["connected"] == SITES
    for site in SITES:
        local = consortium["kits"] / site / "local"
        assert {"privacy.json", "authorization.json", "approved_jobs.json"} <= {p.name for p in local.iterdir()}
        resources = json.loads((local / "resources.json").read_text())
        assert "pharmafl." in resources["class_allow_list"]
        assert any(c["id"] == "app_deployer" for c in resources["components"])
        assert (Path(consortium["workspace"]) / "data" / site / "manifest.json").is_file()


def test_lead_job_completes_downloads_and_reports(consortium, one_round_job, tmp_path):
    record = tmp_path / "submissions.jsonl"
    out = tmp_path / "results"
    argv = ["submit", str(one_round_job), "--wait", "--out", str(out), "--record", str(record), "--timeout", "600"]
    before = sorted(str(p.relative_to(one_round_job)) for p in one_round_job.rglob("*"))
    assert main(argv) == 0
    # FLARE's API signs what it submits in place: submit signs a copy, the user's job folder stays as it was
    assert sorted(str(p.relative_to(one_round_job)) for p in one_round_job.rglob("*")) == before
    (result_dir,) = list(out.iterdir())
    summary = json.loads((result_dir / "report" / "summary.json").read_text())
    assert set(summary["sites"]) == set(SITES)
    assert all(0.0 < summary["sites"][s]["federated"]["auc_pr"] <= 1.0 for s in SITES)
    (entry,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert entry["flare_user"] == "lead@pharma-a.com"
    assert entry["sha256"] == [e["sha256"] for e in job_entries(one_round_job)]
    assert entry["status"] == "FINISHED:COMPLETED" and entry["job_id"] == result_dir.name


def test_org_admin_may_not_submit(consortium, one_round_job, tmp_path, capsys):
    record = tmp_path / "submissions.jsonl"
    argv = ["submit", str(one_round_job), "--user", "orgadmin@pharma-a.com", "--record", str(record)]
    assert main(argv) == 2
    assert "not authorized" in capsys.readouterr().err
    (entry,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert entry["flare_user"] == "orgadmin@pharma-a.com" and entry["status"].startswith("REFUSED")
    assert entry["job_id"] is None


def test_a_site_refuses_a_job_it_did_not_approve(consortium, one_round_job, tmp_path):
    # The same job with another learning rate: approved at pharma-a and pharma-b, not at pharma-c.
    variant = export_run_job(JOB, tmp_path, JobOptions(1, 3, {"learning_rate": 0.01}))
    _approve(variant, consortium["kits"], ["pharma-a", "pharma-b"])
    (sha256,) = [e["sha256"] for e in job_entries(variant)]
    with pytest.raises(UserError) as refused:
        submit_job(variant, wait=True, record_file=tmp_path / "record.jsonl", timeout_s=300, progress=None)
    message = str(refused.value)
    assert "FAILED_TO_RUN" in message
    assert f"site pharma-c refuses job 'multitask_fedavg' (sha256 {sha256}, scope trunk-only)" in message
    assert "pharma-a refuses" not in message and "pharma-b refuses" not in message


def test_trunk_only_scope_keeps_the_head_at_the_site(consortium, tmp_path):
    # A job that uploads its head and drops its own TrunkOnlyFilter (edited by hand, as a careless or malicious
    # job author could): only the site's scope protects the head.
    job = _rename(export_run_job(JOB, tmp_path, JobOptions(1, 3, {"upload": "all"})), "head_upload")
    client = read_json(job / CLIENT_CONFIG)
    client["task_result_filters"] = []
    (job / CLIENT_CONFIG).write_text(json.dumps(client, indent=2))
    assert read_json(job / "meta.json")["scope"] == "trunk-only"
    _approve(job, consortium["kits"], SITES)
    result = submit_job(
        job, wait=True, out_dir=tmp_path / "out", record_file=tmp_path / "r.jsonl", timeout_s=600, progress=None
    )
    assert result["status"] == "FINISHED:COMPLETED"
    (log,) = list(Path(result["result_dir"]).rglob(CONTRIBUTIONS_LOG))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["site"] for r in records) == SITES and all(r["accepted"] for r in records)
    assert all(key.startswith("trunk.") for r in records for key in r["keys"])
    # The executor did produce a head: the site's scope filter is what removed it.
    for site in SITES:
        site_log = (consortium["kits"] / site / result["job_id"] / "log.txt").read_text()
        assert "TrunkOnlyFilter removed 2 non-trunk entries" in site_log


def _names(pid: int, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_secure_sum_signed_survives_a_vanished_site_and_the_ledger_verifies(consortium, tmp_path):
    # multitask_secure, 2 rounds, signatures required: every site signs its key advertisement with its startup-kit
    # key and checks every peer against the consortium root CA and the roster and certificate pins poc up installed.
    # pharma-c vanishes right after its round-0 upload: all its processes get SIGKILL (a host lost). FLARE does not
    # abort the job (its min_clients is the threshold, 2); round 0 unmasks with the other two, round 1 runs without it.
    timeouts = {"wait_time_after_min_received": 5, "task_timeout": 120, "train_timeout": 300, "validation_timeout": 60}
    options = JobOptions(
        num_rounds=2,
        sites=3,
        settings={"trunk.hidden_sizes": [32]},
        site_component=FaultySecureSumSite(record_updates=True),
        workflow_class=RecordingSecureSumWorkflow,
        server_args={"require_signed": True, **timeouts},
    )
    job = export_run_job("multitask_secure", tmp_path, options)
    assert read_json(job / "meta.json")["min_clients"] == 2
    kits = consortium["kits"]
    _approve(job, kits, SITES)
    job_id = submit_job(job, record_file=tmp_path / "r.jsonl", progress=None)["job_id"]
    server_dir = kits / "server" / job_id
    _wait_for(
        lambda: any(r["site"] == "pharma-c" and r["accepted"] for r in _records(server_dir / CONTRIBUTIONS_LOG)),
        300,
        "pharma-c's round-0 upload",
    )
    victims = [pid for pid in flare_processes(poc_workspace()) if _names(pid, "/pharma-c")]
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    # the server's run ends when the final validation has heard from the live sites (FLARE then waits up to its
    # client_outcome_wait_timeout, 900 s, for pharma-c's outcome before it marks the job finished)
    _wait_for(lambda: (server_dir / "cross_site_val" / "cross_val_results.json").is_file(), 600, "the end of the run")
    logs = (server_dir / "log.txt").read_text()
    assert "3 sites advertised keys, signed by startup kits" in logs
    setup, first, second = read_ledger(server_dir / LEDGER_FILE)
    assert setup["config"]["threshold"] == 2 and setup["config"]["require_signed"] is True
    assert all(advert["kit_signature"] for advert in setup["advertisements"])
    assert first["status"] == second["status"] == "ok"
    assert sorted(first["accepted"]) == SITES  # pharma-c's upload is in round 0's sum ...
    assert set(first["revealed_by"]) >= {"pharma-a", "pharma-b"}
    assert sorted(second["accepted"]) == ["pharma-a", "pharma-b"] and second["dropped"] == ["pharma-c"]  # ... not 1's
    assert second["time"] - first["time"] < 300  # round 1 cost at most its timeout
    for record in (first, second):  # each round's mean is the exact weighted mean of the uploads in its sum
        sites = sorted(record["accepted"])
        uploads = [np.load(kits / site / job_id / RECORD_DIR / f"round_{record['round']}.npz") for site in sites]
        weights = [float(u["__weight__"]) for u in uploads]
        mean = np.load(server_dir / MEANS_DIR / f"round_{record['round']}.npz")
        assert record["total_weight"] == pytest.approx(sum(weights), abs=1e-3)
        for name in mean.files:
            exact = sum(w * u[name].astype(np.float64) for w, u in zip(weights, uploads, strict=True)) / sum(weights)
            np.testing.assert_allclose(mean[name], exact, atol=1e-5)
    root_ca = (kits / "server" / "startup" / "rootCA.pem").read_bytes()
    lines = verify_run(server_dir, [kits / site / job_id for site in SITES], root_ca)
    assert len(lines) == 4 and all(line.startswith("OK") for line in lines), lines


def test_up_after_a_killed_run_and_down_twice(consortium, chembl_consortium):
    import os
    import signal

    workspace = poc_workspace()
    for pid in flare_processes(workspace):  # a crash: every FLARE process killed, pid files left behind
        os.kill(pid, signal.SIGKILL)
    argv = ["poc", "up", "--data", str(chembl_consortium), "--port", str(free_port_pair())]
    assert main(argv) == 0
    status = poc_status()
    assert set(status["running"]) == {"server", *SITES} and status["connected"] == SITES
    assert main(["poc", "down"]) == 0
    assert flare_processes(workspace) == [] and not workspace.exists()
    assert main(["poc", "down"]) == 0
    assert main(["poc", "status"]) == 1


def test_up_submit_down_leave_the_checkout_as_it_was(consortium, checkout_before):
    # runs last in this module (after every submission and the downs above): nothing written into the checkout
    assert checkout_status() == checkout_before
