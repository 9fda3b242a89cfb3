#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_prune
short_description: Apply a retention policy to the backups of one job at a storage location
version_added: "0.1.0"
author: biometrics.backup contributors (@biometrics)
description:
  - Lists the backups of O(job) from their manifests, decides with a retention policy which of them stay,
    and deletes the others - each backup manifest first, then its payload, so that a backup deleted halfway
    is never listed as complete.
  - The policy has the meaning of C(borg prune) 1.2 or C(restic forget) 0.14 (O(semantics)), exactly as the
    lookup P(biometrics.backup.retention#lookup) computes it.
  - "Safety rails come on top of the policy: only successful backups fill retention periods (failed or
    incomplete backups, and backups whose last verification failed, are deleted on their own once older
    than O(orphan_grace)); the newest successful backup and the newest verified backup always stay;
    at least O(min_keep) successful backups stay; a backup that a kept incremental builds on stays;
    more than O(max_delete) deletions are refused unless O(force); with O(require_copy) a backup not yet
    copied offsite stays."
  - Objects in backup directories without a manifest (interrupted runs), C(.tmp-) leftovers and unfinished
    S3 multipart uploads older than O(orphan_grace) are removed as well. Junk the catalog cannot read
    (for example a manifest of a newer format) is reported, never deleted.
  - "PostgreSQL point-in-time recovery: pruning a job of C(postgres_base) backups also prunes its WAL job
    (the base backups' C(wal_job), by default C(<job>-wal)). A WAL file stays when a kept, complete base
    backup needs it - on that backup's timeline from its C(wal_start) on, every later timeline, and every
    timeline history file; older WAL goes after the base backups, oldest first, and only while at least one
    complete base backup is kept. WAL deletions do not count against O(max_delete). With O(require_copy)
    a WAL file goes only when the same location holds its copy (a M(biometrics.backup.backup_copy) run of the
    base backup job copies its WAL job too); WAL not copied stays."
  - A policy pointed at a WAL job itself (backups of kind C(postgres_wal)) is refused.
  - "Restic format (O(storage.format=restic), or a job with restic-format backups): the manifests of the pruned
    backups are deleted first, then their snapshots are forgotten in the job's restic repository, together with
    snapshots of a backup that never got a manifest (an interrupted run) once older than O(orphan_grace), and
    C(restic prune) deletes the data no snapshot references. The result's C(restic) reports it; check mode lists
    the snapshots it would forget."
extends_documentation_fragment:
  - biometrics.backup.attributes
  - biometrics.backup.attributes.action_group
  - biometrics.backup.storage
  - biometrics.backup.retention_policy
  - biometrics.backup.copy_destination.require_copy
attributes:
  check_mode:
    support: full
    details: Check mode is a complete preview - the same decisions, nothing deleted.
  diff_mode:
    support: full
    details: The diff lists every backup and orphan before, and what remains after.
options:
  job:
    description: The job whose backups are pruned.
    type: str
    required: true
  min_keep:
    description: At least this many successful backups stay, the newest ones, whatever the policy says.
    type: int
    default: 1
  max_delete:
    description:
      - Refuse (and delete nothing) when more than this many backups would be deleted in one run, unless
        O(force=true). Unset means no limit.
    type: int
  force:
    description: Delete even when more than O(max_delete) backups would go.
    type: bool
    default: false
  orphan_grace:
    description:
      - How old failed backups, objects without a manifest and unfinished uploads must be before they are
        removed, as a duration (C(24h), C(7d), ...) or C(0). Give it more than your longest backup run takes.
    type: str
    default: 24h
notes:
  - Backups are ordered and bucketed by the C(started_at) time of their manifests.
  - C(-1) means unlimited with both semantics (restic 0.14 itself ignores a rule set to C(-1)); C(keep_within)
    is measured from the newest successful backup with both semantics (borg 1.2 measures it from the clock).
seealso:
  - plugin: biometrics.backup.retention
    plugin_type: lookup
  - module: biometrics.backup.backup_info
  - module: biometrics.backup.backup_verify
"""

EXAMPLES = r"""
- name: Preview what the seed policy would delete (run with --check --diff to see it)
  biometrics.backup.backup_prune:
    job: app-db
    storage:
      backend: filesystem
      path: /backups
    keep_daily: 30
    keep_weekly: 12
    keep_monthly: 12
    keep_yearly: 7
    timezone: Europe/Berlin
  check_mode: true
  register: preview

- name: Prune for real, never more than 20 backups per run, keep at least 5
  biometrics.backup.backup_prune:
    job: app-db
    storage:
      backend: s3
      bucket: biometrics-backups
      prefix: backups
      endpoint_url: https://s3.example.internal
      access_key_file: /etc/backup/s3/access_key
      secret_key_file: /etc/backup/s3/secret_key
    keep_within: 2d
    keep_daily: 30
    keep_weekly: 12
    keep_monthly: 12
    keep_yearly: 7
    min_keep: 5
    max_delete: 20
    orphan_grace: 2d

- name: Show why each backup stays
  ansible.builtin.debug:
    msg: "{{ preview.keep | items2dict(key_name='id', value_name='reasons') }}"
"""

RETURN = r"""
keep:
  description: The backups that stay, newest first, each with the rules or rails that keep it (C(reasons)).
  returned: always
  type: list
  elements: dict
  sample:
    - id: 20240115T020000Z-3fa9c1
      started_at: "2024-01-15T02:00:00Z"
      finished_at: "2024-01-15T02:03:11Z"
      kind: postgres
      status: complete
      parent: null
      size_bytes: 123456789
      verification: ok
      verified_at: "2024-01-15T04:00:00Z"
      reasons: ["daily #1", "newest verified backup (always kept)"]
prune:
  description:
    - The backups that go (check mode - would go), newest first, each with its C(reason) and C(deleted)
      (true once deleted).
  returned: always
  type: list
  elements: dict
deleted:
  description: Ids of the backups deleted by this run (empty in check mode).
  returned: always
  type: list
  elements: str
orphans:
  description:
    - Garbage without a manifest, one entry per backup directory or leftover, with C(path), C(objects),
      C(uploads), C(bytes), C(last_modified) and C(action) (C(removed), C(would remove) or C(kept (within grace))).
  returned: always
  type: list
  elements: dict
junk:
  description: Objects the catalog could not use (C(key), C(reason)); reported, never deleted.
  returned: always
  type: list
  elements: dict
counts:
  description: Numbers of backups found, kept and pruned, and of orphans removed and waiting.
  returned: always
  type: dict
  sample: {backups: 40, kept: 31, pruned: 9, orphans_removed: 1, orphans_waiting: 0, junk: 0}
  contains:
    wal_pruned:
      description: WAL files deleted (check mode - that would be deleted); only for jobs with base backups.
      type: int
      returned: when the job holds C(postgres_base) backups
    wal_kept:
      description: WAL files that stay; only for jobs with base backups.
      type: int
      returned: when the job holds C(postgres_base) backups
wal:
  description:
    - What pruning the base backups does to their WAL, one entry per WAL job.
    - C(keep_from) lists the first WAL segment each kept complete base backup needs (its C(wal_start)), oldest
      first; WAL of that timeline before C(keep_from[0]), and WAL of older timelines, goes.
    - C(prune) lists the WAL files that go (check mode - would go), oldest first, each with C(id), C(file),
      C(type) (C(segment) or C(partial)), C(finished_at), C(size_bytes) and C(deleted); C(deleted) lists the
      ids deleted by this run; C(kept) counts the WAL files that stay.
    - C(reason) is set when no WAL may go (no complete base backup is kept); it is null otherwise.
      With O(require_copy) a WAL file not held by the copy location stays and is counted in C(kept).
  returned: when the job holds C(postgres_base) backups
  type: list
  elements: dict
  sample:
    - job: app-db-wal
      keep_from: ["000000010000000000000005", "000000010000000000000009"]
      kept: 12
      prune:
        - id: 20240101T020001Z-1c2d3e
          file: "000000010000000000000004"
          type: segment
          finished_at: "2024-01-01T02:00:01Z"
          size_bytes: 1423311
          deleted: true
      deleted: [20240101T020001Z-1c2d3e]
      reason: null
policy:
  description: The policy as applied (counts, C(keep_within), C(semantics), C(timezone)).
  returned: always
  type: dict
restic:
  description:
    - The restic format - what was done to the job's restic repository after the manifests went.
    - C(forgotten) (check mode - C(would_forget)) lists the snapshot ids forgotten, those of the pruned backups
      and C(orphan_snapshots) (snapshots of a backup that never got a manifest, older than O(orphan_grace));
      C(duplicate_snapshots) lists snapshots of a kept backup that its manifest does not name (two copy runs
      racing into one destination both copied it), older than O(orphan_grace), forgotten only while every snapshot
      the manifest names is there; C(orphan_snapshots_waiting) counts the younger ones of both (and those whose time
      or arrival cannot be read);
      C(pruned) says whether C(restic prune) ran.
  returned: when the job has restic-format backups or O(storage.format=restic)
  type: dict
  sample:
    repository: "local:/backups/_restic/app-db"
    forgotten: ["6050f1a11be0bd0af166c2ab0056e301e708a32670dec5c57e01cf8b4fe2f32f"]
    would_forget: []
    orphan_snapshots: []
    duplicate_snapshots: []
    orphan_snapshots_waiting: 0
    pruned: true
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.biometrics.backup.plugins.module_utils.adapter import STORAGE_SPEC, engine_errors
from ansible_collections.biometrics.backup.plugins.module_utils.backup_common import open_location
from ansible_collections.biometrics.backup.plugins.module_utils.engine import operations
from ansible_collections.biometrics.backup.plugins.module_utils.engine.prune import PartialPruneError, PruneRefusedError

POLICY_OPTIONS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
                  "keep_within", "semantics", "timezone")
