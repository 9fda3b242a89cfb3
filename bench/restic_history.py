# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Stored bytes after retention: the restic format against the age archives (issue 16).

What is simulated
-----------------
A biometric-shaped table (``id, subject, modality, template, quality, updated_at``; the
template is 96 random bytes in base64, as an encoded feature vector would be, so it barely
compresses) dumped once a day for ``--days`` days (default 400) as a plain-text
``COPY ... FROM stdin`` stream in primary-key order, the shape of ``pg_dump -Fp`` for one table.
Every day about 1 % of the rows change: 0.1 % of the initial row count is inserted (new ids,
at the end of the dump) and 0.9 % of the rows are updated (new template, quality and
``updated_at``). Two update patterns, because restic's chunks (512 KiB .. 8 MiB, 1 MiB on
average, not tunable in restic 0.14) decide everything:

``uniform``
    the updated rows are drawn from the whole table (worst case for chunk deduplication);
``recent``
    the updated rows are drawn from the newest 10 % of ids (re-enrolments and corrections of
    recent subjects; the old part of the table does not change).

The bytes are generated deterministically (``--seed``); no PostgreSQL is involved, which keeps
the run at a few minutes. Each day's dump goes through ``ResticRepository.backup_stream`` with
the day's date as snapshot time (``restic backup --stdin --time``); every ``--prune-every`` days
and at the end the seed policy (``keep_daily 30, keep_weekly 12, keep_monthly 12,
keep_yearly 7``) is evaluated by the engine's ``retention`` module (restic semantics) over the
snapshots, the others are removed with ``forget <ids>`` and ``prune`` (``--max-unused 5%``,
restic's default). At the end the kept set is compared with ``restic forget --dry-run`` with
the same policy, and the repository's bytes on disk are measured.

The archive format stores one full ``zstd -3`` compressed copy per backup (age adds ~200
bytes, ignored): its stored bytes after retention are the sum of the compressed sizes of the
days the same policy keeps (engine retention over the same dates).

Figures are ratios to one full compressed backup (the last day's dump, zstd -3).

Run: ``python bench/restic_history.py`` (``--rows``, ``--days``, ``--scenario``, ``--json``).
"""

import argparse
import base64
import datetime
import hashlib
import io
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / "build" / "collections"
if str(COLLECTIONS) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS))

os.environ["TZ"] = "UTC"  # restic reads --time in the local zone
time.tzset()

import zstandard  # noqa: E402

from ansible_collections.biometrics.backup.plugins.module_utils.engine import restic as rs  # noqa: E402
from ansible_collections.biometrics.backup.plugins.module_utils.engine.retention import (  # noqa: E402
    Policy, apply_policy, backups_from_items)

POLICY = {"keep_daily": 30, "keep_weekly": 12, "keep_monthly": 12, "keep_yearly": 7}
START = datetime.datetime(2024, 1, 1, 2, 0, 0, tzinfo=datetime.timezone.utc)
MODALITIES = ("face", "finger", "iris", "voice")
HEADER = (b"--\n-- PostgreSQL database dump (simulated by bench/restic_history.py)\n--\n\n"
          b"COPY public.templates (id, subject, modality, template, quality, updated_at) FROM stdin;\n")
FOOTER = b"\\.\n\n--\n-- PostgreSQL database dump complete\n--\n"
PASSWORD = "bench-restic-history-password"
MiB = 1 << 20


def make_row(row_id, version, day):
    digest = hashlib.blake2b(b"%d:%d" % (row_id, version), digest_size=64).digest()
    template = base64.b64encode(digest + hashlib.blake2b(digest, digest_size=32).digest())
    subject = hashlib.blake2b(b"subject:%d" % row_id, digest_size=8).hexdigest()
    quality = digest[0] % 101
    stamp = (START + datetime.timedelta(days=day)).strftime("%Y-%m-%d %H:%M:%S+00")
    return b"%d\t%s\t%s\t%s\t%d\t%s\n" % (row_id, subject.encode(), MODALITIES[row_id % 4].encode(),
                                          template, quality, stamp.encode())


class Table:
    """The table's rows (bytes, in id order) and the daily change."""

    def __init__(self, rows, scenario, seed):
        self.rows = [make_row(i, 0, 0) for i in range(rows)]
        self.versions = [0] * rows
        self.initial = rows
        self.scenario = scenario
        self.random = random.Random("%s:%s" % (seed, scenario))

    def change(self, day):
        inserts = max(1, round(self.initial * 0.001))
        for dummy in range(inserts):
            row_id = len(self.rows)
            self.rows.append(make_row(row_id, 0, day))
            self.versions.append(0)
        updates = max(1, round(len(self.rows) * 0.009))
        low = 0 if self.scenario == "uniform" else int(len(self.rows) * 0.9)
        for dummy in range(updates):
            row_id = self.random.randrange(low, len(self.rows))
            self.versions[row_id] += 1
            self.rows[row_id] = make_row(row_id, self.versions[row_id], day)

    def dump(self):
        return HEADER + b"".join(self.rows) + FOOTER


def dir_bytes(path):
    total = 0
    for root, dummy, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


def kept_by_engine(snapshots, now):
    items = [{"id": s["id"], "timestamp": s["time"]} for s in snapshots]
    result = apply_policy(backups_from_items(items), Policy(semantics="restic", **POLICY), now=now)
    return {b.key for b in result.keep}, [b.key for b in result.prune]


def restic_own_choice(repo):
    """The snapshots ``restic forget --dry-run`` would keep under the same policy."""
    argv = [repo.binary, "--repo", repo.url, "--no-cache", "forget", "--dry-run", "--json",
            "--keep-daily", "30", "--keep-weekly", "12", "--keep-monthly", "12", "--keep-yearly", "7"]
    env = dict(os.environ, RESTIC_PASSWORD=PASSWORD)
    out = subprocess.run(argv, env=env, capture_output=True, check=True).stdout
    groups = json.loads(out)
    return {s["id"] for group in groups for s in group.get("keep") or []}


def run_scenario(scenario, args, work):
    table = Table(args.rows, scenario, args.seed)
    repo_dir = os.path.join(work, "repo-" + scenario)
    repo = rs.ResticRepository({"backend": "filesystem", "path": repo_dir}, PASSWORD,
                               cache_dir=os.path.join(work, "cache"))
    repo.init_if_missing()
    compressor = zstandard.ZstdCompressor(level=3)
    archive_sizes = {}
    timings = {"generate": 0.0, "restic_backup": 0.0, "restic_prune": 0.0, "zstd": 0.0}
    first_repo_bytes = None
    data_added = []
    last_dump = b""
    for day in range(args.days):
        moment = START + datetime.timedelta(days=day)
        begin = time.monotonic()
        if day:
            table.change(day)
        last_dump = table.dump()
        timings["generate"] += time.monotonic() - begin
        begin = time.monotonic()
        archive_sizes[moment.isoformat()] = len(compressor.compress(last_dump))
        timings["zstd"] += time.monotonic() - begin
        begin = time.monotonic()
        result = repo.backup_stream(io.BytesIO(last_dump), "templates.sql",
                                    {"job": "bench", "kind": "postgres", "backup_id": "day%03d" % day},
                                    time_=moment.strftime("%Y-%m-%d %H:%M:%S"))
        timings["restic_backup"] += time.monotonic() - begin
        data_added.append(result["data_added"])
        if day == 0:
            first_repo_bytes = dir_bytes(repo_dir)
        last = day == args.days - 1
        if (day and day % args.prune_every == 0) or last:
            snapshots = repo.snapshots()
            keep, prune = kept_by_engine(snapshots, moment)
            if last:
                restic_keep = restic_own_choice(repo)
                if restic_keep != keep:
                    raise SystemExit("engine retention and restic forget disagree: %d vs %d kept"
                                     % (len(keep), len(restic_keep)))
            begin = time.monotonic()
            repo.forget(prune)
            repo.prune()
            timings["restic_prune"] += time.monotonic() - begin
        if args.verbose and day % 50 == 0:
            print("  %s day %d: dump %.1f MiB, restic data_added %.2f MiB" % (
                scenario, day, len(last_dump) / MiB, result["data_added"] / MiB), flush=True)
    kept = repo.snapshots()
    full_compressed = len(compressor.compress(last_dump))
    dates = list(archive_sizes)
    result = apply_policy(backups_from_items(dates), Policy(semantics="restic", **POLICY),
                          now=START + datetime.timedelta(days=args.days - 1))
    archive_bytes = sum(archive_sizes[b.key] for b in result.keep)
    restic_bytes = dir_bytes(repo_dir)
    begin = time.monotonic()
    repo.check(read_data_subset="all" if args.check_all else None)
    timings["restic_check"] = time.monotonic() - begin
    return {
        "scenario": scenario, "days": args.days, "rows_first": args.rows, "rows_last": len(table.rows),
        "dump_bytes_last": len(last_dump), "full_compressed_bytes": full_compressed,
        "kept_backups": len(kept), "kept_archives": len(result.keep),
        "restic_first_backup_bytes": first_repo_bytes,
        "restic_stored_bytes": restic_bytes, "archive_stored_bytes": archive_bytes,
        "restic_ratio": round(restic_bytes / full_compressed, 2),
        "archive_ratio": round(archive_bytes / full_compressed, 2),
        "restic_data_added_median": sorted(data_added[1:])[len(data_added[1:]) // 2] if len(data_added) > 1 else None,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--rows", type=int, default=24000, help="rows on the first day (default 24000, 4.2 MiB)")
    parser.add_argument("--days", type=int, default=400)
    parser.add_argument("--scenario", choices=("uniform", "recent", "both"), default="both")
    parser.add_argument("--prune-every", type=int, default=30, help="days between forget+prune runs")
    parser.add_argument("--seed", default="biometrics")
    parser.add_argument("--check-all", action="store_true", help="final restic check --read-data")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if shutil.which("restic") is None:
        raise SystemExit("restic is not installed")
    work = tempfile.mkdtemp(prefix="restic-history-")
    results = []
    try:
        scenarios = ("uniform", "recent") if args.scenario == "both" else (args.scenario,)
        for scenario in scenarios:
            begin = time.monotonic()
            entry = run_scenario(scenario, args, work)
            entry["seconds"]["total"] = round(time.monotonic() - begin, 1)
            results.append(entry)
            shutil.rmtree(os.path.join(work, "repo-" + scenario), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    version = subprocess.run(["restic", "version"], capture_output=True, text=True, check=False).stdout.split()[1]
    print("restic %s, %d days, %d rows at first, policy %s" % (version, args.days, args.rows, POLICY))
    print("%-8s %9s %9s %6s %12s %8s %12s %8s %10s" % (
        "updates", "dump MiB", "full MiB", "kept", "restic MiB", "ratio", "archive MiB", "ratio", "seconds"))
    for entry in results:
        print("%-8s %9.1f %9.2f %6d %12.2f %7.1fx %12.2f %7.1fx %10.0f" % (
            entry["scenario"], entry["dump_bytes_last"] / MiB, entry["full_compressed_bytes"] / MiB,
            entry["kept_backups"], entry["restic_stored_bytes"] / MiB, entry["restic_ratio"],
            entry["archive_stored_bytes"] / MiB, entry["archive_ratio"], entry["seconds"]["total"]))


if __name__ == "__main__":
    main()
