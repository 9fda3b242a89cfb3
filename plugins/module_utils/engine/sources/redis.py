"""Redis source: a real copy of the dataset with ``redis-cli --rdb -``.

``redis-cli --rdb`` asks the server for a replication snapshot (the server forks and
streams its RDB), so the payload ``dump.rdb`` is a complete, consistent RDB file of the
moment of the fork, taken without stopping the server and without touching its own
``dump.rdb``. The password reaches redis-cli through ``REDISCLI_AUTH`` in its
environment and the Python client as a parameter; never argv, logs or the manifest.

redis-cli 7.0 writing to stdout leaves the 40-byte end-of-transfer marker of a
diskless transfer at the end of the stream (it can only truncate files). The stream here
holds back the last 40 bytes and, once redis-cli has reported the real length, drops
them when they are that marker.

Key counts: ``INFO keyspace`` right before and right after the transfer. The RDB is the
state at the fork, between the two; with writes in between the two counts differ and
``stats.consistent`` is false (a restore then accepts any count between them).
"""

import re

from ..config import resolve_secret_refs
from ..errors import MissingDependencyError, SourceError
from .. import procutil
from ..lazyimport import LazyModule
from ..schema import Field, Schema
from .base import Source

redis = LazyModule("redis")

RDB_PAYLOAD = "dump.rdb"
EOF_MARK_SIZE = 40
# How the redis source, target and drill reach a server.
CONNECTION = Schema("redis connection", {
    "host": Field("str", "server host name or IP address (default 127.0.0.1)", nonempty=True),
    "port": Field("int", "server port (default 6379)", minimum=1, maximum=65535),
    "unix_socket": Field("path", "Unix socket path instead of host and port", absolute=True),
    "username": Field("str", "ACL user (default: the default user)", nonempty=True),
    "password": Field("str", "password of the user", secret=True),
    "tls": Field("bool", "connect with TLS (default false)"),
    "tls_ca": Field("path", "CA certificate file"),
    "tls_cert": Field("path", "client certificate file"),
    "tls_key": Field("path", "client key file"),
    "tls_insecure": Field("bool", "skip verification of the server certificate (default false)"),
    "connect_timeout": Field("number", "seconds to wait for a connection (default 10)",
                             exclusive_minimum=0, maximum=3600),
    "bin_dir": Field("path", "directory holding redis-cli / redis-server (default: PATH)"),
})
CONNECTION_KEYS = tuple(CONNECTION.fields)
_MARKED_RE = re.compile(r"Transfer finished with success after (\d+) bytes")
_SIZED_RE = re.compile(r"writing (\d+) bytes to")


def require_redis(purpose):
    if not redis.available:
        raise MissingDependencyError("redis", purpose)


class RedisConnection:
    """Connection settings shared by the redis source and target."""

    def __init__(self, options, where):
        # Only the connection's own fields: the caller validated the whole dict already.
        options = resolve_secret_refs(CONNECTION.validate(
            {key: value for key, value in options.items() if key in CONNECTION.spellings()}, where), where)
        self.where = where
        self.unix_socket = options.get("unix_socket")
        self.host = options.get("host") or ("127.0.0.1" if not self.unix_socket else None)
        self.port = options.get("port", 6379)
        self.username = options.get("username")
        self.password = options.get("password")
        self.tls = options.get("tls", False)
        self.tls_ca = options.get("tls_ca")
        self.tls_cert = options.get("tls_cert")
        self.tls_key = options.get("tls_key")
        self.tls_insecure = options.get("tls_insecure", False)
        self.connect_timeout = float(options.get("connect_timeout", 10))
        self.bin_dir = options.get("bin_dir")

    @property
    def secrets(self):
        return (self.password,) if self.password else ()

    def endpoint(self):
        return self.unix_socket or "%s:%d" % (self.host, self.port)

    def client(self, db=0):
        """A connected redis-py client (PING checked); clear SourceError otherwise."""
        require_redis("Redis backups and restores")
        kwargs = dict(db=db, username=self.username, password=self.password,
                      socket_connect_timeout=self.connect_timeout, socket_timeout=max(self.connect_timeout, 60))
        if self.unix_socket:
            kwargs["unix_socket_path"] = self.unix_socket
        else:
            kwargs.update(host=self.host, port=self.port)
            if self.tls:
                kwargs.update(ssl=True, ssl_ca_certs=self.tls_ca, ssl_certfile=self.tls_cert,
                              ssl_keyfile=self.tls_key, ssl_cert_reqs="none" if self.tls_insecure else "required")
        client = redis.Redis(**kwargs)
        try:
            client.ping()
        except redis.exceptions.AuthenticationError as exc:
            client.close()
            raise SourceError("redis: authentication to %s as %s failed: %s"
                              % (self.endpoint(), self.username or "default", self.scrub(exc))) from None
        except redis.exceptions.RedisError as exc:
            client.close()
            raise SourceError("redis: cannot connect to %s: %s" % (self.endpoint(), self.scrub(exc))) from None
        return client

    def scrub(self, text):
        return procutil.scrub(" ".join(str(text).split()), self.secrets)

    def cli_argv(self):
        """redis-cli connection arguments (no secret: the password goes in REDISCLI_AUTH)."""
        argv = [procutil.find_tool("redis-cli", self.bin_dir), "--no-auth-warning"]
        if self.unix_socket:
            argv += ["-s", self.unix_socket]
        else:
            argv += ["-h", self.host, "-p", str(self.port)]
        if self.username:
            argv += ["--user", self.username]
        if self.tls:
            argv.append("--tls")
            for flag, value in (("--cacert", self.tls_ca), ("--cert", self.tls_cert), ("--key", self.tls_key)):
                if value:
                    argv += [flag, value]
            if self.tls_insecure:
                argv.append("--insecure")
        return argv

    def cli_env(self):
        return procutil.tool_env({"REDISCLI_AUTH": self.password}, drop=("REDISCLI_AUTH",))

    def describe(self):
        return {"endpoint": self.endpoint(), "username": self.username or "default", "tls": self.tls}


