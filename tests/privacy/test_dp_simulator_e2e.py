"""DP-SGD at every site in the real FLARE simulator: the budget holds at every site, and training stops when it is
spent (the multitask_dp job, with a noise and a budget that last about 1.5 of its 3 rounds); then the membership
audit of that run, the server's view included."""

import json

import pytest

from pharmafl.core.paths import repo_root
from pharmafl.core.report import tensorboard_curves
from pharmafl.flare.fedavg_aggregator import CONTRIBUTIONS_LOG
from pharmafl.flare.multitask_executor import FINAL_MODEL_FILE
from pharmafl.jobs.simulate import run_simulator
from pharmafl.multitask.baseline import job_train_config
from pharmafl.multitask.dataset import load_site
from pharmafl.multitask.predict import MODEL_CARD
from pharmafl.multitask.train import MultiTaskTrainer
from pharmafl.privacy import accounting
from pharmafl.privacy.dp_sgd import DPConfig
from pharmafl.privacy.report import PRIVACY_FILE

pytestmark = pytest.mark.slow
JOB = repo_root() / "jobs" / "multitask_dp"
SITES = ("site-1", "site-2")
NOISE = 1.0


@pytest.fixture(scope="module")
def audit_data(chembl_csv, tmp_path_factory):
    """3,000 ChEMBL compounds for two sites, 20% of them in the audit hold-out."""
    from pharmafl.multitask.prepare import PrepareConfig, prepare_chem

    out = tmp_path_factory.mktemp("audit_data")
    prepare_chem(
        str(chembl_csv), str(out), PrepareConfig(sites=list(SITES), max_compounds=3000, audit_fraction=0.2), None
    )
    return out


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory, audit_data):
    chembl_small = audit_data
    config, trunk, _ = job_train_config(JOB)
    # the smallest epsilon any site spends in 1.5 epochs: every site's budget runs out within rounds 1-2 of 3
    budgets = {
        site: MultiTaskTrainer(
            load_site(str(chembl_small / site)), config, trunk, DPConfig(noise_multiplier=NOISE)
        ).budget
        for site in SITES
    }
    target = min(
        accounting.epsilon(NOISE, b.sample_rate, int(1.5 * b.steps_per_epoch), b.delta) for b in budgets.values()
    )
    assert all(
        accounting.epsilon(NOISE, b.sample_rate, 2 * b.steps_per_epoch, b.delta) > target for b in budgets.values()
    )
    workspace = tmp_path_factory.mktemp("dp") / "workspace"
    settings = {"dp.noise_multiplier": NOISE, "dp.target_epsilon": target}
    run_simulator(JOB, chembl_small, workspace, rounds=3, executor_overrides=settings, quiet=True)
    return workspace, target


def test_epsilon_stays_within_the_target_at_every_site(dp_run):
    workspace, target = dp_run
    for site in SITES:
        spent = json.loads((workspace / site / "simulate_job" / PRIVACY_FILE).read_text())
        assert 0 < spent["epsilon"] <= target
        assert spent["exhausted"] and spent["steps"] == spent["max_steps"]
        assert spent["noise_multiplier"] == NOISE and spent["sampling"] == "Poisson"
        card = json.loads((workspace / site / "simulate_job" / MODEL_CARD).read_text())
        assert card["privacy"]["epsilon"] == pytest.approx(spent["epsilon"])
        assert (workspace / site / "simulate_job" / FINAL_MODEL_FILE).is_file()


def test_sites_stop_and_say_so_when_the_budget_is_spent(dp_run):
    workspace, _ = dp_run
    records = [
        json.loads(line) for line in (workspace / "server/simulate_job" / CONTRIBUTIONS_LOG).read_text().splitlines()
    ]
    last = [r for r in records if r["round"] == 2]
    assert {r["site"] for r in last} == set(SITES)
    assert all(not r["accepted"] and "privacy budget spent" in r["reason"] for r in last)
    assert all(r["accepted"] for r in records if r["round"] == 0)
    for site in SITES:
        assert "privacy budget spent" in (workspace / site / "log.txt").read_text()


def test_epsilon_streams_to_tensorboard(dp_run):
    workspace, target = dp_run
    curves = tensorboard_curves(workspace / "server/simulate_job", "privacy/epsilon")
    assert set(curves) == set(SITES)
    for curve in curves.values():
        assert curve == sorted(curve) and 0 < curve[0] < curve[-1] <= target * (1 + 1e-6)  # TensorBoard: float32


def test_membership_audit_of_the_dp_run(dp_run, audit_data, tmp_path):
    """The audit runs end to end; under DP every row of a site's update moves, so the server's bit-presence attack
    on it is a coin flip, while the single-partner model trained here is attacked with the same code."""
    from pharmafl.multitask.audit import SINGLE_PARTNER, AuditConfig, audit_membership

    workspace, target = dp_run
    config = AuditConfig(references=1, max_members=400, population=400, bootstrap=20, rounds=2)
    summary = audit_membership(audit_data, {"dp": workspace}, tmp_path / "audit", JOB, config, progress=lambda _: None)
    for site in SITES:
        models = summary["sites"][site]["models"]
        assert set(models) == {SINGLE_PARTNER, "dp"}
        assert models["dp"]["epsilon"] <= target and models[SINGLE_PARTNER]["epsilon"] is None
        for model in models.values():
            assert 0 <= model["rmia"]["auc"] <= 1 and model["loss"]["n_non_members"] > 0
        server_view = summary["update_attack"]["dp"][site]
        assert server_view["rows_moved_individual"] == 32000  # noise in every row: no row tells a member's bits
        assert server_view["individual"]["auc"] == pytest.approx(0.5)
    assert (tmp_path / "audit" / "report.md").read_text().count("| site-") >= 4
    assert (tmp_path / "audit" / "privacy.png").is_file()


def test_the_report_shows_what_each_site_spent(dp_run):
    from pharmafl.report import write_report

    workspace, _ = dp_run
    summary, table = write_report(workspace)
    for site in SITES:
        spent = json.loads((workspace / site / "simulate_job" / PRIVACY_FILE).read_text())
        assert summary["sites"][site]["privacy"]["epsilon"] == spent["epsilon"]
        assert f"| {site} | {spent['epsilon']:.3f} |" in table
    assert "DP-SGD (sample-level" in (workspace / "report" / "report.md").read_text()
