"""What a backup is: the manifest written last into ``<prefix>/<job>/<backup-id>/``.

A backup exists only when its manifest exists; everything else under a backup directory
is garbage for the next prune. The manifest never holds key material or credentials.

In memory a manifest is a :class:`Manifest` and each of its ``objects`` a
:class:`StoredObject`: dicts (so they serialise, compare and copy exactly like the JSON
they come from, and the catalog index stays byte-for-byte what it was) with typed,
read-only properties. The properties hold the reading rules in one place: which fields
every manifest has (``id``, ``job``, ``kind``...), which are optional, and how a field of
the wrong type reads (``stats`` that is not an object reads ``{}``, a verification record
that is not an object reads None). Entry points that callers and tests also hand plain or
partial mappings (``prune.plan``, ``open_payload``, the key and integrity checks, the
offsite copy's manifests...) wrap their input with :meth:`Manifest.wrap`, which never
validates.
"""

import json
import re

from .errors import ConfigError, IntegrityError
from .timeutil import parse_iso

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
VERIFICATION_NAME = "verification.json"
STATUS_COMPLETE = "complete"
_JOB_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
_REQUIRED = ("schema", "id", "job", "kind", "status", "started_at", "finished_at", "objects",
             "compression", "encryption", "tool_versions", "parent", "stats")
# Keys that must never hold a value in a manifest: a last line of defence against a source
# description that accidentally carries a credential. Only text can be a credential, so a
# number under such a key (a row count of table ``password_resets``, the number of exported
# ``secret`` objects) is fine, and so is a reference to where a secret lives (``*_file``...).
_SECRET_KEY_RE = re.compile(r"password|passphrase|secret|token|private|identity", re.IGNORECASE)
_SECRET_REF_SUFFIXES = ("_file", "_env", "_ref")


def validate_job_name(job):
    """Job names become path segments and Kubernetes names: keep them DNS-label-like."""
    if not isinstance(job, str) or not _JOB_RE.match(job):
        raise ConfigError(
            "invalid job name %r: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit" % (job,))
    return job


def backup_dir(job, backup_id):
    return "%s/%s" % (job, backup_id)


def object_key(job, backup_id, name):
    return "%s/%s/%s" % (job, backup_id, name)


def _holds_text(value):
    if isinstance(value, (str, bytes)):
        return value != "" and value != b""
    if isinstance(value, (list, tuple)):
        return any(_holds_text(item) for item in value)
    return False


