import json

import pytest

from pharmafl.core.errors import UserError
from pharmafl.core.paths import repo_root
from pharmafl.jobs import CLIENT_CONFIG, find_component
from pharmafl.jobs.export import JobOptions, export_run_job
from pharmafl.jobs.simulate import _faulty_site, parse_fault


def test_fault_specs_parse_and_bad_ones_are_refused():
    assert parse_fault("site-2:after-setup") == ("site-2", "after-setup")
    assert parse_fault("site-3:tampered@1") == ("site-3", "tampered@1")
    for bad in ("site-2", "site-2:explode", ":after-upload", "site-2:after-upload@x"):
        with pytest.raises(UserError, match="SITE:PHASE"):
            parse_fault(bad)


def test_faults_go_into_the_secure_sum_component_of_the_run_copy(tmp_path):
    site = _faulty_site("multitask_secure", ["site-1", "site-2"], {"site-2": "after-upload"}, 1)
    job = export_run_job("multitask_secure", tmp_path, JobOptions(site_component=site))
    component = find_component(json.loads((job / CLIENT_CONFIG).read_text()), "secure_sum")
    assert component["path"] == "pharmafl.testing.secure_sum.FaultySecureSumSite"
    assert component["args"]["faults"] == {"site-2": "after-upload"} and component["args"]["fault_round"] == 1
    with pytest.raises(UserError, match="the sites are"):
        _faulty_site("multitask_secure", ["site-1", "site-2"], {"site-9": "after-setup"}, 0)
    with pytest.raises(UserError, match="need a secure-sum job"):
        _faulty_site("multitask_fedavg", ["site-1"], {"site-1": "after-setup"}, 0)


def test_shipped_jobs_carry_no_test_machinery():
    for config in sorted((repo_root() / "jobs").glob("*/app/config/*.json")):
        text = config.read_text()
        assert "pharmafl.testing" not in text, config
        for argument in ("faults", "fault_round", "record_updates", "record_means"):
            assert f'"{argument}"' not in text, (config, argument)
