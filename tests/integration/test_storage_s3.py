"""S3Storage and the catalog against a real S3 server (SeaweedFS, the ``s3_server`` fixture).

Request counts come from botocore's own event hooks on the real client (instrumentation,
nothing is replaced).
"""

import datetime
import hashlib
import http.client
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyrage
import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun, open_payload
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, NotFoundError, SourceError, StorageError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.pipeline import check_object, store_stream
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage import s3 as s3mod
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import UTC, new_backup_id, to_iso

MiB = 1 << 20


class Requests:
    """Counts the S3 operations a client sends (botocore 'before-call' events) and their URLs."""

    def __init__(self, client):
        self.operations = []
        self.urls = []
        client.meta.events.register("before-call.s3", self._call)
        client.meta.events.register("before-send.s3", self._send)

    def _call(self, model, **kwargs):
        self.operations.append(model.name)

    def _send(self, request, **kwargs):
        self.urls.append(request.url)

    def reset(self):
        self.operations, self.urls = [], []

    def count(self, name):
        return self.operations.count(name)


class Generated:
    def __init__(self, size, seed=0, fail_at=None):
        self.size, self.pos, self.fail_at = size, 0, fail_at
        self.block = hashlib.sha256(b"%d" % seed).digest() * (MiB // 32)
        self.sha256 = hashlib.sha256()

    def read(self, n=-1):
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise OSError(104, "Connection reset by peer")
        n = min(self.size - self.pos if n is None or n < 0 else n, self.size - self.pos)
        chunk = (b"%016x" % self.pos + self.block[16:n]) if n > 16 else self.block[:n]
        self.pos += len(chunk)
        self.sha256.update(chunk)
        return chunk


class Random(Generated):
    def __init__(self, size, fail_at=None):
        super().__init__(size, fail_at=fail_at)
        self.block = os.urandom(MiB)


class FilesSource(Source):
    kind = "files"

    def produce(self, emit, context):
        self.source = Random(self.options["size"], self.options.get("fail_at"))
        emit("data.tar", self.source)
        return {"files": 1}


@pytest.fixture
def options(s3_server):
    return s3_server.storage_options()  # a fresh prefix per test


@pytest.fixture
def storage(options):
    return open_storage(dict(options, part_size=5 * MiB))


def raw_keys(s3_server, prefix=""):
    client = s3_server.client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def pending_uploads(s3_server, prefix):
    response = s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket, Prefix=prefix)
    return [u["Key"] for u in response.get("Uploads", [])]


# -- objects ---------------------------------------------------------------------------------

def test_small_objects_round_trip_with_a_single_put(s3_server, storage, options):
    requests = Requests(storage.client)
    storage.put_bytes("j/b/manifest.json", b'{"x": 1}')
    assert requests.operations == ["PutObject"]
    assert storage.get_bytes("j/b/manifest.json") == b'{"x": 1}'
    assert storage.exists("j/b/manifest.json") and not storage.exists("j/b/other")
    assert raw_keys(s3_server, options["prefix"] + "/") == [options["prefix"] + "/j/b/manifest.json"]
    storage.put_bytes("j/b/empty", b"")
    assert storage.get_bytes("j/b/empty") == b""


def test_large_objects_go_up_as_multipart_in_small_parts(s3_server, storage, options):
    requests = Requests(storage.client)
    source = Random(23 * MiB)
    result = store_stream(source, storage, "j/b/data", codecs.compression_settings({"algorithm": "none"}), {"mode": "none"})
    assert requests.count("CreateMultipartUpload") == 1
    assert requests.count("UploadPart") == 5  # 4 x 5 MiB + 3 MiB
    assert requests.count("CompleteMultipartUpload") == 1 and requests.count("PutObject") == 0
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=options["prefix"] + "/j/b/data")
    assert head["ContentLength"] == 23 * MiB == result["size"]
    assert check_object(storage, "j/b/data", dict(result, name="data"), "none")["plain_bytes"] == 23 * MiB
    assert pending_uploads(s3_server, options["prefix"]) == []


def test_encrypted_compressed_stream_round_trip(s3_server, storage):
    identity = pyrage.x25519.Identity.generate()
    source = Generated(40 * MiB)
    result = store_stream(source, storage, "j/b/data.zst.age", codecs.compression_settings({"algorithm": "zstd", "level": 3}),
                          codecs.encryption_settings({"recipients": [str(identity.to_public())]}))
    summary = check_object(storage, "j/b/data.zst.age", dict(result, name="data.zst.age"), "zstd", [identity])
    assert summary["plain_bytes"] == 40 * MiB and summary["sha256"] == result["sha256"]


def test_abort_leaves_no_object_and_no_pending_upload(s3_server, storage, options):
    writer = storage.open_writer("j/b/data")
    for dummy in range(3):
        writer.write(os.urandom(4 * MiB))  # two parts sent, one buffered
    assert pending_uploads(s3_server, options["prefix"])  # the upload really started
    writer.abort()
    assert raw_keys(s3_server, options["prefix"] + "/") == []
    assert pending_uploads(s3_server, options["prefix"]) == []


