"""The app stays local from any working directory (issue 16, item 6): `streamlit run` of the entry point
started from another folder listens on 127.0.0.1 only, with usage statistics off and no Deploy button,
and the entry refuses to serve when a flag or environment variable overrides that."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from streamlit_app.app import exposure_problem
from tests.appserver import APP, serve


def options(**set_) -> callable:
    defaults = {"server.address": "127.0.0.1", "browser.gatherUsageStats": False}
    values = {**defaults, **{k.replace("__", "."): v for k, v in set_.items()}}
    return values.get


def test_the_entry_refuses_to_serve_beyond_loopback_or_with_usage_statistics():
    argv = [str(APP)]
    assert exposure_problem(argv, options()) is None
    assert exposure_problem(argv, options(server__address="localhost")) is None
    assert "all interfaces" in exposure_problem(argv, options(server__address=None))
    assert "0.0.0.0" in exposure_problem(argv, options(server__address="0.0.0.0"))
    assert "gatherUsageStats" in exposure_problem(argv, options(browser__gatherUsageStats=True))
    # AppTest and plain imports run no server of ours
    assert exposure_problem(["pytest"], options(server__address=None)) is None


def listening(port: int) -> list[str]:
    """Local addresses with a listening TCP socket on `port` (Linux /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux /proc/net/tcp")
def test_started_from_another_directory_it_listens_on_loopback_only(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}  # an empty base dir: the app starts, nothing to build
    with serve(tmp_path, env) as served:
        assert listening(served.port) == ["127.0.0.1"]
        text = served.log.read_text()
        assert "Network URL" not in text and "External URL" not in text, text


def test_the_shipped_config_is_local_only_and_has_no_deploy_button():
    import tomllib

    config = tomllib.loads((APP.parent / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["browser"]["gatherUsageStats"] is False
    assert config["client"]["toolbarMode"] == "minimal"
