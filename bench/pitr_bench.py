# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Point-in-time recovery: WAL archive lag under a pgbench write load, and a PITR restore against
PostgreSQL's own tools, in one run on one private PostgreSQL 15 (tests/servers.py).

1. Fills a database with ``pgbench -i`` (``--db-mb``), starts ``runner wal-stream`` (the real
   CLI, a daemon, ``--partial-interval``), creates a second physical slot for the reference,
   and takes a base backup twice: ``runner backup`` (kind postgres_base: zstd, age, SHA-256,
   stored) and ``pg_basebackup -Ft -X none`` into a local directory (the reference).
2. Runs pgbench (``--clients``; the built-in tpcb-like script and, as often, an insert of an
   enrolment row with ``--template-kib`` random bytes, stored uncompressed: tpcb-like alone
   writes WAL slowly with the test server's full_page_writes=off) until the server has
   written ``--wal-mb`` of WAL. Meanwhile a
   probe commits a row every 0.5 s and notes the time the commit returned; a watcher lists the
   WAL job's directory every 0.2 s and notes when a stored WAL file (segment or partial copy)
   first holds a commit stamped after the probe's (its manifest's ``last_xact_time``): the
   probe's WAL is then in storage. It also samples the slot's lag behind the server's WAL
   position (bytes) every second. Printed: lag median, p99, max, the medians of the first and
   last third of the run (bounded means the last is not larger), the slot's lag. Probing stops
   when the load has written ``--wal-mb``; the load runs on until the last probe is stored.
3. Stops the load, stores the rest (``wal-stream --end-lsn``), fetches the same WAL with
   ``pg_receivewal --endpos`` from the reference slot into a local directory, and restores to
   ``latest`` both ways, each on an idle server:
     engine     pitr.restore_point_in_time(data_dir=...): verify + decrypt + decompress every
                WAL object and the base backup, unpack, private postgres replays, promoted;
     reference  tar -xf base.tar (local, uncompressed), postgres replays with
                restore_command = cp from the local WAL directory, promoted.
   Prints both times and the ratio.

Numbers are printed, never judged (the test suite never times anything).

  python bench/pitr_bench.py                               # the issue's size: 1 GiB database, 1 GiB WAL
  python bench/pitr_bench.py --db-mb 256 --wal-mb 256      # a quicker run on a busy machine
