#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_restore
short_description: Verified restore of one backup (an id, the latest, or a point in time) into a target
version_added: "0.1.0"
author: biometrics.backup contributors (@biometrics)
description:
  - Chooses one backup of a job - by id, the latest, or the newest one finished at or before a point in
    time; for incremental backups the full backup and every incremental up to it.
  - Every stored object of that chain is read to the end and checked against the manifest (size and
    SHA-256), decrypted and decompressed. A corrupted, truncated, swapped or foreign backup, an edited
    manifest or a wrong key fails the task with a clear message, and the target stays exactly as it was.
  - Targets that restore next to the live data (C(files) into a staging directory, C(redis) into a
    private temporary server, C(postgres) into a new database, C(config_git), C(k8s_resources)) take one
    pass - their payloads are checked while the target reads them, and the live data is touched only once
    every payload has been read to its end and matched the manifest; a failure discards the staging
    area. Every other object (key envelopes, C(globals.sql)) is verified before the target starts. Other
    targets, O(verify_first=true) and check mode take two passes - everything is verified before the
    target is touched, then read again for the restore.
  - The target of the backup's kind then restores next to the live data, runs its checks against the
    manifest's statistics, and only then puts the result in place. C(postgres) restores into a new
    database and swaps it in by rename when asked (keeping the old one for rollback); C(redis) loads
    into a running server and checks key counts per database; C(files) restores a tree or a subpath
    into a directory and checks file count, bytes and checksums; C(config_git) checks out the backed-up
    commit into a directory.
  - A backup in the restic format is read with C(restic dump) on both paths, each payload checked against the
    size and SHA-256 of its manifest (restic also checks every block it reads), so a damaged repository fails
    the task before the live data is touched. It needs O(storage.restic_password).
extends_documentation_fragment:
  - biometrics.backup.attributes
  - biometrics.backup.attributes.action_group
  - biometrics.backup.storage
  - biometrics.backup.storage.encryption
