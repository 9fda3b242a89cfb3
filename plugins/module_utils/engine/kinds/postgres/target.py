"""PostgreSQL restore target: restore next to the live database, check, then swap by rename.

1. ``CREATE DATABASE <new>`` (``restore_database``, default ``<database>_restore_<backup id>``);
2. ``pg_restore`` reads the verified ``database.dump`` stream on stdin into it;
3. exact row counts of every user table are compared with the manifest's ``stats.tables``;
4. with ``swap: true``: connections to ``<database>`` are refused and terminated, it is
   renamed to ``<database>_pre_restore_<UTC time>`` (kept for rollback) and ``<new>`` takes
   its name; ``drop_old: true`` drops the kept database at once.

Any failure before the swap drops ``<new>``; a failure inside the swap renames everything
back. The live database is never written to; it only changes name in step 4.

With ``jobs`` above 1, step 2 becomes two: the verified stream is first written to a private
spool file under ``scratch_dir`` (its size and SHA-256 are checked at its end, before
``CREATE DATABASE``), then ``pg_restore --jobs N`` reads that file, which it needs to be
seekable. The spool never has a name (``O_TMPFILE``, or unlinked at once where that is not
supported; 0600): pg_restore inherits its descriptor and opens it as ``/dev/fd/N``, so the
kernel frees it when the last process holding it ends, whether the restore finished, failed
or was killed (a SIGKILLed runner on a host left a decrypted dump behind before). A scratch
file system with less free space than the dump's recorded size plus a margin is refused
before anything is created. See docs/performance.md for when this pays.

One pass: the dump is declared to the engine (:meth:`PostgresTarget.one_pass_payloads`):
its stream is read to its end and finished (size and SHA-256 checked) before the row counts
and the swap, and the new database is dropped on any failure, so the live one is never
touched by a bad backup. ``globals.sql`` is applied to the server in place and is verified
in full by the engine first.
"""

import contextlib
import io
import os
import re
import tempfile
import time

from ...errors import ConfigError, IntegrityError, SourceError
from ...manifest import Manifest
from ... import procutil
from ...schema import Field
from ...timeutil import utc_now
from ..contract import Target
from .connection import CONNECTION, PgConnection, count_rows, require_psycopg, sql
from .source import DUMP_PAYLOAD, GLOBALS_PAYLOAD

MAX_IDENTIFIER = 63
KEPT_MARKER = "_pre_restore_"
ROLLED_BACK_MARKER = "_rolled_back_"


def database_name(base, suffix):
    """``base + suffix`` within PostgreSQL's 63-byte identifier limit (``base`` is cut)."""
    room = MAX_IDENTIFIER - len(suffix.encode("utf-8"))
    cut = base.encode("utf-8")[:max(room, 1)].decode("utf-8", "ignore")
    return cut + suffix


# What a database name we create or rename may hold: letters (any script), digits, '_', '-',
# '.', '$' and spaces. PostgreSQL would accept anything quoted, but a name with quotes,
# semicolons or control characters is almost always an injection attempt or a typo, and
# nobody wants to find such a database on their server.
_DATABASE_NAME = re.compile(r"^\w[\w$. -]*$")


def check_database_name(name, where):
    """ConfigError unless ``name`` is a plain database name of 1-63 bytes (for names we create)."""
    if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_IDENTIFIER:
        raise ConfigError("%s: %r is not a valid database name (1-63 bytes)" % (where, name))
    if not _DATABASE_NAME.match(name) or name != name.strip():
        raise ConfigError("%s: %r is not a plain database name: use letters, digits, '_', '-', '.', '$' "
                          "(no quotes, semicolons, leading/trailing spaces or control characters)" % (where, name))


def _id_suffix(backup_id):
    return re.sub(r"[^a-z0-9]+", "_", backup_id.lower())


# -- parallel restore ------------------------------------------------------------------

AUTO_JOBS_MAX = 4
MAX_JOBS = 64
# Free space the spool leaves on the scratch file system beyond the dump itself.
SPOOL_MARGIN_BYTES = 64 << 20
SPOOL_MARGIN_FRACTION = 0.02
SPOOL_PREFIX = ".biometrics-pg-restore-"


