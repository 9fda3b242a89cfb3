#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_copy
short_description: Copy a job's backups to a second location (offsite copies), verified there
version_added: "0.1.0"
author: biometrics.backup contributors (@biometrics)
description:
  - Copies the backups of a job from O(storage) to O(destination), another storage location with its own
    credentials (another S3 endpoint, bucket or region, or a filesystem, NFS or PVC directory).
  - The stored bytes are copied as they are, compressed and encrypted; no key is needed and none is read.
    With O(reencrypt) (a destination held by another team) they are decrypted with the source's key, given
    explicitly, and encrypted to other age recipients on the way instead.
  - Every object is streamed (bounded memory), hashed on the way (a source object that does not match its
    manifest is not copied), then read back from the destination and its size and SHA-256 compared with the
    manifest. The manifest is written last, so an incomplete copy is never listed at the destination. The
    copied manifest records where it was copied from and when (C(copied_from)).
  - Incremental and idempotent - only backups the destination lacks are copied (parents of incremental chains
    first), and nothing changes when the destination is in sync. A copy that was interrupted resumes -
    objects it had stored are read back and kept when they match.
  - A backup at the destination is copied again when its listing shows an object missing or of the wrong
    size, when a verification recorded there (M(biometrics.backup.backup_verify) against the destination)
    failed and its stored bytes differ from the source's, or with O(recheck=full) when any stored byte differs.
  - "PostgreSQL point-in-time recovery: for a job of C(postgres_base) backups the WAL jobs they name (C(wal_job),
    by default C(<job>-wal)) are copied too, after the base backups and the same way, so that the destination can
    be restored to a point in time and O(biometrics.backup.backup_prune#module:require_copy) can prune copied WAL.
    Every WAL file is copied when O(backup=all) and there is no O(destination_retention); otherwise only the WAL
    the base backups held at the destination need (from the oldest one's C(wal_start) on). See RV(wal)."
  - "Backups in the restic format are copied by C(restic copy) into the job's own repository at the destination
    (C(<prefix>/_restic/<job>)), created on the first copy with the source's chunker parameters. It opens with
    O(destination.restic_password) (or O(destination.restic_password_file)), else with the source's password.
    restic writes it through a server on 127.0.0.1 that stores through this module's own connection to
    O(destination), so both locations keep their own S3 credentials. Each copy's payloads are read back from
    the destination and checked against the manifest before the manifest is published; O(reencrypt) is refused
    for these backups. A copy whose data is damaged at the destination is reported as failed and stays listed
    (restic copy does not store again data the destination's index lists)."
  - The destination is an ordinary location - M(biometrics.backup.backup_info), M(biometrics.backup.backup_verify),
    M(biometrics.backup.backup_restore) and M(biometrics.backup.backup_prune) (with a policy of its own) work on it
    unchanged.
extends_documentation_fragment:
  - biometrics.backup.attributes
  - biometrics.backup.attributes.action_group
  - biometrics.backup.storage
  - biometrics.backup.copy_destination
attributes:
  check_mode:
    support: full
    details: Lists the backups that would be copied or repaired; nothing is written.
  diff_mode:
    support: full
    details: Shows the backup ids at the destination before and after.
options:
  job:
    description: The job whose backups are copied.
    type: str
    required: true
  backup:
    description: C(all) (every backup of the job), C(latest), or a backup id; for one backup the parents of its
      incremental chain are copied too.
    type: str
    default: all
  recheck:
    description:
      - How backups already at the destination are checked. C(size) compares the destination's listing with
        the manifests (one listing, no object read). C(full) also reads every stored object back and compares
        its SHA-256, finding silent corruption without any key.
    type: str
    default: size
    choices: [size, full]
  destination_retention:
    description:
      - The destination's own retention policy, the options of M(biometrics.backup.backup_prune) (C(keep_last),
        C(keep_daily), ..., C(keep_within), C(semantics), C(timezone), C(min_keep)) as a dictionary. A backup that
        this policy, applied to what the destination holds plus the backups to copy, would not keep is not
        copied (RV(not_wanted)), so that a destination pruned harder than the source is not filled again.
      - Prune the destination with M(biometrics.backup.backup_prune) and the same policy.
    type: dict
  reencrypt:
    description:
      - Re-encrypt the copies to other age recipients, for a destination held by another team. Each object is
        decrypted with the source's key and encrypted to O(reencrypt.recipients) while it streams (memory
        stays bounded); the destination's manifest gets the new sizes and SHA-256 and records, in
        C(copied_from.reencrypted), the recipients, the source objects and the SHA-256 of each object's
        plaintext (never a key). At the destination the copies are read with the recipients' identity, not with
        the source's.
      - The source's key must be given here (O(reencrypt.identity), O(reencrypt.identity_file),
        O(reencrypt.passphrase) or O(reencrypt.passphrase_file)). A key that does not open the backups to copy is
        refused before anything is written at the destination; so is a missing one.
      - A backup the destination already holds counts as copied whatever it is encrypted to. Changing the
        recipients applies to the backups copied from then on; RV(other_recipients) lists the copies encrypted
        to other keys (delete them at the destination to have them copied again).
      - Without this option nothing is decrypted and no key is read.
    type: dict
    suboptions:
      recipients:
        description: The destination's age public keys (C(age1...)) the copies are encrypted to.
        type: list
        elements: str
      recipients_file:
        description: File with one age public key per line (C(#) comments allowed), as C(age -R) reads it.
        type: path
      identity:
        description: The source's age identity (C(AGE-SECRET-KEY-...) lines) that decrypts the backups being copied.
        type: str
      identity_file:
        description: File holding the source's age identity.
        type: path
      passphrase:
        description: The source's passphrase, for backups encrypted with a passphrase (their C(key.age) envelope is
          not copied).
        type: str
      passphrase_file:
        description: File holding the source's passphrase.
        type: path
  fail_on_error:
    description: Fail the task when a backup could not be copied (a damaged source object, a copy that does
      not read back right, or a chain whose parent could not be copied).
    type: bool
    default: true
seealso:
  - module: biometrics.backup.backup_verify
  - module: biometrics.backup.backup_prune
  - module: biometrics.backup.backup_restore
"""

EXAMPLES = r"""
- name: Copy every backup of the database job to the offsite bucket
  biometrics.backup.backup_copy:
    job: app-db
    storage:
      backend: s3
      bucket: biometrics-backups
      endpoint_url: https://s3.site-a.example.internal
      access_key_file: /etc/backup/s3/access_key
      secret_key_file: /etc/backup/s3/secret_key
    destination:
      backend: s3
      bucket: biometrics-offsite
      endpoint_url: https://s3.site-b.example.internal
      region: eu-central-2
      access_key_file: /etc/backup/offsite/access_key
      secret_key_file: /etc/backup/offsite/secret_key

- name: What would be copied to the NFS share (check mode), re-reading what is already there
  biometrics.backup.backup_copy:
    job: uploads
    recheck: full
    storage:
      backend: filesystem
      path: /backups
    destination:
      backend: nfs
      path: /mnt/offsite-backups
  check_mode: true

- name: Copy to a bucket held by the security team, re-encrypted to their key
  biometrics.backup.backup_copy:
    job: app-db
    storage:
      backend: s3
      bucket: biometrics-backups
      endpoint_url: https://s3.site-a.example.internal
      access_key_file: /etc/backup/s3/access_key
      secret_key_file: /etc/backup/s3/secret_key
    destination:
      backend: s3
      bucket: security-escrow
      endpoint_url: https://s3.security.example.internal
      access_key_file: /etc/backup/escrow/access_key
      secret_key_file: /etc/backup/escrow/secret_key
    reencrypt:
      recipients_file: /etc/backup/escrow/recipients.txt
      identity_file: /etc/backup/identity.txt
"""

RETURN = r"""
copied:
  description: Backups copied (or repaired) by this run, oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: Backup id.
      type: str
    action:
      description: C(copy) (missing at the destination) or C(repair) (there, but damaged or incomplete).
      type: str
    reason:
      description: Why it was copied.
      type: str
    bytes_copied:
      description: Bytes sent to the destination.
      type: int
    bytes_reused:
      description: Bytes already at the destination (an interrupted copy) that read back right.
      type: int
planned:
  description: What the run found to do (in check mode, what it would do), same fields as RV(copied) but the byte counts.
  returned: always
  type: list
  elements: dict
failed:
  description: Backups that could not be copied, each with an C(error).
  returned: always
  type: list
  elements: dict
skipped:
  description: Backups not copied because the parent of their chain could not be.
  returned: always
  type: list
  elements: dict
vanished:
  description:
    - Backups that left the source between the plan and their copy (a partial WAL copy the stream replaced by a newer
      one, or a backup pruned meanwhile). Not an error; nothing of them is listed at the destination.
  returned: always
  type: list
  elements: dict
superseded:
  description:
    - For a job of C(postgres_wal) backups, ids of partial WAL copies deleted at the destination (check mode - that
      would be deleted) because a WAL file held there supersedes them - the complete segment, or a partial copy of
      the same segment that reaches further. The stream deletes them at the source the same way.
  returned: always
  type: list
  elements: str
not_wanted:
  description: Ids of the backups not copied because O(destination_retention) would not keep them.
  returned: always
  type: list
  elements: str
in_sync:
  description: Ids of the backups the destination already held.
  returned: always
  type: list
  elements: str
bytes_copied:
  description: Bytes copied by this run.
  returned: always
  type: int
lag_seconds:
  description: Seconds since the oldest backup the destination does not hold finished (0 when in sync).
  returned: always
  type: float
wal:
  description:
    - For a job of C(postgres_base) backups, one entry per WAL job they name, copied after them (check mode -
      what would be copied). C(changed) and a failure (O(fail_on_error)) of the module cover the WAL as well.
    - C(planned), C(copied), C(failed), C(skipped) and C(vanished) list WAL files (backups of kind C(postgres_wal)) with the
      fields of RV(planned) and RV(copied); C(in_sync) counts those the destination already held, C(not_wanted)
      those no base backup at the destination needs or another WAL file supersedes; C(superseded) as RV(superseded).
  returned: when the job holds C(postgres_base) backups
  type: list
  elements: dict
  sample:
    - job: app-db-wal
      planned: []
      copied: []
      failed: []
      skipped: []
      in_sync: 42
      not_wanted: 0
      bytes_copied: 0
      bytes_reused: 0
      lag_seconds: 0.0
      changed: false
      ok: true
reencrypt:
  description: The recipients the copies of this run are encrypted to (public keys), or null without O(reencrypt).
  returned: always
  type: dict
  sample: {recipients: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]}
