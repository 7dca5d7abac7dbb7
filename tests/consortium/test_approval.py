import json
import shutil

import pytest

from pharmafl.cli import main
from pharmafl.consortium.approval import (
    FLARE_META_KEYS,
    add_entries,
    app_hash,
    is_approved,
    is_name_approved,
    job_entries,
    load_approved,
    meta_digest,
    refusal_message,
)
from pharmafl.consortium.policies import site_policy_dir
from pharmafl.core.errors import UserError
from pharmafl.core.paths import repo_root
from pharmafl.jobs import CLIENT_CONFIG

JOB = repo_root() / "jobs" / "multitask_fedavg"


def test_hash_ignores_flare_signature_files_but_not_config_changes(tmp_path):
    job = shutil.copytree(JOB, tmp_path / JOB.name)
    before = app_hash(job / "app")
    assert before == app_hash(JOB / "app")
    (job / "app" / ".__nvfl_sig.json").write_text("{}")  # added by FLARE when the admin signs the upload
    (job / "app" / "config" / ".__nvfl_submitter.crt").write_text("cert")
    assert app_hash(job / "app") == before
    client = job / CLIENT_CONFIG
    config = client.read_text()
    assert '"dropout": 0.5' in config
    client.write_text(config.replace('"dropout": 0.5', '"dropout": 0.4'))
    assert app_hash(job / "app") != before


def test_hash_covers_added_files_and_paths(tmp_path):
    job = shutil.copytree(JOB, tmp_path / JOB.name)
    before = app_hash(job / "app")
    (job / "app" / "custom").mkdir()
    (job / "app" / "custom" / "extra.py").write_text("print('hi')\n")
    assert app_hash(job / "app") != before


@pytest.mark.parametrize(
    "extra",
    [
        ".hidden.py",  # a hidden file
        "config/.__nvfl_sig.json.bak",  # only FLARE's two exact names are left out
        "custom/__pycache__/extra.cpython-311.pyc",  # bytecode that would run in place of the reviewed source
    ],
)
def test_hash_covers_hidden_files_and_pycache(tmp_path, extra):
    app = shutil.copytree(JOB / "app", tmp_path / "app")
    before = app_hash(app)
    (app / extra).parent.mkdir(parents=True, exist_ok=True)
    (app / extra).write_bytes(b"\x00payload")
    assert app_hash(app) != before


def test_approve_refuses_an_app_with_bytecode(tmp_path):
    job = shutil.copytree(JOB, tmp_path / JOB.name)
    (job / "app" / "custom" / "__pycache__").mkdir(parents=True)
    (job / "app" / "custom" / "__pycache__" / "extra.cpython-311.pyc").write_bytes(b"\x00")
    with pytest.raises(UserError, match=r"compiled bytecode 'custom/__pycache__/extra.cpython-311.pyc'"):
        job_entries(job)


def test_entries_name_the_job_and_bind_app_and_meta():
    (entry,) = job_entries(JOB)
    meta = json.loads((JOB / "meta.json").read_text())
    assert entry == {
        "name": "multitask_fedavg",
        "sha256": app_hash(JOB / "app"),
        "scope": "trunk-only",
        "meta_sha256": meta_digest(meta),
    }


@pytest.mark.parametrize(
    "change",
    [
        {"deploy_map": {"app": ["server", "pharma-a"]}},
        {"resource_spec": {"pharma-a": {"num_of_gpus": 1}}},
        {"min_clients": 1},
        {"mandatory_clients": ["pharma-a"]},
        {"scope": "standard"},
        {"custom_props": {"x": 1}},
        {"launcher_spec": {"pharma-a": {"docker": {"image": "x"}}}},
        {"some_future_key": True},  # unknown keys are the author's: fail closed
    ],
    ids=lambda change: next(iter(change)),
)
def test_meta_digest_covers_every_key_the_author_sets(change):
    meta = json.loads((JOB / "meta.json").read_text())
    assert meta_digest({**meta, **change}) != meta_digest(meta)


def test_meta_digest_ignores_the_keys_flare_adds_and_key_order():
    meta = json.loads((JOB / "meta.json").read_text())
    runtime = {key: f"set by FLARE: {key}" for key in FLARE_META_KEYS}
    assert meta_digest({**runtime, **dict(reversed(list(meta.items())))}) == meta_digest(meta)


def test_committed_site_list_approves_the_current_multitask_job():
    # When this fails, the job changed: every site must approve the new version (pharmafl approve JOB).
    entries = load_approved(site_policy_dir() / "approved_jobs.json")
    (entry,) = job_entries(JOB)
    assert is_approved(entries, entry)
    # the same app under a laxer privacy scope, or with any other meta.json, is another job
    assert not is_approved(entries, {**entry, "scope": "standard"})
    assert not is_approved(entries, {**entry, "scope": None})
    assert not is_approved(entries, {**entry, "meta_sha256": "0" * 64})


def test_add_entries_is_idempotent_and_checks(tmp_path):
    path = tmp_path / "local" / "approved_jobs.json"
    assert load_approved(path) == []
    entries = job_entries(JOB)
    assert add_entries(path, entries) == 1
    assert add_entries(path, entries) == 0
    loaded = load_approved(path)
    assert len(loaded) == 1 and is_name_approved(loaded, "multitask_fedavg")
    assert not is_approved(loaded, {**entries[0], "sha256": "0" * 64})
    assert not is_name_approved(loaded, "other_job")


@pytest.mark.parametrize("text", ["not json", '{"approved_jobs": [{"name": "x"}]}', '{"approved_jobs": 3}'])
def test_a_malformed_list_is_a_user_error(tmp_path, text):
    path = tmp_path / "approved_jobs.json"
    path.write_text(text)
    with pytest.raises(UserError, match="approved"):
        load_approved(path)


@pytest.mark.parametrize("missing", ["scope", "meta_sha256"])
def test_an_entry_without_scope_or_meta_hash_approves_nothing(tmp_path, missing):
    (entry,) = job_entries(JOB)
    path = tmp_path / "approved_jobs.json"
    path.write_text(json.dumps({"approved_jobs": [{k: v for k, v in entry.items() if k != missing}]}))
    with pytest.raises(UserError, match=rf"Entry 0 of .* \(job 'multitask_fedavg'\) has no '{missing}'"):
        load_approved(path)
    assert not is_approved([{k: v for k, v in entry.items() if k != missing}], entry)


def test_a_null_scope_is_the_default_scope(tmp_path):
    entry = {**job_entries(JOB)[0], "scope": None}
    path = tmp_path / "approved_jobs.json"
    path.write_text(json.dumps({"approved_jobs": [entry]}))
    assert is_approved(load_approved(path), entry)
    assert not is_approved(load_approved(path), {**entry, "scope": "trunk-only"})


def test_refusal_names_site_job_and_hash():
    message = refusal_message("pharma-c", "multitask_fedavg", "ab" * 32, "trunk-only", "cd" * 32)
    assert "pharma-c" in message and "'multitask_fedavg'" in message and "ab" * 32 in message
    assert "scope trunk-only" in message and "meta.json sha256 " + "cd" * 32 in message


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