EMPTY = dict(keep=[], prune=[], deleted=[], orphans=[], junk=[], counts={}, policy={})


def _lines(backups, orphans):
    lines = ["%s  %s  %s" % (entry["id"], entry["started_at"], entry.get("kind") or "") for entry in backups]
    lines += ["orphan %s  (%d objects, %d bytes)" % (entry["path"], entry["objects"], entry["bytes"])
              for entry in orphans]
    return "".join(line + "\n" for line in lines)


def _wal_lines(result, after):
    lines = []
    for entry in result.get("wal") or []:
        going = entry["prune"]
        if going and not after:
            lines.append("wal %s: %d files, %s .. %s" % (entry["job"], len(going), going[0]["file"], going[-1]["file"]))
        since = " from %s on" % entry["keep_from"][0] if entry["keep_from"] else ""
        lines.append("wal %s: %d files kept%s" % (entry["job"], entry["kept"], since))
    return "".join(line + "\n" for line in lines)


def _diff(result, job):
    everything = sorted(result["keep"] + result["prune"], key=lambda e: (e["started_at"], e["id"]), reverse=True)
    waiting = [entry for entry in result["orphans"] if entry["action"].startswith("kept")]
    return {
        "before_header": "job %s: backups and orphans" % job,
        "after_header": "job %s: after pruning" % job,
        "before": _lines(everything, result["orphans"]) + _wal_lines(result, False),
        "after": _lines(result["keep"], waiting) + _wal_lines(result, True),
    }