attributes:
  check_mode:
    support: full
    details: >-
      Chooses and fully verifies the backup, probes the target and asks it for its plan (the database it would
      create and the renames, the Redis databases it would flush and load, the files it would write, the API
      server's dry run of every object); writes nothing.
  diff_mode:
    support: full
    details: Shows the target and what the chosen backup would put there.
options:
  job:
    description: The job whose backup is restored.
    type: str
    required: true
  backup:
    description:
      - C(latest), a backup id, or an ISO-8601 time (the newest backup finished at or before it).
      - Defaults to C(latest) unless O(point_in_time) is given.
    type: str
  point_in_time:
    description:
      - Restore the newest complete backup that finished at or before this ISO-8601 time.
      - With O(kind=postgres_base), PostgreSQL point-in-time recovery - the base backup and the stored WAL
        replayed to exactly this time (or C(latest), the default), then the C(database) of O(target) copied into
        its C(restore_database), or the whole data directory left at its C(data_dir). See
        C(docs/postgres-pitr.md).
      - With O(restore_point), an upper bound only (see there).
    type: str
  restore_point:
    description:
      - With O(kind=postgres_base) only - recover to this named restore point (created with
        C(pg_create_restore_point) on the server) instead of a time, through PostgreSQL's C(recovery_target_name).
      - The base backup is the newest one that ended before the point, as the restore points recorded by the WAL
        stream tell (it records them when C(pg_waldump) is installed where it runs). WAL stored without them does
        not tell where the point lies - then O(point_in_time) must be given too, a time after the point was created,
        and the newest base backup finished before that time is used.
    type: str
  kind:
    description: The kind the target restores; when given, it must match the chosen backup's kind.
    type: str
  target:
    description:
      - Target options of the backup's kind. C(postgres) - C(host), C(port), C(user), C(password),
        C(database), C(restore_database), C(swap), C(drop_old), C(restore_globals), C(jobs) (parallel
        C(pg_restore --jobs); above 1 the verified dump is spooled to C(scratch_dir) first), C(scratch_dir); C(redis) - C(host),
        C(port), C(password), C(flush), C(replace), C(db_map); C(files) - C(path), C(subpath),
        C(overwrite), C(ownership); C(config_git) - C(path), C(overwrite); C(postgres_base) - the C(postgres)
        fields plus C(data_dir), C(scratch_dir), C(run_as), C(recovery_timeout). See C(docs/formats.md).
      - Values of secret fields (C(password), ...) are hidden from the output.
    type: dict
    required: true
  verify_first:
    description:
      - Verify every object of the chain in full before the target is called, then read the payloads again for
        the restore (two passes), also for targets that can verify while they restore.
      - Takes longer; the guarantee for the live data is the same. Not used with O(kind=postgres_base).
    type: bool
    default: false
seealso:
  - module: biometrics.backup.backup_verify
  - module: biometrics.backup.backup_info
"""

EXAMPLES = r"""
- name: Restore the database as it was last night, swapping it in and keeping the old one
  biometrics.backup.backup_restore:
    job: app-db
    point_in_time: "2024-01-15T03:00:00Z"
    target:
      host: db.example.internal
      user: postgres
      password: "{{ vault_postgres_password }}"
      database: app
      swap: true
    storage:
      backend: s3
      bucket: biometrics-backups
      endpoint_url: https://s3.example.internal
      access_key_file: /etc/backup/s3/access_key
      secret_key_file: /etc/backup/s3/secret_key
    encryption:
      identity_file: /etc/backup/identity.txt
  register: restored

- name: Restore one directory of the latest files backup elsewhere
  biometrics.backup.backup_restore:
    job: uploads
    target:
      path: /srv/restored-uploads
      subpath: invoices/2024
    storage:
      backend: filesystem
      path: /backups
    encryption:
      identity_file: /etc/backup/identity.txt

- name: Only check that the latest backup is restorable (verifies everything, writes nothing)
  biometrics.backup.backup_restore:
    job: uploads
    target:
      path: /srv/uploads
      overwrite: true
    storage:
      backend: filesystem
      path: /backups
  check_mode: true
"""

RETURN = r"""
backup_id:
  description: The restored backup.
  returned: success
  type: str
  sample: 20240115T020000Z-3fa9c1
kind:
  description: Its kind.
  returned: success
  type: str
selected_by:
  description: How the backup was chosen - C(latest), C(id), C(time) or C(point_in_time).
  returned: success
  type: str
chain:
  description: Ids of the backups read, oldest first (the full backup, then incrementals).
  returned: success
  type: list
  elements: str
target:
  description: Where the data went (no credentials).
  returned: success
  type: dict
verification:
  description: >-
    What was verified - C(objects), C(stored_bytes), C(plain_bytes), per-object C(details) (C(name), C(size),
    C(sha256), C(plain_bytes), C(payload), C(backup)), and C(mode) - C(one-pass) when the target's payloads were
    verified as it read them, C(two-pass) when everything was verified before the target was called.
  returned: success
  type: dict
  sample: {"mode": "one-pass", "objects": 2, "stored_bytes": 1048913, "plain_bytes": 5242880}
checks:
  description: >-
    The target's checks after the restore, each C(what), C(expected), C(actual), C(ok). In check mode, the checks
    the target could make without writing (for example the files index, or the API server's dry run).
  returned: success
  type: list
  elements: dict
restore:
  description: >-
    The target's own report (for example created database names, swapped, key counts); in check mode its plan
    (C(would_create), C(would_rename), C(would_flush), C(would_load), C(created)/C(updated)/C(unchanged) of a dry run).
  returned: success
  type: dict
plan:
  description: What would be restored where.
  returned: in check mode
  type: str
duration_seconds:
  description: Total time, verification included (equals C(phases.total)).
  returned: success
  type: float
phases:
  description: >-
    Wall time in seconds of each phase of the restore, one after the other: C(select) (backup chosen, chain and
    keys read), C(verify) (every object read, hashed, decrypted and decompressed; on the one-pass path only the
    objects the target does not read itself, so it is near 0), C(prepare) (preflight and the
    target's set-up, for example CREATE DATABASE, until the first payload is read), C(transfer) (payloads read,
    decrypted, decompressed and fed to the target's tool until the last one ends), C(load) (what the tool does after
    its input ended, for example pg_restore's index builds), C(checks) (the target's checks, such as row counts,
    and a swap), and C(total). Each is at least 0 and they add up to at most C(total). A phase a restore does not
    pass (check mode writes nothing) is 0.
  returned: success
  type: dict
  sample: {"select": 0.012, "verify": 4.1, "prepare": 0.35, "transfer": 9.8, "load": 2.4, "checks": 0.2, "total": 16.9}
verify_seconds:
  description: Time spent verifying before the target was called (see C(phases.verify)).
  returned: success
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.biometrics.backup.plugins.module_utils.adapter import (
    ENCRYPTION_SPEC, STORAGE_SPEC, drop_none, engine_errors)
from ansible_collections.biometrics.backup.plugins.module_utils.backup_common import (
    open_location, reading_keys, resolved, text_of)
from ansible_collections.biometrics.backup.plugins.module_utils.engine import kinds
from ansible_collections.biometrics.backup.plugins.module_utils.engine import operations
from ansible_collections.biometrics.backup.plugins.module_utils.engine import pitr
from ansible_collections.biometrics.backup.plugins.module_utils.engine.pitr_runner import TARGET_SCHEMA
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.target import PostgresTarget
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            storage=STORAGE_SPEC,
            encryption=ENCRYPTION_SPEC,
            job=dict(type="str", required=True),
            backup=dict(type="str"),
            point_in_time=dict(type="str"),
            restore_point=dict(type="str"),
            kind=dict(type="str"),
            target=dict(type="dict", required=True),
            verify_first=dict(type="bool", default=False),
        ),
        mutually_exclusive=[("backup", "point_in_time"), ("backup", "restore_point")],
        supports_check_mode=True,
    )
    params = module.params
    if params["kind"] == "postgres_base":
        _point_in_time(module)
    if params["restore_point"]:
        module.fail_json(msg="restore_point is for kind postgres_base (PostgreSQL point-in-time recovery)",
                         changed=False)
    with engine_errors(module, changed=False):
        if params["kind"]:
            # An unknown kind or a wrong target field fails before a secret or storage is read.
            kinds.check_target_options(params["kind"], drop_none(params["target"]))
        options = resolved(module, "target")
        storage = open_location(module)
        identity, passphrase = reading_keys(module)
        report = operations.restore(storage, params["job"], options, kind=params["kind"] or None,
                                    backup=params["backup"], point_in_time=params["point_in_time"],
                                    identity=identity, passphrase=passphrase, check_mode=module.check_mode,
                                    verify_first=params["verify_first"])
    result = dict(report)
    result["changed"] = True if module.check_mode else bool(report["changed"])
    if module._diff:
        manifest_stats = dict(backup=report["backup_id"], finished_at=report["finished_at"], chain=report["chain"])
        result["diff"] = dict(before_header="target", after_header="backup %s" % report["backup_id"],
                              before=text_of(report["target"]),
                              after=text_of(dict(report["target"], restored_from=manifest_stats)))
    module.exit_json(**result)


