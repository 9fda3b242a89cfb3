#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_verify
short_description: Verify stored backups - checksums, decryption, decompression, optional test restore
version_added: "0.1.0"
author: biometrics.backup contributors (@biometrics)
description:
  - For the chosen backups of a job, reads every stored object to the end and compares its size and
    SHA-256 with the manifest, decrypts and decompresses the whole stream (for incremental backups, the
    whole chain from the full backup).
  - With O(test_restore=true) the backup is also restored into a scratch target of its kind (a
    throwaway database on the given server, a temporary redis-server, a temporary directory) and the
    kind's data checks compare the result with the manifest's statistics (row counts per table, keys per
    database, file count, bytes and checksums).
  - Each verdict is recorded next to the backup (C(verification.json)), so retention can keep the newest
    verified backup and metrics can report the last verified time. A wrong key or an unreachable scratch
    server is reported but not recorded, since it says nothing about the backup.
  - Backups in the restic format (O(storage.format=restic)) are read with C(restic dump) and every payload is
    compared with the size and SHA-256 its manifest recorded; before that, C(restic check) checks the job's
    repository once per run (its structure, plus the share of pack data O(storage.restic_read_data_subset)
    names; all of it with O(test_restore=true) unless a share is configured). Each result then carries
    C(restic_check); errors found by it fail the verdict.
extends_documentation_fragment:
  - biometrics.backup.attributes
  - biometrics.backup.attributes.action_group
  - biometrics.backup.storage
  - biometrics.backup.storage.encryption
attributes:
  check_mode:
    support: full
    details: Verifies the same way but records nothing.
  diff_mode:
    support: full
    details: Shows each verified backup's previous and new verification result.
options:
  job:
    description: The job whose backups are verified.
    type: str
    required: true
  backup:
    description: C(latest), C(all), a backup id, or an ISO-8601 time (the newest backup finished at or before it).
    type: str
    default: latest
  test_restore:
    description: Also restore into a scratch target and run the kind's data checks.
    type: bool
    default: false
  scratch:
    description:
      - Options of the scratch target for O(test_restore). For C(postgres) the connection to the server
        that hosts the throwaway database (C(host), C(port), C(user), C(password), C(database)); for
        C(redis) optionally C(redis_server) (the binary) and C(temp_dir); C(files) and C(config_git) need none.
      - Values of secret fields are hidden from the output.
    type: dict
    default: {}
  record:
    description: Record each verdict next to its backup. Never done in check mode.
    type: bool
    default: true
  fail_on_error:
    description: Fail the task when a backup fails verification or cannot be read with the given key.
    type: bool
    default: true
seealso:
  - module: biometrics.backup.backup_restore
  - module: biometrics.backup.backup_info
"""

EXAMPLES = r"""
- name: Verify every backup of the files job (checksums, decryption, decompression)
  biometrics.backup.backup_verify:
    job: uploads
    backup: all
    storage:
      backend: filesystem
      path: /backups
    encryption:
      identity_file: /etc/backup/identity.txt

- name: Test-restore the latest database backup into a scratch database
  biometrics.backup.backup_verify:
    job: app-db
    test_restore: true
    scratch:
      host: db.example.internal
      user: backup
      password: "{{ vault_backup_db_password }}"
      database: app
    storage:
      backend: s3
      bucket: biometrics-backups
      endpoint_url: https://s3.example.internal
      access_key_file: /etc/backup/s3/access_key
      secret_key_file: /etc/backup/s3/secret_key
    encryption:
      passphrase_file: /etc/backup/passphrase
"""

RETURN = r"""
results:
  description: One entry per verified backup.
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: Backup id.
      type: str
    result:
      description: C(ok), C(failed) (the backup is damaged or its data checks failed) or C(error) (wrong or missing key).
      type: str
    error:
      description: Why it failed, or null.
      type: str
    objects:
      description: Objects read and compared (the whole chain for incrementals).
      type: int
    stored_bytes:
      description: Stored bytes read and hashed.
      type: int
    plain_bytes:
      description: Payload bytes after decryption and decompression.
      type: int
    checks:
      description: Data checks of the test restore, each C(what), C(expected), C(actual), C(ok).
      type: list
      elements: dict
    recorded:
      description: Whether the verdict was recorded next to the backup.
      type: bool
    duration_seconds:
      description: Time taken.
      type: float
summary:
  description: Counts of the verdicts.
  returned: always
  type: dict
  contains:
    verified:
      description: Backups that passed.
      type: int
    failed:
      description: Backups that failed (damaged, or their data checks failed).
      type: int
    errors:
      description: Backups that could not be read with the given key.
      type: int
  sample: {verified: 3, failed: 0, errors: 0}
passed:
  description: Whether every chosen backup passed.
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.biometrics.backup.plugins.module_utils.adapter import (
    ENCRYPTION_SPEC, STORAGE_SPEC, engine_errors)
from ansible_collections.biometrics.backup.plugins.module_utils.backup_common import (
    open_location, reading_keys, resolved, text_of)
from ansible_collections.biometrics.backup.plugins.module_utils.engine import operations


def main():
    module = AnsibleModule(
        argument_spec=dict(
            storage=STORAGE_SPEC,
            encryption=ENCRYPTION_SPEC,
            job=dict(type="str", required=True),
            backup=dict(type="str", default="latest"),
            test_restore=dict(type="bool", default=False),
            scratch=dict(type="dict", default={}),
            record=dict(type="bool", default=True),
            fail_on_error=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    params = module.params
    with engine_errors(module, changed=False, results=[]):
        storage = open_location(module)
        identity, passphrase = reading_keys(module)
        scratch = resolved(module, "scratch")
        previous = operations.verifications(storage, params["job"]) if module._diff else {}
        outcome = operations.verify(storage, params["job"], backup=params["backup"], identity=identity,
                                    passphrase=passphrase, test_restore=params["test_restore"],
                                    scratch_options=scratch, record=params["record"] and not module.check_mode)
    result = dict(changed=outcome["changed"], job=outcome["job"], backup=outcome["backup"],
                  results=outcome["results"], passed=outcome["ok"],
                  summary=dict(verified=outcome["verified"], failed=outcome["failed"], errors=outcome["errors"]))
    if module.check_mode and params["record"]:
        result["changed"] = any(r["result"] in ("ok", "failed") for r in outcome["results"])
    if module._diff:
        result["diff"] = dict(
            before=text_of(dict((r["id"], (previous.get(r["id"]) or {}).get("result")) for r in outcome["results"])),
            after=text_of(dict((r["id"], r["result"]) for r in outcome["results"])))
    if params["fail_on_error"] and not outcome["ok"]:
        bad = [r for r in outcome["results"] if r["result"] != "ok"]
        module.fail_json(msg="%d of %d backups of job %s did not pass verification: %s" % (
            len(bad), len(outcome["results"]), params["job"],
            "; ".join("%s: %s" % (r["id"], r["error"]) for r in bad[:3])), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
