"""Masked secure sum in the real FLARE simulator: 5 sites, threshold 3, dropouts and a tampered upload."""

import json
import shutil

import numpy as np
import pytest
import torch

from pharmafl.cli import main
from pharmafl.core.errors import UserError
from pharmafl.core.paths import repo_root
from pharmafl.flare.fedavg_aggregator import CONTRIBUTIONS_LOG
from pharmafl.flare.job_builders import JobOptions, resolve_settings
from pharmafl.jobs.simulate import run_simulator
from pharmafl.secure_sum.encoding import choose_fixed_point
from pharmafl.secure_sum.ledger import LEDGER_FILE, SITE_LEDGER_FILE, read_ledger, verify_run
from pharmafl.testing.secure_sum import (
    BLIND_MEAN,
    BLIND_MODEL,
    MEANS_DIR,
    RECORD_DIR,
    FaultySecureSumSite,
    InconsistentUWorkflow,
    RecordingSecureSumWorkflow,
)

pytestmark = pytest.mark.slow
JOB = repo_root() / "jobs" / "multitask_secure"
SITES = [f"site-{i}" for i in range(1, 6)]
BITS = 1024


@pytest.fixture(scope="module")
def five_sites(chembl_csv, tmp_path_factory):
    from pharmafl.multitask.prepare import PrepareConfig, prepare_chem

    out_dir = tmp_path_factory.mktemp("chembl_five")
    prepare_chem(str(chembl_csv), str(out_dir), PrepareConfig(sites=SITES, max_compounds=3000, n_bits=BITS), None)
    return out_dir


SMALL_TRUNK = {"trunk.n_features": BITS, "trunk.hidden_sizes": [32]}


def secure_sum_settings(name: str) -> dict:
    """The secure_sum settings job ``name`` runs with, defaults included."""
    _, settings = resolve_settings(name, {})
    return {"fraction_bits": None, "modulus_bits": None, **settings}


def recording(workflow=RecordingSecureSumWorkflow, initial_model: str = "", **workflow_args) -> JobOptions:
    """Build options: a small trunk, the sites' plaintext uploads recorded and the server's means (``workflow``)."""
    return JobOptions(
        settings=SMALL_TRUNK,
        initial_model=initial_model,
        site_component=FaultySecureSumSite(record_updates=True),
        workflow_class=workflow,
        server_args=workflow_args,
    )


def ledger_of(run_dir):
    return read_ledger(run_dir / LEDGER_FILE)


@pytest.fixture(scope="module")
def faulty_run(five_sites, tmp_path_factory):
    """Round 0: site-2 drops after key setup, site-4 after its upload. Round 1: site-3's upload is tampered."""
    tmp = tmp_path_factory.mktemp("secure_sim")
    settings = secure_sum_settings(JOB.name)
    faults = {"site-2": "after-setup", "site-4": "after-upload", "site-3": "tampered@1"}
    result = run_simulator(
        JOB, five_sites, tmp / "workspace", rounds=2, quiet=True, faults=faults, job_options=recording()
    )
    run_dir = tmp / "workspace" / "server" / "simulate_job"
    return result, tmp / "workspace", run_dir, ledger_of(run_dir)[1:], settings


def test_dropouts_after_setup_and_after_upload_give_the_survivors_exact_mean(faulty_run):
    _, workspace, run_dir, records, args = faulty_run
    first = records[0]
    assert first["status"] == "ok"
    assert sorted(first["accepted"]) == ["site-1", "site-3", "site-4", "site-5"]
    assert first["dropped"] == ["site-2"]
    assert sorted(first["signatures"]) == first["revealed_by"] == ["site-1", "site-3", "site-5"]  # site-4 vanished
    assert first["model_before"] != first["model_after"]
    mean = np.load(run_dir / MEANS_DIR / "round_0.npz")
    uploads = [
        np.load(workspace / site / "simulate_job" / RECORD_DIR / "round_0.npz") for site in sorted(first["accepted"])
    ]
    weights = [float(u["__weight__"]) for u in uploads]
    assert first["total_weight"] == pytest.approx(sum(weights))
    fixed_point = choose_fixed_point(args["clip"], args["max_weight"], len(SITES), args["fraction_bits"], 32)
    for name in mean.files:
        exact = sum(w * u[name].astype(np.float64) for w, u in zip(weights, uploads, strict=True)) / sum(weights)
        bound = fixed_point.mean_error_bound(len(uploads), sum(weights), np.abs(exact).max())
        bound += np.finfo(np.float32).eps * np.abs(exact).max()  # the mean is returned as float32
        assert np.abs(mean[name] - exact).max() <= bound, name
        assert np.abs(exact).max() > 100 * bound  # the check is not vacuous


