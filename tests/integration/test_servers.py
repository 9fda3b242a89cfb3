# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The server fixtures run real servers: each test does a round trip a fake could not."""

import os
import subprocess
import time
import urllib.request
import uuid

import pytest


def test_postgres_sql_round_trip(postgres_server, postgres_database):
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO items (name) SELECT 'item-' || g FROM generate_series(1, 250) AS g")
        count, last = conn.execute("SELECT count(*), max(name) FROM items").fetchone()
        version = conn.execute("SHOW server_version_num").fetchone()[0]
    assert count == 250
    assert last == "item-99"  # text ordering, computed by the server
    assert 150000 <= int(version) < 160000


def test_postgres_tools_and_unix_socket(postgres_server, postgres_database):
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("CREATE TABLE marker (note text)")
        conn.execute("INSERT INTO marker VALUES ('dumped by pg_dump')")
    # pg_dump over TCP with the PG* environment the fixture exposes.
    dump = subprocess.run(
        [postgres_server.tool("pg_dump"), "--data-only", "--table=marker", postgres_database.name],
        env=dict(os.environ, **postgres_server.env()), check=True, capture_output=True, text=True).stdout
    assert "dumped by pg_dump" in dump
    # psql through the unix socket directory.
    out = subprocess.run(
        [postgres_server.tool("psql"), "-h", postgres_server.socket_dir, "-p", str(postgres_server.port),
         "-U", postgres_server.user, "-d", postgres_database.name, "-tAc", "SELECT note FROM marker"],
        check=True, capture_output=True, text=True).stdout
    assert out.strip() == "dumped by pg_dump"


def test_postgres_databases_are_separate(postgres_server):
    first = postgres_server.create_database()
    second = postgres_server.create_database()
    try:
        assert first.name != second.name
        with postgres_server.connect(first.name) as conn:
            conn.execute("CREATE TABLE only_in_first (x int)")
        with postgres_server.connect(second.name) as conn:
            found = conn.execute("SELECT to_regclass('only_in_first')").fetchone()[0]
        assert found is None
    finally:
        postgres_server.drop_database(first.name)
        postgres_server.drop_database(second.name)
    with postgres_server.connect() as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert first.name not in names and second.name not in names


def test_redis_set_get_and_snapshot(redis_server):
    client = redis_server.client()
    key = "harness:%s" % uuid.uuid4().hex
    client.set(key, b"\x00binary\xff")
    assert client.get(key) == b"\x00binary\xff"
    assert client.incrby(key + ":n", 41) == 41 and client.incr(key + ":n") == 42
    # The data directory is the fixture's: a BGSAVE lands there as dump.rdb.
    client.bgsave()  # the fork happens before the reply: "in progress" is set from here on
    for dummy in range(600):
        if client.info("persistence")["rdb_bgsave_in_progress"] == 0:
            break
        time.sleep(0.05)
    assert client.info("persistence")["rdb_last_bgsave_status"] == "ok"
    rdb = os.path.join(redis_server.dir, "dump.rdb")
    with open(rdb, "rb") as handle:
        assert handle.read(5) == b"REDIS"
    cli = subprocess.run(["redis-cli", "-s", redis_server.unix_socket, "GET", key],
                         check=True, capture_output=True).stdout
    assert cli.rstrip(b"\n") == b"\x00binary\xff"


def test_s3_put_list_get(s3_server):
    client = s3_server.client()
    options = s3_server.storage_options()
    key = options["prefix"] + "/dir/object.bin"
    body = os.urandom(3 * 1024 * 1024 + 7)
    client.put_object(Bucket=s3_server.bucket, Key=key, Body=body)
    listed = client.list_objects_v2(Bucket=s3_server.bucket, Prefix=options["prefix"] + "/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [(key, len(body))]
    assert client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == body
    assert options["endpoint_url"] == s3_server.endpoint_url and options["bucket"] == s3_server.bucket


def test_s3_rejects_wrong_secret(s3_server):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError
    bad = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=s3_server.region,
                       aws_access_key_id=s3_server.access_key, aws_secret_access_key="not-the-secret",
                       config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as info:
        bad.list_objects_v2(Bucket=s3_server.bucket)
    assert info.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId")


def test_s3_storage_options_open_in_engine(s3_server):
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
    options = s3_server.storage_options(prefix="harness/%s" % uuid.uuid4().hex[:8])
    storage = open_storage(options)
    storage.ensure_ready()
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key=options["prefix"] + "/job/one.txt", Body=b"1")
    assert [info.key for info in storage.list("")] == ["job/one.txt"]


def test_pushgateway_push_and_scrape(pushgateway_server):
    job = "harness_%s" % uuid.uuid4().hex[:8]
    body = b"# TYPE harness_probe gauge\nharness_probe 42.5\n"
    request = urllib.request.Request("%s/metrics/job/%s/instance/ci" % (pushgateway_server.url, job),
                                     data=body, method="PUT")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        assert response.status in (200, 202)
    text = pushgateway_server.metrics_text()
    assert 'harness_probe{instance="ci",job="%s"} 42.5' % job in text
    pushgateway_server.wipe()
    assert job not in pushgateway_server.metrics_text()


def test_git_push_to_remote(git_remote, tmp_path):
    work = tmp_path / "work"
    identity = ["-c", "user.name=Harness", "-c", "user.email=harness@example.invalid"]
    subprocess.run(["git", "init", "--quiet", "--initial-branch=main", str(work)], check=True)
    (work / "config.yaml").write_text("answer: 42\n")
    subprocess.run(["git", "-C", str(work), "add", "config.yaml"], check=True)
    subprocess.run(["git", "-C", str(work), *identity, "commit", "--quiet", "-m", "first"], check=True)
    head = subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "-C", str(work), "push", "--quiet", git_remote.url, "main"], check=True)
    assert git_remote.refs() == {"refs/heads/main": head}
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", git_remote.url, str(clone)], check=True)
    assert (clone / "config.yaml").read_text() == "answer: 42\n"
