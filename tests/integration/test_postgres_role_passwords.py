"""Whether a backup's globals carry the roles' password hashes is decided by PostgreSQL's
SQLSTATE (42501, insufficient_privilege) on reading pg_authid, not by the text of an error:
engine/kinds/postgres/connection.py, reads_role_passwords. Against the real PostgreSQL test server."""

import uuid

import psycopg

from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.connection import reads_role_passwords


def _role(postgres_server):
    name = "plain_%s" % uuid.uuid4().hex[:8]
    with postgres_server.connect() as conn:
        conn.execute("CREATE ROLE %s LOGIN" % name)
    return name


def _snapshot_session(postgres_server, database, user):
    conn = psycopg.connect(host=postgres_server.host, port=postgres_server.port, user=user, dbname=database)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    snapshot = conn.execute("SELECT pg_catalog.pg_export_snapshot()").fetchone()[0]
    return conn, snapshot


def test_a_superuser_reads_role_passwords(postgres_server, postgres_database):
    conn, _snapshot = _snapshot_session(postgres_server, postgres_database.name, postgres_server.user)
    with conn:
        assert reads_role_passwords(conn) is True


def test_a_refusal_is_insufficient_privilege_and_the_snapshot_lives_on(postgres_server, postgres_database):
    role = _role(postgres_server)
    try:
        conn, snapshot = _snapshot_session(postgres_server, postgres_database.name, role)
        with conn:
            assert reads_role_passwords(conn) is False
            # The refusal was rolled back to a savepoint: the transaction and its exported
            # snapshot (what pg_dump --snapshot uses) are still there.
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            with psycopg.connect(host=postgres_server.host, port=postgres_server.port, user=postgres_server.user,
                                 dbname=postgres_database.name) as other:
                other.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                other.execute("SET TRANSACTION SNAPSHOT '%s'" % snapshot)
            conn.rollback()
    finally:
        with postgres_server.connect() as conn:
            conn.execute("DROP ROLE %s" % role)
