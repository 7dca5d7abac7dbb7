import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import AdminCommandNames, FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import USER_SETTABLE_JOB_META_KEYS, JobMetaKey
from nvflare.apis.workspace import Workspace
from nvflare.fuel.utils.zip_utils import zip_directory_to_bytes
from nvflare.private.fed.server.job_meta_validator import JobMetaValidator

from pharmafl.consortium.approval import FLARE_META_KEYS, add_entries, app_hash, job_entries
from pharmafl.core.paths import repo_root
from pharmafl.flare.job_approval import JobApprovalGuard

JOB = repo_root() / "jobs" / "multitask_fedavg"


def _app_bytes(app_dir) -> bytes:
    """The app as the server sends it to a site: a zip of the app folder's content."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(app_dir.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(app_dir).as_posix())
    return buffer.getvalue()


def _server_meta(job_dir, **changes) -> dict:
    """The job's meta as FLARE 2.9's server sends it to a site: validated, then stamped at submission and scheduling."""
    valid, error, meta = JobMetaValidator().validate(
        job_dir.name, zip_directory_to_bytes(str(job_dir.parent), job_dir.name)
    )
    assert valid, error
    meta.update(changes)
    meta.update(
        {
            "job_id": "0b5f2c4e-1d2a-4c3b-9e8f-7a6b5c4d3e2f",
            "submitter_name": "lead@pharma-a.com",
            "submitter_org": "pharma-a",
            "submitter_role": "lead",
            "job_folder_name": job_dir.name,
            "study": "default",
            "submit_time": 1767225600.0,
            "submit_time_iso": "2026-01-01T00:00:00+00:00",
            "start_time": "",
            "duration": "N/A",
            "data_storage_format": 2,
            "status": "SUBMITTED",
            "schedule_count": 1,
            "last_schedule_time": 1767225601.0,
            "schedule_history": ["2026-01-01 00:00:01: scheduled"],
            "job_deploy_detail": ["pharma-b: OK"],
        }
    )
    meta[JobMetaKey.JOB_CLIENTS] = [{"name": "pharma-a"}]  # job_runner keys this one by the enum
    return meta


@pytest.fixture
def workspace(tmp_path):
    for folder in ("startup", "local"):
        (tmp_path / folder).mkdir()
    return Workspace(root_dir=str(tmp_path), site_name="pharma-c")


def _ctx(workspace, command, name):
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "pharma-c", private=True, sticky=True)
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, workspace, private=True, sticky=True)
    ctx.set_prop(FLContextKey.COMMAND_NAME, command, sticky=False)
    ctx.set_prop(FLContextKey.SECURITY_ITEMS, {FLContextKey.JOB_META: {"name": name}}, private=True, sticky=False)
    return ctx


def test_deploy_refuses_an_unapproved_app_and_names_its_hash(workspace):
    (entry,) = job_entries(JOB)
    meta = {"name": "multitask_fedavg"}
    error = JobApprovalGuard().deploy(workspace, "job-1", meta, "app", _app_bytes(JOB / "app"), FLContext())
    assert "pharma-c refuses job 'multitask_fedavg'" in error and entry["sha256"] in error
    assert not os.path.exists(workspace.get_run_dir("job-1"))


def test_deploy_installs_an_approved_app(workspace):
    add_entries(f"{workspace.get_site_config_dir()}/approved_jobs.json", job_entries(JOB))
    # the approved app under a laxer scope than the one approved is refused ...
    laxer = _server_meta(JOB, scope="standard")
    error = JobApprovalGuard().deploy(workspace, "job-0", laxer, "app", _app_bytes(JOB / "app"), FLContext())
    assert "scope standard" in error
    # ... and deployed under the approved one, whatever FLARE added to the meta on its way
    error = JobApprovalGuard().deploy(
        workspace, "job-1", _server_meta(JOB), "app", _app_bytes(JOB / "app"), FLContext()
    )
    assert not error
    deployed = json.loads(open(f"{workspace.get_app_dir('job-1')}/config/config_fed_client.json").read())
    assert deployed["executors"][0]["executor"]["args"]["training"] == {"dropout": 0.5}
    # the entry the guard matched stays in the run folder, for the secure sum's ledger
    recorded = json.loads(open(f"{workspace.get_run_dir('job-1')}/approved_app.json").read())
    assert recorded == job_entries(JOB)[0]


@pytest.mark.parametrize(
    "change",
    [
        {"deploy_map": {"app": ["server", "pharma-a", "pharma-c"]}},  # the app sent to fewer sites
        {"resource_spec": {"pharma-c": {"num_of_gpus": 8}}},
        {"min_clients": 1},
        {"custom_props": {"data": "/elsewhere"}},
        {"an_unknown_key": "x"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_deploy_refuses_an_approved_app_under_another_meta(workspace, change):
    add_entries(f"{workspace.get_site_config_dir()}/approved_jobs.json", job_entries(JOB))
    meta = _server_meta(JOB, **change)
    error = JobApprovalGuard().deploy(workspace, "job-1", meta, "app", _app_bytes(JOB / "app"), FLContext())
    assert "pharma-c refuses job 'multitask_fedavg'" in error and "meta.json sha256" in error
    assert not os.path.exists(workspace.get_run_dir("job-1"))


def test_deploy_refuses_bytecode_even_when_its_hash_is_listed(workspace, tmp_path):
    app = shutil.copytree(JOB / "app", tmp_path / "app")
    (app / "custom" / "__pycache__").mkdir(parents=True)
    (app / "custom" / "__pycache__" / "trainer.cpython-311.pyc").write_bytes(b"\xa7\r\r\n")
    (entry,) = job_entries(JOB)
    add_entries(f"{workspace.get_site_config_dir()}/approved_jobs.json", [{**entry, "sha256": app_hash(app)}])
    error = JobApprovalGuard().deploy(workspace, "job-1", _server_meta(JOB), "app", _app_bytes(app), FLContext())
    assert "compiled bytecode 'custom/__pycache__/trainer.cpython-311.pyc'" in error
    assert not os.path.exists(workspace.get_run_dir("job-1"))


def test_deploy_refuses_under_an_entry_without_scope(workspace):
    (entry,) = job_entries(JOB)
    unscoped = {k: v for k, v in entry.items() if k != "scope"}
    with open(f"{workspace.get_site_config_dir()}/approved_jobs.json", "w") as f:
        json.dump({"approved_jobs": [unscoped]}, f)
    error = JobApprovalGuard().deploy(
        workspace, "job-1", _server_meta(JOB), "app", _app_bytes(JOB / "app"), FLContext()
    )
    assert "pharma-c refuses job 'multitask_fedavg'" in error
    assert not os.path.exists(workspace.get_run_dir("job-1"))


def test_flare_meta_keys_are_flare_s_own():
    authored = {key.value for key in USER_SETTABLE_JOB_META_KEYS} | {
        JobMetaKey.JOB_NAME.value,
        JobMetaKey.DEPLOY_MAP.value,
        JobMetaKey.MIN_CLIENTS.value,
        JobMetaKey.MANDATORY_CLIENTS.value,
        JobMetaKey.EDGE_METHOD.value,
        JobMetaKey.STATS_POOL_CONFIG.value,
    }
    assert not authored & FLARE_META_KEYS
    assert FLARE_META_KEYS <= {key.value for key in JobMetaKey} | {"byoc", "flower_predeployed", "submit_token"}


def test_same_name_with_another_config_is_refused(workspace, tmp_path):
    add_entries(f"{workspace.get_site_config_dir()}/approved_jobs.json", job_entries(JOB))
    changed = tmp_path / "changed_app"
    shutil.copytree(JOB / "app", changed)
    client = changed / "config" / "config_fed_client.json"
    config = client.read_text()
    assert '"dropout": 0.5' in config
    client.write_text(config.replace('"dropout": 0.5', '"dropout": 0.4'))
    error = JobApprovalGuard().deploy(workspace, "job-2", _server_meta(JOB), "app", _app_bytes(changed), FLContext())
    assert "refuses" in error


@pytest.mark.parametrize(
    ("command", "name", "vetoed"),
    [
        (AdminCommandNames.SUBMIT_JOB, "unknown_job", True),
        (AdminCommandNames.SUBMIT_JOB, "multitask_fedavg", False),
        (AdminCommandNames.CHECK_RESOURCES, "unknown_job", False),  # vetoing here would leave the job waiting
    ],
)
def test_authorization_check_vetoes_unlisted_job_names(workspace, command, name, vetoed):
    add_entries(f"{workspace.get_site_config_dir()}/approved_jobs.json", job_entries(JOB))
    ctx = _ctx(workspace, command, name)
    JobApprovalGuard().handle_event(EventType.AUTHORIZE_COMMAND_CHECK, ctx)
    assert ctx.get_prop(FLContextKey.AUTHORIZATION_RESULT, True) is (not vetoed)
    if vetoed:
        assert f"'{name}'" in ctx.get_prop(FLContextKey.AUTHORIZATION_REASON)


def test_byoc_flag_the_server_derives_does_not_change_the_approval(workspace, tmp_path):
    job = shutil.copytree(JOB, tmp_path / JOB.name)
    (job / "app" / "custom").mkdir()
    (job / "app" / "custom" / "helper.py").write_text("VALUE = 1\n")
    add_entries(f"{workspace.get_site_config_dir()}/approved_jobs.json", job_entries(job))
    meta = _server_meta(job)
    assert meta["byoc"] is True  # set by the server's JobMetaValidator, not by the author
    error = JobApprovalGuard().deploy(workspace, "job-1", meta, "app", _app_bytes(job / "app"), FLContext())
    assert not error


def test_the_one_private_flare_class_still_matches_the_public_spec():
    """job_approval.py delegates to FLARE's private AppDeployer: checked against 2.9.0, re-check on upgrade."""
    import inspect

    import nvflare
    from nvflare.apis.app_deployer_spec import AppDeployerSpec
    from nvflare.private.fed.utils.app_deployer import AppDeployer

    assert nvflare.__version__ == "2.9.0", "FLARE changed: re-check AppDeployer in pharmafl/flare/job_approval.py"
    assert issubclass(AppDeployer, AppDeployerSpec)
    assert inspect.signature(AppDeployer.deploy) == inspect.signature(AppDeployerSpec.deploy)
    # the only module of the package that reaches into nvflare.private
    package = Path(inspect.getfile(JobApprovalGuard)).parents[1]
    users = sorted(p.name for p in package.rglob("*.py") if "nvflare.private" in p.read_text())
    assert users == ["job_approval.py"]
