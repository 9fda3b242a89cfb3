# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Differential tests: engine/retention.py against the real ``restic forget`` 0.14 and
``borg prune`` 1.2 of Debian 12, on random histories.

Creating a snapshot costs a whole restic process (its key derivation alone is most of it),
so each tool gets a *pool* of real snapshots/archives with the edges that matter (ISO weeks
around new year, month ends, leap days, daylight-saving changes, several backups an hour and
in one second, quiet months), and every history is a random subset of its pool: for restic
the snapshots of a history carry its tag and ``forget --tag`` looks at them alone; for borg
the archive names carry ``.h<n>.`` and ``prune --glob-archives`` selects them. Each history
is then judged under several random policies, comparing the kept set *and* the rules the
tool names for each kept backup with the engine's reasons.

Time zones: restic buckets by the offset recorded in each snapshot (the zone it was taken
in), so there is one restic pool per zone (UTC and America/St_Johns: half-hour offset with
DST). borg buckets by the zone it runs in, so its one pool is pruned under three zones.

Environment: ``RETENTION_REFERENCE_HISTORIES`` (default 12 per pool and zone),
``RETENTION_REFERENCE_SEED`` (default fixed; ``random`` picks one and prints it).
"""

import concurrent.futures
import datetime
import json
import os
import pathlib
import random
import re
import shutil
import subprocess
import tempfile
from zoneinfo import ZoneInfo

import pytest

from ci_env import in_ci, require_or_skip

from ansible_collections.biometrics.backup.plugins.module_utils.engine.retention import (
    COUNT_RULES, OLDEST_SUFFIX, Backup, Policy, apply_policy)

UTC = datetime.timezone.utc
HISTORIES = int(os.environ.get("RETENTION_REFERENCE_HISTORIES", "12"))
_SEED_SETTING = os.environ.get("RETENTION_REFERENCE_SEED", "20241231")
SEED = random.SystemRandom().randrange(1 << 30) if _SEED_SETTING == "random" and not in_ci() else int(
    _SEED_SETTING if _SEED_SETTING != "random" else "20241231")
POLICIES_PER_HISTORY = 2
RESTIC_ZONES = ("UTC", "America/St_Johns")
BORG_ZONES = ("UTC", "Europe/Berlin", "Australia/Lord_Howe")
RESTIC_UNLIMITED = 1000000  # restic 0.14 ignores -1; a count beyond any history is "all"
YEARS = range(2019, 2026)


def _tool(name):
    path = shutil.which(name)
    if path is None:
        require_or_skip("%s is not installed (Debian package %s; hack/install-deps.sh)"
                        % (name, "borgbackup" if name == "borg" else name))
    return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Repositories live on tmpfs when there is one: both tools fsync every commit, and on a
    busy disk that, not the tools' logic, would dominate the run."""
    base = "/dev/shm"
    if os.path.isdir(base) and os.access(base, os.W_OK):
        path = tempfile.mkdtemp(prefix="retention-reference-", dir=base)
        try:
            yield pathlib.Path(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("retention-reference")


def _context(what):
    return "seed %d (RETENTION_REFERENCE_SEED=%d reproduces it): %s" % (SEED, SEED, what)


# -- pools of moments -------------------------------------------------------------------------

def _dst_changes(zone, years):
    """Instants (UTC) at which ``zone`` changes its offset, found by hourly steps."""
    tz = ZoneInfo(zone)
    changes = []
    moment = datetime.datetime(years[0], 1, 1, tzinfo=UTC)
    end = datetime.datetime(years[-1] + 1, 1, 1, tzinfo=UTC)
    previous = moment.astimezone(tz).utcoffset()
    while moment < end:
        moment += datetime.timedelta(hours=1)
        offset = moment.astimezone(tz).utcoffset()
        if offset != previous:
            changes.append(moment)
            previous = offset
    return changes


def _episode(rng, start, days, per_day):
    """A stretch of ``days`` days from the wall clock ``start`` with about ``per_day`` backups
    a day at irregular times (sometimes none on a day)."""
    walls = []
    for day in range(days):
        for _backup in range(rng.choice([0, 1, 1, 2]) if per_day <= 1 else rng.randrange(per_day + 1)):
            walls.append(start + datetime.timedelta(days=day, seconds=rng.randrange(86400)))
    return walls


def pool_moments(rng, zone, size):
    """About ``size`` distinct instants (UTC): dense episodes on the calendar edges of ``zone``
    (wall clock) -- ISO week 53 of 2020 into 2021, the 2024/25 new year, the leap day of 2024,
    month ends, both daylight-saving changes of a year -- plus bursts within an hour or one
    second, and a sparse background over 2019-2025 with whole quiet stretches."""
    tz = UTC if zone == "UTC" else ZoneInfo(zone)
    walls = []
    walls += _episode(rng, datetime.datetime(2020, 12, 24), 18, 2)     # W52, W53 (to 3 Jan), W01
    walls += _episode(rng, datetime.datetime(2024, 12, 27), 10, 2)     # 2024-W52, 2025-W01 starts 30 Dec
    walls += _episode(rng, datetime.datetime(2024, 2, 26), 6, 2)       # leap day
    for _episode_number in range(3):                                   # month ends
        year, month = rng.choice(YEARS), rng.randrange(1, 13)
        first = datetime.datetime(year + (month == 12), month % 12 + 1, 1)
        walls += _episode(rng, first - datetime.timedelta(days=2), 4, 2)
    changes = _dst_changes(zone if zone != "UTC" else "Europe/Berlin", [2022])
    for change in changes:                                             # around each DST change
        for minutes in sorted(rng.sample(range(-180, 180, 7), 5)):
            walls.append((change + datetime.timedelta(minutes=minutes)).astimezone(tz).replace(tzinfo=None))
    for _burst in range(3):                                            # bursts in one hour
        base = datetime.datetime(rng.choice(YEARS), rng.randrange(1, 13), rng.randrange(1, 29),
                                 rng.randrange(24), rng.randrange(60))
        walls += [base + datetime.timedelta(seconds=rng.randrange(600)) for _member in range(3)]
    walls = [w.replace(microsecond=0) for w in walls]
    instants = {w.replace(tzinfo=tz).astimezone(UTC) for w in walls}
    quiet_year = rng.choice([2019, 2021, 2022, 2023])
    while len(instants) < size:                                        # sparse background
        moment = datetime.datetime(2019, 1, 1, tzinfo=UTC) + datetime.timedelta(
            seconds=rng.randrange(7 * 365 * 86400))
        if moment.year != quiet_year:
            instants.add(moment)
    return sorted(instants)


def choose_histories(rng, count, pool_size):
    """``count`` random subsets (indexes into the pool): nearly all of it, a thin sample,
    or a contiguous stretch."""
    histories = []
    for _history in range(count):
        style = rng.choice(["dense", "sparse", "window", "window"])
        indexes = list(range(pool_size))
        if style == "window":
            start = rng.randrange(pool_size)
            indexes = indexes[start:start + rng.randrange(5, pool_size)]
        keep_probability = {"dense": 0.85, "sparse": 0.3}.get(style, 0.7)
        chosen = [i for i in indexes if rng.random() < keep_probability]
        histories.append(chosen or [rng.randrange(pool_size)])
    return histories


def thin_years(rng, moments, chosen):
    """Leave out every backup of one or two random years (long gaps, sparse years)."""
    years = sorted({moments[i].year for i in chosen})
    if len(years) < 3:
        return chosen
    gone = set(rng.sample(years[1:-1], min(2, len(years) - 2)))
    return [i for i in chosen if moments[i].year not in gone] or chosen


_PERIOD_OF = {
    "last": lambda t: t,
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


def _random_count(rng, periods):
    """0, a small count, one close to the number of periods the history has (so rules run
    out, or just do not), a larger one, or -1."""
    roll = rng.random()
    if roll < 0.35:
        return 0
    if roll < 0.55:
        return rng.randrange(1, 4)
    if roll < 0.85:
        return max(1, periods + rng.randrange(-2, 3))
    if roll < 0.93:
        return -1
    return periods + rng.randrange(3, 10)


def random_policy(rng, semantics, backups, zone, now):
    """Options for the engine and the same policy as the tool's command-line flags."""
    tz = UTC if zone == "UTC" else ZoneInfo(zone)
    local = [b.timestamp.astimezone(tz) for b in backups]
    newest = max(b.timestamp for b in backups)
    options, flags = {}, []
    for rule in COUNT_RULES:
        count = _random_count(rng, len({_PERIOD_OF[rule](t) for t in local}))
        options["keep_" + rule] = count
        if count:
            if semantics == "restic":
                flag = {"last": "--keep-last"}.get(rule, "--keep-" + rule)
                flags.append("%s=%d" % (flag, RESTIC_UNLIMITED if count == -1 else count))
            else:
                flags.append("--keep-%s=%d" % ("secondly" if rule == "last" else rule, count))
    if rng.random() < 0.3:
        if semantics == "restic":
            within = rng.choice(["%dd" % rng.randrange(1, 90), "%dh" % rng.randrange(1, 900),
                                 "%dm" % rng.randrange(1, 13), "%dy" % rng.randrange(1, 3),
                                 "%dm%dd" % (rng.randrange(1, 6), rng.randrange(1, 28)),
                                 "%dy%dm%dh" % (rng.randrange(1, 2), rng.randrange(1, 12), rng.randrange(1, 48))])
        else:
            # borg measures from the clock: aim the cutoff somewhere inside the history.
            hours = (now - newest).total_seconds() / 3600 + rng.randrange(1, 3 * 365 * 24)
            unit = rng.choice(["H", "d", "w", "m", "y"])
            per = {"H": 1, "d": 24, "w": 168, "m": 24 * 31, "y": 24 * 365}[unit]
            within = "%d%s" % (max(1, round(hours / per)), unit)
        options["keep_within"] = within
        flags.append("--keep-within=%s" % within)
    if not any(options.get("keep_" + rule) for rule in COUNT_RULES) and "keep_within" not in options:
        options["keep_daily"] = 3
        flags.append("--keep-daily=3")
    return options, flags


# -- comparison -------------------------------------------------------------------------------

def engine_rules(reasons, numbered=False):
    """Normalise the engine's reasons: ('daily', False) for "daily #3" (with its number 3 when
    ``numbered``), ('daily', True) for the oldest fallback, ('within', False) for "within 7d"."""
    normal = []
    for reason in reasons:
        if reason.startswith("within "):
            normal.append(("within", False) + ((None,) if numbered else ()))
        else:
            rule, rest = reason.split(" #", 1)
            entry = (rule, reason.endswith(OLDEST_SUFFIX))
            normal.append(entry + ((int(rest.split(" ", 1)[0]),) if numbered else ()))
    return tuple(normal)


def engine_view(backups, options, semantics, zone, now=None, within_reference=None, numbered=False):
    policy = Policy(semantics=semantics, timezone=zone, **options)
    result = apply_policy(backups, policy, now=now, within_reference=within_reference)
    return sorted((b.timestamp, engine_rules(result.reasons[b.key], numbered)) for b in result.keep)


# -- restic -----------------------------------------------------------------------------------

RESTIC_RULE = {"last snapshot": "last", "hourly snapshot": "hourly", "daily snapshot": "daily",
               "weekly snapshot": "weekly", "monthly snapshot": "monthly", "yearly snapshot": "yearly"}


class ResticPool:
    def __init__(self, tmp, zone, rng, size, histories):
        self.zone = zone
        self.restic = _tool("restic")
        self.data = tmp / "data"
        self.data.mkdir()
        (self.data / "file").write_bytes(b"retention reference\n")
        self.env = dict(os.environ, RESTIC_REPOSITORY=str(tmp / "repo"), RESTIC_PASSWORD="reference",
                        TZ=zone, RESTIC_CACHE_DIR=str(tmp / "cache"))
        self.run("init")
        moments = pool_moments(rng, zone, size)
        self.histories = choose_histories(rng, histories, len(moments))
        self.histories = [thin_years(rng, moments, h) if rng.random() < 0.25 else h for h in self.histories]
        tags = {i: [] for i in range(len(moments))}
        for number, members in enumerate(self.histories):
            for i in members:
                tags[i].append("h%d" % number)
        tz = UTC if zone == "UTC" else ZoneInfo(zone)

        def create(i):
            wall = moments[i].astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")
            args = ["backup", "--quiet", "--host", "reference", "--time", wall, "--tag", "pool"]
            for tag in tags[i]:
                args += ["--tag", tag]
            self.run(*args, str(self.data))

        # restic backup takes a shared lock; a few at once overlap their key derivations.
        with concurrent.futures.ThreadPoolExecutor(3) as workers:
            list(workers.map(create, [i for i in range(len(moments)) if tags[i]]))
        # What restic recorded is the truth (a wall clock in a DST gap is normalised by Go).
        self.snapshots = {}
        for snap in json.loads(self.run("snapshots", "--json")):
            self.snapshots[snap["id"]] = (datetime.datetime.fromisoformat(snap["time"]).astimezone(UTC),
                                          set(snap.get("tags") or []))

    def run(self, *args):
        done = subprocess.run([self.restic, "--no-cache"] + list(args), env=self.env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, "restic %s failed: %s" % (" ".join(args), done.stderr)
        return done.stdout

    def history(self, number):
        tag = "h%d" % number
        return [Backup(sid, moment) for sid, (moment, tags) in self.snapshots.items() if tag in tags]

    def forget(self, number, flags):
        groups = json.loads(self.run("forget", "--dry-run", "--json", "--tag", "h%d" % number, *flags))
        assert len(groups) == 1, groups
        group = groups[0]
        matches = {}
        for reason in group["reasons"]:
            snap = reason["snapshot"]
            rules = []
            for match in reason["matches"]:
                rules.append(("within", False) if match.startswith("within ") else (RESTIC_RULE[match], False))
            matches.setdefault(snap["time"], []).append(tuple(rules))
        view = []
        for snap in group["keep"]:
            moment = datetime.datetime.fromisoformat(snap["time"]).astimezone(UTC)
            view.append((moment, matches[snap["time"]].pop()))
        removed = len(group.get("remove") or [])
        return sorted(view), removed


@pytest.fixture(scope="module", params=RESTIC_ZONES)
def restic_pool(request, scratch):
    zone = request.param
    rng = random.Random("%d-restic-%s" % (SEED, zone))
    where = scratch / ("restic-" + zone.replace("/", "-"))
    where.mkdir()
    return ResticPool(where, zone, rng, size=max(60, 5 * HISTORIES), histories=HISTORIES)


@pytest.mark.parametrize("number", range(HISTORIES))
def test_restic_forget_matches_the_engine(restic_pool, number):
    backups = restic_pool.history(number)
    assert backups, "history %d is empty" % number
    rng = random.Random("%d-restic-policy-%s-%d" % (SEED, restic_pool.zone, number))
    for _policy in range(POLICIES_PER_HISTORY):
        options, flags = random_policy(rng, "restic", backups, restic_pool.zone, datetime.datetime.now(UTC))
        tool, removed = restic_pool.forget(number, flags)
        mine = engine_view(backups, options, "restic", restic_pool.zone)
        assert mine == tool, _context("history %d in %s, %s: restic kept %d/%d" % (
            number, restic_pool.zone, " ".join(flags), len(tool), len(backups)))
        assert removed == len(backups) - len(tool)


# -- borg -------------------------------------------------------------------------------------

BORG_LINE = re.compile(r"^(?:Keeping archive \(rule: (?P<rule>[a-z]+)(?P<oldest>\[oldest\])? #(?P<num>\d+)\)"
                       r"|(?P<prune>Would prune)):\s+(?P<name>\S+)")


BORG_CREATE_MANY = """
import json, sys
from borg.archiver import Archiver
for timestamp, archive, path in json.load(sys.stdin):
    archiver = Archiver()
    code = archiver.run(archiver.get_args(["borg", "create", "--timestamp", timestamp, archive, path], None))
    if code:
        sys.exit(code)
"""


class BorgPool:
    def __init__(self, tmp, rng, size, histories):
        self.borg = _tool("borg")
        self.data = tmp / "data"
        self.data.mkdir()
        (self.data / "file").write_bytes(b"retention reference\n")
        self.env = dict(os.environ, BORG_REPO=str(tmp / "repo"), BORG_BASE_DIR=str(tmp / "base"),
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", TZ="UTC")
        self.run("init", "--encryption=none")
        moments = pool_moments(rng, "Europe/Berlin", size)
        # One second, several archives: borg's --keep-last is --keep-secondly.
        moments += [moments[len(moments) // 3]] * 2 + [moments[len(moments) // 2]]
        moments.sort()
        self.histories = choose_histories(rng, histories, len(moments))
        self.histories = [thin_years(rng, moments, h) if rng.random() < 0.25 else h for h in self.histories]
        self.moments = {}
        archives = []
        for i, moment in enumerate(moments):
            members = [n for n, h in enumerate(self.histories) if i in h]
            if not members:
                continue
            name = "a%04d.%s." % (i, ".".join("h%d" % n for n in members))
            archives.append((moment.strftime("%Y-%m-%dT%H:%M:%S"), "::" + name, str(self.data)))
            self.moments[name] = moment
        self.create_all(archives)

    def create_all(self, archives):
        """``borg create --timestamp`` for each archive, in one borg process: borg's own
        command-line entry (Archiver.get_args/run) called in a loop by the interpreter that
        runs the installed ``borg``, which saves a Python start-up per archive."""
        with open(self.borg, "rb") as script:
            shebang = script.readline().decode("utf-8", "replace")
        interpreter = shebang[2:].strip() if shebang.startswith("#!") and "python" in shebang else None
        if interpreter is None:
            for timestamp, archive, path in archives:
                self.run("create", "--timestamp", timestamp, archive, path)
            return
        done = subprocess.run([interpreter, "-c", BORG_CREATE_MANY], input=json.dumps(archives), env=self.env,
                              capture_output=True, text=True, timeout=1200, check=False)
        assert done.returncode == 0, "borg create (in one process) failed: %s" % done.stderr

    def run(self, *args, zone="UTC"):
        done = subprocess.run([self.borg] + list(args), env=dict(self.env, TZ=zone),
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, "borg %s failed: %s" % (" ".join(args), done.stderr)
        return done.stdout + done.stderr

    def history(self, number):
        mark = ".h%d." % number
        return [Backup(name, moment) for name, moment in self.moments.items() if mark in name]

    def prune(self, number, flags, zone):
        """borg's keep list as (moment, ((rule, oldest, number),)), and how many it would prune."""
        output = self.run("prune", "--dry-run", "--list", "--glob-archives", "*.h%d.*" % number, *flags, zone=zone)
        kept, pruned = [], 0
        for line in output.splitlines():
            match = BORG_LINE.match(line)
            if match is None:
                continue
            if match.group("prune"):
                pruned += 1
                continue
            rule = {"secondly": "last"}.get(match.group("rule"), match.group("rule"))
            number_kept = None if rule == "within" else int(match.group("num"))
            kept.append((self.moments[match.group("name")],
                         ((rule, bool(match.group("oldest")), number_kept),)))
        return sorted(kept), pruned


@pytest.fixture(scope="module")
def borg_pool(scratch):
    rng = random.Random("%d-borg" % SEED)
    where = scratch / "borg"
    where.mkdir()
    return BorgPool(where, rng, size=max(80, 6 * HISTORIES), histories=HISTORIES)


@pytest.mark.parametrize("number", range(HISTORIES))
@pytest.mark.parametrize("zone", BORG_ZONES)
def test_borg_prune_matches_the_engine(borg_pool, zone, number):
    backups = borg_pool.history(number)
    assert backups, "history %d is empty" % number
    rng = random.Random("%d-borg-policy-%s-%d" % (SEED, zone, number))
    for _policy in range(POLICIES_PER_HISTORY):
        before = datetime.datetime.now(UTC)
        options, flags = random_policy(rng, "borg", backups, zone, before)
        tool, pruned = borg_pool.prune(number, flags, zone)
        after = datetime.datetime.now(UTC)
        # borg measures keep-within from its own clock, somewhere between these two.
        candidates = [engine_view(backups, options, "borg", zone, within_reference=reference, numbered=True)
                      for reference in (before, after)]
        assert tool in candidates, _context("history %d in %s, %s: borg kept %d/%d" % (
            number, zone, " ".join(flags), len(tool), len(backups)))
        assert pruned == len(backups) - len(tool)
