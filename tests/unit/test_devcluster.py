"""The pure parts of chatnode.devcluster: slot ranges, CLUSTER NODES and INFO parsing."""

from __future__ import annotations

import itertools
from collections.abc import Collection
from pathlib import Path

import pytest

from chatnode import devcluster
from chatnode.devcluster import SLOTS, parse_cluster_nodes, parse_info, split_slots
from chatnode.devstack import StackError

NODES = """\
07c3 127.0.0.1:30004@31004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@31002,host-b master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@31003 master,fail? - 1426238318243 0 3 disconnected 10923-16383 [77->-67ed]
e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 17 [93-<-292f]
a1b2 :0@0 noaddr,handshake - 0 0 0 disconnected
"""


@pytest.mark.parametrize("shards", [1, 3, 5, 7])
def test_split_slots_covers_every_slot_once_in_even_ranges(shards: int) -> None:
    ranges = split_slots(shards)
    assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges))
    sizes = [last + 1 - first for first, last in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_parse_cluster_nodes_reads_roles_slots_and_links() -> None:
    nodes = {n.id: n for n in parse_cluster_nodes(NODES)}
    assert nodes["07c3"].primary_id == "e7d1" and not nodes["07c3"].is_primary
    assert nodes["67ed"].port == 30002 and nodes["67ed"].slots == ((5461, 10922),)
    assert not nodes["292f"].connected and "fail?" in nodes["292f"].flags
    me = nodes["e7d1"]
    assert "myself" in me.flags and me.epoch == 1
    assert me.slots == ((0, 5460), (17, 17))  # [93-<-292f] is an import, not a claim
    assert me.owns(0, 5460) and me.owns(17) and not me.owns(5461) and not me.owns(5000, 5461)
    assert nodes["a1b2"].port == 0 and nodes["a1b2"].slots == ()


def test_parse_info_reads_fields_and_skips_sections() -> None:
    text = "# Cluster\r\ncluster_state:ok\r\ncluster_slots_ok:16384\r\n\r\n"
    assert parse_info(text) == {"cluster_state": "ok", "cluster_slots_ok": "16384"}


def test_a_cluster_never_takes_the_ports_it_is_told_to_avoid(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`chatnode dev --redis-cluster` picks its nodes' ports first: the cluster's nodes,
    picked at random afterwards, must not land on them (one did, and a dev node could
    not bind its port)."""
    asked: list[set[int]] = []

    def free(taken: Collection[int] = ()) -> int:
        asked.append(set(taken))
        raise StackError("stop here")

    monkeypatch.setattr(devcluster, "free_steady_port", free)
    rc = devcluster.RedisCluster(tmp_path, avoid=frozenset({18080, 18765}))
    with pytest.raises(StackError):
        rc._add_node(tmp_path / "n1")
    assert asked and {18080, 18765} <= asked[0]