def test_tampered_upload_is_rejected_and_too_few_survivors_leave_the_model_unchanged(faulty_run):
    result, _, run_dir, records, _ = faulty_run
    contributions = [json.loads(line) for line in (run_dir / CONTRIBUTIONS_LOG).read_text().splitlines()]
    rejected = [c for c in contributions if not c["accepted"]]
    assert [(c["site"], c["round"]) for c in rejected] == [("site-3", 1)]
    assert "does not verify" in rejected[0]["reason"]
    assert all(c["masked"] for c in contributions)  # nothing reached the server in plaintext
    second = records[1]
    assert second["status"] == "failed"
    assert "only 2 valid uploads in round 1" in second["reason"] and "needs 3 sites" in second["reason"]
    assert second["model_before"] == second["model_after"] == records[0]["model_after"]
    assert "secure sum round failed" in open(result["log"]).read()


def test_the_ledger_verifies_on_the_server_and_every_site_and_names_an_edited_record(faulty_run, tmp_path):
    _, workspace, run_dir, _, _ = faulty_run
    sites = [workspace / site / "simulate_job" for site in SITES]
    lines = verify_run(run_dir, sites)
    assert len(lines) == 6 and all(line.startswith("OK") for line in lines), lines
    for site in ("site-1", "site-3", "site-5"):  # the live sites checked the final ledger themselves
        own = read_ledger(workspace / site / "simulate_job" / SITE_LEDGER_FILE)
        assert own[-2]["kind"] == "checked" and own[-2]["ledger_head"] == ledger_of(run_dir)[-1]["hash"]
    assert main(["ledger", "verify", str(run_dir), "--site", *map(str, sites)]) == 0
    # a record edited by hand: round 0's total weight doubled
    edited = tmp_path / "server"
    shutil.copytree(run_dir, edited)
    lines = (edited / LEDGER_FILE).read_text().splitlines()
    record = json.loads(lines[1])
    record["total_weight"] *= 2
    lines[1] = json.dumps(record, sort_keys=True)
    (edited / LEDGER_FILE).write_text("\n".join(lines) + "\n")
    assert main(["ledger", "verify", str(edited)]) == 1
    assert verify_run(edited)[0].endswith("record 2 (round 0) was altered: its content does not match its hash")


def test_every_site_still_scores_the_final_model(faulty_run):
    _, workspace, _, _, _ = faulty_run
    results = json.loads((workspace / "server/simulate_job/cross_site_val/cross_val_results.json").read_text())
    assert set(results) == set(SITES)


def test_a_server_that_tells_each_site_its_own_u_gets_no_share(five_sites, tmp_path):
    # the real site code against a real malicious workflow: every site signs the U it is told (size t, built
    # around site-1), then refuses to reveal anything, because no t sites signed the same U
    attack = recording(InconsistentUWorkflow, target="site-1", attacked_round=0)
    # the sites stop taking part once their ledger check finds the lie: the command fails and says so
    with pytest.raises(UserError, match="the server's U differs from the U site-1 signed"):
        run_simulator(JOB, five_sites, tmp_path / "ws", rounds=1, quiet=True, job_options=attack)
    run_dir = tmp_path / "ws" / "server" / "simulate_job"
    (record,) = ledger_of(run_dir)[1:]
    assert record["status"] == "failed" and record["reason"] == "attack round 0: 0 sites revealed shares"
    assert record["model_before"] == record["model_after"]
    log = open(tmp_path / "ws" / "simulate.log").read()
    refusals = [line for line in log.splitlines() if "refused secagg_unmask" in line]
    assert len(refusals) == 5 and all("valid signatures over U by its members" in line for line in refusals)
    for site in SITES:
        own = read_ledger(tmp_path / "ws" / site / "simulate_job" / SITE_LEDGER_FILE)
        assert "signed" in [e["kind"] for e in own] and "revealed" not in [e["kind"] for e in own]
    # the server's ledger is well formed, but every site's own chain shows the U it signed is not the server's: each
    # site stops at the final ledger, and `ledger verify` names the lie afterwards
    lines = verify_run(run_dir, [tmp_path / "ws" / site / "simulate_job" for site in SITES])
    assert lines[0].startswith("OK")
    for site, line in zip(SITES, lines[1:], strict=True):
        assert line.startswith("BAD") and f"the server's U differs from the U {site} signed" in line
    assert log.count("takes no further part in this job") == 5


