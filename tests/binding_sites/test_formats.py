import gzip
import json

import numpy as np
import pytest

from pharmafl.binding_sites.formats import ESM_ALPHABET, Chain, crop, read_chains, source_name
from pharmafl.core.errors import InputError

THREELINE = """>good_A
MKTAY
01100
>mismatch_A
MKT
0110
>empty_A

>badlabel_A
MKTA
01x0
>stop_A
MKT*
0100
>lower_A
mktay
00001
>rare_A
MXUBZO
010101
>good_A
MKTAY
00000
"""


def write(path, text):
    path.write_text(text)
    return str(path)


# --- formats ------------------------------------------------------------------------------------------


def test_threeline_keeps_good_chains_and_counts_each_skip(tmp_path):
    chains, counts = read_chains(write(tmp_path / "ATP_train.txt", THREELINE))
    assert [c.id for c in chains] == ["good_A", "lower_A", "rare_A"]
    assert counts["format"] == "threeline"
    assert counts["records"] == 8 and counts["kept"] == 3
    assert counts["skipped"] == {
        "malformed": 0,
        "empty": 1,
        "missing_labels": 0,
        "duplicate_ids": 1,
        "invalid_labels": 1,
        "unknown_residues": 1,
        "length_mismatch": 1,
    }
    good = chains[0]
    assert good.sequence == "MKTAY" and good.source == "ATP_train"
    assert good.labels.dtype == np.int8 and good.labels.tolist() == [0, 1, 1, 0, 0]
    assert good.positives == 2 and good.positive_rate == pytest.approx(0.4)
    # The first record of a repeated id wins; the later one does not replace it.
    assert good.labels.sum() == 2


def test_lowercase_upper_cased_and_rare_residues_kept_in_place(tmp_path):
    chains, _ = read_chains(write(tmp_path / "x.txt", THREELINE))
    by_id = {c.id: c for c in chains}
    assert by_id["lower_A"].sequence == "MKTAY"
    assert by_id["rare_A"].sequence == "MXUBZO"
    assert by_id["rare_A"].labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert set("XBZUO") <= ESM_ALPHABET and len(ESM_ALPHABET) == 25


@pytest.mark.parametrize("bad", [".", "-", "*", "1", " ", "J"])
def test_any_character_outside_the_esm_alphabet_skips_the_chain(tmp_path, bad):
    text = f">a\nMK{bad}T\n0000\n>b\nMKT\n010\n"
    chains, counts = read_chains(write(tmp_path / "x.txt", text))
    assert [c.id for c in chains] == ["b"]
    assert counts["skipped"]["unknown_residues"] == 1


def test_crlf_blank_lines_and_header_words(tmp_path):
    text = ">a first chain\r\nMKT\r\n010\r\n\r\n>b\r\nGG\r\n11\r\n"
    chains, counts = read_chains(write(tmp_path / "x.txt", text))
    assert [(c.id, c.sequence, c.labels.tolist()) for c in chains] == [("a", "MKT", [0, 1, 0]), ("b", "GG", [1, 1])]
    assert counts["skipped"] == dict.fromkeys(counts["skipped"], 0)


def test_threeline_without_label_line_or_with_extra_lines(tmp_path):
    text = ">nolabels\nMKT\n>extra\nMKT\n010\n010\n>ok\nMK\n01\n"
    chains, counts = read_chains(write(tmp_path / "x.txt", text))
    assert [c.id for c in chains] == ["ok"]
    assert counts["skipped"]["missing_labels"] == 1 and counts["skipped"]["malformed"] == 1


def test_fasta_with_fasta_like_labels(tmp_path):
    fasta = write(tmp_path / "seqs.fasta", ">a desc\nMKTA\nYG\n>b\nGGG\n>nolabel\nMKT\n")
    labels = write(tmp_path / "labels.txt", ">a\n0110\n00\n>b\n111\n>unused\n01\n")
    chains, counts = read_chains(fasta, labels_path=labels)
    assert counts["format"] == "fasta"
    assert [(c.id, c.sequence, c.labels.tolist()) for c in chains] == [
        ("a", "MKTAYG", [0, 1, 1, 0, 0, 0]),
        ("b", "GGG", [1, 1, 1]),
    ]
    assert counts["skipped"]["missing_labels"] == 1
    assert counts["unused_labels"] == 1
    assert chains[0].source == "seqs"


