import copy
from unittest.mock import MagicMock

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from pharmafl.aggregation.secure_sum.keys import Advertisement
from pharmafl.aggregation.secure_sum.protocol import SecureSumClient, SecureSumConfig
from pharmafl.flare.secure_sum_aggregator import BLIND_META, SECURE_META, MaskedSecureSumAggregator
from pharmafl.flare.secure_sum_blind import BlindModelLocator, BlindShareableGenerator, SecureBlindFilter
from pharmafl.flare.secure_sum_client import SecureMaskFilter, SecureSumSite

SITES = ["site-1", "site-2", "site-3"]


def server_context(round_number=0):
    context = FLContext()
    context.set_prop(AppConstants.CURRENT_ROUND, round_number, private=True, sticky=True)
    context.set_prop(ReservedKey.RUN_NUM, "job-1", private=True, sticky=True)
    return context


def masked_result(client: SecureSumClient, update, round_number, participants):
    upload = client.mask(update, 2.0, round_number, participants)
    shareable = DXO(DataKind.COLLECTION, data=upload.to_dict(), meta={SECURE_META: DataKind.WEIGHT_DIFF}).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: client.site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_number)
    return shareable


@pytest.fixture
def federation():
    aggregator = MaskedSecureSumAggregator(clip=1.0, max_weight=10.0)
    context = server_context()
    config = aggregator.configure(len(SITES), 6, context)
    assert config.threshold == 2  # majority of 3
    clients = {site: SecureSumClient(site, "job-1", SecureSumConfig(**config.to_dict())) for site in SITES}
    adverts = aggregator.register_advertisements([c.advertise().to_dict() for c in clients.values()], context)
    for site, client in clients.items():
        aggregator.register_key_shares(site, client.share_keys([Advertisement.from_dict(a) for a in adverts]), context)
    return aggregator, clients, context


def test_full_round_through_the_adapter(federation):
    aggregator, clients, context = federation
    participants = aggregator.start_round(context)
    rng = np.random.default_rng(0)
    updates = {site: {"w": rng.uniform(-1, 1, (4, 3)).astype(np.float32)} for site in SITES}
    for site in SITES:
        assert aggregator.accept(masked_result(clients[site], updates[site], 0, participants), context)
    requests = aggregator.unmask_requests(context)
    from pharmafl.aggregation.secure_sum.protocol import UnmaskRequest

    responses = {site: clients[site].unmask(UnmaskRequest.from_dict(r)) for site, r in requests.items()}
    aggregator.finish(responses, context)
    dxo = from_shareable(aggregator.aggregate(context))
    assert dxo.data_kind == DataKind.WEIGHT_DIFF and dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 6.0
    expected = np.mean([updates[s]["w"] for s in SITES], axis=0)
    np.testing.assert_allclose(dxo.data["w"], expected, atol=1e-6)


def test_plaintext_stale_and_impersonated_uploads_are_rejected(federation):
    aggregator, clients, context = federation
    participants = aggregator.start_round(context)
    plain = DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros((4, 3))}).to_shareable()
    plain.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
    assert not aggregator.accept(plain, context)
    stale = masked_result(clients["site-1"], {"w": np.zeros((4, 3))}, 5, participants)
    assert not aggregator.accept(stale, context)
    impostor = masked_result(clients["site-2"], {"w": np.zeros((4, 3))}, 0, participants)
    impostor.set_peer_props({ReservedKey.IDENTITY_NAME: "site-3"})
    assert not aggregator.accept(impostor, context)


def test_a_round_that_cannot_be_unmasked_gives_an_empty_update(federation):
    aggregator, clients, context = federation
    participants = aggregator.start_round(context)
    assert aggregator.accept(masked_result(clients["site-1"], {"w": np.ones((4, 3))}, 0, participants), context)
    with pytest.raises(Exception, match="only 1 valid uploads"):
        aggregator.unmask_requests(context)
    aggregator.fail_round("too few uploads", context)
    assert from_shareable(aggregator.aggregate(context)).data == {}
    assert aggregator.round_record()["status"] == "failed"