def test_a_failing_source_leaves_no_object(s3_server, storage, options):
    with pytest.raises(SourceError, match="Connection reset by peer"):
        store_stream(Random(30 * MiB, fail_at=17 * MiB), storage, "j/b/data",
                     codecs.compression_settings({"algorithm": "none"}), {"mode": "none"})
    assert raw_keys(s3_server, options["prefix"] + "/") == []
    assert pending_uploads(s3_server, options["prefix"]) == []


class PartSizes:
    """The body size of every UploadPart the client sends (botocore's parameter event: instrumentation)."""

    def __init__(self, client):
        self.sizes = {}
        client.meta.events.register("before-parameter-build.s3.UploadPart", self._record)

    def _record(self, params, **kwargs):
        self.sizes[params["PartNumber"]] = len(params["Body"])

    def in_order(self):
        return [self.sizes[n] for n in sorted(self.sizes)]


@pytest.mark.parametrize("ceiling", ["object size", "part count"])
def test_too_large_an_object_is_a_clear_error_and_aborts(s3_server, storage, options, monkeypatch, ceiling):
    """Beyond S3's limits the upload fails with one line and leaves neither object nor upload.

    The real ceilings (5 TiB per object; 10,000 parts) are shrunk to what a test can send:
    16 MiB of 5 MiB parts against an object limit of 12 MiB, or against 2 parts that never grow.
    """
    if ceiling == "object size":
        monkeypatch.setattr(s3mod, "MAX_OBJECT_SIZE", 12 * MiB)
        message = r"^%s/j/b/data is larger than S3's largest object \(12 MiB\): nothing was stored; " \
                  r"split the job or use a filesystem location for it$" % options["prefix"]
    else:
        monkeypatch.setattr(s3mod, "MAX_PARTS", 2)
        monkeypatch.setattr(s3mod, "PARTS_PER_STEP", 10)
        message = r"^%s/j/b/data needs more than S3's 2 parts per upload \(parts of 5 MiB\): nothing was " \
                  r"stored; raise the storage option part_size$" % options["prefix"]
    sizes = PartSizes(storage.client)
    with pytest.raises(StorageError, match=message):
        store_stream(Random(16 * MiB), storage, "j/b/data", codecs.compression_settings({"algorithm": "none"}), {"mode": "none"})
    assert sizes.in_order() == [5 * MiB, 5 * MiB]  # the upload really ran up to the ceiling
    assert raw_keys(s3_server, options["prefix"] + "/") == []
    assert pending_uploads(s3_server, options["prefix"]) == []


def test_part_size_grows_past_the_old_fixed_limit_and_round_trips(s3_server, storage, options, monkeypatch):
    """With the part limit shrunk to 6 (S3: 10,000) and growth every 2 parts (real: 625), 5 MiB
    parts alone would end at 30 MiB; the growing schedule stores 57 MiB, byte for byte."""
    monkeypatch.setattr(s3mod, "MAX_PARTS", 6)
    monkeypatch.setattr(s3mod, "PARTS_PER_STEP", 2)
    old_limit = 6 * 5 * MiB
    size = 57 * MiB
    assert size > old_limit
    sizes = PartSizes(storage.client)
    source = Random(size)
    result = store_stream(source, storage, "j/b/big", codecs.compression_settings({"algorithm": "none"}), {"mode": "none"})
    assert sizes.in_order() == [5 * MiB, 5 * MiB, 10 * MiB, 10 * MiB, 20 * MiB, 7 * MiB]
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=options["prefix"] + "/j/b/big")
    assert head["ContentLength"] == size == result["size"]
    assert head["ETag"].strip('"').endswith("-6")  # one multipart object of 6 parts
    # Byte-exact: read it back through a fresh client and hash it independently.
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=options["prefix"] + "/j/b/big")["Body"]
    digest = hashlib.sha256()
    for chunk in iter(lambda: body.read(MiB), b""):
        digest.update(chunk)
    assert digest.hexdigest() == source.sha256.hexdigest() == result["sha256"]
    assert pending_uploads(s3_server, options["prefix"]) == []
    # The same stream at a fixed part size (no growth) fails at the old limit: the test can fail.
    monkeypatch.setattr(s3mod, "PARTS_PER_STEP", 10000)
    with pytest.raises(StorageError, match="needs more than S3's 6 parts per upload"):
        store_stream(Random(size), storage, "j/b/fixed", codecs.compression_settings({"algorithm": "none"}), {"mode": "none"})
    assert pending_uploads(s3_server, options["prefix"]) == []


def test_part_size_below_the_s3_minimum_is_refused(options):
    # Refused by the storage schema before any client is made (engine/storage/location.py).
    with pytest.raises(ConfigError, match="storage.part_size must be at least 5242880, got 1048576"):
        open_storage(dict(options, part_size=MiB))


