#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_run
short_description: Take one backup now, with the same engine as the backup CronJobs
version_added: "0.1.0"
author: biometrics.backup contributors (@biometrics)
description:
  - Streams one backup of a source (a PostgreSQL database, a Redis dataset, a directory tree, a
    synced directory or configuration files committed to git) through compression and optional age
    encryption into a storage location, and writes the backup's C(manifest.json) last.
  - A run that fails leaves no manifest, so no listing shows a partial backup as complete.
  - When O(size_anomaly) is given, the new backup's size is compared with the job's previous good
    backup; the ratio is recorded in the manifest, and a C(fail) verdict fails the task (the backup is
    kept for inspection).
  - In check mode the source is only probed (reachable, credentials accepted) and nothing is written.
  - With O(storage.format=restic) the payloads are streamed into the job's restic repository (created on the
    first run) instead, one snapshot per payload tagged with job, kind and backup id; the manifest names the
    snapshots and records each payload's size and SHA-256, and is still written last. Kinds C(postgres),
    C(redis), C(k8s_resources), C(config_git) and C(files) (whole trees, without C(incremental)) only;
    O(encryption) does not apply (restic encrypts).
extends_documentation_fragment:
  - biometrics.backup.attributes
  - biometrics.backup.attributes.action_group
  - biometrics.backup.storage
  - biometrics.backup.storage.encryption
attributes:
  check_mode:
    support: full
    details: Probes the source, reports the plan; reads and writes no data.
  diff_mode:
    support: full
    details: Shows the job's number of backups before and after, and what the new backup holds.
options:
  job:
    description: Job name; the backups are stored under C(<prefix>/<job>/). Lowercase letters, digits, C(.), C(_) and C(-).
    type: str
    required: true
  kind:
    description:
      - What to back up. One of C(postgres), C(redis), C(files), C(directory_sync), C(config_git) and
        any further kind the collection ships (the error for an unknown kind lists them).
    type: str
    required: true
  source:
    description:
      - Source options of the kind, for example for C(postgres) C(host), C(port), C(user), C(password)
        (or C(password_file)), C(database); for C(files) C(path), C(exclude), C(incremental). See the
        kind's section in C(docs/formats.md).
      - Values of secret fields (C(password), C(token), ...) are hidden from the output.
    type: dict
    required: true
  compression:
    description: Compression of the stored stream.
    type: dict
    suboptions:
      algorithm:
        description: Compression algorithm.
        type: str
        choices: [none, gzip, zstd]
        default: zstd
      level:
        description: Compression level (gzip 1-9, default 6; zstd 1-19, default 3).
        type: int
      threads:
        description: zstd worker threads (C(-1) one per core, C(0) none).
        type: int
  size_anomaly:
    description:
      - Judge the new backup's size against the job's previous good backup. The ratio is new size
        divided by previous size. Omit to skip the check.
    type: dict
    suboptions:
      warn_above:
        description: Warn when the ratio is above this (greater than 1).
        type: float
      warn_below:
        description: Warn when the ratio is below this (less than 1).
        type: float
      fail_above:
        description: Fail when the ratio is above this.
        type: float
      fail_below:
        description: Fail when the ratio is below this.
        type: float
      min_previous_bytes:
        description: Do not judge against a previous backup smaller than this.
        type: int
notes:
  - Incremental kinds (C(files) with C(incremental)) read the file index of the previous backup; when
    backups are encrypted, give O(encryption.identity_file) (or the passphrase) too.
seealso:
  - module: biometrics.backup.backup_info
  - module: biometrics.backup.backup_verify
  - module: biometrics.backup.backup_restore
"""

EXAMPLES = r"""
- name: Back up the application database to S3, encrypted
  biometrics.backup.backup_run:
    job: app-db
    kind: postgres
    source:
      host: db.example.internal
      user: backup
      password: "{{ vault_backup_db_password }}"
      database: app
    storage:
      backend: s3
      bucket: biometrics-backups
      endpoint_url: https://s3.example.internal
      access_key: "{{ vault_s3_access_key }}"
      secret_key: "{{ vault_s3_secret_key }}"
    compression:
      algorithm: zstd
      level: 3
    encryption:
      recipients:
        - age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p
    size_anomaly:
      warn_below: 0.5
      fail_below: 0.1
  register: backup

