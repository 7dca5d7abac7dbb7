"""Site-side job approval: a site runs only the jobs (name, app files, meta.json) its admins approved."""

from __future__ import annotations

import json
import os
import tempfile

from nvflare.apis.app_deployer_spec import AppDeployerSpec
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import AdminCommandNames, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey
from nvflare.apis.workspace import Workspace
from nvflare.fuel.utils.zip_utils import unzip_all_from_bytes

# FLARE's one private import in pharmafl, checked against nvflare 2.9.0: the public route to replace a site's
# app deployer is an `app_deployer` component implementing AppDeployerSpec, but FLARE ships no public
# deployer to hand the approved app to. tests/flare/test_job_approval.py fails when this class moves or its
# `deploy` stops matching the spec.
from nvflare.private.fed.utils.app_deployer import AppDeployer

from pharmafl.consortium.approval import (
    APPROVED_APP_FILE,
    APPROVED_JOBS_FILE,
    app_hash,
    bytecode_file,
    is_approved,
    is_name_approved,
    load_approved,
    meta_digest,
    refusal_message,
)
from pharmafl.core.errors import InputError


def _site_workspace(fl_ctx: FLContext) -> Workspace:
    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    if isinstance(workspace, Workspace):
        return workspace
    engine = fl_ctx.get_engine()
    return Workspace(root_dir=engine.args.workspace, site_name=fl_ctx.get_identity_name())  # the client parent


class JobApprovalGuard(FLComponent, AppDeployerSpec):
    def __init__(self, approved_jobs_file: str = APPROVED_JOBS_FILE):
        """Veto every job that is not on this site's approved-jobs list.

        Register it in the site's ``local/resources.json`` with the id ``app_deployer``. Two checks:
        at FLARE's authorization check of the deployment (``AUTHORIZE_COMMAND_CHECK`` for
        ``submit_job``) the job's name must be on the list; when the app arrives, the SHA-256 of its
        files, the privacy scope its meta selects and the SHA-256 of that meta (without the keys FLARE
        adds, ``meta_digest``) must match one entry of that name. An app carrying compiled bytecode is
        refused whatever the list says. A refusal names the job and its hashes and ends up in the job's
        deploy detail; the list is re-read at every job, so admins edit it without restart.

        Args:
            approved_jobs_file: the list's file name in the site's ``local/`` folder (or an absolute path).
        """
        super().__init__()
        if not isinstance(approved_jobs_file, str) or not approved_jobs_file:
            raise ValueError("approved_jobs_file must be a non-empty string")
        self.approved_jobs_file = approved_jobs_file

    def _list_path(self, workspace: Workspace) -> str:
        return os.path.join(workspace.get_site_config_dir(), self.approved_jobs_file)

    def _entries(self, workspace: Workspace) -> list[dict] | None:
        try:
            return load_approved(self._list_path(workspace))
        except InputError as err:
            self.logger.error(str(err))
            return None  # an unreadable list approves nothing

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.AUTHORIZE_COMMAND_CHECK:
            return
        if fl_ctx.get_prop(FLContextKey.COMMAND_NAME) != AdminCommandNames.SUBMIT_JOB:
            return
        security_items = fl_ctx.get_prop(FLContextKey.SECURITY_ITEMS, {}) or {}
        meta = security_items.get(FLContextKey.JOB_META) or {}
        name = meta.get(JobMetaKey.JOB_NAME.value, "")
        entries = self._entries(_site_workspace(fl_ctx))
        if entries is None or not is_name_approved(entries, name):
            reason = refusal_message(fl_ctx.get_identity_name(), name, None)
            self.log_error(fl_ctx, reason)
            fl_ctx.set_prop(FLContextKey.AUTHORIZATION_RESULT, False, sticky=False)
            fl_ctx.set_prop(FLContextKey.AUTHORIZATION_REASON, reason, sticky=False)

    def deploy(
        self, workspace: Workspace, job_id: str, job_meta: dict, app_name: str, app_data: bytes, fl_ctx: FLContext
    ) -> str:
        site = workspace.site_name
        name = job_meta.get(JobMetaKey.JOB_NAME.value, "")
        with tempfile.TemporaryDirectory() as staging:
            unzip_all_from_bytes(app_data, staging)
            compiled = bytecode_file(staging)
            sha256 = app_hash(staging)
        if compiled:
            reason = (
                f"site {site} refuses job '{name}': its app carries compiled bytecode '{compiled}', "
                "which a site admin cannot review"
            )
            self.log_error(fl_ctx, reason)
            return reason
        try:
            meta_sha256 = meta_digest(job_meta)
        except (TypeError, ValueError) as err:
            reason = f"site {site} refuses job '{name}': its meta holds a value that is not JSON ({err})"
            self.log_error(fl_ctx, reason)
            return reason
        candidate = {
            "name": name,
            "sha256": sha256,
            "scope": job_meta.get(JobMetaKey.SCOPE.value),
            "meta_sha256": meta_sha256,
        }
        entries = self._entries(workspace)
        if entries is None or not is_approved(entries, candidate):
            reason = refusal_message(site, name, sha256, candidate["scope"], meta_sha256)
            self.log_error(fl_ctx, reason)
            return reason
        self.log_info(
            fl_ctx,
            f"job '{name}' (sha256 {sha256}, meta.json sha256 {meta_sha256}) is approved at {site}; deploying {job_id}",
        )
        failure = AppDeployer().deploy(workspace, job_id, job_meta, app_name, app_data, fl_ctx)
        if not failure:  # what this site approved, for the job's own components (the secure sum's ledger)
            with open(os.path.join(workspace.get_run_dir(job_id), APPROVED_APP_FILE), "w") as f:
                json.dump(candidate, f)
        return failure