KILLED_UPLOAD = textwrap.dedent("""
    import json, os, sys
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

    class Endless(Source):
        kind = "files"
        def produce(self, emit, context):
            block = os.urandom(1 << 20)
            class Reader:
                def read(self, n=-1):
                    return block[:n]
            emit("data.tar", Reader())
            return {}

    print("started", flush=True)
    BackupRun("killed", Endless({}), open_storage(json.loads(sys.argv[1])), {"algorithm": "none"}).run()
""")


def test_a_killed_upload_is_invisible_and_can_be_swept(s3_server, options):
    storage = open_storage(dict(options, part_size=5 * MiB))
    good = BackupRun("killed", FilesSource({"size": MiB}), storage).run()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_UPLOAD, json.dumps(dict(options, part_size=5 * MiB))],
                            stdout=subprocess.PIPE, env=os.environ.copy())
    try:
        assert proc.stdout.readline().strip() == b"started"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not pending_uploads(s3_server, options["prefix"]):
            time.sleep(0.1)
        time.sleep(1.0)  # a few parts in
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    pending = storage.list_incomplete_uploads()
    assert len(pending) == 1 and pending[0][0].startswith("killed/") and pending[0][0].endswith("/data.tar")
    catalog = Catalog(storage)
    assert [m["id"] for m in catalog.scan("killed")] == [good["id"]]

    # What backup_info reports: the killed run's parts, counted on the server.
    def parts_on_the_server():
        return s3_server.client().list_parts(Bucket=s3_server.bucket, Key=options["prefix"] + "/" + pending[0].key,
                                             UploadId=pending[0].upload_id)["Parts"]

    # A part whose request was on the wire at the kill can still land: wait until the count settles.
    server_parts, settle_by = parts_on_the_server(), time.monotonic() + 10
    while time.monotonic() < settle_by:
        time.sleep(0.5)
        again = parts_on_the_server()
        if len(again) == len(server_parts):
            break
        server_parts = again
    [reported] = catalog.incomplete_uploads("killed")
    assert reported["key"] == pending[0].key and reported["upload_id"] == pending[0].upload_id
    assert reported["parts"] == len(server_parts) >= 1
    assert reported["bytes"] == sum(part["Size"] for part in server_parts) == 5 * MiB * len(server_parts)
    storage.abort_incomplete_upload(pending[0][0], pending[0][1])
    assert storage.list_incomplete_uploads() == []


def test_unfinished_uploads_are_reported_with_count_bytes_and_age(s3_server, storage, options, tmp_path):
    """backup_info, the runner's list and the catalog report what prune alone used to see."""
    client = s3_server.client()
    backup_dir = "reported/%s" % new_backup_id(datetime.datetime.now(UTC))
    started = datetime.datetime.now(UTC).replace(microsecond=0)
    upload = client.create_multipart_upload(Bucket=s3_server.bucket, Key="%s/%s/data.tar" % (options["prefix"], backup_dir))
    for number, size in ((1, 5 * MiB), (2, 3 * MiB + 17)):
        client.upload_part(Bucket=s3_server.bucket, Key="%s/%s/data.tar" % (options["prefix"], backup_dir),
                           UploadId=upload["UploadId"], PartNumber=number, Body=os.urandom(size))
    storage.put_bytes("other/%s/data" % new_backup_id(datetime.datetime.now(UTC)), b"x")  # another job's orphan
    time.sleep(1.1)

    requests = Requests(storage.client)
    [entry] = Catalog(storage).incomplete_uploads("reported")
    assert requests.operations == ["ListMultipartUploads", "ListParts"]  # one listing, one ListParts per upload
    assert entry["key"] == backup_dir + "/data.tar" and entry["upload_id"] == upload["UploadId"]
    assert entry["parts"] == 2 and entry["bytes"] == 8 * MiB + 17
    assert started <= datetime.datetime.fromisoformat(entry["initiated"].replace("Z", "+00:00")) <= started + datetime.timedelta(seconds=60)
    assert 1 <= entry["age_seconds"] <= 300
    assert Catalog(storage).incomplete_uploads("other") == []
    assert [u["key"] for u in Catalog(storage).incomplete_uploads()] == [entry["key"]]

    from modules_helpers import ansible_playbook  # pylint: disable=import-outside-toplevel
    proc, results = ansible_playbook(tmp_path, [
        {"name": "one job", "biometrics.backup.backup_info": {"storage": options, "job": "reported"}},
        {"name": "every job", "biometrics.backup.backup_info": {"storage": options}},
        {"name": "another job", "biometrics.backup.backup_info": {"storage": options, "job": "other"}},
    ])
    assert proc.returncode == 0, proc.stdout[-2000:]
    one = results["one job"]
    assert one["count"] == 0 and [o["key"] for o in one["orphans"]] == []
    assert [(u["key"], u["upload_id"], u["parts"], u["bytes"]) for u in one["incomplete_uploads"]] == [
        (entry["key"], upload["UploadId"], 2, 8 * MiB + 17)]
    summary = one["incomplete_uploads_summary"]
    assert summary["count"] == 1 and summary["bytes"] == 8 * MiB + 17 and summary["oldest_age_seconds"] >= 1
    assert results["every job"]["incomplete_uploads_summary"]["count"] == 1
    assert len(results["every job"]["orphans"]) == 1  # reported beside the orphans, not instead of them
    assert results["another job"]["incomplete_uploads"] == []
    assert results["another job"]["incomplete_uploads_summary"] == {"count": 0, "bytes": 0, "oldest_age_seconds": None}

    config = tmp_path / "job.json"
    config.write_text(json.dumps({
        "job": "reported", "kind": "files", "source": {"path": str(tmp_path)}, "encryption": {"enabled": False},
        "storage": {"backend": "s3", "bucket": s3_server.bucket, "prefix": options["prefix"],
                    "endpoint_url": s3_server.endpoint_url, "region": s3_server.region,
                    "access_key_env": "LIST_S3_ACCESS", "secret_key_env": "LIST_S3_SECRET"}}))
    listed = subprocess.run(
        [sys.executable, "-m", "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner", "list",
         "--config", str(config)], capture_output=True, text=True, check=False,
        env=dict(os.environ, LIST_S3_ACCESS=s3_server.access_key, LIST_S3_SECRET=s3_server.secret_key))
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["incomplete_uploads_summary"]["bytes"] == 8 * MiB + 17
    assert "1 unfinished uploads (8.0 MiB)" in listed.stderr

    # Once aborted (what prune does after orphan_grace) nothing is reported any more.
    storage.abort_incomplete_upload(entry["key"], entry["upload_id"])
    assert Catalog(storage).incomplete_uploads() == []