"""

import argparse
import datetime
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "build", "collections"))

import servers  # noqa: E402  pylint: disable=wrong-import-position
import yaml  # noqa: E402  pylint: disable=wrong-import-position
from pyrage import x25519  # noqa: E402  pylint: disable=wrong-import-position

# pylint: disable=wrong-import-position
from ansible_collections.biometrics.backup.plugins.module_utils.engine import pitr  # noqa: E402
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage  # noqa: E402

RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
JOB = "pitr-bench"
WAL_JOB = JOB + "-wal"
DB = "bench"
PGBENCH_MB_PER_SCALE = 15  # pgbench -i: about 15 MiB per scale unit, indexes included


def parse_time(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


class LagProbe:
    """Commits a probe row every ``every`` seconds; resolves each against the WAL listed in storage."""

    def __init__(self, server, wal_dir, every=0.5, poll=0.2):
        self.server, self.wal_dir, self.every, self.poll = server, wal_dir, every, poll
        self.pending = []  # (server time after commit, wall time after commit)
        self.lags = []  # (wall time of the commit, seconds until listed)
        self.seen = set()
        self.newest_xact = 0.0
        self.slot_lag = []  # (wall time, bytes)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._probe, daemon=True),
                        threading.Thread(target=self._watch, daemon=True),
                        threading.Thread(target=self._slot, daemon=True)]

    def start(self):
        with self.server.connect(DB, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS lag_probe (at timestamptz DEFAULT clock_timestamp())")
        for thread in self.threads:
            thread.start()

    def finish(self, timeout):
        """Stop probing; one more commit (a probe is resolved by a later commit stored with it),
        then wait up to ``timeout`` seconds for the probes still pending."""
        self.stop.set()
        for thread in self.threads:
            thread.join()
        with self.server.connect(DB, autocommit=True) as conn:
            conn.execute("INSERT INTO lag_probe DEFAULT VALUES")
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(self.poll)
            self.scan()

    def _probe(self):
        with self.server.connect(DB, autocommit=True) as conn:
            while not self.stop.wait(self.every):
                conn.execute("INSERT INTO lag_probe DEFAULT VALUES")
                after = conn.execute("SELECT clock_timestamp()").fetchone()[0].timestamp()
                with self.lock:
                    self.pending.append((after, time.time()))

    def _watch(self):
        while not self.stop.wait(self.poll):
            self.scan()

    def scan(self):
        try:
            names = os.listdir(self.wal_dir)
        except FileNotFoundError:
            return
        now = time.time()
        for name in names:
            manifest = os.path.join(self.wal_dir, name, "manifest.json")
            if name in self.seen or not os.path.exists(manifest):
                continue
            self.seen.add(name)
            with open(manifest, encoding="utf-8") as handle:
                stats = json.load(handle).get("stats") or {}
            if stats.get("last_xact_time"):
                self.newest_xact = max(self.newest_xact, parse_time(stats["last_xact_time"]))
        with self.lock:
            still = []
            for after, wall in self.pending:
                if self.newest_xact >= after:
                    self.lags.append((wall, now - wall))
                else:
                    still.append((after, wall))
            self.pending = still

    def _slot(self):
        with self.server.connect(DB, autocommit=True) as conn:
            while not self.stop.wait(1.0):
                row = conn.execute("SELECT pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots "
                                   "WHERE slot_name = 'bench_slot'").fetchone()
                if row and row[0] is not None:
                    self.slot_lag.append((time.time(), int(row[0])))

    def summary(self):
        lags = [lag for _wall, lag in sorted(self.lags)]
        third = max(1, len(lags) // 3)
        slot = [value for _wall, value in self.slot_lag]
        slot_last = slot[-max(1, len(slot) // 3):]
        return {"probes": len(lags), "unresolved": len(self.pending),
                "lag_median_s": round(statistics.median(lags), 2) if lags else None,
                "lag_p99_s": round(percentile(lags, 0.99), 2) if lags else None,
                "lag_max_s": round(max(lags), 2) if lags else None,
                "lag_median_first_third_s": round(statistics.median(lags[:third]), 2) if lags else None,
                "lag_median_last_third_s": round(statistics.median(lags[-third:]), 2) if lags else None,
                "slot_lag_median_mib": round(statistics.median(slot) / 2 ** 20, 1) if slot else None,
                "slot_lag_max_mib": round(max(slot) / 2 ** 20, 1) if slot else None,
                "slot_lag_last_third_max_mib": round(max(slot_last) / 2 ** 20, 1) if slot else None}


def current_lsn(server):
    with server.connect(DB, autocommit=True) as conn:
        return conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]


def lsn_bytes(server, start):
    with server.connect(DB, autocommit=True) as conn:
        return int(conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (start,)).fetchone()[0])


def as_account(account):
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}


def reference_restore(server, base_tar, wal_dir, where, account):
    """tar -xf + postgres replaying the local WAL (restore_command = cp), until promoted."""
    env = dict(os.environ, LC_ALL="C.UTF-8", TZ="UTC")
    data_dir = os.path.join(where, "data")
    os.makedirs(data_dir, mode=0o700)
    if account:
        os.chown(where, account.pw_uid, account.pw_gid)
        os.chown(data_dir, account.pw_uid, account.pw_gid)
    subprocess.run(["tar", "-x", "-f", base_tar, "-C", data_dir], check=True, **as_account(account))
    os.makedirs(os.path.join(data_dir, "pg_wal"), mode=0o700, exist_ok=True)
    if account:
        os.chown(os.path.join(data_dir, "pg_wal"), account.pw_uid, account.pw_gid)
    restore = "cp %s/%%f %%p 2>/dev/null || cp %s/%%f.partial %%p" % (wal_dir, wal_dir)
    with open(os.path.join(data_dir, "recovery.signal"), "w", encoding="utf-8"):
        pass
    pg_ctl = os.path.join(server.bin_dir, "pg_ctl")
    options = ("-p 54330 -k %s -c listen_addresses='' -c archive_mode=off -c hot_standby=off "
               "-c \"restore_command=%s\"" % (where, restore))
    subprocess.run([pg_ctl, "-D", data_dir, "-l", os.path.join(where, "postgres.log"), "-w", "-t", "3600",
                    "-o", options, "start"], check=True, env=env, stdout=subprocess.DEVNULL, **as_account(account))
    try:
        while True:
            state = subprocess.run([os.path.join(server.bin_dir, "pg_controldata"), data_dir], env=env,
                                   capture_output=True, text=True, check=True).stdout
            if "in production" in state:
                break
            if subprocess.run([pg_ctl, "-D", data_dir, "status"], env=env, stdout=subprocess.DEVNULL,
                              check=False, **as_account(account)).returncode != 0:
                raise RuntimeError("the reference recovery failed, see %s/postgres.log" % where)
            time.sleep(0.2)
    finally:
        subprocess.run([pg_ctl, "-D", data_dir, "-m", "fast", "-w", "stop"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_account(account))


def main():  # pylint: disable=too-many-locals,too-many-statements
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db-mb", type=int, default=1024, help="database size from pgbench -i (default 1024)")
    parser.add_argument("--wal-mb", type=int, default=1024, help="WAL written under load (default 1024)")
    parser.add_argument("--clients", type=int, default=2, help="pgbench clients (default 2)")
    parser.add_argument("--template-kib", type=int, default=4,
                        help="random bytes per enrolment insert in the load (default 4; 0: tpcb-like only)")
    parser.add_argument("--partial-interval", type=float, default=10, help="wal-stream partial interval (10)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a new one under /tmp)")
    parser.add_argument("--json", action="store_true", help="print the raw measurements as JSON")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="pitr-bench-", dir=args.workdir)
    os.chmod(work, 0o755)
    account = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    key = x25519.Identity.generate()
    with open(os.path.join(work, "identity"), "w", encoding="utf-8") as handle:
        handle.write(str(key) + "\n")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "cpus": os.cpu_count(), "args": vars(args)}
    daemon = None
    with servers.server_dir("pitrbench") as base:
        server = servers.start_postgres(base)
        try:
            with server.connect() as conn:
                conn.execute("CREATE DATABASE %s" % DB)
            env = dict(os.environ, PGHOST=server.host, PGPORT=str(server.port), PGUSER="postgres")
            pgbench = os.path.join(server.bin_dir, "pgbench")
            scale = max(1, args.db_mb // PGBENCH_MB_PER_SCALE)
            started = time.monotonic()
            subprocess.run([pgbench, "-i", "-q", "-s", str(scale), DB],
                           env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with server.connect(DB, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
                results["db_bytes"] = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            results["fill_s"] = round(time.monotonic() - started, 1)
            job = {"job": JOB, "kind": "postgres_base",
                   "source": {"host": server.host, "port": server.port, "user": "postgres", "bin_dir": server.bin_dir,
                              "slot": "bench_slot", "spool_dir": os.path.join(work, "spool"),
                              "partial_interval": args.partial_interval},
                   "storage": {"backend": "filesystem", "path": os.path.join(work, "store")},
                   "encryption": {"recipients": [str(key.to_public())],
                                  "identity_file": os.path.join(work, "identity")}}
            config = os.path.join(work, "job.yml")
            with open(config, "w", encoding="utf-8") as handle:
                yaml.safe_dump(job, handle)
            runner_env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "build", "collections"))

            def runner(*argv):
                return [sys.executable, "-m", RUNNER] + list(argv) + ["--config", config]

            subprocess.run(runner("wal-stream", "--duration", "1"), env=runner_env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # creates the slot
            with server.connect(DB, autocommit=True) as conn:
                conn.execute("SELECT pg_create_physical_replication_slot('reference_slot', true)")
            started = time.monotonic()
            subprocess.run(runner("backup"), env=runner_env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            results["engine_base_backup_s"] = round(time.monotonic() - started, 1)
            started = time.monotonic()
            subprocess.run([os.path.join(server.bin_dir, "pg_basebackup"), "-D", os.path.join(work, "refbase"),
                            "-Ft", "-X", "none", "--checkpoint=fast"], env=env, check=True,
                           stderr=subprocess.DEVNULL)
            results["pg_basebackup_s"] = round(time.monotonic() - started, 1)

            # 2. Load and lag.
            daemon = subprocess.Popen(runner("wal-stream"), env=runner_env,  # pylint: disable=consider-using-with
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            probe = LagProbe(server, os.path.join(work, "store", WAL_JOB))
            probe.start()
            start_lsn = current_lsn(server)
            scripts = ["-b", "tpcb-like@1"]
            if args.template_kib:
                with server.connect(DB, autocommit=True) as conn:
                    conn.execute("CREATE TABLE enrolment_load (id bigserial PRIMARY KEY, template bytea NOT NULL, "
                                 "at timestamptz NOT NULL DEFAULT now())")
                    conn.execute("ALTER TABLE enrolment_load ALTER template SET STORAGE EXTERNAL")
                with open(os.path.join(work, "enrol.sql"), "w", encoding="utf-8") as handle:
                    handle.write("INSERT INTO enrolment_load (template) SELECT decode(string_agg(md5(random()::text),"
                                 " ''), 'hex') FROM generate_series(1, %d);\n" % (args.template_kib * 64))
                scripts += ["-f", os.path.join(work, "enrol.sql") + "@1"]
            load = subprocess.Popen([pgbench, "-n", "-c", str(args.clients), "-j", str(args.clients), "-T", "36000"]
                                    + scripts + [DB],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started = time.monotonic()
            while lsn_bytes(server, start_lsn) < args.wal_mb * 2 ** 20:
                if load.poll() is not None:
                    raise RuntimeError("pgbench ended early (exit %s)" % load.returncode)
                time.sleep(1)
            probe.finish(timeout=args.partial_interval + 30)  # probes while the load runs only
            load.send_signal(signal.SIGINT)
            load.wait()
            results["load_s"] = round(time.monotonic() - started, 1)
            results["wal_bytes"] = lsn_bytes(server, start_lsn)
            results["lag"] = probe.summary()
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(timeout=300)
            daemon = None

            # 3. The same WAL, both ways; then the restores on an idle server.
            end_lsn = current_lsn(server)
            subprocess.run(runner("wal-stream", "--end-lsn", end_lsn), env=runner_env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.makedirs(os.path.join(work, "refwal"))
            subprocess.run([os.path.join(server.bin_dir, "pg_receivewal"), "-D", os.path.join(work, "refwal"),
                            "-S", "reference_slot", "-E", end_lsn, "--no-loop"], env=env, check=True,
                           stderr=subprocess.DEVNULL)
            if account:
                subprocess.run(["chown", "-R", "%d:%d" % (account.pw_uid, account.pw_gid),
                                os.path.join(work, "refwal"), os.path.join(work, "refbase")], check=True)
            scratch = os.path.join(work, "scratch")
            os.mkdir(scratch, 0o711)
            storage = open_storage(job["storage"])
            started = time.monotonic()
            phases = []
            report = pitr.restore_point_in_time(storage, JOB, "latest", identity=str(key),
                                                data_dir=os.path.join(scratch, "engine-data"),
                                                bin_dir=server.bin_dir, scratch_dir=scratch,
                                                log=lambda message: phases.append(
                                                    (round(time.monotonic() - started, 1), message)))
            results["engine_restore_s"] = round(time.monotonic() - started, 1)
            results["engine_phases"] = phases
            results["engine_recovered_lsn"] = report["recovered_to"]["lsn"]
            results["engine_wal_objects_bytes"] = report.get("wal_bytes")
            shutil.rmtree(os.path.join(scratch, "engine-data"))
            started = time.monotonic()
            reference_restore(server, os.path.join(work, "refbase", "base.tar"), os.path.join(work, "refwal"),
                              os.path.join(scratch, "reference"), account)
            results["reference_restore_s"] = round(time.monotonic() - started, 1)
            results["ratio"] = round(results["engine_restore_s"] / results["reference_restore_s"], 2)
        finally:
            if daemon is not None:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
            server.process.stop()
            shutil.rmtree(work, ignore_errors=True)
    lag = results["lag"]
    print("date %s, %d CPUs, load average %s" % (results["date"], results["cpus"], " ".join(
        "%.2f" % value for value in os.getloadavg())))
    print("database %.0f MiB (pgbench -i, filled in %s s); WAL under load %.0f MiB in %s s with %d pgbench clients"
          % (results["db_bytes"] / 2 ** 20, results["fill_s"], results["wal_bytes"] / 2 ** 20, results["load_s"],
             args.clients))
    print("commit -> WAL listed in storage (partial interval %ss): median %s s, p99 %s s, max %s s over %d probes "
          "(%d unresolved); median first third %s s, last third %s s"
          % (args.partial_interval, lag["lag_median_s"], lag["lag_p99_s"], lag["lag_max_s"], lag["probes"],
             lag["unresolved"], lag["lag_median_first_third_s"], lag["lag_median_last_third_s"]))
    print("slot behind the server: median %s MiB, max %s MiB, max in the last third %s MiB"
          % (lag["slot_lag_median_mib"], lag["slot_lag_max_mib"], lag["slot_lag_last_third_max_mib"]))
    print("base backup: runner backup %s s, pg_basebackup -Ft to local disk %s s"
          % (results["engine_base_backup_s"], results["pg_basebackup_s"]))
    print("PITR restore to latest: engine %s s, tar -xf + replay from local disk %s s, ratio %s"
          % (results["engine_restore_s"], results["reference_restore_s"], results["ratio"]))
    for seconds, message in results["engine_phases"]:
        print("  engine at %5.1f s: %s" % (seconds, message))
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
