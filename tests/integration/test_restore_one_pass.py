# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one-pass restore path of engine/restore.py on real storage and the real pipeline.

A target that declares its payloads (``Target.one_pass_payloads``) reads each stored payload
object once: the stream it consumes is the verification. Payloads it does not declare are
verified in full before it starts; a failure inside the target is diagnosed by verifying the
whole chain. The blob kind of restore_helpers stands in for a real kind (the fault suite in
test_restore_faults.py runs every fault on this path too).
"""

import os
import time

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, ObjectMismatchError, SourceError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

from restore_helpers import BlobSource, CountingStorage, DirTarget, StagingDirTarget, tree_state

JOB = "blobs"
PAYLOADS = {"big.bin": os.urandom(300_000) + b"words " * 50_000, "small.txt": b"small\n"}
TAKEN = []


def take(storage, payloads, encryption=None, incremental=False):
    while TAKEN and int(time.time()) == TAKEN[-1]:
        time.sleep(0.05)
    TAKEN.append(int(time.time()))
    source = BlobSource({"payloads": payloads, "incremental": incremental})
    return BackupRun(JOB, source, storage, compression={"algorithm": "zstd"}, encryption=encryption).run()


@pytest.fixture
def store(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


@pytest.fixture
def key():
    return x25519.Identity.generate()


def _payload_keys(manifest):
    return ["%s/%s/%s" % (JOB, manifest["id"], obj["name"]) for obj in manifest["objects"] if obj.get("payload")]


def _flip(store, manifest, payload, offset=None):
    name = next(obj["name"] for obj in manifest["objects"] if obj.get("payload") == payload)
    path = os.path.join(store.root if hasattr(store, "root") else store.describe()["path"], JOB, manifest["id"], name)
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.seek(size // 2 if offset is None else offset)
        byte = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte ^ 0x01]))


class PartialTarget(StagingDirTarget):
    """Declares only the payloads named in ``declare``."""

    declare = ("big.bin",)

    def one_pass_payloads(self, manifest, chain):
        return {(item["id"], name) for item in chain for name in self.declare}


class FailingTarget(StagingDirTarget):
    """Declares everything, then fails before reading anything (a target's own problem)."""

    def restore(self, context):
        self.calls.append("restore")
        raise ConfigError("the destination ran out of space")


class LazyTarget(StagingDirTarget):
    """Declares every payload but reads only big.bin (breaks the promise for small.txt)."""

    def restore(self, context):
        self.calls.append("restore")
        stream = context.open_payload(context.manifest, "big.bin")
        try:
            while stream.read(65536):
                pass
            stream.finish()
        finally:
            stream.close()
        return {"changed": True, "checks": []}


def test_each_payload_object_is_read_once_and_the_report_keeps_its_shape(tmp_path, store, key):
    manifest = take(store, PAYLOADS, encryption={"recipients": [str(key.to_public())]})
    live = str(tmp_path / "live")
    two = CountingStorage(store)
    two_pass = rs.restore(two, JOB, DirTarget({"path": live}), identity=str(key))
    one = CountingStorage(store)
    one_pass = rs.restore(one, JOB, StagingDirTarget({"path": live}), identity=str(key))
    for name in _payload_keys(manifest):
        assert two.opened[name] == 2, name
        assert one.opened[name] == 1, name
    assert two_pass["verification"]["mode"] == "two-pass"
    assert one_pass["verification"]["mode"] == "one-pass"
    for field in ("backups", "objects", "stored_bytes", "plain_bytes", "details"):
        assert one_pass["verification"][field] == two_pass["verification"][field], field
    assert all(len(item["sha256"]) == 64 for item in one_pass["verification"]["details"])
    assert one_pass["checks"] and all(check["ok"] for check in one_pass["checks"])
    assert set(one_pass["phases"]) == set(two_pass["phases"])
    for name, data in PAYLOADS.items():
        with open(os.path.join(live, name), "rb") as handle:
            assert handle.read() == data


def test_verify_first_keeps_the_two_pass_path(tmp_path, store):
    manifest = take(store, PAYLOADS)
    counting = CountingStorage(store)
    target = StagingDirTarget({"path": str(tmp_path / "live")})
    report = rs.restore(counting, JOB, target, verify_first=True)
    assert report["verification"]["mode"] == "two-pass"
    assert all(counting.opened[name] == 2 for name in _payload_keys(manifest))


def test_check_mode_is_two_pass_and_writes_nothing(tmp_path, store):
    take(store, PAYLOADS)
    target = StagingDirTarget({"path": str(tmp_path / "live")})
    report = rs.restore(store, JOB, target, check_mode=True)
    assert report["verification"]["mode"] == "two-pass"
    assert report["changed"] is False and not os.path.exists(str(tmp_path / "live"))


def test_an_incremental_chain_restores_in_one_pass(tmp_path, store, key):
    encryption = {"recipients": [str(key.to_public())]}
    full = take(store, PAYLOADS, encryption=encryption)
    changed = dict(PAYLOADS, **{"small.txt": b"newer\n"})
    incr = take(store, changed, encryption=encryption, incremental=True)
    assert incr["parent"] == full["id"]
    counting = CountingStorage(store)
    report = rs.restore(counting, JOB, StagingDirTarget({"path": str(tmp_path / "live")}), identity=str(key))
    assert report["verification"]["mode"] == "one-pass"
    assert report["verification"]["backups"] == [full["id"], incr["id"]]
    assert all(counting.opened[name] == 1 for name in _payload_keys(full) + _payload_keys(incr))
    with open(str(tmp_path / "live" / "small.txt"), "rb") as handle:
        assert handle.read() == b"newer\n"


def test_an_undeclared_payload_is_verified_before_the_target_starts(tmp_path, store):
    manifest = take(store, PAYLOADS)
    _flip(store, manifest, "small.txt", offset=0)
    target = PartialTarget({"path": str(tmp_path / "live")})
    logged = []
    with pytest.raises(IntegrityError):
        rs.restore(store, JOB, target, log=logged.append)
    assert target.calls == []
    # The precheck's error is the verdict: the chain is not read again to diagnose it.
    assert logged and not any("verifying the whole backup" in line for line in logged)


def test_a_declared_payload_damaged_mid_object_is_found_in_the_target_and_nothing_is_swapped(tmp_path, store, key):
    manifest = take(store, PAYLOADS, encryption={"recipients": [str(key.to_public())]})
    live = tmp_path / "live"
    live.mkdir()
    (live / "big.bin").write_bytes(b"production")
    before = tree_state(str(live))
    _flip(store, manifest, "big.bin")
    target = StagingDirTarget({"path": str(live)})
    with pytest.raises(ObjectMismatchError, match="does not decode either"):  # as on the two-pass path
        rs.restore(store, JOB, target, identity=str(key))
    assert target.calls == ["preflight", "restore"] and not target.swapped
    assert tree_state(str(live)) == before and not os.path.exists(target.staging_path())


def test_a_target_error_on_a_good_backup_stays_the_targets_error(tmp_path, store):
    take(store, PAYLOADS)
    logged = []
    with pytest.raises(ConfigError, match="ran out of space"):
        rs.restore(store, JOB, FailingTarget({"path": str(tmp_path / "live")}), log=logged.append)
    assert any("verifying the whole backup" in line for line in logged)


def test_a_target_error_on_a_damaged_backup_becomes_the_integrity_error(tmp_path, store):
    manifest = take(store, PAYLOADS)
    _flip(store, manifest, "big.bin")
    with pytest.raises(ObjectMismatchError):
        rs.restore(store, JOB, FailingTarget({"path": str(tmp_path / "live")}))


def test_a_declared_payload_the_target_did_not_read_is_verified_afterwards(tmp_path, store):
    manifest = take(store, PAYLOADS)
    counting = CountingStorage(store)
    report = rs.restore(counting, JOB, LazyTarget({"path": str(tmp_path / "live")}))
    assert [item["payload"] for item in report["verification"]["details"]] == ["big.bin", "small.txt"]
    assert all(counting.opened[name] == 1 for name in _payload_keys(manifest))
    _flip(store, manifest, "small.txt", offset=0)
    with pytest.raises(ObjectMismatchError):
        rs.restore(store, JOB, LazyTarget({"path": str(tmp_path / "live2")}))


def test_declarations_outside_the_chain_are_ignored(tmp_path, store):
    take(store, PAYLOADS)

    class Foreign(StagingDirTarget):
        def one_pass_payloads(self, manifest, chain):
            return {("20000101T000000Z-000000", "big.bin"), (manifest["id"], "nothing.bin")}

    report = rs.restore(store, JOB, Foreign({"path": str(tmp_path / "live")}))
    assert report["verification"]["mode"] == "two-pass"


def test_a_test_restore_takes_the_path_of_a_real_restore(store, key):
    """backup_verify's test restore (and so the drill's phases, the job's expected recovery time):
    one pass into a scratch target that declares its payloads, as a real restore; a damaged
    payload is still a failed verification."""
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import verify as vf
    manifest = take(store, PAYLOADS, encryption={"recipients": [str(key.to_public())]})
    two = CountingStorage(store)
    two_pass = vf.verify(two, JOB, identity=str(key), test_restore=True, target_class=DirTarget, record=False)
    one = CountingStorage(store)
    one_pass = vf.verify(one, JOB, identity=str(key), test_restore=True, target_class=StagingDirTarget, record=False)
    for name in _payload_keys(manifest):
        assert (two.opened[name], one.opened[name]) == (2, 1), name
    first, second = two_pass["results"][0], one_pass["results"][0]
    assert (first["mode"], second["mode"]) == ("two-pass", "one-pass")
    assert first["result"] == second["result"] == "ok"
    for field in ("objects", "stored_bytes", "plain_bytes", "chain", "checks"):
        assert first[field] == second[field], field
    assert set(second["phases"]) == set(first["phases"])
    _flip(store, manifest, "big.bin")
    damaged = vf.verify(store, JOB, identity=str(key), test_restore=True, target_class=StagingDirTarget,
                        record=False)["results"][0]
    assert damaged["result"] == "failed" and "big.bin" in damaged["error"]


class SwapFailsTarget(StagingDirTarget):
    """Reads and checks every declared stream, then its swap fails (the target's own problem)."""

    def _swap(self, staging):
        raise SourceError("the destination's file system went read-only")


def test_a_failure_after_every_declared_stream_checked_out_is_not_diagnosed_again(tmp_path, store, key):
    """The backup is proven good by then: the target's error is reported as it is, and the chain
    is not read a second time (a re-read of a large backup would delay the operator's answer)."""
    manifest = take(store, PAYLOADS, encryption={"recipients": [str(key.to_public())]})
    counting = CountingStorage(store)
    with pytest.raises(SourceError, match="went read-only"):
        rs.restore(counting, JOB, SwapFailsTarget({"path": str(tmp_path / "live")}), identity=str(key))
    for name in _payload_keys(manifest):
        assert counting.opened[name] == 1, name


class NoScratchTarget(StagingDirTarget):
    """Its scratch target cannot be created (no server, no rights)."""

    @classmethod
    def scratch(cls, manifest, options):
        raise SourceError("redis-server not found")


def test_a_test_restore_without_a_scratch_target_still_fails_a_damaged_backup(store, key):
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import verify as vf
    manifest = take(store, PAYLOADS, encryption={"recipients": [str(key.to_public())]})
    with pytest.raises(SourceError, match="redis-server"):  # a good backup: the scratch's own error
        vf.verify(store, JOB, identity=str(key), test_restore=True, target_class=NoScratchTarget, record=False)
    _flip(store, manifest, "big.bin")
    result = vf.verify(store, JOB, identity=str(key), test_restore=True, target_class=NoScratchTarget,
                       record=False)["results"][0]
    assert result["result"] == "failed" and "big.bin" in result["error"]
