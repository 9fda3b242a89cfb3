"""Restore for ``directory_sync``: copy the mirror back (the seed's ``rsync -a /backup/data/ /restored/``).

A mirror holds one state only, the latest sync's. The catalog entry being restored is the
*record* of a sync, so the restore first checks that the mirror still is what that record
describes — its regular file count and total size equal the record's ``--stats`` (exact
for ``delete: true`` syncs, whose mirror equals the source) — and refuses otherwise (a later
sync, or edits in the mirror): an older point in time cannot come from a mirror. Then rsync
copies the mirror into a staging directory next to the destination, the copy is counted
again, and only then moved into place.

No one-pass path (``one_pass_payloads`` stays None): the restore reads no payload stream —
the data comes from the mirror, and the record's only payload, ``sync.log``, is verified
in full before the restore like every object; declaring nothing saves nothing.
"""

import os

from ...errors import ConfigError, IntegrityError
from ...manifest import Manifest
from ...schema import Field
from ...procutil import find_tool, run_tool, tool_env
from ..files import archive as fmt
from .source import parse_stats
from ..files.target import DirectoryTarget, destination_schema, force_rmtree


def mirror_counts(root):
    """Regular files and rsync's "Total file size" (regular bytes + symlink target lengths)."""
    files = size = 0
    for rel, info in fmt.walk(root):
        kind = fmt.file_type(info.st_mode)
        if kind == fmt.TYPE_FILE:
            files += 1
            size += info.st_size
        elif kind == fmt.TYPE_SYMLINK:
            size += len(os.fsencode(os.readlink(os.path.join(root, rel))))
    return files, size


class DirectorySyncTarget(DirectoryTarget):
    """Options: ``path`` (destination directory), ``mirror`` (default: the record's
    ``stats.destination``), ``overwrite``, ``require_record_match`` (default true: refuse when
    the mirror no longer matches the sync record), ``rsync`` (binary)."""

    kind = "directory_sync"
    SCHEMA = destination_schema(
        mirror=Field("path", "the mirror to restore from (default: the record's destination)", absolute=True),
        require_record_match=Field("bool", "refuse when the mirror no longer matches the sync record (default true)"),
        rsync=Field("path", "rsync binary (default: PATH)"),
    )

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        self.mirror = options.get("mirror")
        self.require_record_match = options.get("require_record_match", True)
        self.rsync = options.get("rsync") or "rsync"

    def describe(self):
        return {"path": self.path, "mirror": self.mirror or "(the record's destination)", "overwrite": self.overwrite}

    def _mirror_of(self, manifest):
        mirror = self.mirror or manifest.stats.get("destination")
        if not mirror or not os.path.isdir(mirror):
            raise ConfigError("the mirror %s of sync %s is not a directory here (mount it, or give "
                              "target mirror: ...)" % (mirror, manifest.id))
        return os.path.normpath(mirror)

    def preflight(self, manifest):
        manifest = Manifest.wrap(manifest)
        if manifest.kind != self.kind:
            raise ConfigError("backup %s is a %s backup, not directory_sync" % (manifest.id, manifest.kind))
        mirror = self._mirror_of(manifest)
        real_mirror, real_path = os.path.realpath(mirror), os.path.realpath(self.path)
        if real_path == real_mirror or real_path.startswith(real_mirror + "/") or real_mirror.startswith(real_path + "/"):
            raise ConfigError("restore destination %s overlaps the mirror %s" % (self.path, mirror))
        self.destination.preflight()

    def restore(self, context):
        manifest = context.manifest
        stats = manifest.stats
        mirror = self._mirror_of(manifest)
        files, size = mirror_counts(mirror)
        checks = []
        record_matches = None
        if stats.get("delete"):
            record = [stats.get("regular_files", 0), stats.get("total_bytes")]
            record_matches = record == [files, size]
            if self.require_record_match:
                if not record_matches:
                    raise IntegrityError(
                        "mirror %s no longer matches sync record %s (%d files, %d bytes now; the record says %s): "
                        "a later sync or edits changed it, and a mirror keeps no older state. Restore from the "
                        "newest sync record, or set require_record_match: false to copy what the mirror holds now"
                        % (mirror, manifest.id, files, size, record))
                checks.append({"what": "mirror still matches sync record %s (regular files, total bytes)"
                               % manifest.id, "expected": record, "actual": [files, size], "ok": True})
        if context.check_mode:
            return {"changed": True, "destination": self.path, "mirror": mirror, "checks": checks,
                    "plan": "would copy %d files (%d bytes) from %s to %s" % (files, size, mirror, self.path)}
        staging, inside = self.destination.make_staging()
        try:
            binary = self.rsync if os.path.isabs(self.rsync) else find_tool(self.rsync)
            output = run_tool([binary, "--archive", "--no-human-readable", "--stats", "--numeric-ids", "--",
                               mirror.rstrip("/") + "/", staging + "/"],
                              env=tool_env({}), what="rsync %s/ -> %s" % (mirror, self.path), timeout=None)
            copied = parse_stats(output)
            restored = mirror_counts(staging)
            checks.append({"what": "rsync copied every regular file and byte of the mirror",
                           "expected": [files, size],
                           "actual": [copied.get("transferred"), copied.get("total_bytes")],
                           "ok": [copied.get("transferred"), copied.get("total_bytes")] == [files, size]})
            checks.append({"what": "regular files and bytes in the restored tree", "expected": [files, size],
                           "actual": list(restored), "ok": list(restored) == [files, size]})
            failed = [check for check in checks if not check["ok"]]
            if failed:
                raise IntegrityError("restore from mirror %s failed its checks: %s" % (
                    mirror, "; ".join("%s: expected %s, got %s" % (c["what"], c["expected"], c["actual"]) for c in failed)))
            self.destination.move_into_place(staging, inside)
        except BaseException:
            force_rmtree(staging)
            raise
        return {"changed": True, "destination": self.path, "mirror": mirror, "files": files, "bytes": size,
                "record_matches": record_matches, "checks": checks}
