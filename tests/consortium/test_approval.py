import json
import shutil

import pytest

from pharmafl.cli import main
from pharmafl.consortium.approval import (
    add_entries,
    app_hash,
    is_approved,
    is_name_approved,
    job_entries,
    load_approved,
    refusal_message,
)
from pharmafl.consortium.policies import site_policy_dir
from pharmafl.errors import UserError
from pharmafl.jobs import CLIENT_CONFIG, repo_root

JOB = repo_root() / "jobs" / "multitask_fedavg"


def test_hash_ignores_flare_signature_files_but_not_config_changes(tmp_path):
    job = shutil.copytree(JOB, tmp_path / JOB.name)
    before = app_hash(job / "app")
    assert before == app_hash(JOB / "app")
    (job / "app" / ".__nvfl_sig.json").write_text("{}")  # added by FLARE when the admin signs the upload
    (job / "app" / "config" / ".__nvfl_submitter.crt").write_text("cert")
    assert app_hash(job / "app") == before
    client = job / CLIENT_CONFIG
    client.write_text(client.read_text().replace('"upload": "trunk"', '"upload": "all"'))
    assert app_hash(job / "app") != before


def test_hash_covers_added_files_and_paths(tmp_path):
    job = shutil.copytree(JOB, tmp_path / JOB.name)
    before = app_hash(job / "app")
    (job / "app" / "custom").mkdir()
    (job / "app" / "custom" / "extra.py").write_text("print('hi')\n")
    assert app_hash(job / "app") != before


def test_entries_name_the_job_and_one_hash_per_app():
    (entry,) = job_entries(JOB)
    assert entry == {"name": "multitask_fedavg", "sha256": app_hash(JOB / "app"), "scope": "trunk-only"}


def test_committed_site_list_approves_the_current_multitask_job():
    # When this fails, the job changed: every site must approve the new version (pharmafl approve JOB).
    entries = load_approved(site_policy_dir() / "approved_jobs.json")
    (entry,) = job_entries(JOB)
    assert is_approved(entries, entry["name"], entry["sha256"], entry["scope"])
    # the same app under a laxer privacy scope is another job
    assert not is_approved(entries, entry["name"], entry["sha256"], "standard")
    assert not is_approved(entries, entry["name"], entry["sha256"], None)


def test_add_entries_is_idempotent_and_checks(tmp_path):
    path = tmp_path / "local" / "approved_jobs.json"
    assert load_approved(path) == []
    entries = job_entries(JOB)
    assert add_entries(path, entries) == 1
    assert add_entries(path, entries) == 0
    loaded = load_approved(path)
    assert len(loaded) == 1 and is_name_approved(loaded, "multitask_fedavg")
    assert not is_approved(loaded, "multitask_fedavg", "0" * 64)
    assert not is_name_approved(loaded, "other_job")


@pytest.mark.parametrize("text", ["not json", '{"approved_jobs": [{"name": "x"}]}', '{"approved_jobs": 3}'])
def test_a_malformed_list_is_a_user_error(tmp_path, text):
    path = tmp_path / "approved_jobs.json"
    path.write_text(text)
    with pytest.raises(UserError, match="approved"):
        load_approved(path)


def test_refusal_names_site_job_and_hash():
    message = refusal_message("pharma-c", "multitask_fedavg", "ab" * 32)
    assert "pharma-c" in message and "'multitask_fedavg'" in message and "ab" * 32 in message


def test_approve_command_prints_and_adds_the_entry(tmp_path, capsys):
    lists = [tmp_path / "a" / "approved_jobs.json", tmp_path / "b" / "approved_jobs.json"]
    assert main(["approve", str(JOB), "--add", *map(str, lists)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == job_entries(JOB)[0]
    for path in lists:
        assert load_approved(path) == [printed]


def test_approve_command_refuses_a_non_job(tmp_path, capsys):
    assert main(["approve", str(tmp_path)]) == 2
    assert "not a FLARE job folder" in capsys.readouterr().err
