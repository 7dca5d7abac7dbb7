"""The consortium on one machine: FLARE POC mode (server and sites on loopback) with the site policies installed."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from pharmafl.consortium.policies import default_project_file, install_policies, kit_certificate_pins
from pharmafl.core.errors import UserError
from pharmafl.core.paths import DATA_ENV
from pharmafl.jobs import prepared_sites

POC_ENV = "NVFLARE_POC_WORKSPACE"
FLARE_DEFAULT_POC = "/tmp/nvflare/poc"
LOG_NAME = "pharmafl_poc.log"


def poc_workspace() -> Path:
    """The POC workspace: ``$NVFLARE_POC_WORKSPACE``, else FLARE's default ``/tmp/nvflare/poc``."""
    return Path(os.environ.get(POC_ENV) or FLARE_DEFAULT_POC).resolve()


def load_project(path: str | Path | None = None) -> dict:
    """A project.yml as a dict (default: the consortium's ``poc_workspace/project.yml``).

    Args:
        path: project file; None means the consortium's.
    """
    path = Path(path) if path else default_project_file()
    if not path.is_file():
        raise UserError(f"Project file '{path}' does not exist.")
    try:
        project = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"'{path}' is not valid YAML: {err}") from err
    if not isinstance(project, dict) or not isinstance(project.get("participants"), list):
        raise UserError(f"'{path}' is not a FLARE project file (no participants list).")
    return project


def participants(project: dict, kind: str) -> list[dict]:
    return [p for p in project["participants"] if p.get("type") == kind]


def site_names(project: dict) -> list[str]:
    return [p["name"] for p in participants(project, "client")]


def admin_with_role(project: dict, role: str) -> str:
    for admin in participants(project, "admin"):
        if admin.get("role") == role:
            return admin["name"]
    raise UserError(f"the project has no admin with the role '{role}'")


def project_for_poc(project: dict, n_sites: int | None = None, port: int | None = None) -> dict:
    """The project with ``n_sites`` data sites (extra ones named like the last, e.g. pharma-d) and ports.

    Args:
        project: from ``load_project``.
        n_sites: number of sites; None keeps the project's.
        port: the server's FL port (its admin port is port + 1); None keeps the project's.
    """
    project = copy.deepcopy(project)
    sites = participants(project, "client")
    if n_sites is not None:
        if n_sites <= 0:
            raise UserError(f"--sites must be positive, got {n_sites}")
        if n_sites <= len(sites):
            dropped = {s["name"] for s in sites[n_sites:]}
        else:
            dropped = set()
            template = sites[-1]
            prefix = template["name"].rstrip(string.ascii_lowercase)
            letters = iter(c for c in string.ascii_lowercase if f"{prefix}{c}" not in {s["name"] for s in sites})
            for _ in range(n_sites - len(sites)):
                name = f"{prefix}{next(letters)}"
                sites.append({**template, "name": name, "org": name.replace("-", "_")})
            index = project["participants"].index(template) + 1
            project["participants"][index:index] = sites[len(participants(project, "client")) :]
        project["participants"] = [p for p in project["participants"] if p["name"] not in dropped]
    if port is not None:
        if not 1024 <= port <= 65534:
            raise UserError(f"--port must be between 1024 and 65534, got {port}")
        for server in participants(project, "server"):
            server["fed_learn_port"] = port
            server["admin_port"] = port + 1
    return project


def prod_dir(workspace: Path, project: dict) -> Path:
    return workspace / project["name"] / "prod_00"


def data_mapping(data_dir: str | Path, sites: list[str]) -> dict[str, Path]:
    """Which prepared folder each site gets: the folder named like the site, else ``site-i`` in project order.

    Args:
        data_dir: output of ``pharmafl prepare`` (``--sites pharma-a,...`` or ``--partners N``).
        sites: the POC site names.
    """
    available = prepared_sites(data_dir)
    root = Path(data_dir).resolve()
    if all(site in available for site in sites):
        return {site: root / site for site in sites}
    if all(f"site-{i + 1}" in available for i in range(len(sites))):
        return {site: root / f"site-{i + 1}" for i, site in enumerate(sites)}
    raise UserError(
        f"'{data_dir}' has no folder for each of {', '.join(sites)} (found {', '.join(available)}); "
        f"prepare it with --sites {','.join(sites)} or --partners {len(sites)}"
    )


