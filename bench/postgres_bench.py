# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""End to end on PostgreSQL: the runner's backup and verified restore against stock tools.

Starts a private PostgreSQL 15 (tests/servers.py, the harness's own start code) and,
optionally, SeaweedFS S3; fills a database with data shaped like biometric records (random
``bytea`` templates, text, ``jsonb``, timestamps, two indexes: nothing like pgbench's very
compressible rows); then times, in one run on the same database:

  backup   pg_dump -Fc -Z0 > /dev/null                          the source's own limit
           pg_dump -Fc -Z0 | zstd -T0 -1 | age -r KEY > file    best stock pipeline
           pg_dump | gzip > file                                the seed's pipeline
           runner backup (zstd 1 + age + SHA-256 + manifest)    this collection (filesystem or S3)
  restore  pg_restore -d NEW uncompressed.dump                  stock restore of a local dump
           pg_restore -j 2 -d NEW uncompressed.dump             the same with two jobs (a seekable file)
           age -d | zstd -d | pg_restore -d NEW                 stock decrypt-and-restore of the stock pipeline's file
           runner restore (verify all objects, decrypt, decompress, pg_restore, row checks)
           runner restore with jobs: 2 (verified dump spooled to a local file, pg_restore -j 2)

Every case runs ``--rounds`` times (default 3; the slow seed gzip pipeline only in the first
``--seed-rounds``), interleaved, the order of the cases reversed every other round, and the
best round of each case is kept. Every restore goes into a freshly created database. The
runner restore's phases (engine/restore.py) of its best round are printed too. Numbers are
printed, never judged.

  python bench/postgres_bench.py --size-mb 1024          # the issue's 1 GiB case
  python bench/postgres_bench.py --size-mb 200 --s3      # runner backups into SeaweedFS
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "build", "collections"))

import servers  # noqa: E402  pylint: disable=wrong-import-position
from pyrage import x25519  # noqa: E402  pylint: disable=wrong-import-position

RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
ROW_BYTES = 1150  # a row of the table below takes about this much on disk, indexes included


def timed(argv, env=None, shell=False, output=None):
    """Wall seconds and peak RSS (MiB) of one command: its largest process, shell pipelines included
    (``wait4()`` reports the largest of the child and the descendants it waited for).

    ``output``: a list that receives the command's stdout (else it is discarded).
    """
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, shell=shell,
                            stdout=subprocess.PIPE if output is not None else subprocess.DEVNULL,
                            executable="/bin/bash" if shell else None)
    data = proc.stdout.read() if output is not None else None
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    if output is not None:
        output.append(data)
    return seconds, usage.ru_maxrss / 1024.0


def fresh_database(server, name):
    with server.connect() as conn:
        conn.autocommit = True
        conn.execute("DROP DATABASE IF EXISTS %s" % name)
        conn.execute("CREATE DATABASE %s" % name)


def drop_database(server, name):
    with server.connect() as conn:
        conn.autocommit = True
        conn.execute("DROP DATABASE IF EXISTS %s" % name)


