"""Fixtures for a real redis-server (hermes_green/testing/redis_server.py). No mocks of Redis.

    redis_server   one server for the whole session (no persistence: `--save '' --appendonly no`)
    redis_url      that server's URL with an emptied database, per test
"""
from __future__ import annotations

import pytest

from hermes_green.testing.redis_server import RedisServer, free_port  # noqa: F401


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session server, emptied for this test."""
    redis_server.flush()
    return redis_server.url
