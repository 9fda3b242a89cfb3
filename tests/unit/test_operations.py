"""engine/operations.py: the facade the modules and the runner both call.

Real filesystem locations and a real ``files`` source (no mocks); plus a guard that the
modules and the runner do not go back to assembling these operations from engine internals.
"""

import ast
import os
import pathlib
import time

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import operations
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

from ci_env import REPO_ROOT

JOB = "ops"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n" * 100)
    (root / "sub" / "b.bin").write_bytes(os.urandom(4096))
    return root


def _location(path):
    return open_storage({"backend": "filesystem", "path": str(path)})


def _backup(tree, storage):
    # Ids order backups of one second by 1/256 s: two backups started within the same 4 ms
    # would sort at random (this small tree backs up that fast), and "latest" with them.
    time.sleep(0.01)
    source = operations.make_source("files", {"path": str(tree)})
    return operations.prepare_backup(JOB, source, storage, compression={"algorithm": "none"}).run()


def test_backup_list_verify_and_drill(tree, tmp_path):
    storage = _location(tmp_path / "store")
    assert operations.backup_count(storage, JOB) == 0  # no location yet: a first backup creates it
    first = _backup(tree, storage)
    (tree / "a.txt").write_text("changed\n")
    second = _backup(tree, storage)
    assert operations.backup_count(storage, JOB) == 2

    found = operations.inventory(storage, JOB)
    assert [m["id"] for m in found["backups"]] == [second["id"], first["id"]]
    assert found["job"] == JOB and found["junk"] == [] and found["orphans"] == []
    assert found["incomplete_uploads"] == [] and found["incomplete_uploads_summary"]["count"] == 0
    assert found["storage"] == storage.describe() and "selected" not in found
    picked = operations.inventory(storage, JOB, backup=first["id"])["selected"]
    assert [m["id"] for m in picked] == [first["id"]]

    outcome = operations.verify(storage, JOB, backup="all")
    assert outcome["ok"] and outcome["verified"] == 2 and outcome["changed"]
    assert {key: record["result"] for key, record in operations.verifications(storage, JOB).items()} == {
        first["id"]: "ok", second["id"]: "ok"}

    lines = []
    drilled = operations.drill(storage, JOB, scratch_options=operations.scratch_options("files", {"path": str(tree)}),
                               record=False, log=lines.append)
    result = drilled["results"][0]
    assert drilled["ok"] and not drilled["changed"] and result["id"] == second["id"]
    assert result["test_restore"] and result["checks"] and all(check["ok"] for check in result["checks"])
    assert result["phases"]["total"] >= 0 and lines


def test_source_options_are_checked_before_secrets_are_read(tree):
    def resolve(_options):
        raise AssertionError("resolve must not run for options the schema refuses")

    with pytest.raises(ConfigError, match="pth"):
        operations.make_source("files", {"pth": str(tree)}, resolve)
    with pytest.raises(ConfigError, match="unknown backup kind 'nosuch'"):
        operations.make_source("nosuch", {}, resolve)
    read = []
    source = operations.make_source("files", {"path": str(tree)}, lambda options: read.append(options) or options)
    assert read == [{"path": str(tree)}] and source.kind == "files"


def test_prune_with_a_copy_location_prunes_only_what_the_copy_holds(tree, tmp_path):
    storage, offsite = _location(tmp_path / "store"), _location(tmp_path / "offsite")
    old = _backup(tree, storage)
    new = _backup(tree, storage)
    copied = operations.copy(storage, offsite, JOB, backup="latest")
    assert copied["ok"] and [step["id"] for step in copied["copied"]] == [new["id"]]

    lines = []
    result = operations.prune(storage, JOB, {"keep_last": 1}, dry_run=True, log=lines.append, copy_location=offsite)
    assert [entry["id"] for entry in result["prune"]] == []  # the old one is not at the copy yet
    assert lines[0] == "require_copy: 1 backups held by %s" % operations.where(offsite.describe())

    operations.copy(storage, offsite, JOB)
    result = operations.prune(storage, JOB, {"keep_last": 1}, copy_location=offsite)
    assert result["deleted"] == [old["id"]]
    assert [m["id"] for m in operations.inventory(storage, JOB)["backups"]] == [new["id"]]
    # Without a copy location, nothing is asked of one.
    assert operations.prune(offsite, JOB, {"keep_last": 1}, dry_run=True)["counts"]["pruned"] == 1