# -- listing ---------------------------------------------------------------------------------

def test_listing_paginates_past_1000_keys(s3_server, storage, options):
    keys = ["j/%s/obj-%04d" % ("a" if n % 2 else "b", n) for n in range(1105)]
    client = s3_server.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_server.bucket, Key=options["prefix"] + "/" + k, Body=b"x"), keys))
    requests = Requests(storage.client)
    listed = storage.list("j/")
    assert [info.key for info in listed] == sorted(keys)
    assert requests.count("ListObjectsV2") == 2  # 1000 + 105: one paginated listing
    assert all(info.size == 1 and info.modified.tzinfo is not None for info in listed)
    assert len(storage.list("j/a/")) == 552


def test_prefixes_isolate_locations(s3_server, options):
    base = options["prefix"]
    outer = open_storage(dict(options, prefix=base))
    inner = open_storage(dict(options, prefix="/%s/team/" % base))       # slashes are trimmed
    sibling = open_storage(dict(options, prefix="%s/team2" % base, part_size=5 * MiB))
    inner.put_bytes("j/x", b"inner")
    sibling.put_bytes("j/x", b"sibling")
    outer.put_bytes("top", b"outer")
    assert [i.key for i in inner.list()] == ["j/x"]
    assert [i.key for i in sibling.list()] == ["j/x"]
    assert [i.key for i in outer.list()] == ["team/j/x", "team2/j/x", "top"]
    assert [i.key for i in outer.list("team/")] == ["team/j/x"]
    assert inner.get_bytes("j/x") == b"inner" and outer.get_bytes("team2/j/x") == b"sibling"
    assert inner.describe() == {"backend": "s3", "bucket": s3_server.bucket, "prefix": base + "/team",
                                "endpoint_url": s3_server.endpoint_url, "region": s3_server.region}
    # Incomplete uploads are scoped the same way (team2 is not inside team).
    writer = sibling.open_writer("j/big")
    writer.write(os.urandom(6 * MiB))
    try:
        assert inner.list_incomplete_uploads() == []
        assert [u[0] for u in sibling.list_incomplete_uploads()] == ["j/big"]
    finally:
        writer.abort()
    inner.delete("j/x")
    inner.delete("j/x")  # deleting a missing object is fine
    assert inner.list() == []


def test_no_prefix_uses_the_bucket_root(s3_server):
    bucket = s3_server.create_bucket("root")
    storage = open_storage(s3_server.storage_options(prefix="", bucket=bucket))
    storage.put_bytes("j/x", b"1")
    assert [i.key for i in storage.list()] == ["j/x"]
    assert s3_server.client().get_object(Bucket=bucket, Key="j/x")["Body"].read() == b"1"


