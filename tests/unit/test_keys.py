"""chatnode.keys: one hash tag per user, so a user's keys share a Redis Cluster slot."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from chatnode import keys
from chatnode.frames import CLIENT_ID_RE, MOBILE_RE

ALICE = "+15550000001"
BOB = "15550000002"

mobiles = st.from_regex(MOBILE_RE)
client_ids = st.from_regex(CLIENT_ID_RE)


def hash_tag(key: str) -> str | None:
    """The part Redis Cluster hashes: between the first '{' and the next '}', if non-empty."""
    start = key.find("{")
    if start == -1:
        return None
    end = key.find("}", start + 1)
    if end in (-1, start + 1):
        return None
    return key[start + 1 : end]


def user_keys(mobile: str) -> list[str]:
    return [
        keys.account(mobile),
        keys.blocks(mobile),
        keys.inbox(mobile),
        keys.route(mobile),
        keys.seen(mobile),
        keys.dedupe(mobile, BOB, "c-1"),
    ]


@pytest.mark.parametrize("mobile", [ALICE, BOB, "1234567", "+123456789012345"])
def test_every_key_of_a_user_has_the_users_partition_as_hash_tag(mobile: str) -> None:
    part = keys.partition(mobile)
    assert 0 <= part < keys.PARTITIONS
    for key in user_keys(mobile):
        assert key.startswith("{p" + str(part) + "}:u:" + mobile + ":")
        assert hash_tag(key) == "p" + str(part)


@given(st.text(min_size=1, max_size=40))
def test_keys_slot_is_redis_clusters_slot(key: str) -> None:
    assert keys.slot(key) == key_slot(key.encode())


def test_partitions_spread_over_the_slots_of_three_shards() -> None:
    shards = [0, 0, 0]
    for part in range(keys.PARTITIONS):
        shards[min(keys.slot(keys.part_tag(part)) * 3 // keys.SLOTS, 2)] += 1
    assert min(shards) > keys.PARTITIONS // 4  # about a third each


def test_a_node_channel_is_in_the_slot_of_the_users_of_its_partition() -> None:
    for mobile in (ALICE, BOB, "1234567"):
        channel = keys.user_channel("node-a", mobile)
        assert keys.slot(channel) == keys.slot(keys.inbox(mobile))
        assert channel in keys.node_channels("node-a")
    assert len(set(keys.node_channels("node-a"))) == keys.PARTITIONS


def test_keys_of_one_user_are_all_different() -> None:
    found = user_keys(ALICE)
    assert len(set(found)) == len(found)


def test_keys_of_different_users_differ() -> None:
    assert keys.inbox(ALICE) != keys.inbox(BOB)
    assert keys.inbox("1234567") != keys.inbox("+1234567")


@given(mobiles)
def test_all_of_a_users_keys_share_one_cluster_slot(mobile: str) -> None:
    slots = {key_slot(k.encode()) for k in user_keys(mobile)}
    assert slots == {key_slot(keys.inbox(mobile).encode())}


@given(recipient=mobiles, sender=mobiles, client_id=client_ids)
def test_dedupe_key_lives_in_the_recipients_slot(
    recipient: str, sender: str, client_id: str
) -> None:
    key = keys.dedupe(recipient, sender, client_id)
    assert hash_tag(key) == hash_tag(keys.inbox(recipient))
    assert key_slot(key.encode()) == key_slot(keys.inbox(recipient).encode())


@given(recipient=mobiles, sender=mobiles, client_id=client_ids)
def test_dedupe_key_names_sender_and_client_id(recipient: str, sender: str, client_id: str) -> None:
    key = keys.dedupe(recipient, sender, client_id)
    assert key.endswith(f":{sender}:{client_id}")
    # a different sender or id gets a different key
    assert key != keys.dedupe(recipient, sender + "0", client_id)
    assert key != keys.dedupe(recipient, sender, client_id + "x")


def test_dedupe_is_not_symmetric_in_sender_and_recipient() -> None:
    assert keys.dedupe(ALICE, BOB, "c-1") != keys.dedupe(BOB, ALICE, "c-1")
    assert keys.dedupe(ALICE, BOB, "c-1").startswith(keys.inbox(ALICE).rpartition(":")[0])


def test_blocked_marker_cannot_be_a_mobile_number() -> None:
    marker = keys.blocked_marker(ALICE)
    assert marker == "<" + ALICE
    assert MOBILE_RE.match(marker) is None


def test_revocations_and_their_markers_are_in_the_partition_of_the_jti() -> None:
    part = keys.partition("jti-1")
    assert keys.revoked("jti-1") == f"chatnode:revoked:{{p{part}}}:jti-1"
    assert keys.slot(keys.revoked("jti-1")) == keys.slot(keys.revocations_loaded(part))
    assert keys.node_channel("node-a", 7) == "chatnode:node:node-a:{p7}"


no_bar = st.text(min_size=1).filter(lambda s: "|" not in s)


@given(node=no_bar, session=no_bar, token=no_bar)
def test_parse_route_undoes_route_value_live_or_not(node: str, session: str, token: str) -> None:
    route = keys.route_value(node, session)
    assert keys.parse_route(route) == (node, session)
    assert keys.parse_route(f"{route}|{token}") == (node, session)  # live, as GO_LIVE writes it


def test_route_value_format() -> None:
    assert keys.route_value("node-a", "s1") == "node-a|s1"
    assert keys.parse_route("node-a|s1") == ("node-a", "s1")


@pytest.mark.parametrize("value", [None, ""])
def test_parse_route_of_nothing_is_none(value: str | None) -> None:
    assert keys.parse_route(value) is None