def fill(server, dbname, size_mb):
    rows = max(1000, size_mb * 1024 * 1024 // ROW_BYTES)
    with server.connect(dbname, autocommit=True) as conn:
        conn.execute("""
            CREATE TABLE enrolment (
              id bigserial PRIMARY KEY,
              subject text NOT NULL,
              template bytea NOT NULL,
              quality jsonb NOT NULL,
              captured_at timestamptz NOT NULL)""")
        batch = 20000
        for first in range(0, rows, batch):
            conn.execute("""
                INSERT INTO enrolment (subject, template, quality, captured_at)
                SELECT 'subject-' || md5(g::text),
                       decode((SELECT string_agg(md5(random()::text || i::text || g::text), '') FROM generate_series(1, 40) AS i), 'hex'),
                       jsonb_build_object('score', round(random()::numeric, 3), 'device', 'scanner-' || (g %% 37),
                                          'finger', (ARRAY['thumb','index','middle','ring','little'])[1 + g %% 5]),
                       now() - (g || ' seconds')::interval
                FROM generate_series(%s::bigint, %s::bigint) AS g""", (first + 1, min(rows, first + batch)))
        conn.execute("CREATE INDEX ON enrolment (subject)")
        conn.execute("CREATE INDEX ON enrolment (captured_at)")
        conn.execute("VACUUM ANALYZE enrolment")
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    return rows, size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="approximate database size (default 1024)")
    parser.add_argument("--s3", action="store_true", help="runner backups into a private SeaweedFS instead of a directory")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every case, the best is kept (default 3)")
    parser.add_argument("--seed-rounds", type=int, default=1,
                        help="rounds of the slow seed gzip pipeline (default 1)")
    args = parser.parse_args()

    base = tempfile.mkdtemp(prefix="pg-bench-")
    pg = s3 = None
    try:
        pg = servers.start_postgres(base)
        work = os.path.join(base, "work")
        os.mkdir(work)
        tool = pg.tool
        env = dict(os.environ, PGHOST=pg.host, PGPORT=str(pg.port), PGUSER=pg.user,
                   PYTHONPATH=os.path.join(ROOT, "build", "collections"))
        with pg.connect() as conn:
            conn.autocommit = True
            conn.execute("CREATE DATABASE bench")
        print("filling a ~%d MiB database ..." % args.size_mb, flush=True)
        rows, db_bytes = fill(pg, "bench", args.size_mb)
        print("database: %d rows, %.0f MiB on disk" % (rows, db_bytes / 1048576.0))

        identity = x25519.Identity.generate()
        key_file = os.path.join(work, "key.txt")
        with open(key_file, "w", encoding="ascii") as handle:
            handle.write(str(identity) + "\n")
        recipient = str(identity.to_public())

        if args.s3:
            s3 = servers.start_s3(base)
            storage = dict(backend="s3", bucket=s3.bucket, endpoint_url=s3.endpoint_url,
                           access_key_env="BENCH_S3_ACCESS", secret_key_env="BENCH_S3_SECRET")
            env.update(BENCH_S3_ACCESS=s3.access_key, BENCH_S3_SECRET=s3.secret_key)
        else:
            storage = dict(backend="filesystem", path=os.path.join(work, "store"))
        job_file = os.path.join(work, "job.json")
        job_j2_file = os.path.join(work, "job-j2.json")
        scratch = os.path.join(work, "scratch")
        os.mkdir(scratch)
        for path, extra in ((job_file, {"restore_database": "bench_engine"}),
                            (job_j2_file, {"restore_database": "bench_engine_j2", "jobs": 2, "scratch_dir": scratch})):
            with open(path, "w", encoding="utf-8") as handle:
                json.dump({"job": "bench", "kind": "postgres",
                           "source": {"host": pg.host, "port": pg.port, "user": pg.user, "database": "bench",
                                      "bin_dir": pg.bin_dir},
                           "storage": storage, "compression": {"algorithm": "zstd", "level": 1},
                           "encryption": {"recipients": [recipient], "identity_file": key_file},
                           "restore": {"target": dict({"host": pg.host, "port": pg.port, "user": pg.user,
                                                       "database": "bench", "bin_dir": pg.bin_dir}, **extra)}},
                          handle)

        dump = tool("pg_dump")
        plain = os.path.join(work, "plain.dump")
        subprocess.run([dump, "-Fc", "-Z0", "-d", "bench", "-f", plain], env=env, check=True)
        restore_tool = tool("pg_restore")
        runner_output = {}

        def runner_restore(config=job_file, database="bench_engine"):
            def run():
                drop_database(pg, database)
                out = []
                result = timed([sys.executable, "-m", RUNNER, "restore", "--config", config], env, output=out)
                runner_output[result] = json.loads(out[0])
                return result
            return run

        def restore_into(name, argv, shell=False):
            def run():
                fresh_database(pg, name)
                return timed(argv, env, shell=shell)
            return run

        backups = [
            ("source limit: pg_dump -Fc -Z0 > /dev/null",
             lambda: timed("%s -Fc -Z0 -d bench > /dev/null" % dump, env, shell=True)),
            ("stock: pg_dump -Fc -Z0 | zstd -T0 -1 | age",
             lambda: timed("set -o pipefail; %s -Fc -Z0 -d bench | zstd -q -T0 -1 | age -r %s > %s/stock.age"
                           % (dump, recipient, work), env, shell=True)),
            ("seed: pg_dump | gzip",
             lambda: timed("set -o pipefail; %s -d bench | gzip > %s/seed.sql.gz" % (dump, work), env, shell=True)),
            ("runner backup (zstd 1 + age + sha256%s)" % (" -> S3" if args.s3 else ""),
             lambda: timed([sys.executable, "-m", RUNNER, "backup", "--config", job_file], env)),
        ]
        restores = [
            ("stock restore: pg_restore of an uncompressed local dump",
             restore_into("bench_stock", [restore_tool, "-d", "bench_stock", plain])),
            ("stock restore: pg_restore -j 2 of an uncompressed local dump",
             restore_into("bench_j2", [restore_tool, "-j", "2", "-d", "bench_j2", plain])),
            ("stock pipe: age -d | zstd -d | pg_restore",
             restore_into("bench_pipe", "set -o pipefail; age -d -i %s %s/stock.age | zstd -q -d | %s -d bench_pipe"
                          % (key_file, work, restore_tool), shell=True)),
            ("runner restore (verify, decrypt, decompress, pg_restore, row checks)", runner_restore()),
            ("runner restore, jobs: 2 (spool the verified dump, pg_restore -j 2 from it, row checks)",
             runner_restore(job_j2_file, "bench_engine_j2")),
        ]
        rounds = {name: [] for name, _run in backups + restores}
        for number in range(args.rounds):
            cases = [case for case in backups if case[0] != backups[2][0] or number < args.seed_rounds]
            cases += restores  # the pipe restores the file this round's stock backup wrote
            order = cases[:len(cases) - len(restores)], restores
            for group in order:
                for name, run in (group if number % 2 == 0 else list(reversed(group))):
                    rounds[name].append(run())
            print("round %d of %d done, load average %.2f" % (number + 1, args.rounds, os.getloadavg()[0]),
                  flush=True)
        results = {name: min(found) for name, found in rounds.items() if found}

        print("\n| run | best s | rounds s | peak RSS MiB (largest process) |\n|---|---:|---|---:|")
        for name, (seconds, peak) in results.items():
            print("| %s | %.1f | %s | %.0f |" % (name, seconds, " / ".join("%.1f" % r[0] for r in rounds[name]), peak))
        best = {name: seconds for name, (seconds, _peak) in results.items()}
        names = [name for name, _run in backups + restores]
        engine, stock, seed, limit = best[names[3]], best[names[1]], best[names[2]], best[names[0]]
        print("\nbackup: runner / best stock pipeline = %.2fx, seed gzip / runner = %.1fx, runner / source limit = %.2fx"
              % (engine / stock, seed / engine, engine / limit))
        runner, runner_j2 = best[names[7]], best[names[8]]
        print("restore: runner / pg_restore = %.2fx, runner / pg_restore -j 2 = %.2fx, "
              "runner / age -d | zstd -d | pg_restore = %.2fx, pg_restore -j 2 / pg_restore = %.2fx"
              % (runner / best[names[4]], runner / best[names[5]], runner / best[names[6]],
                 best[names[5]] / best[names[4]]))
        print("restore, jobs: 2: runner jobs 2 / pg_restore -j 2 = %.2fx, runner jobs 2 / pg_restore = %.2fx, "
              "runner jobs 2 / runner = %.2fx" % (runner_j2 / best[names[5]], runner_j2 / best[names[4]],
                                                  runner_j2 / runner))
        order = ("select", "verify", "prepare", "transfer", "load", "checks", "total")
        for name in names[7:9]:
            output = runner_output[results[name]]
            phases = output["phases"]
            target = output.get("restore") or {}
            print("%s, phases (best round): %s; verification mode %s; target: jobs %s, scratch %.0f MiB, "
                  "spool %ss, pg_restore %ss" % (
                      name.split(" (")[0], ", ".join("%s %.1fs" % (key, phases[key]) for key in order if key in phases),
                      (output.get("verification") or {}).get("mode", "two-pass"), target.get("jobs"),
                      (target.get("scratch_bytes") or 0) / 1048576.0, target.get("spool_seconds", "-"),
                      target.get("pg_restore_seconds", "-")))
        print("load average at the end: %.2f %.2f %.2f on %d cores" % (os.getloadavg() + (os.cpu_count(),)))
    finally:
        if s3 is not None:
            servers.stop_s3(s3)
        if pg is not None:
            pg.process.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
