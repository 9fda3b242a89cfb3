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

from ...errors import SourceError
from ... import procutil
from ..contract import Source
from .connection import CONNECTION, RedisConnection, keyspace, redis

RDB_PAYLOAD = "dump.rdb"
EOF_MARK_SIZE = 40
_MARKED_RE = re.compile(r"Transfer finished with success after (\d+) bytes")
_SIZED_RE = re.compile(r"writing (\d+) bytes to")


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
