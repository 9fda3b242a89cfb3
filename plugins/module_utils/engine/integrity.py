"""Proof that a stored backup is intact, before anything is restored from it.

Two-pass path (:func:`verify_chain`): every object the manifests of a chain name is read to
the end, its size and SHA-256 compared with the manifest, decrypted and decompressed; object
names must match the payload, compression and encryption they claim, and nothing unlisted
may sit in a backup's directory. One-pass path (:func:`precheck_chain`,
:func:`one_pass_summary`): the payloads a target declares are only found in the listing
first and verified by the streams the target reads; the report stays complete either way.
"""

from . import codecs
from . import manifest as mf
from . import resticstore
from .backup import open_payload, recorded_compression
from .errors import ConfigError, IntegrityError, NotFoundError, ObjectMismatchError
from .pipeline import CHUNK, PlaintextStream, check_object, drain
from .storage.base import is_unfinished


def _expected_name(obj, manifest):
    return codecs.stored_name(obj.payload, recorded_compression(manifest), manifest.encryption_mode)


def _raise_stored_bytes_error(storage, key, obj, decode_error):
    """After a decode failure: when the stored bytes themselves differ from the manifest, say so.

    A flipped byte usually breaks decryption or decompression before the hash is complete;
    the size/SHA-256 mismatch is the better diagnosis (storage damage or a swapped object,
    rather than a wrong key or a broken tool), so it is the error raised.
    """
    if isinstance(decode_error, ObjectMismatchError):
        return
    try:
        check_object(storage, key, obj, "none", None)
    except ObjectMismatchError as exc:
        raise ObjectMismatchError(exc.key, exc.field, exc.expected, exc.actual,
                                  note="it does not decode either") from None


def _check_object(storage, key, expected, algorithm, identities, clock=None):
    """``pipeline.check_object`` (hash, decrypt, decompress, discard), counting plaintext on ``clock``."""
    stream = PlaintextStream(storage, key, expected, algorithm, identities)
    try:
        while True:
            data = stream.read(CHUNK)
            if not data:
                break
            if clock is not None:
                clock.advance(len(data))
        return stream.finish()
    finally:
        stream.close()


def verify_objects(storage, manifest, backup_identities, clock=None, declared=frozenset()):
    """Read every object of one backup to the end; return the per-object report.

    Raises IntegrityError (DecryptionError for undecryptable payloads) on the first problem.
    ``clock`` (a RestoreClock) counts the payloads' plaintext for progress lines.

    ``declared`` (one-pass restores): ``(backup_id, payload_name)`` pairs whose objects are
    not read here, only found in the listing with the recorded size; their report entries
    are ``{"name", "payload", "size", "pending": True}`` until their stream's result
    replaces them (see :func:`one_pass_summary`).
    """
    manifest = mf.Manifest.wrap(manifest)
    if resticstore.is_restic(manifest):
        return resticstore.verify_objects(storage, manifest, clock, declared)
    seen = set()
    details = []
    payloads = 0
    listing = None
    for obj in manifest.objects:
        name = obj.name
        if name in seen:
            raise IntegrityError("backup %s lists object %s twice" % (manifest.id, name))
        seen.add(name)
        key = mf.object_key(manifest.job, manifest.id, name)
        if obj.payload:
            if name != _expected_name(obj, manifest):
                raise IntegrityError("backup %s: object %s does not carry payload %s as its name, compression "
                                     "and encryption say (manifest edited?)" % (manifest.id, name, obj.payload))
            algorithm = manifest.compression_algorithm
            ids = backup_identities
            payloads += 1
            if (manifest.id, obj.payload) in declared:
                if listing is None:
                    listing = _listed_sizes(storage, manifest)
                _check_listed(listing, key, name, obj)
                details.append({"name": name, "payload": obj.payload, "size": obj.size, "pending": True})
                continue
        else:
            algorithm, ids = "none", None  # key envelope and other side objects: bytes only
        try:
            report = _check_object(storage, key, obj, algorithm, ids, clock if obj.payload else None)
        except NotFoundError:
            raise IntegrityError("%s is listed in the manifest but missing from storage" % key) from None
        except IntegrityError as exc:
            _raise_stored_bytes_error(storage, key, obj, exc)
            raise
        report["payload"] = obj.payload
        details.append(report)
    if not payloads:
        raise IntegrityError("backup %s lists no payload object" % manifest.id)
    _check_no_strays(storage, manifest, seen)
    return details


def _listed_sizes(storage, manifest):
    """``{object name: size}`` of what storage lists under the backup's directory."""
    prefix = "%s/%s/" % (manifest.job, manifest.id)
    return {info.key[len(prefix):]: info.size for info in storage.list(prefix)}


def _check_listed(listing, key, name, obj):
    """An object the one-pass restore reads later: it must be stored, with the recorded size."""
    size = listing.get(name)
    if size is None:
        raise IntegrityError("%s is listed in the manifest but missing from storage" % key)
    if size != obj.size:
        raise ObjectMismatchError(key, "size", obj.size, size)


# Objects a backup directory may hold besides those its manifest lists.
_SIDE_OBJECTS = (mf.MANIFEST_NAME, mf.VERIFICATION_NAME)


