"""Redis restore target: load the RDB into a private redis-server, then copy keys into the live one.

A running Redis cannot be handed an RDB file, and stopping it to drop a file into its
directory is not a restore anyone can do on a live service. So:

1. the verified ``dump.rdb`` stream is written into a private temporary directory and a
   temporary ``redis-server`` (unix socket only, no TCP port, no persistence) loads it;
   loading checks the RDB's own checksum, and its key counts are compared with ``stats``;
2. unless ``replace`` or ``flush`` is set, keys that already exist in the target are
   looked up first and the restore refuses (nothing written) when any does;
3. with ``flush: true`` each target database that receives keys is emptied (only now,
   after the backup has proved it loads);
4. keys move with ``DUMP`` / ``PTTL`` on the temporary server and ``RESTORE`` (TTL kept,
   ``REPLACE`` when asked) on the target, in pipelined batches (memory bounded by a batch);
5. every key of the backup is then looked up in the target (``EXISTS``) and counted.

When the copy fails half-way without ``replace``/``flush``, the keys already copied are
deleted again (they did not exist before), so the target is as it was. With ``replace``
or ``flush`` the overwritten values are gone: the error says so.

``scratch()`` only does step 1: a temporary server, the checks, then it is stopped.

One pass (``one_pass_payloads``): ``dump.rdb`` is declared. Step 1 writes the stream into the
private directory and finishes it (size and SHA-256 checked) before the temporary server
starts, and the live server is first touched in step 2 (read) and step 4 (write), so a
damaged backup stops before it, with ``flush`` and ``replace`` as well: the flush comes
only after the verified RDB loaded. Any exception removes the directory and stops the
temporary server.
"""

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time

from ...errors import BackupError, ConfigError, IntegrityError, SourceError
from ...manifest import Manifest
from ... import procutil
from ...schema import Field
from ..contract import Target
from .connection import CONNECTION, RedisConnection, keyspace, redis, require_redis
from .source import RDB_PAYLOAD

CHUNK = 1 << 20
_DB_RE = re.compile(r"^(?:db)?(\d+)$")


def _db_index(name, where):
    match = _DB_RE.match(str(name))
    if match is None:
        raise ConfigError("%s: %r is not a Redis database (use 0, 1, ... or db0, db1, ...)" % (where, name))
    return int(match.group(1))


def expected_range(stats, db):
    """``(low, high)`` key counts the backup of ``db`` may hold, from the source's INFO counts.

    The RDB is the dataset at the fork, between the ``keys`` and ``keys_after`` snapshots;
    keys with a TTL may have expired since (a master drops them while loading).
    """
    before = (stats.get("keys") or {}).get(db, 0)
    after = (stats.get("keys_after") or {}).get(db, before)
    expires = (stats.get("expires") or {}).get(db, 0)
    return max(min(before, after) - expires, 0), max(before, after)


