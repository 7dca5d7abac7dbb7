import json

import pytest

from pharmafl.consortium.poc import load_project, place_data, project_for_poc, site_names
from pharmafl.consortium.policies import install_policies, merge_resources, site_policy_dir
from pharmafl.core.errors import UserError
from pharmafl.core.paths import repo_root
from pharmafl.jobs import read_json
from pharmafl.secure_sum.config import SitePolicy


def test_project_has_a_server_three_sites_and_the_three_roles():
    project = load_project()
    assert [p["name"] for p in project["participants"] if p["type"] == "server"] == ["server"]
    assert site_names(project) == ["pharma-a", "pharma-b", "pharma-c"]
    roles = {p["role"] for p in project["participants"] if p["type"] == "admin"}
    assert roles == {"project_admin", "org_admin", "lead"}


def test_authorization_lets_lead_submit_and_not_org_admin():
    permissions = read_json(site_policy_dir() / "authorization.json")["permissions"]
    assert permissions["lead"]["submit_job"] == "any"
    assert permissions["org_admin"]["submit_job"] == "none"
    assert permissions["lead"]["byoc"] == "none"  # code comes from the installed package, never from a job


def test_privacy_scope_applies_the_trunk_only_filter_and_the_multitask_job_selects_it():
    privacy = read_json(site_policy_dir() / "privacy.json")
    scopes = {s["name"]: s for s in privacy["scopes"]}
    filters = [f["path"] for f in scopes["trunk-only"]["task_result_filters"]]
    assert filters == ["pharmafl.flare.trunk_only_filter.TrunkOnlyFilter"]
    assert privacy["default_scope"] in scopes
    assert read_json(repo_root() / "jobs" / "multitask_fedavg" / "meta.json")["scope"] == "trunk-only"


def test_project_for_poc_changes_sites_and_ports():
    project = load_project()
    assert site_names(project_for_poc(project, n_sites=2)) == ["pharma-a", "pharma-b"]
    five = project_for_poc(project, n_sites=5, port=21000)
    assert site_names(five) == ["pharma-a", "pharma-b", "pharma-c", "pharma-d", "pharma-e"]
    server = [p for p in five["participants"] if p["type"] == "server"][0]
    assert (server["fed_learn_port"], server["admin_port"]) == (21000, 21001)
    assert site_names(project) == ["pharma-a", "pharma-b", "pharma-c"]  # the input is not changed
    with pytest.raises(UserError, match="--sites"):
        project_for_poc(project, n_sites=0)


def _prepared(root, names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "manifest.json").write_text("{}")
    return root


def test_place_data_uses_site_folders_or_maps_partners_in_order(tmp_path):
    sites = ["pharma-a", "pharma-b"]
    named = _prepared(tmp_path / "named", sites)
    assert place_data(named, sites, tmp_path / "t1") == {s: str(named / s) for s in sites}
    numbered = _prepared(tmp_path / "numbered", ["site-1", "site-2"])
    mapping = place_data(numbered, sites, tmp_path / "t2")
    assert mapping == {"pharma-a": str(numbered / "site-1"), "pharma-b": str(numbered / "site-2")}
    assert (tmp_path / "t2" / "pharma-b").resolve() == numbered / "site-2"
    with pytest.raises(UserError, match="--sites pharma-a,pharma-b"):
        place_data(_prepared(tmp_path / "other", ["x"]), sites, tmp_path / "t3")


def test_merge_resources_unions_allow_list_and_replaces_same_id():
    base = {"format_version": 2, "class_allow_list": ["a."], "components": [{"id": "x", "path": "old"}]}
    merged = merge_resources(base, {"class_allow_list": ["a.", "b."]}, {"components": [{"id": "x", "path": "new"}]})
    assert merged["class_allow_list"] == ["a.", "b."]
    assert merged["components"] == [{"id": "x", "path": "new"}]
    assert merged["format_version"] == 2 and base["components"] == [{"id": "x", "path": "old"}]


def test_install_policies_keeps_flare_defaults_and_adds_ours(tmp_path):
    default = {"format_version": 2, "class_allow_list": ["nvflare.x"], "components": [{"id": "resource_manager"}]}
    for name in ("server", "site"):
        (tmp_path / name / "local").mkdir(parents=True)
        (tmp_path / name / "local" / "resources.json.default").write_text(json.dumps(default))
    assert install_policies(tmp_path / "server", is_site=False) == ["resources.json", "authorization.json"]
    server = read_json(tmp_path / "server" / "local" / "resources.json")
    assert "pharmafl." in server["class_allow_list"] and "nvflare.x" in server["class_allow_list"]
    assert [c["id"] for c in server["components"]] == ["resource_manager"]
    written = install_policies(tmp_path / "site", is_site=True, roster=["pharma-a", "pharma-b", "pharma-c"])
    assert set(written) == {
        "resources.json",
        "authorization.json",
        "privacy.json",
        "approved_jobs.json",
        "secure_sum.json",
    }
    policy = SitePolicy.load(tmp_path / "site" / "local" / "secure_sum.json")
    assert policy.roster == ("pharma-a", "pharma-b", "pharma-c") and policy.threshold_floor([]) == 2
    site = read_json(tmp_path / "site" / "local" / "resources.json")
    assert [c["id"] for c in site["components"]] == ["resource_manager", "app_deployer"]
    with pytest.raises(UserError, match="startup kit"):
        install_policies(tmp_path / "missing", is_site=True)