other_recipients:
  description: With O(reencrypt), ids of backups the destination holds encrypted to other recipients than
    O(reencrypt.recipients) (copied before the recipients changed); they are kept as they are.
  returned: always
  type: list
  elements: str
source:
  description: The source location (no credentials).
  returned: always
  type: dict
destination:
  description: The destination location (no credentials).
  returned: always
  type: dict
  sample: {backend: s3, bucket: biometrics-offsite, prefix: "", endpoint_url: "https://s3.site-b.example.internal"}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.biometrics.backup.plugins.module_utils.adapter import REENCRYPT_SPEC, STORAGE_SPEC, engine_errors
from ansible_collections.biometrics.backup.plugins.module_utils.backup_common import open_location, resolved, text_of
from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import RETENTION, RETENTION_KEYS
from ansible_collections.biometrics.backup.plugins.module_utils.engine import operations
from ansible_collections.biometrics.backup.plugins.module_utils.engine.offsite import RECHECKS, reencrypt_settings


def main():
    module = AnsibleModule(
        argument_spec=dict(
            storage=STORAGE_SPEC,
            destination=STORAGE_SPEC,
            job=dict(type="str", required=True),
            backup=dict(type="str", default="all"),
            recheck=dict(type="str", default="size", choices=list(RECHECKS)),
            destination_retention=dict(type="dict"),
            reencrypt=REENCRYPT_SPEC,
            fail_on_error=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    params = module.params
    with engine_errors(module, changed=False):
        source = open_location(module)
        destination = open_location(module, "destination")
        policy, min_keep = None, 1
        if params["destination_retention"]:
            retention = RETENTION.validate(params["destination_retention"], "destination_retention")
            policy = dict((key, value) for key, value in retention.items() if key in RETENTION_KEYS)
            min_keep = retention.get("min_keep", 1)
        reencrypt = None
        if params["reencrypt"] is not None:
            # Key files are read (and masked) here; the engine checks recipients and the key.
            reencrypt = reencrypt_settings(resolved(module, "reencrypt"))
            module.no_log_values.update(line for line in (reencrypt["_identity"] or "").splitlines() if line)
        outcome = operations.copy(source, destination, params["job"], backup=params["backup"],
                                  recheck=params["recheck"], check_mode=module.check_mode, policy=policy,
                                  min_keep=min_keep, reencrypt=reencrypt)
    returned = ("changed", "copied", "planned", "failed", "skipped", "vanished", "superseded", "in_sync", "not_wanted",
                "bytes_copied", "lag_seconds", "source", "destination", "reencrypt", "other_recipients")
    result = dict((key, outcome[key]) for key in returned)
    if "wal" in outcome:
        result["wal"] = outcome["wal"]
    if module._diff:
        repaired = set(step["id"] for step in outcome["planned"] if step["action"] == "repair")
        before = sorted(set(outcome["in_sync"]) | repaired)
        arrived = [step["id"] for step in (outcome["planned"] if module.check_mode else outcome["copied"])]
        result["diff"] = dict(before=text_of(before), after=text_of(sorted(set(before) | set(arrived))))
    if params["fail_on_error"] and not outcome["ok"]:
        bad = outcome["failed"] + outcome["skipped"]
        bad += [item for entry in outcome.get("wal") or [] for item in entry["failed"] + entry["skipped"]]
        module.fail_json(msg="%d backups (or WAL files) of job %s were not copied: %s" % (
            len(bad), params["job"], "; ".join("%s: %s" % (item["id"], item["error"]) for item in bad[:3])), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