- name: Incremental backup of a directory tree to a PVC mount
  biometrics.backup.backup_run:
    job: uploads
    kind: files
    source:
      path: /srv/uploads
      incremental: true
    storage:
      backend: filesystem
      path: /backups
    encryption:
      recipients_file: /etc/backup/recipients.txt
      identity_file: /etc/backup/identity.txt
"""

RETURN = r"""
backup_id:
  description: Id of the new backup (its directory name). Empty in check mode.
  returned: always
  type: str
  sample: 20240115T020000Z-3fa9c1
manifest:
  description: The manifest written for the new backup (objects with sizes and SHA-256, stats, parent...).
  returned: success, not in check mode
  type: dict
size_check:
  description: Verdict of the size anomaly check (C(level) ok, warn or fail; C(reason)).
  returned: when O(size_anomaly) is given and not in check mode
  type: dict
plan:
  description: What would run - job, kind, source and storage descriptions, compression, encryption recipients.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.biometrics.backup.plugins.module_utils.adapter import (
    ENCRYPTION_SPEC, STORAGE_SPEC, drop_none, engine_errors)
from ansible_collections.biometrics.backup.plugins.module_utils.backup_common import (
    open_location, reading_keys, resolved, text_of, writing_encryption)
from ansible_collections.biometrics.backup.plugins.module_utils.engine import operations


def main():
    module = AnsibleModule(
        argument_spec=dict(
            job=dict(type="str", required=True),
            kind=dict(type="str", required=True),
            source=dict(type="dict", required=True),
            storage=STORAGE_SPEC,
            compression=dict(type="dict", options=dict(
                algorithm=dict(type="str", default="zstd", choices=["none", "gzip", "zstd"]),
                level=dict(type="int"),
                threads=dict(type="int"),
            )),
            encryption=ENCRYPTION_SPEC,
            size_anomaly=dict(type="dict", options=dict(
                warn_above=dict(type="float"),
                warn_below=dict(type="float"),
                fail_above=dict(type="float"),
                fail_below=dict(type="float"),
                min_previous_bytes=dict(type="int"),
            )),
        ),
        supports_check_mode=True,
    )
    params = module.params
    result = dict(changed=False, backup_id="")
    with engine_errors(module, **result):
        # Fields checked (types, bounds, unknown names) before a secret file is read.
        source = operations.make_source(params["kind"], drop_none(params["source"]),
                                        lambda raw: resolved(module, "source", raw))
        storage = open_location(module)
        identity, passphrase = reading_keys(module)
        size_policy = None
        if params["size_anomaly"] is not None:
            size_policy = drop_none(params["size_anomaly"])
        run = operations.prepare_backup(params["job"], source, storage, compression=drop_none(params["compression"]),
                                        encryption=writing_encryption(module), identity=identity,
                                        passphrase=passphrase, size_policy=size_policy)
        result["plan"] = run.plan()
        if module.check_mode:
            source.preflight()
            result["changed"] = True
            if module._diff:
                result["diff"] = dict(before_header="job %s" % params["job"], after_header="job %s" % params["job"],
                                      before="", after=text_of({"new backup": result["plan"]}))
            module.exit_json(**result)
        before = operations.backup_count(storage, params["job"]) if module._diff else None
        manifest = run.run()
    result.update(changed=True, backup_id=manifest.id, manifest=manifest.to_dict())
    if module._diff:
        result["diff"] = dict(
            before_header="job %s" % params["job"], after_header="job %s" % params["job"],
            before=text_of({"backups": before}),
            after=text_of({"backups": before + 1, "new backup": {
                "id": manifest.id, "size_bytes": manifest.size_bytes, "parent": manifest.parent,
                "stats": manifest.stats}}))
    verdict = run.size_verdict
    if verdict is not None:
        result["size_check"] = manifest.size_check
        if verdict.failed:
            module.fail_json(msg="backup %s was stored, but its size breaks the size policy: %s"
                             % (manifest.id, verdict.reason), **result)
        if verdict.level != "ok":
            module.warn("size anomaly: %s" % verdict.reason)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
