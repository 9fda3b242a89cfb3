"""Offsite copies: a job's backups copied from one storage location to another, verified there.

The stored bytes are copied as they are (compressed, encrypted): the copy needs no key.
Each backup is copied in the order a backup is written, so an incomplete copy is never listed:

1. every object the source manifest names is streamed from the source to the destination
   (bounded memory, hashed on the way: a source object that does not match its manifest is
   never copied), then read back from the destination to the end and its size and SHA-256
   compared with the manifest (:func:`pipeline.check_object` without decoding);
2. objects in the destination's backup directory that the manifest does not list are removed
   (a stray object fails verification at the destination);
3. the manifest is published last through the destination's :class:`Catalog` (index kept
   right), with a ``copied_from`` record (the source location and the time of the copy).

Incremental and idempotent: a backup the destination lists with the same objects is left
alone. With the destination's own retention ``policy`` a backup that policy would not keep
(together with what the destination holds) is not copied, so a destination that keeps less
than the source is not filled again with what its prune removed. Resumable: objects a killed copy had already stored are read back and kept when they
match, overwritten when not; unfinished objects are never read (prune removes them).
Chains are copied parent first, and a backup whose parent could not be copied is skipped.

A listed backup is repaired (manifest removed first, so it stops being listed, then copied
again) when the destination listing shows one of its objects missing or of the wrong size,
when its recorded verification at the destination failed and reading its stored bytes back
finds a difference, or (``recheck="full"``) when reading back any of its objects does.
"""

import hashlib

from . import manifest as mf
from .backup import ENGINE_VERSION
from .catalog import Catalog
from .errors import ConfigError, IntegrityError, NotFoundError, ObjectMismatchError
from .pipeline import CHUNK, check_object
from .prune import plan as retention_plan
from .storage.base import MissingLocationError, is_unfinished
from .timeutil import is_backup_id, parse_iso, to_iso, utc_now

RECHECKS = ("size", "full")
COPY_ACTION, REPAIR_ACTION = "copy", "repair"
_SIDE_OBJECTS = (mf.MANIFEST_NAME, mf.VERIFICATION_NAME)


def same_backup(source_manifest, destination_manifest):
    """Whether two manifests describe the same stored backup (same id, job and objects)."""
    def objects(manifest):
        return sorted((obj["name"], obj["size"], obj["sha256"]) for obj in manifest["objects"])
    return (source_manifest["id"] == destination_manifest["id"]
            and source_manifest["job"] == destination_manifest["job"]
            and objects(source_manifest) == objects(destination_manifest))


def copied_manifest(source_manifest, source_description, copied_at):
    """The manifest published at the destination: the source's, plus where and when it came from.

    Verification reads the objects list, never the manifest's own bytes, so the extra field
    changes nothing there; the catalog's listing entry (``verification``) is dropped.
    """
    manifest = {key: value for key, value in source_manifest.items() if key != "verification"}
    manifest["copied_from"] = {"storage": dict(source_description), "copied_at": to_iso(copied_at),
                               "engine": ENGINE_VERSION}
    return manifest


def select_sources(backups, selector="all"):
    """The source manifests to copy, oldest first, for ``all``, ``latest`` or a backup id;
    for one backup its chain's parents come along (a restore at the destination needs them)."""
    if selector in (None, "", "all"):
        chosen = list(backups)
    else:
        if selector == "latest":
            wanted = backups[:1]
        elif is_backup_id(selector):
            wanted = [m for m in backups if m["id"] == selector]
        else:
            raise ConfigError("backup must be all, latest or a backup id, got %r" % (selector,))
        if not wanted:
            raise NotFoundError("the source has no complete backup %s" % (selector,))
        by_id = {m["id"]: m for m in backups}
        chosen, item = [], wanted[0]
        while item is not None and item not in chosen:
            chosen.append(item)
            item = by_id.get(item.get("parent")) if item.get("parent") else None
    return sorted(chosen, key=lambda m: (parse_iso(m["started_at"]), m["id"]))


def plan_backup(source_manifest, destination_manifest, stored_sizes):
    """``(action, reason)`` for one source backup judged by the destination's catalog and
    listing alone (no object read): ``copy``, ``repair`` or None (in sync as far as listed)."""
    if destination_manifest is None:
        return COPY_ACTION, "missing at the destination"
    if not same_backup(source_manifest, destination_manifest):
        return REPAIR_ACTION, "the destination's manifest lists other objects"
    for obj in source_manifest["objects"]:
        key = mf.object_key(source_manifest["job"], source_manifest["id"], obj["name"])
        if key not in stored_sizes:
            return REPAIR_ACTION, "%s is missing at the destination" % key
        if stored_sizes[key] != obj["size"]:
            return REPAIR_ACTION, "%s is %d bytes at the destination, the manifest says %d" % (
                key, stored_sizes[key], obj["size"])
    return None, None


