"""The restic format's wiring that needs no restic: the catalog leaves the repositories alone,
the storage option's format and password are checked and masked, kinds are refused, and the
manifest of several streams names every snapshot (the rest: tests/integration/test_restic_format.py)."""

import os
import time

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import catalog as cat
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restic as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import resticstore
from ansible_collections.biometrics.backup.plugins.module_utils.engine.config import redact
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError, IntegrityError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import JobConfig, secret_values
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import (
    open_storage, storage_options)

SNAP_A = "a" * 64
SNAP_B = "b" * 64


def test_the_catalog_skips_the_restic_repositories(tmp_path):
    assert cat.RESTIC_DIR == rs.REPOSITORY_DIR
    repo = tmp_path / "_restic" / "pg"
    (repo / "data" / "00").mkdir(parents=True)
    (repo / "config").write_bytes(b"x")
    (repo / "data" / "00" / "00aa").write_bytes(b"pack")
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path)})
    catalog = cat.Catalog(storage)
    assert catalog.scan() == [] and catalog.junk == [] and catalog.orphans == []
    assert catalog.incomplete_uploads() == []


def test_format_and_password_options(tmp_path, monkeypatch):
    base = {"backend": "filesystem", "path": str(tmp_path)}
    with pytest.raises(ConfigError, match="storage.format must be one of archive, restic"):
        storage_options(dict(base, format="borg"))
    with pytest.raises(ConfigError, match="format restic needs the repository password"):
        storage_options(dict(base, format="restic"))
    monkeypatch.setenv("RESTIC_PW_TEST", "s3cret-pw")
    options = storage_options(dict(base, format="restic", restic_password_env="RESTIC_PW_TEST"))
    assert options["restic_password"] == "s3cret-pw"
    assert "s3cret-pw" in secret_values(options)
    assert redact(options)["restic_password"] == "********"
    storage = open_storage(dict(base, format="restic", restic_password="pw"))
    assert resticstore.storage_format(storage) == "restic"
    assert resticstore.storage_format(open_storage(base)) == "archive"
    assert "pw" not in str(storage.describe())


def test_kinds_the_format_does_not_hold_are_refused():
    for kind in resticstore.STREAM_KINDS:
        resticstore.check_kind(kind, "job")
    reasons = {"directory_sync": "stores only its sync record", "velero": "Velero keeps the data in its own storage",
               "postgres_base": "plans its restore from archive-format base backups",
               "postgres_wal": "a restic start per segment"}
    for kind, reason in reasons.items():
        with pytest.raises(ConfigError, match="kind %s cannot be stored in the restic format" % kind) as refused:
            resticstore.check_kind(kind, "job")
        assert reason in str(refused.value), refused.value
    # files: whole trees only (restic keeps what changed; a chain would need its parents' tars)
    resticstore.check_kind("files", "job", {"path": "/data", "incremental": False})
    with pytest.raises(ConfigError, match="source.incremental cannot be used with storage.format restic"):
        resticstore.check_kind("files", "job", {"path": "/data", "incremental": True})


RESTIC_STORAGE = {"backend": "filesystem", "path": "/backups", "format": "restic",
                  "restic_password_file": "/etc/biometrics-backup/secrets/backup-restic-password/password"}
PG_SOURCE = {"host": "db", "database": "biometrics"}


@pytest.mark.parametrize("extra, message", [
    ({"kind": "directory_sync", "source": {"path": "/data", "destination": "/mirror"}},
     "kind directory_sync cannot be stored in the restic format"),
    ({"kind": "files", "source": {"path": "/data", "incremental": "yes"}},
     "source.incremental cannot be used with storage.format restic"),
    ({"encryption": {"recipients_file": "/keys/recipients"}}, "restic encrypts with the repository password"),
    ({"copy": {"destination": {"backend": "filesystem", "path": "/copy"},
               "reencrypt": {"recipients": ["age1etc26wlxxt4j036z56xzvhtp4l3jkfn6xmfmz98l7f2h8yygsexq8n5cfe"], "identity_file": "/keys/identity"}}},
     "copy.reencrypt cannot apply to backups in the restic format"),
    ({"copy": {"destination": {"backend": "s3", "bucket": "b", "server_side_encryption": "AES256"}}},
     "copy.destination of a job with backups in the restic format: storage.server_side_encryption is not supported"),
])
def test_a_job_file_the_restic_format_cannot_run_is_refused_with_the_file(extra, message):
    """The roles check each rendered job file (checked_job_file) with this validation: what the
    backup or the copy would refuse at run time fails the deploy instead."""
    job_file = dict({"job": "pg", "kind": "postgres", "source": PG_SOURCE, "storage": RESTIC_STORAGE}, **extra)
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_mapping(job_file)
    # the same file in the archive format, with no restic backups left (the copy's re-encryption,
    # recipients allowed; files is a kind of its own)
    archive = {key: value for key, value in RESTIC_STORAGE.items() if not key.startswith("restic_password")}
    JobConfig.from_mapping(dict(job_file, storage=dict(archive, format="archive")))