def test_esm_lora_secure_job_aggregates_masked_deltas(gpsite_small, tiny_esm_config, tmp_path):
    from pharmafl.flare.state_persistor import STATE_FILE

    overrides = {"model": "", "model_config": tiny_esm_config, "local_steps": 2, "batch_size": 4, "max_length": 64}
    job = repo_root() / "jobs" / "esm2_lora_fra_secure"
    run_simulator(job, gpsite_small, tmp_path / "ws", rounds=2, executor_overrides=overrides, quiet=True)
    run_dir = tmp_path / "ws/server/simulate_job"
    records = ledger_of(run_dir)[1:]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert all(sorted(r["accepted"]) == ["site-1", "site-2"] for r in records)
    sites = [tmp_path / "ws" / site / "simulate_job" for site in ("site-1", "site-2")]
    assert all(line.startswith("OK") for line in verify_run(run_dir, sites))
    contributions = [json.loads(line) for line in (run_dir / CONTRIBUTIONS_LOG).read_text().splitlines()]
    assert len(contributions) == 4 and all(c["accepted"] and c["masked"] for c in contributions)
    assert all(key.endswith(".delta") or "classifier" in key for c in contributions for key in c["keys"])
    with np.load(run_dir / "app_server" / STATE_FILE) as state:
        lora_a = [name for name in state.files if name.endswith("lora_A.weight")]
        assert lora_a and all(state[name].shape[0] == 16 for name in lora_a)  # FRA-LoRA truncated to rank 16
        assert all(np.isfinite(state[name]).all() for name in state.files)


def tiny_job(name, initial_model) -> JobOptions:
    """Build options for job ``name``: a small trunk that starts from the checkpoint ``initial_model``; secure jobs
    record the server's aggregates and the sites' plaintext uploads (and, server-blind, the sites' models)."""
    if "secure" in name:
        return recording(initial_model=str(initial_model))
    return JobOptions(settings=SMALL_TRUNK, initial_model=str(initial_model))


@pytest.fixture(scope="module")
def same_start(five_sites, tmp_path_factory):
    """multitask_fedavg, multitask_secure and multitask_secure_blind, 2 rounds each from the same initial trunk:
    {job: (workspace, server run dir, the server's final model, per-site final metrics)} and the initial trunk."""
    from pharmafl.multitask.model import TrunkModel

    tmp = tmp_path_factory.mktemp("same_start")
    torch.manual_seed(0)
    initial = TrunkModel(n_features=BITS, hidden_sizes=[32]).state_dict()
    torch.save(initial, tmp / "initial_trunk.pt")
    runs = {}
    for name in ("multitask_fedavg", "multitask_secure", "multitask_secure_blind"):
        options = tiny_job(name, tmp / "initial_trunk.pt")
        run_simulator(name, five_sites, tmp / f"ws_{name}", rounds=2, quiet=True, job_options=options)
        run_dir = tmp / f"ws_{name}/server/simulate_job"
        model = torch.load(run_dir / "app_server/FL_global_model.pt", weights_only=False)
        results = json.loads((run_dir / "cross_site_val/cross_val_results.json").read_text())
        # the final model's scores (the persistor also lists the initial checkpoint of source_ckpt_file_full_name)
        final = "SRV_server_blind_global_model" if name.endswith("blind") else "SRV_FL_global_model.pt"
        metrics = {site: by_model[final] for site, by_model in results.items()}
        runs[name] = (tmp / f"ws_{name}", run_dir, model.get("model", model), metrics)
    return runs, initial


def assert_same_model_and_metrics(model_a, metrics_a, model_b, metrics_b):
    assert set(model_a) == set(model_b)
    for name in model_a:
        difference = np.abs(np.asarray(model_a[name], np.float64) - np.asarray(model_b[name], np.float64)).max()
        assert difference < 1e-5, name  # quantization ~1e-7 per round, carried through one round of training
    assert set(metrics_a) == set(metrics_b) == set(SITES)
    for site in SITES:
        for metric in ("auc_roc", "auc_pr"):
            assert metrics_b[site][metric] == pytest.approx(metrics_a[site][metric], abs=1e-3), (site, metric)


