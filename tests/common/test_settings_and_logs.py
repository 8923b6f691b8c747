"""Settings validation at start, and the JSON log format."""

import json
import logging
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from services.common.context import request_id_var
from services.common.logs import configure_logging
from services.telemetry.settings import TelemetrySettings


def test_settings_come_from_prefixed_environment(monkeypatch):
    monkeypatch.setenv("RAGMESH_TELEMETRY_PORT", "6123")
    monkeypatch.setenv("RAGMESH_TELEMETRY_API_KEYS", '{"k": "alice:acme"}')
    monkeypatch.setenv("RAGMESH_INGEST_PORT", "7000")
    settings = TelemetrySettings()
    assert settings.port == 6123
    assert settings.api_keys == {"k": "alice:acme"}


def test_invalid_setting_is_rejected_with_its_name():
    with pytest.raises(ValidationError, match="port"):
        TelemetrySettings(port=70000)
    with pytest.raises(ValidationError, match="log level"):
        TelemetrySettings(log_level="LOUD")


def start_telemetry(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.telemetry"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_service_with_bad_setting_exits_with_a_message():
    result = start_telemetry(RAGMESH_TELEMETRY_PORT="not-a-port")
    assert result.returncode != 0
    assert "invalid settings" in result.stderr and "port" in result.stderr


def test_list_setting_that_is_not_json_exits_with_a_message_not_a_traceback():
    result = start_telemetry(RAGMESH_TELEMETRY_PEERS="telemetry-peers:50055")
    assert result.returncode != 0
    assert "invalid settings" in result.stderr and '"peers"' in result.stderr
    assert "Traceback" not in result.stderr


def test_a_misspelt_setting_stops_the_service_with_the_one_it_looks_like():
    result = start_telemetry(
        RAGMESH_TELEMETRY_MESH_PROBE_TIMEOUT_SECOND="5", RAGMESH_TELEMETRY_COLOUR="blue"
    )
    assert result.returncode != 0
    assert "unknown settings for TelemetrySettings" in result.stderr
    assert (
        "RAGMESH_TELEMETRY_MESH_PROBE_TIMEOUT_SECOND "
        "(did you mean RAGMESH_TELEMETRY_MESH_PROBE_TIMEOUT_SECONDS?)" in result.stderr
    )
    # Like no setting: named, with nothing to suggest.
    assert "RAGMESH_TELEMETRY_COLOUR;" in result.stderr
    assert "Traceback" not in result.stderr


def test_only_the_services_own_prefix_is_checked():
    environ = {
        "RAGMESH_TELEMETRY_PORT": "1",
        "RAGMESH_INGEST_ANYTHING": "x",
        "RAGMESH_API_KEY": "the CLI's",
        "NODE_NAME": "node-1",
    }
    assert TelemetrySettings.unknown_variables(environ) == []
    # The node's name is read from NODE_NAME (what Kubernetes' downward API sets), not
    # from the prefixed name.
    environ["RAGMESH_TELEMETRY_NODE_NAME"] = "node-1"
    assert TelemetrySettings.unknown_variables(environ) == [
        "RAGMESH_TELEMETRY_NODE_NAME (did you mean NODE_NAME?)"
    ]


def test_service_refuses_open_exposure_at_start():
    result = start_telemetry(RAGMESH_TELEMETRY_HOST="0.0.0.0", RAGMESH_TELEMETRY_PORT="0")
    assert result.returncode != 0
    assert "without credentials" in result.stderr


def test_json_logs_carry_request_id_and_extra_fields(capsys):
    configure_logging("INFO", json_output=True)
    token = request_id_var.set("req-7")
    try:
        logging.getLogger("ragmesh.test").info("indexed %d chunks", 3, extra={"document": "d1"})
    finally:
        request_id_var.reset(token)
        logging.getLogger().handlers.clear()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "indexed 3 chunks"
    assert line["request_id"] == "req-7"
    assert line["document"] == "d1"
    assert line["level"] == "INFO"
