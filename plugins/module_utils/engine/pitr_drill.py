"""The recovery drill of a ``postgres_base`` job: a point-in-time restore to a random moment.

``runner drill`` on a job of kind ``postgres_base`` (the weekly drill of a PITR job):

1. the recovery window: from the completion of the oldest stored base backup to the end of
   the stored WAL (as the restore's plan of ``latest`` reckons it: the newest partial copy's
   ``reach_time``, else its last commit). An empty window (no base backup, no WAL stored after it) fails the drill;
2. a target inside the window, drawn from a seed (``--seed``, else a fresh random one); the
   log and the result give the window, the seed and the target, and ``--point-in-time``
   repeats a drill at exactly that target;
3. engine/pitr.py's point-in-time restore to that target: every object verified before use
   (a damaged WAL object fails the drill and is named), a private PostgreSQL (socket in the
   scratch directory) recovered to the target. Nothing is written to any server: the drill's
   target is that private server. The rows of every user table of one database are counted
   there and the database is dumped (``pg_dump``) and read to the end, so every page of it is
   read; the private server and the scratch directory are then removed;
4. checks: recovery stopped at the target (or, when no transaction ended after it in the
   stored WAL, at the end of that WAL, the same state), the last replayed commit is at or
   before the target, and the first transaction not replayed ended after it.

The drill needs the PostgreSQL server binaries (``postgres``, ``pg_dump``; ``bin_dir`` in the
source), which the runner image does not hold: see docs/postgres-pitr.md, "Drill".
"""

import datetime
import random

from . import pitr, procutil
from .catalog import Catalog
from .errors import ConfigError, NotFoundError
from .pipeline import CHUNK
from .schema import Field, Schema
from .kinds.postgres.source import DUMP_PAYLOAD
from .kinds.postgres.wal import BASE_KIND
from .timeutil import parse_iso

# drill.target of a postgres_base job: where the private recovery happens and what it checks.
TARGET_SCHEMA = Schema("drill.target", {
    "database": Field("str", "database whose rows are counted and dumped (default: the source's, else postgres)",
                      nonempty=True),
    "scratch_dir": Field("path", "where the base backup is unpacked and the WAL staged (default: the temp dir)"),
    "run_as": Field("str", "account the private PostgreSQL runs as when the runner is root (default postgres)",
                    nonempty=True),
    "recovery_timeout": Field("number", "seconds the recovery may take (default 3600)", exclusive_minimum=0),
})
SERVER_TOOLS = ("postgres", "pg_dump")
IMAGE_HINT = ("a point-in-time drill runs a private PostgreSQL: it needs the PostgreSQL server binaries "
              "(postgres, pg_dump; source.bin_dir or PATH), which the runner image does not hold "
              "(docs/postgres-pitr.md, Drill)")


def recovery_window(storage, job, wal_job=None):
    """``{oldest, newest, wal_job}``: the times a point-in-time restore of ``job`` can reach.

    ``oldest``: the oldest base backup's completion; ``newest``: up to when the stored WAL is
    known to hold every commit, as the restore's own plan (of ``latest``) reckons it.
    """
    bases = [m for m in Catalog(storage).scan(job, with_orphans=False) if m.kind == BASE_KIND]
    if not bases:
        raise NotFoundError("job %s has no %s backup: there is nothing to drill" % (job, BASE_KIND))
    oldest = min(pitr.base_completed_at(m) for m in bases)
    plan = pitr.plan_restore(storage, job, pitr.LATEST, wal_job)
    if not plan.stored_until:
        raise NotFoundError("the end of the WAL stored in job %s is not known (its newest segment has neither a "
                            "partial copy after it nor recorded transaction times): no drill target can be chosen"
                            % plan.wal_job)
    newest = parse_iso(plan.stored_until)
    if newest < oldest:
        raise NotFoundError("the recovery window of job %s is empty: the WAL in job %s reaches %s, before the "
                            "oldest base backup was complete (%s)"
                            % (job, plan.wal_job, pitr.to_iso_precise(newest), pitr.to_iso_precise(oldest)))
    return {"oldest": oldest, "newest": newest, "wal_job": plan.wal_job}


