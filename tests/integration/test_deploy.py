"""Deploy files: compose checked by `docker compose config`, haproxy by `haproxy -c`,
where those tools are installed (skipped, by name, where they are not)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from yarl import URL

from chatnode import devstack, netaddr
from tests.integration.harness import Api, Client, NodeProc, Stack, new_user

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


# -- issue 8: secrets, trusted proxy, logs, internal endpoints -----------------------------

SECRET_REQUIRED = re.compile(r"^\$\{CHATNODE_JWT_SECRET:\?[^}]+\}$")
# log-format variables that hold the query string: %r (request line), %HU (URI), %HQ
# (query), in plain or %{+Q}-style form; %rc and %rt are counters, not the request.
QUERY_VARIABLES = re.compile(r"%(\{[^}]*\})?(r(?![A-Za-z])|HU|HQ)")


def _compose() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return spec


def _node_envs() -> list[dict[str, Any]]:
    services = _compose()["services"]
    return [services[name]["environment"] for name in services if name.startswith("node")]


def _cluster_node_envs() -> list[dict[str, Any]]:
    services = _compose()["services"]
    return [services[name]["environment"] for name in services if name.startswith("cluster-node")]


def _haproxy_sections() -> dict[str, list[str]]:
    """Section header ('defaults', 'frontend http', ...) -> its directives, comments out."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in (ROOT / "deploy" / "haproxy.cfg").read_text().splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = " ".join(line.split())
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections


def test_compose_has_no_default_for_the_jwt_secret() -> None:
    """Compose refuses to start without CHATNODE_JWT_SECRET (${VAR:?...}), so no known
    value can sign tokens; no placeholder secret is left anywhere in the file."""
    services = _compose()["services"]
    envs = [s["environment"] for s in services.values() if "environment" in s]
    secrets = [env["CHATNODE_JWT_SECRET"] for env in envs if "CHATNODE_JWT_SECRET" in env]
    assert len(secrets) >= 3
    for value in secrets:
        assert SECRET_REQUIRED.match(value), value
    assert "change-me" not in (ROOT / "compose.yaml").read_text()


def test_compose_publishes_no_database_redis_or_metrics_port() -> None:
    """The postgres password default is acceptable only while nothing publishes it."""
    services = _compose()["services"]
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"haproxy", "haproxy-cluster"}  # the second in profile `cluster`
    ports = " ".join(str(p) for name in published for p in services[name]["ports"])
    for env in _node_envs() + _cluster_node_envs():
        metrics_port = str(env["CHATNODE_METRICS_PORT"])
        assert int(metrics_port) > 0 and metrics_port not in ports


def test_compose_redis_never_evicts() -> None:
    command = [str(part) for part in _compose()["services"]["redis"]["command"]]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_compose_cluster_profile_runs_three_primaries_three_replicas_and_three_nodes() -> None:
    """Profile `cluster`: six cluster-enabled Redis (AOF, noeviction) that one shot forms
    with one replica each, three nodes on them behind their own haproxy, which they trust."""
    spec = _compose()
    services = spec["services"]
    in_profile = {name for name, s in services.items() if "cluster" in s.get("profiles", [])}
    members = sorted(n for n in in_profile if "--cluster-enabled" in services[n].get("command", []))
    assert members == [f"redis-c{i}" for i in range(1, 7)]
    for name in members:
        command = [str(part) for part in services[name]["command"]]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert command[command.index("--appendonly") + 1] == "yes"
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    create = services["redis-cluster-create"]
    script = " ".join(create["command"])
    assert "--cluster create" in script and "--cluster-replicas 1" in script  # 6 = 3 + 3
    assert all(name in script for name in members)
    assert set(create["depends_on"]) == set(members)
    nodes = sorted(n for n in in_profile if n.startswith("cluster-node"))
    assert len(nodes) == 3
    address = ipaddress.ip_address(
        services["haproxy-cluster"]["networks"]["cluster"]["ipv4_address"]
    )
    subnets = [
        ipaddress.ip_network(c["subnet"]) for c in spec["networks"]["cluster"]["ipam"]["config"]
    ]
    assert any(address in net for net in subnets)
    for i, name in enumerate(nodes, 1):
        node = services[name]
        assert node["environment"]["CHATNODE_REDIS_URL"].startswith("redis://redis-c")
        assert "redis-cluster-create" in node["depends_on"]
        assert node["networks"]["cluster"]["aliases"] == [f"node{i}"]  # haproxy.cfg's names
        trusted = netaddr.parse_networks(node["environment"]["CHATNODE_TRUSTED_PROXIES"])
        assert trusted == (ipaddress.ip_network(f"{address}/32"),)
    assert "cluster" in services["postgres"]["networks"]


