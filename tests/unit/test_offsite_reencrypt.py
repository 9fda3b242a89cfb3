# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Re-encrypting offsite copies, the parts without storage: the options (engine and job file),
how a re-encrypted copy is recognised as the source's backup, and its manifest."""

import datetime
import json
import os
import subprocess
import sys
import textwrap

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine import offsite
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import JobConfig

UTC = datetime.timezone.utc
SOURCE_KEY = x25519.Identity.generate()
TEAM_KEY = x25519.Identity.generate()
TEAM = str(TEAM_KEY.to_public())


def source_manifest(encryption=None):
    objects = [{"name": "files.tar.zst.age", "payload": "files.tar", "size": 100, "sha256": "a" * 64,
                "raw_bytes": 300}]
    if encryption and encryption.get("key_object"):
        objects.insert(0, {"name": "key.age", "role": "key", "size": 10, "sha256": "b" * 64})
    return mf.build(backup_id="20240101T000100Z-aaaaaa", job="j", kind="files",
                    started_at="2024-01-01T00:01:00Z", finished_at="2024-01-01T00:01:30Z", objects=objects,
                    compression={"algorithm": "zstd", "level": 3},
                    encryption=encryption or {"mode": "age", "recipients": [str(SOURCE_KEY.to_public())]},
                    tool_versions={}, stats={"files": 2}, source={"path": "/data"})


def reencrypted(source):
    objects = [dict(source["objects"][-1], size=120, sha256="c" * 64)]
    plaintext = [{"name": objects[0]["name"], "size": 90, "sha256": "d" * 64}]
    return offsite.reencrypted_manifest(source, objects, plaintext, [TEAM], {"backend": "s3", "bucket": "b"},
                                        datetime.datetime(2024, 2, 1, tzinfo=UTC))


def test_settings_need_recipients_and_an_explicit_source_key(tmp_path):
    assert offsite.reencrypt_settings(None) is None and offsite.reencrypt_settings({}) is None
    with pytest.raises(ConfigError, match="recipients"):
        offsite.reencrypt_settings({"identity": str(SOURCE_KEY)})
    with pytest.raises(ConfigError, match="source's key must be given explicitly"):
        offsite.reencrypt_settings({"recipients": [TEAM]})
    with pytest.raises(ConfigError, match="invalid age recipient"):
        offsite.reencrypt_settings({"recipients": ["age1nope"], "identity": str(SOURCE_KEY)})
    with pytest.raises(ConfigError, match="unknown option"):
        offsite.reencrypt_settings({"recipients": [TEAM], "identity": str(SOURCE_KEY), "enabled": True})
    # The wrong half of a key pair is refused without being echoed.
    with pytest.raises(ConfigError) as caught:
        offsite.reencrypt_settings({"recipients": [str(TEAM_KEY)], "identity": str(SOURCE_KEY)})
    assert str(TEAM_KEY) not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        offsite.reencrypt_settings({"recipients": [TEAM], "identity": "AGE-SECRET-KEY-1NOTAKEY"})
    assert "NOTAKEY" not in str(caught.value)
    listed = tmp_path / "recipients"
    listed.write_text("# the other team\n%s\n\n%s\n" % (TEAM, TEAM))
    settings = offsite.reencrypt_settings({"recipients_file": str(listed), "passphrase": "pw"})
    assert settings["recipients"] == [TEAM] and settings["_passphrase"] == "pw" and settings["_identity"] is None
    assert offsite.reencrypt_settings(settings) is settings


def test_a_reencrypted_copy_is_the_source_backup_and_records_no_key():
    source = source_manifest()
    copy = reencrypted(source)
    assert mf.loads(mf.dumps(copy)) == copy
    assert copy["encryption"] == {"mode": "age", "recipients": [TEAM]}
    assert copy["size_bytes"] == 120 and copy["stats"] == {"files": 2}
    record = copy["copied_from"]["reencrypted"]
    assert record["source_objects"] == [{"name": "files.tar.zst.age", "size": 100, "sha256": "a" * 64}]
    assert record["plaintext"] == [{"name": "files.tar.zst.age", "size": 90, "sha256": "d" * 64}]
    assert str(SOURCE_KEY) not in mf.dumps(copy).decode()
    assert offsite.same_backup(source, copy)
    key = "j/%s/files.tar.zst.age" % source["id"]
    # The listing is judged against the copy's own objects, not the source's sizes.
    assert offsite.plan_backup(source, copy, {key: 120}) == (None, None)
    assert offsite.plan_backup(source, copy, {key: 100})[0] == "repair"
    # Another source backup under the same id (its objects differ): not the same.
    changed = dict(source, objects=[dict(source["objects"][0], sha256="e" * 64)])
    assert not offsite.same_backup(changed, copy)
    broken = dict(copy, copied_from=dict(copy["copied_from"], reencrypted={"source_objects": [{"name": 1}]}))
    assert not offsite.same_backup(source, broken)


