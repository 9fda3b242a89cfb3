"""Verified restore: resolve a backup, prove every stored byte good, only then touch the target.

Order of a restore (the same for the module, the runner and the drill):

1. resolve the backup: an id, ``latest``, an ISO-8601 time, or ``point_in_time`` (the newest
   complete backup finished at or before it); for incrementals, the chain from the full;
2. get the keys: an age identity, or a passphrase that opens each backup's ``key.age``
   envelope (whose own SHA-256 is checked against the manifest first);
3. verify the whole chain: every object named by the manifest is read to the end, its size
   and SHA-256 compared with the manifest, decrypted and decompressed. Object names are
   checked against the payload names, compression and encryption they claim. A corrupted,
   truncated, swapped or foreign object, a missing object or a wrong key stops here, before
   the target is asked to do anything but a read-only preflight;
4. hand the target a RestoreContext whose streams re-check size and SHA-256 at their end
   (a byte changed between step 3 and step 4 still fails the restore).

One pass: a target that restores next to the live data (a new database, a staging
directory, a private server) declares the payloads it reads to their end before it touches
anything else (``Target.one_pass_payloads``). Step 3 then reads every other object in full
but only finds the declared ones in the listing with their recorded size, and step 4's
streams are their verification (size and SHA-256 at the end, age's authentication per
chunk, the compressed frames). When the target fails, the whole chain is verified: a
damaged backup raises the same error as on the two-pass path, anything else the target's
own error. ``verify_first`` keeps the two-pass path.

Check mode stops after step 3 (always two-pass) and reports what would be restored where.

A :class:`RestoreClock` follows the restore: it reports progress (plaintext bytes done of the
total the manifest records, and the rate) every few seconds, and splits the wall time into
the ``phases`` of the report (see :meth:`RestoreClock.phases`).
"""

import hashlib
import threading
import time

from . import codecs
from . import manifest as mf
from . import resticstore
from .backup import open_payload
from .catalog import Catalog
from .errors import ConfigError, DecryptionError, IntegrityError, NotFoundError, ObjectMismatchError
from .pipeline import CHUNK, PlaintextStream, check_object, drain
from .storage.base import MissingLocationError, is_unfinished
from .kinds.contract import RestoreContext, Target
from .timeutil import parse_iso, to_iso, utc_now


class KeyMismatchError(DecryptionError):
    """The given key cannot open the backup (wrong identity or passphrase): the backup itself may be fine."""


# -- selecting a backup ----------------------------------------------------------------

# Clocks of the machine that asks and of the one that took the backup may differ a little;
# beyond this a time in the future is a mistake (a wrong year, a local time read as UTC).
FUTURE_TOLERANCE_SECONDS = 300


def check_selector(backup=None, point_in_time=None, now=None):
    """ConfigError for selectors that would otherwise be read as something else.

    An empty ``backup`` would silently mean ``latest``, and a ``point_in_time`` (or a time
    given as ``backup``) in the future would silently restore the newest backup.
    """
    if backup is not None and (not isinstance(backup, str) or not backup.strip()):
        raise ConfigError("backup must be a backup id, 'latest' or an ISO-8601 time, got %r" % (backup,))
    if point_in_time is not None and (not isinstance(point_in_time, str) or not point_in_time.strip()):
        raise ConfigError("point_in_time must be an ISO-8601 time, got %r" % (point_in_time,))
    if backup not in (None, "") and point_in_time not in (None, ""):
        raise ConfigError("give either backup or point_in_time, not both")
    for option, value in (("point_in_time", point_in_time), ("backup", backup)):
        if value is None or value in ("latest", "all"):
            continue
        try:
            moment = parse_iso(value)
        except ValueError:
            if option == "point_in_time":
                raise ConfigError("point_in_time %r is not an ISO-8601 time" % (value,)) from None
            continue  # a backup id
        now = now or utc_now()
        if (moment - now).total_seconds() > FUTURE_TOLERANCE_SECONDS:
            raise ConfigError("%s %s is in the future (now %s): the newest backup would be restored without "
                              "saying so; give backup: latest for that" % (option, to_iso(moment), to_iso(now)))


