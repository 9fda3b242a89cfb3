"""Finding backups: list a job's backups, the latest, by id, or at a point in time.

Truth is the set of ``manifest.json`` objects. To list N backups without N requests, each
job keeps ``<job>/index.json`` holding copies of its manifests (and verification records)
together with the byte size of each source object. A listing is one paginated LIST plus
one GET of the index; an entry is re-read only when the LIST shows its manifest changed
size, is missing from the index, or vanished. The index is therefore a cache that repairs
itself: a lost race between two writers costs extra GETs, never a wrong answer.
"""

import json

from . import manifest as mf
from .errors import IntegrityError, NotFoundError, StorageError
from .storage.base import TMP_MARKER, is_unfinished
from .timeutil import is_backup_id, parse_iso, to_iso, utc_now

INDEX_NAME = "index.json"
INDEX_SCHEMA = 1
# restic.REPOSITORY_DIR: the restic format's repositories live under <prefix>/_restic/<job>/
# (no job can be named so: job names start with a letter or digit).
RESTIC_DIR = "_restic"


class Catalog:
    def __init__(self, storage, repair_index=True):
        self.storage = storage
        # A scan that had to re-read manifests writes the index back (best effort), so a
        # lost race between writers or a damaged index costs extra GETs once, not forever.
        self.repair_index = repair_index
        self.junk = []       # [{key, reason}] seen by the last scan
        self.orphans = []    # [ObjectInfo] under backup directories without a manifest

    # -- reading -----------------------------------------------------------------------
    def _read_index(self, job):
        try:
            data = json.loads(self.storage.get_bytes("%s/%s" % (job, INDEX_NAME)).decode("utf-8"))
        except NotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError):
            self.junk.append({"key": "%s/%s" % (job, INDEX_NAME), "reason": "unreadable catalog index (rebuilt)"})
            return {}
        if not isinstance(data, dict) or data.get("schema") != INDEX_SCHEMA or not isinstance(data.get("backups"), dict):
            self.junk.append({"key": "%s/%s" % (job, INDEX_NAME), "reason": "unexpected catalog index layout (rebuilt)"})
            return {}
        # Entries are cached copies only: anything malformed is dropped and re-read from storage.
        return {backup_id: entry for backup_id, entry in data["backups"].items() if isinstance(entry, dict)}

    def _load_json(self, key, loader):
        try:
            raw = self.storage.get_bytes(key)
        except NotFoundError:
            return None, 0
        return loader(raw), len(raw)

    def scan(self, job=None, with_orphans=True):
        """Every complete backup of ``job`` (or of all jobs), as manifests, newest first.

        Each manifest gets a ``verification`` key (the last recorded verification or None).
        Junk (unparseable manifests, stray objects) is skipped and listed in ``self.junk``.
        """
        if job is not None:
            mf.validate_job_name(job)
        self.junk = []
        self.orphans = []
        objects = self.storage.list("%s/" % job if job else "")
        by_job = {}
        indexed = set()
        for info in objects:
            parts = info.key.split("/")
            if parts[0] == RESTIC_DIR:
                continue  # the restic format's repositories (engine/restic.py): not a job, not junk
            if len(parts) == 2 and parts[1] == INDEX_NAME:
                by_job.setdefault(parts[0], {})
                indexed.add(parts[0])
                continue
            if len(parts) < 3 or not is_backup_id(parts[1]):
                # Leftovers of interrupted writes (or inside a directory named like one) are
                # prune's to remove, not junk.
                if not is_unfinished(info.key) and "/" + TMP_MARKER not in info.key:
                    self.junk.append({"key": info.key, "reason": "not inside a backup directory"})
                continue
            by_job.setdefault(parts[0], {}).setdefault(parts[1], []).append(info)
        backups = []
        for job_name, dirs in sorted(by_job.items()):
            backups.extend(self._scan_job(job_name, dirs, with_orphans, job_name in indexed))
        # Parsed times, not strings: '...05Z' and '...05+00:00' are the same instant. Ids
        # break ties within one second (they sort in start order, see timeutil.new_backup_id).
        backups.sort(key=lambda m: (parse_iso(m.started_at), m.id), reverse=True)
        return backups

    def _cached_manifest(self, entry, manifest_info, where):
        """The index's copy of a manifest when it is still valid for the listed object, else None."""
        manifest = entry.get("manifest")
        if manifest is None or entry.get("manifest_size") != manifest_info.size:
            return None
        try:
            return mf.validate(manifest, where)
        except IntegrityError:
            return None  # a damaged or foreign index entry: read the manifest itself

    def _scan_job(self, job, dirs, with_orphans, indexed=True):
        # No GET for an index the LIST did not show (a new job, or a lost index).
        index = self._read_index(job) if dirs and indexed else {}
        found = []
        fresh = {}  # what the index should hold after this scan
        for backup_id, infos in sorted(dirs.items()):
            base = "%s/%s/" % (job, backup_id)
            # Only direct children count: '<id>/sub/manifest.json' is not this backup's manifest.
            names = {info.key[len(base):]: info for info in infos}
            manifest_info = names.get(mf.MANIFEST_NAME)
            if manifest_info is None:
                if with_orphans:
                    self.orphans.extend(infos)
                continue
            entry = index.get(backup_id) or {}
            key = mf.object_key(job, backup_id, mf.MANIFEST_NAME)
            manifest = self._cached_manifest(entry, manifest_info, key)
            if manifest is None:
                try:
                    manifest, dummy = self._load_json(key, lambda raw, k=key: mf.loads(raw, k))
                except IntegrityError as exc:
                    self.junk.append({"key": key, "reason": str(exc)})
                    continue
                if manifest is None:
                    continue  # deleted between LIST and GET
            if manifest.id != backup_id or manifest.job != job:
                self.junk.append({"key": key, "reason": "manifest id/job do not match its location"})
                continue
            verification = entry.get("verification")
            ver_info = names.get(mf.VERIFICATION_NAME)
            if ver_info is None:
                verification = None
            elif verification is None or entry.get("verification_size") != ver_info.size:
                vkey = mf.object_key(job, backup_id, mf.VERIFICATION_NAME)
                try:
                    verification, dummy = self._load_json(vkey, lambda raw: json.loads(raw.decode("utf-8")))
                except (ValueError, UnicodeDecodeError):
                    self.junk.append({"key": vkey, "reason": "unreadable verification record"})
                    verification = None
            fresh[backup_id] = {"manifest": manifest, "manifest_size": manifest_info.size}
            if verification is not None:
                fresh[backup_id].update(verification=verification, verification_size=ver_info.size)
            found.append(manifest.with_fields(verification=verification))
        if self.repair_index and fresh != index:
            self._write_index(job, fresh)
        return found

    def incomplete_uploads(self, job=None, now=None):
        """Uploads started below ``job`` (or anywhere at the location) and never completed.

        On S3 these are the multipart uploads of killed runs: invisible to every listing, yet
        their parts take (billed) space until aborted; prune's orphan sweep aborts them after
        its grace period. Each entry: ``key``, ``upload_id``, ``initiated``, ``age_seconds``,
        ``parts`` and ``bytes`` (None when the upload finished between the two requests).
        Costs one listing of uploads plus one ListParts per upload found; other backends
        have none.
        """
        if job is not None:
            mf.validate_job_name(job)
        now = now or utc_now()
        report = []
        for upload in self.storage.list_incomplete_uploads("%s/" % job if job else ""):
            if upload.key.split("/", 1)[0] == RESTIC_DIR:
                continue  # restic writes whole objects; nothing of its own to abort here
            held = self.storage.incomplete_upload_size(upload.key, upload.upload_id)
            report.append({
                "key": upload.key, "upload_id": upload.upload_id, "initiated": to_iso(upload.initiated),
                "age_seconds": max(0, int((now - upload.initiated).total_seconds())),
                "parts": held[0] if held else None, "bytes": held[1] if held else None,
            })
        report.sort(key=lambda entry: (entry["initiated"], entry["key"]))
        return report

    def jobs(self):
        return sorted({m.job for m in self.scan(with_orphans=False)})

    def get(self, job, backup_id):
        for manifest in self.scan(job, with_orphans=False):
            if manifest.id == backup_id:
                return manifest
        raise NotFoundError("job %s has no complete backup with id %s" % (job, backup_id))

    def latest(self, job, kind=None):
        for manifest in self.scan(job, with_orphans=False):
            if kind is None or manifest.kind == kind:
                return manifest
        raise NotFoundError("job %s has no complete backup yet" % job)

    def at_or_before(self, job, moment):
        """The newest complete backup that finished at or before ``moment``."""
        limit = parse_iso(moment)
        for manifest in self.scan(job, with_orphans=False):
            if parse_iso(manifest.finished_at) <= limit:
                return manifest
        raise NotFoundError("job %s has no complete backup at or before %s" % (job, moment))

    def resolve(self, job, selector):
        """``latest``, a backup id, or an ISO-8601 time (newest at or before it)."""
        if selector in (None, "", "latest"):
            return self.latest(job)
        if is_backup_id(selector):
            return self.get(job, selector)
        try:
            parse_iso(selector)
        except ValueError:
            raise NotFoundError("backup %r is neither 'latest', a backup id nor an ISO-8601 time" % (selector,)) from None
        return self.at_or_before(job, selector)

    def chain(self, manifest):
        """For an incremental backup: the full backup and every incremental up to it, oldest first."""
        manifest = mf.Manifest.wrap(manifest)
        by_id = {m.id: m for m in self.scan(manifest.job, with_orphans=False)}
        chain = [manifest]
        seen = {manifest.id}
        while chain[0].parent:
            parent = by_id.get(chain[0].parent)
            if parent is None:
                raise IntegrityError("backup %s depends on %s, which is missing: the chain is broken"
                                     % (chain[0].id, chain[0].parent))
            if parent.id in seen:
                raise IntegrityError("backup chain of %s loops at %s" % (manifest.id, parent.id))
            seen.add(parent.id)
            chain.insert(0, parent)
        return chain

    # -- writing -----------------------------------------------------------------------
    def publish(self, manifest):
        """Write ``manifest.json`` (the moment the backup exists), then refresh the index."""
        data = mf.dumps(manifest)
        self.storage.put_bytes(mf.object_key(manifest["job"], manifest["id"], mf.MANIFEST_NAME), data)
        self._update_index(manifest["job"], set_entries={manifest["id"]: {"manifest": manifest, "manifest_size": len(data)}})

    def record_verification(self, manifest, result):
        data = (json.dumps(result, indent=2, sort_keys=True) + "\n").encode("utf-8")
        self.storage.put_bytes(mf.object_key(manifest["job"], manifest["id"], mf.VERIFICATION_NAME), data)
        self._update_index(manifest["job"], set_verification={manifest["id"]: (result, len(data))})

    def delete_backup(self, manifest_or_job, backup_id=None):
        """Manifest first (the backup stops existing), then payload, then the index entry."""
        job, backup_id = (manifest_or_job["job"], manifest_or_job["id"]) if backup_id is None else (manifest_or_job, backup_id)
        prefix = "%s/%s/" % (job, backup_id)
        self.storage.delete(prefix + mf.MANIFEST_NAME)
        for info in self.storage.list(prefix):
            self.storage.delete(info.key)
        self._update_index(job, drop=[backup_id])

    def _update_index(self, job, set_entries=None, set_verification=None, drop=()):
        try:
            entries = self._read_index(job)
            for backup_id, entry in (set_entries or {}).items():
                entries[backup_id] = dict(entries.get(backup_id, {}), **entry)
            for backup_id, (result, size) in (set_verification or {}).items():
                if backup_id in entries:
                    entries[backup_id]["verification"] = result
                    entries[backup_id]["verification_size"] = size
            for backup_id in drop:
                entries.pop(backup_id, None)
        except StorageError:
            return  # could not read it: the next scan rebuilds it
        self._write_index(job, entries)

    def _write_index(self, job, entries):
        payload = {"schema": INDEX_SCHEMA, "job": job, "backups": entries}
        try:
            self.storage.put_bytes("%s/%s" % (job, INDEX_NAME),
                                   (json.dumps(payload, sort_keys=True) + "\n").encode("utf-8"))
        except StorageError:
            # The index is only a cache: a failed refresh costs extra reads on the next scan
            # (and read-only credentials simply never refresh it).
            pass


def upload_summary(uploads):
    """``{count, bytes, oldest_age_seconds}`` of ``Catalog.incomplete_uploads`` entries."""
    return {"count": len(uploads), "bytes": sum(entry["bytes"] or 0 for entry in uploads),
            "oldest_age_seconds": max((entry["age_seconds"] for entry in uploads), default=None)}
