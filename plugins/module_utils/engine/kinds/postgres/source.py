"""PostgreSQL source: ``pg_dump -Fc`` inside an exported snapshot, plus the cluster globals.

Consistency: one REPEATABLE READ transaction exports its snapshot
(``pg_export_snapshot()``); ``pg_dump --snapshot`` dumps exactly that snapshot, and the
exact row count of every user table is taken in the same transaction while the dump
streams. The counts in ``stats`` therefore describe the dump itself, and a restore can
prove it got every row back.

Payloads: ``database.dump`` (pg_dump custom format, uncompressed: the pipeline
compresses) and, unless ``include_globals: false``, ``globals.sql``
(``pg_dumpall --globals-only``: roles and tablespaces; role passwords only when the
backup user may read them).

The password reaches libpq (psycopg) as a connection parameter and the tools through
``PGPASSWORD`` in their environment; never argv, logs or the manifest.
"""

import io
import re
import threading

from ...errors import ConfigError, SourceError
from ... import procutil
from ...schema import Field
from ..contract import Source
from .connection import (CONNECTION, PgConnection, count_rows, one_line, psycopg, reads_role_passwords,
                         server_version_text)

DUMP_PAYLOAD = "database.dump"
GLOBALS_PAYLOAD = "globals.sql"
GLOBALS_MAX_BYTES = 64 << 20

# pg_dump options that change neither which tables are dumped nor their rows, so that the
# row counts in ``stats`` still describe the dump. Flags without a value:
_DUMP_FLAGS = frozenset((
    "--no-owner", "-O", "--no-privileges", "--no-acl", "-x", "--no-comments", "--no-publications",
    "--no-subscriptions", "--no-security-labels", "--no-tablespaces", "--no-toast-compression",
    "--no-table-access-method", "--quote-all-identifiers", "--enable-row-security",
    "--load-via-partition-root", "--large-objects", "--blobs", "-b", "--no-blobs", "-B", "--verbose", "-v",
))
# ... and ``--name=value`` options with the shape their value must have.
_DUMP_VALUE_OPTIONS = {
    "--compress": re.compile(r"^(?:[0-9]|(?:gzip|lz4|zstd|none)(?::[a-z0-9=,]+)?)$"),
    "--lock-wait-timeout": re.compile(r"^[0-9]+(?:\s*(?:ms|s|min|h))?$"),
    "--extra-float-digits": re.compile(r"^-?[0-9]{1,2}$"),
}


def validate_dump_args(args):
    """Check extra pg_dump arguments against the allow-list; return them as a list."""
    if args in (None, ""):
        return []
    if isinstance(args, str):
        args = args.split()
    if not isinstance(args, list):
        raise ConfigError("postgres source: pg_dump_args must be a list of strings")
    checked = []
    for arg in args:
        arg = str(arg)
        name, dummy, value = arg.partition("=")
        if arg in _DUMP_FLAGS:
            checked.append(arg)
        elif name in _DUMP_VALUE_OPTIONS and value and _DUMP_VALUE_OPTIONS[name].match(value):
            checked.append(arg)
        elif name in _DUMP_VALUE_OPTIONS:
            raise ConfigError("postgres source: pg_dump argument %s has an invalid value %r" % (name, value))
        else:
            raise ConfigError(
                "postgres source: pg_dump argument %r is not allowed. Allowed: %s, and %s. Table or schema "
                "selection and data exclusion are refused because the per-table row counts recorded for "
                "verification cover the whole database; connection settings are options of the source."
                % (arg, ", ".join(sorted(_DUMP_FLAGS)),
                   ", ".join("%s=VALUE" % key for key in sorted(_DUMP_VALUE_OPTIONS))))
    return checked