def select_backup(catalog, job, backup=None, point_in_time=None):
    """The manifest chosen by ``backup`` (id | latest | ISO time) or ``point_in_time``.

    Returns ``(manifest, selected_by)``. A backup that exists on storage but whose manifest
    is junk (edited, copied from another job or location) is reported as such.
    """
    check_selector(backup, point_in_time)
    try:
        if point_in_time is not None:
            return catalog.at_or_before(job, point_in_time), "point_in_time"
        selector = backup or "latest"
        manifest = catalog.resolve(job, selector)
    except NotFoundError as exc:
        wanted = backup or point_in_time or ""
        for junk in catalog.junk:
            if wanted and "/%s/" % wanted in "/" + junk["key"]:
                raise IntegrityError("backup %s of job %s is not usable: %s: %s"
                                     % (wanted, job, junk["key"], junk["reason"])) from None
        raise exc
    if selector in (None, "", "latest"):
        return manifest, "latest"
    return manifest, "id" if manifest["id"] == selector else "time"


def reread_manifest(storage, manifest):
    """The backup's ``manifest.json`` read from storage now, which must equal the catalog's copy.

    Listings may serve manifests from the catalog index (a cache keyed by the manifest's
    size). A manifest never changes after it is published, so a difference means it was
    edited afterwards: the restore refuses instead of trusting either copy.
    """
    key = mf.object_key(manifest["job"], manifest["id"], mf.MANIFEST_NAME)
    try:
        fresh = mf.loads(storage.get_bytes(key), key)
    except NotFoundError:
        raise IntegrityError("%s disappeared while the restore was being prepared" % key) from None
    listed = {k: v for k, v in manifest.items() if k != "verification"}
    if fresh != listed:
        raise IntegrityError("%s differs from the copy indexed when the backup was published "
                             "(edited afterwards?)" % key)
    return dict(fresh, verification=manifest.get("verification"))


def backup_chain(catalog, manifest):
    """``[full, ..., manifest]`` for incrementals (``[manifest]`` for a full), consistency-checked.

    Every manifest of the chain is re-read from storage (see :func:`reread_manifest`).
    """
    chain = catalog.chain(manifest) if manifest.get("parent") else [manifest]
    chain = [reread_manifest(catalog.storage, item) for item in chain]
    for parent, child in zip(chain, chain[1:]):
        if parent["job"] != child["job"] or parent["kind"] != child["kind"]:
            raise IntegrityError("backup %s (%s/%s) claims parent %s of %s/%s: foreign chain"
                                 % (child["id"], child["job"], child["kind"], parent["id"],
                                    parent["job"], parent["kind"]))
        if parse_iso(parent["finished_at"]) > parse_iso(child["started_at"]):
            raise IntegrityError("backup %s claims parent %s, which finished after it started"
                                 % (child["id"], parent["id"]))
    return chain


# -- keys --------------------------------------------------------------------------------

def _object_entry(manifest, name):
    for obj in manifest["objects"]:
        if obj["name"] == name:
            return obj
    return None


def _read_checked(storage, manifest, entry):
    """A small object (the key envelope) read whole and checked against its manifest entry."""
    key = mf.object_key(manifest["job"], manifest["id"], entry["name"])
    try:
        data = storage.get_bytes(key)
    except NotFoundError:
        raise IntegrityError("%s is listed in the manifest but missing from storage" % key) from None
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise IntegrityError("%s does not match its manifest entry (size or SHA-256): corrupted or swapped" % key)
    return data


