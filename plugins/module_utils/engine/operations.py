"""The engine's operations: what a module or a runner command asks of the engine.

The modules (plugins/modules/*.py) and the runner (engine/runner.py) read their options in
their own way (module parameters with Ansible's masking, a job file with ``*_file``/``*_env``
secrets) and report in their own way (a task result, log lines, metrics and an exit code).
Between the two, each operation is assembled once, here: which catalog, selection, keys and
engine calls a backup, a listing, a verification, a drill, a prune or a copy is made of.

A caller hands in built objects (a Storage, key texts, policies) and gets the engine's
result dict back; nothing here reads a secret, logs on its own or knows Ansible. Retention and
offsite copies are imported when used, as the runner did: a backup CronJob does not load them.
"""

from . import kinds
from . import resticstore
from .backup import BackupRun
from .catalog import Catalog, upload_summary
from .errors import ConfigError, StorageError
from .keys import parent_identities
from .restore import PROGRESS_INTERVAL, restore as restore_backup
from .selection import select_backup
from .storage.base import MissingLocationError
from .timeutil import to_iso
from .verify import verify as verify_backups


def where(description):
    """``backend=s3 bucket=b prefix=p`` from a describe() dict, for log lines and messages."""
    if not isinstance(description, dict):
        return str(description)
    return " ".join("%s=%s" % (key, value) for key, value in description.items() if value not in (None, "", [], {}))


# -- backup -------------------------------------------------------------------------------

def make_source(kind, options, resolve=None):
    """The Source of ``kind``. ``options`` are checked against the kind's schema (types,
    bounds, unknown fields) before ``resolve(options)`` reads any ``*_file``/``*_env`` secret;
    the source is built from what ``resolve`` returns (``options`` themselves without it)."""
    kinds.check_source_options(kind, options)
    return kinds.make_source(kind, resolve(options) if resolve is not None else options)


def prepare_backup(job, source, storage, compression=None, encryption=None, identity=None, passphrase=None,
                   size_policy=None, progress=None):
    """A BackupRun of ``source`` into ``storage``, ready for ``plan()`` or ``run()``.

    ``identity``/``passphrase`` are the reading keys: an incremental backup reads its
    parent's file index with them (keys.parent_identities)."""
    return BackupRun(job, source, storage, compression=compression, encryption=encryption, progress=progress,
                     identities=parent_identities(storage, job, identity, passphrase), size_policy=size_policy)


def stored_figures(storage, manifest):
    """``(stored_new_bytes, repository_bytes)`` of a backup just made, for the metrics: an
    archive adds its whole stored size and has no repository (None); a restic backup adds what
    restic stored new, and its job's repository is measured (a listing of its objects)."""
    if not resticstore.is_restic(manifest):
        return manifest.size_bytes, None
    added = manifest.restic.get("data_added")
    try:
        return added, resticstore.repository(storage, manifest.job).stored_bytes()
    except (StorageError, ConfigError):
        return added, None   # the backup is stored: a listing that fails now only costs a metric


def backup_count(storage, job):
    """How many complete backups ``job`` has; 0 where the location does not exist yet (a
    first backup creates its directory)."""
    try:
        return len(Catalog(storage).scan(job, with_orphans=False))
    except MissingLocationError:
        return 0


# -- list ---------------------------------------------------------------------------------

def inventory(storage, job=None, backup=None):
    """What the location holds for ``job`` (every job when None): complete backups (newest
    first, each with its last verification), junk, orphans and unfinished uploads.

    With ``backup`` (``latest``, an id or a time; needs ``job``) the result also has
    ``selected``: a list with the one manifest it names.
    """
    catalog = Catalog(storage)
    backups = catalog.scan(job)
    uploads = catalog.incomplete_uploads(job)
    result = {"job": job, "storage": storage.describe(), "backups": backups, "junk": list(catalog.junk),
              "orphans": [{"key": info.key, "size": info.size, "modified": to_iso(info.modified)}
                          for info in catalog.orphans],
              "incomplete_uploads": uploads, "incomplete_uploads_summary": upload_summary(uploads)}
    if backup:
        result["selected"] = [select_backup(catalog, job, backup)[0]]
    return result


def verifications(storage, job):
    """``{backup id: last verification record or None}`` of every complete backup of ``job``."""
    return {manifest.id: manifest.verification
            for manifest in Catalog(storage).scan(job, with_orphans=False)}


