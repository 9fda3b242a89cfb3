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
  with --s3, into the same SeaweedFS bucket (the S3 server's CPU paid by both sides):
           pg_dump -Fc -Z0 | zstd -T0 -1 | age -r KEY | aws s3 cp - s3://...   best stock pipeline into S3
           aws s3 cp FILE s3://...                               upload alone of that pipeline's output, made once
           the engine's S3 writer uploading the same FILE        upload alone, this collection
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

``aws`` is awscli from PyPI (``--aws PATH``; by default a private venv at
``~/.cache/biometrics-backup/awscli-VERSION``, ``$BIOMETRICS_CACHE`` to move it, created on the
first ``--s3`` run: never the project's .venv, whose pinned botocore awscli would replace). It
runs with awscli's default transfer settings (8 MiB parts, 10 threads), as a user would.

  python bench/postgres_bench.py --size-mb 1024          # the issue's 1 GiB case
  python bench/postgres_bench.py --size-mb 200 --s3      # runner backups into SeaweedFS
  python bench/postgres_bench.py --size-mb 500 --s3 --rounds 2 --aws /path/to/aws
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
AWSCLI = "awscli==1.46.3"  # the stock S3 client of the --s3 anchors (pinned: the figures name it)
# The engine's S3 writer uploading one local file with the job's storage options, for the
# "upload alone" anchor: argv[1] the file, argv[2] the storage options (JSON), argv[3] the key.
ENGINE_UPLOAD = """
import json, sys
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
writer = open_storage(json.loads(sys.argv[2])).open_writer(sys.argv[3])
with open(sys.argv[1], "rb") as handle:
    for block in iter(lambda: handle.read(1 << 20), b""):
        writer.write(block)
writer.commit()
"""


def awscli():
    """The ``aws`` of a private venv under the cache, installed from PyPI the first time."""
    cache = os.environ.get("BIOMETRICS_CACHE") or os.path.expanduser("~/.cache/biometrics-backup")
    venv = os.path.join(cache, AWSCLI.replace("==", "-"))
    aws = os.path.join(venv, "bin", "aws")
    if not os.access(aws, os.X_OK):
        print("installing %s into %s ..." % (AWSCLI, venv), flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet", AWSCLI], check=True)
    return aws


def timed(argv, env=None, shell=False, output=None):
    """Wall seconds, peak RSS (MiB) and CPU seconds of one command. Peak RSS: its largest process,
    shell pipelines included (``wait4()`` reports the largest of the child and the descendants it
    waited for); CPU: user + system of the child and those descendants (pg_dump included).

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
    return seconds, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid, children=False):
    """User + system CPU seconds of ``pid`` so far (fields 14 and 15 of /proc/PID/stat), with
    ``children`` those of its children that ended and were waited for (fields 16 and 17: the
    postmaster's backends, one per connection)."""
    with open("/proc/%d/stat" % pid, encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return sum(int(field) for field in fields[11:15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def child_count(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid), encoding="ascii") as handle:
        return len(handle.read().split())


def settle(pid, count, timeout=5.0):
    """Wait (at most ``timeout``) until ``pid`` has no more than ``count`` children: a backend
    ends and is reaped a moment after its client, and its CPU would go to the next case."""
    deadline = time.monotonic() + timeout
    while child_count(pid) > count and time.monotonic() < deadline:
        time.sleep(0.02)


def servers_cpu_seconds(pg, s3):
    """CPU seconds so far of PostgreSQL's ended backends and of the S3 server (0 without one)."""
    return (process_cpu_seconds(pg.process.proc.pid, children=True),
            process_cpu_seconds(s3.process.proc.pid) if s3 else 0.0)


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
    parser.add_argument("--aws", help="awscli's aws for the --s3 anchors (default: %s in a venv under "
                        "~/.cache/biometrics-backup, installed on first use)" % AWSCLI)
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
            aws = args.aws or awscli()
            s3 = servers.start_s3(base)
            storage = dict(backend="s3", bucket=s3.bucket, endpoint_url=s3.endpoint_url,
                           access_key_env="BENCH_S3_ACCESS", secret_key_env="BENCH_S3_SECRET")
            env.update(BENCH_S3_ACCESS=s3.access_key, BENCH_S3_SECRET=s3.secret_key)
            # awscli reads no ~/.aws of the user's: only these credentials and its defaults.
            aws_env = dict(env, AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key,
                           AWS_DEFAULT_REGION=s3.region, AWS_CONFIG_FILE=os.path.join(work, "aws-config"),
                           AWS_SHARED_CREDENTIALS_FILE=os.path.join(work, "aws-credentials"))
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
        if args.s3:
            # What the stock pipeline stores, made once, for the two "upload alone" anchors.
            upload = os.path.join(work, "upload.age")
            subprocess.run("set -o pipefail; %s -Fc -Z0 -d bench | zstd -q -T0 -1 | age -r %s > %s"
                           % (dump, recipient, upload), env=env, shell=True, check=True, executable="/bin/bash")
            print("stored by the stock pipeline: %.0f MiB" % (os.path.getsize(upload) / 1048576.0), flush=True)
            upload_storage = dict(storage, prefix="engine-upload")  # credentials from the environment
        runner_output = {}

        def runner_restore(config=job_file, database="bench_engine"):
            def run():
                drop_database(pg, database)
                out = []
                result = timed([sys.executable, "-m", RUNNER, "restore", "--config", config], env, output=out)
                runner_output[result[0]] = json.loads(out[0])
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
        names = [name for name, _run in backups + restores]
        if args.s3:
            s3_url = "s3://%s/stock" % s3.bucket
            backups += [
                ("stock -> S3: pg_dump -Fc -Z0 | zstd -T0 -1 | age | aws s3 cp -",
                 lambda: timed("set -o pipefail; %s -Fc -Z0 -d bench | zstd -q -T0 -1 | age -r %s | "
                               "%s --endpoint-url %s s3 cp --only-show-errors - %s/pipe.age"
                               % (dump, recipient, aws, s3.endpoint_url, s3_url), aws_env, shell=True)),
                ("upload alone: aws s3 cp FILE (the stock pipeline's output)",
                 lambda: timed([aws, "--endpoint-url", s3.endpoint_url, "s3", "cp", "--only-show-errors", upload,
                                s3_url + "/file.age"], aws_env)),
                ("upload alone: the engine's S3 writer, same FILE (16 MiB parts, 2 in flight)",
                 lambda: timed([sys.executable, "-c", ENGINE_UPLOAD, upload, json.dumps(upload_storage), "file.age"],
                               env)),
            ]
        rounds = {name: [] for name, _run in backups + restores}
        for number in range(args.rounds):
            cases = [case for case in backups if case[0] != names[2] or number < args.seed_rounds]
            cases += restores  # the pipe restores the file this round's stock backup wrote
            order = cases[:len(cases) - len(restores)], restores
            for group in order:
                for name, run in (group if number % 2 == 0 else list(reversed(group))):
                    # The servers' CPU during the case, paid by the same two cores.
                    backends = child_count(pg.process.proc.pid)
                    before = servers_cpu_seconds(pg, s3)
                    result = run()
                    settle(pg.process.proc.pid, backends)
                    after = servers_cpu_seconds(pg, s3)
                    rounds[name].append(result + tuple(end - start for start, end in zip(before, after)))
            print("round %d of %d done, load average %.2f" % (number + 1, args.rounds, os.getloadavg()[0]),
                  flush=True)
        results = {name: min(found) for name, found in rounds.items() if found}

        print("\n| run | best s | rounds s | peak RSS MiB (largest process) | client CPU s | PostgreSQL CPU s "
              "| S3 server CPU s |\n|---|---:|---|---:|---:|---:|---:|")
        for name, (seconds, peak, cpu, pg_cpu, s3_cpu) in results.items():
            print("| %s | %.1f | %s | %.0f | %.1f | %.1f | %s |" % (
                name, seconds, " / ".join("%.1f" % r[0] for r in rounds[name]), peak, cpu, pg_cpu,
                "%.1f" % s3_cpu if s3 else "-"))
        print("(CPU: the best round; client = the command and the descendants it waited for, pg_dump "
              "included; PostgreSQL = its backends that ended)")
        best = {name: found[0] for name, found in results.items()}
        engine, stock, limit = best[names[3]], best[names[1]], best[names[0]]
        seed = best.get(names[2])   # absent with --seed-rounds 0
        print("\nbackup: runner / best stock pipeline = %.2fx, seed gzip / runner = %s, runner / source limit = %.2fx"
              % (engine / stock, "%.1fx" % (seed / engine) if seed else "not run", engine / limit))
        runner, runner_j2 = best[names[7]], best[names[8]]
        print("restore: runner / pg_restore = %.2fx, runner / pg_restore -j 2 = %.2fx, "
              "runner / age -d | zstd -d | pg_restore = %.2fx, pg_restore -j 2 / pg_restore = %.2fx"
              % (runner / best[names[4]], runner / best[names[5]], runner / best[names[6]],
                 best[names[5]] / best[names[4]]))
        print("restore, jobs: 2: runner jobs 2 / pg_restore -j 2 = %.2fx, runner jobs 2 / pg_restore = %.2fx, "
              "runner jobs 2 / runner = %.2fx" % (runner_j2 / best[names[5]], runner_j2 / best[names[4]],
                                                  runner_j2 / runner))
        if args.s3:
            stock_s3, aws_alone, engine_alone = (best[name] for name, _run in backups[-3:])
            print("S3: runner -> S3 / stock -> S3 (aws s3 cp -) = %.2fx (goal <= 1.05x), "
                  "runner -> S3 / stock to a local file = %.2fx, stock -> S3 / stock to a local file = %.2fx"
                  % (engine / stock_s3, engine / stock, stock_s3 / stock))
            print("S3 upload alone of the same %.0f MiB: engine writer / aws s3 cp = %.2fx (%.1f s / %.1f s); "
                  "runner -> S3 - engine upload alone = %.1f s, stock -> S3 - aws upload alone = %.1f s"
                  % (os.path.getsize(upload) / 1048576.0, engine_alone / aws_alone, engine_alone, aws_alone,
                     engine - engine_alone, stock_s3 - aws_alone))
        order = ("select", "verify", "prepare", "transfer", "load", "checks", "total")
        for name in names[7:9]:
            output = runner_output[results[name][0]]
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
