"""Deploy files: compose checked by `docker compose config`, haproxy by `haproxy -c`,
where those tools are installed (skipped, by name, where they are not)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _compose_available(), reason="docker compose is not installed here")
def test_compose_config_is_valid() -> None:
    done = subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed here")
def test_haproxy_config_is_valid() -> None:
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_runs_redis_aof_postgres_migrate_three_nodes_and_a_proxy() -> None:
    """Checked everywhere: the shape issue 3 asks of compose.yaml."""
    spec = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = spec["services"]
    nodes = [name for name in services if name.startswith("node")]
    assert len(nodes) == 3
    assert "appendonly" in str(services["redis"]["command"])
    assert "postgres" in services and "migrate" in services
    assert "migrate" in str(services["migrate"]["command"])
    assert "haproxy" in services or "nginx" in services


def test_dockerfile_is_small_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "slim" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert "\nUSER " in text and "USER root" not in text.split("HEALTHCHECK")[-1]