def test_fasta_with_csv_labels(tmp_path):
    fasta = write(tmp_path / "seqs.fa", ">a\nMKT\n>b\nGGGG\n")
    labels = write(tmp_path / "labels.csv", "id,labels\na,010\nb,01\n")
    chains, counts = read_chains(fasta, fmt="fasta", labels_path=labels)
    assert [c.id for c in chains] == ["a"]
    assert counts["skipped"]["length_mismatch"] == 1


def test_fasta_with_binding_positions(tmp_path):
    """``id<TAB>1-based positions``: positions past the chain or below 1 are counted and dropped (the chain kept),
    ids without a sequence are unused labels, chains without a line are missing labels, non-integer positions
    make the chain invalid."""
    fasta = write(tmp_path / "seqs.fasta", ">a\nMKTAYG\n>b\nGGG\n>c\nMKT\n>d\nMKTA\n>nolabel\nMKT\n>bad\nMK\n")
    positions = write(
        tmp_path / "binding.tsv",
        "a\t1,3, 6\nb\t2,4,0,-1\nc\t\nd\nbad\t1,x\nnot_in_fasta\t1,2\na\t2\n",
    )
    chains, counts = read_chains(fasta, fmt="fasta", labels_path=positions)
    assert [(c.id, c.labels.tolist()) for c in chains] == [
        ("a", [1, 0, 1, 0, 0, 1]),  # the first line of an id wins
        ("b", [0, 1, 0]),  # 4, 0 and -1 lie outside the 3 residues
        ("c", [0, 0, 0]),  # no position: binds nowhere
        ("d", [0, 0, 0, 0]),
    ]
    assert counts["positions_out_of_range"] == 3
    assert counts["unused_labels"] == 1
    assert counts["skipped"]["missing_labels"] == 1 and counts["skipped"]["invalid_labels"] == 1
    assert counts["kept"] == 4 and counts["records"] == 6


