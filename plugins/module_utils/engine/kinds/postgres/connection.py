"""PostgreSQL connections, shared by the postgres source, target, WAL and PITR code.

``PgConnection`` turns the connection fields (``CONNECTION``) into libpq parameters and the
tools' environment; the password reaches libpq as a parameter and the tools through
``PGPASSWORD``, never argv, logs or a manifest. ``count_rows`` is the exact per-table row
count that a backup records and a restore compares.
"""

from ...errors import ConfigError, MissingDependencyError, SourceError
from ... import procutil
from ...config import resolve_secret_refs
from ...lazyimport import LazyModule
from ...schema import Field, Schema

psycopg = LazyModule("psycopg")
sql = LazyModule("psycopg.sql")

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# How the postgres source, target and drill reach a server (libpq's names).
CONNECTION = Schema("postgres connection", {
    "host": Field("str", "server host name, IP address or Unix socket directory", nonempty=True),
    "port": Field("int", "server port (default 5432)", minimum=1, maximum=65535),
    "user": Field("str", "role to connect as", nonempty=True),
    "password": Field("str", "password of the role", secret=True),
    "database": Field("str", "database to back up or restore", nonempty=True),
    "dbname": Field("str", "alias of database", nonempty=True),
    "sslmode": Field("enum", "libpq sslmode", choices=SSLMODES),
    "sslrootcert": Field("path", "CA certificate file for verify-ca / verify-full"),
    "sslcert": Field("path", "client certificate file"),
    "sslkey": Field("path", "client key file"),
    "connect_timeout": Field("int", "seconds to wait for a connection (default 10)", minimum=1, maximum=3600),
    "bin_dir": Field("path", "directory holding pg_dump / pg_restore (default: PATH)"),
})
CONNECTION_KEYS = tuple(CONNECTION.fields)


# User tables whose rows a dump carries: ordinary and partitioned tables outside the
# system schemas, not owned by an extension (pg_dump leaves those to CREATE EXTENSION).
USER_TABLES_SQL = """
SELECT n.nspname, c.relname
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p')
   AND c.relpersistence <> 't'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname !~ '^pg_toast'
   AND n.nspname !~ '^pg_temp_'
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                    WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                      AND d.objid = c.oid AND d.deptype = 'e')
 ORDER BY 1, 2
"""


def require_psycopg(purpose):
    if not psycopg.available:
        raise MissingDependencyError("psycopg", purpose)


def one_line(text):
    """``text`` (a server or driver message) on one line, for errors and logs."""
    return " ".join(str(text).split())


class PgConnection:
    """Connection settings shared by the postgres source and target.

    ``options`` may carry ``password`` or ``password_file`` / ``password_env`` (resolved
    here). ``database`` (alias ``dbname``) names the database.
    """

    def __init__(self, options, where):
        # Only the connection's own fields: the caller validated the whole dict already.
        options = resolve_secret_refs(CONNECTION.validate(
            {key: value for key, value in options.items() if key in CONNECTION.spellings()}, where), where)
        self.where = where
        if options.get("database") and options.get("dbname") and options["database"] != options["dbname"]:
            raise ConfigError("%s: give database or dbname, not both" % where)
        self.database = options.get("database") or options.get("dbname")
        self.host = options.get("host")
        self.port = options.get("port")
        self.user = options.get("user")
        self.password = options.get("password")
        self.sslmode = options.get("sslmode")
        self.ssl_files = {key: options.get(key) for key in ("sslrootcert", "sslcert", "sslkey")}
        self.connect_timeout = options.get("connect_timeout", 10)
        self.bin_dir = options.get("bin_dir")

    @property
    def secrets(self):
        return (self.password,) if self.password else ()

    def endpoint(self):
        return "%s:%s" % (self.host or "local socket", self.port or 5432)

    def connect(self, database=None, autocommit=False):
        """A psycopg connection; failures become one clear SourceError without secrets."""
        require_psycopg("PostgreSQL backups and restores")
        dbname = database or self.database
        params = dict(host=self.host, port=self.port, user=self.user, password=self.password, dbname=dbname,
                      sslmode=self.sslmode, connect_timeout=self.connect_timeout,
                      application_name="biometrics.backup", **self.ssl_files)
        params = {key: value for key, value in params.items() if value not in (None, "")}
        try:
            return psycopg.connect(autocommit=autocommit, **params)
        except psycopg.Error as exc:
            message = procutil.scrub(one_line(exc), self.secrets)
            # The one text match left on purpose: libpq reports a refused connection (here
            # FATAL 3D000, invalid_catalog_name) as text only, so psycopg's error carries no
            # sqlstate and is a plain OperationalError, never errors.InvalidCatalogName. A
            # server speaking another language gets the general message below, which holds
            # the server's own words.
            if "does not exist" in message and "database" in message:
                raise SourceError("postgres: database %s does not exist on %s" % (dbname, self.endpoint())) from None
            raise SourceError("postgres: cannot connect to database %s on %s as %s: %s"
                              % (dbname, self.endpoint(), self.user or "(default user)", message)) from None

    def tool_env(self, database=None):
        """Environment for libpq tools: connection settings and PGPASSWORD, never argv."""
        extra = {
            "PGHOST": self.host, "PGPORT": self.port, "PGUSER": self.user, "PGDATABASE": database or self.database,
            "PGPASSWORD": self.password, "PGSSLMODE": self.sslmode, "PGCONNECT_TIMEOUT": self.connect_timeout,
            "PGSSLROOTCERT": self.ssl_files["sslrootcert"], "PGSSLCERT": self.ssl_files["sslcert"],
            "PGSSLKEY": self.ssl_files["sslkey"], "PGAPPNAME": "biometrics.backup",
        }
        # A password we were given must win over one inherited from our own environment,
        # and an inherited service definition must not redirect the tools elsewhere.
        return procutil.tool_env({k: v for k, v in extra.items() if v not in (None, "")},
                                 drop=("PGSERVICE", "PGSERVICEFILE"))

    def tool(self, name):
        return procutil.find_tool(name, self.bin_dir)

    def describe(self):
        return {"host": self.host or "local socket", "port": self.port or 5432, "user": self.user,
                "database": self.database, "sslmode": self.sslmode or "prefer"}


def count_rows(conn, cancelled=None):
    """``{"schema.table": exact row count}`` of every user table, in ``conn``'s transaction."""
    counts = {}
    with conn.cursor() as cur:
        cur.execute(USER_TABLES_SQL)
        tables = cur.fetchall()
        for schema, table in tables:
            if cancelled is not None and cancelled.is_set():
                break
            cur.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table)))
            counts["%s.%s" % (schema, table)] = cur.fetchone()[0]
    return counts


def reads_role_passwords(conn):
    """Whether this session may read the roles' password hashes (pg_authid), which pg_dumpall
    needs unless it runs with ``--no-role-passwords``. Managed services give a "superuser"
    that still may not: the server refuses with SQLSTATE 42501 (insufficient_privilege).

    Asked inside a savepoint when ``conn`` is in a transaction, so that the transaction (and a
    snapshot it exported) goes on after a refusal.
    """
    try:
        with conn.transaction():
            conn.execute("SELECT rolpassword FROM pg_catalog.pg_authid LIMIT 1")
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


def server_version_text(num):
    """150018 -> '15.18'; 90624 -> '9.6.24'."""
    if num >= 100000:
        return "%d.%d" % (num // 10000, num % 10000)
    return "%d.%d.%d" % (num // 10000, num // 100 % 100, num % 100)
