"""The secure sum's FLARE components at the sites, driven with FLContexts over real workspaces, against a server that
follows the protocol (or edits its ledger, swaps the model, downgrades the settings)."""

import copy
import json
import sys
from pathlib import Path
from unittest.mock import MagicMock

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from pharmafl.flare.secure_sum_blind import BlindModelLocator, BlindShareableGenerator, payload_model_digest
from pharmafl.flare.secure_sum_site import SecureMaskFilter, SecureSumExecutor, SecureSumSite, SecureTaskDataFilter
from pharmafl.flare.secure_sum_workflow import (
    ADVERTISE_TASK,
    BLIND_META,
    CONSISTENCY_TASK,
    LEDGER_HEADER,
    LEDGER_TASK,
    PARTICIPANTS_HEADER,
    SHARE_KEYS_TASK,
    UNMASK_TASK,
    SecureSumWorkflow,
)
from pharmafl.secure_sum.config import SecureSumConfig, SitePolicy
from pharmafl.secure_sum.keys import Advertisement
from pharmafl.secure_sum.ledger import (
    Ledger,
    cross_check,
    model_digest,
    record_hash,
    round_record,
    setup_record,
)
from pharmafl.secure_sum.protocol import MaskedUpload, SecureSumServer

sys.path.insert(0, str(Path(__file__).parents[1] / "secure_sum"))
from secagg_kit import ca_pem, make_ca, make_site_kit  # noqa: E402

JOB = "job-1"
SITES = ["site-1", "site-2", "site-3"]


def site_context(root: Path, site: str, component, task_name: str = "train") -> FLContext:
    """A site's FLContext: a mocked engine over a real Workspace at ``root`` whose components are ``component``."""
    engine = MagicMock()
    engine.get_component.return_value = component
    engine.get_workspace.return_value = Workspace(root_dir=str(root), site_name=site)
    context = FLContext()
    context.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=True)
    context.set_prop(ReservedKey.IDENTITY_NAME, site, private=True, sticky=True)
    context.set_prop(ReservedKey.RUN_NUM, JOB, private=True, sticky=True)
    context.set_prop(FLContextKey.TASK_NAME, task_name, private=True, sticky=False)
    return context


def make_site_root(tmp_path: Path, site: str, policy: SitePolicy | None) -> Path:
    root = tmp_path / site
    for folder in ("startup", "local", JOB):
        (root / folder).mkdir(parents=True, exist_ok=True)
    if policy is not None:
        policy.write(root / "local" / "secure_sum.json")
    return root


def run(executor_task: str, site: SecureSumSite, context: FLContext, payload: dict) -> Shareable:
    data = Shareable()
    data.update(payload)
    return SecureSumExecutor().execute(executor_task, data, context, Signal())