def _point_in_time(module):
    """PostgreSQL point-in-time recovery (engine/pitr.py): base backup + WAL to a time, then a database copy."""
    params = module.params
    with engine_errors(module, changed=False):
        if params["backup"]:
            raise ConfigError("kind postgres_base restores to point_in_time (a time or latest), not to a backup")
        TARGET_SCHEMA.validate(drop_none(params["target"]), "target")
        options = TARGET_SCHEMA.validate(resolved(module, "target"), "target")
        where = {key: options.pop(key) for key in ("data_dir", "scratch_dir", "run_as", "recovery_timeout")
                 if key in options}
        storage = open_location(module)
        identity, passphrase = reading_keys(module)
        target = None if "data_dir" in where else PostgresTarget(options)
        report = pitr.restore_point_in_time(
            storage, params["job"], params["point_in_time"] or (None if params["restore_point"] else pitr.LATEST),
            restore_point=params["restore_point"], identity=identity, passphrase=passphrase,
            target=target, database=options.get("database") or options.get("dbname"),
            data_dir=where.get("data_dir"), scratch_dir=where.get("scratch_dir"), bin_dir=options.get("bin_dir"),
            run_as=where.get("run_as"), user=options.get("user") or "postgres",
            timeout=where.get("recovery_timeout", 3600), check_mode=module.check_mode)
    result = dict(report)
    result["changed"] = True if module.check_mode else bool(report["changed"])
    if module._diff:
        recovered_to = ("restore point %s" % params["restore_point"] if params["restore_point"]
                        else report["plan"]["target_time"])
        result["diff"] = dict(before_header="target", after_header="recovered to %s" % recovered_to,
                              before=text_of(target.describe() if target else {"data_dir": where.get("data_dir")}),
                              after=text_of(dict(report["plan"], recovered_to=report.get("recovered_to"))))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
