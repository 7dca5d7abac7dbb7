"""The pharmafl command as a user runs it: bad input ends in one sentence and exit code 2."""

import json
import subprocess
import sys

import pytest


def pharmafl(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "pharmafl.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def assert_clean_error(result, fragment):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and fragment in message[0]


def test_missing_input_file(tmp_path):
    result = pharmafl("prepare", "chem", tmp_path / "nope.csv", "--out", tmp_path / "out", "--partners", "2")
    assert_clean_error(result, "does not exist")


def test_missing_smiles_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("mol,assay1\nCCO,1\n")
    result = pharmafl("prepare", "chem", path, "--out", tmp_path / "out", "--partners", "2")
    assert_clean_error(result, "smiles")


def test_bad_rows_are_counted_not_fatal(tmp_path):
    # A different wide multi-task CSV (binary tasks, an id column) prepares without code changes.
    smiles = [
        "CCO",
        "c1ccccc1O",
        "CC(=O)Oc1ccccc1C(=O)O",
        "CCN(CC)CC",
        "c1ccc2ccccc2c1",
        "CC(C)Cc1ccc(C)cc1",
        "O=C(O)c1ccccc1",
        "CCOC(=O)C",
        "C1CCCCC1N",
        "c1ccncc1",
        "CC(=O)Nc1ccc(O)cc1",
        "Cc1ccccc1",
    ]
    rows = ["compound_id,smiles,tox_a,tox_b"]
    for i, s in enumerate(smiles * 3):
        rows.append(f"id{i},{s}{'' if i < 12 else '.Cl' if i < 24 else ''},{i % 2},{(i // 2) % 2}")
    rows += ["bad1,not_a_smiles,1,0", "bad2,,1,0", "bad3,CCCC,yes,0"]
    path = tmp_path / "tox.csv"
    path.write_text("\n".join(rows) + "\n")
    result = pharmafl(
        "prepare",
        "chem",
        path,
        "--out",
        tmp_path / "out",
        "--partners",
        "2",
        "--min-train-actives",
        "1",
        "--min-train-inactives",
        "1",
        "--min-eval-actives",
        "0",
        "--min-eval-inactives",
        "0",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["skipped"]["invalid_smiles"] == 1
    assert summary["skipped"]["empty_smiles"] == 1
    assert summary["skipped"]["non_numeric_values"] == 1
    assert summary["ignored_columns"] == ["compound_id"]
    assert summary["compounds"] == 13  # 12 structures (salts merged) + CCCC
    assert "skipped" in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["simulate", "jobs/nope", "--data", "x", "--workspace", "w"],
        ["report", "no_such_workspace"],
        ["baseline", "chem", "--data", "no_such_data", "--out", "o"],
        ["simulate", "jobs/multitask_fedavg", "--data", "x", "--workspace", "w", "--set", "no_equals_sign"],
    ],
)
def test_other_commands_fail_cleanly(command, tmp_path):
    result = pharmafl(*command, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_set_reads_json_values_and_keeps_strings():
    from pharmafl.cli import build_parser

    args = build_parser().parse_args(
        ["simulate", "j", "--data", "d", "--workspace", "w", "--set", "grad_noise_std=1e-4", "--set", "upload=delta"]
    )
    assert args.set == [("grad_noise_std", 1e-4), ("upload", "delta")]


def test_experiment_refuses_an_unknown_baseline_setting(tmp_path):
    result = pharmafl("experiment", "chem", "--data", "d", "--out", "o", "--baseline-set", "drop=0.2", cwd=tmp_path)
    assert_clean_error(
        result, "--baseline-set: multitask_fedavg has no setting drop; its settings are: training.dropout"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "error, code", [("InputError", 2), ("UserError", 2), ("ValueError", None), ("TypeError", None)]
)
def test_only_input_errors_become_exit_2_and_a_bug_keeps_its_traceback(error, code, monkeypatch, tmp_path, capsys):
    import pharmafl.report
    from pharmafl.cli import main
    from pharmafl.core import errors

    kind = getattr(errors, error, None) or {"ValueError": ValueError, "TypeError": TypeError}[error]

    def broken(*_args, **_kwargs):
        raise kind("the workspace holds no run")

    monkeypatch.setattr(pharmafl.report, "write_report", broken)
    if code is None:  # a bug in the library: main must not swallow it
        with pytest.raises(kind, match="holds no run"):
            main(["report", str(tmp_path)])
    else:
        assert main(["report", str(tmp_path)]) == code
        assert capsys.readouterr().err.strip() == "pharmafl: error: the workspace holds no run"
