"""The membership-inference audit of ESM-2 LoRA binding-site models: Pr(x | model) of a chain, and the audit end to
end on a tiny GPSite split with the tiny random ESM-2 (its local, centralized and a saved run's models)."""

import json

import numpy as np
import pytest
import torch

from pharmafl.binding_sites.audit import (
    CENTRALIZED,
    FINAL_ADAPTER,
    FINAL_CARD,
    LOCAL,
    audit_binding_sites,
    chain_probabilities,
    job_settings,
    load_site_adapter,
    run_site_adapters,
)
from pharmafl.binding_sites.dataset import load_client
from pharmafl.binding_sites.formats import Chain
from pharmafl.binding_sites.model import LoRASettings, encode_chains, load_esm_lora, lora_state
from pharmafl.core.paths import repo_root
from pharmafl.privacy.audit import AuditConfig

JOB = repo_root() / "jobs" / "esm2_lora_fra"
CLIENTS = ("site-1", "site-2")


@pytest.fixture(scope="module")
def tiny_overrides(tiny_esm_config) -> dict:
    return {"model": "", "model_config": tiny_esm_config, "local_steps": 2, "batch_size": 2, "max_length": 64}


def test_chain_probability_is_exp_of_minus_the_mean_residue_cross_entropy(tiny_esm_config):
    model, tokenizer = load_esm_lora("", tiny_esm_config, LoRASettings(rank=4, alpha=8, dropout=0.0))
    torch.nn.init.normal_(model.base_model.model.classifier.modules_to_save["default"].weight, std=1.0)
    rng = np.random.default_rng(0)
    chains = [
        Chain(f"c{i}", "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), n)), rng.integers(0, 2, n, np.int8), "t")
        for i, n in enumerate((7, 19, 40))  # 40 residues > max_length 24: only the first 22 are scored
    ]
    model.eval()
    expected = []
    for chain in chains:  # each chain alone (no padding), residues by hand
        keep = min(len(chain), 22)
        batch = encode_chains(tokenizer, [chain.sequence], None, 24)
        with torch.no_grad():
            logits = model(**batch).logits[0, 1 : keep + 1].float()
        nll = torch.nn.functional.cross_entropy(logits, torch.as_tensor(chain.labels[:keep], dtype=torch.long))
        expected.append(float(torch.exp(-nll)))
    got = chain_probabilities(model, tokenizer, chains, max_length=24, batch_size=3)  # one padded batch
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert len(set(np.round(got, 6))) == 3 and np.all((got > 0) & (got < 1))


def fake_run(workspace, tiny_esm_config, epsilon: float) -> None:
    """A finished simulator run's layout: the server's cross-site results and each site's final adapter and card."""
    results = workspace / "server" / "simulate_job" / "cross_site_val"
    results.mkdir(parents=True)
    (results / "cross_val_results.json").write_text(json.dumps({c: {"SRV_server": {"f1": 0.1}} for c in CLIENTS}))
    model, _ = load_esm_lora("", tiny_esm_config, LoRASettings())
    rng = np.random.default_rng(1)
    for client in CLIENTS:
        folder = workspace / client / "simulate_job"
        folder.mkdir(parents=True)
        # as if trained: the loaded model must differ from a fresh one
        trained = {k: v + rng.normal(0, 0.1, v.shape).astype(v.dtype) for k, v in lora_state(model).items()}
        np.savez(folder / FINAL_ADAPTER, **trained)
        (folder / FINAL_CARD).write_text(json.dumps({"privacy": {"epsilon": epsilon, "delta": 1e-3}}))


def test_a_run_s_saved_site_adapters_load_into_fresh_models(tiny_esm_config, tiny_overrides, tmp_path):
    fake_run(tmp_path / "run", tiny_esm_config, epsilon=2.0)
    adapters = run_site_adapters(tmp_path / "run")
    assert set(adapters) == set(CLIENTS)
    job_args = job_settings(JOB, tiny_overrides)
    for folder, run_args in adapters.values():
        model, privacy = load_site_adapter(folder, run_args, job_args)
        saved = np.load(folder / FINAL_ADAPTER)
        loaded = lora_state(model)
        assert loaded.keys() == set(saved.files)
        for name, value in loaded.items():
            np.testing.assert_array_equal(value, saved[name])
        assert privacy == {"epsilon": 2.0, "delta": 1e-3}


def test_the_audit_attacks_every_client_s_models_and_writes_the_report(
    gpsite_small, tiny_esm_config, tiny_overrides, tmp_path
):
    fake_run(tmp_path / "run", tiny_esm_config, epsilon=3.5)
    config = AuditConfig(references=1, bootstrap=20, rounds=2)
    out = tmp_path / "audit"
    summary = audit_binding_sites(
        gpsite_small, {"dp": tmp_path / "run"}, out, JOB, config, progress=lambda _: None, overrides=tiny_overrides
    )
    assert summary["steps"] == {LOCAL: 4, CENTRALIZED: 8, "reference": 4}  # rounds x local_steps (x clients)
    assert set(summary["sites"]) == set(CLIENTS)
    for client, result in summary["sites"].items():
        assert result["members"] == len(load_client(str(gpsite_small / client), "train"))
        assert result["non_members"] == len(load_client(str(gpsite_small / client), "test"))
        other = next(c for c in CLIENTS if c != client)  # the population: the other client's test chains
        assert result["population"] == len(load_client(str(gpsite_small / other), "test"))
        assert set(result["models"]) == {LOCAL, "dp", CENTRALIZED}
        for model in result["models"].values():
            assert 0 <= model["auc_pr"] <= 1 and 0 <= model["auc_roc"] <= 1
            for attack in ("loss", "rmia"):
                assert 0 <= model[attack]["auc"] <= 1
                assert model[attack]["n_non_members"] == result["non_members"]
        assert result["models"]["dp"]["epsilon"] == 3.5 and result["models"][LOCAL]["epsilon"] is None
    assert json.loads((out / "summary.json").read_text())["sites"].keys() == set(CLIENTS)
    assert (out / "report.md").read_text().count("| site-") == 6
    assert (out / "privacy.png").is_file()


def test_the_saved_adapter_names_are_the_executor_s():
    from pharmafl.flare.esm_lora_executor import FINAL_CARD_FILE, FINAL_STATE_FILE

    assert (FINAL_ADAPTER, FINAL_CARD) == (FINAL_STATE_FILE, FINAL_CARD_FILE)


def test_the_command_sends_binding_site_data_here_and_chem_data_to_the_multitask_audit(gpsite_small, tmp_path, capsys):
    from pharmafl.cli import main

    command = ["audit", "membership", "--out", str(tmp_path / "audit")]
    # refused by the ESM-2 job's settings, before any training: the binding-site audit with its default job ran
    assert main([*command, "--data", str(gpsite_small), "--set", "no_such=1"]) == 2
    assert "esm2_lora_fra has no setting no_such" in capsys.readouterr().err
    # the audit's own models train without DP (the DP models are the runs')
    assert main([*command, "--data", str(gpsite_small), "--set", "dp.target_epsilon=8"]) == 2
    assert "has no setting dp.target_epsilon" in capsys.readouterr().err
    assert main([*command, "--data", str(gpsite_small), "--centralized", str(gpsite_small)]) == 2
    assert "--no-centralized skips" in capsys.readouterr().err
    chem = tmp_path / "chem"
    (chem / "site-1").mkdir(parents=True)
    (chem / "site-1" / "manifest.json").write_text(json.dumps({"n_bits": 1024}))
    assert main([*command, "--data", str(chem), "--no-centralized"]) == 2
    assert "are for binding-site and eICU data" in capsys.readouterr().err
