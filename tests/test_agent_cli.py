"""`fleet-agent` commands as a user runs them: enroll against a real controller API, status, errors."""
import json
import signal
import stat
import subprocess
import sys
import urllib.request
from importlib.metadata import version
from pathlib import Path

from edgefleet.agent.cli import main
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.daemon import hardware_profile, next_boot
from tests.conftest import free_port
from tests.support.api_server import running_controller

FLEET_AGENT = str(Path(sys.executable).parent / "fleet-agent")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FLEET_AGENT, *args], capture_output=True, text=True, timeout=120)


def test_enroll_against_the_controller_writes_config_key_and_trusted_root(tmp_path):
    with running_controller(tmp_path / "home", f"sqlite:///{tmp_path / 'c.db'}") as api:
        with api.client() as client:
            token = client.post("/v1/devices/pi-7/enroll-token", json={}).json()["token"]
        state = tmp_path / "state"
        result = run("enroll", "--controller", api.url, "--token", token, "--state-dir", str(state))
        assert result.returncode == 0, result.stderr
        assert "enrolled as pi-7" in result.stdout
        config = AgentConfig.load(state / "agent.toml")
        assert config.device_id == "pi-7" and config.device_token and config.mqtt_username
        # the repository URLs are the controller's public ones, as it answered
        assert config.metadata_url.endswith("/repository/metadata/") and config.controller_url == api.url
        assert config.state_dir == state
        for secret in ("agent.toml", "device-key.pem"):
            assert stat.S_IMODE((state / secret).stat().st_mode) == 0o600, secret
        assert json.loads((state / "tuf" / "root.json").read_bytes())["signed"]["_type"] == "root"
        # the token is spent: a second try is one clear line and exit 1
        again = run("enroll", "--controller", api.url, "--token", token, "--state-dir", str(state))
        assert again.returncode == 1 and again.stderr.startswith("error: enrollment refused (HTTP ")
        assert len(again.stderr.strip().splitlines()) == 1
        assert "'error'" not in again.stderr, "the API's error text, not its JSON envelope"


def test_unreachable_controller_is_one_line(tmp_path):
    result = run("enroll", "--controller", f"http://127.0.0.1:{free_port()}", "--token", "t",
                 "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach the controller") and result.stderr.count("\n") == 1


def test_status_and_rollback_before_any_update(tmp_path, capsys):
    config = tmp_path / "agent.toml"
    config.write_text(AgentConfig(device_id="d1", state_dir=tmp_path / "state").to_toml())
    assert main(["status", "--config", str(config)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status == {"device": "d1", "models": {}}
    assert not (tmp_path / "state").exists()  # status only reads (root must not create the agent's dirs)
    assert main(["rollback", "--config", str(config)]) == 1
    assert capsys.readouterr().err == "error: no model is installed\n"
    assert main(["status", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "run `fleet-agent enroll` first" in capsys.readouterr().err


def test_bench_defaults_to_the_active_model_and_says_when_there_is_none(tmp_path, capsys):
    config = tmp_path / "agent.toml"
    config.write_text(AgentConfig(device_id="d1", state_dir=tmp_path / "state").to_toml())
    assert main(["bench", "--config", str(config)]) == 1
    assert "no model is installed yet" in capsys.readouterr().err


def test_tuf_client_gets_the_rest_of_argv(tmp_path):
    result = run("tuf-client", "--metadata-dir", str(tmp_path), "init", str(tmp_path / "nothing.json"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1


def test_boot_counter_and_hardware_override(tmp_path):
    assert [next_boot(tmp_path) for _ in range(3)] == [1, 2, 3]
    profile = hardware_profile(AgentConfig(hardware_override={"arch": "aarch64", "device_model": "Raspberry Pi 4 Model B"}))
    assert profile.arch == "aarch64" and profile.hardware_class == "rpi-4"
    assert "CPUExecutionProvider" in profile.providers


def test_serve_and_bench_through_fleet_agent(digits, tmp_path):
    port = free_port()
    proc = subprocess.Popen([FLEET_AGENT, "serve", str(digits.model), "--name", "digits", "--http", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("serving digits on http://127.0.0.1:")
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.1] * 64}]})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/digits/infer", data=body.encode(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["model_name"] == "digits"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    result = run("bench", str(digits.model), "--seconds", "0", "--min-queries", "5", "--batch", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queries"] >= 5


def test_version():
    done = run("--version")
    assert done.returncode == 0 and done.stdout == f"fleet-agent {version('edgefleet')}\n"
