# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment:
    """The inputs of the filters that read what a job's CronJob recorded (annotation
    ``backup.biometrics.io/objects``): ``objects_left_behind`` and ``rbac_recorded_elsewhere``."""

    DOCUMENTATION = r"""
options:
  _input:
    description: The CronJobs as read before the apply (the C(resources) of M(kubernetes.core.k8s_info)).
    type: list
    elements: dict
    required: true
  manifests:
    description: What this run applies or removes, as mappings or as YAML text holding one or more documents.
    type: list
    elements: raw
    required: true
"""