def test_path_style_addressing_is_used_for_an_endpoint(s3_server, storage, options):
    requests = Requests(storage.client)
    storage.put_bytes("j/x", b"1")
    storage.list("j/")
    expected = "%s/%s/%s/j/x" % (s3_server.endpoint_url, s3_server.bucket, options["prefix"])
    assert requests.urls[0] == expected
    assert all(url.startswith("%s/%s" % (s3_server.endpoint_url, s3_server.bucket)) for url in requests.urls)
    virtual = open_storage(dict(options, path_style=False))
    assert virtual.client.meta.config.s3["addressing_style"] == "auto"


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"secret_key": "x" * 40}, "s3 refused .* check the access key and secret"),
    ({"access_key": "AKNOSUCHKEY"}, "s3 refused .* check the access key and secret"),
])
def test_wrong_credentials_fail_clearly_everywhere(options, change, message):
    storage = open_storage(dict(options, **change))
    for call in (storage.ensure_ready, storage.list, lambda: storage.put_bytes("j/x", b"1"),
                 lambda: storage.get_bytes("j/x"), lambda: storage.exists("j/x"),
                 lambda: store_stream(Random(12 * MiB), open_storage(dict(options, part_size=5 * MiB, **change)), "j/y",
                                      codecs.compression_settings({"algorithm": "none"}), {"mode": "none"})):
        with pytest.raises(StorageError, match=message) as info:
            call()
        assert options["secret_key"] not in str(info.value)


def test_a_backup_to_a_missing_bucket_fails_before_reading_the_source(s3_server, options):
    bucket = "missing-%s" % uuid.uuid4().hex[:8]
    source = FilesSource({"size": MiB})
    storage = open_storage(dict(options, bucket=bucket))
    with pytest.raises(StorageError, match="s3 bucket '%s' does not exist at %s" % (bucket, s3_server.endpoint_url)):
        BackupRun("j", source, storage).run()
    assert not hasattr(source, "source")  # never read
    assert bucket not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    with pytest.raises(StorageError, match="does not exist"):
        storage.list()


def test_an_unreachable_endpoint_fails_clearly(options):
    storage = open_storage(dict(options, endpoint_url="http://127.0.0.1:9", max_attempts=1))
    for call, doing in ((storage.ensure_ready, "cannot reach s3 endpoint http://127.0.0.1:9"),
                        (storage.list, "s3 error while listing"),
                        (lambda: storage.exists("j/x"), "s3 error while checking j/x")):
        with pytest.raises(StorageError, match=doing):
            call()


def test_missing_object_is_not_found(storage):
    with pytest.raises(NotFoundError, match="object j/nope not found in s3://"):
        storage.get_bytes("j/nope")


def test_credentials_from_files_and_env(s3_server, options, tmp_path, monkeypatch):
    key_file = tmp_path / "access_key"
    key_file.write_text(options["access_key"] + "\n")
    monkeypatch.setenv("BB_TEST_S3_SECRET", options["secret_key"])
    resolved = dict(options, access_key_file=str(key_file), secret_key_env="BB_TEST_S3_SECRET")
    del resolved["access_key"], resolved["secret_key"]
    storage = open_storage(resolved)
    storage.ensure_ready()
    storage.put_bytes("j/x", b"1")
    assert storage.get_bytes("j/x") == b"1"
    assert "secret" not in json.dumps(storage.describe()).lower()


def test_unknown_backend_and_missing_bucket_option():
    with pytest.raises(ConfigError, match="storage.bucket is required for backend s3"):
        open_storage({"backend": "s3", "endpoint_url": "http://127.0.0.1:9"})


# -- memory ------------------------------------------------------------------------------------

