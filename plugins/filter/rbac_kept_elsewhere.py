# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: rbac_kept_elsewhere
author: biometrics.backup contributors (@biometrics)
version_added: "0.1.0"
short_description: The Roles and RoleBindings read in an old namespace that a run keeps, and why
description:
  - The last step of moving a job's own Role and RoleBinding out of a namespace its values no longer
    name (see C(biometrics.backup.rbac_recorded_elsewhere) and C(biometrics.backup.objects_left_behind)).
  - Given the registered M(kubernetes.core.k8s_info) loop results and what
    C(biometrics.backup.objects_left_behind) returned for them, lists what stays in the old namespace, each
    with a line for the run's output. A read the API refused (for example 403) proves nothing, so its object
    is kept and the API's message is named. An object read but not returned to be removed is not shown to be
    the job's alone (its labels, C(roleRef) or subjects say otherwise); deleting it is left to a person.
  - A kept object is named once, because the apply that follows rewrites the job's record without it.
positional: _input, left_behind
options:
  _input:
    description: The C(results) of the registered M(kubernetes.core.k8s_info) loop over C(biometrics.backup.rbac_recorded_elsewhere).
    type: list
    elements: dict
    required: true
  left_behind:
    description: What C(biometrics.backup.objects_left_behind) returned, given those results as C(rbac_elsewhere).
    type: list
    elements: dict
    required: true
"""

EXAMPLES = r"""
- name: Say which Roles and RoleBindings stay in the old namespace
  ansible.builtin.debug:
    msg: "{{ item.message }}"
  loop: "{{ elsewhere.results | biometrics.backup.rbac_kept_elsewhere(left_behind) }}"
  loop_control:
    label: "{{ item.kind }}/{{ item.name }} in {{ item.namespace }}"
"""

RETURN = r"""
_value:
  description:
    - One mapping per kept object, with its C(kind), C(namespace) and C(name), C(job) (the CronJob that
      recorded it) and C(message) (why it is kept, for the run's output).
  type: list
  elements: dict
  sample:
    - kind: Role
      namespace: velero-old
      name: pvc-backup
      job: pvc-backup
      message: >-
        Kept: Role/pvc-backup in namespace velero-old is not shown to be the job's alone (labels, roleRef or
        subjects); the job no longer names that namespace, so delete it by hand once nobody needs it
"""

from ansible_collections.biometrics.backup.plugins.filter.objects_left_behind import rbac_kept_elsewhere


class FilterModule(object):
    def filters(self):
        return {"rbac_kept_elsewhere": rbac_kept_elsewhere}
