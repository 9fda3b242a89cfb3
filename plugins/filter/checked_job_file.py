# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: checked_job_file
author: biometrics.backup contributors (@biometrics)
version_added: "0.1.0"
short_description: Check a runner job file with the engine's own validation
description:
  - Validates a runner job file (the mapping the roles put into each CronJob's ConfigMap) exactly
    as the runner in the container will when the CronJob fires - every section and field typed,
    bounded and checked for unknown names - and returns it unchanged.
  - The roles call it while rendering, so a value the runner would refuse fails the deploy before
    anything is written or applied, instead of failing the first scheduled run.
  - No secret is read; the job file holds only C(*_file) and C(*_env) references.
positional: _input, enabled
options:
  _input:
    description: The job file as a mapping.
    type: dict
    required: true
  enabled:
    description: V(false) returns the input without checking it (the roles pass V(false) when they remove a job).
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Fail early on a job file the runner would refuse
  ansible.builtin.set_fact:
    job_file: "{{ {'job': 'nightly-db', 'kind': 'postgres', 'source': {'host': 'db', 'database': 'app'},
                   'storage': {'backend': 'filesystem', 'path': '/backups'}} | biometrics.backup.checked_job_file }}"
"""

RETURN = r"""
_value:
  description: The job file, unchanged.
  type: dict
"""

from ansible.errors import AnsibleFilterError
from ansible.module_utils.common.text.converters import to_native

from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import BackupError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import JobConfig


def checked_job_file(job_file, enabled=True):
    if not enabled:
        return job_file
    if not isinstance(job_file, dict):
        raise AnsibleFilterError("checked_job_file expects the job file as a mapping, got %s" % type(job_file).__name__)
    name = job_file.get("job") if isinstance(job_file.get("job"), str) else "(no name)"
    try:
        JobConfig.from_mapping(job_file, where="job file of %s" % name)
    except BackupError as exc:
        raise AnsibleFilterError(to_native(exc)) from None
    return job_file


class FilterModule(object):
    def filters(self):
        return {"checked_job_file": checked_job_file}