class SiteFederation:
    """Three SecureSumSites with their own workspaces and policies, and a server that follows the protocol."""

    def __init__(self, tmp_path, config: SecureSumConfig, initial: dict, generator=None):
        self.config = config
        self.sites = {name: SecureSumSite() for name in SITES}
        self.roots = {name: make_site_root(tmp_path, name, SitePolicy(roster=tuple(SITES))) for name in SITES}
        for name, site in self.sites.items():
            site.handle_event("_start_run", self.context(name))  # not START_RUN: no app root in these tests
            site.site = name
            site.ledger = Ledger(self.roots[name] / JOB / "site_ledger.jsonl")
        self.server = SecureSumServer(JOB, config)
        self.ledger = Ledger()
        self.generator = generator
        payload = {"config": config.to_dict(), "job_id": JOB, "sites": SITES}
        adverts = [run(ADVERTISE_TASK, self.sites[s], self.context(s), payload)["advertisement"] for s in SITES]
        checked = self.server.register_advertisements([Advertisement.from_dict(a) for a in adverts])
        for name in SITES:
            answer = run(
                SHARE_KEYS_TASK,
                self.sites[name],
                self.context(name),
                {"advertisements": [a.to_dict() for a in checked]},
            )
            self.server.register_key_shares(name, answer["key_shares"])
        self.model = initial
        if generator is not None:
            generator.set_group_seeds(self.server.group_seed_ciphertexts)
            generator.learnable_to_shareable(make_model_learnable(initial, {}), FLContext())
        self.ledger.append(setup_record(JOB, "", config.to_dict(), SITES, checked, self.model_digest()))

    def context(self, name, task_name="train"):
        return site_context(self.roots[name], name, self.sites[name], task_name)

    def model_digest(self):
        return self.generator.model_digest() if self.generator is not None else model_digest(self.model)

    def task(self, round_number):
        if self.generator is not None:
            data = self.generator.payload_dxo().to_shareable()
        else:
            data = DXO(DataKind.WEIGHTS, data=self.model).to_shareable()
        data.set_header(AppConstants.CURRENT_ROUND, round_number)
        data.set_header(PARTICIPANTS_HEADER, SITES)
        data.set_header(LEDGER_HEADER, copy.deepcopy(self.ledger.records))
        return data

    def round(self, round_number, updates, weights, task=None):
        """One honest round; returns the task data each site's filter handed its executor and the result."""
        self.server.start_round(round_number)
        task = task or self.task(round_number)
        received = {}
        for name in SITES:
            received[name] = from_shareable(SecureTaskDataFilter().process(copy.deepcopy(task), self.context(name)))
            result = DXO(
                DataKind.WEIGHT_DIFF, data=updates[name], meta={MetaKey.NUM_STEPS_CURRENT_ROUND: weights[name]}
            )
            masked = SecureMaskFilter().process(result.to_shareable(), self.context(name))
            assert masked.get_return_code(ReturnCode.OK) == ReturnCode.OK
            assert self.server.receive_upload(MaskedUpload.from_dict(from_shareable(masked).data), sender=name) is None
        uploaded = self.server.consistency_targets()
        for name in uploaded:
            answer = run(
                CONSISTENCY_TASK, self.sites[name], self.context(name), {"round": round_number, "uploaded": uploaded}
            )
            assert self.server.receive_signature(name, answer["signature"]) is None
        requests = {name: r.to_dict() for name, r in self.server.unmask_requests().items()}
        responses = {
            name: run(UNMASK_TASK, self.sites[name], self.context(name), {"round": round_number, "requests": requests})[
                "shares"
            ]
            for name in requests
        }
        before = self.model_digest()
        result = self.server.finish(responses)
        if self.generator is not None:
            payload = {
                "round": result.round,
                "uploaded": result.uploaded,
                "layout": [[n, list(s), d] for n, s, d in result.layout],
                "blind_sum": result.blind_sum,
                "data_kind": DataKind.WEIGHT_DIFF,
            }
            self.generator.shareable_to_learnable(
                DXO(DataKind.COLLECTION, data=payload, meta={BLIND_META: True}).to_shareable(), FLContext()
            )
        else:
            self.model = {name: self.model[name] + result.mean[name] for name in self.model}
        self.ledger.append(round_record(round_number, before, self.model_digest(), result))
        return received, result


def updates_for(rng, shape=(4, 3)):
    return {name: {"w": rng.uniform(-0.5, 0.5, shape).astype(np.float32)} for name in SITES}


@pytest.fixture
def federation(tmp_path):
    initial = {"w": np.zeros((4, 3), np.float32)}
    return SiteFederation(tmp_path, SecureSumConfig(threshold=2, clip=1.0, max_weight=10.0, rounds=4), initial)


def test_rounds_through_the_site_components_give_the_mean_and_agreeing_ledgers(federation):
    rng = np.random.default_rng(0)
    weights = {"site-1": 1.0, "site-2": 2.0, "site-3": 5.0}
    expected = federation.model
    for round_number in range(2):
        updates = updates_for(rng)
        received, result = federation.round(round_number, updates, weights)
        for name in SITES:  # every site trains from the ledger's model
            np.testing.assert_array_equal(received[name].data["w"], expected["w"])
        mean = sum(weights[s] * updates[s]["w"].astype(np.float64) for s in SITES) / sum(weights.values())
        np.testing.assert_allclose(result.mean["w"], mean, atol=1e-6)
        expected = federation.model
    for name, site in federation.sites.items():
        kinds = [entry["kind"] for entry in site.ledger.records]
        assert kinds == ["setup"] + ["received", "masked", "signed", "revealed"] * 2
        assert cross_check(federation.ledger.records, site.ledger.records, name) is None
        on_disk = [
            json.loads(line) for line in (federation.roots[name] / JOB / "site_ledger.jsonl").read_text().splitlines()
        ]
        assert on_disk == site.ledger.records


