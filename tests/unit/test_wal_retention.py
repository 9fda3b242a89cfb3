# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Retention of PostgreSQL WAL (engine/prune.py ``plan_wal`` through ``prune``): pruning a
``postgres_base`` job prunes its ``<job>-wal`` job up to what the oldest kept base backup needs,
with the rails (dry run, min_keep, require_copy); a policy on the WAL job itself is refused.
Manifests are real ones in a filesystem storage (real PostgreSQL: tests/integration/test_postgres_pitr.py)."""

import datetime
import io
import itertools

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import backup as backup_module
from ansible_collections.biometrics.backup.plugins.module_utils.engine import pgwal
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.prune import prune
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

JOB = "db"
WAL_JOB = "db-wal"
POLICY = {"keep_last": 2, "semantics": "restic"}


@pytest.fixture(autouse=True)
def _a_second_between_backups(monkeypatch):
    """Backups made here follow each other within milliseconds; ids order by start time to
    1/256 s and then by chance, so a "keep the newest" test could keep the older one (a CI
    run did). Each backup starts one second after the previous one instead."""
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    ticks = itertools.count()
    monkeypatch.setattr(backup_module, "utc_now", lambda: start + datetime.timedelta(seconds=next(ticks)))


class _Fake(Source):
    def __init__(self, kind, name, stats):
        super().__init__({})
        self.kind = kind
        self.name = name
        self.stats = stats

    def produce(self, emit, context):
        emit(self.name, io.BytesIO(b"x" * 64))
        return dict(self.stats)


def _base(storage, timeline, segno):
    name = pgwal.segment_name(timeline, segno)
    return BackupRun(JOB, _Fake("postgres_base", "base.tar", {
        "timeline": timeline, "wal_job": WAL_JOB, "wal_start": name, "wal_end": name,
        "start_lsn": pgwal.format_lsn(pgwal.segment_start_lsn(segno)), "segment_size": 16 << 20}), storage).run()


def _wal(storage, timeline, segno, kind="segment"):
    name = pgwal.segment_name(timeline, segno)
    return BackupRun(WAL_JOB, _Fake("postgres_wal", name, {"file": name, "type": kind, "timeline": timeline,
                                                           "segno": segno}), storage).run()


def _files(storage):
    return sorted((m["stats"]["file"], m["stats"]["type"]) for m in Catalog(storage).scan(WAL_JOB, with_orphans=False))


@pytest.fixture
def archive(tmp_path):
    """Three base backups starting at segments 2, 5 and 8 of timeline 1, WAL 1..10 (10 partial),
    a history file and WAL 10..11 on timeline 2."""
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    bases = [_base(storage, 1, segno) for segno in (2, 5, 8)]
    for segno in range(1, 10):
        _wal(storage, 1, segno)
    _wal(storage, 1, 10, "partial")
    BackupRun(WAL_JOB, _Fake("postgres_wal", "00000002.history", {"file": "00000002.history", "type": "history",
                                                                  "timeline": 2}), storage).run()
    for segno in (10, 11):
        _wal(storage, 2, segno)
    return storage, bases


def test_wal_before_the_oldest_kept_base_goes_and_nothing_it_needs(archive):
    storage, bases = archive
    before = _files(storage)
    preview = prune(storage, JOB, POLICY, dry_run=True)
    assert _files(storage) == before, "a dry run deletes nothing"
    wal = preview["wal"][0]
    assert wal["job"] == WAL_JOB and wal["keep_from"][0] == pgwal.segment_name(1, 5)
    assert [e["file"] for e in wal["prune"]] == [pgwal.segment_name(1, n) for n in range(1, 5)]
    assert preview["counts"]["wal_pruned"] == 4 and preview["changed"] is True
    oldest_kept = next(e for e in preview["keep"] if e["id"] == bases[1]["id"])
    assert any("kept from %s on" % pgwal.segment_name(1, 5) in why for why in oldest_kept["reasons"])
    result = prune(storage, JOB, POLICY)
    assert [e["id"] for e in result["prune"]] == [bases[0]["id"]]
    assert [e["deleted"] for e in result["wal"][0]["prune"]] == [True] * 4
    after = _files(storage)
    assert after == [f for f in before if f[0] not in [pgwal.segment_name(1, n) for n in range(1, 5)]]
    assert ("00000002.history", "history") in after and (pgwal.segment_name(2, 11), "segment") in after
    # Pruning again changes nothing.
    again = prune(storage, JOB, POLICY)
    assert again["changed"] is False and again["wal"][0]["prune"] == []


def test_min_keep_and_require_copy_keep_wal(archive):
    storage, bases = archive
    # min_keep=3 keeps every base backup: every WAL file from segment 2 on stays.
    result = prune(storage, JOB, {"keep_last": 1, "semantics": "restic"}, min_keep=3, dry_run=True)
    assert [e["file"] for e in result["wal"][0]["prune"]] == [pgwal.segment_name(1, 1)]
    # require_copy with every base copied but the WAL copies not checked: no WAL goes.
    copied = {m["id"] for m in bases}
    result = prune(storage, JOB, POLICY, copied=copied, dry_run=True)
    assert result["wal"][0]["prune"] == [] and "require_copy" in result["wal"][0]["reason"]
    # With the WAL job's copies known, only WAL held offsite goes.
    wal_ids = {m["id"]: m["stats"]["file"] for m in Catalog(storage).scan(WAL_JOB, with_orphans=False)}
    offsite = {i for i, name in wal_ids.items() if name in (pgwal.segment_name(1, 1), pgwal.segment_name(1, 3))}
    result = prune(storage, JOB, POLICY, copied=copied, wal_copied=offsite, dry_run=True)
    assert [e["file"] for e in result["wal"][0]["prune"]] == [pgwal.segment_name(1, 1), pgwal.segment_name(1, 3)]


def test_a_later_timeline_base_keeps_its_timeline_only(tmp_path):
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    _base(storage, 1, 2)
    _base(storage, 2, 12)
    for segno in range(2, 11):
        _wal(storage, 1, segno)
    for segno in range(10, 14):
        _wal(storage, 2, segno)
    result = prune(storage, JOB, {"keep_last": 1})
    gone = [e["file"] for e in result["wal"][0]["prune"]]
    assert gone == [pgwal.segment_name(1, n) for n in range(2, 11)] + [pgwal.segment_name(2, n) for n in (10, 11)]
    assert _files(storage) == [(pgwal.segment_name(2, n), "segment") for n in (12, 13)]


def test_no_kept_base_backup_keeps_all_wal(tmp_path):
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    BackupRun(JOB, _Fake("postgres_base", "base.tar", {"wal_job": WAL_JOB}), storage).run()  # no WAL range
    _wal(storage, 1, 1)
    result = prune(storage, JOB, {"keep_last": 1}, dry_run=True)
    assert result["wal"][0]["prune"] == [] and "all its WAL stays" in result["wal"][0]["reason"]


def test_a_policy_on_the_wal_job_is_refused(archive):
    storage, dummy = archive
    with pytest.raises(ConfigError) as info:
        prune(storage, WAL_JOB, POLICY, dry_run=True)
    assert "not independent backups" in str(info.value) and "postgres_base" in str(info.value)


def test_jobs_without_base_backups_have_no_wal_section(tmp_path):
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})
    BackupRun("files", _Fake("files", "data", {}), storage).run()
    assert "wal" not in prune(storage, "files", {"keep_last": 1}, dry_run=True)
