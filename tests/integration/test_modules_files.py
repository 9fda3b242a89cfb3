# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""backup_run, backup_info, backup_verify and backup_restore run by real ``ansible-playbook``
(json callback) on the files kind, against a filesystem location and real SeaweedFS S3:
results, check mode, diff, failure messages, and no secret in ``-vvv`` output.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest
from pyrage import x25519

from modules_helpers import ansible_playbook
from restore_helpers import tree_state

FQCN = "biometrics.backup."


@pytest.fixture
def keys(tmp_path):
    identity = x25519.Identity.generate()
    (tmp_path / "identity").write_text("%s\n" % identity)
    return {"recipient": str(identity.to_public()), "identity_file": str(tmp_path / "identity")}


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("alpha " * 500)
    (root / "docs" / "b.bin").write_bytes(os.urandom(40_000))
    (root / "top.txt").write_text("top\n")
    os.symlink("docs/a.txt", root / "shortcut")
    return root


def test_backup_list_verify_restore_cycle(tmp_path, tree, keys):
    storage = {"backend": "filesystem", "path": str(tmp_path / "store")}
    enc_write = {"recipients": [keys["recipient"]]}
    enc_read = {"identity_file": keys["identity_file"]}
    base = {"job": "uploads", "kind": "files", "source": {"path": str(tree)}, "storage": storage}
    proc, results = ansible_playbook(tmp_path, [
        {"name": "plan", FQCN + "backup_run": dict(base, encryption=enc_write), "check_mode": True},
        {"name": "first", "register": "first", FQCN + "backup_run": dict(
            base, encryption=enc_write, size_anomaly={"warn_below": 0.5})},
        {"name": "pause", "ansible.builtin.command": "sleep 1.1", "changed_when": False},
        {"name": "second", FQCN + "backup_run": dict(base, encryption=enc_write, size_anomaly={"warn_below": 0.5})},
        {"name": "list", FQCN + "backup_info": {"job": "uploads", "storage": storage}},
        {"name": "list other kind", FQCN + "backup_info": {"storage": storage, "kind": "postgres"}},
        {"name": "list latest", FQCN + "backup_info": {"storage": storage, "job": "uploads", "backup": "latest"}},
        {"name": "verify all", FQCN + "backup_verify": {
            "job": "uploads", "backup": "all", "test_restore": True, "storage": storage, "encryption": enc_read}},
        {"name": "list verified", FQCN + "backup_info": {"storage": storage, "verified": True}},
        {"name": "restore check", FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "encryption": enc_read,
            "target": {"path": str(tmp_path / "restored")}}, "check_mode": True},
        {"name": "restore", FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "encryption": enc_read,
            "target": {"path": str(tmp_path / "restored")}}},
        {"name": "restore subpath of the first", FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "encryption": enc_read, "kind": "files",
            "point_in_time": "{{ first.manifest.finished_at }}",
            "target": {"path": str(tmp_path / "partial"), "subpath": "docs"}}},
    ], diff=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    plan = results["plan"]
    assert plan["changed"] and plan["backup_id"] == "" and plan["plan"]["kind"] == "files"
    diffs = plan["diff"] if isinstance(plan["diff"], list) else [plan["diff"]]
    assert "new backup" in diffs[0]["after"]
    first, second = results["first"], results["second"]
    assert first["changed"] and first["manifest"]["encryption"]["recipients"] == [keys["recipient"]]
    assert first["size_check"]["level"] == "ok" and second["size_check"]["previous_id"] == first["backup_id"]
    listing = results["list"]
    assert [b["id"] for b in listing["backups"]] == [second["backup_id"], first["backup_id"]]
    assert listing["count"] == 2 and listing["jobs"] == ["uploads"] and not listing["changed"]
    assert results["list other kind"]["count"] == 0
    assert [b["id"] for b in results["list latest"]["backups"]] == [second["backup_id"]]
    verified = results["verify all"]
    assert verified["changed"] and verified["passed"] and verified["summary"] == {"verified": 2, "failed": 0, "errors": 0}
    assert all(r["checks"] and r["recorded"] for r in verified["results"])
    assert results["list verified"]["count"] == 2
    check = results["restore check"]
    assert check["changed"] and check["check_mode"] and check["verification"]["objects"] >= 2
    assert check["backup_id"] == second["backup_id"]
    restored = results["restore"]
    assert restored["changed"] and all(c["ok"] for c in restored["checks"])
    assert tree_state(str(tmp_path / "restored")) == tree_state(str(tree))
    partial = results["restore subpath of the first"]
    assert partial["backup_id"] == first["backup_id"] and partial["selected_by"] == "point_in_time"
    assert sorted(os.listdir(tmp_path / "partial")) == ["docs"]
    assert tree_state(str(tmp_path / "partial" / "docs")) == tree_state(str(tree / "docs"))