class TempRedisServer:
    """A private redis-server loading ``<dir>/dump.rdb``, reachable only by its unix socket."""

    def __init__(self, binary, directory, databases=16, load_timeout=600.0):
        self.binary = binary
        self.dir = directory
        self.socket = None
        self._socket_dir = None  # a directory of its own when the socket's path under ``directory`` is too long
        self.log_path = os.path.join(directory, "redis.log")
        self.databases = databases
        self.load_timeout = load_timeout
        self.proc = None

    def start(self):
        require_redis("Redis restores")
        socket_dir, temporary = procutil.socket_directory(self.dir, "redis.sock")
        self._socket_dir = socket_dir if temporary else None
        self.socket = os.path.join(socket_dir, "redis.sock")
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self):
        argv = [self.binary, "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
                "--dir", self.dir, "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no",
                "--databases", str(self.databases), "--daemonize", "no", "--logfile", self.log_path,
                "--protected-mode", "yes", "--maxmemory", "0", "--rdbchecksum", "yes"]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, cwd=self.dir, start_new_session=True)
        except OSError as exc:
            raise SourceError("cannot start %s: %s" % (self.binary, exc.strerror)) from None
        deadline = time.monotonic() + self.load_timeout
        while True:
            if self.proc.poll() is not None:
                raise self._load_failure()
            if os.path.exists(self.socket):
                try:
                    client = self.client()
                    try:
                        info = client.info("persistence")
                    finally:
                        client.close()
                    if not info.get("loading") and not info.get("async_loading"):
                        return self
                except redis.exceptions.RedisError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise SourceError("the temporary redis-server did not finish loading the backup within %ds"
                                  % self.load_timeout)
            time.sleep(0.1)

    def _load_failure(self):
        tail = self._tail()
        log = self._log_text() or ""
        if "Server initialized" not in log:
            # It stopped before it opened the backup (a socket it could not create, a bad
            # option): nothing is known about the backup, so this is no verdict on it.
            return SourceError("the temporary redis-server did not start: %s" % tail)
        if self.proc.returncode < 0 or "Out Of Memory" in log:
            # Killed (the OOM killer) or out of memory while loading: the RDB had passed its
            # SHA-256 check, and the machine, not the backup, is what failed.
            return SourceError("the temporary redis-server stopped while loading the backup (%s): give it more "
                               "memory (the pod's memory limit) and verify again; %s"
                               % ("signal %d" % -self.proc.returncode if self.proc.returncode < 0 else "out of memory",
                                  tail))
        if "RDB format version" in tail or "Can't handle RDB" in tail:
            return ConfigError("the temporary redis-server (%s) cannot read this RDB: it was written by a newer "
                               "Redis; set redis_server to a matching redis-server binary (%s)" % (self.binary, tail))
        return IntegrityError("the temporary redis-server could not load the backup's RDB: %s" % tail)

    def _log_text(self):
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return None

    def _tail(self, lines=8):
        text = self._log_text()
        if text is None:
            return "no log"
        wanted = [line.split(" * ", 1)[-1].split(" # ", 1)[-1] for line in text[-8000:].splitlines() if line.strip()]
        return "; ".join(wanted[-lines:])

    def client(self, db=0):
        return redis.Redis(unix_socket_path=self.socket, db=db, socket_timeout=300)

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


