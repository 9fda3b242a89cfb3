# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: rbac_recorded_elsewhere
author: biometrics.backup contributors (@biometrics)
version_added: "0.1.0"
short_description: The Roles and RoleBindings a job recorded in a namespace its values no longer name
description:
  - A job that reaches another namespace's API (the Velero job creates Backups in Velero's namespace)
    has its own Role and RoleBinding there, and its CronJob records them (annotation
    C(backup.biometrics.io/objects)). Once the values move it to another namespace, the old ones would
    keep granting the job's ServiceAccount access to the old namespace.
  - Given the same inputs as C(biometrics.backup.objects_left_behind), returns those recorded
    outside the CronJob's namespace and C(rbac_namespaces) and not rendered again, for the CronJobs
    this run applies. For a Role it also lists the RoleBinding of the same name, recorded or not, since
    whether that binding grants anybody else decides whether the Role may go.
  - They are to be read (M(kubernetes.core.k8s_info)) and the results passed to
    C(biometrics.backup.objects_left_behind) as C(rbac_elsewhere), which returns only those that the
    collection made for that job alone.
positional: _input, manifests, rbac_namespaces
extends_documentation_fragment:
  - biometrics.backup.recorded_objects
options:
  rbac_namespaces:
    description: The namespaces in which the jobs' own Roles and RoleBindings are rendered now, such as Velero's.
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- name: Read the jobs' Roles and RoleBindings recorded in a namespace no longer used
  kubernetes.core.k8s_info:
    api_version: "{{ item.api_version }}"
    kind: "{{ item.kind }}"
    namespace: "{{ item.namespace }}"
    name: "{{ item.name }}"
  loop: "{{ previous.resources | biometrics.backup.rbac_recorded_elsewhere(applied_manifests, ['velero']) }}"
  register: elsewhere
"""

RETURN = r"""
_value:
  description:
    - One mapping per object to read, with its C(api_version), C(kind), C(namespace) and C(name), and
      C(job), the CronJob that recorded it.
  type: list
  elements: dict
  sample:
    - {api_version: rbac.authorization.k8s.io/v1, kind: Role, namespace: velero-old, name: pvc-backup, job: pvc-backup}
"""

from ansible_collections.biometrics.backup.plugins.filter.objects_left_behind import rbac_recorded_elsewhere


class FilterModule(object):
    def filters(self):
        return {"rbac_recorded_elsewhere": rbac_recorded_elsewhere}
