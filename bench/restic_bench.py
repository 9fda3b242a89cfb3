# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The restic storage format on a real PostgreSQL database (issue 16's figures), in one run.

Starts a private PostgreSQL 15 (tests/servers.py), fills a database shaped like biometric
records (bench/postgres_bench.py's table: random ``bytea`` templates, text, ``jsonb``, two
indexes), and times, every round on fresh repositories and stores:

  stock first    pg_dump -Fc -Z0 | restic backup --stdin       into an empty repository (v2,
                                                              compression auto), by hand
  stock second   the same again, the database unchanged
  runner first   runner backup of a job in the restic format  (row counts, globals, manifest)
  runner second  the same again, the database unchanged
  archive        runner backup of the same job in the archive format (zstd 1 + age)
  restore        runner restore from the restic format, and from the archive format, each into
                 a new database (verified first: restic dump hashed against the manifest)

and reports the ratios the issue names: runner second / runner first (goal <= 0.5), the new
bytes the second backup stored against the first's repository (goal <= 1 %), runner first /
stock first (goal <= 1.0), restore from restic / restore from archive (goal <= 1.3). Every case
runs ``--rounds`` times (default 2), the best round is kept. Numbers are printed, never judged.

  python bench/restic_bench.py --size-mb 1024      # the issue's 1 GiB case
  python bench/restic_bench.py --size-mb 100 --rounds 1
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import postgres_bench as pb  # noqa: E402  pylint: disable=wrong-import-position

from pyrage import x25519  # noqa: E402  pylint: disable=wrong-import-position

JOB = "bench"


def tree_bytes(path):
    return sum(os.path.getsize(os.path.join(root, name)) for root, dummy, files in os.walk(path) for name in files)


