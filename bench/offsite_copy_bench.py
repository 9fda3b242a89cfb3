# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offsite copy throughput: the engine's copy against ``aws s3 cp`` of the same objects.

Starts two SeaweedFS instances (tests/servers.py, each with credentials of its own), stores
``--backups`` backups of random data (``--size-mb`` in all, stored uncompressed and
unencrypted so the objects are exactly that size) at the first, then times, in one run:

  aws s3 cp s3://A/key - | aws s3 cp - s3://B/key   for every object, one after the other
  engine copy_backups(A, B)                          stream, hash, read back, manifest last
  engine copy_backups(A, B) again                    in sync: nothing copied

and prints the ratio engine / aws. ``aws`` is awscli from PyPI (``--aws PATH``, default the
one on PATH); without it only the engine is timed.

With ``--format restic`` the backups are restic-format snapshots (the job's repository at the
first instance) and the stock anchor is restic's own copy between two repositories of that
instance (restic 0.14 takes one set of S3 credentials for both, so that is the only place
where it can copy):

  restic init --from-repo A --copy-chunker-params; restic copy --from-repo A   (same instance)
  restic check --read-data                        of that copy: the stock verified copy
  engine copy_backups(A, A')                      same instance: restic copy through the
                                                  engine's loopback repository server, every
                                                  payload read back and hashed there
  engine copy_backups(A, B)                       the offsite case, other credentials
  engine copy_backups(A, B) again                 in sync: nothing copied
  one more backup, then restic copy (A to its copy) and the engine's copy (A to B) again:
                                                  the daily case, one new backup into copies
                                                  that hold the others

The engine's copies also print their two phases: restic copy through the server, and the
read-back of every payload (restic dump, hashed against the manifest).

Numbers are printed, never judged.

  python bench/offsite_copy_bench.py                 # 1 GiB in 4 backups
  python bench/offsite_copy_bench.py --size-mb 256 --aws /tmp/awscli/bin/aws
  python bench/offsite_copy_bench.py --format restic
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import contextlib
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "build", "collections"))

import servers  # noqa: E402  pylint: disable=wrong-import-position
from ansible_collections.biometrics.backup.plugins.module_utils.engine import offsite  # noqa: E402  pylint: disable=wrong-import-position
from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore  # noqa: E402  pylint: disable=wrong-import-position
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun  # noqa: E402  pylint: disable=wrong-import-position
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource  # noqa: E402  pylint: disable=wrong-import-position
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage  # noqa: E402  pylint: disable=wrong-import-position

MIB = 1 << 20
JOB = "bench"


def make_backups(storage, directory, backups, size_mb):
    manifests = []
    for index in range(backups):
        tree = os.path.join(directory, str(index))
        os.makedirs(tree)
        with open(os.path.join(tree, "blob"), "wb") as handle:
            for dummy in range(size_mb // backups):
                handle.write(os.urandom(MIB))
        manifests.append(BackupRun(JOB, FilesSource({"path": tree}), storage, compression={"algorithm": "none"},
                                   encryption={"enabled": False}).run())
        shutil.rmtree(tree)
        time.sleep(1.05)  # whole-second manifest times
    return manifests


def aws_copy(aws, source, destination, keys):
    def env(server):
        return dict(os.environ, AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
                    AWS_DEFAULT_REGION=server.region)
    started = time.monotonic()
    for key in keys:
        down = subprocess.Popen([aws, "--endpoint-url", source.endpoint_url, "s3", "cp", "--only-show-errors",
                                 "s3://%s/src/%s" % (source.bucket, key), "-"], stdout=subprocess.PIPE, env=env(source))
        subprocess.run([aws, "--endpoint-url", destination.endpoint_url, "s3", "cp", "--only-show-errors", "-",
                        "s3://%s/aws/%s" % (destination.bucket, key)], stdin=down.stdout, env=env(destination),
                       check=True)
        down.stdout.close()
        if down.wait() != 0:
            raise SystemExit("aws s3 cp of %s failed" % key)
    return time.monotonic() - started


def restic_copy(server, password, source_prefix, destination_prefix, init=True, check=True):
    """restic's own copy of every snapshot between two repositories of ``server`` (init first
    unless ``init`` is false), then ``restic check --read-data`` of the copy unless ``check`` is
    false: ``(copy seconds, check seconds)``. restic's default cache, as the engine's restic."""
    def restic(*args):
        # The options the engine gives restic for an S3 endpoint (engine/restic.py).
        options = ["-o", "s3.bucket-lookup=path", "-o", "s3.region=%s" % server.region]
        subprocess.run(["restic", "-q", "-r", url(destination_prefix)] + options + list(args), env=env, check=True,
                       stdout=subprocess.DEVNULL)

    def url(prefix):
        return "s3:%s/%s/%s" % (server.endpoint_url, server.bucket, prefix)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
               AWS_DEFAULT_REGION=server.region, RESTIC_PASSWORD=password, RESTIC_FROM_PASSWORD=password)
    source = ["--from-repo", url(source_prefix)]
    started = time.monotonic()
    if init:
        restic("init", "--repository-version", "2", "--copy-chunker-params", *source)
    restic("copy", *source)
    copied = time.monotonic()
    if check:
        restic("check", "--read-data")
    return copied - started, time.monotonic() - copied


