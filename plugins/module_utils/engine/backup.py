"""Taking one backup: options checked, source streamed, objects stored, manifest last."""

import hashlib
import platform

from . import anomaly
from . import codecs
from . import manifest as mf
from . import resticstore
from .catalog import Catalog
from .restic import build_streams_manifest
from .errors import BackupError, ConfigError, IntegrityError, NotFoundError
from .kinds.contract import BackupContext
from .pipeline import PlaintextStream, Progress, check_object, store_stream
from .timeutil import new_backup_id, to_iso, utc_now

ENGINE_VERSION = "0.1.0"


def recorded_compression(manifest):
    """The compression algorithm ``manifest`` records; IntegrityError for one this engine does
    not know (checked before any object is opened)."""
    algorithm = manifest.compression_algorithm
    if algorithm not in codecs.SUFFIX:
        raise IntegrityError("backup %s records unknown compression %r" % (manifest.id, algorithm))
    return algorithm


def open_payload(storage, manifest, payload_name, identities=None):
    """A PlaintextStream of one payload of a stored backup (used by incrementals and restores);
    for a restic-format backup a stream of ``restic dump`` with the same checks."""
    manifest = mf.Manifest.wrap(manifest)
    if resticstore.is_restic(manifest):
        return resticstore.ResticPayloadStream(storage, manifest, payload_name)
    obj = manifest.payload_object(payload_name)
    if obj is None:
        raise NotFoundError("backup %s has no payload %s" % (manifest.id, payload_name))
    key = mf.object_key(manifest.job, manifest.id, obj.name)
    return PlaintextStream(storage, key, obj, recorded_compression(manifest), identities)


class _RunContext(BackupContext):
    """The engine's answers to a source's questions during one backup run."""

    def __init__(self, job, options, storage, catalog, identities):
        super().__init__(job, options)
        self._storage = storage
        self._catalog = catalog
        self._identities = identities

    def latest(self):
        return self._catalog.latest(self.job)

    def chain(self, manifest):
        return self._catalog.chain(manifest)

    def chains_onto(self, manifest):
        # A chain never needs the repository password or mixes the two formats.
        return not resticstore.is_restic(manifest)

    def open_object(self, manifest, payload_name):
        return open_payload(self._storage, manifest, payload_name, self._identities)

    def stored_intact(self, manifest, payload_name):
        obj = manifest.payload_object(payload_name)
        if obj is None:
            return False
        key = mf.object_key(manifest.job, manifest.id, obj.name)
        try:
            check_object(self._storage, key, obj, "none")  # the stored bytes, not decoded
        except (IntegrityError, NotFoundError):
            return False
        return True

    def storage_directory(self):
        return self._storage.local_directory()


