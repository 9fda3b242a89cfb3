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
           runner restore (verify all objects, decrypt, decompress, pg_restore, row checks)

and prints ratios with peak RSS. Numbers are printed, never judged.

  python bench/postgres_bench.py --size-mb 1024          # the issue's 1 GiB case
  python bench/postgres_bench.py --size-mb 200 --s3      # runner backups into SeaweedFS
"""

import argparse
import json
import os
import resource
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


def timed(argv, env=None, shell=False):
    """Wall seconds and peak RSS (MiB, largest process of the command) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.monotonic()
    subprocess.run(argv, env=env, shell=shell, check=True, stdout=subprocess.DEVNULL,
                   executable="/bin/bash" if shell else None)
    seconds = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, (peak / 1024.0 if peak > before else None)


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
        with open(job_file, "w", encoding="utf-8") as handle:
            json.dump({"job": "bench", "kind": "postgres",
                       "source": {"host": pg.host, "port": pg.port, "user": pg.user, "database": "bench",
                                  "bin_dir": pg.bin_dir},
                       "storage": storage, "compression": {"algorithm": "zstd", "level": 1},
                       "encryption": {"recipients": [recipient], "identity_file": key_file},
                       "restore": {"target": {"host": pg.host, "port": pg.port, "user": pg.user, "database": "bench",
                                              "restore_database": "bench_engine", "bin_dir": pg.bin_dir}}}, handle)

        dump = tool("pg_dump")
        results = {}
        results["source limit: pg_dump -Fc -Z0 > /dev/null"] = timed("%s -Fc -Z0 -d bench > /dev/null" % dump, env, shell=True)
        results["stock: pg_dump -Fc -Z0 | zstd -T0 -1 | age"] = timed(
            "set -o pipefail; %s -Fc -Z0 -d bench | zstd -q -T0 -1 | age -r %s > %s/stock.age" % (dump, recipient, work),
            env, shell=True)
        results["seed: pg_dump | gzip"] = timed("set -o pipefail; %s -d bench | gzip > %s/seed.sql.gz" % (dump, work), env, shell=True)
        results["runner backup (zstd 1 + age + sha256%s)" % (" -> S3" if args.s3 else "")] = timed(
            [sys.executable, "-m", RUNNER, "backup", "--config", job_file], env)

        subprocess.run([dump, "-Fc", "-Z0", "-d", "bench", "-f", os.path.join(work, "plain.dump")], env=env, check=True)
        with pg.connect() as conn:
            conn.autocommit = True
            conn.execute("CREATE DATABASE bench_stock")
        results["stock restore: pg_restore of an uncompressed local dump"] = timed(
            [tool("pg_restore"), "-d", "bench_stock", os.path.join(work, "plain.dump")], env)
        results["runner restore (verify, decrypt, decompress, pg_restore, row checks)"] = timed(
            [sys.executable, "-m", RUNNER, "restore", "--config", job_file], env)

        print("\n| run | seconds | peak RSS MiB |\n|---|---:|---:|")
        for name, (seconds, peak) in results.items():
            print("| %s | %.1f | %s |" % (name, seconds, "%.0f" % peak if peak else "(below an earlier row)"))
        names = list(results)
        engine, stock, seed, limit = results[names[3]][0], results[names[1]][0], results[names[2]][0], results[names[0]][0]
        print("\nbackup: runner / best stock pipeline = %.2fx, seed gzip / runner = %.1fx, runner / source limit = %.2fx"
              % (engine / stock, seed / engine, engine / limit))
        print("restore: runner / stock pg_restore = %.2fx" % (results[names[5]][0] / results[names[4]][0]))
        print("load average at the end: %.2f %.2f %.2f on %d cores" % (os.getloadavg() + (os.cpu_count(),)))
    finally:
        if s3 is not None:
            servers.stop_s3(s3)
        if pg is not None:
            pg.process.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