def test_check_mode_writes_nothing(tmp_path, tree, keys):
    storage = {"backend": "filesystem", "path": str(tmp_path / "store")}
    proc, results = ansible_playbook(tmp_path, [
        {"name": "plan", FQCN + "backup_run": {
            "job": "uploads", "kind": "files", "source": {"path": str(tree)}, "storage": storage}},
    ], check=True)
    assert proc.returncode == 0
    assert results["plan"]["changed"] and results["plan"]["plan"]["source"]["path"] == str(tree)
    assert not (tmp_path / "store").exists() or not any(os.scandir(tmp_path / "store"))


def failure(results, name):
    result = results[name]
    assert result.get("failed") is True, result
    assert "Traceback" not in result["msg"]
    return result["msg"]


def test_failures_name_the_problem_and_leave_the_target_alone(tmp_path, tree, keys):
    storage = {"backend": "filesystem", "path": str(tmp_path / "store")}
    proc, results = ansible_playbook(tmp_path, [
        {"name": "backup", FQCN + "backup_run": {
            "job": "uploads", "kind": "files", "source": {"path": str(tree)}, "storage": storage,
            "encryption": {"recipients": [keys["recipient"]]}}},
    ])
    assert proc.returncode == 0, proc.stdout[-2000:]
    manifest = results["backup"]["manifest"]
    live = tmp_path / "live"
    live.mkdir()
    (live / "current.txt").write_text("production data")
    before = tree_state(str(live))
    stranger = tmp_path / "stranger"
    stranger.write_text(str(x25519.Identity.generate()))
    payload = next(o for o in manifest["objects"] if o.get("payload") == "files.tar")
    ok = {"ignore_errors": True}
    proc, results = ansible_playbook(tmp_path, [
        dict(ok, name="unknown kind", **{FQCN + "backup_run": {
            "job": "uploads", "kind": "mysql", "source": {}, "storage": storage}}),
        dict(ok, name="bad job name", **{FQCN + "backup_run": {
            "job": "Up Loads", "kind": "files", "source": {"path": str(tree)}, "storage": storage}}),
        dict(ok, name="missing source dir", **{FQCN + "backup_run": {
            "job": "uploads", "kind": "files", "source": {"path": str(tmp_path / "nope")}, "storage": storage}}),
        dict(ok, name="bad recipient", **{FQCN + "backup_run": {
            "job": "uploads", "kind": "files", "source": {"path": str(tree)}, "storage": storage,
            "encryption": {"recipients": ["age1bogus"]}}}),
        dict(ok, name="no key", **{FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "target": {"path": str(live), "overwrite": True}}}),
        dict(ok, name="wrong key", **{FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "encryption": {"identity_file": str(stranger)},
            "target": {"path": str(live), "overwrite": True}}}),
        dict(ok, name="wrong kind", **{FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "kind": "postgres", "encryption": {"identity_file": keys["identity_file"]},
            "target": {"database": "x"}}}),
        dict(ok, name="no such backup", **{FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "backup": "20000101T000000Z-000000",
            "encryption": {"identity_file": keys["identity_file"]}, "target": {"path": str(live)}}}),
        dict(ok, name="both selectors", **{FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "backup": "latest", "point_in_time": "2024-01-01T00:00:00Z",
            "target": {"path": str(live)}}}),
        {"name": "damage", "ansible.builtin.shell": "printf 'XXXX' | dd of=%s bs=1 seek=100 conv=notrunc" % (
            tmp_path / "store" / "uploads" / manifest["id"] / payload["name"])},
        dict(ok, name="damaged", **{FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "encryption": {"identity_file": keys["identity_file"]},
            "target": {"path": str(live), "overwrite": True}}}),
        dict(ok, name="damaged check mode", check_mode=True, **{FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "encryption": {"identity_file": keys["identity_file"]},
            "target": {"path": str(live), "overwrite": True}}}),
        dict(ok, name="verify damaged", **{FQCN + "backup_verify": {
            "job": "uploads", "storage": storage, "encryption": {"identity_file": keys["identity_file"]}}}),
        {"name": "verify damaged, report only", FQCN + "backup_verify": {
            "job": "uploads", "storage": storage, "fail_on_error": False,
            "encryption": {"identity_file": keys["identity_file"]}}},
    ])
    assert "unknown backup kind 'mysql'" in failure(results, "unknown kind")
    assert "postgres" in failure(results, "unknown kind")
    assert "invalid job name" in failure(results, "bad job name")
    assert "not a directory" in failure(results, "missing source dir")
    assert "invalid age recipient" in failure(results, "bad recipient")
    assert "is encrypted: give encryption.identity_file" in failure(results, "no key")
    assert "wrong key" in failure(results, "wrong key")
    assert "is of kind files, not postgres" in failure(results, "wrong kind")
    assert "no complete backup with id 20000101T000000Z-000000" in failure(results, "no such backup")
    assert "mutually exclusive" in failure(results, "both selectors")
    assert "SHA-256" in failure(results, "damaged")
    assert "SHA-256" in failure(results, "damaged check mode")
    assert "did not pass verification" in failure(results, "verify damaged")
    report = results["verify damaged, report only"]
    assert not report.get("failed") and report["summary"]["failed"] == 1
    assert tree_state(str(live)) == before
    # nothing but the one good backup's directory (now damaged) exists: failed runs left nothing
    assert sorted(os.listdir(tmp_path / "store" / "uploads")) == sorted([manifest["id"], "index.json"])