def random_target(window, seed):
    """A moment in ``window`` drawn from ``seed`` (microseconds; the same seed and window give the same one)."""
    span = window["newest"] - window["oldest"]
    offset = int(random.Random(seed).random() * (span // datetime.timedelta(microseconds=1)))
    return window["oldest"] + datetime.timedelta(microseconds=offset)


class PrivateCheck:
    """The drill's target: the recovered private server itself; nothing is written anywhere.

    engine/pitr.py counts the database's rows on the private server (the manifest's
    ``stats.tables``) and hands over its ``pg_dump`` stream, which is read to the end.
    """

    kind = "postgres"

    def __init__(self, database):
        self.database = database

    def describe(self):
        return {"private_server": True, "database": self.database}

    def preflight(self, manifest):
        """Nothing to check on a server: the private one does not exist yet."""

    def plan(self, manifest):
        return {"changed": False, "check_mode": True, "would_check": self.database, "checks": []}

    def restore(self, context):
        tables = dict(context.manifest.stats.get("tables") or {})
        stream = context.open_payload(context.manifest, DUMP_PAYLOAD)
        try:
            while stream.read(CHUNK):
                pass
            dumped = stream.finish()["plain_bytes"]
        finally:
            stream.close()
        return {"changed": False, "database": self.database, "tables": len(tables), "rows": sum(tables.values()),
                "row_counts": tables, "dump_bytes": dumped,
                "checks": [{"what": "pg_dump of %s read to the end" % self.database, "expected": "> 0 bytes",
                            "actual": dumped, "ok": dumped > 0}]}


def check_recovery(report, target):
    """The drill's checks of a restore report against its ``target`` time."""
    recovered = report.get("recovered_to") or {}
    plan = report.get("plan") or {}
    reached = bool(report.get("target_reached")) or bool(plan.get("no_commit_after_target"))
    checks = [{"what": "recovery reached the target", "expected": pitr.to_iso_precise(target),
               "actual": "target" if report.get("target_reached") else
               ("end of the stored WAL (no transaction ended after the target)" if reached else "not reached"),
               "ok": reached}]
    last = recovered.get("last_commit_time")
    checks.append({"what": "last replayed commit at or before the target", "expected": pitr.to_iso_precise(target),
                   "actual": last, "ok": last is None or parse_iso(last) <= target})
    stopped = recovered.get("stopped")
    if stopped and report.get("target_reached"):
        when = pitr.pg_log_time(stopped.get("commit_time"))
        checks.append({"what": "first transaction not replayed ended after the target",
                       "expected": "after %s" % pitr.to_iso_precise(target),
                       "actual": "%s %s (xid %s)" % (stopped.get("where"), stopped.get("commit_time"), stopped.get("xid")),
                       "ok": stopped.get("where") == "before" and when is not None and when > target})
    return checks


def cmd_drill(config, args, log, prepared, job):
    """The PITR drill of ``job``; returns (ok, result). Raises on errors before the checks."""
    options = TARGET_SCHEMA.validate(config.target_options("drill"), "drill.target")
    source = config.source or {}
    bin_dir = source.get("bin_dir")
    for tool in SERVER_TOOLS:
        try:
            found = procutil.find_tool(tool, bin_dir)
        except ConfigError as exc:
            raise ConfigError("%s; %s" % (exc, IMAGE_HINT)) from None
        bin_dir = bin_dir or found.rsplit("/", 1)[0]
    database = options.get("database") or source.get("database") or source.get("dbname") or "postgres"
    identity, passphrase = prepared["keys"]
    storage = prepared["storage"]
    window = recovery_window(storage, job, source.get("wal_job") if job == config.job else None)
    seed = None
    if args.point_in_time:
        target = pitr.parse_target(args.point_in_time)
        if target is None:
            raise ConfigError("drill --point-in-time needs a time, not %r" % args.point_in_time)
        how = "given with --point-in-time"
    else:
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
        target = random_target(window, seed)
        how = "drawn with seed %d" % seed
    described = {"oldest": pitr.to_iso_precise(window["oldest"]), "newest": pitr.to_iso_precise(window["newest"]),
                 "seconds": round((window["newest"] - window["oldest"]).total_seconds(), 3),
                 "wal_job": window["wal_job"]}
    log.info("recovery window %s .. %s (%.0f s); drill target %s, %s (repeat it with --point-in-time %s)"
             % (described["oldest"], described["newest"], described["seconds"], pitr.to_iso_precise(target), how,
                pitr.to_iso_precise(target)), target_time=pitr.to_iso_precise(target), seed=seed)
    report = pitr.restore_point_in_time(
        storage, job, pitr.to_iso_precise(target), identity=identity, passphrase=passphrase,
        wal_job=window["wal_job"], target=PrivateCheck(database), database=database,
        scratch_dir=options.get("scratch_dir"), bin_dir=bin_dir, run_as=options.get("run_as"),
        user=source.get("user") or "postgres", timeout=options.get("recovery_timeout", 3600),
        check_mode=args.check, log=log.info)
    result = {"job": job, "kind": BASE_KIND, "window": described, "seed": seed, "target_time": pitr.to_iso_precise(target),
              "in_window": window["oldest"] <= target <= window["newest"], "database": database,
              "plan": report.get("plan"), "changed": False}
    if args.check:
        result.update(check_mode=True, ok=True, checks=[])
        return True, result
    checked = report.get("target") or {}
    checks = check_recovery(report, target) + list(checked.get("checks") or [])
    result.update(recovered_to=report.get("recovered_to"), target_reached=report.get("target_reached"),
                  recovery_seconds=report.get("recovery_seconds"), tables=checked.get("tables"),
                  rows=checked.get("rows"), row_counts=checked.get("row_counts"), checks=checks,
                  ok=all(check["ok"] for check in checks))
    return result["ok"], result