def test_a_job_moved_back_to_archives_keeps_the_copy_rules_of_its_restic_backups():
    """Review finding: a job moved back to archives whose storage still names the password (restic
    backups left, job_restic_history) deployed with copy.reencrypt, and every copy run then failed."""
    recipient = "age1etc26wlxxt4j036z56xzvhtp4l3jkfn6xmfmz98l7f2h8yygsexq8n5cfe"
    job_file = {"job": "pg", "kind": "postgres", "source": PG_SOURCE, "storage": dict(RESTIC_STORAGE, format="archive"),
                "encryption": {"recipients": [recipient]},
                "copy": {"destination": {"backend": "filesystem", "path": "/copy"},
                         "reencrypt": {"recipients": [recipient], "identity_file": "/keys/identity"}}}
    with pytest.raises(ConfigError, match="copy.reencrypt cannot apply to backups in the restic format"):
        JobConfig.from_mapping(job_file)
    del job_file["copy"]["reencrypt"]
    JobConfig.from_mapping(job_file)


def test_a_restic_job_file_may_carry_the_identity_for_its_archive_history():
    """A drill's job file: age decryption identity (archives from before the switch), no recipients."""
    config = JobConfig.from_mapping({"job": "pg", "kind": "postgres", "source": PG_SOURCE, "storage": RESTIC_STORAGE,
                                     "encryption": {"enabled": False, "identity_file": "/keys/identity"}})
    assert config.encrypted is False


def test_the_manifest_of_several_streams():
    streams = [("globals.sql", {"snapshot_id": SNAP_A, "size": 10, "sha256": "1" * 64, "data_added": 5,
                                "total_bytes_processed": 10, "paths": ["/globals.sql"]}),
               ("database.dump", {"snapshot_id": SNAP_B, "size": 20, "sha256": "2" * 64, "data_added": 7,
                                  "total_bytes_processed": 20, "paths": ["/database.dump"]})]
    manifest = rs.build_streams_manifest("20240101T000000Z-abcd", "pg", "postgres", "2024-01-01T00:00:00Z",
                                         "2024-01-01T00:00:01Z", streams, {"id": "r" * 64, "version": 2},
                                         {"restic": "0.14.0"}, {})
    assert manifest["size_bytes"] == 30 and manifest["restic"]["data_added"] == 12
    assert rs.manifest_snapshots(manifest) == [SNAP_A, SNAP_B]
    assert resticstore.is_restic(manifest) and manifest["encryption"] == {"mode": "restic"}
    manifest["objects"][0]["restic_snapshot"] = "nope"
    with pytest.raises(IntegrityError):
        rs.manifest_snapshots(manifest)
    assert rs.manifest_snapshots({"objects": []}) == []


@pytest.mark.parametrize("value", ["50", "x", "%", "1/", "-5%", ""])
def test_a_read_data_subset_restic_would_refuse_is_refused_with_the_options(tmp_path, value):
    # Review finding: "50" was accepted, backups ran with it, and only the verification failed.
    with pytest.raises(ConfigError, match="restic_read_data_subset"):
        storage_options({"backend": "filesystem", "path": str(tmp_path), "format": "restic",
                         "restic_password": "pw", "restic_read_data_subset": value})


@pytest.mark.parametrize("value", ["all", "50%", "2.5%", "1/5", "500M"])
def test_the_read_data_subsets_restic_accepts(tmp_path, value):
    options = storage_options({"backend": "filesystem", "path": str(tmp_path), "format": "restic",
                               "restic_password": "pw", "restic_read_data_subset": value})
    assert options["restic_read_data_subset"] == value


def test_keys_of_an_init_killed_before_its_config_are_dropped_once_old(tmp_path):
    """A copy killed between restic init's key and config left a key no config belongs to: dropped
    before the next init once older than ABANDONED_KEY_SECONDS; a young one (an init running now)
    and the keys of a repository with a config stay."""
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path)})
    keys = tmp_path / "_restic" / "job" / "keys"
    keys.mkdir(parents=True)
    old, young = keys / ("a" * 64), keys / ("b" * 64)
    old.write_bytes(b"old")
    young.write_bytes(b"young")
    moment = time.time() - resticstore.ABANDONED_KEY_SECONDS - 60
    os.utime(old, (moment, moment))
    resticstore._drop_abandoned_keys(storage, "_restic/job/")  # pylint: disable=protected-access
    assert not old.exists() and young.exists()
    (tmp_path / "_restic" / "job" / "config").write_bytes(b"config")
    os.utime(young, (moment, moment))
    resticstore._drop_abandoned_keys(storage, "_restic/job/")  # pylint: disable=protected-access
    assert young.exists()
