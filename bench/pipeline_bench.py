# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Throughput and memory of the engine's store pipeline against the stock-tool pipelines.

Generates one input file of realistic dump-like data, then, in the same run and on the same
input, times:

  engine   store_stream(file) -> compress -> age -> SHA-256 -> FilesystemStorage (or S3)
  stock    the equivalent shell pipeline, e.g. ``zstd -3 -T0 -c in | age -r KEY > out``

Each case runs in its own process; the rounds interleave all cases so that load from other
users of the machine hits them alike, and the best round of each case is reported (the
least disturbed one). Ratios (engine / stock) are what matters on a shared 2-core machine,
never absolute seconds. Peak RSS comes from wait4() of each process (every stage of a
stock pipeline separately), CPU from the same rusage: CPU seconds above wall seconds mean
stages ran in parallel.

  python bench/pipeline_bench.py                  # 1 GiB, 3 rounds, every case
  python bench/pipeline_bench.py --size 256M --rounds 1 --cases zstd3-age,gzip6
  python bench/pipeline_bench.py --storage-json '{"backend": "s3", ...}'   # engine into S3

Exit status 0 unless a case failed; the numbers are printed, not judged.
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
COLLECTIONS = os.path.join(ROOT, "build", "collections")

# name: (engine compression, engine encrypts?, stock pipeline stages ({in} {key} are filled in))
CASES = {
    "zstd1-age": ({"algorithm": "zstd", "level": 1}, True,
                  [["zstd", "-1", "-T0", "-q", "-c", "{in}"], ["age", "-r", "{key}"]]),
    "zstd3-age": ({"algorithm": "zstd", "level": 3}, True,
                  [["zstd", "-3", "-T0", "-q", "-c", "{in}"], ["age", "-r", "{key}"]]),
    "zstd3": ({"algorithm": "zstd", "level": 3}, False,
              [["zstd", "-3", "-T0", "-q", "-c", "{in}"]]),
    "gzip6": ({"algorithm": "gzip", "level": 6}, False,
              [["gzip", "-6", "-c", "{in}"]]),
    "gzip6-age": ({"algorithm": "gzip", "level": 6}, True,
                  [["gzip", "-6", "-c", "{in}"], ["age", "-r", "{key}"]]),
    "age-only": ({"algorithm": "none"}, True,
                 [["age", "-r", "{key}", "{in}"]]),
}
DEFAULT_CASES = ["zstd1-age", "zstd3-age", "zstd3", "gzip6", "age-only"]

ENGINE_CASE = r"""
import json, os, resource, sys, time
from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.pipeline import store_stream
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

spec = json.loads(sys.argv[1])
storage = open_storage(spec["storage"])
compression = codecs.compression_settings(spec["compression"])
encryption = codecs.encryption_settings({"recipients": [spec["recipient"]]} if spec["encrypt"] else None)
start = time.monotonic()
with open(spec["input"], "rb", buffering=0) as source:
    result = store_stream(source, storage, spec["key"], compression, encryption)
wall = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
storage.delete(spec["key"])
print(json.dumps({"wall": wall, "stored": result["size"], "raw": result["raw_bytes"],
                  "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}))
"""


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("IB")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def generate_input(path, size):
    """Dump-like rows as in pg_dump's COPY text: ids, names, hex bytea templates (random),
    JSON documents, timestamps. Roughly 2:1 compressible, like the real thing."""
    row = 0
    written = 0
    with open(path, "wb") as out:
        while written < size:
            lines = []
            for dummy in range(2000):
                row += 1
                template = os.urandom(256 + (row * 37) % 768).hex()
                lines.append(
                    "%d\tsubject-%07d\t\\\\x%s\t{\"finger\": \"%s\", \"quality\": 0.%03d, \"device\": \"scanner-%02d\", "
                    "\"site\": \"lab-%d\", \"tags\": [\"enrolled\", \"v%d\"]}\t2024-%02d-%02d %02d:%02d:%02d.%06d+00\n"
                    % (row, row % 500000, template, ("left-index", "right-index", "left-thumb", "right-thumb")[row % 4],
                       row % 1000, row % 40, row % 17, row % 5, 1 + row % 12, 1 + row % 28, row % 24, row % 60,
                       (row * 7) % 60, (row * 7919) % 1000000))
            block = "".join(lines).encode("ascii")
            block = block[: size - written]
            out.write(block)
            written += len(block)