def main():
    module = AnsibleModule(
        argument_spec=dict(
            storage=STORAGE_SPEC,
            job=dict(type="str", required=True),
            keep_last=dict(type="int", default=0),
            keep_hourly=dict(type="int", default=0),
            keep_daily=dict(type="int", default=0),
            keep_weekly=dict(type="int", default=0),
            keep_monthly=dict(type="int", default=0),
            keep_yearly=dict(type="int", default=0),
            keep_within=dict(type="str"),
            semantics=dict(type="str", default="borg", choices=["borg", "restic"]),
            timezone=dict(type="str", default="UTC"),
            min_keep=dict(type="int", default=1),
            max_delete=dict(type="int"),
            force=dict(type="bool", default=False),
            orphan_grace=dict(type="str", default="24h"),
            require_copy=dict(type="dict", options=STORAGE_SPEC["options"]),
        ),
        supports_check_mode=True,
    )
    params = module.params
    policy = dict((name, params[name]) for name in POLICY_OPTIONS)
    with engine_errors(module, changed=False, **EMPTY):
        storage = open_location(module)
        destination = open_location(module, "require_copy") if params["require_copy"] else None
        try:
            result = operations.prune(storage, params["job"], policy, min_keep=params["min_keep"],
                                      max_delete=params["max_delete"], force=params["force"],
                                      orphan_grace=params["orphan_grace"], dry_run=module.check_mode,
                                      copy_location=destination)
        except PruneRefusedError as exc:
            module.fail_json(msg=str(exc), changed=False, refused=True, **_public(exc.result))
        except PartialPruneError as exc:
            module.fail_json(msg=str(exc), changed=bool(exc.result["deleted"]), **_public(exc.result))
    output = _public(result)
    if module._diff:  # pylint: disable=protected-access  # AnsibleModule exposes --diff only so
        output["diff"] = _diff(result, params["job"])
    module.exit_json(changed=result["changed"], **output)


def _public(result):
    keys = ("keep", "prune", "deleted", "orphans", "junk", "counts", "policy", "wal", "restic")
    return dict((key, result[key]) for key in keys if key in result)


if __name__ == "__main__":
    main()
