# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The pure decisions of engine/offsite.py: what to copy, in which order, and the lag."""

import datetime

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine import offsite
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError, NotFoundError

UTC = datetime.timezone.utc


def manifest(backup_id, minute, parent=None, size=10):
    return mf.build(
        backup_id=backup_id, job="j", kind="files",
        started_at="2024-01-01T00:%02d:00Z" % minute, finished_at="2024-01-01T00:%02d:30Z" % minute,
        objects=[{"name": "files.tar.zst", "payload": "files.tar", "size": size, "sha256": "a" * 64}],
        compression={"algorithm": "zstd", "level": 3}, encryption={"mode": "none"},
        tool_versions={}, stats={}, parent=parent)


FULL = manifest("20240101T000100Z-aaaaaa", 1)
INC1 = manifest("20240101T000200Z-bbbbbb", 2, parent=FULL["id"])
INC2 = manifest("20240101T000300Z-cccccc", 3, parent=INC1["id"])
OTHER = manifest("20240101T000400Z-dddddd", 4)
NEWEST_FIRST = [OTHER, INC2, INC1, FULL]


def test_selection_is_oldest_first_and_brings_the_chain():
    assert offsite.select_sources(NEWEST_FIRST) == [FULL, INC1, INC2, OTHER]
    assert offsite.select_sources(NEWEST_FIRST, INC2["id"]) == [FULL, INC1, INC2]
    assert offsite.select_sources(NEWEST_FIRST, "latest") == [OTHER]
    with pytest.raises(NotFoundError):
        offsite.select_sources(NEWEST_FIRST, "20990101T000000Z-eeeeee")
    with pytest.raises(ConfigError):
        offsite.select_sources(NEWEST_FIRST, "yesterday")


def test_plan_by_catalog_and_listing():
    key = "j/%s/files.tar.zst" % FULL["id"]
    assert offsite.plan_backup(FULL, None, {})[0] == "copy"
    assert offsite.plan_backup(FULL, dict(FULL), {key: 10}) == (None, None)
    assert offsite.plan_backup(FULL, dict(FULL), {})[0] == "repair"
    action, reason = offsite.plan_backup(FULL, dict(FULL), {key: 9})
    assert action == "repair" and "9 bytes" in reason
    assert offsite.plan_backup(FULL, manifest(FULL["id"], 1, size=11), {key: 11})[0] == "repair"


def test_copied_manifest_records_origin_and_stays_valid():
    listed = dict(FULL, verification={"result": "ok"})
    copied = offsite.copied_manifest(listed, {"backend": "s3", "bucket": "b"},
                                     datetime.datetime(2024, 2, 1, tzinfo=UTC))
    assert "verification" not in copied
    assert copied["copied_from"]["storage"] == {"backend": "s3", "bucket": "b"}
    assert copied["copied_from"]["copied_at"] == "2024-02-01T00:00:00Z"
    assert mf.loads(mf.dumps(copied)) == copied
    assert offsite.same_backup(FULL, copied)


def test_lag_is_the_age_of_the_oldest_backup_not_copied():
    now = datetime.datetime(2024, 1, 1, 1, 0, 0, tzinfo=UTC)
    assert offsite.copy_lag_seconds(NEWEST_FIRST, {m["id"] for m in NEWEST_FIRST}, now) == 0
    assert offsite.copy_lag_seconds(NEWEST_FIRST, {FULL["id"], INC1["id"]}, now) == 3600 - 210
    assert offsite.copy_lag_seconds(NEWEST_FIRST, set(), now) == 3600 - 90


def test_recheck_is_checked():
    with pytest.raises(ConfigError):
        offsite.Copier(None, None, "j", recheck="sometimes")


def test_require_copy_keeps_what_the_copy_lacks_and_its_parents():
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import prune
    now = datetime.datetime(2024, 1, 2, tzinfo=UTC)
    everything = [dict(m, verification=None) for m in NEWEST_FIRST]
    plain = prune.plan(everything, {"keep_last": 1}, now=now)
    assert [e["id"] for e in plain["keep"]] == [OTHER["id"]]
    guarded = prune.plan(everything, {"keep_last": 1}, now=now, copied={OTHER["id"], FULL["id"]})
    kept = {e["id"]: e["reasons"] for e in guarded["keep"]}
    assert set(kept) == {OTHER["id"], INC2["id"], INC1["id"], FULL["id"]}
    assert prune.REASON_NOT_COPIED in kept[INC2["id"]]
    assert prune.REASON_PARENT % INC1["id"] in kept[FULL["id"]]
    copied_all = prune.plan(everything, {"keep_last": 1}, now=now, copied={m["id"] for m in NEWEST_FIRST})
    assert copied_all["keep"] == plain["keep"]
    # A backup whose verification failed is not protected: it would never be copied.
    bad = [dict(m, verification={"result": "failed", "verified_at": "2024-01-01T00:00:00Z"})
           if m["id"] == INC2["id"] else m for m in everything]
    assert INC2["id"] not in {e["id"] for e in prune.plan(bad, {"keep_last": 1}, now=now, copied=set())["keep"]}


def test_wal_wanted_reads_odd_stats_as_a_file_worth_copying():
    # Stats that are not an object (manifest.json may hold any JSON there) say nothing about
    # the WAL file: it is copied rather than the copy stopping on it.
    wal = dict(manifest("20240101T000500Z-eeeeee", 5), kind="postgres_wal", stats="segment")
    assert offsite.wal_wanted(wal, [(1, 10)])
    needed = dict(wal, stats={"type": "segment", "file": "000000010000000000000003"})
    assert not offsite.wal_wanted(needed, [(1, 10)])
    assert offsite.wal_wanted(dict(wal, stats={"type": "segment", "file": "000000010000000000000010"}), [(1, 10)])