def _check_no_strays(storage, manifest, listed):
    """An object in the backup directory that the manifest does not list means the manifest
    lost an entry (edited) or something foreign was put there: refuse rather than guess."""
    prefix = "%s/%s/" % (manifest.job, manifest.id)
    for info in storage.list(prefix):
        name = info.key[len(prefix):]
        if name in listed or name in _SIDE_OBJECTS or is_unfinished(name):
            continue
        raise IntegrityError("%s is stored in backup %s but not listed in its manifest "
                             "(manifest edited, or a foreign object)" % (info.key, manifest.id))


def recorded_plain_bytes(manifests, skip=frozenset()):
    """Plaintext bytes of the manifests' payloads as recorded at backup time (None if unrecorded),
    leaving out the ``(backup id, payload)`` pairs in ``skip``."""
    sizes = [obj.raw_bytes for item in map(mf.Manifest.wrap, manifests) for obj in item.objects
             if obj.payload and (item.id, obj.payload) not in skip]
    return sum(sizes) if sizes and all(isinstance(size, int) for size in sizes) else None


def _add_to_summary(summary, backup_id, details):
    """Count one backup's per-object reports into a verification summary."""
    summary["backups"].append(backup_id)
    summary["objects"] += len(details)
    summary["stored_bytes"] += sum(d["size"] for d in details)
    summary["plain_bytes"] += sum(d["plain_bytes"] for d in details if d.get("payload"))
    summary["details"].extend(dict(d, backup=backup_id) for d in details)


def verify_chain(storage, chain, keys_by_id, verified=None, clock=None):
    """Verify every backup of ``chain``; ``verified`` (a dict id -> summary) skips repeats."""
    verified = {} if verified is None else verified
    summary = {"backups": [], "objects": 0, "stored_bytes": 0, "plain_bytes": 0, "details": []}
    if clock is not None:
        clock.begin("verify", recorded_plain_bytes([item for item in chain if item.id not in verified]))
    for item in chain:
        if item.id not in verified:
            details = verify_objects(storage, item, keys_by_id.get(item.id), clock)
            verified[item.id] = details
        details = verified[item.id]
        _add_to_summary(summary, item.id, details)
    return summary


# -- one pass ------------------------------------------------------------------------------

def declared_payloads(target, manifest, chain):
    """The payloads ``target`` reads unverified on the one-pass path (a frozenset), or None.

    Only pairs naming a payload of the chain count; a target that declares nothing takes
    the two-pass path.
    """
    declared = target.one_pass_payloads(manifest, chain)
    if not declared:
        return None
    held = {(item.id, obj.payload) for item in chain for obj in item.objects if obj.payload}
    try:
        declared = frozenset(tuple(entry) for entry in declared) & held
    except (TypeError, ValueError):
        raise ConfigError("the %s target declared its one-pass payloads wrongly: %r" % (target.kind, declared)) from None
    return declared or None


def precheck_chain(storage, chain, keys_by_id, declared, clock=None):
    """The one-pass path's checks before the target runs: ``{backup id: details}``.

    Everything :func:`verify_objects` checks, except that the ``declared`` payloads are
    only looked up in the listing (present, recorded size): their bytes are verified by
    the streams the target reads.
    """
    if clock is not None:
        clock.begin("verify", recorded_plain_bytes(chain, skip=declared))
    return {item.id: verify_objects(storage, item, keys_by_id.get(item.id), clock, declared)
            for item in chain}


def one_pass_summary(storage, chain, keys_by_id, details_by_id, results):
    """The verification report of a one-pass restore, from the precheck and the streams' results.

    ``results`` maps ``(backup_id, payload_name)`` to the report of a stream the target
    finished. A declared payload the target never finished is verified in full now, so
    the report (and the guarantee that every byte was checked) stays complete.
    """
    summary = {"backups": [], "objects": 0, "stored_bytes": 0, "plain_bytes": 0, "details": [], "mode": "one-pass"}
    for item in chain:
        details = []
        for entry in details_by_id[item.id]:
            if entry.get("pending"):
                report = results.get((item.id, entry["payload"]))
                if report is None and resticstore.is_restic(item):
                    report = _read_payload(storage, item, entry["payload"])
                if report is None:
                    obj = mf.object_entry(item, entry["name"])
                    key = mf.object_key(item.job, item.id, entry["name"])
                    try:
                        report = _check_object(storage, key, obj, item.compression_algorithm,
                                               keys_by_id.get(item.id))
                    except IntegrityError as exc:
                        _raise_stored_bytes_error(storage, key, obj, exc)
                        raise
                entry = dict(report, payload=entry["payload"])
            details.append(entry)
        _add_to_summary(summary, item.id, details)
    return summary


def _read_payload(storage, manifest, payload_name, identities=None):
    """One payload read to its end through open_payload and checked (size, SHA-256)."""
    return drain(open_payload(storage, manifest, payload_name, identities))


def diagnose(storage, chain, keys_by_id, error, log):
    """After a one-pass restore failed with ``error``: raise the error the full verification
    of the chain finds (the two-pass path's error for a damaged backup), else return."""
    log("the restore stopped (%s); verifying the whole backup to tell a damaged backup from a "
        "problem of the target" % type(error).__name__)
    try:
        verify_chain(storage, chain, keys_by_id)
    except IntegrityError as found:  # DecryptionError included
        raise found from None
    except Exception:  # pylint: disable=broad-except  # storage trouble while diagnosing: keep the first error
        return
    log("the backup verifies: the restore failed for another reason")
