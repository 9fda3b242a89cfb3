# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type


# keep_hourly ... keep_yearly differ only in their period, so their docs are written once.
_CALENDAR_RULES = (("hourly", "hours"), ("daily", "days"), ("weekly", "ISO weeks"), ("monthly", "months"),
                   ("yearly", "years"))


def _calendar_rule_options():
    return "".join(
        "  keep_%s:\n"
        "    description: Keep the newest backup of each of the last N %s that have backups. C(-1) for unlimited.\n"
        "    type: int\n"
        "    default: 0\n" % rule for rule in _CALENDAR_RULES)


class ModuleDocFragment:
    """The retention policy's options (engine/retention.py ``Policy``), shared by the
    ``retention`` lookup, which decides, and ``backup_prune``, which applies the decision."""

    DOCUMENTATION = r"""
options:
  keep_last:
    description:
      - Keep the newest N backups. C(-1) keeps all.
      - With O(semantics=borg) backups taken within the same second count once (borg's C(--keep-last) is its
        C(--keep-secondly)).
    type: int
    default: 0
""" + _calendar_rule_options() + r"""  keep_within:
    description:
      - Keep every backup taken within this duration before the newest (successful) backup, for example C(36h),
        C(7d), C(2w), C(6m), C(1y) or C(1y6m).
      - With O(semantics=borg) a month is 31 days and a year 365 days; with O(semantics=restic) months and years
        are calendar months and years of the newest backup's local date.
    type: str
  semantics:
    description: Which tool's meaning of the policy to follow.
    type: str
    choices: [borg, restic]
    default: borg
  timezone:
    description: IANA time zone whose local time defines hours, days, ISO weeks, months and years.
    type: str
    default: UTC
"""