def copied_ids(destination, job, source_backups):
    """Ids of ``source_backups`` (``Catalog.scan`` output) the ``destination`` lists with the
    same objects: what prune's ``require_copy`` rail may delete at the source. A destination
    that does not exist holds nothing."""
    try:
        present = {m["id"]: m for m in Catalog(destination, repair_index=False).scan(job, with_orphans=False)}
    except MissingLocationError:
        return set()
    return {m["id"] for m in source_backups if m["id"] in present and same_backup(m, present[m["id"]])}


def copy_lag_seconds(source_backups, present_ids, now):
    """Seconds since the oldest source backup the destination lacks finished (0 in sync)."""
    missing = [parse_iso(m["finished_at"]) for m in source_backups if m["id"] not in present_ids]
    if not missing:
        return 0.0
    return max(0.0, (now - min(missing)).total_seconds())


def _read_back(storage, key, obj):
    """None when ``key`` holds exactly the manifest's bytes, else why not."""
    try:
        check_object(storage, key, obj, "none", None)
    except NotFoundError:
        return "%s is missing" % key
    except IntegrityError as exc:
        return str(exc)
    return None


def stream_object(source, destination, key, obj):
    """Copy one stored object in CHUNK pieces; the source bytes must match ``obj`` (size, SHA-256)
    or nothing is published. Returns the number of bytes copied."""
    digest = hashlib.sha256()
    size = 0
    reader = source.open_reader(key)
    try:
        with destination.open_writer(key) as writer:
            while True:
                data = reader.read(CHUNK)
                if not data:
                    break
                digest.update(data)
                size += len(data)
                writer.write(data)
            if size != obj["size"]:
                raise ObjectMismatchError(key, "size", obj["size"], size, note="at the source: not copied")
            if digest.hexdigest() != obj["sha256"]:
                raise ObjectMismatchError(key, "sha256", obj["sha256"], digest.hexdigest(),
                                          note="at the source: not copied")
            writer.commit()
    finally:
        reader.close()
    return size


