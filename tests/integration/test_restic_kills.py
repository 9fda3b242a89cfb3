# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Kill campaign of the restic format (issue 16): the runner killed with SIGKILL at random points
of restic-format backups and prunes, 20 times (``BIOMETRICS_RESTIC_KILLS=<n>`` for more), and of
their offsite copies (``runner copy``, half as many times, at least 6; see the last test).

The CronJob's command (``python -m ...engine.runner backup|prune --config job.yaml``) runs a Redis
job stored in the restic format on a filesystem location, and its whole process group (the
runner and the restic it drives, as a container runtime kills a pod) is killed after a delay
drawn uniformly over the measured duration of an uninterrupted run of the same command, from a
seed printed in every failure (``BIOMETRICS_CRASH_SEED=<n>`` repeats the plan). In turn, a
delay is drawn over the whole run, over its restic part only (from restic's first lock on, where
the repository changes, so that kills do not mostly land in the interpreter's start), or a
backup is killed the moment restic commits a snapshot, before the engine publishes the
manifest. Half the kills
hit backups, half hit prunes (retention ``keep_last: 2``, ``orphan_grace: 0``, so every prune
deletes, forgets and runs ``restic prune``).

After every kill, read with restic itself and the engine:

1. the repository is consistent: the stock ``restic check`` passes (``--no-lock``: the killed
   process's lock is still there, which is the next point);
2. nothing incomplete is listed: the listing shows the backups that completed before, plus the
   killed run's only when its manifest was stored, and every listed backup verifies;
3. the next run of the job (a backup before a prune round, the prune after a backup round)
   succeeds despite the killed process's stale lock.

At the end a prune leaves no snapshot that belongs to no listed backup, no prune-pending note
and no lock, and a final ``restic check --read-data`` reads every pack.

The killed runner's restic is an orphan; until some process reaps it, it is a zombie whose PID
answers as alive, so its lock would look live and the next run would wait out the lock. In a
pod tini reaps it. Here the test does it itself: it is a child subreaper while it runs (orphans
of its process groups come to it) and, after each kill, reaps every member of the killed group,
so the campaign does not depend on what runs as PID 1 (a CI container's may not reap).
"""

import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import operations
from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = "kills"
DB = 6
KEYS, VALUE_BYTES = 8, 512 * 1024   # 4 MiB of incompressible values: restic's part takes a while
KILLS = int(os.environ.get("BIOMETRICS_RESTIC_KILLS", "20"))


PR_SET_CHILD_SUBREAPER = 36   # prctl(2)


@pytest.fixture
def child_subreaper():
    """This process adopts the orphans of its descendants while the test runs."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _group_members(pgid):
    """PIDs whose process group is ``pgid``, zombies included (they keep theirs until reaped)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                fields = handle.read().rpartition(")")[2].split()
        except OSError:   # gone meanwhile
            continue
        if int(fields[2]) == pgid:   # after the name: state, ppid, pgrp
            members.append(int(entry))
    return members


def _reap_group(pgid, timeout=60):
    """Wait until no process of the killed group ``pgid`` is left, reaping those adopted here."""
    deadline = time.monotonic() + timeout
    while True:
        left = _group_members(pgid)
        if not left:
            return
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:   # not adopted yet (its parent is still exiting)
                pass
        assert time.monotonic() < deadline, "processes of the killed group %d outlived it: %s" % (pgid, left)
        time.sleep(0.01)


def _seed():
    value = os.environ.get("BIOMETRICS_CRASH_SEED")
    return int(value) if value else random.SystemRandom().randrange(1 << 32)


class Campaign:
    def __init__(self, tmp_path, redis_server, seed):
        self.seed = seed
        self.random = random.Random(seed)
        self.store = tmp_path / "store"
        self.repository = self.store / "_restic" / JOB
        self.password = "restic-kills-" + uuid.uuid4().hex
        password_file = tmp_path / "restic-password"
        password_file.write_text(self.password + "\n")
        password_file.chmod(0o600)
        self.options = {"backend": "filesystem", "path": str(self.store), "format": "restic",
                        "restic_password_file": str(password_file)}
        self.config = tmp_path / "job.json"
        self.config.write_text(json.dumps({
            "job": JOB, "kind": "redis", "source": {"host": redis_server.host, "port": redis_server.port},
            "storage": self.options, "retention": {"keep_last": 2, "orphan_grace": "0"},
            # runner copy: into the job's repository there, opened with the job's password
            "copy": {"destination": {"backend": "filesystem", "path": str(tmp_path / "offsite")}}}))
        self.offsite = {"backend": "filesystem", "path": str(tmp_path / "offsite"),
                        "restic_password_file": str(password_file)}
        self.offsite_repository = tmp_path / "offsite" / "_restic" / JOB
        self.source = {"host": redis_server.host, "port": redis_server.port}
        self.durations = {}
        self.landed = []
        self.log = open(tmp_path / "runner.log", "w+", encoding="utf-8")  # pylint: disable=consider-using-with

    def where(self, message):
        return "%s (BIOMETRICS_CRASH_SEED=%d)" % (message, self.seed)

    def storage(self):
        return open_storage(self.options)

    def command(self, command):
        argv = [sys.executable, "-m", RUNNER, command, "--config", str(self.config)]
        env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"))
        self.log.seek(0)
        self.log.truncate()
        return subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd="/",
                                start_new_session=True)

    def run(self, command):
        """One uninterrupted run as a process; returns its duration and when restic first held a
        lock of the repository (its first command), both from the start."""
        started = time.monotonic()
        proc = self.command(command)
        locked_at = None
        while proc.poll() is None:
            if locked_at is None and os.path.isdir(self.repository / "locks") and os.listdir(self.repository / "locks"):
                locked_at = time.monotonic() - started
            time.sleep(0.01)
        self.log.seek(0)
        assert proc.returncode == 0, self.where("%s failed: %s" % (command, self.log.read()[-4000:]))
        return time.monotonic() - started, locked_at

    def measure(self, command, runs=1):
        durations = [self.run(command) for dummy in range(runs)]
        duration = min(item[0] for item in durations)
        locked_at = min([item[1] for item in durations if item[1] is not None] or [0.0])
        self.durations[command] = (duration, locked_at)

    def kill(self, command):
        """Start ``command`` and SIGKILL its process group (the runner and its restic) after a delay:
        every other kill uniform over the whole measured run (the interpreter's start included),
        the others uniform over its restic part (from restic's first lock to the end), where the
        repository changes. Returns whether the kill hit a running process."""
        duration, locked_at = self.durations[command]
        turn = len(self.landed) // 2   # the how-manieth kill of this command
        modes = ("whole run", "restic part", "new snapshot") if command == "backup" else ("whole run", "restic part")
        mode = modes[turn % len(modes)]
        delay = self.random.uniform(locked_at if mode == "restic part" else 0.0, duration)
        snapshots_dir = self.repository / "snapshots"
        committed = set(os.listdir(snapshots_dir))
        started = time.monotonic()
        proc = self.command(command)
        deadline = started + (120 if mode == "new snapshot" else delay)
        # "new snapshot": killed the moment restic commits a snapshot, before the engine can
        # publish the manifest of the backup it belongs to.
        while proc.poll() is None and time.monotonic() < deadline:
            if mode == "new snapshot" and set(os.listdir(snapshots_dir)) - committed:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.returncode == 0 and mode != "new snapshot":
            # It beat its kill: the run takes less than measured now (the load of other tests
            # changes), so the next delays of this command are drawn over this run instead.
            observed = time.monotonic() - started
            if observed < duration:
                self.durations[command] = (observed, min(locked_at, observed))
        proc.wait(timeout=60)
        _reap_group(proc.pid)
        return proc.returncode == -signal.SIGKILL

    def restic(self, *args, repository=None):
        return subprocess.run(["restic", "-r", "local:%s" % (repository or self.repository), "--no-cache"] + list(args),
                              capture_output=True, text=True, check=False,
                              env=dict(os.environ, RESTIC_PASSWORD=self.password), timeout=600)

    def snapshots(self):
        proc = self.restic("--no-lock", "snapshots", "--json")
        assert proc.returncode == 0, self.where(proc.stderr)
        return json.loads(proc.stdout or "[]") or []

    def listed(self):
        listing = operations.inventory(self.storage(), JOB)
        assert listing["junk"] == [], self.where("junk listed: %s" % listing["junk"])
        return [manifest["id"] for manifest in listing["backups"]]

    def snapshot_count(self):
        """restic keeps one file per snapshot in snapshots/: counted without a restic start."""
        return len(os.listdir(self.repository / "snapshots"))

    def packs(self):
        return sum(len(files) for dummy, dummy2, files in os.walk(self.repository / "data"))

    def check_after_kill(self, command, before, snapshots_before, packs_before):
        proc = self.restic("--no-lock", "check")
        assert proc.returncode == 0, self.where("restic check after a killed %s: %s%s"
                                                % (command, proc.stdout[-2000:], proc.stderr[-2000:]))
        listed = self.listed()
        new = [backup_id for backup_id in listed if backup_id not in before]
        if command == "backup":
            assert set(before) <= set(listed) and len(new) <= 1, self.where((before, listed))
        else:   # a prune only ever removes, the newest backup always stays
            assert set(listed) <= set(before) and not new and listed[:1] == before[:1], self.where((before, listed))
        if new or command == "prune":
            verified = operations.verify(self.storage(), JOB, backup="all")
            assert [r["result"] for r in verified["results"]] == ["ok"] * len(listed), self.where(verified)
        # Where the kill landed, as the storage shows it (for the summary line).
        snapshots = self.snapshot_count()
        if command == "backup":
            self.landed.append("backup: " + ("after its manifest" if new else "after a snapshot, before the manifest"
                                             if snapshots > snapshots_before else "packs written, no snapshot"
                                             if self.packs() > packs_before else "before restic stored data"))
        else:
            self.landed.append("prune: " + ("after forget" if snapshots < snapshots_before else "after deleting manifests"
                                            if len(listed) < len(before) else "before deleting"))

    def backup_in_process(self):
        return operations.prepare_backup(JOB, operations.make_source("redis", self.source), self.storage()).run()


@pytest.mark.usefixtures("child_subreaper")
def test_sigkill_during_restic_backups_and_prunes(tmp_path, redis_server):
    client = redis_server.client(DB)
    client.flushdb()
    for index in range(KEYS):
        client.set("template:%03d" % index, os.urandom(VALUE_BYTES))
    campaign = Campaign(tmp_path, redis_server, _seed())
    try:
        # The uninterrupted durations the kill delays are drawn over (interpreter start included).
        campaign.measure("backup", runs=2)
        campaign.run("backup")
        campaign.measure("prune")
        hits = 0
        for round_ in range(KILLS):
            command = ("backup", "prune")[round_ % 2]
            if command == "prune":   # something for the prune to delete: a third backup
                campaign.backup_in_process()   # (and the stale lock of the killed backup met)
            before, snapshots_before, packs_before = campaign.listed(), campaign.snapshot_count(), campaign.packs()
            hits += campaign.kill(command)
            client.set("template:%03d" % campaign.random.randrange(KEYS), os.urandom(VALUE_BYTES))
            campaign.check_after_kill(command, before, snapshots_before, packs_before)
        print("\nrestic kills (seed %d): %d of %d hit a running process; durations %s; landed %s" % (
            campaign.seed, hits, KILLS, {k: [round(v, 2) for v in pair] for k, pair in campaign.durations.items()},
            {where: campaign.landed.count(where) for where in sorted(set(campaign.landed))}))
        assert hits >= KILLS // 2, campaign.where("most runs ended before their kill: the delays are wrong")

        # The job goes on: a backup and a prune after the last kill, whatever it left.
        campaign.run("backup")
        campaign.run("prune")
        listed = campaign.listed()
        assert len(listed) == 2, campaign.where(listed)
        owners = {tag[len("backup_id="):] for snap in campaign.snapshots() for tag in snap.get("tags") or []
                  if tag.startswith("backup_id=")}
        assert owners == set(listed), campaign.where("snapshots of no listed backup: %s" % (owners - set(listed)))
        assert not os.path.exists(str(campaign.repository) + ".prune-pending")
        locks = campaign.restic("--no-lock", "list", "locks")
        assert locks.returncode == 0 and locks.stdout.strip() == "", campaign.where(locks.stdout + locks.stderr)
        full = campaign.restic("check", "--read-data")
        assert full.returncode == 0, campaign.where(full.stdout[-2000:] + full.stderr[-2000:])
        assert all(resticstore.is_restic(manifest) for manifest in operations.inventory(campaign.storage(), JOB)["backups"])
    finally:
        campaign.log.close()
        client.flushdb()
        client.close()


@pytest.mark.usefixtures("child_subreaper")
def test_sigkill_during_restic_copies(tmp_path, redis_server):
    """runner copy of the restic format killed at random points (half of the kills in restic's
    part), a new backup to copy before each: the destination's repository stays consistent, only
    complete copies are listed there and each verifies, and the next uninterrupted copy completes
    what the killed one began; at the end no lock is left and every pack reads back."""
    client = redis_server.client(DB)
    client.flushdb()
    for index in range(KEYS):
        client.set("template:%03d" % index, os.urandom(VALUE_BYTES))
    campaign = Campaign(tmp_path, redis_server, _seed())
    kills = max(KILLS // 2, 6)
    try:
        campaign.run("backup")
        campaign.run("copy")   # creates the destination's repository
        # The steady state, one new backup to copy, measured twice (the faster one counts, so
        # that the kills land inside the run on a busy machine too).
        measured = []
        for dummy in range(2):
            campaign.backup_in_process()
            measured.append(campaign.run("copy"))
        campaign.durations["copy"] = (min(item[0] for item in measured),
                                      min([item[1] for item in measured if item[1] is not None] or [0.0]))
        hits = 0
        for dummy in range(kills):
            client.set("template:%03d" % campaign.random.randrange(KEYS), os.urandom(VALUE_BYTES))
            campaign.backup_in_process()
            source = campaign.listed()
            snapshots_before = len(os.listdir(campaign.offsite_repository / "snapshots"))
            hits += campaign.kill("copy")
            destination = open_storage(campaign.offsite)
            if (campaign.offsite_repository / "config").exists():
                proc = campaign.restic("--no-lock", "check", repository=campaign.offsite_repository)
                assert proc.returncode == 0, campaign.where("restic check at the destination after a killed copy: %s%s"
                                                            % (proc.stdout[-2000:], proc.stderr[-2000:]))
            listing = operations.inventory(destination, JOB)
            assert listing["junk"] == [], campaign.where(listing["junk"])
            copied = [manifest["id"] for manifest in listing["backups"]]
            assert set(copied) <= set(source), campaign.where((copied, source))
            if copied:
                verified = operations.verify(destination, JOB, backup="all")
                assert [r["result"] for r in verified["results"]] == ["ok"] * len(copied), campaign.where(verified)
            snapshots = len(os.listdir(campaign.offsite_repository / "snapshots"))
            campaign.landed.append("copy: " + ("finished" if len(copied) == len(source) else
                                               "snapshot copied, manifest not published" if snapshots > snapshots_before
                                               else "before the snapshot"))
            # the next copy completes what the killed one began
            campaign.run("copy")
            assert [m["id"] for m in operations.inventory(destination, JOB)["backups"]] == source, campaign.where(source)
        print("\nrestic copy kills (seed %d): %d of %d hit a running process; durations %s; landed %s" % (
            campaign.seed, hits, kills, campaign.durations["copy"],
            {where: campaign.landed.count(where) for where in sorted(set(campaign.landed))}))
        assert hits >= kills // 2, campaign.where("most copies ended before their kill: the delays are wrong")

        campaign.run("copy")
        destination = open_storage(campaign.offsite)
        assert [m["id"] for m in operations.inventory(destination, JOB)["backups"]] == campaign.listed()
        locks = campaign.restic("--no-lock", "list", "locks", repository=campaign.offsite_repository)
        assert locks.returncode == 0 and locks.stdout.strip() == "", campaign.where(locks.stdout + locks.stderr)
        full = campaign.restic("check", "--read-data", repository=campaign.offsite_repository)
        assert full.returncode == 0, campaign.where(full.stdout[-2000:] + full.stderr[-2000:])
    finally:
        campaign.log.close()
        client.flushdb()
        client.close()
