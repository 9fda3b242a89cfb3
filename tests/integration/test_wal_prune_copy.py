# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``require_copy`` and PostgreSQL WAL: pruning a ``postgres_base`` job prunes its ``<job>-wal``
job, and under ``require_copy`` a WAL file goes only once the copy location holds it.

The archive (base backups and WAL files) is written through the real pipeline into real
storage (SeaweedFS for the runner, a filesystem for the module) with stand-in payloads: what
is under test is which objects go, and that needs no PostgreSQL (the WAL of a real server, and a
point-in-time restore from the copy: tests/integration/test_postgres_pitr.py). A copy of the base
job copies its WAL job with it; a copy run naming ``<job>-wal`` copies single WAL files.
"""

import io
import json
import os
import subprocess
import sys
import time
import uuid

import yaml

from ansible_collections.biometrics.backup.plugins.module_utils.engine import pgwal
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.verify import verify

from modules_helpers import ansible_playbook

from .offsite_helpers import offsite_s3  # noqa: F401  pylint: disable=unused-import  # a fixture

RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FQCN = "biometrics.backup."
POLICY = {"keep_last": 2, "semantics": "restic"}


class _StandIn(Source):
    """A source that emits a few bytes and reports the stats a real base backup / WAL file has."""

    def __init__(self, kind, name, stats):
        super().__init__({})
        self.kind = kind
        self.name = name
        self.stats = stats

    def produce(self, emit, context):
        emit(self.name, io.BytesIO(os.urandom(256)))
        return dict(self.stats)


def _archive(storage, job):
    """Base backups starting at segments 2, 5 and 8 of timeline 1 and WAL segments 1..9.
    Returns (base manifests, {segno: WAL manifest})."""
    return _bases(storage, job), _wal(storage, job)


def _bases(storage, job, starts=(2, 5, 8)):
    wal_job = "%s-wal" % job
    bases = []
    for index, segno in enumerate(starts):
        if index:
            time.sleep(1.05)  # whole-second backup times: otherwise which base backup is oldest is a draw
        name = pgwal.segment_name(1, segno)
        bases.append(BackupRun(job, _StandIn("postgres_base", "base.tar", {
            "timeline": 1, "wal_job": wal_job, "wal_start": name, "wal_end": name, "segment_size": 16 << 20,
            "start_lsn": pgwal.format_lsn(pgwal.segment_start_lsn(segno))}), storage).run())
    return bases


def _wal(storage, job, segnos=range(1, 10)):
    wal_job = "%s-wal" % job
    wal = {}
    for segno in segnos:
        name = pgwal.segment_name(1, segno)
        wal[segno] = BackupRun(wal_job, _StandIn("postgres_wal", name, {
            "file": name, "type": "segment", "timeline": 1, "segno": segno}), storage).run()
    return wal


def _stored_wal(storage, wal_job):
    return sorted(m["stats"]["segno"] for m in Catalog(storage).scan(wal_job, with_orphans=False))


def _run(command, config, *extra, env=None):
    argv = [sys.executable, "-m", RUNNER, command, "--config", str(config)] + list(extra)
    environ = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"), **(env or {}))
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
                          timeout=600, cwd="/", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


def test_runner_prunes_wal_only_once_copied(tmp_path, s3_server, offsite_s3):
    job = "pg-%s" % uuid.uuid4().hex[:6]
    wal_job = "%s-wal" % job
    source_options = s3_server.storage_options(prefix="primary-%s" % uuid.uuid4().hex[:6])
    source = open_storage(dict(source_options))
    bases = _bases(source, job)
    destination = dict(offsite_s3.storage_options(prefix="offsite-%s" % uuid.uuid4().hex[:6]))
    for key in ("access_key", "secret_key"):
        (tmp_path / ("offsite-" + key)).write_text(destination.pop(key) + "\n")
        destination[key + "_file"] = str(tmp_path / ("offsite-" + key))
    storage = dict(source_options, access_key_env="SRC_S3_ACCESS", secret_key_env="SRC_S3_SECRET")
    env = {"SRC_S3_ACCESS": storage.pop("access_key"), "SRC_S3_SECRET": storage.pop("secret_key")}
    common = {"kind": "postgres_base", "source": {"host": "127.0.0.1", "user": "postgres"}, "storage": storage,
              "copy": {"destination": destination}}
    base_config = tmp_path / "base.yaml"
    base_config.write_text(yaml.safe_dump(dict(common, job=job, retention=dict(POLICY, require_copy=True))))
    wal_config = tmp_path / "wal.yaml"
    wal_config.write_text(yaml.safe_dump(dict(common, job=wal_job)))

    # The base backups are copied before any WAL is stored: the oldest base backup goes, no WAL does.
    _run("copy", base_config, env=env)
    wal = _wal(source, job)
    result, log = _run("prune", base_config, env=env)
    assert result["deleted"] == [bases[0]["id"]]
    assert result["wal"][0]["keep_from"][0] == pgwal.segment_name(1, 5)
    assert result["wal"][0]["prune"] == [] and result["counts"]["wal_kept"] == 9
    assert "and 0 WAL files held by" in log
    assert _stored_wal(source, wal_job) == list(range(1, 10))

    # WAL 1 and 3 copied: exactly they go; 2 and 4 (not copied) and 5.. (needed) stay.
    for segno in (1, 3):
        _run("copy", wal_config, "--backup", wal[segno]["id"], env=env)
    preview, dummy = _run("prune", base_config, "--check", env=env)
    assert [e["file"] for e in preview["wal"][0]["prune"]] == [pgwal.segment_name(1, n) for n in (1, 3)]
    assert _stored_wal(source, wal_job) == list(range(1, 10)), "check mode deletes nothing"
    result, log = _run("prune", base_config, env=env)
    assert result["wal"][0]["deleted"] == [wal[1]["id"], wal[3]["id"]] and result["counts"]["wal_pruned"] == 2
    assert "and 2 WAL files held by" in log
    assert _stored_wal(source, wal_job) == [2] + list(range(4, 10))

    # A copy of the base job copies its WAL job too: the rest of what no kept base backup needs
    # goes, nothing after it.
    copied, log = _run("copy", base_config, env=env)
    assert copied["wal"][0]["job"] == wal_job and copied["wal"][0]["ok"]
    assert sorted(e["id"] for e in copied["wal"][0]["copied"]) == sorted(wal[n]["id"] for n in (2, 4, 5, 6, 7, 8, 9))
    assert "WAL job %s: 7 files copied" % wal_job in log
    result, dummy = _run("prune", base_config, env=env)
    assert [e["file"] for e in result["wal"][0]["prune"]] == [pgwal.segment_name(1, n) for n in (2, 4)]
    assert _stored_wal(source, wal_job) == list(range(5, 10))
    assert [m["id"] for m in Catalog(source).scan(job, with_orphans=False)] == [bases[2]["id"], bases[1]["id"]]


def test_backup_prune_module_prunes_wal_only_once_copied(tmp_path):
    job, wal_job = "app-db", "app-db-wal"
    primary = {"backend": "filesystem", "path": str(tmp_path / "primary")}
    offsite = {"backend": "filesystem", "path": str(tmp_path / "offsite")}
    storage = open_storage(primary)
    bases = _bases(storage, job)
    proc, dummy = ansible_playbook(tmp_path, [
        {"name": "copy base backups", FQCN + "backup_copy": {"job": job, "storage": primary, "destination": offsite}},
    ])
    assert proc.returncode == 0, proc.stdout[-3000:]
    wal = _wal(storage, job)  # stored after the base backups were copied
    guarded = dict(POLICY, job=job, storage=primary, require_copy=offsite)
    proc, results = ansible_playbook(tmp_path, [
        {"name": "prune, WAL not copied", FQCN + "backup_prune": guarded},
        {"name": "copy WAL 2", FQCN + "backup_copy": {"job": wal_job, "storage": primary, "destination": offsite,
                                                      "backup": wal[2]["id"]}},
        {"name": "preview", FQCN + "backup_prune": guarded, "check_mode": True},
        {"name": "prune, WAL 2 copied", FQCN + "backup_prune": guarded},
        {"name": "copy WAL", FQCN + "backup_copy": {"job": job, "storage": primary, "destination": offsite}},
        {"name": "prune, WAL copied", FQCN + "backup_prune": guarded},
        {"name": "again", FQCN + "backup_prune": guarded},
    ], diff=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    first = results["prune, WAL not copied"]
    assert first["deleted"] == [bases[0]["id"]]
    assert first["wal"][0]["job"] == wal_job and first["wal"][0]["prune"] == []
    assert first["wal"][0]["kept"] == 9 and first["counts"]["wal_pruned"] == 0
    preview = results["preview"]
    assert preview["changed"] and [e["file"] for e in preview["wal"][0]["prune"]] == [pgwal.segment_name(1, 2)]
    assert preview["wal"][0]["deleted"] == []
    assert "wal %s: 1 files, %s" % (wal_job, pgwal.segment_name(1, 2)) in preview["diff"]["before"]
    assert "wal %s: 8 files kept from %s on" % (wal_job, pgwal.segment_name(1, 5)) in preview["diff"]["after"]
    assert results["prune, WAL 2 copied"]["wal"][0]["deleted"] == [wal[2]["id"]]
    last = results["prune, WAL copied"]
    assert last["changed"] and [e["file"] for e in last["wal"][0]["prune"]] == [
        pgwal.segment_name(1, n) for n in (1, 3, 4)]
    assert results["copy WAL"]["changed"] and len(results["copy WAL"]["wal"][0]["copied"]) == 8
    assert not results["again"]["changed"] and results["again"]["counts"]["wal_pruned"] == 0
    assert _stored_wal(storage, wal_job) == list(range(5, 10))


def test_runner_copies_the_wal_the_destination_needs(tmp_path, s3_server, offsite_s3):
    """``runner copy`` of a postgres_base job copies its WAL job to the same destination, verified;
    with ``copy.retention`` only the WAL the base backups kept there need; idempotent; check mode
    lists the WAL; ``prune --destination`` prunes the WAL there and the next copy leaves it out."""
    job = "pg-%s" % uuid.uuid4().hex[:6]
    wal_job = "%s-wal" % job
    source_options = s3_server.storage_options(prefix="primary-%s" % uuid.uuid4().hex[:6])
    source = open_storage(dict(source_options))
    bases, wal = _archive(source, job)
    destination_options = offsite_s3.storage_options(prefix="offsite-%s" % uuid.uuid4().hex[:6])
    destination = open_storage(dict(destination_options))
    storage = dict(source_options, access_key_env="SRC_S3_ACCESS", secret_key_env="SRC_S3_SECRET")
    env = {"SRC_S3_ACCESS": storage.pop("access_key"), "SRC_S3_SECRET": storage.pop("secret_key")}
    for key in ("access_key", "secret_key"):
        (tmp_path / ("offsite-" + key)).write_text(destination_options.pop(key) + "\n")
        destination_options[key + "_file"] = str(tmp_path / ("offsite-" + key))
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({
        "job": job, "kind": "postgres_base", "source": {"host": "127.0.0.1", "user": "postgres"}, "storage": storage,
        "copy": {"destination": destination_options, "retention": dict(POLICY, min_keep=1)}}))

    # keep_last 2 at the destination: bases 5 and 8 go there, and the WAL from segment 5 on.
    preview, log = _run("copy", config, "--check", env=env)
    assert preview["not_wanted"] == [bases[0]["id"]]
    assert [e["id"] for e in preview["wal"][0]["planned"]] == [wal[n]["id"] for n in range(5, 10)]
    assert preview["wal"][0]["not_wanted"] == 4 and preview["wal"][0]["copied"] == []
    assert "WAL job %s: 5 files to copy" % wal_job in log
    assert _stored_wal(destination, wal_job) == [], "check mode writes nothing"

    result, log = _run("copy", config, env=env)
    assert result["ok"] and result["changed"]
    assert [e["id"] for e in result["wal"][0]["copied"]] == [wal[n]["id"] for n in range(5, 10)]
    assert result["wal"][0]["bytes_copied"] > 0 and result["wal"][0]["failed"] == []
    assert _stored_wal(destination, wal_job) == list(range(5, 10))
    held = Catalog(destination).scan(wal_job, with_orphans=False)
    assert all(m["copied_from"]["storage"]["prefix"] == source_options["prefix"] for m in held)
    # Verified at the destination: every object read back, size and SHA-256 as the manifest says.
    verified = verify(destination, wal_job, backup="all", record=False)
    assert verified["ok"] and verified["verified"] == 5, verified

    again, log = _run("copy", config, env=env)
    assert not again["changed"] and again["wal"][0]["in_sync"] == 5 and again["wal"][0]["copied"] == []

    # A new base backup from segment 9 on: copied, and prune --destination then removes base 5
    # and WAL 5..8 at the destination (base 8 needs 8: it stays); the next copy does not bring them back.
    newest = _bases(source, job, starts=(9,))[0]
    more = _wal(source, job, segnos=(10,))
    result, dummy = _run("copy", config, env=env)
    assert [e["id"] for e in result["copied"]] == [newest["id"]]
    assert [e["id"] for e in result["wal"][0]["copied"]] == [more[10]["id"]]
    pruned, log = _run("prune", config, "--destination", env=env)
    assert pruned["deleted"] == [bases[1]["id"]]
    assert [e["file"] for e in pruned["wal"][0]["prune"]] == [pgwal.segment_name(1, n) for n in (5, 6, 7)]
    assert "and 3 WAL files" in log
    assert _stored_wal(destination, wal_job) == [8, 9, 10]
    last, dummy = _run("copy", config, env=env)
    assert not last["changed"] and last["wal"][0]["not_wanted"] == 7 and last["wal"][0]["in_sync"] == 3
    assert _stored_wal(destination, wal_job) == [8, 9, 10]
