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

Steps 1 to 3 are ``selection.py``, ``keys.py`` and ``integrity.py``; this module runs them in
order, hands the target its context and follows the restore's progress and phases.

A :class:`RestoreClock` follows the restore: it reports progress (plaintext bytes done of the
total the manifest records, and the rate) every few seconds, and splits the wall time into
the ``phases`` of the report (see :meth:`RestoreClock.phases`).
"""

import threading
import time

from . import manifest as mf
from .backup import open_payload
from .catalog import Catalog
from .errors import ConfigError, IntegrityError
from .kinds.contract import RestoreContext, Target
from .integrity import (declared_payloads, diagnose, one_pass_summary, precheck_chain, recorded_plain_bytes,
                        verify_chain)
from .keys import chain_identities
from .pipeline import ReadsInto
from .selection import backup_chain, select_backup


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

        Boundaries are rounded to whole microseconds first, so the phases add up to at most
        the total however they are rounded. Microseconds, not milliseconds: a small payload
        streams in well under a millisecond, and a phase that was passed should not read 0.
        """
        now = time.monotonic()
        previous = 0
        result = {}
        for name in PHASES:
            at = self._marks.get(name)
            offset = previous if at is None else max(previous, int(round((at - self.started) * 1e6)))
            result[name] = (offset - previous) / 1e6
            previous = offset
        result["total"] = max(previous, int(round((now - self.started) * 1e6))) / 1e6
        return result


# -- restoring ---------------------------------------------------------------------------

class _CheckedStream(ReadsInto):
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
    allowed = {item.id for item in chain}

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
        clock.begin("restore", recorded_plain_bytes(chain))
    report = target.restore(restore_context(storage, manifest, chain, keys_by_id, options=target.options,
                                            clock=clock, on_result=on_result)) or {}
    if clock is not None:
        clock.mark("checks")
    failed = _failed_checks(report)
    if failed:
        described = "; ".join("%s: expected %s, got %s" % (c.get("what"), c.get("expected"), c.get("actual"))
                              for c in failed[:5])
        raise IntegrityError("restore of %s into %s failed its checks: %s" % (manifest.id, target.kind, described))
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
        target = target(manifest.kind)  # a factory: the kind is known once the backup is chosen
    try:
        return _restore_selected(storage, job, target, catalog, manifest, selected_by, point_in_time, identity,
                                 passphrase, check_mode, log, clock, verify_first)
    finally:
        target.close()


def _restore_selected(storage, job, target, catalog, manifest, selected_by, point_in_time, identity, passphrase,
                      check_mode, log, clock, verify_first):
    started = clock.started
    if target.kind != manifest.kind:
        raise ConfigError("backup %s of job %s is a %s backup; the target restores %s"
                          % (manifest.id, job, manifest.kind, target.kind))
    chain = backup_chain(catalog, manifest)
    manifest = chain[-1]
    log("restoring %s backup %s of job %s (%s) into %s" % (
        manifest.kind, manifest.id, job,
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
                          manifest.kind, manifest.id,
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
        "job": job, "kind": manifest.kind, "backup_id": manifest.id, "selected_by": selected_by,
        "point_in_time": point_in_time, "finished_at": manifest.finished_at,
        "chain": [item.id for item in chain], "target": target.describe(),
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

    Prechecks the chain (its error, if any, is raised as it is), then runs the target with the
    declared payloads verified by their streams; when the target fails, raises the error a full
    verification finds for a damaged backup (else the target's own). Returns ``(verification summary, target report, monotonic time the
    precheck ended)``. Used by :func:`restore` and by the test restores of engine/verify.py.
    """
    log = log or (lambda message: None)
    manifest = chain[-1]
    results = {}

    def on_result(backup_id, payload_name, report):
        results.setdefault((backup_id, payload_name), report)

    # A failing precheck is already the verdict on the backup (the two-pass path's checks, but
    # for the declared payloads, which it only finds in the listing): it is raised as it is,
    # without reading the chain again to diagnose it.
    details_by_id = precheck_chain(storage, chain, keys_by_id, declared, clock)
    clock.mark("verify")
    verified_at = time.monotonic()
    log("checked %d objects (%d read in full) in %.1fs; the other %d payloads are verified as they are "
        "restored" % (sum(len(details) for details in details_by_id.values()),
                      sum(1 for details in details_by_id.values() for entry in details if not entry.get("pending")),
                      verified_at - clock.started, len(declared)))
    try:
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