class Copier:
    """Copies ``job``'s backups from ``source`` to ``destination`` (two Storage objects)."""

    def __init__(self, source, destination, job, recheck="size", log=None, policy=None, min_keep=1):
        self.job = mf.validate_job_name(job)
        if recheck not in RECHECKS:
            raise ConfigError("recheck must be one of %s, got %r" % (", ".join(RECHECKS), recheck))
        self.source = source
        self.destination = destination
        self.recheck = recheck
        self.policy = policy  # the destination's retention (a retention.Policy or its mapping), or None
        self.min_keep = min_keep
        self.log = log or (lambda message: None)
        self.source_catalog = Catalog(source, repair_index=False)
        self.destination_catalog = Catalog(destination)

    # -- looking -------------------------------------------------------------------------
    def _destination_state(self):
        """``(manifests by id, stored sizes by key)``; an absent location holds nothing."""
        try:
            listed = self.destination_catalog.scan(self.job, with_orphans=False)
            sizes = {info.key: info.size for info in self.destination.list("%s/" % self.job)}
        except MissingLocationError:
            return {}, {}
        return {m["id"]: m for m in listed}, sizes

    def _stored_damage(self, source_manifest):
        """Read back the destination's objects of a listed backup (judged by the source's
        entries: they are the truth): the first difference, or None."""
        for obj in source_manifest["objects"]:
            problem = _read_back(self.destination, mf.object_key(self.job, source_manifest["id"], obj["name"]), obj)
            if problem:
                return problem
        return None

    def _unwanted(self, chosen, present, now):
        """Ids of ``chosen`` missing at the destination that its own policy would prune."""
        if self.policy is None:
            return {}
        missing = [dict(m, verification=None) for m in chosen if m["id"] not in present]
        decided = retention_plan(list(present.values()) + missing, self.policy, min_keep=self.min_keep, now=now)
        kept = {entry["id"] for entry in decided["keep"]}
        return {m["id"]: "the destination's retention policy would not keep it" for m in missing
                if m["id"] not in kept}

    def plan(self, selector="all", now=None):
        """What a copy would do: ``{source_backups, steps, in_sync, present, unwanted}`` (reads only)."""
        source_backups = self.source_catalog.scan(self.job, with_orphans=False)
        chosen = select_sources(source_backups, selector)
        present, sizes = self._destination_state()
        unwanted = self._unwanted(chosen, present, now or utc_now())
        chosen = [m for m in chosen if m["id"] not in unwanted]
        steps, in_sync = [], []
        for manifest in chosen:
            action, reason = plan_backup(manifest, present.get(manifest["id"]), sizes)
            if action is None:
                record = (present[manifest["id"]].get("verification") or {})
                if self.recheck == "full" or record.get("result") == "failed":
                    problem = self._stored_damage(manifest)
                    if problem:
                        action, reason = REPAIR_ACTION, problem
            if action is None:
                in_sync.append(manifest["id"])
                continue
            steps.append({"id": manifest["id"], "action": action, "reason": reason,
                          "parent": manifest.get("parent"), "objects": len(manifest["objects"]),
                          "bytes": sum(obj["size"] for obj in manifest["objects"]),
                          "finished_at": manifest["finished_at"], "_manifest": manifest})
        return {"source_backups": chosen, "steps": steps, "in_sync": in_sync,
                "present": set(present), "sizes": sizes, "unwanted": unwanted}

    # -- copying -------------------------------------------------------------------------
    def _copy_one(self, step, sizes, now):
        manifest = step["_manifest"]
        job, backup_id = self.job, manifest["id"]
        if step["action"] == REPAIR_ACTION:
            # Unlist it first: from here on a kill leaves an unlisted directory, never a
            # listed backup that does not verify. Its old verdict goes with it.
            self.destination.delete(mf.object_key(job, backup_id, mf.MANIFEST_NAME))
            self.destination.delete(mf.object_key(job, backup_id, mf.VERIFICATION_NAME))
        copied = reused = 0
        names = set()
        for obj in manifest["objects"]:
            key = mf.object_key(job, backup_id, obj["name"])
            names.add(obj["name"])
            # Left by an earlier, interrupted copy: kept when it reads back right.
            if sizes.get(key) == obj["size"] and _read_back(self.destination, key, obj) is None:
                reused += obj["size"]
                continue
            copied += stream_object(self.source, self.destination, key, obj)
            problem = _read_back(self.destination, key, obj)
            if problem:
                raise IntegrityError("read back from the destination after copying: %s" % problem)
        prefix = "%s/%s/" % (job, backup_id)
        for info in self.destination.list(prefix):
            name = info.key[len(prefix):]
            if name not in names and name not in _SIDE_OBJECTS and not is_unfinished(name):
                self.destination.delete(info.key)  # a stray would fail verification there
        self.destination_catalog.publish(copied_manifest(manifest, self.source.describe(), now))
        return copied, reused

    def run(self, selector="all", check_mode=False, now=None):
        """Copy (or, in check mode, plan) and return the outcome; see module docstring."""
        # Check mode writes nothing, not even the destination's catalog index (a cache).
        self.destination_catalog.repair_index = not check_mode
        plan = self.plan(selector, now)
        steps = plan["steps"]
        outcome = {"job": self.job, "source": self.source.describe(),
                   "destination": self.destination.describe(), "check_mode": bool(check_mode),
                   "in_sync": plan["in_sync"], "planned": [_public(step) for step in steps],
                   "copied": [], "failed": [], "skipped": [], "bytes_copied": 0, "bytes_reused": 0,
                   "not_wanted": sorted(plan["unwanted"])}
        present = set(plan["present"])
        if check_mode or not steps:
            present -= {step["id"] for step in steps}
        else:
            self.destination.ensure_ready()
            # Parents already at the destination: in sync, or no longer at the source at all.
            done = set(plan["present"]) - {step["id"] for step in steps}
            for step in steps:
                parent = step["parent"]
                if parent and parent not in done:
                    present.discard(step["id"])
                    outcome["skipped"].append(dict(_public(step), error="its parent %s is not at the destination"
                                                   % parent))
                    self.log("backup %s skipped: parent %s was not copied" % (step["id"], parent))
                    continue
                try:
                    copied, reused = self._copy_one(step, plan["sizes"], now or utc_now())
                except IntegrityError as exc:
                    present.discard(step["id"])
                    outcome["failed"].append(dict(_public(step), error=str(exc)))
                    self.log("backup %s not copied: %s" % (step["id"], exc))
                    continue
                done.add(step["id"])
                present.add(step["id"])
                outcome["bytes_copied"] += copied
                outcome["bytes_reused"] += reused
                outcome["copied"].append(dict(_public(step), bytes_copied=copied, bytes_reused=reused))
                self.log("backup %s %s: %d bytes copied, %d bytes already there" % (
                    step["id"], "copied" if step["action"] == COPY_ACTION else "repaired", copied, reused))
        moment = now or utc_now()
        outcome["lag_seconds"] = copy_lag_seconds(plan["source_backups"], present, moment)
        outcome["changed"] = bool(steps) if check_mode else bool(outcome["copied"])
        outcome["ok"] = not outcome["failed"] and not outcome["skipped"]
        return outcome


def _public(step):
    return {key: value for key, value in step.items() if not key.startswith("_")}


def copy_backups(source, destination, job, backup="all", recheck="size", check_mode=False, log=None,
                 now=None, policy=None, min_keep=1):
    """Copy ``job``'s backups (``all``, ``latest`` or an id, with its chain) from ``source`` to
    ``destination`` (whose own retention ``policy``, when given, decides what is worth copying).
    Returns ``{job, source, destination, planned, copied, failed, skipped, in_sync, not_wanted,
    bytes_copied, bytes_reused, lag_seconds, changed, ok, check_mode}``."""
    return Copier(source, destination, job, recheck=recheck, log=log, policy=policy,
                  min_keep=min_keep).run(backup, check_mode, now)