def usable_cores():
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 ``cpu.max`` quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def parse_jobs(value):
    """``jobs`` as an int: an integer 1..64, or ``auto`` (min(usable cores, 4))."""
    if value is None:
        return 1
    if isinstance(value, str) and value.strip().lower() == "auto":
        return min(usable_cores(), AUTO_JOBS_MAX)
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        number = None
    if number is None or not 1 <= number <= MAX_JOBS:
        raise ConfigError("target.jobs must be an integer from 1 to %d or 'auto', got %r" % (MAX_JOBS, value))
    return number


def scratch_free_bytes(path):
    """Bytes an unprivileged writer may still put on the file system of ``path`` (statvfs)."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def spool_needed_bytes(raw_bytes):
    """Free space the spool of a ``raw_bytes`` dump asks for: the dump plus a margin."""
    return raw_bytes + max(SPOOL_MARGIN_BYTES, int(raw_bytes * SPOOL_MARGIN_FRACTION))


def _human(count):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return "%.1f %s" % (count, unit) if unit != "B" else "%d B" % count
        count /= 1024.0
    return "%d B" % count


class PostgresTarget(Target):
    kind = "postgres"
    plans_in_check_mode = True
    SCHEMA = CONNECTION.extend("target", {
        "restore_database": Field("str", "database to restore into (default <database>_restore_<backup id>)"),
        "maintenance_database": Field("str", "database to connect to for CREATE/ALTER/DROP DATABASE (default postgres)",
                                      nonempty=True),
        "swap": Field("bool", "rename the restored database to the live name, keeping the old one (default false)"),
        "drop_old": Field("bool", "with swap: drop the old database at once instead of keeping it (default false)"),
        "no_owner": Field("bool", "pg_restore --no-owner (default false)"),
        "no_privileges": Field("bool", "pg_restore --no-privileges (default false)"),
        "restore_globals": Field("bool", "also replay globals.sql (roles, tablespaces; default false)"),
        "swap_timeout": Field("number", "seconds to wait for the live database's sessions to end (default 30)",
                              exclusive_minimum=0, maximum=86400),
        "jobs": Field("any", "pg_restore --jobs: an integer 1-64, or auto (usable cores, at most 4); above 1 the "
                             "verified dump is spooled to scratch_dir first (default 1)"),
        "scratch_dir": Field("path", "directory for the spooled dump when jobs > 1 (default: the system temp dir); "
                                     "needs the dump's size plus a margin free"),
    })

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        self.conn = PgConnection(options, "target")
        self.restore_database = options.get("restore_database")
        self.maintenance_database = options.get("maintenance_database") or "postgres"
        self.swap = options.get("swap", False)
        self.drop_old = options.get("drop_old", False)
        if self.drop_old and not self.swap:
            raise ConfigError("postgres target: drop_old only makes sense with swap: true")
        self.no_owner = options.get("no_owner", False)
        self.no_privileges = options.get("no_privileges", False)
        self.restore_globals = options.get("restore_globals", False)
        self.swap_timeout = float(options.get("swap_timeout", 30))
        self.jobs = parse_jobs(options.get("jobs"))
        self.scratch_dir = options.get("scratch_dir")
        self._stamp = None
        self._created = set()   # databases this object created (the only ones it may drop on failure)
        if self.restore_database is not None:
            check_database_name(self.restore_database, "target.restore_database")
        if self.conn.database is not None and len(self.conn.database.encode("utf-8")) > MAX_IDENTIFIER:
            raise ConfigError("target.database: %r is not a valid database name (1-63 bytes)" % (self.conn.database,))

    # -- names -------------------------------------------------------------------------
    def names(self, manifest):
        """``(target database, new database)`` for restoring ``manifest``."""
        manifest = Manifest.wrap(manifest)
        target = self.conn.database or manifest.stats.get("database")
        if not target:
            raise ConfigError("postgres target: give database (the backup's stats name none)")
        new = self.restore_database or database_name(target, "_restore_" + _id_suffix(manifest.id))
        if new == target:
            raise ConfigError("postgres target: restore_database must differ from database %s: the restore "
                              "always goes into a new database first" % target)
        return target, new

    def describe(self):
        return dict(self.conn.describe(), restore_database=self.restore_database, swap=self.swap,
                    drop_old=self.drop_old, jobs=self.jobs)

    # -- helpers -----------------------------------------------------------------------
    def _admin(self):
        return self.conn.connect(self.maintenance_database, autocommit=True)

    @staticmethod
    def _exists(admin, name):
        return admin.execute("SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (name,)).fetchone() is not None

    def _error(self, what, exc):
        detail = procutil.scrub(" ".join(str(exc).split()), self.conn.secrets)
        return SourceError("postgres target: %s: %s" % (what, detail))

    def drop_database(self, name):
        """DROP DATABASE ``name`` (forcing connections off); no error when it is absent."""
        with self._admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # -- contract ----------------------------------------------------------------------
    def one_pass_payloads(self, manifest, chain):
        """The dump is read, finished (checked) and only then counted and swapped; the new
        database it goes into is dropped on any failure. globals.sql is applied in place to
        the server, so the engine verifies it in full first. With ``restore_globals`` and one
        job the globals are applied before the dump stream is read, so a dump damaged near its
        end would be found after the server's roles changed: two passes then (with jobs > 1
        the dump is spooled and checked before anything else, so one pass stays safe)."""
        if self.restore_globals and self.jobs <= 1:
            return None
        return {(Manifest.wrap(manifest).id, DUMP_PAYLOAD)}

    def _spool_dir(self):
        return self.scratch_dir or tempfile.gettempdir()

    def check_scratch(self, manifest):
        """With jobs > 1: the spool's size from the manifest; ConfigError when it cannot fit."""
        if self.jobs <= 1:
            return 0
        manifest = Manifest.wrap(manifest)
        dump = manifest.payload_object(DUMP_PAYLOAD)
        raw = [dump.raw_bytes] if dump is not None else []
        if not raw or not isinstance(raw[0], int):
            raise ConfigError("postgres target: backup %s does not record the size of its %s, so a spool for "
                              "jobs: %d cannot be bounded; restore it with jobs: 1"
                              % (manifest.id, DUMP_PAYLOAD, self.jobs))
        where = self._spool_dir()
        if not os.path.isdir(where):
            raise ConfigError("postgres target: scratch_dir %s is not a directory" % where)
        if not os.access(where, os.W_OK | os.X_OK):
            raise ConfigError("postgres target: scratch_dir %s is not writable" % where)
        needed = spool_needed_bytes(raw[0])
        free = scratch_free_bytes(where)
        if free < needed:
            raise ConfigError("postgres target: jobs: %d spools the %s dump of backup %s to %s, which has %s free; "
                              "it needs %s (the dump plus a margin). Give a larger scratch_dir or restore with "
                              "jobs: 1 (no spool)" % (self.jobs, _human(raw[0]), manifest.id, where, _human(free),
                                                      _human(needed)))
        return raw[0]

    def preflight(self, manifest):
        require_psycopg("PostgreSQL restores")
        manifest = self._backup_of_kind(manifest, DUMP_PAYLOAD)
        restore_path = self.conn.tool("pg_restore")
        restore_major = procutil.tool_version(restore_path)[1][0]
        dumped_with = str(manifest.tool_versions.get("pg_dump") or "0")
        dump_major = int(re.match(r"\d*", dumped_with).group(0) or 0)
        if dump_major > restore_major:
            raise ConfigError("postgres target: the dump was made by pg_dump %s; pg_restore %d cannot read it "
                              "(install a newer pg_restore or set bin_dir)" % (dumped_with, restore_major))
        if self.restore_globals:
            self.conn.tool("psql")
        self.check_scratch(manifest)
        target, new = self.names(manifest)
        with self._admin() as admin:
            if self._exists(admin, new):
                raise ConfigError("postgres target: database %s already exists; drop it or choose another "
                                  "restore_database" % new)
            if self.swap and self._exists(admin, target):
                kept = self._kept_name(target)
                if self._exists(admin, kept):
                    raise ConfigError("postgres target: database %s (for the old %s) already exists" % (kept, target))

    def restore(self, context):
        manifest = context.manifest  # a Manifest (RestoreContext wraps it)
        if context.check_mode:
            return self.plan(manifest)
        target, new = self.names(manifest)
        started = time.monotonic()
        self.check_scratch(manifest)
        spool = None
        report = {"changed": True, "database": new, "target_database": target, "restored_into": new,
                  "swapped": False, "kept_database": None, "dropped_old": False, "jobs": self.jobs,
                  "scratch_bytes": 0}
        try:
            if self.jobs > 1:
                # The whole dump, checked at its end, before anything is created.
                spool, report["scratch_bytes"], report["spool_seconds"] = self._spool(context)
            with self._admin() as admin:
                target_exists = self._exists(admin, target)
                try:
                    admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(new)))
                except Exception as exc:  # pylint: disable=broad-except  # psycopg errors, reported plainly
                    raise self._error("cannot create database %s" % new, exc) from None
                self._created.add(new)
        except BaseException:
            _close_quietly(spool)
            raise
        try:
            if self.restore_globals:
                report["globals_messages"] = self._restore_globals(context)
            if spool is not None:
                began = time.monotonic()
                self._pg_restore_file(spool, new, context)
                report["pg_restore_seconds"] = round(time.monotonic() - began, 3)
                report["restore_bytes"] = report["scratch_bytes"]
            else:
                report["restore_bytes"] = self._pg_restore(context, new)
            actual = self._count(new)
            report["checks"] = compare_tables(manifest.stats.get("tables"), actual)
            report["tables"] = len(actual)
            report["rows"] = sum(actual.values())
            failed = [check for check in report["checks"] if not check["ok"]]
            if failed:
                raise IntegrityError("postgres restore of %s: %d table check(s) failed, e.g. %s expected %s rows, "
                                     "found %s; the restored copy was dropped"
                                     % (manifest.id, len(failed), failed[0]["what"], failed[0]["expected"],
                                        failed[0]["actual"]))
        except BaseException:
            self._drop_quietly(new)
            raise
        finally:
            _close_quietly(spool)
        if self.swap:
            try:
                report["kept_database"] = self._swap(target, new, target_exists)
            except BaseException:
                self._drop_quietly(new)
                raise
            report["swapped"] = True
            report["database"] = target
            if self.drop_old and report["kept_database"]:
                self.drop_database(report["kept_database"])
                report["dropped_old"] = True
                report["kept_database"] = None
        report["duration_seconds"] = round(time.monotonic() - started, 3)
        return report

    def plan(self, manifest):
        """What ``restore`` would create, rename and drop (check mode); reads, never writes."""
        target, new = self.names(manifest)
        with self._admin() as admin:
            target_exists = self._exists(admin, target)
        plan = {"changed": True, "check_mode": True, "would_create": new, "target_database": target,
                "would_restore": [DUMP_PAYLOAD] + ([GLOBALS_PAYLOAD] if self.restore_globals else []),
                "would_rename": [], "would_drop": [], "checks": [], "jobs": self.jobs,
                "scratch_bytes": self.check_scratch(manifest)}
        if self.swap:
            if target_exists:
                kept = self._kept_name(target)
                plan["would_rename"].append({"from": target, "to": kept})
                if self.drop_old:
                    plan["would_drop"].append(kept)
            plan["would_rename"].append({"from": new, "to": target})
        plan["expected_tables"] = len(Manifest.wrap(manifest).stats.get("tables") or {})
        return plan

    # -- steps -------------------------------------------------------------------------
    def _pg_restore_argv(self, new):
        # --verbose: pg_restore names each table as it loads its data, which is the restore's
        # progress in tables (TableProgress); its other chatter is kept out of error messages.
        argv = [self.conn.tool("pg_restore"), "--no-password", "--exit-on-error", "--verbose", "--dbname=%s" % new]
        if self.no_owner:
            argv.append("--no-owner")
        if self.no_privileges:
            argv.append("--no-privileges")
        return argv

    def _pg_restore(self, context, new):
        stream = context.open_payload(context.manifest, DUMP_PAYLOAD)
        try:
            procutil.feed_tool(self._pg_restore_argv(new), stream, env=self.conn.tool_env(new), what="pg_restore",
                               secrets=self.conn.secrets, on_stderr_line=TableProgress(context))
            return stream.finish()["plain_bytes"]
        finally:
            stream.close()

    def _spool(self, context):
        """The dump stream, read to its end and finished (size and SHA-256 checked), in a new
        nameless file under the scratch dir: ``(file, bytes, seconds)``. The file is closed
        (and so freed) when anything fails here; afterwards the caller closes it."""
        began = time.monotonic()
        where = self._spool_dir()
        try:
            spool = tempfile.TemporaryFile(prefix=SPOOL_PREFIX, suffix=".dump", dir=where)  # pylint: disable=consider-using-with
        except OSError as exc:
            raise SourceError("postgres target: cannot create a spool file in %s: %s"
                              % (where, exc.strerror or exc)) from None
        written = 0
        try:
            stream = context.open_payload(context.manifest, DUMP_PAYLOAD)
            try:
                while True:
                    data = stream.read(procutil.CHUNK)
                    if not data:
                        break
                    try:
                        spool.write(data)
                    except OSError as exc:
                        raise SourceError("postgres target: cannot write the spooled dump to %s after %s: %s"
                                          % (where, _human(written), exc.strerror or exc)) from None
                    written += len(data)
                stream.finish()
            finally:
                stream.close()
            spool.flush()
        except BaseException:
            _close_quietly(spool)
            raise
        return spool, written, round(time.monotonic() - began, 3)

    def _pg_restore_file(self, spool, new, context=None):
        """``pg_restore --jobs`` from the spool: it (and its forked workers) open the inherited
        descriptor by its /dev/fd path, each with an offset of its own."""
        argv = self._pg_restore_argv(new) + ["--jobs=%d" % self.jobs, procutil.fd_path(spool.fileno())]
        procutil.feed_tool(argv, io.BytesIO(b""), env=self.conn.tool_env(new), what="pg_restore",
                           secrets=self.conn.secrets, pass_fds=(spool.fileno(),),
                           on_stderr_line=TableProgress(context) if context is not None else None)

    def _restore_globals(self, context):
        """Roles and tablespaces into the server; "already exists" errors are expected and reported."""
        argv = [self.conn.tool("psql"), "--no-password", "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=0",
                "--dbname=%s" % self.maintenance_database, "--file=-"]
        stream = context.open_payload(context.manifest, GLOBALS_PAYLOAD)
        try:
            lines = procutil.feed_tool(argv, stream, env=self.conn.tool_env(self.maintenance_database),
                                       what="psql (globals.sql)", secrets=self.conn.secrets)
            stream.finish()
        finally:
            stream.close()
        return lines

    def _count(self, database):
        with self.conn.connect(database) as conn:
            conn.read_only = True
            return count_rows(conn)

    def _kept_name(self, target):
        if self._stamp is None:
            self._stamp = utc_now().strftime("%Y%m%dt%H%M%Sz")
        return database_name(target, KEPT_MARKER + self._stamp)

    def _drop_quietly(self, name):
        if name not in self._created:
            return
        try:
            self.drop_database(name)
        except Exception:  # pylint: disable=broad-except  # the original failure matters more
            pass

    def _rename(self, admin, old, new):
        admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))

    def _allow_connections(self, admin, name, allow):
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
            sql.Identifier(name), sql.SQL("true" if allow else "false")))

    def _evict(self, admin, name):
        """Terminate every session on ``name``; wait until none is left (or time out)."""
        deadline = time.monotonic() + self.swap_timeout
        while True:
            left = admin.execute(
                "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_catalog.pg_backend_pid()", (name,)).fetchone()[0]
            if not left:
                return
            if time.monotonic() > deadline:
                raise SourceError("postgres target: %d session(s) on %s could not be terminated within %ss "
                                  "(missing pg_signal_backend rights?)" % (left, name, self.swap_timeout))
            time.sleep(0.2)

    def _swap(self, target, new, target_exists):
        """Rename ``target`` aside (kept) and ``new`` into its place; undo on failure."""
        with self._admin() as admin:
            if not target_exists:
                try:
                    self._rename(admin, new, target)
                except Exception as exc:  # pylint: disable=broad-except
                    raise self._error("cannot rename %s to %s" % (new, target), exc) from None
                return None
            kept = self._kept_name(target)
            step = "refuse new connections to %s" % target
            renamed = False
            try:
                self._allow_connections(admin, target, False)
                step = "terminate the sessions on %s" % target
                self._evict(admin, target)
                step = "rename %s to %s" % (target, kept)
                self._rename(admin, target, kept)
                renamed = True
                step = "rename %s to %s" % (new, target)
                self._rename(admin, new, target)
            except BaseException as exc:
                try:
                    if renamed:
                        self._rename(admin, kept, target)
                    self._allow_connections(admin, target, True)
                except Exception:  # pylint: disable=broad-except  # report the first failure
                    pass
                if isinstance(exc, SourceError) or not isinstance(exc, Exception):
                    raise
                raise SourceError("postgres target: swap failed at '%s' (%s); %s is unchanged"
                                  % (step, procutil.scrub(" ".join(str(exc).split()), self.conn.secrets),
                                     target)) from None
            self._allow_connections(admin, kept, True)
            return kept

    # -- after a swap ------------------------------------------------------------------
    def kept_databases(self, target=None):
        """Databases kept for rollback by earlier swaps of ``target``, newest first."""
        target = target or self.conn.database
        with self._admin() as admin:
            rows = admin.execute("SELECT datname FROM pg_catalog.pg_database WHERE datname LIKE %s",
                                 (target.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")
                                  + "\\_pre\\_restore\\_%",)).fetchall()
        return sorted((row[0] for row in rows), reverse=True)

    def drop_kept(self, kept):
        """Drop a database kept by a swap (only names that a swap made are accepted)."""
        if KEPT_MARKER not in kept:
            raise ConfigError("postgres target: %s is not a database kept by a restore swap" % kept)
        self.drop_database(kept)
        return {"changed": True, "dropped": kept}

    def rollback(self, kept=None, target=None):
        """Put the kept database back under the target's name; the restored one is kept aside."""
        target = target or self.conn.database
        kept = kept or next(iter(self.kept_databases(target)), None)
        if not kept or KEPT_MARKER not in kept:
            raise ConfigError("postgres target: no database kept for rollback of %s" % target)
        aside = database_name(target, ROLLED_BACK_MARKER + utc_now().strftime("%Y%m%dt%H%M%Sz"))
        with self._admin() as admin:
            if not self._exists(admin, kept):
                raise ConfigError("postgres target: database %s does not exist" % kept)
            self._allow_connections(admin, target, False)
            try:
                self._evict(admin, target)
                self._rename(admin, target, aside)
            except BaseException:
                self._allow_connections(admin, target, True)
                raise
            self._rename(admin, kept, target)
            self._allow_connections(admin, aside, True)
        return {"changed": True, "database": target, "restored_from": kept, "set_aside": aside}

    @classmethod
    @contextlib.contextmanager
    def scratch(cls, manifest, options):
        """A throwaway database on the same server, dropped afterwards (for test restores)."""
        options = dict(options or {})
        for key in ("swap", "drop_old", "restore_globals", "restore_database"):
            options.pop(key, None)
        manifest = Manifest.wrap(manifest)
        base = options.get("database") or options.get("dbname") or manifest.stats.get("database") or "db"
        options.pop("dbname", None)
        options["database"] = base
        options["restore_database"] = database_name(base, "_verify_" + _id_suffix(manifest.id))
        options.setdefault("no_owner", True)
        options.setdefault("no_privileges", True)
        target = cls(options)
        try:
            yield target
        finally:
            target._drop_quietly(options["restore_database"])  # pylint: disable=protected-access


