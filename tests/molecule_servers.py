#!/usr/bin/env python
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The servers the Molecule scenario's pods back up, kept running until this process ends.

``make molecule`` (hack/molecule.sh) starts it in the background before ``molecule test``
and terminates it afterwards:

    python tests/molecule_servers.py --host NODE_IP --dir DIR

It starts PostgreSQL 15 (database ``biometrics`` with a table), Redis (a few keys),
SeaweedFS S3 (a bucket) and a git daemon (a bare repository pods may push to) on ``--host``,
the node IP, so that pods reach them (tests/servers.py, the code of the test fixtures). It
fills ``DIR/data`` (what the ``biometrics-data`` claim holds) and makes ``DIR/sync`` (the
``backup-storage`` claim the directory sync writes to, owned by the runner image's user).
When everything is ready it writes ``DIR/servers.yml``: the addresses and the S3 credentials
(mode 0600) that molecule/default/vars/main.yml reads through MOLECULE_SERVERS. SIGTERM or
SIGINT stops every server and removes their directories.
"""

import argparse
import contextlib
import os
import signal
import sys
import threading

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import servers  # noqa: E402  pylint: disable=wrong-import-position

# The runner image's user (images/runner/Containerfile): it writes the sync claim.
RUNNER_UID = 65532


def fill_data(root):
    """A small tree for the file jobs: nested directories, text and binary files."""
    for index in range(20):
        folder = os.path.join(root, "captures", "batch-%d" % (index % 4))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "capture-%02d.bin" % index), "wb") as handle:
            handle.write(bytes((index * 7 + offset) % 256 for offset in range(4096)))
    os.makedirs(os.path.join(root, "conf"), exist_ok=True)
    with open(os.path.join(root, "conf", "matcher.ini"), "w", encoding="utf-8") as handle:
        handle.write("[matcher]\nthreshold = 0.82\n")


def start(stack, host, directory):
    """Start everything; returns the mapping written to servers.yml."""
    bases = {name: stack.enter_context(servers.server_dir("molecule-" + name)) for name in ("pg", "redis", "s3", "git")}
    postgres = servers.start_with_port_retry(lambda: servers.start_postgres(bases["pg"], host=host))
    stack.callback(postgres.process.stop)
    redis = servers.start_with_port_retry(lambda: servers.start_redis(bases["redis"], host=host))
    stack.callback(redis.process.stop)
    s3 = servers.start_with_port_retry(lambda: servers.start_s3(bases["s3"], host=host))
    stack.callback(servers.stop_s3, s3)
    git = servers.start_with_port_retry(lambda: servers.start_git_daemon(bases["git"], host=host))
    stack.callback(git.process.stop)
    remote = git.make_remote()

    with postgres.connect() as conn:
        conn.execute("CREATE DATABASE biometrics")
    with postgres.connect("biometrics") as conn:
        conn.execute("CREATE TABLE subjects (id bigint PRIMARY KEY, external_ref text NOT NULL)")
        conn.execute("INSERT INTO subjects SELECT i, 'S-' || i FROM generate_series(1, 500) i")
    client = redis.client()
    for number in range(50):
        client.hset("subject:%d" % number, mapping={"ref": "S-%d" % number})

    data, sync = os.path.join(directory, "data"), os.path.join(directory, "sync")
    fill_data(data)
    os.chmod(data, 0o755)
    os.makedirs(sync)
    os.chown(sync, RUNNER_UID, RUNNER_UID)
    return {
        "postgres_host": postgres.host, "postgres_port": postgres.port,
        "redis_host": redis.host, "redis_port": redis.port,
        "s3_endpoint": s3.endpoint_url, "s3_bucket": s3.bucket, "s3_region": s3.region,
        "s3_access_key": s3.access_key, "s3_secret_key": s3.secret_key,
        "git_repo": remote.url, "git_dir": remote.path,
        "data_dir": data, "sync_dir": sync,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="address the servers listen on (the node IP)")
    parser.add_argument("--dir", required=True, help="where the claims' directories and servers.yml go (made empty)")
    args = parser.parse_args()
    directory = os.path.abspath(args.dir)
    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        parser.error("%s is not empty" % directory)
    os.chmod(directory, 0o755)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_args: stop.set())
    with contextlib.ExitStack() as stack:
        try:
            found = start(stack, args.host, directory)
        except servers.ServerStartError as exc:
            sys.stderr.write("molecule_servers: %s\n" % exc)
            return 1
        path = os.path.join(directory, "servers.yml")
        with open(os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
            yaml.safe_dump(found, handle, sort_keys=True)
        os.rename(path + ".tmp", path)
        sys.stderr.write("molecule_servers: ready on %s (%s)\n" % (args.host, path))
        while not stop.wait(1):
            pass
    sys.stderr.write("molecule_servers: stopped\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
