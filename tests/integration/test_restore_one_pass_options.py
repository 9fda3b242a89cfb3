# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one-pass restore through the user-facing entry points: ``biometrics.backup.backup_restore``
(real ``ansible-playbook``) with and without ``verify_first``, and the runner's
``restore --verify-first``, on a files backup in a filesystem location. A damaged backup fails
the task with a message (no traceback) and leaves the destination as it was.
"""

import json
import os
import subprocess
import sys

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

from modules_helpers import ansible_playbook
from restore_helpers import tree_state

FQCN = "biometrics.backup."
RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def backed_up(tmp_path):
    """A files backup encrypted to a fresh key: ``(storage options, identity file, tree, manifest)``."""
    identity = x25519.Identity.generate()
    (tmp_path / "identity").write_text("%s\n" % identity)
    tree = tmp_path / "data"
    (tree / "docs").mkdir(parents=True)
    (tree / "docs" / "a.txt").write_text("alpha " * 500)
    (tree / "big.bin").write_bytes(os.urandom(300_000))
    storage = {"backend": "filesystem", "path": str(tmp_path / "store")}
    manifest = BackupRun("uploads", FilesSource({"path": str(tree)}), open_storage(storage),
                         encryption={"recipients": [str(identity.to_public())]}).run()
    return storage, str(tmp_path / "identity"), tree, manifest


def flip_tar(storage, manifest):
    obj = next(o for o in manifest["objects"] if o.get("payload") == "files.tar")
    path = os.path.join(storage["path"], "uploads", manifest["id"], obj["name"])
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        byte = handle.read(1)[0]
        handle.seek(size // 2)
        handle.write(bytes([byte ^ 0x04]))


def test_module_one_pass_by_default_two_pass_with_verify_first(tmp_path, backed_up):
    storage, identity_file, tree, manifest = backed_up
    common = {"job": "uploads", "storage": storage, "encryption": {"identity_file": identity_file}}
    proc, results = ansible_playbook(tmp_path, [
        {"name": "one pass", FQCN + "backup_restore": dict(common, target={"path": str(tmp_path / "one")})},
        {"name": "two passes", FQCN + "backup_restore": dict(common, verify_first=True,
                                                             target={"path": str(tmp_path / "two")})},
        {"name": "check mode", FQCN + "backup_restore": dict(common, target={"path": str(tmp_path / "check")}),
         "check_mode": True},
    ])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    one, two, check = results["one pass"], results["two passes"], results["check mode"]
    assert one["changed"] and one["verification"]["mode"] == "one-pass"
    assert two["changed"] and two["verification"]["mode"] == "two-pass"
    assert check["verification"]["mode"] == "two-pass" and not os.path.exists(str(tmp_path / "check"))
    for field in ("objects", "stored_bytes", "plain_bytes", "details"):
        assert one["verification"][field] == two["verification"][field], field
    assert tree_state(str(tmp_path / "one")) == tree_state(str(tree)) == tree_state(str(tmp_path / "two"))


def test_module_refuses_a_damaged_backup_on_the_one_pass_path(tmp_path, backed_up):
    storage, identity_file, _tree, manifest = backed_up
    flip_tar(storage, manifest)
    live = tmp_path / "live"
    live.mkdir()
    (live / "production.txt").write_text("current data")
    before = tree_state(str(live))
    proc, results = ansible_playbook(tmp_path, [
        {"name": "restore", "ignore_errors": True, FQCN + "backup_restore": {
            "job": "uploads", "storage": storage, "encryption": {"identity_file": identity_file},
            "target": {"path": str(live), "overwrite": True}}},
    ])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    failed = results["restore"]
    assert failed["failed"] and not failed["changed"]
    assert "SHA-256" in failed["msg"] and "Traceback" not in failed["msg"], failed
    assert failed["error"] == "ObjectMismatchError"
    assert tree_state(str(live)) == before
    assert not [name for name in os.listdir(str(tmp_path)) if name.startswith(".live.")]  # no staging left


def run_runner(tmp_path, storage, identity_file, target_path, *extra):
    config = tmp_path / ("job-%s.json" % os.path.basename(target_path))
    config.write_text(json.dumps({
        "job": "uploads", "kind": "files", "source": {"path": "/nonexistent"}, "storage": storage,
        "encryption": {"identity_file": identity_file}, "schedule": "0 3 * * *",
        "restore": {"target": {"path": target_path}}}))
    environ = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"))
    return subprocess.run([sys.executable, "-m", RUNNER, "restore", "--config", str(config)] + list(extra),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, cwd="/",
                          timeout=600, check=False)


def test_runner_restore_verify_first(tmp_path, backed_up):
    storage, identity_file, tree, _manifest = backed_up
    one = run_runner(tmp_path, storage, identity_file, str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["verification"]["mode"] == "one-pass"
    two = run_runner(tmp_path, storage, identity_file, str(tmp_path / "two"), "--verify-first")
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)["verification"]["mode"] == "two-pass"
    assert tree_state(str(tmp_path / "one")) == tree_state(str(tree)) == tree_state(str(tmp_path / "two"))
    config = tmp_path / "job-one.json"
    environ = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"))
    misuse = subprocess.run([sys.executable, "-m", RUNNER, "verify", "--config", str(config), "--verify-first"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, cwd="/",
                            timeout=120, check=False)
    assert misuse.returncode == 2 and "--verify-first is for restore only" in misuse.stderr
