# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Partial WAL copies at a copy destination: a copy run deletes those a WAL file held there
supersedes (the complete segment, or a partial copy of the same segment reaching further), as
the stream does at the source, and does not copy a superseded one. Real manifests in two
filesystem storages; the WAL bytes are stand-ins (no PostgreSQL: see
tests/integration/test_wal_prune_copy.py for the real stream)."""

import io

from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine import pgwal
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.offsite import copy_backups
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

WAL_JOB = "db-wal"
SEG5 = pgwal.segment_name(1, 5)
SEG6 = pgwal.segment_name(1, 6)


class _Wal(Source):
    kind = "postgres_wal"

    def __init__(self, name, stats):
        super().__init__({})
        self.name = name
        self.stats = stats

    def produce(self, emit, context):
        emit(self.name, io.BytesIO(self.name.encode() * 8))
        return dict(self.stats)


def _store(storage, name, kind, end=None):
    segno = pgwal.parse_segment_name(name)[1]
    stats = {"file": name, "type": kind, "timeline": 1, "segno": segno}
    if end is not None:
        stats["end_lsn"] = pgwal.format_lsn(pgwal.segment_start_lsn(segno) + end)
    return BackupRun(WAL_JOB, _Wal(name, stats), storage).run()


def _held(storage):
    return sorted(m["id"] for m in Catalog(storage).scan(WAL_JOB, with_orphans=False))


def _locations(tmp_path):
    return (open_storage({"backend": "filesystem", "path": str(tmp_path / "source")}),
            open_storage({"backend": "filesystem", "path": str(tmp_path / "offsite")}))


def test_superseded_partials_rule():
    def wal(backup_id, name, kind, end=None):
        stats = {"file": name, "type": kind}
        if end is not None:
            stats["end_lsn"] = pgwal.format_lsn(end)
        return {"id": backup_id, "stats": stats}
    short, far, tie = wal("b", SEG6, "partial", 100), wal("a", SEG6, "partial", 200), wal("c", SEG6, "partial", 200)
    complete, its_partial = wal("d", SEG5, "segment"), wal("e", SEG5, "partial", 50)
    found = pgwal.superseded_partials([short, far, tie, complete, its_partial, wal("f", "00000002.history", "history")])
    assert [(m["id"], "complete segment" in why) for m, why in found] == [("e", True), ("b", False), ("a", False)]
    assert pgwal.superseded_partials([far]) == []


def test_copy_runs_delete_the_partials_the_destination_no_longer_needs(tmp_path):
    source, offsite = _locations(tmp_path)
    first = _store(source, SEG5, "partial", 1000)
    assert copy_backups(source, offsite, WAL_JOB)["superseded"] == []
    # The stream stores a further copy and deletes the first at the source.
    second = _store(source, SEG5, "partial", 5000)
    Catalog(source).delete_backup(first)
    outcome = copy_backups(source, offsite, WAL_JOB)
    assert [c["id"] for c in outcome["copied"]] == [second["id"]]
    assert outcome["superseded"] == [first["id"]] and outcome["changed"]
    assert _held(offsite) == [second["id"]]
    # The segment completes: its partial copy goes at the destination too; a second run is a no-op.
    segment = _store(source, SEG5, "segment")
    Catalog(source).delete_backup(second)
    assert copy_backups(source, offsite, WAL_JOB)["superseded"] == [second["id"]]
    assert _held(offsite) == [segment["id"]]
    again = copy_backups(source, offsite, WAL_JOB)
    assert again["superseded"] == [] and not again["changed"]


def test_only_files_the_destination_holds_supersede_and_check_mode_deletes_nothing(tmp_path):
    source, offsite = _locations(tmp_path)
    held = _store(source, SEG6, "partial", 100)
    copy_backups(source, offsite, WAL_JOB)
    leftover = _store(source, SEG6, "partial", 200)  # the stream failed to delete it (or not yet)
    newest = _store(source, SEG6, "partial", 300)
    # A source leftover that a file already at the destination supersedes is not copied.
    Catalog(source).delete_backup(held)
    further = _store(source, SEG6, "partial", 250)  # superseded only by newest, which is not there yet
    preview = copy_backups(source, offsite, WAL_JOB, check_mode=True)
    # (sets: the three were stored within one second, so their ids sort by their random suffix)
    assert sorted(s["id"] for s in preview["planned"]) == sorted([leftover["id"], newest["id"], further["id"]])
    assert sorted(preview["superseded"]) == sorted([held["id"], leftover["id"], further["id"]])  # after the copies
    assert _held(offsite) == [held["id"]]  # check mode wrote nothing
    outcome = copy_backups(source, offsite, WAL_JOB)
    assert sorted(outcome["superseded"]) == sorted([held["id"], leftover["id"], further["id"]])
    assert _held(offsite) == [newest["id"]]
    # At the destination now: newest (300). A source leftover below it is not copied at all.
    stale = _store(source, SEG6, "partial", 150)
    again = copy_backups(source, offsite, WAL_JOB)
    assert stale["id"] in again["not_wanted"] and not again["copied"] and _held(offsite) == [newest["id"]]


def test_a_segment_whose_copy_failed_supersedes_nothing(tmp_path):
    source, offsite = _locations(tmp_path)
    partial = _store(source, SEG5, "partial", 1000)
    copy_backups(source, offsite, WAL_JOB)
    segment = _store(source, SEG5, "segment")
    payload = [o["name"] for o in segment["objects"] if o.get("payload")][0]
    source.delete(mf.object_key(WAL_JOB, segment["id"], payload))  # listed, yet unreadable: damaged
    outcome = copy_backups(source, offsite, WAL_JOB)
    assert [f["id"] for f in outcome["failed"]] == [segment["id"]]
    assert outcome["superseded"] == [] and _held(offsite) == [partial["id"]]
