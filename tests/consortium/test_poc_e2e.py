"""End to end in FLARE POC mode: 3 sites on loopback with the consortium's policies, jobs submitted through the API."""

import json
from pathlib import Path

import pytest

from pharmafl.cli import main
from pharmafl.consortium.approval import add_entries, job_entries
from pharmafl.consortium.poc import flare_processes, poc_down, poc_status, poc_up, poc_workspace
from pharmafl.consortium.submit import submit_job
from pharmafl.errors import UserError
from pharmafl.flare.fedavg_aggregator import CONTRIBUTIONS_LOG
from pharmafl.jobs import CLIENT_CONFIG, SERVER_CONFIG, find_component, read_json, repo_root, write_job_copy

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


@pytest.fixture(scope="module")
def consortium(tmp_path_factory, chembl_consortium):
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
    job = write_job_copy(JOB, tmp_path_factory.mktemp("jobs"), num_rounds=1, min_clients=3)
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
    assert main(argv) == 0
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
    variant = write_job_copy(one_round_job, tmp_path, executor_overrides={"learning_rate": 0.01})
    _approve(variant, consortium["kits"], ["pharma-a", "pharma-b"])
    (sha256,) = [e["sha256"] for e in job_entries(variant)]
    with pytest.raises(UserError) as refused:
        submit_job(variant, wait=True, record_file=tmp_path / "record.jsonl", timeout_s=300, progress=None)
    message = str(refused.value)
    assert "FAILED_TO_RUN" in message
    assert f"site pharma-c refuses job 'multitask_fedavg' (sha256 {sha256}, scope trunk-only)" in message
    assert "pharma-a refuses" not in message and "pharma-b refuses" not in message


def test_trunk_only_scope_keeps_the_head_at_the_site(consortium, tmp_path):
    # A job that uploads its head and drops its own TrunkOnlyFilter: only the site's scope protects the head.
    job = _rename(write_job_copy(JOB, tmp_path, 1, 3, {"upload": "all"}), "head_upload")
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


def test_secure_sum_with_advertisements_signed_by_the_startup_kits(consortium, tmp_path):
    # POC sites have startup kits: every site signs its key advertisement with its kit key and the
    # server refuses any advertisement that does not verify against the consortium root CA.
    job = write_job_copy(repo_root() / "jobs" / "multitask_secure", tmp_path, num_rounds=1, min_clients=3)
    server = read_json(job / SERVER_CONFIG)
    find_component(server, "aggregator")["args"]["require_signed"] = True
    (job / SERVER_CONFIG).write_text(json.dumps(server, indent=2))
    _approve(job, consortium["kits"], SITES)
    result = submit_job(
        job, wait=True, out_dir=tmp_path / "out", record_file=tmp_path / "r.jsonl", timeout_s=600, progress=None
    )
    assert result["status"] == "FINISHED:COMPLETED"
    logs = " ".join(path.read_text() for path in Path(result["result_dir"]).rglob("log.txt"))
    assert "3 sites advertised keys, signed by startup kits" in logs
    (record,) = [json.loads(line) for line in next(Path(result["result_dir"]).rglob("secure_sum.jsonl")).open()]
    assert sorted(record["survivors"]) == SITES


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