def identities(storage, manifest, identity=None, passphrase=None):
    """Identities that decrypt ``manifest``'s payloads (None for unencrypted backups).

    With a passphrase the backup's ``key.age`` envelope is verified, then opened. With an
    identity, its public key must be one of the backup's recipients, so a wrong key is named
    as such instead of surfacing later as an undecryptable payload.
    """
    encryption = manifest.get("encryption") or {}
    mode = encryption.get("mode", "none")
    if mode == "none" or (mode == "restic" and resticstore.is_restic(manifest)):
        return None  # restic decrypts with the repository password (storage.restic_password)
    if mode != "age":
        raise IntegrityError("backup %s uses unknown encryption mode %r" % (manifest["id"], mode))
    key_object = encryption.get("key_object")
    if key_object and passphrase is not None:
        entry = _object_entry(manifest, key_object)
        if entry is None:
            raise IntegrityError("backup %s names key envelope %s but its manifest does not list it"
                                 % (manifest["id"], key_object))
        envelope = _read_checked(storage, manifest, entry)
        try:
            found = codecs.identities_for(encryption, passphrase=passphrase, envelope_bytes=envelope)
        except DecryptionError:
            raise KeyMismatchError("the passphrase does not open the key envelope of backup %s "
                                   "(wrong passphrase?)" % manifest["id"]) from None
    elif identity:
        found = codecs.identities_for(encryption, identity_text=identity)
    elif passphrase is not None:
        raise KeyMismatchError("backup %s was encrypted to age recipients, not with a passphrase: "
                               "give encryption.identity_file (the matching AGE-SECRET-KEY)" % manifest["id"])
    else:
        raise KeyMismatchError("backup %s is encrypted: give encryption.identity_file (or identity) or "
                               "the passphrase" % manifest["id"])
    recipients = set(encryption.get("recipients") or [])
    if recipients and not any(str(item.to_public()) in recipients for item in found):
        raise KeyMismatchError(
            "the given age identity is not a recipient of backup %s (it was encrypted to %s): wrong key"
            % (manifest["id"], ", ".join(sorted(recipients))))
    return found


def parent_identities(storage, job, identity=None, passphrase=None):
    """Identities an incremental backup needs to read its parent's payloads, or None.

    With an identity text: its keys. With a passphrase: the keys in the envelope of the job's
    latest backup (the parent an incremental builds on), when it has one.
    """
    found = []
    if identity:
        found.extend(codecs.parse_identities(identity))
    if passphrase is not None:
        try:
            latest = Catalog(storage).latest(job)
            found.extend(identities(storage, latest, passphrase=passphrase) or [])
        except (NotFoundError, IntegrityError, MissingLocationError):
            # No parent (a first backup creates its location), or not a passphrase backup:
            # the source explains if it needs one.
            pass
    return found or None


def chain_identities(storage, chain, identity=None, passphrase=None):
    """``{backup id: identities}`` for every backup of a chain (passphrase envelopes differ per backup)."""
    return {item["id"]: identities(storage, item, identity, passphrase) for item in chain}


# -- verification ------------------------------------------------------------------------

def _expected_name(obj, manifest):
    algorithm = (manifest.get("compression") or {}).get("algorithm")
    if algorithm not in codecs.SUFFIX:
        raise IntegrityError("backup %s records unknown compression %r" % (manifest["id"], algorithm))
    return codecs.stored_name(obj["payload"], algorithm, (manifest.get("encryption") or {}).get("mode"))


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
    if resticstore.is_restic(manifest):
        return resticstore.verify_objects(storage, manifest, clock, declared)
    seen = set()
    details = []
    payloads = 0
    listing = None
    for obj in manifest["objects"]:
        name = obj["name"]
        if name in seen:
            raise IntegrityError("backup %s lists object %s twice" % (manifest["id"], name))
        seen.add(name)
        key = mf.object_key(manifest["job"], manifest["id"], name)
        if obj.get("payload"):
            if name != _expected_name(obj, manifest):
                raise IntegrityError("backup %s: object %s does not carry payload %s as its name, compression "
                                     "and encryption say (manifest edited?)" % (manifest["id"], name, obj["payload"]))
            algorithm = manifest["compression"]["algorithm"]
            ids = backup_identities
            payloads += 1
            if (manifest["id"], obj["payload"]) in declared:
                if listing is None:
                    listing = _listed_sizes(storage, manifest)
                _check_listed(listing, key, name, obj)
                details.append({"name": name, "payload": obj["payload"], "size": obj["size"], "pending": True})
                continue
        else:
            algorithm, ids = "none", None  # key envelope and other side objects: bytes only
        try:
            report = _check_object(storage, key, obj, algorithm, ids, clock if obj.get("payload") else None)
        except NotFoundError:
            raise IntegrityError("%s is listed in the manifest but missing from storage" % key) from None
        except IntegrityError as exc:
            _raise_stored_bytes_error(storage, key, obj, exc)
            raise
        report["payload"] = obj.get("payload")
        details.append(report)
    if not payloads:
        raise IntegrityError("backup %s lists no payload object" % manifest["id"])
    _check_no_strays(storage, manifest, seen)
    return details