@contextlib.contextmanager
def phases():
    """Seconds spent in the engine's two phases of a restic copy, summed over the call: the
    snapshots' restic copy, and the read-back of the payloads."""
    spent = {"copy": 0.0, "read back": 0.0}
    originals = {"copy": resticstore.copy_snapshots, "read back": resticstore.verify_objects}

    def timed(name):
        def call(*args, **kwargs):
            started = time.monotonic()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[name] += time.monotonic() - started
        return call
    resticstore.copy_snapshots, resticstore.verify_objects = timed("copy"), timed("read back")
    try:
        yield spent
    finally:
        resticstore.copy_snapshots, resticstore.verify_objects = originals["copy"], originals["read back"]


def timed_copy(source, destination, expected):
    with phases() as spent:
        started = time.monotonic()
        outcome = offsite.copy_backups(source, destination, JOB)
        seconds = time.monotonic() - started
    if not outcome["ok"] or len(outcome["copied"]) != expected:
        raise SystemExit("the engine's copy did not complete: %s" % outcome)
    if spent["copy"]:
        print("  (phases: restic copy %.1f s, read-back %.1f s)" % (spent["copy"], spent["read back"]), flush=True)
    return seconds


def restic_main(args, base, first, second):
    password = uuid.uuid4().hex

    def restic_storage(server, prefix):
        return open_storage(dict(server.storage_options(prefix=prefix), format="restic", restic_password=password))

    source = restic_storage(first, "src")
    manifests = make_backups(source, os.path.join(base, "data"), args.backups, args.size_mb)
    total = sum(m["size_bytes"] for m in manifests)
    print("source: %d restic-format backups, %.1f MiB" % (len(manifests), total / MIB), flush=True)
    stock, check = restic_copy(first, password, "src/_restic/%s" % JOB, "stock")
    print("restic init --copy-chunker-params + restic copy (same instance): %.1f s, %.1f MiB/s"
          % (stock, total / MIB / stock), flush=True)
    print("  + restic check --read-data of the copy: %.1f s (%.1f s in all)" % (check, stock + check), flush=True)
    same = timed_copy(source, restic_storage(first, "engine"), len(manifests))
    print("engine copy (same instance, loopback repository server, read back): %.1f s, %.1f MiB/s, "
          "%.2f x restic copy, %.2f x restic copy + check"
          % (same, total / MIB / same, same / stock, same / (stock + check)), flush=True)
    offsite_storage = restic_storage(second, "engine")
    other = timed_copy(source, offsite_storage, len(manifests))
    print("engine copy (other instance, other credentials): %.1f s, %.1f MiB/s, %.2f x restic copy, "
          "%.2f x restic copy + check" % (other, total / MIB / other, other / stock, other / (stock + check)),
          flush=True)
    started = time.monotonic()
    again = offsite.copy_backups(source, offsite_storage, JOB)
    if not again["ok"] or again["copied"]:
        raise SystemExit("the copy in sync copied or failed: %s" % again)
    print("engine copy in sync: %.2f s, changed=%s" % (time.monotonic() - started, again["changed"]))

    # The daily case: one new backup, copied into repositories that hold the others.
    newest = make_backups(source, os.path.join(base, "daily"), 1, max(args.size_mb // args.backups, 1))[0]
    stock, dummy = restic_copy(first, password, "src/_restic/%s" % JOB, "stock", init=False, check=False)
    print("one more backup (%.1f MiB): restic copy %.1f s" % (newest["size_bytes"] / MIB, stock), flush=True)
    daily = timed_copy(source, offsite_storage, 1)
    print("engine copy (other instance): %.1f s, %.2f x restic copy" % (daily, daily / stock), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--backups", type=int, default=4)
    parser.add_argument("--format", choices=("archive", "restic"), default="archive")
    parser.add_argument("--aws", default=shutil.which("aws"), help="awscli's aws (default: the one on PATH)")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="offsite-bench-")
    first = second = None
    try:
        first, second = servers.start_s3(base), servers.start_s3(base)
        if args.format == "restic":
            restic_main(args, base, first, second)
            return
        source = open_storage(first.storage_options(prefix="src"))
        manifests = make_backups(source, os.path.join(base, "data"), args.backups, args.size_mb)
        total = sum(m["size_bytes"] for m in manifests)
        keys = ["%s/%s/%s" % (m["job"], m["id"], obj["name"]) for m in manifests for obj in m["objects"]]
        print("source: %d backups, %d objects, %.1f MiB" % (len(manifests), len(keys), total / MIB), flush=True)
        aws_seconds = None
        if args.aws:
            aws_seconds = aws_copy(args.aws, first, second, keys)
            print("aws s3 cp src - | aws s3 cp - dst: %.1f s, %.1f MiB/s" % (aws_seconds, total / MIB / aws_seconds),
                  flush=True)
        else:
            print("aws not found (pip install awscli, or --aws PATH): engine only", flush=True)
        destination = open_storage(second.storage_options(prefix="engine"))
        seconds = timed_copy(source, destination, len(manifests))
        print("engine copy (stream, hash, read back, manifest last): %.1f s, %.1f MiB/s%s" % (
            seconds, total / MIB / seconds, ", %.2f x aws" % (seconds / aws_seconds) if aws_seconds else ""))
        started = time.monotonic()
        again = offsite.copy_backups(source, destination, JOB)
        print("engine copy in sync: %.2f s, changed=%s" % (time.monotonic() - started, again["changed"]))
    finally:
        for server in (first, second):
            if server is not None:
                servers.stop_s3(server)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
