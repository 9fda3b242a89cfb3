# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore and verify orchestration (engine/restore.py, engine/verify.py) on real storage.

Backups are taken with the real BackupRun through the real pipeline (zstd/gzip, age via
pyrage) into a filesystem location; the kind is the tiny blob kind of restore_helpers.
"""

import os
import time

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import verify as vf
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, NotFoundError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

from restore_helpers import BlobSource, DirTarget, digest, tree_state

JOB = "blobs"
TAKEN = []


def take(storage, payloads, encryption=None, compression=None, incremental=False, job=JOB):
    # Manifest times have whole seconds: successive backups in one test must not share one.
    while TAKEN and int(time.time()) == TAKEN[-1]:
        time.sleep(0.05)
    TAKEN.append(int(time.time()))
    source = BlobSource({"payloads": payloads, "incremental": incremental})
    return BackupRun(job, source, storage, compression=compression, encryption=encryption).run()


@pytest.fixture
def storage(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


@pytest.fixture
def key():
    identity = x25519.Identity.generate()
    return {"identity": str(identity), "recipient": str(identity.to_public())}


ENCRYPTIONS = ["none", "recipients", "passphrase"]
COMPRESSIONS = ["none", "gzip", "zstd"]


def encryption_pair(mode, key):
    """(options for the backup, keyword arguments for reading it back)"""
    if mode == "recipients":
        return {"recipients": [key["recipient"]]}, {"identity": key["identity"]}
    if mode == "passphrase":
        return {"passphrase": "correct horse battery"}, {"passphrase": "correct horse battery"}
    return None, {}


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("mode", ENCRYPTIONS)
def test_round_trip_restores_every_payload_and_reports_what_was_compared(storage, tmp_path, key, mode, compression):
    payloads = {"a.bin": os.urandom(300_000), "b.txt": b"hello\n" * 5000}
    write, read = encryption_pair(mode, key)
    manifest = take(storage, payloads, encryption=write, compression={"algorithm": compression})
    target = DirTarget({"path": str(tmp_path / "out")})
    report = rs.restore(storage, JOB, target, backup="latest", **read)
    assert target.calls == ["preflight", "restore"]
    for name, data in payloads.items():
        with open(tmp_path / "out" / name, "rb") as handle:
            assert handle.read() == data
    assert report["backup_id"] == manifest["id"]
    assert report["changed"] is True
    verification = report["verification"]
    assert verification["objects"] == len(manifest["objects"])
    assert verification["stored_bytes"] == manifest["size_bytes"]
    assert verification["plain_bytes"] == sum(len(d) for d in payloads.values())
    assert [c["ok"] for c in report["checks"]] == [True, True]
    assert report["duration_seconds"] >= report["verify_seconds"] >= 0
    assert_phases(report["phases"])
    assert report["phases"]["total"] == report["duration_seconds"]


def assert_phases(phases):
    """Every phase of engine/restore.py's RestoreClock, each >= 0, their sum at most the total."""
    assert list(phases) == list(rs.PHASES) + ["total"]
    assert all(value >= 0 for value in phases.values()), phases
    assert sum(phases[name] for name in rs.PHASES) <= phases["total"] + 1e-9, phases


def test_progress_counts_both_passes_up_to_the_recorded_plaintext(storage, tmp_path):
    payloads = {"a.bin": os.urandom(3 << 20), "b.bin": os.urandom(1 << 20)}
    take(storage, payloads, compression={"algorithm": "zstd"})
    lines = []
    report = rs.restore(storage, JOB, DirTarget({"path": str(tmp_path / "out")}),
                        progress=lambda *line: lines.append(line), progress_interval=0)
    total = sum(len(data) for data in payloads.values())
    for phase in ("verify", "restore"):
        done = [line[1] for line in lines if line[0] == phase]
        assert done and done == sorted(done) and done[-1] == total, (phase, done)
        assert {line[2] for line in lines if line[0] == phase} == {total}
        assert all(line[3] >= 0 for line in lines if line[0] == phase)
    assert [line[0] for line in lines] == sorted((line[0] for line in lines), key=["verify", "restore"].index)
    assert_phases(report["phases"])


