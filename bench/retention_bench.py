# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Retention benchmark: the engine against ``restic forget --dry-run`` and
``borg prune --dry-run`` on the same history, in the same run, ratios printed.

1. A history of ``--size`` backups (every 4-8 hours, deterministic) is written into a real
   restic repository and a real borg repository (cached under ``--cache``, since creating
   them is what takes long). Each tool applies the seed policy (30 daily, 12 weekly,
   12 monthly, 7 yearly) to it; the engine evaluates the same timestamps with the same
   semantics. The kept sets are compared, then timed (median wall and CPU seconds of
   ``--repeat`` runs). A tool's time is the whole answer: process start, restic's key
   derivation, opening the repository, reading the snapshot/archive list, the policy.
2. The engine alone on ``--big`` backups (default 100,000), from ISO-8601 strings to the
   keep/prune sets, both semantics, UTC and Europe/Berlin.

Run: ``python bench/retention_bench.py`` (``make bench`` runs every bench/*.py).
"""

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import pathlib
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLLECTIONS = ROOT / "build" / "collections"
if str(COLLECTIONS) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS))

from ansible_collections.biometrics.backup.plugins.module_utils.engine.retention import (  # noqa: E402
    Backup, Policy, apply_policy, evaluate)

UTC = datetime.timezone.utc
SEED_POLICY = {"keep_daily": 30, "keep_weekly": 12, "keep_monthly": 12, "keep_yearly": 7}
END = datetime.datetime(2025, 6, 30, 12, tzinfo=UTC)

BORG_CREATE_MANY = """
import json, sys
from borg.archiver import Archiver
for timestamp, archive, path in json.load(sys.stdin):
    archiver = Archiver()
    code = archiver.run(archiver.get_args(["borg", "create", "--timestamp", timestamp, archive, path], None))
    if code:
        sys.exit(code)
"""


def history(size, seed=7, hours=(12, 36)):
    """``size`` distinct second-resolution instants, newest at END, ``hours`` apart."""
    rng = random.Random(seed)
    moments, moment = [], END
    for _number in range(size):
        moments.append(moment)
        moment -= datetime.timedelta(seconds=rng.randrange(hours[0] * 3600, hours[1] * 3600))
    return sorted(moments)


def fingerprint(moments):
    return hashlib.sha256("".join(m.isoformat() for m in moments).encode()).hexdigest()[:16]


def median_time(function, repeat):
    """Median wall seconds and median CPU seconds (this process plus its children) of a call.
    CPU time is the steadier figure on a shared machine; both are printed."""
    walls, cpus = [], []
    for _run in range(repeat):
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = time.process_time()
        start = time.perf_counter()
        function()
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(time.process_time() - cpu + (after.ru_utime - children.ru_utime)
                    + (after.ru_stime - children.ru_stime))
    return statistics.median(walls), statistics.median(cpus)


def run(argv, env):
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit("%s failed: %s" % (" ".join(argv[:3]), done.stderr[-2000:]))
    return done.stdout + done.stderr


# -- restic ---------------------------------------------------------------------------------

class Restic:
    def __init__(self, where, moments):
        self.where = where
        self.env = dict(os.environ, RESTIC_REPOSITORY=str(where / "repo"), RESTIC_PASSWORD="bench", TZ="UTC")
        self.data = where / "data"
        marker = where / ("complete-%s" % fingerprint(moments))
        if not marker.exists():
            shutil.rmtree(where, ignore_errors=True)
            self.data.mkdir(parents=True)
            (self.data / "file").write_text("bench\n")
            self.restic("init")
            print("  creating %d restic snapshots (cached in %s) ..." % (len(moments), where), flush=True)

            def create(moment):
                self.restic("backup", "--quiet", "--host", "bench", "--time",
                            moment.strftime("%Y-%m-%d %H:%M:%S"), str(self.data))

            with concurrent.futures.ThreadPoolExecutor(4) as workers:
                list(workers.map(create, moments))
            marker.write_text("ok\n")

    def restic(self, *args):
        return run(["restic", "--no-cache"] + list(args), self.env)

    def forget(self, policy):
        flags = ["--keep-%s=%d" % (name[len("keep_"):], count) for name, count in policy.items()]
        return json.loads(self.restic("forget", "--dry-run", "--json", *flags))

    def kept(self, policy):
        groups = self.forget(policy)
        return sorted(datetime.datetime.fromisoformat(s["time"]).astimezone(UTC)
                      for group in groups for s in group["keep"])


# -- borg -----------------------------------------------------------------------------------

class Borg:
    def __init__(self, where, moments):
        self.where = where
        self.env = dict(os.environ, BORG_REPO=str(where / "repo"), BORG_BASE_DIR=str(where / "base"),
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", TZ="UTC")
        self.data = where / "data"
        marker = where / ("complete-%s" % fingerprint(moments))
        if not marker.exists():
            shutil.rmtree(where, ignore_errors=True)
            self.data.mkdir(parents=True)
            (self.data / "file").write_text("bench\n")
            self.borg("init", "--encryption=none")
            print("  creating %d borg archives (cached in %s) ..." % (len(moments), where), flush=True)
            archives = [(m.strftime("%Y-%m-%dT%H:%M:%S"), "::a%06d" % i, str(self.data))
                        for i, m in enumerate(moments)]
            with open(shutil.which("borg"), "rb") as script:
                interpreter = script.readline().decode()[2:].strip()
            done = subprocess.run([interpreter, "-c", BORG_CREATE_MANY], input=json.dumps(archives),
                                  env=self.env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit("borg create failed: %s" % done.stderr[-2000:])
            marker.write_text("ok\n")
        self.moments = {"a%06d" % i: m for i, m in enumerate(moments)}

    def borg(self, *args):
        return run(["borg"] + list(args), self.env)

    def prune(self, policy):
        flags = ["--keep-%s=%d" % (name[len("keep_"):], count) for name, count in policy.items()]
        return self.borg("prune", "--dry-run", "--list", *flags)

    def kept(self, policy):
        names = [line.split("):", 1)[1].split()[0] for line in self.prune(policy).splitlines()
                 if line.startswith("Keeping archive")]
        return sorted(self.moments[name] for name in names)


# -- main -----------------------------------------------------------------------------------

def engine_kept(moments, semantics):
    backups = [Backup(str(i), m) for i, m in enumerate(moments)]
    result = apply_policy(backups, Policy(semantics=semantics, **SEED_POLICY))
    return sorted(b.timestamp for b in result.keep)


def compare_with_tools(args):
    moments = history(args.size)
    strings = [m.strftime("%Y-%m-%dT%H:%M:%SZ") for m in moments]
    cache = pathlib.Path(args.cache)
    print("== engine vs the reference tools, %d backups (%s .. %s), seed policy %s"
          % (len(moments), strings[0], strings[-1], SEED_POLICY))
    restic = Restic(cache / ("restic-%d" % args.size), moments)
    borg = Borg(cache / ("borg-%d" % args.size), moments)
    rows = []
    for semantics, tool, label in (("restic", restic, "restic forget --dry-run --json"),
                                   ("borg", borg, "borg prune --dry-run --list")):
        agree = tool.kept(SEED_POLICY) == engine_kept(moments, semantics)
        call = tool.forget if semantics == "restic" else tool.prune
        tool_time = median_time(lambda: call(SEED_POLICY), args.repeat)
        engine_time = median_time(lambda: evaluate(strings, semantics=semantics, **SEED_POLICY), max(args.repeat, 5))
        rows.append((semantics, label, agree, tool_time, engine_time))
    print("seconds, median of %d runs; CPU counts the tool's process, wall includes waiting for the"
          " (shared) machine" % args.repeat)
    print("%-8s %-31s %-5s %16s %18s %10s %10s" % (
        "meaning", "tool command", "agree", "tool wall / cpu", "engine wall / cpu", "wall ratio", "cpu ratio"))
    for semantics, label, agree, tool_time, engine_time in rows:
        print("%-8s %-31s %-5s %7.3f / %6.3f %8.4f / %7.4f %9.0fx %9.0fx" % (
            semantics, label, "yes" if agree else "NO", tool_time[0], tool_time[1], engine_time[0],
            engine_time[1], tool_time[0] / engine_time[0], tool_time[1] / engine_time[1]))
    return all(row[2] for row in rows)


def engine_big(args):
    moments = history(args.big, seed=11, hours=(1, 4))
    strings = [m.strftime("%Y-%m-%dT%H:%M:%SZ") for m in moments]
    print("== engine alone, %d backups (%s .. %s), ISO strings in, keep/prune/reasons out"
          % (len(strings), strings[0], strings[-1]))
    policies = (("seed policy", SEED_POLICY),
                ("seed + keep_last 10 + keep_within 1y", dict(SEED_POLICY, keep_last=10, keep_within="1y")),
                ("every day (keep_daily -1)", {"keep_daily": -1}))
    print("%-40s %-8s %-14s %10s %10s %8s" % ("policy", "meaning", "timezone", "wall (s)", "cpu (s)", "kept"))
    for name, policy in policies:
        for semantics in ("borg", "restic"):
            for zone in ("UTC", "Europe/Berlin"):
                kept = len(evaluate(strings, semantics=semantics, timezone=zone, **policy).keep)
                wall, cpu = median_time(lambda: evaluate(strings, semantics=semantics, timezone=zone, **policy),
                                        args.repeat)
                print("%-40s %-8s %-14s %10.3f %10.3f %8d" % (name, semantics, zone, wall, cpu, kept))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--size", type=int, default=int(os.environ.get("RETENTION_BENCH_SIZE", "1000")),
                        help="backups in the restic/borg repositories (default 1000)")
    parser.add_argument("--big", type=int, default=100000, help="backups for the engine-only part")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/biometrics-backup/retention-bench"),
                        help="where the reference repositories are kept between runs")
    parser.add_argument("--engine-only", action="store_true", help="skip restic and borg")
    args = parser.parse_args()
    ok = True
    if not args.engine_only:
        missing = [tool for tool in ("restic", "borg") if shutil.which(tool) is None]
        if missing:
            raise SystemExit("not installed: %s (Debian packages restic, borgbackup)" % ", ".join(missing))
        ok = compare_with_tools(args)
    engine_big(args)
    if not ok:
        raise SystemExit("the engine and a reference tool disagree on the benchmark history")


if __name__ == "__main__":
    main()