def newest_manifest(store):
    directory = os.path.join(store, JOB)
    newest = sorted(name for name in os.listdir(directory) if os.path.isdir(os.path.join(directory, name)))[-1]
    with open(os.path.join(directory, newest, "manifest.json"), encoding="utf-8") as handle:
        return json.load(handle)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="approximate database size (default 1024)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every case, the best is kept (default 2)")
    args = parser.parse_args()

    with pb.servers.private_postgres("restic-bench") as (base, pg):
        work = os.path.join(base, "work")
        os.mkdir(work)
        password_file = os.path.join(work, "restic-password")
        with open(password_file, "w", encoding="ascii") as handle:
            handle.write("bench-" + os.urandom(8).hex() + "\n")
        identity = x25519.Identity.generate()
        key_file = os.path.join(work, "key.txt")
        with open(key_file, "w", encoding="ascii") as handle:
            handle.write(str(identity) + "\n")
        env = dict(os.environ, PGHOST=pg.host, PGPORT=str(pg.port), PGUSER=pg.user,
                   PYTHONPATH=os.path.join(pb.ROOT, "build", "collections"), RESTIC_PASSWORD_FILE=password_file)
        with pg.connect() as conn:
            conn.autocommit = True
            conn.execute("CREATE DATABASE bench")
        print("filling a ~%d MiB database ..." % args.size_mb, flush=True)
        rows, db_bytes = pb.fill(pg, "bench", args.size_mb)
        print("database: %d rows, %.0f MiB on disk" % (rows, db_bytes / 1048576.0), flush=True)
        dump = pg.tool("pg_dump")

        def job_file(path, store, restic, database):
            storage = {"backend": "filesystem", "path": store}
            section = {"encryption": {"enabled": False}}
            if restic:
                storage.update(format="restic", restic_password_file=password_file)
            else:
                section = {"encryption": {"recipients": [str(identity.to_public())], "identity_file": key_file},
                           "compression": {"algorithm": "zstd", "level": 1}}
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(dict({"job": JOB, "kind": "postgres",
                                "source": {"host": pg.host, "port": pg.port, "user": pg.user, "database": "bench",
                                           "bin_dir": pg.bin_dir},
                                "storage": storage,
                                "restore": {"target": {"host": pg.host, "port": pg.port, "user": pg.user,
                                                       "database": "bench", "bin_dir": pg.bin_dir,
                                                       "restore_database": database}}}, **section), handle)
            return path

        def runner(command, config):
            # A cold restic cache every time, as in a CronJob's new pod (HOME on an emptyDir); the
            # stock commands run with --no-cache.
            cache = tempfile.mkdtemp(prefix="restic-cache-", dir=work)
            try:
                return pb.timed([sys.executable, "-m", pb.RUNNER, command, "--config", config],
                                dict(env, XDG_CACHE_HOME=cache), output=[])
            finally:
                shutil.rmtree(cache, ignore_errors=True)

        rounds = {}
        extra = {"runner second: new bytes stored": [], "stock second: new bytes stored": [],
                 "repository after the first backup, bytes": []}

        def record(name, result):
            rounds.setdefault(name, []).append(result)

        for number in range(args.rounds):
            here = os.path.join(work, "round-%d" % number)
            stock_repo, restic_store, archive_store = (os.path.join(here, name) for name in ("stock", "restic", "archive"))
            os.makedirs(here)
            restic_job = job_file(os.path.join(here, "restic.json"), restic_store, True, "bench_from_restic")
            archive_job = job_file(os.path.join(here, "archive.json"), archive_store, False, "bench_from_archive")
            subprocess.run(["restic", "-r", stock_repo, "init", "--repository-version", "2"], env=env, check=True,
                           capture_output=True)
            pipe = ("set -o pipefail; %s -Fc -Z0 -d bench | restic -r %s --no-cache backup --json --stdin "
                    "--stdin-filename database.dump | tail -n 1" % (dump, stock_repo))
            record("stock first: pg_dump -Fc -Z0 | restic backup --stdin", pb.timed(pipe, env, shell=True))
            out = []
            record("stock second (unchanged)", pb.timed(pipe, env, shell=True, output=out))
            extra["stock second: new bytes stored"].append(json.loads(out[0].decode())["data_added"])
            record("runner first (restic format)", runner("backup", restic_job))
            extra["repository after the first backup, bytes"].append(tree_bytes(os.path.join(restic_store, "_restic")))
            record("runner second (restic format, unchanged)", runner("backup", restic_job))
            extra["runner second: new bytes stored"].append(newest_manifest(restic_store)["restic"]["data_added"])
            record("runner backup, archive format (zstd 1 + age)", runner("backup", archive_job))
            for name, config, database in (("runner restore from the restic format", restic_job, "bench_from_restic"),
                                           ("runner restore from the archive format", archive_job, "bench_from_archive")):
                pb.drop_database(pg, database)
                record(name, runner("restore", config))
                pb.drop_database(pg, database)
            shutil.rmtree(here)
            print("round %d of %d done, load average %.2f" % (number + 1, args.rounds, os.getloadavg()[0]), flush=True)

        best = {name: min(found) for name, found in rounds.items()}
        print("\n| run | best s | rounds s | peak RSS MiB | CPU s |\n|---|---:|---|---:|---:|")
        for name, (seconds, peak, cpu) in best.items():
            each = " / ".join("%.1f" % r[0] for r in rounds[name])
            print("| %s | %.1f | %s | %.0f | %.1f |" % (name, seconds, each, peak, cpu))
        first = min(extra["repository after the first backup, bytes"])
        added = min(extra["runner second: new bytes stored"])
        seconds = {name: value[0] for name, value in best.items()}
        print("\nrunner second / runner first: %.2fx (goal <= 0.5)" % (
            seconds["runner second (restic format, unchanged)"] / seconds["runner first (restic format)"]))
        print("new bytes of the runner's second backup: %d = %.3f %% of the repository after the first "
              "(%.0f MiB; goal <= 1 %%); stock second: %d" % (
                  added, 100.0 * added / first, first / 1048576.0, min(extra["stock second: new bytes stored"])))
        print("runner first / stock first: %.2fx (goal <= 1.0)" % (
            seconds["runner first (restic format)"] / seconds["stock first: pg_dump -Fc -Z0 | restic backup --stdin"]))
        print("restore from restic / from archive: %.2fx (goal <= 1.3)" % (
            seconds["runner restore from the restic format"] / seconds["runner restore from the archive format"]))


if __name__ == "__main__":
    main()
