# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: cron_schedule_error
author: biometrics.backup contributors (@biometrics)
version_added: "0.1.0"
short_description: Why Kubernetes would refuse a CronJob schedule (empty when it is valid)
description:
  - Checks a schedule with the engine's check (the same one the runner applies to its job file)
    and returns the reason Kubernetes would refuse it as a CronJob's C(spec.schedule), or an
    empty string when it is valid.
  - Valid are five cron fields (minute, hour, day of month, month, day of week; names such as
    C(jan) and C(mon) allowed) and the macros C(@yearly), C(@annually), C(@monthly), C(@weekly),
    C(@daily), C(@midnight) and C(@hourly). Refused are six fields (seconds), C(@reboot),
    C(@every), C(TZ=)/C(CRON_TZ=) prefixes (the time zone is the CronJob's C(timeZone)) and
    Quartz extensions (C(L), C(W), C(#)).
positional: _input
options:
  _input:
    description: The schedule.
    type: raw
    required: true
"""

EXAMPLES = r"""
- name: Refuse a schedule Kubernetes would refuse
  ansible.builtin.assert:
    that: my_schedule | biometrics.backup.cron_schedule_error == ''
    fail_msg: "my_schedule: {{ my_schedule | biometrics.backup.cron_schedule_error }}"
"""

RETURN = r"""
_value:
  description: The reason the schedule is refused, or an empty string when Kubernetes accepts it.
  type: str
"""

from ansible_collections.biometrics.backup.plugins.module_utils.engine.cron import schedule_error


def cron_schedule_error(schedule):
    return schedule_error(schedule) or ""


class FilterModule(object):
    def filters(self):
        return {"cron_schedule_error": cron_schedule_error}
