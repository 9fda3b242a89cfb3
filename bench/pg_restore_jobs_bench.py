# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Does ``pg_restore --jobs`` pay on a custom-format dump that was written to a pipe?

The runner's backups run ``pg_dump -Fc`` into a pipe, so the archive carries no data
offsets (pg_dump writes them only when it can seek back in its output file). A restore with
``jobs > 1`` spools that archive to a file; this bench asks what ``pg_restore -j`` makes of
such a file, with stock tools only, on a private PostgreSQL 15 (tests/servers.py):

  j1 file          pg_restore -d NEW seekable.dump             (written with pg_dump -f: offsets)
  j1 stdin         pg_restore -d NEW < pipe.dump               (what the runner's jobs: 1 does)
  j2 file          pg_restore -j 2 -d NEW seekable.dump
  j2 pipe-written  pg_restore -j 2 -d NEW pipe.dump            (what jobs: 2 does with its spool)
  split            pg_restore --section=pre-data --section=data < pipe.dump, then
                   pg_restore -j 2 --section=post-data pipe.dump   (data streamed, indexes in parallel)

``--tables N`` tables of about ``--size-mb / N`` each (random bytea, text, a timestamp, a
primary key and two indexes). Every case runs ``--rounds`` times into a fresh database,
the order reversed every other round; the best round counts.

  python bench/pg_restore_jobs_bench.py --tables 8 --size-mb 300
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import servers  # noqa: E402  pylint: disable=wrong-import-position

ROW_BYTES = 1150


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=int, default=8, help="number of tables (default 8)")
    parser.add_argument("--size-mb", type=int, default=300, help="approximate database size (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every case (default 3)")
    args = parser.parse_args()
    with servers.private_postgres("pg-jobs-bench") as (base, pg):
        env = dict(os.environ, PGHOST=pg.host, PGPORT=str(pg.port), PGUSER=pg.user)
        psql, dump, restore = pg.tool("psql"), pg.tool("pg_dump"), pg.tool("pg_restore")

        def sql(database, text):
            subprocess.run([psql, "-q", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", text], env=env, check=True,
                           stdout=subprocess.DEVNULL)

        sql("postgres", "CREATE DATABASE source")
        rows = max(1000, args.size_mb * 1024 * 1024 // ROW_BYTES // args.tables)
        print("filling %d tables of %d rows ..." % (args.tables, rows), flush=True)
        for number in range(args.tables):
            sql("source", "CREATE TABLE t%d (id bigserial PRIMARY KEY, subject text, template bytea, at timestamptz)"
                % number)
            sql("source", "INSERT INTO t%d (subject, template, at) SELECT md5(g::text), decode((SELECT "
                "string_agg(md5(random()::text || i::text || g::text), '') FROM generate_series(1, 40) i), 'hex'), "
                "now() - (g || ' s')::interval FROM generate_series(1, %d) g" % (number, rows))
            sql("source", "CREATE INDEX ON t%d (subject); CREATE INDEX ON t%d (at)" % (number, number))
        seekable, piped = os.path.join(base, "seekable.dump"), os.path.join(base, "pipe.dump")
        subprocess.run([dump, "-Fc", "-Z0", "-d", "source", "-f", seekable], env=env, check=True)
        with open(piped, "wb") as handle:
            subprocess.run("%s -Fc -Z0 -d source | cat" % dump, shell=True, env=env, check=True, stdout=handle)
        print("dump: %.0f MiB" % (os.path.getsize(piped) / 1048576.0), flush=True)

        def from_stdin(argv, path):
            with open(path, "rb") as handle:
                subprocess.run(argv, stdin=handle, env=env, check=True)

        cases = [
            ("j1 file", lambda: subprocess.run([restore, "-d", "new", seekable], env=env, check=True)),
            ("j1 stdin (pipe-written)", lambda: from_stdin([restore, "-d", "new"], piped)),
            ("j2 file (seekable, offsets)", lambda: subprocess.run([restore, "-j", "2", "-d", "new", seekable],
                                                                   env=env, check=True)),
            ("j2 pipe-written file (no offsets)", lambda: subprocess.run([restore, "-j", "2", "-d", "new", piped],
                                                                         env=env, check=True)),
            ("split: data from stdin, post-data -j 2", lambda: (
                from_stdin([restore, "--section=pre-data", "--section=data", "-d", "new"], piped),
                subprocess.run([restore, "-j", "2", "--section=post-data", "-d", "new", piped], env=env,
                               check=True))),
        ]
        found = {name: [] for name, _run in cases}
        for number in range(args.rounds):
            for name, run in (cases if number % 2 == 0 else list(reversed(cases))):
                sql("postgres", "DROP DATABASE IF EXISTS new")
                sql("postgres", "CREATE DATABASE new")
                began = time.monotonic()
                run()
                found[name].append(time.monotonic() - began)
            print("round %d of %d done, load average %.2f" % (number + 1, args.rounds, os.getloadavg()[0]), flush=True)
        best = {name: min(seconds) for name, seconds in found.items()}
        print("\n| case | best s | rounds s | / j1 file |\n|---|---:|---|---:|")
        for name, seconds in found.items():
            rounds = " / ".join("%.2f" % value for value in seconds)
            print("| %s | %.2f | %s | %.2f× |" % (name, best[name], rounds, best[name] / best["j1 file"]))
        print("load average at the end: %.2f %.2f %.2f on %d cores" % (os.getloadavg() + (os.cpu_count(),)))


if __name__ == "__main__":
    main()
