import json
from collections import Counter

import numpy as np
import pytest

from pharmafl.binding_sites.dataset import ProteinSplit, load_client, load_common_test
from pharmafl.binding_sites.splits import SplitConfig, prepare_binding_sites
from pharmafl.core.errors import InputError
from pharmafl.core.manifest import sha256_file


def synthetic_file(path, n, rate_of, prefix, length=40, seed=0):
    """`n` distinct chains in three-line format; chain i has about rate_of(i) of its residues labelled 1."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        sequence = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=length))
        labels = (rng.random(length) < rate_of(i)).astype(int)
        lines += [f">{prefix}{i}", sequence, "".join(map(str, labels))]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def two_sources(tmp_path):
    low = synthetic_file(tmp_path / "LOW_train.txt", 120, lambda i: 0.02, "low", seed=1)
    mixed = synthetic_file(tmp_path / "MIX_train.txt", 80, lambda i: 0.05 + 0.5 * (i % 2), "mix", seed=2)
    return [low, mixed]


def placements(out_dir, names):
    """(source, id) -> list of places it was written to."""
    where = {}
    for name in names:
        for part in ("train", "test"):
            for chain in load_client(str(out_dir / name), part):
                where.setdefault((chain.source, chain.id), []).append(f"{name}/{part}")
    for chain in load_common_test(str(out_dir)):
        where.setdefault((chain.source, chain.id), []).append("common_test")
    return where


def test_iid_sizes_and_every_chain_in_exactly_one_place(two_sources, tmp_path):
    out = tmp_path / "out"
    summary = prepare_binding_sites(two_sources, str(out), SplitConfig(clients=2, test_fraction=0.2), progress=None)
    assert summary["chains"] == 200 and summary["common_test"]["chains"] == 40
    # Common test set stratified by source: 20% of each input.
    assert summary["common_test"]["sources"] == {"LOW_train": 24, "MIX_train": 16}
    sizes = [c["train"]["chains"] + c["test"]["chains"] for c in summary["clients"].values()]
    assert sizes == [80, 80]
    assert all(c["test"]["chains"] == 16 for c in summary["clients"].values())
    where = placements(out, ["site-1", "site-2"])
    assert len(where) == 200 and all(len(places) == 1 for places in where.values())


def test_label_skew_puts_low_rates_on_client_1(two_sources, tmp_path):
    config = SplitConfig(clients=2, split="label-skew", test_fraction=0.1)
    summary = prepare_binding_sites(two_sources, str(tmp_path / "out"), config, progress=None)
    one, two = (summary["clients"][name]["train"] for name in ("site-1", "site-2"))
    assert one["mean_chain_positive_rate"] < 0.5 * two["mean_chain_positive_rate"]
    assert one["positive_rate"] < 0.5 * two["positive_rate"]


def test_label_skew_ratios_control_the_mix(tmp_path):
    # Rate = chain index / 100: the low half is chains 0..49, the high half 50..99.
    path = synthetic_file(tmp_path / "RAMP_train.txt", 100, lambda i: i / 100, "c", length=200)
    config = SplitConfig(clients=2, split="label-skew", test_fraction=0.0, skew_ratios=(0.2, 0.8))
    out = tmp_path / "out"
    prepare_binding_sites([path], str(out), config, progress=None)
    high = {f"c{i}" for i in range(50, 100)}
    share = [np.mean([c.id in high for c in load_client(str(out / name))]) for name in ("site-1", "site-2")]
    assert share == pytest.approx([0.2, 0.8], abs=0.04)
    skew = [ProteinSplit(load_client(str(out / name))).mean_chain_positive_rate for name in ("site-1", "site-2")]
    assert skew[1] - skew[0] > 0.25  # expected 0.3: 0.2 * 0.75 + 0.8 * 0.25 against the mirror image
    iid = tmp_path / "iid"
    prepare_binding_sites([path], str(iid), SplitConfig(test_fraction=0.0), progress=None)
    rates = [ProteinSplit(load_client(str(iid / name))).mean_chain_positive_rate for name in ("site-1", "site-2")]
    assert abs(rates[1] - rates[0]) < 0.15


def test_label_skew_with_three_clients_runs_from_low_to_high(two_sources, tmp_path):
    config = SplitConfig(clients=3, split="label-skew")
    summary = prepare_binding_sites(two_sources, str(tmp_path / "out"), config, progress=None)
    rates = [c["train"]["mean_chain_positive_rate"] for c in summary["clients"].values()]
    assert rates[0] < rates[1] < rates[2]


def test_by_source_gives_each_input_its_own_client(two_sources, tmp_path):
    out = tmp_path / "out"
    config = SplitConfig(clients=5, split="by-source", client_names=["low", "mix"])
    messages = []
    summary = prepare_binding_sites(two_sources, str(out), config, progress=messages.append)
    assert list(summary["clients"]) == ["low", "mix"]
    assert summary["clients"]["low"]["train"]["sources"] == {"LOW_train": 77}
    assert summary["clients"]["mix"]["test"]["sources"] == {"MIX_train": 13}
    assert set(placements(out, ["low", "mix"])) == {("LOW_train", f"low{i}") for i in range(120)} | {
        ("MIX_train", f"mix{i}") for i in range(80)
    }
    # Default names, and the ignored clients option is reported.
    summary = prepare_binding_sites(
        two_sources, str(tmp_path / "b"), SplitConfig(split="by-source", clients=3), progress=None
    )
    assert list(summary["clients"]) == ["site-1", "site-2"] and "ignored" in summary["notes"][0]
    with pytest.raises(InputError, match="one client name per client"):
        prepare_binding_sites(two_sources, str(tmp_path / "c"), SplitConfig(split="by-source", client_names=["a"]))


def test_a_sequence_never_straddles_training_and_a_test_set(tmp_path):
    # The same 30 sequences under two sources (like one chain listed under ATP and MG), plus 30 of its own.
    shared = synthetic_file(tmp_path / "A_train.txt", 30, lambda i: 0.1, "p", seed=5)
    text = open(shared).read()
    (tmp_path / "B_train.txt").write_text(
        text + open(synthetic_file(tmp_path / "tmp.txt", 30, lambda i: 0.1, "q")).read()
    )
    inputs = [shared, str(tmp_path / "B_train.txt")]
    for split in ("iid", "by-source"):
        out = tmp_path / split
        summary = prepare_binding_sites(inputs, str(out), SplitConfig(split=split, test_fraction=0.3), progress=None)
        assert summary["chains_sharing_a_sequence"] == 60
        kinds = {}
        for name in summary["clients"]:
            for part in ("train", "test"):
                for chain in load_client(str(out / name), part):
                    kinds.setdefault(chain.sequence, set()).add(part)
        for chain in load_common_test(str(out)):
            kinds.setdefault(chain.sequence, set()).add("common")
        assert all(len(parts) == 1 for parts in kinds.values()), split


def test_same_seed_same_split_other_seed_other_split(two_sources, tmp_path):
    def run(name, seed):
        prepare_binding_sites(two_sources, str(tmp_path / name), SplitConfig(seed=seed), progress=None)
        return {part: (tmp_path / name / "site-1" / f"{part}.jsonl").read_bytes() for part in ("train", "test")}

    first = run("a", 0)
    assert first == run("b", 0)
    assert run("c", 1) != first


def test_files_manifest_and_summary(two_sources, tmp_path):
    out = tmp_path / "out"
    config = SplitConfig(max_length=30, max_chains_per_input=50)
    summary = prepare_binding_sites(two_sources, str(out), config, progress=None)
    assert summary["chains"] == 100 and summary["not_used"] == 100 and summary["cropped"] == 200
    assert json.loads((out / "summary.json").read_text()) == summary
    manifest = json.loads((out / "site-1" / "manifest.json").read_text())
    assert manifest["client"] == "site-1" and manifest["parameters"]["max_length"] == 30
    assert set(manifest["train"]) >= {"chains", "residues", "positives", "positive_rate", "sources"}
    assert manifest["sha256"]["train.jsonl"] == sha256_file(out / "site-1" / "train.jsonl")
    assert [item["source"] for item in manifest["inputs"]] == ["LOW_train", "MIX_train"]
    record = json.loads((out / "site-1" / "train.jsonl").read_text().splitlines()[0])
    assert set(record) == {"id", "sequence", "labels", "source"} and len(record["labels"]) == 30
    chains = load_client(str(out / "site-1"), "train", verify=True)
    assert ProteinSplit(chains).stats() == manifest["train"]
    assert all(len(c) == 30 for c in chains)


def test_configuration_errors(two_sources, tmp_path):
    out = str(tmp_path / "out")
    cases = [
        (SplitConfig(split="random"), "split must be"),
        (SplitConfig(clients=0), "at least 1"),
        (SplitConfig(split="label-skew", clients=1), "at least 2 clients"),
        (SplitConfig(split="label-skew", skew_ratios=(0.3, 0.9)), "sum to 1"),
        (SplitConfig(test_fraction=1.0), "test fraction"),
        (SplitConfig(client_names=["a", "a"]), "distinct"),
        (SplitConfig(client_names=["a", "b/c"]), "may only use"),
        (SplitConfig(client_names=["a", "common_test"]), "common test"),
        (SplitConfig(clients=500), "no training chains"),
    ]
    for config, message in cases:
        with pytest.raises(InputError, match=message):
            prepare_binding_sites(two_sources, out, config, progress=None)
    with pytest.raises(InputError, match="distinct names"):
        prepare_binding_sites([two_sources[0], two_sources[0]], out, SplitConfig(), progress=None)
    with pytest.raises(InputError, match="Give at least one input"):
        prepare_binding_sites([], out, SplitConfig(), progress=None)


def test_load_errors(tmp_path, gpsite_small):
    with pytest.raises(InputError) as error:
        load_client(str(tmp_path / "nowhere"))
    assert str(error.value) == (
        f"No prepared data for client at '{tmp_path / 'nowhere'}' (missing train.jsonl); "
        "run `pharmafl prepare binding-sites` first."
    )
    with pytest.raises(InputError, match="common test"):
        load_common_test(str(tmp_path))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{}")
    (damaged / "train.jsonl").write_text('{"id": "a", "sequence": "MKT", "labels": "01"}\n')
    with pytest.raises(InputError, match="line 1 is not a valid chain record"):
        load_client(str(damaged))
    with pytest.raises(InputError, match="no checksums"):
        load_client(str(damaged), verify=True)


# --- the real GPSite files, prepared once per session -------------------------------------------------


def test_gpsite_small_round_trips(gpsite_small):
    summary = json.loads((gpsite_small / "summary.json").read_text())
    assert summary["chains"] == 120 and summary["not_used"] == (347 - 60) + (176 - 60)
    seen = Counter()
    for name in ("site-1", "site-2"):
        manifest = json.loads((gpsite_small / name / "manifest.json").read_text())
        for part in ("train", "test"):
            chains = load_client(str(gpsite_small / name), part, verify=True)
            assert ProteinSplit(chains).stats() == manifest[part] == summary["clients"][name][part]
            assert all(len(c) <= 256 and len(c.labels) == len(c) for c in chains)
            seen.update((c.source, c.id) for c in chains)
    common = load_common_test(str(gpsite_small), verify=True)
    seen.update((c.source, c.id) for c in common)
    assert len(common) == summary["common_test"]["chains"] >= 24
    assert sum(seen.values()) == len(seen) == 120
    assert {source for source, _ in seen} == {"ATP_train", "HEM_train"}


def test_re_preparing_with_fewer_clients_leaves_exactly_the_new_clients(two_sources, tmp_path):
    out = tmp_path / "out"
    prepare_binding_sites(two_sources, str(out), SplitConfig(clients=3), progress=None)
    with pytest.raises(InputError, match="--overwrite"):
        prepare_binding_sites(two_sources, str(out), SplitConfig(clients=2), progress=None)
    assert (out / "site-3").is_dir()
    prepare_binding_sites(two_sources, str(out), SplitConfig(clients=2), progress=None, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["common_test", "site-1", "site-2"]


def test_a_validation_share_comes_out_of_training_only_by_group(tmp_path):
    """val_fraction holds out part of each client's training chains; the test sets and common test set stay as they
    were without it, and no sequence straddles validation and any training set."""
    low = synthetic_file(tmp_path / "LOW_train.txt", 120, lambda i: 0.02, "low", seed=1)
    mixed = synthetic_file(tmp_path / "MIX_train.txt", 80, lambda i: 0.05 + 0.5 * (i % 2), "mix", seed=2)
    lines = (tmp_path / "MIX_train.txt").read_text().splitlines()
    (tmp_path / "MIX_train.txt").write_text("\n".join(lines + [">dup", lines[1], lines[2]]) + "\n")  # a shared sequence
    inputs = [low, mixed]
    plain, held = tmp_path / "plain", tmp_path / "held"
    prepare_binding_sites(inputs, str(plain), SplitConfig(clients=2, split="by-source"), progress=None)
    summary = prepare_binding_sites(
        inputs, str(held), SplitConfig(clients=2, split="by-source", val_fraction=0.25), progress=None
    )
    assert not (plain / "site-1" / "val.jsonl").exists()
    ids = lambda chains: [(c.source, c.id) for c in chains]  # noqa: E731
    assert ids(load_common_test(str(plain))) == ids(load_common_test(str(held)))
    for site in ("site-1", "site-2"):
        assert ids(load_client(str(plain / site), "test")) == ids(load_client(str(held / site), "test"))
        train, val = load_client(str(held / site), "train"), load_client(str(held / site), "val")
        plain_train = {c.id for c in load_client(str(plain / site), "train")}
        train_ids, val_ids = {c.id for c in train}, {c.id for c in val}
        assert train_ids | val_ids == plain_train and not train_ids & val_ids
        assert 0.15 <= len(val) / len(plain_train) <= 0.35
        assert summary["clients"][site]["val"]["chains"] == len(val)
        assert "val.jsonl" in json.loads((held / site / "manifest.json").read_text())["sha256"]
    val_sequences = {c.sequence for s in ("site-1", "site-2") for c in load_client(str(held / s), "val")}
    train_sequences = {c.sequence for s in ("site-1", "site-2") for c in load_client(str(held / s), "train")}
    assert not val_sequences & train_sequences
    with pytest.raises(InputError, match="validation fraction"):
        prepare_binding_sites(inputs, str(tmp_path / "bad"), SplitConfig(val_fraction=1.0), progress=None)