def test_bad_settings_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match="could overflow"):
        MaskedSecureSumAggregator(clip=1e3, max_weight=1e6, modulus_bits=32, fraction_bits=8)
    with pytest.raises(ValueError, match="server_blind works only with linear aggregation .* not 'fra-lora'"):
        MaskedSecureSumAggregator(server_blind=True, aggregation="fra-lora")
    with pytest.raises(ValueError, match="threshold 5 is larger than the 3 sites"):
        MaskedSecureSumAggregator(threshold=5).configure(3, 1, server_context())
    with pytest.raises(ValueError, match="fault for site-1"):
        SecureSumSite(faults={"site-1": "explode"})


def test_mask_filter_passes_errors_and_never_sends_plaintext_without_keys(fl_ctx):
    site = SecureSumSite()
    fl_ctx.get_engine().get_component.return_value = site
    mask_filter = SecureMaskFilter()
    error = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert mask_filter.process(error, fl_ctx) is error
    result = DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(3)}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 2}).to_shareable()
    out = mask_filter.process(result, fl_ctx)  # no key setup on this site: nothing may leave
    assert isinstance(out, Shareable) and out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "w" not in str(out)


def test_startup_kit_signs_the_advertisement_and_the_server_checks_it(fl_ctx, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "secure_sum"))
    from secagg_kit import ca_pem, make_ca, make_site_kit

    ca = make_ca()
    key_pem, cert_pem = make_site_kit(ca, "site-1", "ec")
    startup = tmp_path / "startup"
    startup.mkdir()
    (startup / "client.key").write_bytes(key_pem)
    (startup / "client.crt").write_bytes(cert_pem)
    (startup / "rootCA.pem").write_bytes(ca_pem(ca))
    fl_ctx.get_engine().get_workspace.return_value.get_root_dir.return_value = str(tmp_path)

    aggregator = MaskedSecureSumAggregator(threshold=1, require_signed=True, root_ca_path=str(startup / "rootCA.pem"))
    config = aggregator.configure(1, 1, server_context())
    site = SecureSumSite(min_threshold=1)
    task = Shareable()
    task.update({"config": config.to_dict(), "job_id": "job-1"})
    advert = Advertisement.from_dict(site.advertise(task, fl_ctx)["advertisement"])
    assert advert.kit_signature and advert.kit_certificate == cert_pem
    assert aggregator.register_advertisements([advert.to_dict()], server_context())
    advert.share_public = bytes(32)  # swapped by someone in between
    with pytest.raises(Exception, match="does not match its signature"):
        aggregator.register_advertisements([advert.to_dict()], server_context())
    # a site refuses a threshold below its minimum
    with pytest.raises(Exception, match="below this site's minimum 2"):
        SecureSumSite().advertise(task, fl_ctx)


# -- server-blind: the server forwards group-masked aggregates, the sites hold the model


def site_context(site, component):
    engine = MagicMock()
    engine.get_component.return_value = component
    context = FLContext()
    context.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=True)
    context.set_prop(ReservedKey.IDENTITY_NAME, site, private=True, sticky=True)
    context.set_prop(ReservedKey.RUN_NUM, "job-1", private=True, sticky=True)
    return context


@pytest.fixture
def blind_federation(tmp_path):
    """A server-blind aggregator, its generator and locator on a mocked server engine; three SecureSumSites."""
    aggregator = MaskedSecureSumAggregator(clip=1.0, max_weight=10.0, server_blind=True)
    generator, locator = BlindShareableGenerator(), BlindModelLocator()
    server = server_context()
    components = {"aggregator": aggregator, "shareable_generator": generator, "model_locator": locator}
    engine = MagicMock()
    engine.get_component.side_effect = components.get
    engine.get_workspace.return_value.get_run_dir.return_value = str(tmp_path)
    server.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=True)
    config = aggregator.configure(len(SITES), 4, server)
    sites = {site: SecureSumSite(use_startup_kit=False) for site in SITES}
    contexts = {site: site_context(site, sites[site]) for site in SITES}
    setup = Shareable()
    setup.update({"config": config.to_dict(), "job_id": "job-1"})
    adverts = [sites[s].advertise(setup, contexts[s])["advertisement"] for s in SITES]
    checked = Shareable()
    checked["advertisements"] = aggregator.register_advertisements(adverts, server)
    for site in SITES:
        aggregator.register_key_shares(site, sites[site].share_keys(checked, contexts[site])["key_shares"], server)
    return aggregator, generator, locator, server, sites, contexts