def _listed_sizes(storage, manifest):
    """``{object name: size}`` of what storage lists under the backup's directory."""
    prefix = "%s/%s/" % (manifest["job"], manifest["id"])
    return {info.key[len(prefix):]: info.size for info in storage.list(prefix)}


def _check_listed(listing, key, name, obj):
    """An object the one-pass restore reads later: it must be stored, with the recorded size."""
    size = listing.get(name)
    if size is None:
        raise IntegrityError("%s is listed in the manifest but missing from storage" % key)
    if size != obj["size"]:
        raise ObjectMismatchError(key, "size", obj["size"], size)


# Objects a backup directory may hold besides those its manifest lists.
_SIDE_OBJECTS = (mf.MANIFEST_NAME, mf.VERIFICATION_NAME)


def _check_no_strays(storage, manifest, listed):
    """An object in the backup directory that the manifest does not list means the manifest
    lost an entry (edited) or something foreign was put there: refuse rather than guess."""
    prefix = "%s/%s/" % (manifest["job"], manifest["id"])
    for info in storage.list(prefix):
        name = info.key[len(prefix):]
        if name in listed or name in _SIDE_OBJECTS or is_unfinished(name):
            continue
        raise IntegrityError("%s is stored in backup %s but not listed in its manifest "
                             "(manifest edited, or a foreign object)" % (info.key, manifest["id"]))