S3_MEMORY_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.pipeline import store_stream
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage import s3 as s3mod
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

    size = int(sys.argv[2])
    for name, value in json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}").items():
        setattr(s3mod, name, value)  # a shrunken part schedule
    block = os.urandom(1 << 20)

    class Source:
        pos = 0
        def read(self, n=-1):
            n = min(n, size - self.pos)
            self.pos += n
            return (b"%016x" % self.pos + block[16:n]) if n > 16 else block[:n]

    storage = open_storage(json.loads(sys.argv[1]))
    result = store_stream(Source(), storage, "mem/p", codecs.compression_settings({"algorithm": "none"}), {"mode": "none"})
    storage.delete("mem/p")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec (pytest's peak would show).
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"maxrss_kib": hwm, "size": result["size"]}))
""")


def test_upload_memory_is_bounded_by_the_part_buffers(options):
    """Peak RSS of a 320 MiB upload is that of a 64 MiB one (8 parts: in-flight steady state)."""
    settings = dict(options, part_size=8 * MiB)

    def peak(size):
        out = subprocess.run([sys.executable, "-c", S3_MEMORY_PROBE, json.dumps(settings), str(size)],
                             check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
        result = json.loads(out)
        assert result["size"] == size
        return result["maxrss_kib"]

    low, high = peak(64 * MiB), peak(320 * MiB)
    assert high < 256 * 1024
    assert high - low < 24 * 1024, "peak RSS grew from %d to %d KiB" % (low, high)


def test_upload_memory_follows_the_grown_part_size(options):
    """Growing parts cost (in flight + 1) x the current part size, no more.

    With the schedule shrunk (5 MiB parts doubling every 4 parts up to 40 MiB), a 400 MiB
    upload peaks where fixed 40 MiB parts peak, 3 x (40 - 5) MiB above fixed 5 MiB parts.
    glibc's malloc is pinned to mmap every block of 1 MiB or more: by default its dynamic
    threshold keeps freed parts of up to 32 MiB in the heap (measured: 40 MiB more after
    growing from 5 to 40 MiB), which is the allocator's, not the writer's (docs/performance.md).
    """
    settings = dict(options, part_size=5 * MiB)

    def peak(overrides):
        out = subprocess.run([sys.executable, "-c", S3_MEMORY_PROBE, json.dumps(settings), str(400 * MiB),
                              json.dumps(overrides)], check=True, capture_output=True, text=True,
                             env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MiB))).stdout
        return json.loads(out)["maxrss_kib"]

    fixed = peak({"PARTS_PER_STEP": 10000})
    grown = peak({"PARTS_PER_STEP": 4, "GROWTH_CEILING": 40 * MiB})
    settings["part_size"] = 40 * MiB
    fixed40 = peak({"PARTS_PER_STEP": 10000})
    figures = "peak RSS: %d KiB with 5 MiB parts, %d KiB growing to 40 MiB, %d KiB with 40 MiB parts" % (
        fixed, grown, fixed40)
    assert grown <= fixed40 + 8 * 1024, figures
    assert 2 * 35 * 1024 <= grown - fixed <= (3 * 35 + 8) * 1024, figures


# -- the catalog on S3 ------------------------------------------------------------------------

def publish_backup(catalog, job, started):
    backup_id = new_backup_id(started)
    catalog.storage.put_bytes(mf.object_key(job, backup_id, "data"), b"d")
    manifest = mf.build(backup_id=backup_id, job=job, kind="files", started_at=to_iso(started),
                        finished_at=to_iso(started + datetime.timedelta(seconds=5)),
                        objects=[{"name": "data", "size": 1, "sha256": hashlib.sha256(b"d").hexdigest()}],
                        compression={"algorithm": "none", "level": 0}, encryption={"mode": "none"},
                        tool_versions={}, stats={}, parent=None)
    catalog.publish(manifest)
    return manifest


def test_catalog_listing_is_one_paginated_list_and_one_get(storage):
    catalog = Catalog(storage)
    t0 = datetime.datetime(2024, 1, 1, tzinfo=UTC)
    made = [publish_backup(catalog, "pg", t0 + datetime.timedelta(hours=h)) for h in range(30)]
    requests = Requests(storage.client)
    found = Catalog(storage).scan("pg")
    assert [m["id"] for m in found] == [m["id"] for m in reversed(made)]
    assert requests.operations == ["ListObjectsV2", "GetObject"]
    # Lose the index: one scan pays a GET per manifest and repairs it, the next is cheap again.
    storage.delete("pg/index.json")
    requests.reset()
    assert Catalog(storage).scan("pg") == found
    # No GET for the index the LIST did not show, one per manifest, one PUT of the rebuilt index.
    assert requests.count("GetObject") == 30 and requests.count("PutObject") == 1
    requests.reset()
    assert Catalog(storage).latest("pg")["id"] == made[-1]["id"]
    assert requests.operations == ["ListObjectsV2", "GetObject"]


def test_catalog_reports_junk_and_orphans_on_s3(s3_server, storage, options):
    catalog = Catalog(storage)
    good = publish_backup(catalog, "j", datetime.datetime(2024, 1, 1, tzinfo=UTC))
    orphan = new_backup_id(datetime.datetime(2024, 1, 2, tzinfo=UTC))
    storage.put_bytes("j/%s/data" % orphan, b"x")
    storage.put_bytes("j/%s/manifest.json" % new_backup_id(datetime.datetime(2024, 1, 3, tzinfo=UTC)), b"<html>")
    storage.put_bytes("stray.txt", b"x")
    assert [m["id"] for m in catalog.scan()] == [good["id"]]
    assert {j["key"] for j in catalog.junk} >= {"stray.txt"}
    assert any("not valid JSON" in j["reason"] for j in catalog.junk)
    assert [i.key for i in catalog.orphans] == ["j/%s/data" % orphan]


def test_backup_run_on_s3_end_to_end(s3_server, options):
    storage = open_storage(dict(options, part_size=5 * MiB))
    identity = pyrage.x25519.Identity.generate()
    source = FilesSource({"size": 18 * MiB})
    seen = {}
    original = source.produce

    def produce(emit, context):
        stats = original(emit, context)
        seen["keys"] = [i.key for i in storage.list("")]
        return stats

    source.produce = produce
    manifest = BackupRun("s3-job", source, storage, {"algorithm": "zstd", "level": 3},
                         {"recipients": [str(identity.to_public())]}).run()
    prefix = "s3-job/%s/" % manifest["id"]
    assert seen["keys"] == [prefix + "data.tar.zst.age"]  # payload stored, manifest not yet
    assert storage.exists(prefix + "manifest.json")
    assert Catalog(storage).resolve("s3-job", manifest["id"])["objects"] == manifest["objects"]
    stream = open_payload(storage, manifest, "data.tar", [identity])
    try:
        digest = hashlib.sha256()
        while True:
            chunk = stream.read(MiB)
            if not chunk:
                break
            digest.update(chunk)
        stream.finish()
    finally:
        stream.close()
    assert digest.hexdigest() == source.source.sha256.hexdigest()


def test_a_failed_backup_run_leaves_nothing_on_s3(s3_server, options):
    storage = open_storage(dict(options, part_size=5 * MiB))
    with pytest.raises(SourceError, match="Connection reset by peer"):
        BackupRun("j", FilesSource({"size": 30 * MiB, "fail_at": 12 * MiB}), storage, {"algorithm": "none"}).run()
    assert raw_keys(s3_server, options["prefix"] + "/") == []
    assert pending_uploads(s3_server, options["prefix"]) == []


def test_concurrent_uploads_share_one_client(storage):
    errors = []

    def upload(n):
        try:
            data = os.urandom(6 * MiB + n)
            storage.put_bytes("c/%d" % n, data) if n % 2 else None
            writer = storage.open_writer("c/big-%d" % n)
            writer.write(data)
            writer.commit()
            assert storage.get_bytes("c/big-%d" % n) == data
        except Exception as exc:  # pylint: disable=broad-except
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len([i for i in storage.list("c/") if i.key.startswith("c/big-")]) == 4


# -- a connection that breaks mid-download -------------------------------------------------------

class CuttingProxy:
    """A loopback TCP proxy in front of the real S3 server that closes a connection once it
    has passed ``limit`` bytes from the server to the client (a network fault, injected)."""

    def __init__(self, target_port, limit):
        import socket
        self.limit = limit
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.cuts = 0
        self._socket = socket
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, dummy = self.listener.accept()
            except OSError:
                return
            server = self._socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, self.limit), daemon=True).start()

    def _pump(self, src, dst, limit):
        passed = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and passed + len(data) > limit:
                    dst.sendall(data[: limit - passed])
                    self.cuts += 1
                    break
                dst.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(self._socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self):
        self.listener.close()


def test_a_download_cut_mid_body_is_a_storage_error_not_corruption(s3_server, options):
    direct = open_storage(dict(options, part_size=5 * MiB))
    identity = pyrage.x25519.Identity.generate()
    # Level 1 keeps the stored object large (the random block repeats only every MiB).
    result = store_stream(Random(12 * MiB), direct, "j/b/data.zst.age", codecs.compression_settings({"algorithm": "zstd", "level": 1, "threads": 0}),
                          codecs.encryption_settings({"recipients": [str(identity.to_public())]}))
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    assert result["size"] > 2 * MiB
    proxy = CuttingProxy(port, limit=result["size"] // 2)
    try:
        cut = open_storage(dict(options, endpoint_url="http://127.0.0.1:%d" % proxy.port))
        cut.client.meta.config.retries["max_attempts"] = 1
        with pytest.raises(StorageError, match="s3 error while reading j/b/data.zst.age"):
            check_object(cut, "j/b/data.zst.age", dict(result, name="data.zst.age"), "zstd", [identity])
        assert proxy.cuts >= 1
        reader = cut.open_reader("j/b/data.zst.age")
        with pytest.raises(StorageError, match="s3 error while reading j/b/data.zst.age"):
            while reader.read(MiB):
                pass
        reader.close()
    finally:
        proxy.close()
    # Through the real endpoint the same object is fine: the fault was the network's.
    assert check_object(direct, "j/b/data.zst.age", dict(result, name="data.zst.age"), "zstd", [identity])["plain_bytes"] == 12 * MiB


# -- server-side encryption and retries --------------------------------------------------------

def volume_files_contain(s3_server, marker):
    """Whether ``marker`` is stored in plain text in SeaweedFS's volume files (the bytes at rest)."""
    for folder, _dirs, names in os.walk(os.path.join(s3_server.dir, "data")):
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                if marker in handle.read():
                    return True
    return False


