"""Output folders: a failure while writing leaves the old output whole, success swaps in exactly the new one."""

import pytest

from pharmafl.core.errors import InputError
from pharmafl.core.outputs import check_output, staged_output, write_marker


def test_a_failure_inside_the_staged_write_leaves_the_old_output_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    write_marker(out, "prepare chem")
    assert check_output(out, ("prepare chem",), overwrite=True, option="--out") is True
    with pytest.raises(RuntimeError, match="disk full"), staged_output(out, "prepare chem") as fresh:
        (fresh / "half.txt").write_text("half")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == [".pharmafl.json", "old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    with staged_output(out, "prepare chem") as fresh:
        (fresh / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [".pharmafl.json", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_only_marked_outputs_of_the_right_kind_are_replaced(tmp_path):
    out = tmp_path / "ws"
    out.mkdir()
    write_marker(out, "simulate")
    with pytest.raises(InputError, match="is a `pharmafl simulate` output"):
        check_output(out, ("prepare chem",), overwrite=True, option="--out")
    assert check_output(tmp_path / "new", ("prepare chem",), overwrite=False, option="--out") is False