def place_data(data_dir: str | Path, sites: list[str], target: Path) -> dict[str, str]:
    """Link each site's prepared folder (see ``data_mapping``) into ``target/<site>``; returns site -> source.

    Args:
        data_dir: output of ``pharmafl prepare``.
        sites: the POC site names.
        target: folder the sites read (``$PHARMAFL_DATA`` of the POC processes).
    """
    mapping = data_mapping(data_dir, sites)
    target.mkdir(parents=True, exist_ok=True)
    for site, source in mapping.items():
        link = target / site
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link)
        link.symlink_to(source, target_is_directory=True)
    return {site: str(source) for site, source in mapping.items()}


def _nvflare(args: list[str], env: dict, log: Path, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "nvflare.cli", *args]
    with open(log, "a") as out:
        out.write(f"\n$ nvflare {' '.join(args)}\n")
        out.flush()
        try:
            return subprocess.run(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(command, returncode=124)


def _check_port_free(port: int) -> None:
    with socket.socket() as probe:
        # Like the server itself: a port whose old connections linger in TIME_WAIT is free; a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("localhost", port))
        except OSError as err:
            raise UserError(f"port {port} on localhost is in use ({err.strerror}); choose another with --port") from err


def _flare_env(workspace: Path) -> dict:
    env = dict(os.environ)
    env[POC_ENV] = str(workspace)
    return env


def poc_up(
    n_sites: int | None = None,
    data_dir: str | Path | None = None,
    port: int | None = None,
    project_file: str | Path | None = None,
    ready_timeout: int = 120,
) -> dict:
    """Prepare the POC from the project file, install the policies, place the data, start and wait until ready.

    A workspace left from an earlier run (stopped, crashed or killed) is taken down first.

    Args:
        n_sites: number of data sites (default: the project's).
        data_dir: prepared data (``pharmafl prepare chem``) to place at the sites; None: the sites read
            ``$PHARMAFL_DATA`` as inherited.
        port: server FL port (admin port: port + 1); default: the project's (8002/8003).
        project_file: default ``poc_workspace/project.yml``.
        ready_timeout: seconds to wait for the server and every site.
    """
    workspace = poc_workspace()
    project = project_for_poc(load_project(project_file), n_sites, port)
    sites = site_names(project)
    if data_dir is not None:
        data_mapping(data_dir, sites)  # a wrong data folder is refused before anything is stopped or started
    if workspace.exists():
        poc_down(quiet=True)
    for server in participants(project, "server"):
        for key, default in (("fed_learn_port", 8002), ("admin_port", 8003)):
            _check_port_free(int(server.get(key, default)))
    workspace.parent.mkdir(parents=True, exist_ok=True)
    # nvflare poc prepare deletes the workspace, so the adapted project file lives beside it.
    scratch = Path(tempfile.mkdtemp(prefix="pharmafl-poc-", dir=workspace.parent))
    project_path = scratch / "project.yml"
    project_path.write_text(yaml.safe_dump(project, sort_keys=False))
    log = scratch / LOG_NAME
    env = _flare_env(workspace)
    start = time.perf_counter()
    result = _nvflare(["poc", "prepare", "-i", str(project_path), "--force"], env, log, timeout=120)
    if result.returncode != 0:
        raise UserError(f"nvflare poc prepare failed (exit code {result.returncode}); see {log}")
    shutil.move(log, workspace / LOG_NAME)
    shutil.rmtree(scratch, ignore_errors=True)
    log = workspace / LOG_NAME
    kits = prod_dir(workspace, project)
    for server in participants(project, "server"):
        install_policies(kits / server["name"], is_site=False)
    pins = kit_certificate_pins(kits, sites)
    for site in sites:
        install_policies(kits / site, is_site=True, roster=sites, pins=pins)
    placed = {}
    if data_dir is not None:
        placed = place_data(data_dir, sites, workspace / "data")
        env[DATA_ENV] = str(workspace / "data")
    # Several sites share this machine's cores: one thread each unless the user chose otherwise.
    env.setdefault("OMP_NUM_THREADS", "1")
    result = _nvflare(["poc", "start", "--timeout", str(ready_timeout)], env, log, timeout=ready_timeout + 60)
    if result.returncode != 0:
        raise UserError(
            f"the POC system did not become ready (exit code {result.returncode}); see {log}, "
            "then `pharmafl poc down` ends what did start"
        )
    server = participants(project, "server")[0]
    return {
        "workspace": str(workspace),
        "project": project["name"],
        "server": f"localhost:{server.get('fed_learn_port', 8002)}",
        "admin_port": server.get("admin_port", 8003),
        "sites": sites,
        "data": placed,
        "admin_kits": {a["name"]: str(kits / a["name"]) for a in participants(project, "admin")},
        "log": str(log),
        "wall_s": time.perf_counter() - start,
    }


def _workspace_project(workspace: Path) -> dict | None:
    path = workspace / "project.yml"
    if not path.is_file():
        return None
    try:
        return load_project(path)
    except UserError:
        return None


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    return _alive(pid)


def running_participants(workspace: Path, project: dict) -> list[str]:
    """Server and sites of the POC whose process (pid.fl / daemon_pid.fl) is alive."""
    kits = prod_dir(workspace, project)
    names = [p["name"] for p in project["participants"] if p.get("type") in ("server", "client")]
    return [n for n in names if any(_pid_alive(kits / n / f) for f in ("pid.fl", "daemon_pid.fl"))]


def flare_processes(workspace: Path) -> list[int]:
    """Ids of the processes whose command line names this POC workspace (server, sites, their jobs)."""
    marker = str(workspace) + "/"
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())  # None: no access, or already gone
        if process.info["pid"] != os.getpid() and marker in cmdline:
            found.append(process.info["pid"])
    return found


