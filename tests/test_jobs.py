import json

import pytest

from pharmafl.core.errors import InputError, UserError
from pharmafl.core.paths import repo_root
from pharmafl.jobs import executor_args, job_configs, num_rounds, site_local_dir
from pharmafl.jobs.export import JOBS, JobOptions, differences, export_run_job, job_name

JOB_FOLDERS = sorted(p for p in (repo_root() / "jobs").iterdir() if (p / "meta.json").is_file())


def component_paths(config):
    for section in ("workflows", "components"):
        for component in config.get(section, []):
            yield component["path"]
            model = component.get("args", {}).get("model")
            if isinstance(model, dict) and "path" in model:
                yield model["path"]
    for entry in config.get("executors", []):
        yield entry["executor"]["path"]
    for section in ("task_result_filters", "task_data_filters"):
        for chain in config.get(section, []):
            yield from (f["path"] for f in chain["filters"])


@pytest.mark.parametrize("job", JOB_FOLDERS, ids=lambda p: p.name)
def test_every_component_is_on_the_site_allow_list(job):
    allow_list = json.loads((site_local_dir() / "resources.json").read_text())["class_allow_list"]
    for config in job_configs(job):
        for path in component_paths(config):
            assert any(path == entry or (entry.endswith(".") and path.startswith(entry)) for entry in allow_list), path


def test_every_exported_job_folder_is_what_its_builder_makes():
    assert sorted(p.name for p in JOB_FOLDERS) == sorted(JOBS)  # one builder per folder, one folder per builder
    for folder in JOB_FOLDERS:
        assert differences(folder.name, folder) == [], f"{folder}: run `pharmafl jobs export`"


def test_a_hand_edited_job_folder_is_noticed_and_refused(tmp_path):
    folder = export_run_job("multitask_fedavg", tmp_path)
    client = folder / "app" / "config" / "config_fed_client.json"
    client.write_text(client.read_text().replace('"dropout": 0.5', '"dropout": 0.4'))
    assert differences("multitask_fedavg", folder) == ["app/config/config_fed_client.json"]
    with pytest.raises(UserError, match="differs from what its builder exports"):
        job_name(folder)
    with pytest.raises(UserError, match="not one of pharmafl's jobs"):
        job_name(tmp_path)
    assert job_name("multitask_fedavg") == "multitask_fedavg"


def test_a_run_copy_takes_rounds_sites_and_settings_through_the_builder(tmp_path):
    options = JobOptions(2, 5, {"upload": "all", "learning_rate": 0.01, "trunk.hidden_sizes": [64, 32]})
    copy = export_run_job("multitask_fedavg", tmp_path, options)
    server, client = job_configs(copy)
    assert num_rounds(copy) == 2 and json.loads((copy / "meta.json").read_text())["min_clients"] == 5
    args = executor_args(copy)
    assert args["upload"] == "all" and args["training"] == {"dropout": 0.5, "learning_rate": 0.01}
    assert args["trunk"] == {"hidden_sizes": [64, 32]}
    model = next(c for c in server["components"] if c["id"] == "persistor")["args"]["model"]["args"]
    assert model["hidden_sizes"] == [64, 32]  # the server's trunk and the sites' trunk: one setting
    assert num_rounds(repo_root() / "jobs" / "multitask_fedavg") == 13  # the shipped folder is untouched


def test_a_seed_seeds_the_server_trunk_and_the_sites(tmp_path):
    copy = export_run_job("multitask_fedavg", tmp_path, JobOptions(settings={"seed": 3}))
    server, _ = job_configs(copy)
    assert executor_args(copy)["training"]["seed"] == 3
    assert next(c for c in server["components"] if c["id"] == "persistor")["args"]["model"]["args"]["seed"] == 3


def test_secure_jobs_take_their_secure_sum_settings_and_need_only_t_sites(tmp_path):
    copy = export_run_job("multitask_secure", tmp_path, JobOptions(sites=5, settings={"secure_sum.threshold": 4}))
    server, _ = job_configs(copy)
    workflow = next(w for w in server["workflows"] if w["id"] == "secure_sum")
    assert workflow["args"]["secure_sum"]["threshold"] == 4
    assert json.loads((copy / "meta.json").read_text())["min_clients"] == 4
    fra = export_run_job("esm2_lora_fra", tmp_path, JobOptions(settings={"lora.rank": 8}))
    aggregator = next(c for c in job_configs(fra)[0]["components"] if c["id"] == "aggregator")
    assert aggregator["args"]["rank"] == 8 and executor_args(fra)["lora"] == {"rank": 8}  # one rank for both


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"learning_rat": 0.1}, "multitask_fedavg has no setting learning_rat; its settings are: training.dropout"),
        ({"training.rank": 4}, "has no setting training.rank"),
        ({"learning_rate": "abc"}, "learning_rate='abc' is not a valid float"),
        ({"learning_rate": -1.0}, "learning_rate must be positive"),
        ({"upload": "everything"}, "upload must be 'trunk' or 'all'"),
        ({"secure_sum.threshold": 2}, "has no setting secure_sum.threshold"),
        ({"trunk.hidden_sizes": [0]}, "invalid trunk geometry"),
    ],
)
def test_bad_settings_are_one_sentence_naming_the_setting(tmp_path, settings, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_run_job("multitask_fedavg", tmp_path, JobOptions(settings=settings))


def test_a_name_in_two_groups_is_refused_as_ambiguous(tmp_path):
    from pharmafl.core.settings import apply_settings

    groups = {"training": {"seed": int}, "lora": {"seed": int}}
    with pytest.raises(InputError, match="ambiguous .* write training.seed or lora.seed"):
        apply_settings({}, {"seed": 1}, groups, {}, "a job")
    assert apply_settings({}, {"lora.seed": 1}, groups, {}, "a job") == {"lora": {"seed": 1}}


def test_rounds_and_sites_must_be_positive(tmp_path):
    with pytest.raises(InputError, match="at least one round"):
        export_run_job("multitask_fedavg", tmp_path, JobOptions(num_rounds=0))
    with pytest.raises(UserError, match="does not exist"):
        job_name(tmp_path / "missing")


@pytest.mark.parametrize("hash_seed", ["1", "2"])
def test_jobs_check_passes_whatever_the_hash_seed(hash_seed):
    # FLARE's exporter writes some lists in set order: the builders avoid those, so every process exports the
    # same bytes (and the sites' approval hashes of jobs/ hold)
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    result = subprocess.run(
        [sys.executable, "-m", "pharmafl.cli", "jobs", "check"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is what its builder exports" in result.stdout