class PostgresSource(Source):
    kind = "postgres"
    SCHEMA = CONNECTION.extend("source", {
        "include_globals": Field("bool", "also dump roles and tablespaces (pg_dumpall --globals-only; default true)"),
        "pg_dump_args": Field("list", "extra pg_dump flags from an allow-list", split=" "),
    })

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        self.conn = PgConnection(options, "source")
        if not self.conn.database:
            raise ConfigError("postgres source: database (or dbname) is required")
        self.include_globals = options.get("include_globals", True)
        self.dump_args = validate_dump_args(options.get("pg_dump_args"))
        self._versions = None

    def describe(self):
        return dict(self.conn.describe(), include_globals=self.include_globals, pg_dump_args=self.dump_args)

    def tool_versions(self):
        if self._versions is None:
            self._versions = {}
            for name in ("pg_dump", "pg_dumpall") if self.include_globals else ("pg_dump",):
                self._versions[name] = procutil.tool_version(self.conn.tool(name))[0]
        return dict(self._versions)

    def preflight(self):
        """Connect (credentials, database exists) and check that pg_dump can dump this server."""
        dump_path = self.conn.tool("pg_dump")
        if self.include_globals:
            self.conn.tool("pg_dumpall")
        dump_major = procutil.tool_version(dump_path)[1][0]
        with self.conn.connect() as conn:
            server_num = conn.info.server_version
        server_major = server_num // 10000 if server_num >= 100000 else server_num // 100
        if dump_major < server_major:
            raise ConfigError("postgres: pg_dump %d cannot dump a PostgreSQL %s server; install pg_dump %d or "
                              "newer (or point bin_dir at it)"
                              % (dump_major, server_version_text(server_num), server_major))
        self.tool_versions()

    def produce(self, emit, context):
        conn = self.conn.connect()
        try:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with conn.cursor() as cur:
                cur.execute("SELECT pg_catalog.pg_export_snapshot(), "
                            "(SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)")
                snapshot, superuser = cur.fetchone()
            server_num = conn.info.server_version
            globals_info = None
            if self.include_globals:
                data, role_hashes = self._dump_globals(bool(superuser) and reads_role_passwords(conn))
                emit(GLOBALS_PAYLOAD, io.BytesIO(data))
                globals_info = {"included": True, "role_hashes": role_hashes}
            tables = self._dump_database(emit, conn, snapshot)
            conn.rollback()
        finally:
            conn.close()
        return {
            "database": self.conn.database,
            "server_version": server_version_text(server_num),
            "server_version_num": server_num,
            "tables": tables,
            "table_count": len(tables),
            "total_rows": sum(tables.values()),
            "globals": globals_info or {"included": False, "role_hashes": False},
        }

    def _dump_database(self, emit, conn, snapshot):
        """Stream pg_dump of ``snapshot`` into ``emit`` while counting rows in the same snapshot."""
        argv = [self.conn.tool("pg_dump"), "--format=custom", "--snapshot=%s" % snapshot, "--no-password"]
        if not any(arg.startswith("--compress") for arg in self.dump_args):
            argv.append("--compress=0")
        argv.extend(self.dump_args)
        counted = {}
        cancelled = threading.Event()

        def count():
            try:
                counted["tables"] = count_rows(conn, cancelled)
            except Exception as exc:  # pylint: disable=broad-except  # re-raised below
                counted["error"] = exc

        counter = threading.Thread(target=count, name="pg-count", daemon=True)
        stream = procutil.ToolStream(argv, env=self.conn.tool_env(), what="pg_dump", secrets=self.conn.secrets)
        counter.start()
        try:
            emit(DUMP_PAYLOAD, stream)
        except BaseException:
            cancelled.set()
            try:
                getattr(conn, "cancel_safe", conn.cancel)()
            except Exception:  # pylint: disable=broad-except  # best effort while failing
                pass
            raise
        finally:
            stream.close()
            counter.join()
        if "error" in counted:
            raise SourceError("postgres: counting rows in the dump's snapshot failed: %s"
                              % procutil.scrub(one_line(counted["error"]), self.conn.secrets))
        return counted["tables"]

    def _dump_globals(self, role_passwords):
        """``pg_dumpall --globals-only`` (small: kept in memory so that it can be retried); with
        the roles' password hashes when ``role_passwords`` (see reads_role_passwords)."""
        base = [self.conn.tool("pg_dumpall"), "--globals-only", "--no-password", "--database=%s" % self.conn.database]
        if role_passwords:
            return self._run_globals(base, self.conn.tool_env()), True
        return self._run_globals(base + ["--no-role-passwords"], self.conn.tool_env()), False

    def _run_globals(self, argv, env):
        stream = procutil.ToolStream(argv, env=env, what="pg_dumpall --globals-only", secrets=self.conn.secrets)
        try:
            chunks = []
            size = 0
            while True:
                chunk = stream.read()
                if not chunk:
                    break
                size += len(chunk)
                if size > GLOBALS_MAX_BYTES:
                    raise SourceError("postgres: pg_dumpall --globals-only produced more than %d MiB"
                                      % (GLOBALS_MAX_BYTES >> 20))
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            stream.close()