def marked_payload(marker, size):
    """Incompressible bytes with ``marker`` every 4 KiB, so it would show in any plain copy."""
    chunk = 4096 - len(marker)
    return b"".join(os.urandom(chunk) + marker for dummy in range(size // 4096))


def test_server_side_encryption_is_applied_at_rest(s3_server, options):
    """With server_side_encryption the server stores ciphertext; reads are transparent."""
    none = codecs.compression_settings({"algorithm": "none"})
    sse = open_storage(dict(options, server_side_encryption="AES256", part_size=5 * MiB))
    plain = open_storage(dict(options, part_size=5 * MiB))
    secret_marker = b"SSE-MARKER-" + uuid.uuid4().hex.encode()
    control_marker = b"PLAIN-MARKER-" + uuid.uuid4().hex.encode()
    written = {}
    for key, size in (("j/b/small", 64 * 1024), ("j/b/large", 12 * MiB)):  # PutObject, multipart
        body = marked_payload(secret_marker, size)
        written[key] = (store_stream(io.BytesIO(body), sse, key, none, {"mode": "none"}), size)
    store_stream(io.BytesIO(marked_payload(control_marker, 64 * 1024)), plain, "j/b/control", none, {"mode": "none"})

    client = s3_server.client()
    for key, (result, size) in written.items():
        head = client.head_object(Bucket=s3_server.bucket, Key=options["prefix"] + "/" + key)
        assert head["ServerSideEncryption"] == "AES256", key
        assert check_object(sse, key, dict(result, name=key), "none")["plain_bytes"] == size
    assert "ServerSideEncryption" not in client.head_object(Bucket=s3_server.bucket,
                                                            Key=options["prefix"] + "/j/b/control")
    # The control proves the probe sees plain objects; the encrypted ones must not show.
    assert volume_files_contain(s3_server, control_marker)
    assert not volume_files_contain(s3_server, secret_marker)


class FaultyProxy:
    """An HTTP relay in front of the real S3 server that fails chosen requests first.

    ``fail(predicate, count, how)``: the next ``count`` requests for which ``predicate(method,
    path)`` holds are answered ``503 SlowDown`` (``how="503"``) or have their connection closed
    without an answer (``how="drop"``); everything else is relayed unchanged (the Host header
    too, so the client's signatures stay valid).
    """

    def __init__(self, upstream):
        target = upstream.split("//", 1)[1]
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.faults = []
        self.log = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy.take_fault(self.command, self.path)
                proxy.log.append((self.command, self.path, fault or "relayed"))
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault == "503":
                    error = (b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code>"
                             b"<Message>injected by the test</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                upstream_conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
                try:
                    upstream_conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    answer = upstream_conn.getresponse()
                    data = answer.read()
                finally:
                    upstream_conn.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint_url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def fail(self, predicate, count, how="503"):
        with self.lock:
            self.faults.append([predicate, count, how])

    def take_fault(self, method, path):
        with self.lock:
            for fault in self.faults:
                if fault[1] > 0 and fault[0](method, path):
                    fault[1] -= 1
                    return fault[2]
        return None

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_proxy(s3_server):
    proxy = FaultyProxy(s3_server.endpoint_url)
    yield proxy
    proxy.close()


def is_put(method, path):
    return method == "PUT" and "partNumber=" not in path


def is_part(method, path):
    return method == "PUT" and "partNumber=" in path


def test_transient_failures_are_retried(s3_server, options, faulty_proxy):
    """503 SlowDown answers and dropped connections cost retries, not the backup."""
    none = codecs.compression_settings({"algorithm": "none"})
    storage = open_storage(dict(options, endpoint_url=faulty_proxy.endpoint_url, part_size=5 * MiB, max_attempts=4))

    faulty_proxy.fail(is_put, 2, "503")
    small = os.urandom(100 * 1024)
    result = store_stream(io.BytesIO(small), storage, "j/b/small", none, {"mode": "none"})
    assert storage.get_bytes("j/b/small") == small and result["size"] == len(small)
    assert [entry[2] for entry in faulty_proxy.log if is_put(*entry[:2])] == ["503", "503", "relayed"]

    faulty_proxy.log.clear()
    faulty_proxy.fail(is_part, 1, "503")
    faulty_proxy.fail(is_part, 1, "drop")
    large = os.urandom(12 * MiB)
    result = store_stream(io.BytesIO(large), storage, "j/b/large", none, {"mode": "none"})
    parts = [entry[2] for entry in faulty_proxy.log if is_part(*entry[:2])]
    assert sorted(parts) == ["503", "drop", "relayed", "relayed", "relayed"], parts  # 3 parts, 2 retried
    assert check_object(storage, "j/b/large", dict(result, name="large"), "none")["plain_bytes"] == len(large)
    assert pending_uploads(s3_server, options["prefix"] + "/") == []


def test_failures_beyond_max_attempts_fail_clearly_and_leave_nothing(s3_server, options, faulty_proxy):
    none = codecs.compression_settings({"algorithm": "none"})
    storage = open_storage(dict(options, endpoint_url=faulty_proxy.endpoint_url, part_size=5 * MiB, max_attempts=2))
    faulty_proxy.fail(is_put, 2, "503")
    with pytest.raises(StorageError, match="SlowDown"):
        store_stream(io.BytesIO(os.urandom(1024)), storage, "j/b/small", none, {"mode": "none"})
    assert [entry[2] for entry in faulty_proxy.log] == ["503", "503"]  # max_attempts counts the first
    faulty_proxy.fail(is_part, 4, "503")  # both parts are in flight at once: enough for each
    with pytest.raises(StorageError, match="SlowDown"):
        store_stream(io.BytesIO(os.urandom(7 * MiB)), storage, "j/b/large", none, {"mode": "none"})
    assert raw_keys(s3_server, options["prefix"] + "/") == []
    assert pending_uploads(s3_server, options["prefix"] + "/") == []


@pytest.mark.parametrize("value", [0, -1, "two", True, 1.5])
def test_max_attempts_must_be_a_positive_whole_number(options, value):
    with pytest.raises(ConfigError, match="storage.max_attempts must be (a whole number|at least 1), got"):
        open_storage(dict(options, max_attempts=value))