def run_engine(case, args, input_path, recipient, out_dir):
    compression, encrypt, dummy = CASES[case]
    storage = json.loads(args.storage_json) if args.storage_json else {"backend": "filesystem", "path": out_dir}
    spec = {"storage": storage, "compression": compression, "encrypt": encrypt, "recipient": recipient,
            "input": input_path, "key": "bench/%s/payload" % case}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [COLLECTIONS, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", ENGINE_CASE, json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError("engine case %s failed: %s" % (case, done.stderr.strip()[-2000:]))
    return json.loads(done.stdout)


def run_stock(case, input_path, recipient, out_dir):
    stages = [[part.replace("{in}", input_path).replace("{key}", recipient) for part in stage]
              for stage in CASES[case][2]]
    out_path = os.path.join(out_dir, "stock-%s.out" % case)
    start = time.monotonic()
    procs = []
    try:
        with open(out_path, "wb") as out:
            previous = None
            for index, argv in enumerate(stages):
                last = index == len(stages) - 1
                proc = subprocess.Popen(argv, stdin=previous if previous is not None else subprocess.DEVNULL,
                                        stdout=out if last else subprocess.PIPE)
                if previous is not None:
                    previous.close()
                previous = proc.stdout
                procs.append(proc)
            usages = []
            for proc in procs:
                dummy, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                usages.append(usage)
    except BaseException:
        for proc in procs:  # an interrupted bench leaves no stage running
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        raise
    wall = time.monotonic() - start
    if any(proc.returncode for proc in procs):
        raise RuntimeError("stock pipeline %s failed: %s" % (case, [p.returncode for p in procs]))
    stored = os.path.getsize(out_path)
    os.unlink(out_path)
    return {"wall": wall, "stored": stored, "cpu": sum(u.ru_utime + u.ru_stime for u in usages),
            "maxrss_kib": max(u.ru_maxrss for u in usages), "stage_rss_kib": [u.ru_maxrss for u in usages]}


def read_limit(input_path):
    """How fast the input can merely be read (the source's own limit here)."""
    start = time.monotonic()
    with open(input_path, "rb", buffering=0) as handle:
        while handle.read(1 << 20):
            pass
    return time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--size", default="1G", help="input size (default 1G; K/M/G suffixes)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best of each case is kept")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma list of: %s" % ", ".join(CASES))
    parser.add_argument("--workdir", default=None, help="where input and outputs go (default: a temp dir)")
    parser.add_argument("--storage-json", default=None, help="engine storage options as JSON (default: filesystem in workdir)")
    parser.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error("unknown cases: %s" % ", ".join(unknown))
    for tool in ("age", "age-keygen", "zstd", "gzip"):
        if shutil.which(tool) is None:
            parser.error("%s is not installed (hack/install-deps.sh)" % tool)
    size = parse_size(args.size)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bb-bench-")
    os.makedirs(workdir, exist_ok=True)
    input_path = os.path.join(workdir, "input.dump")
    key_path = os.path.join(workdir, "identity.txt")
    try:
        if not os.path.exists(key_path):  # a --workdir of an earlier run keeps its key
            subprocess.run(["age-keygen", "-o", key_path], check=True, capture_output=True)
        recipient = subprocess.run(["age-keygen", "-y", key_path], check=True, capture_output=True, text=True).stdout.strip()
        started = time.monotonic()
        generate_input(input_path, size)
        print("input: %s of dump-like rows generated in %.1f s (%s)" % (human(size), time.monotonic() - started, input_path))
        print("machine: %d cores, load average %.2f; python %s" % (os.cpu_count(), os.getloadavg()[0], sys.version.split()[0]))
        results = {case: {"engine": [], "stock": []} for case in cases}
        limits = []
        for round_no in range(args.rounds):
            limits.append(read_limit(input_path))
            for case in cases:
                # Alternate which goes first so neither always gets the warmer cache/CPU.
                order = ("engine", "stock") if round_no % 2 == 0 else ("stock", "engine")
                for side in order:
                    result = (run_engine(case, args, input_path, recipient, workdir) if side == "engine"
                              else run_stock(case, input_path, recipient, workdir))
                    results[case][side].append(result)
            print("round %d/%d done (load %.2f)" % (round_no + 1, args.rounds, os.getloadavg()[0]), flush=True)
        report(results, size, min(limits))
        if args.json:
            print(json.dumps({"size": size, "read_limit_s": min(limits), "results": results}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif os.path.exists(input_path):
            os.unlink(input_path)
    return 0


def human(count):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return "%.1f %s" % (count, unit) if unit != "B" else "%d B" % count
        count /= 1024.0
    return str(count)


def report(results, size, limit):
    print()
    print("read limit (input file -> nothing): %.2f s, %.0f MiB/s" % (limit, size / limit / (1 << 20)))
    header = ("case", "engine s", "stock s", "engine/stock", "engine MiB/s", "x read limit",
              "engine CPU/wall", "stock CPU/wall", "engine peak RSS", "stock peak RSS", "stored engine/stock")
    rows = []
    for case, sides in results.items():
        engine = min(sides["engine"], key=lambda r: r["wall"])
        stock = min(sides["stock"], key=lambda r: r["wall"])
        rows.append((case, "%.2f" % engine["wall"], "%.2f" % stock["wall"], "%.2f" % (engine["wall"] / stock["wall"]),
                     "%.0f" % (size / engine["wall"] / (1 << 20)), "%.1f" % (engine["wall"] / limit),
                     "%.2f" % (engine["cpu"] / engine["wall"]), "%.2f" % (stock["cpu"] / stock["wall"]),
                     "%d MiB" % (engine["maxrss_kib"] // 1024), "%d MiB" % (stock["maxrss_kib"] // 1024),
                     "%.3f" % (engine["stored"] / stock["stored"])))
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |")


if __name__ == "__main__":
    sys.exit(main())