def test_secure_and_plain_fedavg_give_the_same_model_and_metrics(same_start):
    runs, _ = same_start
    _, _, plain_model, plain_metrics = runs["multitask_fedavg"]
    _, _, secure_model, secure_metrics = runs["multitask_secure"]
    assert_same_model_and_metrics(
        {k: v.numpy() for k, v in plain_model.items()},
        plain_metrics,
        {k: v.numpy() for k, v in secure_model.items()},
        secure_metrics,
    )


def site_blind_models(workspace, round_number):
    return {
        site: dict(np.load(workspace / site / "simulate_job" / RECORD_DIR / BLIND_MODEL.format(round_number)))
        for site in SITES
    }


def test_server_blind_sites_end_with_the_secure_jobs_model_and_metrics(same_start):
    runs, _ = same_start
    _, _, secure_model, secure_metrics = runs["multitask_secure"]
    blind_workspace, _, _, blind_metrics = runs["multitask_secure_blind"]
    finals = site_blind_models(blind_workspace, 1)  # after the last round, applied for the final validate task
    for site in SITES[1:]:  # every site rebuilt the same global model
        for name, value in finals[SITES[0]].items():
            np.testing.assert_array_equal(finals[site][name], value)
    assert_same_model_and_metrics(
        {k: v.numpy() for k, v in secure_model.items()}, secure_metrics, finals[SITES[0]], blind_metrics
    )


def plain_in(aggregate, fixed_point, total_weight, mean) -> bool:
    """Whether the modular aggregate reads as ``[total weight, total weight * mean]`` to 1e-3 in all but 1 + 0.1% of
    its values; a uniformly random value is that close with probability 2e-3 * scale / 2^bits (1e-7 at most here)."""
    signed = np.asarray(aggregate).view(np.int32 if fixed_point.modulus_bits == 32 else np.int64)
    plain = np.concatenate([[total_weight], total_weight * np.ravel(mean)])
    far = np.abs(signed / fixed_point.scale - plain) >= 1e-3
    return int(far.sum()) <= 1 + far.size // 1000


def test_server_blind_server_keeps_the_initial_model_and_only_group_masked_sums(same_start):
    runs, initial = same_start
    workspace, run_dir, server_model, _ = runs["multitask_secure_blind"]
    for name, value in initial.items():  # the server never applied an aggregate
        assert torch.equal(server_model[name], value), name
    records = ledger_of(run_dir)[1:]
    assert [(r["status"], r["server_blind"], r["total_weight"]) for r in records] == [("ok", True, None)] * 2
    # server-blind, the ledger's model digests are those of the group-masked aggregates the server forwards
    assert records[0]["model_before"] != records[0]["model_after"] != records[1]["model_after"]
    args = secure_sum_settings("multitask_secure_blind")
    fixed_point = choose_fixed_point(
        args["clip"], args["max_weight"], len(SITES), args["fraction_bits"], args["modulus_bits"]
    )
    for record in records:
        r = record["round"]
        uploads = [np.load(workspace / site / "simulate_job" / RECORD_DIR / f"round_{r}.npz") for site in SITES]
        weights = [float(u["__weight__"]) for u in uploads]
        names = sorted(n for n in uploads[0].files if n != "__weight__")
        exact = {
            n: sum(w * u[n].astype(np.float64) for w, u in zip(weights, uploads, strict=True)) / sum(weights)
            for n in names
        }
        flat_exact = np.concatenate([exact[n].ravel() for n in names])
        held = np.load(run_dir / MEANS_DIR / f"round_{r}.npz")["blind_sum"]
        assert held.size == 1 + flat_exact.size
        assert not plain_in(held, fixed_point, sum(weights), flat_exact)  # the server holds no plaintext aggregate
        # ... while every site unblinded the exact weighted mean
        for site in SITES:
            applied = np.load(workspace / site / "simulate_job" / RECORD_DIR / BLIND_MEAN.format(r))
            assert float(applied["__weight__"]) == pytest.approx(sum(weights))
            for n in names:
                bound = fixed_point.mean_error_bound(len(SITES), sum(weights), np.abs(exact[n]).max())
                bound += np.finfo(np.float32).eps * np.abs(exact[n]).max()
                assert np.abs(applied[n] - exact[n]).max() <= bound, (site, r, n)
                assert np.abs(exact[n]).max() > 100 * bound  # the check is not vacuous