class RedisTarget(Target):
    kind = "redis"
    plans_in_check_mode = True
    SCHEMA = CONNECTION.extend("target", {
        "flush": Field("bool", "empty each restored database before loading it (default false)"),
        "replace": Field("bool", "overwrite keys that already exist (default false: a clash fails the restore)"),
        "db_map": Field("dict", "restore backed-up databases into others, e.g. {db0: db5}"),
        "batch_size": Field("int", "keys copied per pipeline round trip (default 500)", minimum=1, maximum=100000),
        "temp_dir": Field("path", "where the scratch redis-server keeps the RDB file (default: system temp)"),
        "redis_server": Field("path", "redis-server binary for the scratch server (default: PATH)"),
        "load_timeout": Field("number", "seconds the scratch server may take to load the RDB file (default 600)",
                              exclusive_minimum=0, maximum=86400),
    })

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        self.conn = RedisConnection(options, "target")
        self.flush = options.get("flush", False)
        self.replace = options.get("replace", False)
        self.db_map = {}
        for source, dest in (options.get("db_map") or {}).items():
            self.db_map[_db_index(source, "target.db_map")] = _db_index(dest, "target.db_map")
        self.batch_size = options.get("batch_size", 500)
        self.temp_dir = options.get("temp_dir")
        self.redis_server = options.get("redis_server")
        self.load_timeout = float(options.get("load_timeout", 600))
        self.scratch_only = False

    def describe(self):
        if self.scratch_only:
            return {"scratch": "temporary redis-server"}
        return dict(self.conn.describe(), flush=self.flush, replace=self.replace,
                    db_map={"db%d" % k: "db%d" % v for k, v in sorted(self.db_map.items())})

    def _server_binary(self):
        if self.redis_server:
            if not os.access(self.redis_server, os.X_OK):
                raise ConfigError("redis target: redis_server %s is not an executable" % self.redis_server)
            return self.redis_server
        return procutil.find_tool("redis-server", self.conn.bin_dir)

    def _dest(self, db):
        return self.db_map.get(db, db)

    def preflight(self, manifest):
        require_redis("Redis restores")
        manifest = self._backup_of_kind(manifest, RDB_PAYLOAD)
        self._server_binary()
        if not self.scratch_only:
            client = self.conn.client()
            try:
                configured = int(client.config_get("databases").get("databases", 16))
            except redis.exceptions.RedisError:
                configured = None  # CONFIG may be disabled; RESTORE into a missing db fails clearly later
            finally:
                client.close()
            for name in manifest.stats.get("keys") or {}:
                dest = self._dest(_db_index(name, "stats.keys"))
                if configured is not None and dest >= configured:
                    raise ConfigError("redis target has %d databases; the backup's %s would go to db%d"
                                      % (configured, name, dest))

    def one_pass_payloads(self, manifest, chain):
        """``dump.rdb``: finished in the private directory before any server sees it."""
        return {(Manifest.wrap(manifest).id, RDB_PAYLOAD)}

    def restore(self, context):
        manifest = context.manifest
        stats = manifest.stats
        started = time.monotonic()
        if context.check_mode:
            return self.plan(manifest)
        workdir = tempfile.mkdtemp(prefix="bb-redis-restore-", dir=self.temp_dir)
        os.chmod(workdir, 0o700)
        server = None
        try:
            rdb_bytes = self._write_rdb(context, os.path.join(workdir, "dump.rdb"))
            dbs = sorted(_db_index(name, "stats.keys") for name in
                         set(stats.get("keys") or {}) | set(stats.get("keys_after") or {}))
            databases = max([16] + [db + 1 for db in dbs])
            server = TempRedisServer(self._server_binary(), workdir, databases, self.load_timeout).start()
            loaded, checks = self._check_loaded(server, stats)
            report = {"changed": False, "checks": checks, "rdb_bytes": rdb_bytes, "keys": loaded}
            failed = [check for check in checks if not check["ok"]]
            if failed:
                raise IntegrityError("redis restore of %s: the backup holds %s keys in %s, the source reported %s"
                                     % (manifest.id, failed[0]["actual"], failed[0]["what"],
                                        failed[0]["expected"]))
            if not self.scratch_only:
                copy = self._copy_into_target(server, loaded)
                report["checks"] = checks + copy.pop("checks")
                report.update(copy)
                failed = [check for check in report["checks"] if not check["ok"]]
                if failed:
                    raise IntegrityError("redis restore of %s: %s: expected %s, found %s"
                                         % (manifest.id, failed[0]["what"], failed[0]["expected"],
                                            failed[0]["actual"]))
            report["duration_seconds"] = round(time.monotonic() - started, 3)
            return report
        finally:
            if server is not None:
                server.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    def plan(self, manifest):
        """What ``restore`` would load, write and flush (check mode); reads, never writes."""
        stats = Manifest.wrap(manifest).stats
        plan = {"changed": not self.scratch_only, "check_mode": True, "checks": [],
                "would_load": dict(stats.get("keys") or {})}
        if self.scratch_only:
            plan["would_start"] = "temporary redis-server"
            return plan
        client = self.conn.client()
        try:
            current = keyspace(client)[0]
        finally:
            client.close()
        plan["target"] = self.conn.endpoint()
        plan["target_keys"] = current
        dests = ["db%d" % self._dest(_db_index(name, "stats.keys")) for name in sorted(stats.get("keys") or {})]
        plan["would_write"] = dests
        plan["would_flush"] = dests if self.flush else []
        plan["replace"] = self.replace
        return plan

    @staticmethod
    def _write_rdb(context, path):
        stream = context.open_payload(context.manifest, RDB_PAYLOAD)
        try:
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                while True:
                    chunk = stream.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
            return stream.finish()["plain_bytes"]
        finally:
            stream.close()

    @staticmethod
    def _check_loaded(server, stats):
        client = server.client()
        try:
            loaded = keyspace(client)[0]
        finally:
            client.close()
        checks = []
        for name in sorted(set(stats.get("keys") or {}) | set(stats.get("keys_after") or {}) | set(loaded)):
            low, high = expected_range(stats, name)
            actual = loaded.get(name, 0)
            expected = high if low == high else "%d..%d" % (low, high)
            checks.append({"what": "keys %s in backup" % name, "expected": expected, "actual": actual,
                           "ok": low <= actual <= high})
        return loaded, checks

    # -- copying into the live server --------------------------------------------------
    def _copy_into_target(self, server, loaded):
        plan = [(_db_index(name, "keys"), self._dest(_db_index(name, "keys"))) for name in sorted(loaded)]
        if not self.flush and not self.replace:
            for db, dest in plan:
                clash = self._first_existing(server, db, dest)
                if clash is not None:
                    raise ConfigError("redis target: key %r already exists in db%d of %s (and more may); nothing "
                                      "was written. Set replace: true to overwrite, or flush: true to empty the "
                                      "database first" % (clash, dest, self.conn.endpoint()))
        checks = []
        copied = {}
        touched = []
        try:
            if self.flush:
                for dest in sorted({item[1] for item in plan}):
                    client = self.conn.client(dest)
                    try:
                        client.flushdb()
                    finally:
                        client.close()
            for db, dest in plan:
                touched.append((db, dest))
                copied["db%d" % dest] = self._copy_db(server, db, dest)
        except BaseException as exc:
            if not self.flush and not self.replace:
                undo = self._remove_copied(server, touched)
            else:
                undo = " (values overwritten or flushed before the failure are lost: restore again)"
            if isinstance(exc, redis.exceptions.RedisError):
                raise SourceError("redis target: copying keys into %s failed: %s%s"
                                  % (self.conn.endpoint(), self.conn.scrub(exc), undo)) from None
            if isinstance(exc, BackupError):
                raise type(exc)(str(exc) + undo) from None
            raise
        for db, dest in plan:
            present = self._count_present(server, db, dest)
            checks.append({"what": "keys db%d restored into db%d" % (db, dest), "expected": loaded["db%d" % db],
                           "actual": present, "ok": present == loaded["db%d" % db]})
            if self.flush:
                client = self.conn.client(dest)
                try:
                    size = client.dbsize()
                finally:
                    client.close()
                checks.append({"what": "keys in flushed db%d" % dest, "expected": loaded["db%d" % db],
                               "actual": size, "ok": size == loaded["db%d" % db]})
        return {"changed": True, "target": self.conn.endpoint(), "copied": copied, "flushed": self.flush,
                "checks": checks}

    def _batches(self, client):
        batch = []
        for key in client.scan_iter(count=self.batch_size):
            batch.append(key)
            if len(batch) >= self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    @contextlib.contextmanager
    def _pair(self, server, db, dest):
        """Clients of the temporary server's ``db`` and the target's ``dest``, closed afterwards."""
        src, dst = server.client(db), self.conn.client(dest)
        try:
            yield src, dst
        finally:
            src.close()
            dst.close()

    @staticmethod
    def _present(client, keys):
        """The ``keys`` that exist in ``client``'s database (one pipelined EXISTS each)."""
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        return [key for key, found in zip(keys, pipe.execute()) if found]

    def _first_existing(self, server, db, dest):
        with self._pair(server, db, dest) as (src, dst):
            for keys in self._batches(src):
                present = self._present(dst, keys)
                if present:
                    return present[0].decode("utf-8", "replace")[:200]
        return None

    def _copy_db(self, server, db, dest):
        copied = 0
        with self._pair(server, db, dest) as (src, dst):
            for keys in self._batches(src):
                read = src.pipeline(transaction=False)
                for key in keys:
                    read.dump(key)
                    read.pttl(key)
                values = read.execute()
                write = dst.pipeline(transaction=False)
                sent = []
                for index, key in enumerate(keys):
                    payload, ttl = values[2 * index], values[2 * index + 1]
                    if payload is None or ttl == -2:
                        continue  # expired inside the temporary server since it loaded
                    write.restore(key, ttl if ttl > 0 else 0, payload, replace=self.replace)
                    sent.append((key, payload))
                for (key, payload), result in zip(sent, write.execute(raise_on_error=False)):
                    if isinstance(result, Exception):
                        if "BUSYKEY" in str(result) and dst.dump(key) == payload:
                            continue  # SCAN returned this key twice; it is already here
                        raise SourceError("redis target: RESTORE of key %r into db%d failed: %s"
                                          % (key.decode("utf-8", "replace")[:200], dest, self.conn.scrub(result)))
                    copied += 1
        return copied

    def _count_present(self, server, db, dest):
        with self._pair(server, db, dest) as (src, dst):
            return sum(dst.exists(*keys) for keys in self._batches(src))

    def _remove_copied(self, server, touched):
        """Undo a partial copy: the backup's keys did not exist in the target before.

        Only keys that are present are deleted, so a key that was never written (and that
        this user may not even be allowed to delete) is left alone.
        """
        try:
            for db, dest in touched:
                with self._pair(server, db, dest) as (src, dst):
                    for keys in self._batches(src):
                        present = self._present(dst, keys)
                        if present:
                            dst.delete(*present)
        except Exception:  # pylint: disable=broad-except
            return " (removing the keys copied so far failed too: check the target)"
        return " (the keys copied so far were removed again: the target is as before)"

    @classmethod
    @contextlib.contextmanager
    def scratch(cls, manifest, options):
        """A target that loads the backup into a temporary redis-server, checks it, and stops it."""
        keep = {key: value for key, value in (options or {}).items()
                if key in ("temp_dir", "redis_server", "load_timeout", "bin_dir")}
        target = cls(keep)
        target.scratch_only = True
        yield target