def _recorded_plain_bytes(manifests):
    """Plaintext bytes of the manifests' payloads as recorded at backup time (None if unrecorded)."""
    sizes = [obj.get("raw_bytes") for item in manifests for obj in item["objects"] if obj.get("payload")]
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
        clock.begin("verify", _recorded_plain_bytes([item for item in chain if item["id"] not in verified]))
    for item in chain:
        if item["id"] not in verified:
            details = verify_objects(storage, item, keys_by_id.get(item["id"]), clock)
            verified[item["id"]] = details
        details = verified[item["id"]]
        _add_to_summary(summary, item["id"], details)
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
    held = {(item["id"], obj["payload"]) for item in chain for obj in item["objects"] if obj.get("payload")}
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
        clock.begin("verify", _recorded_plain_bytes([
            {"objects": [obj for obj in item["objects"] if (item["id"], obj.get("payload")) not in declared]}
            for item in chain]))
    return {item["id"]: verify_objects(storage, item, keys_by_id.get(item["id"]), clock, declared)
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
        for entry in details_by_id[item["id"]]:
            if entry.get("pending"):
                report = results.get((item["id"], entry["payload"]))
                if report is None and resticstore.is_restic(item):
                    report = _read_payload(storage, item, entry["payload"])
                if report is None:
                    obj = _object_entry(item, entry["name"])
                    key = mf.object_key(item["job"], item["id"], entry["name"])
                    try:
                        report = _check_object(storage, key, obj, item["compression"]["algorithm"],
                                               keys_by_id.get(item["id"]))
                    except IntegrityError as exc:
                        _raise_stored_bytes_error(storage, key, obj, exc)
                        raise
                entry = dict(report, payload=entry["payload"])
            details.append(entry)
        _add_to_summary(summary, item["id"], details)
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


# -- progress and phases -----------------------------------------------------------------

PROGRESS_INTERVAL = 5.0

# The phases of a restore, in order, each ending at the boundary of the same name (see
# RestoreClock.phases).
PHASES = ("select", "verify", "prepare", "transfer", "load", "checks")


class RestoreClock:
    """Times one restore and reports its progress.

    Progress: ``report(phase, done_bytes, total_bytes, elapsed_seconds)`` is called at most
    every ``interval`` seconds while plaintext flows, in the ``verify`` pass and in the
    ``restore`` pass; once a target noted progress in its own units (the postgres target:
    tables whose data pg_restore loaded), also while no byte flows, with the keyword
    ``items={"tables": (done, total)}``. ``total_bytes`` is the plaintext size the manifests recorded at backup
    time (None for backups that did not record it); ``elapsed_seconds`` counts from the start
    of that pass.

    Phases: boundaries are marked on the monotonic clock as the restore passes them:
    ``select`` (backup chosen, chain and keys read), ``verify`` (every object verified), then,
    inside the target's restore, ``prepare`` (the first payload stream opened: preflight and
    the target's set-up such as CREATE DATABASE lie before it), ``transfer`` (the last
    payload stream reached its end: storage read, decrypted, decompressed and consumed by the
    tool), ``load`` (the last payload stream finished: what the tool did after its input
    ended, e.g. pg_restore's index builds and constraints) and ``checks`` (the target
    returned: its checks, such as row counts, and a swap). A boundary that was not passed
    (no payload opened) takes the time of the one before it, so that phase is 0.
    """

    def __init__(self, report=None, interval=PROGRESS_INTERVAL):
        self.started = time.monotonic()
        self._marks = {}
        self._report = report
        self._interval = interval
        self.phase, self.done, self.total = None, 0, None
        self._phase_started = self._last = self.started
        self.items = {}   # target units (tables): name -> (done, total)
        self._lock = threading.Lock()   # note() comes from a tool's stderr reader thread

    def mark(self, boundary):
        self._marks[boundary] = time.monotonic()

    def begin(self, phase, total_bytes):
        """A pass over the plaintext starts (``verify`` or ``restore``)."""
        self.phase, self.done, self.total = phase, 0, total_bytes
        self._phase_started = self._last = time.monotonic()

    def advance(self, count):
        self.done += count
        self._maybe_report()

    def note(self, what, done, total=None):
        """Progress in a target's units (``tables``), reported with the bytes; also reported
        when no byte flows (``pg_restore --jobs`` reading its spool, index builds)."""
        self.items[what] = (done, total)
        self._maybe_report()

    def _maybe_report(self):
        if self._report is None:
            return
        with self._lock:
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            self._last = now
        if self.items:
            self._report(self.phase or "restore", self.done, self.total, now - self._phase_started,
                         items=dict(self.items))
        else:
            self._report(self.phase, self.done, self.total, now - self._phase_started)

    def stream_opened(self):
        self._marks.setdefault("prepare", time.monotonic())

    def phases(self):
        """``{phase: seconds, ..., "total": seconds}`` up to now; each phase >= 0, their sum <= total.

        Boundaries are rounded to whole milliseconds first, so the phases add up to at most
        the total however they are rounded.
        """
        now = time.monotonic()
        previous = 0
        result = {}
        for name in PHASES:
            at = self._marks.get(name)
            offset = previous if at is None else max(previous, int(round((at - self.started) * 1000)))
            result[name] = (offset - previous) / 1000.0
            previous = offset
        result["total"] = max(previous, int(round((now - self.started) * 1000))) / 1000.0
        return result


# -- restoring ---------------------------------------------------------------------------

class _CheckedStream:
    """A payload stream for targets: at EOF it checks size and SHA-256 (once more, or, on the
    one-pass path, for the first time); ``on_result(report)`` gets the object's report then."""

    def __init__(self, stream, clock=None, on_result=None):
        self._stream = stream
        self._result = None
        self._clock = clock
        self._on_result = on_result
        if clock is not None:
            clock.stream_opened()

    def read(self, size=-1):
        data = self._stream.read(size if size and size > 0 else 1 << 20)
        if data:
            if self._clock is not None:
                self._clock.advance(len(data))
        elif self._result is None:
            self._result = self._stream.finish()
            if self._on_result is not None:
                self._on_result(self._result)
            if self._clock is not None:
                self._clock.mark("transfer")
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readable(self):
        return True

    def finish(self):
        if self._result is None:
            while self.read(1 << 20):
                pass
        if self._clock is not None:
            self._clock.mark("load")
        return self._result

    @property
    def plain_bytes(self):
        return self._stream.plain_bytes

    def close(self):
        self._stream.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


def restore_context(storage, manifest, chain, keys_by_id, check_mode=False, options=None, clock=None,
                    on_result=None):
    """The target's RestoreContext; ``on_result(backup_id, payload_name, report)`` is called
    when a payload stream reaches its end with size and SHA-256 as the manifest says."""
    allowed = {item["id"] for item in chain}

    def opener(which, payload_name):
        if which["id"] not in allowed:
            raise ConfigError("target asked for backup %s, which is not part of the restored chain" % which["id"])
        done = None
        if on_result is not None:
            def done(report, backup_id=which["id"]):
                on_result(backup_id, payload_name, report)
        return _CheckedStream(open_payload(storage, which, payload_name, keys_by_id.get(which["id"])), clock, done)

    return RestoreContext(manifest, chain, opener, check_mode=check_mode, options=options,
                          note_progress=clock.note if clock is not None else None)


def _failed_checks(report):
    return [check for check in (report or {}).get("checks") or [] if not check.get("ok")]


def restore_verified(storage, manifest, chain, keys_by_id, target, clock=None, on_result=None):
    """Run ``target.restore`` for an already verified chain; raise IntegrityError on failed checks.

    With a ``clock`` (RestoreClock), the restore pass reports progress and marks the phases
    from ``prepare`` to ``checks``. ``on_result``: see :func:`restore_context` (the one-pass
    path, whose declared payloads are verified by their streams).
    """
    if clock is not None:
        clock.begin("restore", _recorded_plain_bytes(chain))
    report = target.restore(restore_context(storage, manifest, chain, keys_by_id, options=target.options,
                                            clock=clock, on_result=on_result)) or {}
    if clock is not None:
        clock.mark("checks")
    failed = _failed_checks(report)
    if failed:
        raise IntegrityError("restore of %s into %s failed its checks: %s" % (
            manifest["id"], target.kind, "; ".join("%s: expected %s, got %s" % (c.get("what"), c.get("expected"), c.get("actual"))
                                                   for c in failed[:5])))
    return report


def restore(storage, job, target, backup=None, point_in_time=None, identity=None, passphrase=None,
            check_mode=False, log=None, progress=None, progress_interval=PROGRESS_INTERVAL, verify_first=False):
    """Verified restore of one backup of ``job`` into ``target``.

    ``target`` is a Target instance, or a callable ``target(kind)`` returning one once the
    backup (and so its kind) has been chosen. ``progress`` is called as
    ``progress(phase, done_bytes, total_bytes, elapsed_seconds)`` at most every
    ``progress_interval`` seconds (see RestoreClock).

    A target that declares payloads for the one-pass path (``Target.one_pass_payloads``)
    reads them while they are verified; every other object is verified before it starts,
    and when it fails the whole chain is verified to name a damaged backup as such.
    ``verify_first`` (and check mode) keeps the two-pass path: every object read and
    verified in full before the target is called.

    Returns the verification report: what was selected, what was compared (objects, bytes,
    the target's checks; ``verification.mode`` says which path), and how long it took
    (``phases``). Nothing is written in check mode.
    """
    log = log or (lambda message: None)
    clock = RestoreClock(progress, progress_interval)
    mf.validate_job_name(job)
    catalog = Catalog(storage)
    manifest, selected_by = select_backup(catalog, job, backup, point_in_time)
    if not isinstance(target, Target):
        target = target(manifest["kind"])  # a factory: the kind is known once the backup is chosen
    try:
        return _restore_selected(storage, job, target, catalog, manifest, selected_by, point_in_time, identity,
                                 passphrase, check_mode, log, clock, verify_first)
    finally:
        target.close()


def _restore_selected(storage, job, target, catalog, manifest, selected_by, point_in_time, identity, passphrase,
                      check_mode, log, clock, verify_first):
    started = clock.started
    if target.kind != manifest["kind"]:
        raise ConfigError("backup %s of job %s is a %s backup; the target restores %s"
                          % (manifest["id"], job, manifest["kind"], target.kind))
    chain = backup_chain(catalog, manifest)
    manifest = chain[-1]
    log("restoring %s backup %s of job %s (%s) into %s" % (
        manifest["kind"], manifest["id"], job,
        "chain of %d" % len(chain) if len(chain) > 1 else "full",
        " ".join("%s=%s" % item for item in sorted(target.describe().items()))))
    keys_by_id = chain_identities(storage, chain, identity, passphrase)
    clock.mark("select")
    declared = None if check_mode or verify_first else declared_payloads(target, manifest, chain)
    if declared:
        return _restore_one_pass(storage, job, target, chain, keys_by_id, declared, selected_by, point_in_time,
                                 clock, log)
    verification = verify_chain(storage, chain, keys_by_id, clock=clock)
    verification["mode"] = "two-pass"
    clock.mark("verify")
    verified_at = time.monotonic()
    log("verified %d objects (%d stored bytes, %d plaintext bytes) in %.1fs" % (
        verification["objects"], verification["stored_bytes"], verification["plain_bytes"],
        verified_at - started))
    target.preflight(manifest)
    report = _report(job, manifest, chain, selected_by, point_in_time, target, verification, check_mode)
    if check_mode:
        plan = None
        if target.plans_in_check_mode:
            # The target's own plan (what it would create, rename, apply), from the verified
            # chain; it reads but writes nothing.
            plan = target.restore(restore_context(storage, manifest, chain, keys_by_id, check_mode=True,
                                                  options=target.options, clock=clock)) or {}
        planned = plan or {}
        summary = planned.get("plan")
        report.update(changed=False, restore=plan, checks=planned.get("checks") or [],
                      plan="would restore %s backup %s%s into %s%s" % (
                          manifest["kind"], manifest["id"],
                          " (with %d earlier backups of its chain)" % (len(chain) - 1) if len(chain) > 1 else "",
                          target.describe(),
                          ": %s" % summary if isinstance(summary, str) else ""))
    else:
        result = restore_verified(storage, manifest, chain, keys_by_id, target, clock)
        report.update(changed=bool(result.get("changed", True)), restore=result,
                      checks=result.get("checks") or [])
    return _finish_report(report, clock, verified_at)


def _report(job, manifest, chain, selected_by, point_in_time, target, verification, check_mode):
    return {
        "job": job, "kind": manifest["kind"], "backup_id": manifest["id"], "selected_by": selected_by,
        "point_in_time": point_in_time, "finished_at": manifest["finished_at"],
        "chain": [item["id"] for item in chain], "target": target.describe(),
        "verification": verification, "check_mode": bool(check_mode),
    }


def _finish_report(report, clock, verified_at):
    clock.mark("checks")
    report["phases"] = clock.phases()
    report["verify_seconds"] = round(verified_at - clock.started, 3)
    report["duration_seconds"] = report["phases"]["total"]
    return report


def restore_one_pass(storage, chain, keys_by_id, target, declared, clock, log=None):
    """Restore ``chain`` into ``target`` in one pass (``declared``: see :func:`declared_payloads`).

    Prechecks the chain, runs the target with the declared payloads verified by their streams,
    and on any failure raises the error a full verification finds for a damaged backup (else
    the target's own). Returns ``(verification summary, target report, monotonic time the
    precheck ended)``. Used by :func:`restore` and by the test restores of engine/verify.py.
    """
    log = log or (lambda message: None)
    manifest = chain[-1]
    results = {}

    def on_result(backup_id, payload_name, report):
        results.setdefault((backup_id, payload_name), report)

    try:
        details_by_id = precheck_chain(storage, chain, keys_by_id, declared, clock)
        clock.mark("verify")
        verified_at = time.monotonic()
        log("checked %d objects (%d read in full) in %.1fs; the other %d payloads are verified as they are "
            "restored" % (sum(len(details) for details in details_by_id.values()),
                          sum(1 for details in details_by_id.values() for entry in details if not entry.get("pending")),
                          verified_at - clock.started, len(declared)))
        target.preflight(manifest)
        result = restore_verified(storage, manifest, chain, keys_by_id, target, clock, on_result)
    except Exception as exc:  # pylint: disable=broad-except  # re-raised unless the backup is damaged
        # Every declared stream checked out and the rest was read in full before: the backup
        # is good, the error is the target's own (its swap, a flush...) and is reported as it
        # is, without reading the chain again.
        if not declared <= set(results):
            diagnose(storage, chain, keys_by_id, exc, log)
        raise
    return one_pass_summary(storage, chain, keys_by_id, details_by_id, results), result, verified_at


def _restore_one_pass(storage, job, target, chain, keys_by_id, declared, selected_by, point_in_time, clock, log):
    """The one-pass path of :func:`restore` (never in check mode)."""
    manifest = chain[-1]
    verification, result, verified_at = restore_one_pass(storage, chain, keys_by_id, target, declared, clock, log)
    report = _report(job, manifest, chain, selected_by, point_in_time, target, verification, False)
    report.update(changed=bool(result.get("changed", True)), restore=result, checks=result.get("checks") or [])
    return _finish_report(report, clock, verified_at)