def test_an_edited_ledger_record_halts_the_site(federation):
    rng = np.random.default_rng(1)
    weights = dict.fromkeys(SITES, 1.0)
    federation.round(0, updates_for(rng), weights)
    task = federation.task(1)
    records = task.get_header(LEDGER_HEADER)
    records[1]["accepted"]["site-2"] = "00" * 32  # the server claims another upload of site-2
    with pytest.raises(Exception, match="record 2 \\(round 0\\) was altered"):
        SecureTaskDataFilter().process(task, federation.context("site-1"))
    # ... and re-hashing it does not help: the next link breaks, or site-2's own record contradicts it
    records[1]["hash"] = record_hash(records[1])
    with pytest.raises(Exception, match="stopped taking part"):
        SecureTaskDataFilter().process(task, federation.context("site-1"))
    with pytest.raises(Exception, match="another upload of site-2"):
        SecureTaskDataFilter().process(copy.deepcopy(task), federation.context("site-2"))
    # a halted site masks nothing and reveals nothing
    result = DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros((4, 3), np.float32)}).to_shareable()
    assert SecureMaskFilter().process(result, federation.context("site-1")).get_return_code() != ReturnCode.OK
    assert (
        run(UNMASK_TASK, None, federation.context("site-1"), {"round": 0, "requests": {}}).get_return_code()
        != ReturnCode.OK
    )


def test_a_model_other_than_the_ledgers_halts_the_site(federation):
    rng = np.random.default_rng(2)
    federation.round(0, updates_for(rng), dict.fromkeys(SITES, 1.0))
    task = federation.task(1)
    swapped = DXO(DataKind.WEIGHTS, data={"w": np.ones((4, 3), np.float32)})
    swapped.update_shareable(task)
    with pytest.raises(Exception, match="is not the ledger's"):
        SecureTaskDataFilter().process(task, federation.context("site-3"))
    assert "not the ledger's" in federation.sites["site-3"].halted


def test_a_rewritten_history_halts_the_site(federation):
    rng = np.random.default_rng(3)
    federation.round(0, updates_for(rng), dict.fromkeys(SITES, 1.0))
    federation.round(1, updates_for(rng), dict.fromkeys(SITES, 1.0))
    task = federation.task(2)
    forged = Ledger()
    for record in task.get_header(LEDGER_HEADER)[:1]:
        forged.append(record)
    task.set_header(LEDGER_HEADER, forged.records)  # round 0 and 1 erased, a fresh chain from the setup
    with pytest.raises(Exception, match="no longer holds the records"):
        SecureTaskDataFilter().process(task, federation.context("site-1"))


def test_a_setting_below_the_sites_floor_is_refused_with_one_line(tmp_path, caplog):
    root = make_site_root(tmp_path, "site-1", SitePolicy(roster=tuple(f"site-{i}" for i in range(1, 6))))
    site = SecureSumSite()
    payload = {"config": SecureSumConfig(threshold=2).to_dict(), "job_id": JOB, "sites": ["site-1", "site-2"]}
    reply = run(ADVERTISE_TASK, site, site_context(root, "site-1", site), payload)
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and "advertisement" not in reply
    assert site.client is None  # no key was made
    assert (
        "refused secagg_advertise: site-1 refuses the secure-sum settings: the server asks for threshold 2"
        in caplog.text
    )


ROSTER = SitePolicy(roster=tuple(SITES))


def kit_root(tmp_path, files, policy=ROSTER):
    root = make_site_root(tmp_path, "site-1", policy)
    ca = make_ca()
    key_pem, cert_pem = make_site_kit(ca, "site-1", "ec")
    contents = {"client.key": key_pem, "client.crt": cert_pem, "rootCA.pem": ca_pem(ca)}
    for name in files:
        (root / "startup" / name).write_bytes(contents[name])
    return root, ca


@pytest.mark.parametrize("missing", ["client.crt", "client.key", "rootCA.pem"])
def test_a_required_kit_file_missing_refuses_the_job(tmp_path, missing, caplog):
    root, _ = kit_root(tmp_path, [n for n in ("client.key", "client.crt", "rootCA.pem") if n != missing])
    site = SecureSumSite()
    payload = {"config": SecureSumConfig(threshold=2).to_dict(), "job_id": JOB, "sites": SITES}
    reply = run(ADVERTISE_TASK, site, site_context(root, "site-1", site), payload)
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and site.client is None
    assert f"requires signed secure-sum advertisements but its startup kit lacks {missing}" in caplog.text