# -- verify and drill ---------------------------------------------------------------------

def verify(storage, job, backup="latest", identity=None, passphrase=None, test_restore=False,
           scratch_options=None, record=True, log=None, progress=None, progress_interval=PROGRESS_INTERVAL):
    """Verify the chosen backups of ``job`` (engine/verify.py); with ``test_restore`` each is
    also restored into its kind's scratch target. Returns
    ``{job, backup, results, verified, failed, errors, ok, changed}``."""
    return verify_backups(storage, job, backup=backup, identity=identity, passphrase=passphrase,
                          test_restore=test_restore, scratch_options=scratch_options, record=record, log=log,
                          progress=progress, progress_interval=progress_interval)


def drill(storage, job, backup="latest", identity=None, passphrase=None, scratch_options=None, record=True,
          log=None, progress=None, progress_interval=PROGRESS_INTERVAL):
    """The restore drill of a backup-and-restore kind: verify ``backup`` and restore it into a
    scratch target built from ``scratch_options`` (see scratch_options below), checked and dropped.
    (PostgreSQL point-in-time drills are engine/pitr_drill.py's.)"""
    return verify(storage, job, backup=backup, identity=identity, passphrase=passphrase, test_restore=True,
                  scratch_options=scratch_options, record=record, log=log, progress=progress,
                  progress_interval=progress_interval)


def scratch_options(kind, source_options):
    """The scratch target's options a drill derives from the job's source options (unresolved)."""
    return kinds.scratch_options_from_source(kind, source_options)


# -- restore ------------------------------------------------------------------------------

def restore(storage, job, target_options, kind=None, backup=None, point_in_time=None, identity=None,
            passphrase=None, check_mode=False, log=None, progress=None, progress_interval=PROGRESS_INTERVAL,
            verify_first=False):
    """Verified restore of one backup of ``job`` (engine/restore.py) into the target of its kind,
    built from ``target_options`` once the backup is chosen (kinds.target_factory).

    With ``kind`` the options are checked against that kind's target schema before anything is
    read, and a backup of another kind is refused. (PostgreSQL point-in-time recovery is
    engine/pitr.py's.)
    """
    if kind is not None:
        kinds.check_target_options(kind, target_options)
    return restore_backup(storage, job, kinds.target_factory(target_options, kind, job), backup=backup,
                          point_in_time=point_in_time, identity=identity, passphrase=passphrase,
                          check_mode=check_mode, log=log, progress=progress, progress_interval=progress_interval,
                          verify_first=verify_first)


# -- prune --------------------------------------------------------------------------------

def prune(storage, job, policy, min_keep=1, max_delete=None, force=False, orphan_grace=None, dry_run=False,
          log=None, copy_location=None):
    """Apply the retention ``policy`` to ``job`` at ``storage`` (engine/prune.py).

    With ``copy_location`` (retention's require_copy) only backups that location holds are
    pruned, and of a PITR job's WAL only what the copy holds; ``log`` then gets one line with
    the counts it holds before pruning starts.
    """
    from .prune import prune as prune_location
    copied = wal_copied = None
    if copy_location is not None:
        from .offsite import copied_ids, copied_wal_ids
        manifests = Catalog(storage).scan(job, with_orphans=False)
        copied = copied_ids(copy_location, job, manifests)
        wal_copied = copied_wal_ids(storage, copy_location, job, manifests)
        if log is not None:
            log("require_copy: %d backups%s held by %s" % (
                len(copied), "" if wal_copied is None else " and %d WAL files" % len(wal_copied),
                where(copy_location.describe())))
    return prune_location(storage, job, policy, min_keep=min_keep, max_delete=max_delete, force=force,
                          orphan_grace=orphan_grace, dry_run=dry_run, log=log, copied=copied,
                          wal_copied=wal_copied)


# -- copy ---------------------------------------------------------------------------------

def copy(source, destination, job, backup="all", recheck="size", check_mode=False, log=None, policy=None,
         min_keep=1, reencrypt=None):
    """Copy ``job``'s backups (and a PITR job's WAL) from ``source`` to ``destination``, each
    verified there, manifest last (engine/offsite.py); restic-format backups with ``restic copy``
    into the destination's own repository of the job."""
    from .offsite import copy_backups
    return copy_backups(source, destination, job, backup=backup, recheck=recheck, check_mode=check_mode,
                        log=log, policy=policy, min_keep=min_keep, reencrypt=reencrypt)
