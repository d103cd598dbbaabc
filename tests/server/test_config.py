"""`lookout server` configuration: file < environment < flags, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lookout.config import KEYS, Project, ServerConfig, load, redacted
from lookout.errors import ConfigError
from tests.support import ROOT


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lookout.yaml"
    path.write_text(text)
    return path


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "port: 9001\notlp_port: 9002\nhost: 127.0.0.2\n")
    environ = {"LOOKOUT_PORT": "9101", "LOOKOUT_OTLP_PORT": "9102"}
    config = load(path, environ, {"port": "9201"})
    assert (config.port, config.otlp_port, config.host) == (9201, 9102, "127.0.0.2")


def test_defaults() -> None:
    config = load(None, {}, {})
    assert (config.host, config.port, config.otlp_port) == ("127.0.0.1", 8686, 4318)
    assert config == ServerConfig()


def test_projects_from_file_and_variable(tmp_path: Path) -> None:
    path = _file(tmp_path, "projects:\n  - id: 3\n    name: busline\n    keys: [abc, def]\n")
    assert load(path, {}, {}).projects == (Project(3, "busline", ("abc", "def")),)
    assert load(None, {"LOOKOUT_SENTRY_KEYS": "1=k1,2=k2"}, {}).projects == (
        Project(1, "project-1", ("k1",)),
        Project(2, "project-2", ("k2",)),
    )


@pytest.mark.parametrize(
    ("text", "environ", "key", "hint"),
    [
        ("prot: 1\n", {}, "prot", "Did you mean 'port'?"),
        ("port: 99999\n", {}, "port", "a port number"),
        ("", {"LOOKOUT_OTLP_PORT": "four"}, "otlp_port", "a port number"),
        ("projects:\n  - id: abc\n    keys: [k]\n", {}, "projects[0].id", "numeric"),
        ("projects: []\n", {}, "projects", "a list"),
        ("trace_ingest: maybe\n", {}, "trace_ingest", "true or false"),
        ("self_observe_interval_s: -1\n", {}, "self_observe_interval_s", "above 0"),
        ("- just\n- a list\n", {}, "--config", "a YAML mapping"),
        ("port: [unclosed\n", {}, "--config", "valid YAML"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(
    tmp_path: Path, text: str, environ: dict[str, str], key: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(_file(tmp_path, text), environ, {})
    assert caught.value.key == key
    assert hint in str(caught.value)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lookout", "server", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_check_config_exits_0_or_2_without_traceback(tmp_path: Path) -> None:
    good = _cli("--config", str(_file(tmp_path, "port: 9001\n")), "--check-config")
    assert (good.returncode, good.stdout.strip()) == (0, "config OK")
    bad = _cli("--config", str(_file(tmp_path, "prot: 9001\n")), "--check-config")
    assert bad.returncode == 2
    assert "Config 'prot'" in bad.stderr
    assert "Did you mean 'port'?" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = _cli("--config", str(tmp_path / "nope.yaml"), "--check-config")
    assert missing.returncode == 2


def test_print_config_redacts_secrets(tmp_path: Path) -> None:
    path = _file(tmp_path, "scrub_key: s3cr3t\nprojects:\n  - id: 1\n    keys: [dsnkey]\n")
    result = _cli("--config", str(path), "--print-config")
    assert result.returncode == 0
    printed = json.loads(result.stdout)
    assert printed["scrub_key"] == "***"
    assert printed["projects"] == [{"id": 1, "name": "project-1", "keys": ["***"]}]
    assert "s3cr3t" not in result.stdout
    assert "dsnkey" not in result.stdout
    assert set(printed) == set(KEYS)


def test_redacted_lists_every_key() -> None:
    assert set(redacted(ServerConfig())) == set(KEYS)