def test_prepare_binding_sites_reads_fasta_with_positions(tmp_path, capsys):
    from pharmafl.cli import main

    fasta_lines, position_lines = [], []
    rng = np.random.default_rng(0)
    for i in range(40):  # distinct sequences: identical ones would form one sequence group, all in one split
        fasta_lines += [f">p{i}", "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 30))]
        position_lines.append(f"p{i}\t{1 + i % 30},{31 + i}")  # the second position is outside every chain
    fasta = write(tmp_path / "ZN.fasta", "\n".join(fasta_lines) + "\n")
    positions = write(tmp_path / "ZN_binding.tsv", "\n".join(position_lines) + "\n")
    out = tmp_path / "prepared"
    code = main(["prepare", "binding-sites", fasta, "--labels", positions, "--format", "fasta", "--out", str(out)])
    assert code == 0
    assert "40 positions outside their chain dropped" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    (source,) = summary["inputs"]
    assert source["kept"] == 40 and source["positions_out_of_range"] == 40


def test_fasta_without_label_file_is_a_user_error(tmp_path):
    fasta = write(tmp_path / "seqs.fasta", ">a\nMKT\n")
    with pytest.raises(InputError, match="label file"):
        read_chains(fasta, fmt="fasta")
    # Auto-detection reads it as three-line; every record then lacks labels, and the message says why.
    with pytest.raises(InputError, match=r"No usable chains .*missing_labels 1.*label file"):
        read_chains(fasta)


def test_csv_format(tmp_path):
    text = "id,sequence,labels\na,MKT,010\nb,mkta,0001\nc,MKT,\nd,MK-T,0000\ne,MKT,0120\n"
    chains, counts = read_chains(write(tmp_path / "table.csv", text))
    assert counts["format"] == "csv"
    assert [(c.id, c.sequence) for c in chains] == [("a", "MKT"), ("b", "MKTA")]
    skipped = counts["skipped"]
    assert skipped["missing_labels"] == 1 and skipped["unknown_residues"] == 1 and skipped["invalid_labels"] == 1


def test_csv_without_required_columns_is_a_user_error(tmp_path):
    with pytest.raises(InputError, match="missing labels"):
        read_chains(write(tmp_path / "table.csv", "id,sequence\na,MKT\n"))


def test_gzipped_input(tmp_path):
    path = tmp_path / "HEM_test.txt.gz"
    path.write_bytes(gzip.compress(b">a\nMKT\n010\n"))
    chains, _ = read_chains(str(path))
    assert chains[0].source == "HEM_test" and source_name(path) == "HEM_test"


def test_empty_and_missing_files_are_user_errors(tmp_path):
    with pytest.raises(InputError, match="is empty"):
        read_chains(write(tmp_path / "empty.txt", "\n\n"))
    with pytest.raises(InputError, match="does not exist"):
        read_chains(str(tmp_path / "nope.txt"))
    with pytest.raises(InputError, match="not a file"):
        read_chains(str(tmp_path))
    with pytest.raises(InputError, match="format must be"):
        read_chains(write(tmp_path / "x.txt", ">a\nM\n0\n"), fmt="pdb")


def test_file_with_no_usable_record_names_the_counts(tmp_path):
    path = write(tmp_path / "bad.txt", ">a\nMKT\n01\n>b\nMK*\n010\n")
    with pytest.raises(InputError) as error:
        read_chains(path)
    message = str(error.value)
    assert message.startswith(f"No usable chains in '{path}': 2 records, all skipped (")
    assert "unknown_residues 1" in message and "length_mismatch 1" in message


# --- cropping -------------------------------------------------------------------------------------------


def test_crop_keeps_the_first_residues_and_their_labels():
    chain = Chain("a", "MKTAYG", np.array([0, 1, 0, 0, 1, 1], dtype=np.int8), "s")
    cropped = crop(chain, 4)
    assert cropped.sequence == "MKTA" and cropped.labels.tolist() == [0, 1, 0, 0]
    assert chain.sequence == "MKTAYG" and len(chain.labels) == 6  # the input is unchanged
    assert crop(chain, 6) is chain
    with pytest.raises(InputError):
        crop(chain, 0)


def test_read_chains_counts_cropped_chains_and_lost_positives(tmp_path):
    path = write(tmp_path / "x.txt", ">a\nMKTAYG\n010011\n>b\nMK\n11\n")
    chains, counts = read_chains(path, max_length=4)
    assert [len(c) for c in chains] == [4, 2]
    assert counts["cropped"] == 1 and counts["positives_cropped"] == 2


# --- the real GPSite files (fixed, so their counts are pinned) ------------------------------------------


@pytest.mark.parametrize(
    ("name", "records", "positives", "longest", "cropped"),
    [("ATP_train", 347, 5115, 1494, 5), ("HEM_train", 176, 4022, 1369, 1)],
)
def test_gpsite_files_parse_with_known_counts(gpsite_dir, name, records, positives, longest, cropped):
    chains, counts = read_chains(str(gpsite_dir / f"{name}.txt"))
    assert counts["format"] == "threeline"
    assert counts["records"] == counts["kept"] == len(chains) == records
    assert sum(counts["skipped"].values()) == 0
    assert sum(c.positives for c in chains) == positives
    assert max(len(c) for c in chains) == longest
    assert all(c.source == name and set(c.sequence) <= ESM_ALPHABET for c in chains)
    assert len({c.id for c in chains}) == records
    _, counts_1000 = read_chains(str(gpsite_dir / f"{name}.txt"), max_length=1000)
    assert counts_1000["cropped"] == cropped and counts_1000["positives_cropped"] > 0


def test_utf16_input_is_read_and_latin1_gets_a_hint(tmp_path):
    text = ">1abc_A\nMKTAYIAK\n00110000\n"
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text(text, encoding="utf-16")
    chains, _ = read_chains(utf16)
    assert [c.sequence for c in chains] == ["MKTAYIAK"]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(">1abc_A Säure\nMKTAYIAK\n00110000\n".encode("latin-1"))
    with pytest.raises(InputError, match="is not UTF-8 text .*save it as UTF-8"):
        read_chains(latin1)