def keyspace(client):
    """``({"db0": keys, ...}, {"db0": expires, ...})`` from INFO keyspace (empty dbs absent)."""
    info = client.info("keyspace")
    keys, expires = {}, {}
    for name, value in info.items():
        if re.match(r"^db\d+$", name) and isinstance(value, dict):
            keys[name] = int(value.get("keys", 0))
            expires[name] = int(value.get("expires", 0))
    return keys, expires


class RdbStream:
    """The RDB bytes of a ``redis-cli --rdb -`` run, without the diskless EOF marker."""

    def __init__(self, tool):
        self._tool = tool
        self._held = b""
        self._done = False
        self._checked_header = False
        self.size = 0

    def readable(self):
        return True

    def read(self, size=procutil.CHUNK):
        if self._done:
            return b""
        if size is None or size < 0:
            size = procutil.CHUNK
        while True:
            data = self._tool.read(size)
            if not data:
                self._done = True
                return self._finish()
            buffered = self._held + data
            if not self._checked_header and len(buffered) >= 5:
                if not buffered.startswith(b"REDIS"):
                    raise SourceError("redis-cli --rdb did not produce an RDB file (it starts with %r)"
                                      % buffered[:16])
                self._checked_header = True
            if len(buffered) > EOF_MARK_SIZE:
                out, self._held = buffered[:-EOF_MARK_SIZE], buffered[-EOF_MARK_SIZE:]
                self.size += len(out)
                return out
            self._held = buffered

    def _finish(self):
        text = "\n".join(self._tool.stderr_lines())
        total = self.size + len(self._held)
        marked = _MARKED_RE.search(text)
        sized = _SIZED_RE.search(text)
        if marked:
            expected = int(marked.group(1))
            if total == expected + EOF_MARK_SIZE:
                tail = b""
            elif total == expected:
                tail = self._held
            else:
                raise SourceError("redis-cli reported an RDB of %d bytes but wrote %d" % (expected, total))
        elif sized:
            expected = int(sized.group(1))
            if total != expected:
                raise SourceError("redis-cli announced %d RDB bytes but wrote %d" % (expected, total))
            tail = self._held
        else:
            raise SourceError("redis-cli --rdb did not report the size of the transfer: %s"
                              % (" ".join(text.split())[-500:] or "no output"))
        if total == 0 or (not self._checked_header and not self._held.startswith(b"REDIS")):
            raise SourceError("redis-cli --rdb produced no RDB data")
        self.size += len(tail)
        return tail


class RedisSource(Source):
    kind = "redis"
    SCHEMA = CONNECTION.extend("source", {})

    def __init__(self, options):
        super().__init__(options)
        self.conn = RedisConnection(self.options, "source")
        self._versions = None

    def describe(self):
        return self.conn.describe()

    def tool_versions(self):
        if self._versions is None:
            self._versions = {"redis-cli": procutil.tool_version(procutil.find_tool("redis-cli", self.conn.bin_dir))[0]}
        return dict(self._versions)

    def preflight(self):
        """redis-cli present, server reachable with these credentials."""
        self.tool_versions()
        self.conn.client().close()

    def produce(self, emit, context):
        client = self.conn.client()
        try:
            server = client.info("server")
            before, expires = keyspace(client)
            tool = procutil.ToolStream(self.conn.cli_argv() + ["--rdb", "-"], env=self.conn.cli_env(),
                                       what="redis-cli --rdb", secrets=self.conn.secrets)
            stream = RdbStream(tool)
            try:
                emit(RDB_PAYLOAD, stream)
            finally:
                tool.close()
            after, expires_after = keyspace(client)
        except redis.exceptions.RedisError as exc:
            raise SourceError("redis: %s failed: %s" % (self.conn.endpoint(), self.conn.scrub(exc))) from None
        finally:
            client.close()
        return {
            "keys": before,
            "keys_after": after,
            "expires": {db: max(expires.get(db, 0), expires_after.get(db, 0)) for db in set(expires) | set(expires_after)},
            "consistent": before == after,
            "total_keys": sum(before.values()),
            "redis_version": server.get("redis_version"),
            "rdb_bytes": stream.size,
        }