class BackupRun:
    """One backup of one job. Construct (validates everything), then ``run()``."""

    def __init__(self, job, source, storage, compression=None, encryption=None, progress=None,
                 identities=None, size_policy=None):
        self.job = mf.validate_job_name(job)
        self.source = source
        self.storage = storage
        self.format = resticstore.storage_format(storage)
        self.compression = codecs.compression_settings(compression)
        self.encryption = codecs.encryption_settings(encryption)
        if self.format == resticstore.RESTIC:
            # Refused before anything is read or written.
            resticstore.check_kind(source.kind, self.job, source.options)
            if self.encryption["mode"] != "none":
                raise ConfigError("job %s: storage.format restic encrypts with the repository password; "
                                  "remove the encryption option (or keep the job in the archive format)" % job)
            self.repository = resticstore.repository(storage, self.job)
        elif source.requires_encryption and self.encryption["mode"] == "none":
            raise ConfigError("job %s (%s) stores secrets: refusing to back it up without encryption"
                              % (job, source.kind))
        self.progress = progress or Progress()
        self.identities = identities  # for incrementals that must read their parent's state
        # None: no size check. Otherwise a SizePolicy or its mapping ({} = defaults): the new
        # size is judged against the previous good backup before the manifest is published,
        # and the manifest records size_change_ratio and size_check (engine/anomaly.py).
        self.size_policy = None if size_policy is None else (
            size_policy if isinstance(size_policy, anomaly.SizePolicy)
            else anomaly.SizePolicy.from_mapping(size_policy))
        self.size_verdict = None
        self.catalog = Catalog(storage)
        self.backup_id = None

    def plan(self):
        """What would run, for check mode: no source is read and nothing is written."""
        planned = {
            "job": self.job, "kind": self.source.kind, "source": self.source.describe(),
            "storage": self.storage.describe(), "compression": self.compression,
            "encryption": codecs.public_encryption_info(self.encryption), "storage_format": self.format,
        }
        if self.format == resticstore.RESTIC:
            # What the real run would fail on first, read-only: restic too old or missing, a
            # repository the password does not open (none yet is fine: the run creates it).
            planned["restic_version"] = self.repository.version()[0]
            try:
                planned["restic_repository"] = dict(self.repository.config(), exists=True)
            except NotFoundError:
                planned["restic_repository"] = {"exists": False}
        return planned

    def run(self):
        try:
            return self._run()
        finally:
            self.source.close()

    def _run(self):
        if self.format == resticstore.RESTIC:
            return self._run_restic()
        self.storage.ensure_ready()
        self.source.preflight()
        started = utc_now()
        self.backup_id = new_backup_id(started)
        objects = []
        context = None
        try:
            context = self._context()
            if self.encryption.get("_envelope"):
                objects.append(self._store_bytes(codecs.ENVELOPE_OBJECT, self.encryption["_envelope"], role="key"))

            def emit(payload_name, readable):
                name = codecs.stored_name(payload_name, self.compression["algorithm"], self.encryption["mode"])
                if any(obj["name"] == name for obj in objects):
                    raise BackupError("source %s emitted payload %s twice" % (self.source.kind, payload_name))
                key = mf.object_key(self.job, self.backup_id, name)
                result = store_stream(readable, self.storage, key, self.compression, self.encryption, self.progress)
                objects.append({"name": name, "payload": payload_name, "size": result["size"],
                                "sha256": result["sha256"], "raw_bytes": result["raw_bytes"]})
                return result

            stats = self.source.produce(emit, context)
            if not any(obj.get("payload") for obj in objects):
                raise BackupError("source %s produced no data" % self.source.kind)
            finished = utc_now()
            manifest = mf.build(
                backup_id=self.backup_id, job=self.job, kind=self.source.kind,
                started_at=to_iso(started), finished_at=to_iso(finished), objects=objects,
                compression={"algorithm": self.compression["algorithm"], "level": self.compression["level"]},
                encryption=codecs.public_encryption_info(self.encryption),
                tool_versions=self._tool_versions(),
                stats=stats or {}, parent=context.parent["id"] if context.parent else None,
                source=self.source.describe(),
                extra=self._extra(started, finished, sum(obj.get("raw_bytes", 0) for obj in objects)),
            )
            return self._publish(manifest)
        except BaseException:
            self._discard()
            raise

    def _run_restic(self):
        """The restic format: each payload streamed into the job's repository (one snapshot each,
        tagged job, kind, backup id and payload), the manifest written last."""
        self.storage.ensure_ready()
        self.source.preflight()
        self.repository.init_if_missing()
        repository_config = self.repository.config()
        started = utc_now()
        self.backup_id = new_backup_id(started)
        streams = []
        try:
            context = self._context()

            def emit(payload_name, readable):
                if any(name == payload_name for name, dummy in streams):
                    raise BackupError("source %s emitted payload %s twice" % (self.source.kind, payload_name))
                result = self.repository.backup_stream(
                    _Counted(readable, self.progress), payload_name,
                    {"job": self.job, "kind": self.source.kind, "backup_id": self.backup_id,
                     "payload": payload_name})
                streams.append((payload_name, result))
                self.progress.stored(result.get("data_added") or 0)
                return result

            stats = self.source.produce(emit, context)
            if not streams:
                raise BackupError("source %s produced no data" % self.source.kind)
            finished = utc_now()
            manifest = build_streams_manifest(
                self.backup_id, self.job, self.source.kind, to_iso(started), to_iso(finished), streams,
                repository_config, self._tool_versions(restic=self.repository.version()[0]),
                stats or {}, source=self.source.describe(),
                extra=self._extra(started, finished, sum(result["size"] for dummy, result in streams)))
            return self._publish(manifest)
        except BaseException:
            self._forget_unpublished([result["snapshot_id"] for dummy, result in streams])
            self._discard()
            raise

    def _tool_versions(self, **more):
        """The manifest's ``tool_versions``: the source's tools, the engine and Python (and ``more``)."""
        return dict(self.source.tool_versions(), engine=ENGINE_VERSION, python=platform.python_version(), **more)

    def _extra(self, started, finished, raw_bytes):
        """The manifest fields every format adds: the run's duration and the plaintext bytes."""
        return dict(duration_seconds=round((finished - started).total_seconds(), 3),
                    raw_bytes=raw_bytes)

    def _publish(self, manifest):
        """The size check (its verdict goes into the manifest), then the manifest, stored last:
        from here on the backup is listed."""
        if self.size_policy is not None:
            self.size_verdict = anomaly.check_new_backup(self.catalog, manifest, self.size_policy)
            manifest = manifest.with_fields(**anomaly.manifest_fields(self.size_verdict))
        self.catalog.publish(manifest)
        return manifest

    def _forget_unpublished(self, snapshots):
        """Best effort: forget the snapshots of a backup whose manifest was not stored."""
        if not snapshots:
            return
        try:
            if not self.storage.exists(mf.object_key(self.job, self.backup_id, mf.MANIFEST_NAME)):
                self.repository.forget(snapshots)
        except Exception:  # pylint: disable=broad-except  # the original error matters more
            pass

    def _context(self):
        context = _RunContext(self.job, self.source.options, self.storage, self.catalog, self.identities)
        context.parent = self.source.wants_parent(context)
        return context

    def _store_bytes(self, name, data, role):

        key = mf.object_key(self.job, self.backup_id, name)
        self.storage.put_bytes(key, data)
        return {"name": name, "role": role, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def _discard(self):
        """Best effort: remove what this run stored. Leftovers are orphans that prune removes.

        Once the manifest is stored the backup is complete, and an error after that point
        (an interrupt while the catalog index is refreshed) must not delete it.
        """
        if self.backup_id is None:
            return
        try:
            if self.storage.exists(mf.object_key(self.job, self.backup_id, mf.MANIFEST_NAME)):
                return
            for info in self.storage.list("%s/%s/" % (self.job, self.backup_id)):
                self.storage.delete(info.key)
        except Exception:  # pylint: disable=broad-except  # the original error matters more
            pass


class _Counted:
    """A readable that counts what is read into a Progress (the restic format's streams)."""

    def __init__(self, readable, progress):
        self._readable = readable
        self._progress = progress

    def read(self, size=-1):
        data = self._readable.read(size)
        if data:
            self._progress.read(len(data))
        return data
