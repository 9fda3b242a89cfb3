"""The name of an unfinished object (``.<name>.tmp-<token>``) has one owner: engine/storage/base.py.

The filesystem writer builds it with ``unfinished_name``; the catalog, prune and restore
recognise it with ``is_unfinished``. Here a real FilesystemStorage writer is left unfinished
(what a crash leaves) and each reader is checked to treat the leftover the same way.
"""

import ast
import datetime
import hashlib
import os
import re

from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine import prune as pr
from ansible_collections.biometrics.backup.plugins.module_utils.engine import integrity
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.base import (
    TMP_MARKER, is_unfinished, unfinished_name)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import UTC, new_backup_id, to_iso

ENGINE = os.path.join(os.path.dirname(__file__), "..", "..", "plugins", "module_utils", "engine")
T0 = datetime.datetime(2024, 1, 15, 2, 0, 0, tzinfo=UTC)


def test_names_built_are_names_recognised():
    assert TMP_MARKER == ".tmp-"
    assert unfinished_name("data.tar.gz", "0a1b2c3d") == ".data.tar.gz.tmp-0a1b2c3d"
    assert is_unfinished(unfinished_name("data.tar.gz", "0a1b2c3d"))
    assert is_unfinished("job/20240115T020000Z-abcd/" + unfinished_name("manifest.json", "ff"))
    assert not is_unfinished("job/20240115T020000Z-abcd/data.tar.gz")
    assert not is_unfinished("job/.tmp-dir/data.tar")  # judged by the last component only


def _stored_backup(storage, job="j"):
    backup_id = new_backup_id(T0)
    payload = b"payload"
    storage.put_bytes(mf.object_key(job, backup_id, "data.tar"), payload)
    manifest = mf.build(
        backup_id=backup_id, job=job, kind="files", started_at=to_iso(T0),
        finished_at=to_iso(T0 + datetime.timedelta(seconds=5)),
        objects=[{"name": "data.tar", "payload": "data.tar", "size": len(payload),
                  "sha256": hashlib.sha256(payload).hexdigest()}],
        compression={"algorithm": "none", "level": 0}, encryption={"mode": "none"},
        tool_versions={}, stats={"files": 1})
    Catalog(storage).publish(manifest)
    return manifest


def test_a_crashed_write_is_named_by_the_helper_and_treated_alike_everywhere(tmp_path):
    root = tmp_path / "backups"
    root.mkdir()
    storage = FilesystemStorage(str(root))
    manifest = _stored_backup(storage)
    directory = "j/%s/" % manifest["id"]

    writer = storage.open_writer(directory + "extra.bin")  # never committed nor aborted: a crash
    writer.write(b"half")
    on_disk = sorted(os.listdir(str(root / "j" / manifest["id"])))
    left = [name for name in on_disk if name not in ("data.tar", mf.MANIFEST_NAME)]
    assert len(left) == 1 and re.fullmatch(r"\.extra\.bin\.tmp-[0-9a-f]{8}", left[0]), on_disk
    assert left[0] == unfinished_name("extra.bin", left[0].rsplit(TMP_MARKER, 1)[1])
    key = directory + left[0]
    assert is_unfinished(key)

    # The catalog: neither junk nor an orphan; the backup is complete.
    catalog = Catalog(storage)
    assert [m["id"] for m in catalog.scan("j")] == [manifest["id"]]
    assert catalog.junk == [] and catalog.orphans == []
    # Restore: not a stray object of the backup.
    listed = {obj["name"] for obj in manifest["objects"]}
    integrity._check_no_strays(storage, manifest, listed)  # pylint: disable=protected-access
    # Prune: a leftover to remove once the grace period is over, and only that.
    remove, wait = pr.find_orphans(storage, catalog, "j", {manifest["id"]}, datetime.timedelta(0),
                                   datetime.datetime.now(UTC) + datetime.timedelta(minutes=1))
    assert wait == [] and [entry["objects"] for entry in remove] == [[key]]
    writer.abort()


def _string_literals(path):
    """String constants of a module, docstrings left out (prose may name the marker)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    # A string that is a whole statement: a module, class, function or attribute docstring.
    docstrings = set(id(node.value) for node in ast.walk(tree)
                     if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_the_marker_is_spelled_in_one_place():
    spelled = []
    for directory, _dirs, files in os.walk(ENGINE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                for line, value in _string_literals(path):
                    if ".tmp-" in value:
                        spelled.append("%s:%d" % (os.path.relpath(path, ENGINE).replace(os.sep, "/"), line))
    assert len(spelled) == 1 and spelled[0].startswith("storage/base.py:"), spelled