def test_a_kit_without_a_policy_file_refuses_the_job(tmp_path, caplog):
    root, _ = kit_root(tmp_path, ["client.key", "client.crt", "rootCA.pem"], policy=None)
    site = SecureSumSite()
    payload = {"config": SecureSumConfig(threshold=2).to_dict(), "job_id": JOB, "sites": SITES}
    assert run(ADVERTISE_TASK, site, site_context(root, "site-1", site), payload).get_return_code() != ReturnCode.OK
    assert "runs from a startup kit but has no secure-sum policy" in caplog.text


def test_a_kit_signs_the_advertisement_and_peers_check_it(tmp_path):
    root, ca = kit_root(tmp_path, ["client.key", "client.crt", "rootCA.pem"])
    site = SecureSumSite()
    payload = {"config": SecureSumConfig(threshold=2).to_dict(), "job_id": JOB, "sites": SITES}
    advert = Advertisement.from_dict(
        run(ADVERTISE_TASK, site, site_context(root, "site-1", site), payload)["advertisement"]
    )
    assert advert.kit_signature and site.client.require_signed and site.client.root_ca_pem == ca_pem(ca)
    server = SecureSumServer(JOB, SecureSumConfig(threshold=1, require_signed=True), ca_pem(ca))
    assert server.register_advertisements([advert])
    advert.share_public = bytes(32)  # swapped by someone in between
    with pytest.raises(Exception, match="does not match its signature"):
        server.register_advertisements([advert])


def test_the_mask_filter_passes_errors_and_never_sends_plaintext(tmp_path, federation):
    site = SecureSumSite()
    context = site_context(make_site_root(tmp_path, "site-9", None), "site-9", site)
    error = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert SecureMaskFilter().process(error, context) is error
    result = DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(3)}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 2}).to_shareable()
    out = SecureMaskFilter().process(result, context)  # no key setup on this site: nothing may leave
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and "'w'" not in str(out)
    # NaN in a real site's update: refused, the site counts as dropped, nothing leaves
    federation.server.start_round(0)
    SecureTaskDataFilter().process(federation.task(0), federation.context("site-1"))
    bad = DXO(DataKind.WEIGHT_DIFF, data={"w": np.full((4, 3), np.nan, np.float32)}).to_shareable()
    out = SecureMaskFilter().process(bad, federation.context("site-1"))
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and "nan" not in str(out).lower()


# -- server-blind: the server forwards group-masked aggregates, the sites hold the model


def plain_in(aggregate, fixed_point, total_weight, mean) -> bool:
    """Whether the modular aggregate reads as ``[total weight, total weight * mean]`` to 1e-3 in all but one value."""
    signed = np.asarray(aggregate).view(np.int32 if fixed_point.modulus_bits == 32 else np.int64)
    plain = np.concatenate([[total_weight], total_weight * np.ravel(mean)])
    return int(np.sum(np.abs(signed / fixed_point.scale - plain) >= 1e-3)) <= 1


