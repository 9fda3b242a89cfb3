# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""backup_copy run by real ``ansible-playbook``: from SeaweedFS S3 to a second SeaweedFS with
its own credentials and to a filesystem directory; check mode, diff, changed=false in sync,
a repair, backup_restore / backup_verify / backup_info / backup_prune against the copy, and
no credential of either location in ``-vvv`` output."""

import json
import os
import subprocess
import sys
import uuid

from pyrage import x25519

from modules_helpers import ansible_playbook
from restore_helpers import tree_state

from .offsite_helpers import offsite_s3  # noqa: F401  pylint: disable=unused-import  # a fixture

FQCN = "biometrics.backup."


def test_backup_copy_module(tmp_path, s3_server, offsite_s3):
    identity = x25519.Identity.generate()
    (tmp_path / "identity").write_text("%s\n" % identity)
    tree = tmp_path / "data"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "a.bin").write_bytes(os.urandom(50_000))
    (tree / "top.txt").write_text("top\n")
    source = s3_server.storage_options(prefix="src-%s" % uuid.uuid4().hex[:8])
    (tmp_path / "offsite_secret").write_text(offsite_s3.secret_key + "\n")
    offsite = dict(offsite_s3.storage_options(prefix="dst-%s" % uuid.uuid4().hex[:8]))
    del offsite["secret_key"]
    offsite["secret_key_file"] = str(tmp_path / "offsite_secret")
    local = {"backend": "filesystem", "path": str(tmp_path / "nfs-copy")}
    copy = {"job": "docs", "storage": source, "destination": offsite}
    read = {"identity_file": str(tmp_path / "identity")}
    tasks = [
        {"name": "backup", FQCN + "backup_run": {"job": "docs", "kind": "files", "source": {"path": str(tree)},
                                                 "storage": source,
                                                 "encryption": {"recipients": [str(identity.to_public())]}}},
        {"name": "plan", FQCN + "backup_copy": copy, "check_mode": True},
        {"name": "copy", FQCN + "backup_copy": copy},
        {"name": "again", FQCN + "backup_copy": copy},
        {"name": "to filesystem", FQCN + "backup_copy": dict(copy, destination=local)},
        {"name": "info", FQCN + "backup_info": {"job": "docs", "storage": offsite}},
        {"name": "verify", FQCN + "backup_verify": {"job": "docs", "storage": offsite, "encryption": read}},
        {"name": "restore", FQCN + "backup_restore": {"job": "docs", "storage": local, "encryption": read,
                                                      "target": {"path": str(tmp_path / "restored")}}},
        {"name": "prune offsite", FQCN + "backup_prune": {"job": "docs", "storage": offsite, "keep_last": 5}},
    ]
    proc, results = ansible_playbook(tmp_path, tasks, diff=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    backup_id = results["backup"]["backup_id"]
    assert results["plan"]["changed"] and [s["id"] for s in results["plan"]["planned"]] == [backup_id]
    assert results["plan"]["copied"] == [] and backup_id in results["plan"]["diff"]["after"]
    assert results["copy"]["changed"] and [c["id"] for c in results["copy"]["copied"]] == [backup_id]
    assert results["copy"]["lag_seconds"] == 0 and results["copy"]["bytes_copied"] > 0
    assert not results["again"]["changed"] and results["again"]["in_sync"] == [backup_id]
    assert results["to filesystem"]["changed"]
    assert [b["id"] for b in results["info"]["backups"]] == [backup_id]
    assert results["verify"]["passed"]
    assert tree_state(str(tmp_path / "restored")) == tree_state(str(tree))
    assert not results["prune offsite"]["changed"]
    for secret in (s3_server.secret_key, s3_server.access_key, offsite_s3.secret_key):
        assert secret not in proc.stdout and secret not in proc.stderr

    # A deleted object at the filesystem copy is repaired; the task reports it.
    damaged = [name for name in os.listdir(tmp_path / "nfs-copy" / "docs" / backup_id) if name.startswith("files")]
    os.unlink(tmp_path / "nfs-copy" / "docs" / backup_id / damaged[0])
    proc, results = ansible_playbook(tmp_path, [
        {"name": "repair", FQCN + "backup_copy": dict(copy, destination=local)}], verbosity=3)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert results["repair"]["copied"][0]["action"] == "repair"
    assert results["repair"]["invocation"]["module_args"]["storage"]["secret_key"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert s3_server.secret_key not in proc.stdout


def test_backup_copy_documents_itself():
    doc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-doc"), "--json",
                          FQCN + "backup_copy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         check=False)
    assert doc.returncode == 0, doc.stderr
    options = json.loads(doc.stdout)[FQCN + "backup_copy"]["doc"]["options"]
    assert options["destination"]["suboptions"]["backend"]["choices"] == ["filesystem", "s3", "nfs"]
    assert "O(destination.endpoint_url)" in options["destination"]["suboptions"]["path_style"]["description"]


def test_prune_require_copy_and_destination_retention(tmp_path):
    tree = tmp_path / "data"
    tree.mkdir()
    (tree / "f.txt").write_text("one\n")
    source = {"backend": "filesystem", "path": str(tmp_path / "primary")}
    offsite = {"backend": "nfs", "path": str(tmp_path / "offsite")}
    backup = {"job": "docs", "kind": "files", "source": {"path": str(tree)}, "storage": source,
              "encryption": {"enabled": False}}
    guarded = {"job": "docs", "storage": source, "keep_last": 1, "require_copy": offsite}
    proc, results = ansible_playbook(tmp_path, [
        {"name": "first", FQCN + "backup_run": backup},
        {"name": "pause", "ansible.builtin.command": "sleep 1.1", "changed_when": False},
        {"name": "second", FQCN + "backup_run": backup},
        {"name": "copy newest, offsite keeps one", FQCN + "backup_copy": {
            "job": "docs", "storage": source, "destination": offsite, "destination_retention": {"keep_last": 1}}},
        {"name": "prune guarded", FQCN + "backup_prune": guarded},
        {"name": "copy all", FQCN + "backup_copy": {"job": "docs", "storage": source, "destination": offsite}},
        {"name": "prune again", FQCN + "backup_prune": guarded},
    ])
    assert proc.returncode == 0, proc.stdout[-3000:]
    first, second = results["first"]["backup_id"], results["second"]["backup_id"]
    assert [c["id"] for c in results["copy newest, offsite keeps one"]["copied"]] == [second]
    assert results["copy newest, offsite keeps one"]["not_wanted"] == [first]
    assert not results["prune guarded"]["changed"]
    kept = {e["id"]: e["reasons"] for e in results["prune guarded"]["keep"]}
    assert any("require_copy" in reason for reason in kept[first])
    assert [c["id"] for c in results["copy all"]["copied"]] == [first]
    assert results["prune again"]["deleted"] == [first]


def test_backup_copy_reencrypt(tmp_path, s3_server, offsite_s3):
    """O(reencrypt): the copy restores with the other team's key and not with the source's;
    check mode and diff; in sync the second time; a missing or wrong source key fails the
    task before anything is written; no key in -vvv output."""
    source_key = x25519.Identity.generate()
    team_key = x25519.Identity.generate()
    (tmp_path / "source-identity").write_text("%s\n" % source_key)
    (tmp_path / "team-identity").write_text("%s\n" % team_key)
    tree = tmp_path / "data"
    tree.mkdir()
    (tree / "a.bin").write_bytes(os.urandom(80_000))
    (tree / "b.txt").write_text("b\n" * 500)
    source = s3_server.storage_options(prefix="src-%s" % uuid.uuid4().hex[:8])
    offsite = offsite_s3.storage_options(prefix="team-%s" % uuid.uuid4().hex[:8])
    reencrypt = {"recipients": [str(team_key.to_public())], "identity_file": str(tmp_path / "source-identity")}
    copy = {"job": "docs", "storage": source, "destination": offsite, "reencrypt": reencrypt}
    wrong = dict(reencrypt, identity_file=None, identity=str(x25519.Identity.generate()))
    tasks = [
        {"name": "backup", FQCN + "backup_run": {"job": "docs", "kind": "files", "source": {"path": str(tree)},
                                                 "storage": source,
                                                 "encryption": {"recipients": [str(source_key.to_public())]}}},
        {"name": "no key", FQCN + "backup_copy": dict(copy, reencrypt={"recipients": reencrypt["recipients"]}),
         "ignore_errors": True},
        {"name": "wrong key", FQCN + "backup_copy": dict(copy, reencrypt=wrong), "ignore_errors": True},
        {"name": "info after refusals", FQCN + "backup_info": {"job": "docs", "storage": offsite}},
        {"name": "plan", FQCN + "backup_copy": copy, "check_mode": True},
        {"name": "copy", FQCN + "backup_copy": copy},
        {"name": "again", FQCN + "backup_copy": copy},
        {"name": "restore with the team's key", FQCN + "backup_restore": {
            "job": "docs", "storage": offsite, "encryption": {"identity_file": str(tmp_path / "team-identity")},
            "target": {"path": str(tmp_path / "restored")}}},
        {"name": "restore with the source's key", FQCN + "backup_restore": {
            "job": "docs", "storage": offsite, "encryption": {"identity_file": str(tmp_path / "source-identity")},
            "target": {"path": str(tmp_path / "not-restored")}}, "ignore_errors": True},
    ]
    proc, results = ansible_playbook(tmp_path, tasks, diff=True, verbosity=3)
    assert proc.returncode == 0, proc.stdout[-3000:]
    backup_id = results["backup"]["backup_id"]
    assert results["no key"]["failed"] and "source's key must be given explicitly" in results["no key"]["msg"]
    assert results["wrong key"]["failed"] and "nothing was written" in results["wrong key"]["msg"]
    assert results["info after refusals"]["backups"] == []
    assert results["plan"]["changed"] and [s["id"] for s in results["plan"]["planned"]] == [backup_id]
    assert backup_id in results["plan"]["diff"]["after"] and results["plan"]["copied"] == []
    assert results["copy"]["changed"] and [c["id"] for c in results["copy"]["copied"]] == [backup_id]
    assert results["copy"]["reencrypt"] == {"recipients": [str(team_key.to_public())]}
    assert not results["again"]["changed"] and results["again"]["in_sync"] == [backup_id]
    assert results["again"]["other_recipients"] == []
    assert tree_state(str(tmp_path / "restored")) == tree_state(str(tree))
    assert results["restore with the source's key"]["failed"]
    assert "not a recipient" in results["restore with the source's key"]["msg"]
    assert not (tmp_path / "not-restored").exists() or not os.listdir(tmp_path / "not-restored")
    assert results["wrong key"]["invocation"]["module_args"]["reencrypt"]["identity"] == \
        "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    for secret in (str(source_key), str(team_key), wrong["identity"], s3_server.secret_key, offsite_s3.secret_key):
        assert secret not in proc.stdout and secret not in proc.stderr
