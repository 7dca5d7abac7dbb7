import pytest

from pharmafl.cli import main
from pharmafl.core.paths import repo_root

JOB = repo_root() / "jobs" / "multitask_fedavg"


@pytest.fixture
def no_poc(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NVFLARE_POC_WORKSPACE", str(tmp_path / "poc"))
    return tmp_path


def test_status_and_down_without_a_poc(no_poc, capsys):
    assert main(["poc", "status"]) == 1
    assert "no POC workspace" in capsys.readouterr().out
    assert main(["poc", "down"]) == 0
    assert main(["poc", "down"]) == 0
    assert "no POC system was running" in capsys.readouterr().out


def test_submit_without_a_poc_or_kit_is_one_sentence(no_poc, capsys):
    assert main(["submit", str(JOB), "--record", str(no_poc / "r.jsonl")]) == 2
    assert "run `pharmafl poc up` or pass --startup-kit" in capsys.readouterr().err
    assert main(["submit", str(JOB), "--startup-kit", str(no_poc), "--record", str(no_poc / "r.jsonl")]) == 2
    assert "not an admin startup kit" in capsys.readouterr().err


def test_poc_up_refuses_bad_options_before_starting_anything(no_poc, capsys):
    assert main(["poc", "up", "--sites", "0"]) == 2
    assert "--sites must be positive" in capsys.readouterr().err
    assert main(["poc", "up", "--port", "80"]) == 2
    assert "--port must be between" in capsys.readouterr().err
    assert not (no_poc / "poc").exists()


def test_poc_up_refuses_a_data_folder_without_the_sites(no_poc, capsys):
    (no_poc / "data" / "x").mkdir(parents=True)
    (no_poc / "data" / "x" / "manifest.json").write_text("{}")
    assert main(["poc", "up", "--data", str(no_poc / "data")]) == 2
    assert "prepare it with --sites pharma-a,pharma-b,pharma-c or --partners 3" in capsys.readouterr().err
    assert not (no_poc / "poc").exists()


def test_poc_up_refuses_a_port_in_use(no_poc, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["poc", "up", "--port", str(port)]) == 2
    assert f"port {port} on localhost is in use" in capsys.readouterr().err
    assert not (no_poc / "poc").exists()