def terminate_processes(pids: list[int], grace_s: float = 10.0) -> None:
    """Terminate the processes, then kill those still alive after ``grace_s`` seconds.

    Args:
        pids: process ids (from ``flare_processes``).
        grace_s: seconds to wait for each signal to take effect.
    """
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for stop in (psutil.Process.terminate, psutil.Process.kill):
        for process in processes:
            try:
                stop(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        _, processes = psutil.wait_procs(processes, timeout=grace_s)
        processes = [p for p in processes if _alive(p.pid)]
        if not processes:
            return


def _alive(pid: int) -> bool:
    try:
        # A zombie has exited; only its parent can reap it.
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def poc_down(keep_workspace: bool = False, quiet: bool = False) -> dict:
    """Stop the POC system, end any FLARE process left in its workspace and remove the workspace.

    Safe to run twice and after a crash or a killed run.

    Args:
        keep_workspace: keep the workspace (logs, audit.log files, job results) instead of removing it.
        quiet: print nothing.
    """
    workspace = poc_workspace()
    report = {"workspace": str(workspace), "stopped": [], "killed": [], "removed": False}
    project = _workspace_project(workspace)
    if project is not None and running_participants(workspace, project):
        report["stopped"] = running_participants(workspace, project)
        log = workspace / LOG_NAME
        _nvflare(["poc", "stop"], _flare_env(workspace), log, timeout=60)
    leftovers = flare_processes(workspace)
    if leftovers:
        terminate_processes(leftovers)
        report["killed"] = leftovers
    if not keep_workspace and workspace.exists():
        _nvflare(["poc", "clean"], _flare_env(workspace), Path(os.devnull), timeout=60)
        shutil.rmtree(workspace, ignore_errors=True)  # clean refuses a half-prepared workspace
        report["removed"] = True
    if not quiet:
        if report["stopped"] or report["killed"]:
            stopped = ", ".join(report["stopped"]) or "nothing"
            print(f"stopped {stopped}; ended {len(report['killed'])} leftover process(es)")
        else:
            print(f"no POC system was running ({workspace})")
        if report["removed"]:
            print(f"removed {workspace}")
    return report


def poc_status() -> dict:
    """Which participants run, and (when the server is up) the sites connected to it and the jobs."""
    workspace = poc_workspace()
    project = _workspace_project(workspace)
    if project is None:
        return {"workspace": str(workspace), "prepared": False, "running": [], "connected": [], "jobs": []}
    running = running_participants(workspace, project)
    status = {"workspace": str(workspace), "prepared": True, "running": running, "connected": [], "jobs": []}
    server = participants(project, "server")[0]["name"]
    if server in running:
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        admin = admin_with_role(project, "project_admin")
        try:
            session = new_secure_session(admin, str(prod_dir(workspace, project) / admin), timeout=10.0)
        except Exception as err:  # noqa: BLE001 - any connection failure is reported the same way
            status["error"] = f"cannot reach the server as {admin}: {err}"
            return status
        try:
            status["connected"] = sorted(c.name for c in session.get_connected_client_list())
            status["jobs"] = [
                {"job_id": j.get("job_id"), "name": j.get("job_name", j.get("name")), "status": j.get("status")}
                for j in session.list_jobs()
            ]
        finally:
            session.close()
    return status