class TableProgress:
    """A ``pg_restore --verbose`` stderr hook: counts the tables whose data was loaded, notes
    them as the restore's progress and tells the tail to drop pg_restore's chatter, so a
    failure's message keeps its errors and their context. No total: the manifest counts
    partitioned parents too, which have no data of their own (the bytes give the percentage)."""

    # Searched, not anchored: with --jobs the workers share one stderr and pg_restore writes its
    # "pg_restore: " prefix and the message separately, so two workers' lines can interleave
    # ("pg_restore: pg_restore: processing data for table ..." then a line without a prefix).
    _DATA = re.compile(r'processing data for table "[^"]+"')
    _CHATTER = re.compile(r"^pg_restore: (?:processing |creating |connecting |executing |launching |finished |"
                          r"entering |setting |dropping |implied |disabling |enabling |skipping |"
                          r"restoring |warning: errors ignored)")

    def __init__(self, context):
        self._context = context
        self.loaded = 0

    def __call__(self, line):
        tables = len(self._DATA.findall(line))
        if tables:
            self.loaded += tables
            self._context.note_progress("tables", self.loaded)
            return True
        return bool(self._CHATTER.match(line))


def _close_quietly(spool):
    """Close (and so free) the spool file (None: nothing); a failure here must not hide the first one."""
    if spool is None:
        return
    try:
        spool.close()
    except OSError:
        pass


def compare_tables(expected, actual):
    """Checks ``{what, expected, actual, ok}``: one per table in either set, plus the table count."""
    expected = expected or {}
    checks = [{"what": "tables", "expected": len(expected), "actual": len(actual),
               "ok": set(expected) == set(actual)}]
    for name in sorted(set(expected) | set(actual)):
        want, got = expected.get(name), actual.get(name)
        checks.append({"what": "rows %s" % name, "expected": want, "actual": got, "ok": want == got})
    return checks