def _check_no_secrets(value, path="manifest"):
    if isinstance(value, dict):
        for key, item in value.items():
            name = str(key)
            if (_SECRET_KEY_RE.search(name) and not name.lower().endswith(_SECRET_REF_SUFFIXES)
                    and _holds_text(item)):
                raise ConfigError("refusing to write a manifest with a secret-looking field %s.%s" % (path, key))
            _check_no_secrets(item, "%s.%s" % (path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_no_secrets(item, "%s[%d]" % (path, index))


class StoredObject(dict):
    """One entry of a manifest's ``objects``: the object ``name`` (relative to the backup's
    directory), its stored ``size`` and ``sha256``; a payload's entry also names the
    ``payload`` it holds and its plaintext size (``raw_bytes``)."""

    __slots__ = ()

    @classmethod
    def wrap(cls, mapping):
        return mapping if isinstance(mapping, cls) else cls(mapping)

    def copy(self):
        return StoredObject(self)

    @property
    def name(self):
        return self["name"]

    @property
    def size(self):
        return self["size"]

    @property
    def sha256(self):
        return self["sha256"]

    @property
    def payload(self):
        """The payload this object holds, or None for a side object (a key envelope)."""
        return self.get("payload")

    @property
    def raw_bytes(self):
        """Plaintext size recorded at backup time (None where it was not recorded)."""
        return self.get("raw_bytes")

    @property
    def restic_snapshot(self):
        """The restic snapshot holding this payload (restic-format backups), else None."""
        return self.get("restic_snapshot")


class Manifest(dict):
    """A backup's manifest (see the module docstring): a dict with typed read-only fields.

    Required fields read strictly (a missing one raises KeyError, as it did when callers
    subscripted); optional ones read None; ``stats``, ``encryption``, ``compression`` and the
    catalog's ``verification`` read leniently, since ``validate`` does not check their types
    and ``verification.json`` may hold any JSON.
    """

    __slots__ = ()

    @classmethod
    def wrap(cls, mapping):
        """``mapping`` as a Manifest (itself if it is one); never validates, so a partial
        mapping stays partial."""
        return mapping if isinstance(mapping, cls) else cls(mapping)

    def copy(self):
        return Manifest(self)

    def with_fields(self, **changes):
        """A copy with ``changes`` applied (a Manifest is not changed in place once built)."""
        changed = self.copy()
        changed.update(changes)
        return changed

    def without(self, *keys):
        """A copy without ``keys`` (the catalog's ``verification`` before comparing)."""
        return Manifest((key, value) for key, value in self.items() if key not in keys)

    def to_dict(self):
        """Plain dicts and lists all the way down (for outputs that must not see the types)."""
        return json.loads(json.dumps(self))

    # -- fields every manifest has ----------------------------------------------------------
    @property
    def id(self):
        return self["id"]

    @property
    def job(self):
        return self["job"]

    @property
    def kind(self):
        return self["kind"]

    @property
    def started_at(self):
        return self["started_at"]

    @property
    def finished_at(self):
        return self["finished_at"]

    @property
    def objects(self):
        """The stored objects, as :class:`StoredObject` (a new list; entries are shared)."""
        return [StoredObject.wrap(obj) for obj in self.get("objects") or ()]

    # -- optional fields --------------------------------------------------------------------
    @property
    def status(self):
        return self.get("status")

    @property
    def is_complete(self):
        return self.get("status") == STATUS_COMPLETE

    @property
    def parent(self):
        """The id of the backup this incremental builds on, or None for a full."""
        return self.get("parent")

    @property
    def size_bytes(self):
        return self.get("size_bytes")

    @property
    def duration_seconds(self):
        return self.get("duration_seconds")

    @property
    def raw_bytes(self):
        """Plaintext bytes the source produced (None in manifests that predate the field)."""
        return self.get("raw_bytes")

    @property
    def size_check(self):
        """The size check's verdict recorded at backup time (engine/anomaly.py), or None."""
        return self.get("size_check")

    @property
    def size_check_level(self):
        """The recorded size check's level (``ok``, ``warn``, ``fail``), or None."""
        return _dict_or_empty(self.get("size_check")).get("level")

    @property
    def size_change_ratio(self):
        return self.get("size_change_ratio")

    @property
    def stats(self):
        """What the source reported (per kind); ``{}`` when absent or not an object."""
        return _dict_or_empty(self.get("stats"))

    @property
    def source(self):
        """What the source described of itself (host, path...; never a secret); ``{}`` if absent."""
        return _dict_or_empty(self.get("source"))

    @property
    def encryption(self):
        return _dict_or_empty(self.get("encryption"))

    @property
    def encryption_mode(self):
        return self.encryption.get("mode")

    @property
    def compression_algorithm(self):
        return _dict_or_empty(self.get("compression")).get("algorithm")

    @property
    def storage_format(self):
        """``restic`` for a backup stored in a restic repository; None for the archive format."""
        return self.get("storage_format")

    @property
    def restic(self):
        """The restic section (snapshot id, repository id, data added); ``{}`` if absent."""
        return _dict_or_empty(self.get("restic"))

    @property
    def tool_versions(self):
        """Versions of the tools that wrote the backup (``pg_dump``...); ``{}`` if absent."""
        return _dict_or_empty(self.get("tool_versions"))

    @property
    def copied_from(self):
        """Where an offsite copy came from (location, re-encryption); ``{}`` for an original."""
        return _dict_or_empty(self.get("copied_from"))

    def object_named(self, name):
        """The entry of the stored object ``name``, or None."""
        found = object_entry(self, name)
        return None if found is None else StoredObject.wrap(found)

    def payload_object(self, payload_name):
        """The entry of the stored object holding the payload ``payload_name``, or None."""
        found = payload_entry(self, payload_name)
        return None if found is None else StoredObject.wrap(found)

    @property
    def verification(self):
        """The catalog's latest verification record of this backup, or None (never stored in
        manifest.json; a listing attaches it)."""
        record = self.get("verification")
        return record if isinstance(record, dict) else None

    @property
    def verification_result(self):
        """``ok``, ``failed``... of the latest verification, or None when never verified."""
        return (self.verification or {}).get("result")


def _dict_or_empty(value):
    return value if isinstance(value, dict) else {}


def build(backup_id, job, kind, started_at, finished_at, objects, compression, encryption,
          tool_versions, stats, parent=None, source=None, extra=None):
    """Assemble a complete manifest and check it holds nothing secret-looking."""
    objects = [StoredObject.wrap(obj) for obj in objects]
    manifest = Manifest({
        "schema": SCHEMA_VERSION,
        "id": backup_id,
        "job": job,
        "kind": kind,
        "status": STATUS_COMPLETE,
        "started_at": started_at,
        "finished_at": finished_at,
        "objects": objects,
        "size_bytes": sum(obj["size"] for obj in objects),
        "compression": compression,
        "encryption": encryption,
        "tool_versions": tool_versions,
        "parent": parent,
        "stats": stats,
        "source": source or {},
    })
    if extra:
        manifest.update(extra)
    _check_no_secrets(manifest)
    return manifest


def dumps(manifest):
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def loads(data, where="manifest"):
    """Parse and structurally validate a manifest; raise IntegrityError naming the problem."""
    try:
        manifest = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError("%s is not valid JSON: %s" % (where, exc)) from None
    return validate(manifest, where)


def validate(manifest, where="manifest"):
    """Structural check of a parsed manifest (also applied to the catalog index's cached copies).

    Returns it as a :class:`Manifest` whose entries are :class:`StoredObject`; the argument
    itself is not changed."""
    if not isinstance(manifest, dict):
        raise IntegrityError("%s is not a JSON object" % where)
    missing = [field for field in _REQUIRED if field not in manifest]
    if missing:
        raise IntegrityError("%s lacks required fields: %s" % (where, ", ".join(missing)))
    if manifest["schema"] != SCHEMA_VERSION:
        raise IntegrityError("%s has unsupported schema %r (this engine reads %d)"
                             % (where, manifest["schema"], SCHEMA_VERSION))
    for field in ("started_at", "finished_at"):
        try:
            parse_iso(manifest[field])
        except ValueError:
            raise IntegrityError("%s has an invalid %s: %r" % (where, field, manifest[field])) from None
    objects = manifest["objects"]
    if not isinstance(objects, list) or not objects:
        raise IntegrityError("%s lists no stored objects" % where)
    for obj in objects:
        if not _is_object_entry(obj):
            raise IntegrityError("%s has a malformed object entry: %r" % (where, obj))
    typed = Manifest(manifest)
    typed["objects"] = [StoredObject.wrap(obj) for obj in objects]
    return typed


def _is_object_entry(obj):
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return False
    name = obj["name"]
    relative = name and not name.startswith("/") and ".." not in name.split("/")
    return bool(relative and isinstance(obj.get("size"), int) and obj["size"] >= 0
                and re.match(r"^[0-9a-f]{64}$", str(obj.get("sha256"))))


def object_entry(manifest, name):
    """The entry of the stored object ``name`` in ``manifest``, or None."""
    for obj in manifest["objects"]:
        if obj["name"] == name:
            return obj
    return None


def payload_entry(manifest, payload_name):
    """The entry of the stored object holding the payload ``payload_name``, or None."""
    for obj in manifest.get("objects") or ():
        if obj.get("payload") == payload_name:
            return obj
    return None