def blind_round(federation, task_data, updates, weights):
    """One server-blind round: every site opens the task, masks its update; the server unmasks and aggregates."""
    aggregator, generator, _, server, sites, contexts = federation
    server.set_prop(AppConstants.CURRENT_ROUND, task_data.get_header(AppConstants.CURRENT_ROUND), private=True)
    participants = aggregator.start_round(server)
    received = {}
    for site in SITES:
        data = SecureBlindFilter().process(copy.deepcopy(task_data), contexts[site])
        received[site] = from_shareable(data)
        sites[site].round, sites[site].participants = data.get_header(AppConstants.CURRENT_ROUND), participants
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: weights[site]}
        result = DXO(DataKind.WEIGHT_DIFF, data=updates[site], meta=meta).to_shareable()
        masked = SecureMaskFilter().process(result, contexts[site])
        masked.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        masked.add_cookie(AppConstants.CONTRIBUTION_ROUND, sites[site].round)
        assert aggregator.accept(masked, server)
    responses = {}
    for site, request in aggregator.unmask_requests(server).items():
        data = Shareable()
        data["requests"] = {site: request}
        responses[site] = sites[site].unmask(data, contexts[site])["shares"]
    aggregator.finish(responses, server)
    return received, aggregator.aggregate(server)


def plain_in(aggregate, fixed_point, total_weight, mean) -> bool:
    """Whether the modular aggregate reads as ``[total weight, total weight * mean]`` to 1e-3 in all but 1 + 0.1% of
    its values; a uniformly random value is that close with probability 2e-3 * scale / 2^bits (1e-7 at most here)."""
    signed = np.asarray(aggregate).view(np.int32 if fixed_point.modulus_bits == 32 else np.int64)
    plain = np.concatenate([[total_weight], total_weight * np.ravel(mean)])
    return int(np.sum(np.abs(signed / fixed_point.scale - plain) >= 1e-3)) <= 1