def test_phases_follow_the_boundaries_and_add_up_to_at_most_the_total():
    clock = rs.RestoreClock()
    assert clock.phases()["select"] == 0
    clock.mark("select")
    clock.mark("verify")
    clock.mark("checks")   # no payload was opened: prepare, transfer and load take no time
    phases = clock.phases()
    assert phases["prepare"] == phases["transfer"] == phases["load"] == 0
    assert_phases(phases)
    late = rs.RestoreClock()
    late.mark("load")     # a boundary passed before an earlier one never makes a phase negative
    late.mark("verify")
    assert_phases(late.phases())


def test_check_mode_verifies_and_writes_nothing(storage, tmp_path, key):
    write, read = encryption_pair("recipients", key)
    manifest = take(storage, {"x": b"payload" * 1000}, encryption=write)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("existing data")
    before = tree_state(str(out))
    target = DirTarget({"path": str(out)})
    report = rs.restore(storage, JOB, target, check_mode=True, **read)
    assert target.calls == ["preflight"]
    assert report["check_mode"] is True and report["changed"] is False
    assert manifest["id"] in report["plan"] and str(out) in report["plan"]
    assert report["verification"]["objects"] == 1
    assert tree_state(str(out)) == before


def test_check_mode_still_refuses_a_corrupted_backup(storage, tmp_path):
    manifest = take(storage, {"x": os.urandom(5000)})
    path = str(tmp_path / "store" / JOB / manifest["id"] / manifest["objects"][0]["name"])
    with open(path, "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    target = DirTarget({"path": str(tmp_path / "out")})
    with pytest.raises(IntegrityError, match="SHA-256"):
        rs.restore(storage, JOB, target, check_mode=True)
    assert target.calls == []


def test_selection_by_id_time_and_point_in_time(storage, tmp_path):
    first = take(storage, {"v": b"one"})
    second = take(storage, {"v": b"two"})
    assert first["id"] != second["id"]

    def restored(**selection):
        out = tmp_path / ("out-%d" % len(os.listdir(tmp_path)))
        report = rs.restore(storage, JOB, DirTarget({"path": str(out)}), **selection)
        return report, (out / "v").read_bytes()

    report, data = restored(backup=first["id"])
    assert (report["selected_by"], data) == ("id", b"one")
    report, data = restored(backup="latest")
    assert (report["selected_by"], report["backup_id"], data) == ("latest", second["id"], b"two")
    report, data = restored(point_in_time=second["finished_at"])
    assert (report["selected_by"], report["backup_id"]) == ("point_in_time", second["id"])
    report, data = restored(backup=second["finished_at"])
    assert report["selected_by"] == "time" and report["backup_id"] == second["id"]
    with pytest.raises(NotFoundError, match="at or before 2001"):
        restored(point_in_time="2001-01-01T00:00:00Z")
    with pytest.raises(NotFoundError, match="no complete backup with id"):
        restored(backup="20010101T000000Z-abcdef")
    with pytest.raises(ConfigError, match="not both"):
        restored(backup="latest", point_in_time=second["finished_at"])
    with pytest.raises(ConfigError, match="not an ISO-8601"):
        restored(point_in_time="yesterday")


def test_incremental_chain_is_verified_and_restored_from_the_full(storage, tmp_path, key):
    write, read = encryption_pair("passphrase", key)
    full = take(storage, {"base": b"full data" * 100, "delta": b"v1"}, encryption=write)
    incr = take(storage, {"base": b"full data" * 100, "delta": b"v2"}, encryption=write, incremental=True)
    assert incr["parent"] == full["id"]
    target = DirTarget({"path": str(tmp_path / "out")})
    report = rs.restore(storage, JOB, target, backup=incr["id"], **read)
    assert report["chain"] == [full["id"], incr["id"]]
    assert report["verification"]["backups"] == [full["id"], incr["id"]]
    # Two backups with a key envelope and two payloads each.
    assert report["verification"]["objects"] == 6
    assert (tmp_path / "out" / "delta").read_bytes() == b"v2"


def test_incremental_with_a_corrupted_full_is_refused(storage, tmp_path):
    full = take(storage, {"delta": b"v1" * 1000})
    take(storage, {"delta": b"v2" * 1000}, incremental=True)
    victim = str(tmp_path / "store" / JOB / full["id"] / full["objects"][0]["name"])
    with open(victim, "ab") as handle:
        handle.write(b"x")
    target = DirTarget({"path": str(tmp_path / "out")})
    with pytest.raises(IntegrityError, match="truncated or replaced"):
        rs.restore(storage, JOB, target)
    assert target.calls == [] and not (tmp_path / "out").exists()


def test_kind_mismatch_is_a_config_error(storage, tmp_path):
    take(storage, {"v": b"x"})

    class OtherTarget(DirTarget):
        kind = "postgres"

    with pytest.raises(ConfigError, match="is a blob backup; the target restores postgres"):
        rs.restore(storage, JOB, OtherTarget({"path": str(tmp_path / "o")}))


def test_verify_records_result_that_the_catalog_lists(storage, key):
    write, read = encryption_pair("recipients", key)
    older = take(storage, {"v": b"1" * 10000}, encryption=write)
    newer = take(storage, {"v": b"2" * 10000}, encryption=write)
    outcome = vf.verify(storage, JOB, backup="all", **read)
    assert outcome["ok"] and outcome["verified"] == 2 and outcome["changed"]
    listed = {m["id"]: m["verification"] for m in Catalog(storage).scan(JOB)}
    assert set(listed) == {older["id"], newer["id"]}
    for record in listed.values():
        assert record["result"] == "ok" and record["objects"] == 1 and record["test_restore"] is False
        assert record["verified_at"].endswith("Z")


def test_verify_with_test_restore_runs_the_scratch_target_checks(storage, key):
    write, read = encryption_pair("passphrase", key)
    manifest = take(storage, {"a": b"alpha" * 999, "b": b"beta"}, encryption=write)
    outcome = vf.verify(storage, JOB, backup=manifest["id"], test_restore=True, target_class=DirTarget, **read)
    result = outcome["results"][0]
    assert result["result"] == "ok", result
    assert [c["what"] for c in result["checks"]] == ["payload a", "payload b"]
    assert all(c["ok"] for c in result["checks"])
    assert Catalog(storage).get(JOB, manifest["id"])["verification"]["test_restore"] is True
    assert_phases(result["phases"])
    assert result["phases"]["transfer"] >= 0 and result["phases"]["total"] <= result["duration_seconds"]


def test_verify_records_a_failure_but_not_a_wrong_key(storage, tmp_path, key):
    write, read = encryption_pair("recipients", key)
    manifest = take(storage, {"v": os.urandom(20000)}, encryption=write)
    stranger = str(x25519.Identity.generate())
    outcome = vf.verify(storage, JOB, identity=stranger)
    assert outcome["errors"] == 1 and not outcome["ok"] and not outcome["changed"]
    assert "not a recipient" in outcome["results"][0]["error"]
    assert Catalog(storage).get(JOB, manifest["id"])["verification"] is None

    victim = str(tmp_path / "store" / JOB / manifest["id"] / manifest["objects"][0]["name"])
    with open(victim, "r+b") as handle:
        handle.truncate(1000)
    outcome = vf.verify(storage, JOB, **read)
    assert outcome["failed"] == 1 and not outcome["ok"]
    record = Catalog(storage).get(JOB, manifest["id"])["verification"]
    assert record["result"] == "failed" and "truncated" in record["error"]


def test_verify_without_recording_leaves_storage_untouched(storage, tmp_path):
    take(storage, {"v": b"data"})
    before = tree_state(str(tmp_path / "store"))
    outcome = vf.verify(storage, JOB, record=False)
    assert outcome["ok"] and not outcome["changed"]
    assert tree_state(str(tmp_path / "store")) == before


def test_verify_of_an_empty_job_says_so(storage):
    # An existing location without backups of the job (a missing location is an error of its
    # own: tests/integration/test_storage_location.py).
    os.makedirs(storage.root)
    with pytest.raises(NotFoundError, match="no complete backup"):
        vf.verify(storage, JOB)
    with pytest.raises(ConfigError, match="no complete backup to verify"):
        vf.verify(storage, JOB, backup="all")


def test_restore_streams_recheck_bytes_changed_after_verification(storage, tmp_path):
    """A byte changed between the verification pass and the restore read still fails the restore."""
    manifest = take(storage, {"v": os.urandom(50000)})
    victim = str(tmp_path / "store" / JOB / manifest["id"] / manifest["objects"][0]["name"])

    class Tamper(DirTarget):
        def preflight(self, manifest):
            super().preflight(manifest)
            with open(victim, "r+b") as handle:  # after verification, before the restore reads
                handle.seek(10)
                handle.write(b"\0\0\0\0")

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_bytes(b"previous")
    before = tree_state(str(out))
    with pytest.raises(IntegrityError):
        rs.restore(storage, JOB, Tamper({"path": str(out)}))
    assert tree_state(str(out)) == before
    assert digest(b"previous") == before["old"][2]
