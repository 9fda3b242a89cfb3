# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A minimal real Source/Target pair for testing the restore and verify orchestration.

``BlobSource`` stores the byte strings it is given (one payload each); ``DirTarget`` restores
them as files into a directory, next to it first and swapped in only when every payload's
size and SHA-256 match the manifest's ``stats``. ``StagingDirTarget`` is the same target on
the one-pass path: it declares every payload of the chain, and its restore checks that every
stream it opened was finished before the swap. Both go through the real engine: the real
pipeline, codecs, storage backends, catalog, restore and verify code. Only the kind is
made up, so that orchestration is tested independently of the real kinds' tools.
"""

import contextlib
import hashlib
import io
import os
import shutil
import tempfile

from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import IntegrityError, NotFoundError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Target


def digest(data):
    return hashlib.sha256(data).hexdigest()


class BlobSource(Source):
    kind = "blob"

    def describe(self):
        return {"payloads": sorted(self.options["payloads"])}

    def wants_parent(self, context):
        if not self.options.get("incremental"):
            return None
        try:
            return context.latest()
        except NotFoundError:
            return None

    def produce(self, emit, context):
        stats = {}
        for name, data in sorted(self.options["payloads"].items()):
            emit(name, io.BytesIO(data))
            stats[name] = {"bytes": len(data), "sha256": digest(data)}
        return {"payloads": stats}


class DirTarget(Target):
    kind = "blob"

    def __init__(self, options):
        super().__init__(options)
        self.path = options["path"]
        self.calls = []
        self.unfinished = 0  # payload streams opened and not (yet) finished
        self.swapped = False

    def staging_path(self):
        return self.path + ".staging"

    def _swap(self, staging):
        if self.unfinished:
            raise AssertionError("%d payload streams are not finished at the swap" % self.unfinished)
        self.swapped = True
        old = self.path + ".old"
        if os.path.exists(self.path):
            os.rename(self.path, old)
        os.rename(staging, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def describe(self):
        return {"path": self.path}

    def preflight(self, manifest):
        self.calls.append("preflight")

    def restore(self, context):
        self.calls.append("restore")
        staging = self.staging_path()
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            for manifest in context.chain:  # later backups of a chain overwrite earlier payloads
                for obj in manifest["objects"]:
                    if not obj.get("payload"):
                        continue
                    stream = context.open_payload(manifest, obj["payload"])
                    self.unfinished += 1
                    try:
                        with open(os.path.join(staging, obj["payload"]), "wb") as out:
                            while True:
                                chunk = stream.read(65536)
                                if not chunk:
                                    break
                                out.write(chunk)
                        stream.finish()
                        self.unfinished -= 1
                    finally:
                        stream.close()
            checks = []
            for name, expected in sorted(context.manifest["stats"]["payloads"].items()):
                try:
                    with open(os.path.join(staging, name), "rb") as handle:
                        data = handle.read()
                    actual = {"bytes": len(data), "sha256": digest(data)}
                except FileNotFoundError:
                    actual = None
                checks.append({"what": "payload %s" % name, "expected": expected, "actual": actual,
                               "ok": actual == expected})
            if not all(check["ok"] for check in checks):
                raise IntegrityError("restored payloads differ from the manifest's stats")
            self._swap(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {"changed": True, "checks": checks}

    @classmethod
    @contextlib.contextmanager
    def scratch(cls, manifest, options):
        with tempfile.TemporaryDirectory(prefix="scratch-") as tmp:
            yield cls({"path": os.path.join(tmp, "restore")})


class StagingDirTarget(DirTarget):
    """DirTarget on the one-pass path: it declares every payload of the chain.

    Its restore already keeps the promise: each stream is read to its end and finished
    before the next is opened, all of them before the swap, and the staging directory is
    removed on any exception.
    """

    def one_pass_payloads(self, manifest, chain):
        return {(item["id"], obj["payload"]) for item in chain for obj in item["objects"] if obj.get("payload")}


def tree_state(path):
    """Every file, directory and symlink below ``path`` with its mode and content hash."""
    state = {}
    if not os.path.exists(path):
        return None
    for root, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            info = os.lstat(full)
            if os.path.islink(full):
                state[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                state[rel] = ("dir", info.st_mode)
            else:
                with open(full, "rb") as handle:
                    state[rel] = ("file", info.st_mode, digest(handle.read()))
    return state


class CountingStorage:
    """Wraps a storage location and counts how often each object is opened for reading
    (one-pass restores read each payload once, two-pass ones twice)."""

    def __init__(self, storage):
        self._storage = storage
        self.opened = {}

    def open_reader(self, key):
        self.opened[key] = self.opened.get(key, 0) + 1
        return self._storage.open_reader(key)

    def get_bytes(self, key):
        self.opened[key] = self.opened.get(key, 0) + 1
        return self._storage.get_bytes(key)

    def __getattr__(self, name):
        return getattr(self._storage, name)
