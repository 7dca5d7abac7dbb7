import json

import pytest

from pharmafl.core.errors import UserError
from pharmafl.core.paths import repo_root
from pharmafl.jobs import job_configs, site_local_dir, write_job_copy

JOBS = sorted(p for p in (repo_root() / "jobs").iterdir() if (p / "meta.json").is_file())


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


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_component_is_on_the_site_allow_list(job):
    allow_list = json.loads((site_local_dir() / "resources.json").read_text())["class_allow_list"]
    for config in job_configs(job):
        for path in component_paths(config):
            assert any(path == entry or (entry.endswith(".") and path.startswith(entry)) for entry in allow_list), path


def test_job_copy_overrides_rounds_clients_and_executor_args(tmp_path):
    job = repo_root() / "jobs" / "multitask_fedavg"
    copy = write_job_copy(job, tmp_path, num_rounds=2, min_clients=5, executor_overrides={"upload": "all"})
    server, client = job_configs(copy)
    assert server["num_rounds"] == 2 and server["min_clients"] == 5
    assert json.loads((copy / "meta.json").read_text())["min_clients"] == 5
    assert client["executors"][0]["executor"]["args"]["upload"] == "all"
    assert job_configs(job)[0]["num_rounds"] != 2  # the original is untouched
    with pytest.raises(UserError):
        write_job_copy(job, tmp_path, num_rounds=0)
    with pytest.raises(UserError, match="does not exist"):
        write_job_copy(tmp_path / "missing", tmp_path)
    with pytest.raises(UserError, match="MultiTaskExecutor has no argument learning_rat"):
        write_job_copy(job, tmp_path, executor_overrides={"learning_rat": 0.1})
