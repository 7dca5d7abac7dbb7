"""Provisioned mode: startup kits with the consortium policies pass FLARE's preflight check."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pharmafl.cli import main
from pharmafl.consortium.poc import flare_processes, terminate_processes
from pharmafl.consortium.policies import default_project_file

from .conftest import free_port_pair

pytestmark = pytest.mark.slow
NVFLARE = [sys.executable, "-m", "nvflare.cli"]


def _preflight(kit: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NVFLARE, "preflight-check", "-p", str(kit)], env=env, capture_output=True, text=True, timeout=120
    )


def _wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("localhost", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"the server did not listen on {port} within {timeout_s} s")


def test_provisioned_kits_hold_the_policies_and_pass_preflight(tmp_path):
    # The server's name is the host the sites reach (its certificate's name): localhost on this machine.
    project = yaml.safe_load(default_project_file().read_text())
    port = free_port_pair()
    server = [p for p in project["participants"] if p["type"] == "server"][0]
    server.update(name="localhost", fed_learn_port=port, admin_port=port + 1)
    project_file = tmp_path / "project.yml"
    project_file.write_text(yaml.safe_dump(project, sort_keys=False))
    assert main(["provision", str(project_file), "--out", str(tmp_path / "ws")]) == 0

    kits = tmp_path / "ws" / project["name"] / "prod_00"
    for kit in ("localhost", "pharma-a", "pharma-b", "pharma-c"):
        assert (kits / kit / "startup" / "rootCA.pem").is_file()
    assert {"privacy.json", "approved_jobs.json", "authorization.json"} <= set(os.listdir(kits / "pharma-a" / "local"))
    server_resources = json.loads((kits / "localhost" / "local" / "resources.json").read_text())
    assert "pharmafl." in server_resources["class_allow_list"]
    assert not (kits / "localhost" / "local" / "privacy.json").exists()

    env = {**os.environ, "HOME": str(tmp_path / "home"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    checked = _preflight(kits / "localhost", env)
    assert checked.returncode == 0 and "overall: pass" in checked.stdout, checked.stdout + checked.stderr
    try:
        subprocess.run(["bash", str(kits / "localhost" / "startup" / "start.sh")], env=env, timeout=60, check=True)
        _wait_for_port(port)
        checked = _preflight(kits / "pharma-a", env)
        assert checked.returncode == 0 and "overall: pass" in checked.stdout, checked.stdout + checked.stderr
        assert "Check server available | PASSED" in " ".join(checked.stdout.split())
    finally:
        terminate_processes(flare_processes(tmp_path / "ws"))
    assert flare_processes(tmp_path / "ws") == []
