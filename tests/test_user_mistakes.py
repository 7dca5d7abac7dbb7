"""A user's mistakes with `pharmafl simulate`: each is one sentence and exit code 2 before FLARE starts, and the
workspace and the data are left byte for byte as they were. The command line's own entry point (``pharmafl.cli``'s
``main``, the console script's) runs each in this process; one case runs as a fresh process too, as the user runs
it (a process per case cost 8 s of imports each)."""

import contextlib
import hashlib
import io
import subprocess
import sys
import time

import pytest

from pharmafl.core.outputs import SIMULATE, write_marker
from pharmafl.core.paths import repo_root
from pharmafl.jobs.simulate import MARKER

JOBS = repo_root() / "jobs"


def tree_digest(folder):
    """SHA-256 over every file's relative path and bytes (and every folder's name) under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def old_workspace(tmp_path_factory):
    """A finished simulator workspace of ours (marker, results) that a mistake must not destroy."""
    workspace = tmp_path_factory.mktemp("mistakes") / "finished"
    (workspace / "local").mkdir(parents=True)
    write_marker(workspace, SIMULATE, MARKER)
    (workspace / "server" / "simulate_job" / "cross_site_val").mkdir(parents=True)
    (workspace / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json").write_text("{}")
    return workspace


@pytest.fixture(scope="module")
def chem_1024(chembl_csv, tmp_path_factory):
    from pharmafl.multitask.prepare import PrepareConfig, prepare_chem

    out = tmp_path_factory.mktemp("chem_1024") / "data"
    prepare_chem(
        str(chembl_csv),
        str(out),
        PrepareConfig(sites=["site-1", "site-2"], max_compounds=1500, n_bits=1024),
        progress=None,
    )
    return out


def simulate(*args, fresh_process=False):
    """`pharmafl simulate ARGS` through the CLI's entry point, here or in a fresh process: (exit code, stderr)."""
    argv = ["simulate", *map(str, args)]
    started = time.perf_counter()
    if fresh_process:
        done = subprocess.run(
            [sys.executable, "-m", "pharmafl.cli", *argv], capture_output=True, text=True, timeout=120
        )
        code, stderr = done.returncode, done.stderr
    else:
        from pharmafl.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's own refusals
                code = exit_.code
        stderr = err.getvalue()
    print(f"pharmafl {' '.join(argv)}: exit {code} in {time.perf_counter() - started:.1f} s: {stderr.strip()}")
    return code, stderr


def cases(chem, proteins, chem_1024, workspace):
    fedavg, esm = JOBS / "multitask_fedavg", JOBS / "esm2_lora_fra"
    return {
        "wrong job name": (
            (JOBS / "multitask_fedavgg", "--data", chem, "--workspace", workspace, "--overwrite"),
            "does not exist",
        ),
        "workspace is the data folder": (
            (fedavg, "--data", chem, "--workspace", chem, "--overwrite"),
            "which this command reads",
        ),
        "negative rounds": (
            (fedavg, "--data", chem, "--workspace", workspace, "--overwrite", "--rounds", "-1"),
            "--rounds must be positive",
        ),
        "text learning rate": (
            (fedavg, "--data", chem, "--workspace", workspace, "--overwrite", "--set", "learning_rate=abc"),
            "learning_rate='abc' is not a valid float",
        ),
        "chem data into the ESM job": (
            (esm, "--data", chem, "--workspace", workspace, "--overwrite"),
            "trains on binding-sites data",
        ),
        "protein data into the chem job": (
            (fedavg, "--data", proteins, "--workspace", workspace, "--overwrite"),
            "trains on chem data",
        ),
        "1,024 bits for a 32,000-bit trunk": (
            (fedavg, "--data", chem_1024, "--workspace", workspace, "--overwrite"),
            "--bits 32000",
        ),
        "missing model": (
            (esm, "--data", proteins, "--workspace", workspace, "--overwrite", "--model", "/nonexistent/esm2"),
            "ESM-2 model folder /nonexistent/esm2 does not exist",
        ),
        "workspace without --overwrite": (
            (fedavg, "--data", chem, "--workspace", workspace),
            "--overwrite replaces it",
        ),
    }


CASES = list(cases(*"abcd"))  # the case names (the folders come from fixtures)


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_sentence_exit_2_and_touches_nothing(
    case, chembl_small, gpsite_small, chem_1024, old_workspace
):
    args, message = cases(chembl_small, gpsite_small, chem_1024, old_workspace)[case]
    folders = [old_workspace, chembl_small, gpsite_small, chem_1024]
    before = [tree_digest(folder) for folder in folders]
    code, stderr = simulate(*args)
    assert code == 2, stderr
    assert message in stderr
    assert stderr.startswith("pharmafl: error: ") and len(stderr.strip().splitlines()) == 1
    assert [tree_digest(folder) for folder in folders] == before


def test_a_folder_pharmafl_did_not_make_is_never_a_workspace(chembl_small, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, stderr = simulate(JOBS / "multitask_fedavg", "--data", chembl_small, "--workspace", mine, "--overwrite")
    assert code == 2 and "not a pharmafl output" in stderr
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_the_valid_argument_names_are_listed(chembl_small, tmp_path):
    code, stderr = simulate(
        JOBS / "multitask_fedavg", "--data", chembl_small, "--workspace", tmp_path / "ws", "--set", "learnin_rate=0.1"
    )
    assert (
        code == 2
        and "has no setting learnin_rate" in stderr
        and "training.learning_rate" in stderr.split("settings are:")[1]
    )
    assert not (tmp_path / "ws").exists()


def test_a_mistake_at_the_real_command_line_is_one_sentence_and_exit_2(chembl_small, old_workspace):
    before = tree_digest(old_workspace)
    code, stderr = simulate(
        JOBS / "multitask_fedavg", "--data", chembl_small, "--workspace", old_workspace, fresh_process=True
    )
    assert code == 2 and stderr.startswith("pharmafl: error: ") and len(stderr.strip().splitlines()) == 1
    assert "--overwrite replaces it" in stderr and tree_digest(old_workspace) == before


def test_version_and_defaults_in_help():
    version = subprocess.run([sys.executable, "-m", "pharmafl.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("pharmafl ")
    help_text = subprocess.run(
        [sys.executable, "-m", "pharmafl.cli", "prepare", "chem", "--help"], capture_output=True, text=True
    ).stdout
    assert "(default: 32000)" in " ".join(help_text.split()) and "(default: 0)" in help_text
