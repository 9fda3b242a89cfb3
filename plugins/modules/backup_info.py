#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: backup_info
short_description: List the backups at a storage location, with their manifests
version_added: "0.1.0"
author: biometrics.backup contributors (@biometrics)
description:
  - Lists complete backups (those with a C(manifest.json)) of one job or of every job at a storage
    location, newest first, each with its manifest and its last verification record.
  - Also reports junk the catalog could not use (unreadable or misplaced manifests, stray objects),
    orphans (objects of interrupted runs without a manifest) and, on S3, unfinished multipart uploads
    (killed runs; invisible to listings but holding storage until aborted), without changing anything.
    M(biometrics.backup.backup_prune) removes orphans and unfinished uploads older than its C(orphan_grace).
  - A filesystem or NFS location whose O(storage.path) does not exist or is not a directory is an error,
    not an empty list (only M(biometrics.backup.backup_run) creates it); so is an S3 bucket that does not exist.
extends_documentation_fragment:
  - biometrics.backup.attributes
  - biometrics.backup.attributes.action_group
  - biometrics.backup.storage
attributes:
  check_mode:
    support: full
    details: Read-only; runs the same in check mode.
  diff_mode:
    support: none
options:
  job:
    description: Only this job. Omit to list every job at the location.
    type: str
  kind:
    description: Only backups of this kind (C(postgres), C(redis), C(files), ...).
    type: str
  status:
    description: Only backups with this manifest status (C(complete) for every listed backup today).
    type: str
  since:
    description: Only backups that finished at or after this ISO-8601 time.
    type: str
  until:
    description: Only backups that finished at or before this ISO-8601 time.
    type: str
  backup:
    description:
      - Only one backup of O(job) - C(latest), a backup id, or an ISO-8601 time (the newest backup
        finished at or before it). Requires O(job).
    type: str
  verified:
    description: Only backups whose last verification passed (C(true)) or that have none or a failed one (C(false)).
    type: bool
seealso:
  - module: biometrics.backup.backup_run
  - module: biometrics.backup.backup_verify
"""

EXAMPLES = r"""
- name: Every backup of the database job
  biometrics.backup.backup_info:
    job: app-db
    storage:
      backend: filesystem
      path: /backups
  register: found

- name: The newest backup of every job at an S3 location, as of new year
  biometrics.backup.backup_info:
    until: "2024-01-01T00:00:00Z"
    storage:
      backend: s3
      bucket: biometrics-backups
      endpoint_url: https://s3.example.internal
      access_key_file: /etc/backup/s3/access_key
      secret_key_file: /etc/backup/s3/secret_key

- name: Require at least one verified backup of the database job
  ansible.builtin.assert:
    that: found.backups | selectattr('verification') | selectattr('verification.result', 'equalto', 'ok') | list | length > 0
"""

RETURN = r"""
backups:
  description: Manifests of the matching backups, newest first, each with C(verification) (the last record or null).
  returned: always
  type: list
  elements: dict
  sample:
    - id: 20240115T020000Z-3fa9c1
      job: app-db
      kind: postgres
      status: complete
      started_at: "2024-01-15T02:00:00Z"
      finished_at: "2024-01-15T02:03:11Z"
      size_bytes: 123456789
      parent: null
      verification: {result: ok, verified_at: "2024-01-15T04:00:00Z"}
count:
  description: Number of backups returned.
  returned: always
  type: int
jobs:
  description: Jobs that have at least one complete backup at the location (before filtering by kind, status, time).
  returned: always
  type: list
  elements: str
junk:
  description: Objects the catalog skipped, each with C(key) and C(reason).
  returned: always
  type: list
  elements: dict
orphans:
  description: Objects in backup directories without a manifest (interrupted runs), each with C(key), C(size), C(modified).
  returned: always
  type: list
  elements: dict
incomplete_uploads:
  description:
    - Unfinished S3 multipart uploads below O(job) (or anywhere at the location), oldest first. Always empty for
      the C(filesystem) and C(nfs) backends.
    - They come from runs killed mid-upload; no listing shows them, but S3 keeps (and bills) their parts until
      they are aborted, which M(biometrics.backup.backup_prune) does once they are older than its C(orphan_grace).
  returned: always
  type: list
  elements: dict
  contains:
    key:
      description: Object key of the upload, relative to the location.
      type: str
    upload_id:
      description: The S3 upload id (what C(aws s3api abort-multipart-upload) needs).
      type: str
    initiated:
      description: When the upload started (ISO-8601, UTC).
      type: str
    age_seconds:
      description: Seconds since the upload started.
      type: int
    parts:
      description: Parts uploaded so far (null when the upload finished between listing it and counting its parts).
      type: int
    bytes:
      description: Bytes those parts hold on the server (null as for C(parts)).
      type: int
  sample:
    - key: app-db/20240115T020000Z-3fa9c1/dump.pgdump.zst.age
      upload_id: 2~iCw_lDVadfbZz0Gm6oZT_4u0mUNF9yz
      initiated: "2024-01-15T02:00:03Z"
      age_seconds: 7260
      parts: 12
      bytes: 201326592
incomplete_uploads_summary:
  description: Totals of C(incomplete_uploads) - C(count), C(bytes) and C(oldest_age_seconds) (null when there are none).
  returned: always
  type: dict
  sample: {count: 1, bytes: 201326592, oldest_age_seconds: 7260}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.biometrics.backup.plugins.module_utils.adapter import STORAGE_SPEC, engine_errors
from ansible_collections.biometrics.backup.plugins.module_utils.backup_common import open_location
from ansible_collections.biometrics.backup.plugins.module_utils.engine import operations
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import upload_summary
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import parse_iso


def _moment(value, name):
    if value is None:
        return None
    try:
        return parse_iso(value)
    except ValueError:
        raise ConfigError("%s: %r is not an ISO-8601 time" % (name, value)) from None


def _matches(manifest, params, since, until):
    if params["kind"] and manifest.kind != params["kind"]:
        return False
    if params["status"] and manifest.status != params["status"]:
        return False
    finished = parse_iso(manifest.finished_at)
    if (since is not None and finished < since) or (until is not None and finished > until):
        return False
    if params["verified"] is not None:
        passed = manifest.verification_result == "ok"
        if passed != params["verified"]:
            return False
    return True


def main():
    module = AnsibleModule(
        argument_spec=dict(
            storage=STORAGE_SPEC,
            job=dict(type="str"),
            kind=dict(type="str"),
            status=dict(type="str"),
            since=dict(type="str"),
            until=dict(type="str"),
            backup=dict(type="str"),
            verified=dict(type="bool"),
        ),
        required_by=dict(backup="job"),
        supports_check_mode=True,
    )
    params = module.params
    with engine_errors(module, backups=[], count=0, jobs=[], junk=[], orphans=[], incomplete_uploads=[],
                       incomplete_uploads_summary=upload_summary([])):
        since, until = _moment(params["since"], "since"), _moment(params["until"], "until")
        found = operations.inventory(open_location(module), params["job"], params["backup"])
        jobs = sorted(set(m["job"] for m in found["backups"]))
        backups = [m for m in found.get("selected", found["backups"]) if _matches(m, params, since, until)]
    module.exit_json(changed=False, backups=backups, count=len(backups), jobs=jobs, junk=found["junk"],
                     orphans=found["orphans"], incomplete_uploads=found["incomplete_uploads"],
                     incomplete_uploads_summary=found["incomplete_uploads_summary"])


if __name__ == "__main__":
    main()
