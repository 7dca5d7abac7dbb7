"""A plain, non-editable install works without the checkout: the wheel carries the jobs and the POC project."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A new venv holding only the built wheel; its dependencies come from this venv's site-packages."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO_ROOT), "-w", root],
        check=True,
        cwd=root,
    )
    (wheel,) = root.glob("pharmafl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pharmafl/_resources/jobs/multitask_fedavg/meta.json" in names
    assert "pharmafl/_resources/poc_workspace/project.yml" in names
    assert not any("__pycache__" in name for name in names)

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv}))
    # The dependencies (nvflare, torch, ...) without this venv's editable pharmafl: a path added by a .pth
    # file is not itself scanned for .pth files, so the editable install's hook stays out.
    (site_packages / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "-q", wheel],
        check=True,
    )
    return venv


def _run(venv: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PHARMAFL_HOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([*map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.slow
def test_the_installed_command_finds_its_jobs_and_runs_one(installed, chembl_small, tmp_path):
    help_text = _run(installed, installed / "bin" / "pharmafl", "--help", cwd=tmp_path)
    assert help_text.returncode == 0, help_text.stderr
    assert "simulate" in help_text.stdout

    where = _run(
        installed,
        installed / "bin" / "python",
        "-c",
        "import pharmafl; from pharmafl.core.paths import job_dir; print(pharmafl.__file__); print(job_dir('x'))",
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    package_file, job = where.stdout.splitlines()
    assert Path(package_file).is_relative_to(installed), "the test must use the installed wheel, not the checkout"
    assert Path(job).parent == Path(package_file).parent / "_resources" / "jobs"

    result = _run(
        installed,
        installed / "bin" / "pharmafl",
        "simulate",
        "multitask_fedavg",
        "--data",
        chembl_small,
        "--workspace",
        tmp_path / "run",
        "--rounds",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "simulation finished" in result.stdout
    assert list((tmp_path / "run").rglob("cross_val_results.json"))