def test_s3_credentials_and_passphrase_never_reach_the_output(tmp_path, tree, s3_server):
    passphrase = "pass-" + uuid.uuid4().hex
    prefix = "mod-%s" % uuid.uuid4().hex[:8]
    storage = s3_server.storage_options(prefix=prefix)
    (tmp_path / "passphrase").write_text(passphrase + "\n")
    secrets = [s3_server.secret_key, s3_server.access_key, passphrase]
    tasks = [
        {"name": "backup", FQCN + "backup_run": {
            "job": "s3job", "kind": "files", "source": {"path": str(tree)}, "storage": storage,
            "encryption": {"passphrase": passphrase}}},
        {"name": "info", FQCN + "backup_info": {"job": "s3job", "storage": storage}},
        {"name": "verify", FQCN + "backup_verify": {
            "job": "s3job", "storage": storage, "encryption": {"passphrase_file": str(tmp_path / "passphrase")}}},
        {"name": "restore", FQCN + "backup_restore": {
            "job": "s3job", "storage": storage, "encryption": {"passphrase": passphrase},
            "target": {"path": str(tmp_path / "out")}}},
        {"name": "wrong passphrase", "ignore_errors": True, FQCN + "backup_restore": {
            "job": "s3job", "storage": storage, "encryption": {"passphrase": passphrase[::-1]},
            "target": {"path": str(tmp_path / "out2")}}},
    ]
    proc = ansible_playbook(tmp_path, tasks, verbosity=3, diff=True, callback="default")[0]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "wrong passphrase" in proc.stdout and "does not open the key envelope" in proc.stdout
    for secret in secrets + [passphrase[::-1]]:
        assert secret not in proc.stdout and secret not in proc.stderr
    assert tree_state(str(tmp_path / "out")) == tree_state(str(tree))
    assert not (tmp_path / "out2").exists()
    # the same run with the json callback: values really are masked, not just absent
    proc, results = ansible_playbook(tmp_path, tasks[1:2], verbosity=3)
    assert results["info"]["invocation"]["module_args"]["storage"]["secret_key"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    for secret in secrets:
        assert secret not in proc.stdout


def test_modules_document_themselves():
    doc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-doc"), "--json",
                          FQCN + "backup_run", FQCN + "backup_info", FQCN + "backup_verify", FQCN + "backup_restore"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ), check=False)
    assert doc.returncode == 0, doc.stderr
    docs = json.loads(doc.stdout)
    for name in ("backup_run", "backup_info", "backup_verify", "backup_restore"):
        entry = docs[FQCN + name]
        assert entry["doc"]["options"]["storage"]["suboptions"]["backend"]["choices"] == ["filesystem", "s3", "nfs"]
        assert entry["examples"] and entry["return"]
    assert "identity_file" in docs[FQCN + "backup_restore"]["doc"]["options"]["encryption"]["suboptions"]