def test_restore_builds_the_target_of_the_chosen_kind_and_checks_the_kind_once(tree, tmp_path):
    storage = _location(tmp_path / "store")
    stored = _backup(tree, storage)
    restored = tmp_path / "restored"
    report = operations.restore(storage, JOB, {"path": str(restored)}, kind="files")
    assert report["backup_id"] == stored["id"] and report["kind"] == "files" and report["changed"]
    assert (restored / "a.txt").read_text() == (tree / "a.txt").read_text()
    assert (restored / "sub" / "b.bin").read_bytes() == (tree / "sub" / "b.bin").read_bytes()

    # Without a kind the backup's own kind is used; check mode writes nothing.
    planned = operations.restore(storage, JOB, {"path": str(tmp_path / "planned")}, check_mode=True)
    assert planned["kind"] == "files" and not planned["changed"] and not (tmp_path / "planned").exists()

    # Another kind is refused once the backup is chosen, before its target is built.
    with pytest.raises(ConfigError, match="backup of job %s is of kind files, not config_git" % JOB):
        operations.restore(storage, JOB, {"path": str(tmp_path / "git")}, kind="config_git")
    # A field the kind's target does not know is refused before anything is read.
    with pytest.raises(ConfigError, match="pth"):
        operations.restore(_location(tmp_path / "nowhere"), JOB, {"pth": "/x"}, kind="files")
    assert not (tmp_path / "git").exists()


# Engine calls that make up an operation: a caller that imports these assembles it itself.
ASSEMBLY = {"BackupRun", "Catalog", "parent_identities", "select_backup", "copied_ids", "copied_wal_ids",
            "copy_backups", "verify", "prune", "restore", "scratch_options_from_source"}
CALLERS = ["plugins/modules/backup_%s.py" % name for name in ("run", "info", "verify", "prune", "copy", "restore")] + [
    "plugins/module_utils/engine/runner.py"]


@pytest.mark.parametrize("path", CALLERS)
def test_callers_go_through_the_facade(path):
    tree = ast.parse(pathlib.Path(REPO_ROOT, path).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.update(alias.name for alias in node.names)
    attributes = {node.attr for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kinds"}
    assert not imported & ASSEMBLY, "%s imports %s: call engine/operations.py" % (path, sorted(imported & ASSEMBLY))
    assert "operations" in imported
    assert not attributes & {"make_source", "make_target", "check_source_options", "scratch_options_from_source"}


# What stores and lists backups. A source produces payloads; storing them is the engine's job
# (the WAL stream, which stores every file it receives, is engine/walstream.py for that reason).
STORING = {"catalog", "backup", "offsite", "prune", "operations", "walstream", "verify", "restore", "selection", "keys",
           "integrity"}


ENGINE_DIR = pathlib.Path(REPO_ROOT, "plugins/module_utils/engine")
# A kind's backup side: its source modules and what they build on (connections, the files archive).
SOURCE_SIDE = sorted(str(path.relative_to(REPO_ROOT)) for path in ENGINE_DIR.glob("kinds/*/*.py")
                     if path.name not in ("__init__.py", "target.py"))


def engine_modules_imported(path):
    """The engine-relative module names (``storage.base``, ``catalog``) that ``path`` imports.

    Relative imports only: the engine imports itself relatively (an absolute
    ``ansible_collections...`` import inside it would be a defect of its own)."""
    package = list(pathlib.Path(REPO_ROOT, path).parent.relative_to(ENGINE_DIR).parts)
    found = set()
    for node in ast.walk(ast.parse(pathlib.Path(REPO_ROOT, path).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = package[:len(package) - (node.level - 1)]
            if node.module:
                found.add(".".join(base + node.module.split(".")))
            else:
                found.update(".".join(base + [alias.name]) for alias in node.names)
    return found


def test_the_source_side_of_every_kind_is_checked():
    assert "plugins/module_utils/engine/kinds/postgres/source.py" in SOURCE_SIDE
    assert "plugins/module_utils/engine/kinds/postgres/wal.py" in SOURCE_SIDE
    assert len([path for path in SOURCE_SIDE if path.endswith("/source.py")]) == 7
    assert engine_modules_imported("plugins/module_utils/engine/kinds/postgres/source.py") >= {
        "procutil", "errors", "kinds.contract", "kinds.postgres.connection"}


@pytest.mark.parametrize("path", SOURCE_SIDE)
def test_sources_do_not_import_storage_or_the_catalog(path):
    reached = {name for name in engine_modules_imported(path) if name.split(".")[0] in STORING | {"storage", "resticstore"}}
    assert not reached, "%s imports %s: sources produce payloads, the engine stores them" % (path, sorted(reached))