def test_compose_nodes_trust_the_proxy_and_haproxy_forwards_the_client() -> None:
    spec = _compose()
    address = ipaddress.ip_address(
        spec["services"]["haproxy"]["networks"]["default"]["ipv4_address"]
    )
    subnets = [
        ipaddress.ip_network(c["subnet"]) for c in spec["networks"]["default"]["ipam"]["config"]
    ]
    assert any(address in net for net in subnets)
    for env in _node_envs():
        trusted = netaddr.parse_networks(env["CHATNODE_TRUSTED_PROXIES"])
        assert any(address in net for net in trusted)
        assert not any(net.num_addresses > 1 for net in trusted)  # the proxy, not the subnet
    sections = _haproxy_sections()
    for frontend in ("frontend http", "frontend ws"):
        assert "option forwardfor" in sections[frontend]


def test_haproxy_logs_never_hold_the_query_string() -> None:
    """The WebSocket URL carries the bearer token: no `option httplog` (its %r is the
    request line) and no log-format with %r, %HU or %HQ; one log-format covers both
    frontends."""
    sections = _haproxy_sections()
    directives = [d for lines in sections.values() for d in lines]
    assert not any(d.startswith("option httplog") for d in directives)
    formats = [d for d in directives if d.startswith("log-format")]
    assert formats and not any(QUERY_VARIABLES.search(f) for f in formats), formats
    assert any(d.startswith("log-format") for d in sections["defaults"])
    for name in ("frontend http", "frontend ws"):
        assert not any(d.startswith("option httplog") for d in sections[name])
    assert QUERY_VARIABLES.search('log-format "%ci %{+Q}r"')  # the pattern does find them
    assert not QUERY_VARIABLES.search("log-format %rc %rt %HPO")


def test_haproxy_denies_metrics_and_openapi_on_the_public_frontend() -> None:
    rules = " ".join(d for d in _haproxy_sections()["frontend http"] if "deny" in d or "acl" in d)
    assert "http-request deny" in rules
    assert "metrics" in rules and "openapi" in rules


@pytest.mark.parametrize(("frontend", "most"), [("frontend http", 64), ("frontend ws", 2000)])
def test_haproxy_bounds_the_connections_of_one_client_address(frontend: str, most: int) -> None:
    """A slowloris from one host cannot hold every descriptor of the proxy."""
    lines = _haproxy_sections()[frontend]
    assert any(line.startswith("stick-table") and "conn_cur" in line for line in lines)
    assert "tcp-request connection track-sc0 src,ipmask(32,64)" in lines  # v6 by /64
    assert f"tcp-request connection reject if {{ sc0_conn_cur gt {most} }}" in lines


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed here")
@pytest.mark.timeout(60)
async def test_through_haproxy_the_token_stays_out_of_its_log_and_internal_paths_are_404(
    stack: Stack, workdir: Path, api_a: Api
) -> None:
    """deploy/haproxy.cfg itself (only its listen and node addresses changed) in front of
    a real node: a WebSocket session with ?token= is logged by path alone, and /metrics
    and /openapi.json (plain, %-escaped, with dot segments) answer 404."""
    node = NodeProc(stack, "behind-haproxy", workdir).start()
    http_port, ws_port = devstack.free_port(), devstack.free_port()
    cfg = (ROOT / "deploy" / "haproxy.cfg").read_text()
    cfg = cfg.replace("bind :8080", f"bind 127.0.0.1:{http_port}")
    cfg = cfg.replace("bind :8765", f"bind 127.0.0.1:{ws_port}")
    cfg = re.sub(r"node\d:8765 port 8080", f"127.0.0.1:{node.ws_port} port {node.http_port}", cfg)
    cfg = re.sub(r"node\d:8080", f"127.0.0.1:{node.http_port}", cfg)
    path = workdir / f"haproxy-{time.time_ns()}.cfg"
    path.write_text(cfg)
    proxy = await asyncio.create_subprocess_exec(
        "haproxy", "-db", "-f", str(path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        for _ in range(100):
            if devstack.port_open(http_port) and devstack.port_open(ws_port):
                break
            await asyncio.sleep(0.1)
        user = await new_user(api_a)
        client = await Client.connect(f"ws://127.0.0.1:{ws_port}/ws", user.token)
        await client.close()
        statuses = {}
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{http_port}"
            for target in ("/healthz", *INTERNAL_PATHS):
                async with http.get(URL(base + target, encoded=True)) as resp:
                    statuses[target] = resp.status
        await asyncio.sleep(0.5)  # the WebSocket session's log line
    finally:
        proxy.terminate()
        async with asyncio.timeout(10):
            output = (await proxy.communicate())[0].decode()
        node.stop()
    assert "/ws" in output, output
    assert user.token not in output and "token=" not in output, output
    assert statuses == {"/healthz": 200} | dict.fromkeys(INTERNAL_PATHS, 404)


INTERNAL_PATHS = ("/metrics", "/openapi.json", "/%6detrics", "/./metrics", "/x/../openapi.json")