def test_a_passphrase_envelope_is_recorded_as_a_source_object_only():
    source = source_manifest({"mode": "age", "recipients": ["age1x"], "key_object": "key.age"})
    copy = reencrypted(source)
    assert [obj["name"] for obj in copy["objects"]] == ["files.tar.zst.age"]
    assert "key_object" not in copy["encryption"]
    assert copy["copied_from"]["reencrypted"]["source_encryption"]["key_object"] == "key.age"
    assert offsite.same_backup(source, copy)


def job(copy):
    return {"job": "j", "kind": "files", "source": {"path": "/data"},
            "storage": {"backend": "filesystem", "path": "/backups"},
            "copy": dict({"destination": {"backend": "filesystem", "path": "/offsite"}}, **copy)}


@pytest.mark.parametrize("reencrypt, message", [
    ({"identity_file": "/k"}, "needs the destination's recipients"),
    ({"recipients": [TEAM]}, "needs the source's key, given explicitly"),
    ({"recipients": [TEAM], "identity": "AGE-SECRET-KEY-1X"}, "secrets must not be written into the job file"),
    ({"recipients": [TEAM], "passphrase": "pw"}, "secrets must not be written into the job file"),
    ({"recipients": ["age1nope"], "identity_file": "/k"}, "invalid age recipient"),
    ({"recipients": [TEAM], "identity_file": "/k", "enabled": True}, "unknown option"),
    ({"recipients": [TEAM], "identity_file": 5}, "must be the path of a file"),
    ({"recipients": [TEAM], "identity_env": "not a name"}, "must name an environment variable"),
    ("yes", "must be a mapping"),
])
def test_job_file_copy_reencrypt_is_checked_when_loaded(reencrypt, message):
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_mapping(job({"reencrypt": reencrypt}))


def test_job_file_copy_reencrypt_reads_the_key_for_copy_only(tmp_path, monkeypatch):
    identity = tmp_path / "identity"
    identity.write_text("%s\n" % SOURCE_KEY)
    recipients = tmp_path / "recipients"
    recipients.write_text("%s\n" % TEAM)
    config = JobConfig.from_mapping(job({"reencrypt": {"recipients_file": str(recipients),
                                                       "identity_file": str(identity)}}))
    prepared = config.prepare("copy")
    assert prepared["reencrypt"]["recipients"] == [TEAM]
    assert prepared["reencrypt"]["_identity"] == str(SOURCE_KEY)
    assert "reencrypt" not in config.prepare("list")
    monkeypatch.setenv("SOURCE_AGE_PASSPHRASE", "pw")
    by_env = JobConfig.from_mapping(job({"reencrypt": {"recipients": TEAM, "passphrase_env": "SOURCE_AGE_PASSPHRASE"}}))
    assert by_env.prepare("copy")["reencrypt"]["_passphrase"] == "pw"
    identity.unlink()
    with pytest.raises(ConfigError, match="copy.reencrypt.identity"):
        config.prepare("copy")
    assert "reencrypt" not in JobConfig.from_mapping(job({})).prepare("copy") or \
        JobConfig.from_mapping(job({})).prepare("copy")["reencrypt"] is None


MIB = 1 << 20
MEMORY_PROBE = textwrap.dedent("""
    import hashlib, json, sys
    import pyrage
    from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs, offsite
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.pipeline import check_object, store_stream
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage

    size, directory = int(sys.argv[1]), sys.argv[2]
    block = hashlib.sha256(b"x").digest() * (1 << 15)  # 1 MiB

    class Source:
        pos = 0
        def read(self, n=-1):
            n = min(n, size - self.pos)
            self.pos += n
            return (b"%016x" % self.pos + block[16:n]) if n > 16 else block[:n]

    source_key, team_key = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    source = FilesystemStorage(directory + "/source")
    destination = FilesystemStorage(directory + "/destination")
    stored = store_stream(Source(), source, "j/b/p.age", codecs.compression_settings({"algorithm": "none"}),
                          codecs.encryption_settings({"recipients": [str(source_key.to_public())]}))
    obj = {"name": "p.age", "size": stored["size"], "sha256": stored["sha256"]}
    new, plain = offsite.reencrypt_object(source, destination, "j/b/p.age", "j/b/p.age", obj, [source_key],
                                          [team_key.to_public()])
    check_object(destination, "j/b/p.age", dict(new, name="p.age"), "none", [team_key])
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"maxrss_kib": hwm, "plain": plain["size"]}))
""")


def peak_rss_kib(size, directory):
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(size), str(directory)], check=True,
                         capture_output=True, text=True, env=os.environ.copy()).stdout
    result = json.loads(out)
    assert result["plain"] == size
    return result["maxrss_kib"]


def test_reencryption_memory_does_not_grow_with_object_size(tmp_path):
    """Decrypt + encrypt + read back of a 320 MiB object peaks at about the RSS of a 32 MiB one."""
    low = peak_rss_kib(32 * MIB, tmp_path / "s")
    high = peak_rss_kib(320 * MIB, tmp_path / "l")
    assert high < 256 * 1024, "peak RSS %d KiB" % high
    assert high - low < 24 * 1024, "peak RSS grew from %d to %d KiB" % (low, high)
