# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What storing bytes in S3 costs on this machine, client and server apart.

Starts a private SeaweedFS (the test harness's own start code, tests/servers.py), then
uploads incompressible bytes through the engine's S3 writer (multipart, the parts in flight
as in a backup) and reports, per round: wall seconds, the CPU seconds of this process (the
client: boto3, SigV4 payload hashing, HTTP) and the CPU seconds of the `weed` process (the
server), read from /proc before and after.

Why it exists: a backup into S3 is compared with a stock pipeline writing a local file.
On a 2-core machine the S3 server's CPU comes out of the same two cores as the dump,
compression and encryption, and this bench shows how much that is.

  python bench/s3_upload_bench.py                 # 512 MiB, 16 MiB parts, 2 rounds
  python bench/s3_upload_bench.py --size-mb 1024 --part-mb 64 --rounds 3
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "build", "collections")]

import servers  # noqa: E402  (tests/servers.py: the real-server harness)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage  # noqa: E402


def process_cpu_seconds(pid):
    """User + system CPU seconds of ``pid`` so far (fields 14 and 15 of /proc/PID/stat)."""
    with open("/proc/%d/stat" % pid, encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def upload_round(storage, key, size_mb, server_pid):
    block = bytearray(os.urandom(1 << 20))
    server_before, client_before, start = process_cpu_seconds(server_pid), own_cpu_seconds(), time.monotonic()
    writer = storage.open_writer(key)
    for index in range(size_mb):
        block[0] = index % 256  # every MiB differs: no server-side deduplication to profit from
        writer.write(bytes(block))
    writer.commit()
    wall = time.monotonic() - start
    return wall, own_cpu_seconds() - client_before, process_cpu_seconds(server_pid) - server_before


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--part-mb", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    base = tempfile.mkdtemp(prefix="s3-upload-bench-")
    server = servers.start_s3(base)
    try:
        options = dict(server.storage_options(), part_size=args.part_mb << 20)
        storage = open_storage(options)
        print("| round | MiB | wall s | client CPU s | server CPU s | server CPU s per GiB |")
        print("|---:|---:|---:|---:|---:|---:|")
        for number in range(1, args.rounds + 1):
            wall, client, server_cpu = upload_round(storage, "bench/object-%d" % number, args.size_mb,
                                                    server.process.proc.pid)
            print("| %d | %d | %.2f | %.2f | %.2f | %.1f |" % (
                number, args.size_mb, wall, client, server_cpu, server_cpu * 1024 / args.size_mb))
        print("\nload average at the end: %.2f %.2f %.2f (%d cores)" % (os.getloadavg() + (os.cpu_count(),)))
    finally:
        servers.stop_s3(server)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
