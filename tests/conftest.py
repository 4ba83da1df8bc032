"""Shared test settings: hypothesis must not fail on a slow moment of a busy machine."""

from hypothesis import settings

settings.register_profile("chatnode", deadline=None)
settings.load_profile("chatnode")


# -- a Redis Cluster for the session (chatnode.devcluster) -------------------------------

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402

from chatnode.devcluster import RedisCluster  # noqa: E402
from tests.clusterkit import own_cluster  # noqa: E402


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """3 primaries with a replica each, started once; skipped only without redis-server.
    A test that breaks the cluster for good takes its own (tests.clusterkit.own_cluster)."""
    with own_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def clean_redis_cluster(redis_cluster: RedisCluster) -> RedisCluster:
    """The session cluster, ok again and empty (FLUSHALL on every primary)."""
    redis_cluster.wait_ok(timeout=30)
    redis_cluster.flushall()
    return redis_cluster
