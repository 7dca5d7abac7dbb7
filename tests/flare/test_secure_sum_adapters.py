import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from pharmafl.aggregation.secure_sum.keys import Advertisement
from pharmafl.aggregation.secure_sum.protocol import SecureSumClient, SecureSumConfig
from pharmafl.flare.secure_sum_aggregator import SECURE_META, MaskedSecureSumAggregator
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
    with pytest.raises(ValueError, match="server_blind"):
        MaskedSecureSumAggregator(server_blind=True)
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