def test_plain_in_recognises_an_unmasked_aggregate():
    fixed_point = SecureSumConfig(threshold=2, clip=1.0, max_weight=10.0).fixed_point(3)
    mean = np.linspace(-0.9, 0.9, 12)
    encoded = np.round(np.concatenate([[8.0], 8.0 * mean]) * fixed_point.scale).astype(np.int64)
    assert plain_in(encoded.astype(fixed_point.dtype), fixed_point, 8.0, mean)
    assert not plain_in((encoded + int(fixed_point.scale) // 64).astype(fixed_point.dtype), fixed_point, 8.0, mean)


@pytest.fixture
def blind_federation(tmp_path):
    rng = np.random.default_rng(1)
    initial = {"w": rng.uniform(-1, 1, (4, 3)).astype(np.float32)}
    config = SecureSumConfig(threshold=2, clip=1.0, max_weight=10.0, server_blind=True, rounds=4)
    return SiteFederation(tmp_path, config, initial, generator=BlindShareableGenerator())


def test_server_blind_rounds_the_server_sees_only_masked_sums_and_sites_rebuild_the_mean(blind_federation):
    fed = blind_federation
    rng = np.random.default_rng(5)
    initial = dict(fed.model)
    updates = updates_for(rng)
    weights = {"site-1": 1.0, "site-2": 2.0, "site-3": 5.0}
    received, result = fed.round(0, updates, weights)
    for name in SITES:  # round 0: every site gets the initial model as plain WEIGHTS
        assert received[name].data_kind == DataKind.WEIGHTS
        np.testing.assert_array_equal(received[name].data["w"], initial["w"])
    total = sum(weights.values())
    exact = sum(weights[s] * updates[s]["w"].astype(np.float64) for s in SITES) / total
    assert result.mean is None and not plain_in(result.blind_sum, fed.config.fixed_point(3), total, exact)
    assert fed.ledger.records[-1]["model_after"] == payload_model_digest({"aggregate": fed.generator.latest})
    received, _ = fed.round(1, updates, weights)  # the task carries the aggregate; each site unblinds it
    for name in SITES:
        np.testing.assert_allclose(received[name].data["w"], initial["w"] + exact, atol=1e-6)
        assert fed.sites[name].global_round == 0
    final = BlindModelLocator()
    engine = MagicMock()
    engine.get_component.return_value = fed.generator
    server_context = FLContext()
    server_context.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=True)
    dxo = final.locate_model(final.get_model_names(server_context)[0], server_context)
    for name in SITES:  # the final ledger, then the validate task: the model after both rounds, as the ledger says
        assert run(LEDGER_TASK, None, fed.context(name), {"ledger": fed.ledger.records}).get_return_code() == "OK"
        context = fed.context(name, task_name="validate")
        weights_now = from_shareable(SecureTaskDataFilter().process(dxo.to_shareable(), context)).data["w"]
        np.testing.assert_allclose(weights_now, initial["w"] + 2 * exact, atol=2e-6)
        assert fed.sites[name].ledger.records[-1] == {
            **fed.sites[name].ledger.records[-1],
            "kind": "validated",
            "is_ledger_final_model": True,
        }


def test_a_site_that_missed_an_aggregate_refuses_to_guess_the_model(blind_federation):
    fed = blind_federation
    rng = np.random.default_rng(6)
    fed.round(0, updates_for(rng), dict.fromkeys(SITES, 1.0))
    fed.round(1, updates_for(rng), dict.fromkeys(SITES, 1.0))
    late = fed.sites["site-2"]
    late.global_round = -1  # its copy is still the initial model: it missed round 0's aggregate
    with pytest.raises(Exception, match="missed an aggregate"):
        SecureTaskDataFilter().process(fed.task(2), fed.context("site-2"))


def test_blind_generator_refuses_plaintext_and_needs_seeds():
    generator = BlindShareableGenerator()
    with pytest.raises(ValueError, match="no group seeds"):
        generator.learnable_to_shareable(make_model_learnable({"w": np.zeros(2)}, {}), FLContext())
    with pytest.raises(ValueError, match="plaintext aggregate"):
        generator.shareable_to_learnable(DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros(2)}).to_shareable(), FLContext())


@pytest.mark.parametrize("blind_workflow", [True, False])
def test_the_workflow_refuses_a_server_blind_half_configuration(blind_workflow):
    from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

    from pharmafl.flare.state_persistor import NumpyStatePersistor

    generator = FullModelShareableGenerator() if blind_workflow else BlindShareableGenerator()
    components = {"persistor": NumpyStatePersistor(), "generator": generator}
    workflow = SecureSumWorkflow(secure_sum={"server_blind": blind_workflow}, shareable_generator_id="generator")
    engine = MagicMock()
    engine.get_component.side_effect = components.get
    context = FLContext()
    context.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=True)
    panics = []
    workflow.system_panic = lambda reason, fl_ctx: panics.append(reason)
    workflow.start_controller(context)
    assert len(panics) == 1 and "BlindShareableGenerator" in panics[0] and f"server_blind={blind_workflow}" in panics[0]


def test_the_workflow_refuses_bad_settings_with_the_numbers():
    with pytest.raises(ValueError, match="could overflow"):
        SecureSumWorkflow(secure_sum={"clip": 1e3, "max_weight": 1e6, "modulus_bits": 32, "fraction_bits": 8})
    with pytest.raises(ValueError, match="only linear aggregation"):
        SecureSumWorkflow(secure_sum={"server_blind": True}, aggregation="fra-lora")
    with pytest.raises(ValueError, match="unknown secure_sum settings"):
        SecureSumWorkflow(secure_sum={"threshhold": 3})
    with pytest.raises(ValueError, match="train_timeout must be an integer >= 1"):
        SecureSumWorkflow(train_timeout=0)
