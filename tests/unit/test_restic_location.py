"""engine/restic, the pure parts: storage options -> repository URL/env, tags, locks, summary, manifest."""

import datetime
import os
import stat

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restic as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError, IntegrityError

UTC = datetime.timezone.utc
NOW = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def test_filesystem_and_nfs_locations():
    assert rs.repository_location({"backend": "filesystem", "path": "/backups"}) == ("local:/backups", [], [], {})
    url, extended, flags, env = rs.repository_location({"backend": "nfs", "path": "/mnt/nfs/", "prefix": "/a/b/"})
    assert (url, extended, flags, env) == ("local:/mnt/nfs/a/b", [], [], {})
    with pytest.raises(ConfigError, match="absolute"):
        rs.repository_location({"backend": "filesystem", "path": "relative"})


def test_s3_location_puts_credentials_in_env_only():
    options = {"backend": "s3", "bucket": "bk", "prefix": "team/x", "endpoint_url": "http://10.0.0.5:8333/",
               "region": "eu-1", "access_key": "AKID", "secret_key": "SECRETKEY", "session_token": "TOKEN",
               "verify_tls": False}
    url, extended, flags, env = rs.repository_location(options)
    assert url == "s3:http://10.0.0.5:8333/bk/team/x"
    assert extended == ["s3.bucket-lookup=path", "s3.region=eu-1"]
    assert flags == ["--insecure-tls"]
    assert env == {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRETKEY", "AWS_SESSION_TOKEN": "TOKEN"}
    assert "SECRETKEY" not in url + " ".join(extended + flags)


def test_s3_location_aws_defaults_and_explicit_path_style():
    url, extended, flags, env = rs.repository_location({"backend": "s3", "bucket": "bk", "region": "eu-west-1"})
    assert url == "s3:s3.eu-west-1.amazonaws.com/bk"
    assert extended == ["s3.bucket-lookup=auto", "s3.region=eu-west-1"] and flags == [] and env == {}
    url, extended, dummy, dummy = rs.repository_location(
        {"backend": "s3", "bucket": "bk", "endpoint": "https://s3.example", "path_style": False})
    assert url == "s3:https://s3.example/bk" and extended[0] == "s3.bucket-lookup=auto"


def test_s3_server_side_encryption_is_refused_clearly():
    with pytest.raises(ConfigError, match="server_side_encryption is not supported by the restic format"):
        rs.repository_location({"backend": "s3", "bucket": "bk", "server_side_encryption": "AES256"})


def test_job_repository_is_a_name_no_job_can_have():
    options = {"backend": "s3", "bucket": "bk", "prefix": "/prod/"}
    assert rs.job_repository_options(options, "pg-main")["prefix"] == "prod/_restic/pg-main"
    assert rs.job_repository_options({"backend": "filesystem", "path": "/b"}, "r1")["prefix"] == "_restic/r1"
    with pytest.raises(ConfigError):
        mf.validate_job_name(rs.REPOSITORY_DIR)
    with pytest.raises(ConfigError):
        rs.job_repository_options(options, "../x")
    assert options["prefix"] == "/prod/"  # not modified


def test_tags_round_trip_and_refuse_commas():
    tags = rs.format_tags({"kind": "postgres", "job": "pg-main", "backup_id": "20240101T000000Z-0a1b2c"})
    assert tags == ["backup_id=20240101T000000Z-0a1b2c", "job=pg-main", "kind=postgres"]
    assert rs.parse_tags(tags + ["plain"]) == {"backup_id": "20240101T000000Z-0a1b2c", "job": "pg-main",
                                               "kind": "postgres", "plain": ""}
    for bad in ({"job": "a,b"}, {"job": "a b"}, {"jo b": "x"}, {"job": "a=b"}):
        with pytest.raises(ConfigError, match="restic tag"):
            rs.format_tags(bad)


def test_lock_staleness_follows_restic():
    fresh = {"time": "2024-05-01T11:59:00.123456789Z", "hostname": "elsewhere", "pid": 1}
    assert not rs.lock_is_stale(fresh, now=NOW, hostname="here")
    old = dict(fresh, time="2024-05-01T11:29:59.5Z")
    assert rs.lock_is_stale(old, now=NOW, hostname="here")
    mine_alive = dict(fresh, hostname="here", pid=os.getpid())
    assert not rs.lock_is_stale(mine_alive, now=NOW, hostname="here")
    gone = 2 ** 22 + 12345  # above the default pid_max: no such process
    assert rs.lock_is_stale(dict(fresh, hostname="here", pid=gone), now=NOW, hostname="here")
    assert rs.lock_is_stale(dict(fresh, time="garbage"), now=NOW, hostname="here")
    offset = dict(fresh, time="2024-05-01T13:59:00+02:00")
    assert not rs.lock_is_stale(offset, now=NOW, hostname="here")


def test_backup_summary_is_the_last_summary_line():
    lines = ['{"message_type":"status","percent_done":0.5}', "not json", "",
             '{"message_type":"summary","data_added":12,"snapshot_id":"6050f1a1"}']
    assert rs.parse_backup_summary(lines)["snapshot_id"] == "6050f1a1"
    assert rs.parse_backup_summary(['{"message_type":"status"}']) is None


def test_constructor_refuses_bad_settings(tmp_path):
    options = {"backend": "filesystem", "path": str(tmp_path)}
    with pytest.raises(ConfigError, match="password is empty"):
        rs.ResticRepository(options, "")
    with pytest.raises(ConfigError, match="compression"):
        rs.ResticRepository(options, "pw", restic="/bin/true", compression="zstd")
    with pytest.raises(ConfigError, match="lock_wait"):
        rs.ResticRepository(options, "pw", restic="/bin/true", lock_wait=-1)


def _fake_restic(tmp_path, version_line):
    """An executable that answers ``version`` like restic does (to test the version gate only)."""
    path = tmp_path / "restic"
    path.write_text("#!/bin/sh\necho '%s'\n" % version_line)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_old_restic_is_refused_clearly(tmp_path):
    options = {"backend": "filesystem", "path": str(tmp_path / "repo")}
    old = rs.ResticRepository(options, "pw", restic=_fake_restic(tmp_path, "restic 0.13.1 compiled with go1.18"))
    with pytest.raises(ConfigError, match=r"restic 0\.13\.1 .* is too old for the restic format: it needs 0\.14\.0"):
        old.init_if_missing()
    ok = rs.ResticRepository(options, "pw", restic=_fake_restic(tmp_path, "restic 0.16.4 compiled with go1.21"))
    assert ok.version() == ("0.16.4", (0, 16, 4))


def test_snapshot_ids_and_file_names_are_checked(tmp_path):
    repo = rs.ResticRepository({"backend": "filesystem", "path": str(tmp_path)}, "pw", restic="/bin/true")
    for bad in ("HEAD", "latest", "12", "../x", "--help"):
        with pytest.raises(ConfigError, match="not a restic snapshot id"):
            repo.forget([bad])
    for bad in ("../etc/passwd", "/abs", "a b", "-x"):
        with pytest.raises(ConfigError, match="stdin file name"):
            rs.build_manifest("20240101T000000Z-aaaaaa", "pg", "postgres", "2024-01-01T00:00:00Z",
                              "2024-01-01T00:00:01Z", {"size": 1, "sha256": "a" * 64, "snapshot_id": "b" * 64},
                              {"id": "c" * 64, "version": 2}, {}, {}, filename=bad)


def test_manifest_of_stream_and_directory():
    snap = "5" * 64
    result = {"snapshot_id": snap, "size": 1234, "sha256": "a" * 64, "data_added": 10,
              "total_bytes_processed": 1234, "paths": ["/dump.pgdump"]}
    manifest = rs.build_manifest("20240101T000000Z-aaaaaa", "pg", "postgres", "2024-01-01T00:00:00Z",
                                 "2024-01-01T00:00:01Z", result, {"id": "c" * 64, "version": 2},
                                 {"restic": "0.14.0"}, {"rows": 3}, filename="dump.pgdump")
    manifest = mf.loads(mf.dumps(manifest))
    assert manifest["storage_format"] == "restic" and manifest["size_bytes"] == 1234
    assert manifest["objects"] == [{"name": "dump.pgdump", "payload": "dump.pgdump", "size": 1234,
                                    "sha256": "a" * 64, "restic_snapshot": snap}]
    assert rs.manifest_snapshot(manifest) == snap
    assert isinstance(manifest, mf.Manifest) and manifest.size_bytes == 1234 and manifest.objects[0].sha256 == "a" * 64

    directory = dict(result, sha256=None, size=None, total_bytes_processed=99)
    manifest = rs.build_manifest("20240101T000000Z-aaaaaa", "files", "files", "2024-01-01T00:00:00Z",
                                 "2024-01-01T00:00:01Z", directory, {"id": "c" * 64, "version": 2}, {}, {})
    assert mf.validate(manifest)["objects"][0]["sha256"] == snap

    archive = dict(manifest)
    del archive["storage_format"]
    assert rs.manifest_snapshot(archive) is None
    broken = dict(manifest, restic={"snapshot_id": "short"})
    with pytest.raises(IntegrityError, match="names no snapshot id"):
        rs.manifest_snapshot(broken)
