"""Which backup a restore, a verification or a drill reads, and the chain it builds on.

A selector is a backup id, ``latest``, an ISO-8601 time or a ``point_in_time`` (the newest
complete backup finished at or before it). Every manifest of the chosen chain is read again
from storage and must equal the catalog's copy, so an edited manifest is refused.
"""

from . import manifest as mf
from .errors import ConfigError, IntegrityError, NotFoundError
from .timeutil import parse_iso, to_iso, utc_now


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
    return manifest, "id" if manifest.id == selector else "time"


def reread_manifest(storage, manifest):
    """The backup's ``manifest.json`` read from storage now, which must equal the catalog's copy.

    Listings may serve manifests from the catalog index (a cache keyed by the manifest's
    size). A manifest never changes after it is published, so a difference means it was
    edited afterwards: the restore refuses instead of trusting either copy.
    """
    manifest = mf.Manifest.wrap(manifest)
    key = mf.object_key(manifest.job, manifest.id, mf.MANIFEST_NAME)
    try:
        fresh = mf.loads(storage.get_bytes(key), key)
    except NotFoundError:
        raise IntegrityError("%s disappeared while the restore was being prepared" % key) from None
    if fresh != manifest.without("verification"):
        raise IntegrityError("%s differs from the copy indexed when the backup was published "
                             "(edited afterwards?)" % key)
    return fresh.with_fields(verification=manifest.verification)


def backup_chain(catalog, manifest):
    """``[full, ..., manifest]`` for incrementals (``[manifest]`` for a full), consistency-checked.

    Every manifest of the chain is re-read from storage (see :func:`reread_manifest`).
    """
    chain = catalog.chain(manifest) if manifest.parent else [manifest]
    chain = [reread_manifest(catalog.storage, item) for item in chain]
    for parent, child in zip(chain, chain[1:]):
        if parent.job != child.job or parent.kind != child.kind:
            raise IntegrityError("backup %s (%s/%s) claims parent %s of %s/%s: foreign chain"
                                 % (child.id, child.job, child.kind, parent.id, parent.job, parent.kind))
        if parse_iso(parent.finished_at) > parse_iso(child.started_at):
            raise IntegrityError("backup %s claims parent %s, which finished after it started"
                                 % (child.id, parent.id))
    return chain
