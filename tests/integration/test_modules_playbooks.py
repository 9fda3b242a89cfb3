# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""playbooks/backup.yml, verify.yml and restore.yml run the way an AWX job template runs them:
storage, encryption and job definitions from the inventory's group_vars, the survey answers
(job, backup, target) as extra vars. Real ansible-playbook, files kind, filesystem storage.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml
from pyrage import x25519

from restore_helpers import tree_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def inventory(tmp_path):
    identity = x25519.Identity.generate()
    (tmp_path / "identity").write_text("%s\n" % identity)
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "file.txt").write_text("payload\n" * 50)
    (data / "top.bin").write_bytes(os.urandom(5000))
    group_vars = tmp_path / "inventory" / "group_vars" / "all"
    group_vars.mkdir(parents=True)
    (group_vars / "backup.yml").write_text(yaml.safe_dump({
        "backup_storage": {"backend": "filesystem", "path": str(tmp_path / "store")},
        # writing needs the recipient, reading the identity: both may sit in one encryption dict
        "backup_encryption": {"recipients": [str(identity.to_public())],
                              "identity_file": str(tmp_path / "identity")},
        "backup_jobs": {"uploads": {"kind": "files", "source": {"path": str(data)},
                                    "target": {"path": str(tmp_path / "default-target")}}},
        "backup_restore_targets": {"scratch-dir": {"path": str(tmp_path / "named-target")}},
    }))
    (tmp_path / "inventory" / "hosts.yml").write_text(yaml.safe_dump(
        {"all": {"hosts": {"localhost": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    return {"dir": tmp_path, "inventory": str(tmp_path / "inventory"), "data": data}


def playbook(inventory, name, extra_vars, check=False):
    argv = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", inventory["inventory"],
            name, "-e", json.dumps(extra_vars)]
    if check:
        argv.append("--check")
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_NOCOLOR="1")
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=str(inventory["dir"]), timeout=900, check=False)
    document = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    tasks = {task["task"]["name"]: task["hosts"]["localhost"] for play in document["plays"] for task in play["tasks"]}
    return proc, tasks


def test_backup_verify_restore_templates(inventory):
    backup_play = os.path.join(REPO, "playbooks", "backup.yml")
    proc, tasks = playbook(inventory, backup_play, {"job": "uploads"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    first = tasks["Back up"]["results"][0]
    assert first["changed"] and first["item"]["key"] == "uploads"
    proc, tasks = playbook(inventory, backup_play, {})  # job defaults to all
    assert proc.returncode == 0
    second = tasks["Back up"]["results"][0]["backup_id"]
    assert second != first["backup_id"]

    proc, tasks = playbook(inventory, os.path.join(REPO, "playbooks", "verify.yml"),
                           {"job": "uploads", "backup": "all", "test_restore": "true"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    verified = [task for name, task in tasks.items() if name.startswith("Verify")][0]
    assert verified["summary"]["verified"] == 2 and all(r["checks"] for r in verified["results"])

    # named target from the inventory, backup chosen by id (survey answer)
    proc, tasks = playbook(inventory, os.path.join(REPO, "playbooks", "restore.yml"),
                           {"job": "uploads", "backup": first["backup_id"], "target": "scratch-dir"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    restored = tasks["Restore (verified before the target is touched)"]
    assert restored["backup_id"] == first["backup_id"] and restored["selected_by"] == "id"
    assert tree_state(str(inventory["dir"] / "named-target")) == tree_state(str(inventory["data"]))

    # target as YAML text (a survey's textarea), backup as a timestamp, via the playbook's FQCN
    target_text = "path: %s\n" % (inventory["dir"] / "typed-target")
    proc, tasks = playbook(inventory, "biometrics.backup.restore",
                           {"job": "uploads", "backup": first["manifest"]["finished_at"], "target": target_text})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert tasks["Restore (verified before the target is touched)"]["backup_id"] == first["backup_id"]
    assert (inventory["dir"] / "typed-target" / "sub" / "file.txt").exists()

    # no target answer: the job's default target; check mode verifies and writes nothing
    proc, tasks = playbook(inventory, os.path.join(REPO, "playbooks", "restore.yml"), {"job": "uploads"}, check=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = tasks["Restore (verified before the target is touched)"]
    assert report["check_mode"] and report["backup_id"] == second
    assert not (inventory["dir"] / "default-target").exists()


def test_missing_survey_answers_fail_with_guidance(inventory):
    proc, tasks = playbook(inventory, os.path.join(REPO, "playbooks", "restore.yml"),
                           {"job": "uploads", "target": "nowhere"})
    assert proc.returncode != 0
    check = tasks["Check the inventory and the survey answers"]
    assert check["failed"] and "scratch-dir" in check["msg"]
    proc, tasks = playbook(inventory, os.path.join(REPO, "playbooks", "backup.yml"), {"job": "unknown-job"})
    assert proc.returncode != 0
    assert "uploads" in tasks["Check the inventory and the survey answers"]["msg"]


def test_module_defaults_of_the_action_group_give_every_module_its_storage(inventory):
    """group/biometrics.backup.backup in module_defaults: the location is written once for a play."""
    play = inventory["dir"] / "grouped.yml"
    play.write_text(yaml.safe_dump([{
        "name": "Back up, list, verify and restore with the location set once",
        "hosts": "localhost", "gather_facts": False,
        "module_defaults": {"group/biometrics.backup.backup": {"storage": "{{ backup_storage }}"}},
        "tasks": [
            {"name": "Back up", "biometrics.backup.backup_run": {
                "job": "grouped", "kind": "files", "source": {"path": str(inventory["data"])},
                "encryption": "{{ backup_encryption }}"}, "register": "taken"},
            {"name": "List", "biometrics.backup.backup_info": {"job": "grouped"}},
            # A task's own storage replaces the default as a whole: another, empty location.
            {"name": "List another location", "biometrics.backup.backup_info": {
                "job": "grouped", "storage": {"backend": "filesystem", "path": str(inventory["dir"] / "other")}}},
            {"name": "Verify", "biometrics.backup.backup_verify": {
                "job": "grouped", "encryption": "{{ backup_encryption }}"}},
            {"name": "Restore", "biometrics.backup.backup_restore": {
                "job": "grouped", "encryption": "{{ backup_encryption }}",
                "target": {"path": str(inventory["dir"] / "grouped-target")}}},
        ]}]))
    (inventory["dir"] / "other").mkdir()
    proc, tasks = playbook(inventory, str(play), {})
    assert proc.returncode == 0, proc.stdout[-3000:]
    backup_id = tasks["Back up"]["backup_id"]
    assert [entry["id"] for entry in tasks["List"]["backups"]] == [backup_id]
    assert tasks["List another location"]["backups"] == []
    assert (inventory["dir"] / "store" / "grouped" / backup_id / "manifest.json").is_file()
    assert tasks["Verify"]["summary"]["verified"] == 1
    assert tasks["Restore"]["backup_id"] == backup_id
    assert tree_state(inventory["dir"] / "grouped-target") == tree_state(inventory["data"])
