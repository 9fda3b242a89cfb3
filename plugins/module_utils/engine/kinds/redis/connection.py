"""Redis connections, shared by the redis source, target and drills.

``RedisConnection`` turns the connection fields (``CONNECTION``) into a Python client and
redis-cli's arguments; the password reaches redis-cli through ``REDISCLI_AUTH`` and the
client as a parameter, never argv, logs or a manifest. ``keyspace`` is the per-database key
count that a backup records and a restore compares.
"""

import re

from ...config import resolve_secret_refs
from ...errors import MissingDependencyError, SourceError
from ... import procutil
from ...lazyimport import LazyModule
from ...schema import Field, Schema


redis = LazyModule("redis")

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
