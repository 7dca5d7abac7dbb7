import io
import json
import os
import shutil
import zipfile

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import AdminCommandNames, FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace

from pharmafl.consortium.approval import add_entries, job_entries
from pharmafl.flare.job_approval import JobApprovalGuard
from pharmafl.jobs import repo_root

JOB = repo_root() / "jobs" / "multitask_fedavg"


def _app_bytes(app_dir) -> bytes:
    """The app as the server sends it to a site: a zip of the app folder's content."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(app_dir.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(app_dir).as_posix())
    return buffer.getvalue()


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
    laxer = {"name": "multitask_fedavg", "scope": "standard"}
    error = JobApprovalGuard().deploy(workspace, "job-0", laxer, "app", _app_bytes(JOB / "app"), FLContext())
    assert "scope standard" in error
    # ... and deployed under the approved one
    meta = {"name": "multitask_fedavg", "scope": "trunk-only"}
    error = JobApprovalGuard().deploy(workspace, "job-1", meta, "app", _app_bytes(JOB / "app"), FLContext())
    assert not error
    deployed = json.loads(open(f"{workspace.get_app_dir('job-1')}/config/config_fed_client.json").read())
    assert deployed["executors"][0]["executor"]["args"]["upload"] == "trunk"


def test_same_name_with_another_config_is_refused(workspace, tmp_path):
    add_entries(f"{workspace.get_site_config_dir()}/approved_jobs.json", job_entries(JOB))
    changed = tmp_path / "changed_app"
    shutil.copytree(JOB / "app", changed)
    client = changed / "config" / "config_fed_client.json"
    client.write_text(client.read_text().replace('"upload": "trunk"', '"upload": "all"'))
    error = JobApprovalGuard().deploy(
        workspace, "job-2", {"name": "multitask_fedavg"}, "app", _app_bytes(changed), FLContext()
    )
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