def test_plain_in_recognises_an_unmasked_aggregate():
    fixed_point = MaskedSecureSumAggregator(clip=1.0, max_weight=10.0).configure(3, 1, server_context()).fixed_point(3)
    mean = np.linspace(-0.9, 0.9, 12)
    encoded = np.round(np.concatenate([[8.0], 8.0 * mean]) * fixed_point.scale).astype(np.int64)
    assert plain_in(encoded.astype(fixed_point.dtype), fixed_point, 8.0, mean)
    assert not plain_in((encoded + int(fixed_point.scale) // 64).astype(fixed_point.dtype), fixed_point, 8.0, mean)


def next_task(federation, model, round_number):
    _, generator, _, server, _, _ = federation
    task_data = generator.learnable_to_shareable(model, server)
    task_data.set_header(AppConstants.CURRENT_ROUND, round_number)
    return task_data


def test_server_blind_round_server_sees_only_the_masked_sum_and_sites_rebuild_the_mean(blind_federation):
    aggregator, generator, locator, server, sites, contexts = blind_federation
    rng = np.random.default_rng(1)
    initial = make_model_learnable({"w": rng.uniform(-1, 1, (4, 3)).astype(np.float32)}, {})
    server.set_prop(AppConstants.GLOBAL_MODEL, initial, private=True, sticky=True)
    updates = {site: {"w": rng.uniform(-0.5, 0.5, (4, 3)).astype(np.float32)} for site in SITES}
    weights = {"site-1": 1.0, "site-2": 2.0, "site-3": 5.0}
    received, aggregated = blind_round(blind_federation, next_task(blind_federation, initial, 0), updates, weights)
    for site in SITES:  # round 0: every site gets the initial model as plain WEIGHTS
        assert received[site].data_kind == DataKind.WEIGHTS
        np.testing.assert_array_equal(received[site].data["w"], initial["weights"]["w"])

    # the server's result is opaque: read as fixed point it is not [total weight, weighted sum]
    blind = from_shareable(aggregated)
    assert blind.get_meta_prop(BLIND_META) and blind.data["uploaded"] == SITES
    total = sum(weights.values())
    exact = sum(weights[s] * updates[s]["w"].astype(np.float64) for s in SITES) / total
    assert not plain_in(blind.data["blind_sum"], aggregator.config.fixed_point(len(SITES)), total, exact)
    assert aggregator.round_record()["total_weight"] is None
    # ... and the server's model does not change
    model = generator.shareable_to_learnable(aggregated, server)
    np.testing.assert_array_equal(model["weights"]["w"], initial["weights"]["w"])

    # round 1: the task carries the aggregate; each site unblinds it and trains from the same updated model
    received, _ = blind_round(blind_federation, next_task(blind_federation, model, 1), updates, weights)
    for site in SITES:
        assert received[site].data_kind == DataKind.WEIGHTS
        np.testing.assert_allclose(received[site].data["w"], initial["weights"]["w"] + exact, atol=1e-6)
        assert sites[site].global_round == 0
    # a failed round adds nothing: the next task re-sends round 1's aggregate, the final validate task sees it once
    aggregator.fail_round("too few uploads", server)
    generator.shareable_to_learnable(aggregator.aggregate(server), server)
    final = locator.locate_model(locator.get_model_names(server)[0], server)
    assert final.data["aggregate"]["round"] == 1 and final.data["aggregate"]["previous"] == 0
    after = {}
    for _ in range(2):
        for site in SITES:
            after[site] = from_shareable(SecureBlindFilter().process(final.to_shareable(), contexts[site])).data["w"]
    expected = initial["weights"]["w"] + exact + exact  # the same updates and weights in both rounds
    for site in SITES:
        np.testing.assert_allclose(after[site], expected, atol=2e-6)
        assert sites[site].global_round == 1


def test_a_site_that_missed_an_aggregate_refuses_to_guess_the_model(blind_federation):
    _, generator, _, server, sites, contexts = blind_federation
    initial = make_model_learnable({"w": np.zeros((4, 3), np.float32)}, {})
    updates = {site: {"w": np.full((4, 3), 0.25, np.float32)} for site in SITES}
    weights = dict.fromkeys(SITES, 1.0)
    _, aggregated = blind_round(blind_federation, next_task(blind_federation, initial, 0), updates, weights)
    generator.shareable_to_learnable(aggregated, server)
    late = SecureSumSite(use_startup_kit=False)
    late.client, late.global_model, late.global_round = sites["site-2"].client, {"w": np.zeros((4, 3))}, None
    context = site_context("site-2", late)
    with pytest.raises(Exception, match="missed an aggregate"):
        SecureBlindFilter().process(next_task(blind_federation, initial, 1), context)
    # plaintext task data (not a blind payload) passes unchanged
    plain = DXO(DataKind.WEIGHTS, data={"w": np.ones(2)}).to_shareable()
    assert SecureBlindFilter().process(plain, context) is plain


def test_blind_generator_needs_a_server_blind_aggregator():
    generator = BlindShareableGenerator()
    context = server_context()
    engine = MagicMock()
    engine.get_component.return_value = MaskedSecureSumAggregator()
    context.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=True)
    with pytest.raises(ValueError, match="server_blind true"):
        generator.learnable_to_shareable(make_model_learnable({"w": np.zeros(2)}, {}), context)
    with pytest.raises(ValueError, match="plaintext aggregate"):
        generator.shareable_to_learnable(DXO(DataKind.WEIGHT_DIFF, data={"w": np.zeros(2)}).to_shareable(), context)


@pytest.mark.parametrize("blind_aggregator", [True, False])
def test_scatter_and_gather_refuses_a_server_blind_half_configuration(blind_aggregator):
    from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

    from pharmafl.flare.secure_sum_controllers import SecureScatterAndGather

    generator = FullModelShareableGenerator() if blind_aggregator else BlindShareableGenerator()
    components = {"aggregator": MaskedSecureSumAggregator(server_blind=blind_aggregator), "generator": generator}
    controller = SecureScatterAndGather(
        min_clients=2, num_rounds=1, aggregator_id="aggregator", shareable_generator_id="generator", persistor_id=""
    )
    controller._engine = MagicMock()
    controller._engine.get_component.side_effect = components.get
    panics = []
    controller.system_panic = lambda reason, fl_ctx: panics.append(reason)
    controller.start_controller(server_context())
    assert len(panics) == 1 and "BlindShareableGenerator" in panics[0]
    assert f"server_blind={blind_aggregator}" in panics[0]
    # the matching pair starts without complaint
    components["generator"] = BlindShareableGenerator() if blind_aggregator else FullModelShareableGenerator()
    panics.clear()
    controller.start_controller(server_context())
    assert panics == []
