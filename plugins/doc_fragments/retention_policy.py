# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type


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
  keep_hourly:
    description: Keep the newest backup of each of the last N hours that have backups. C(-1) for unlimited.
    type: int
    default: 0
  keep_daily:
    description: Keep the newest backup of each of the last N days that have backups. C(-1) for unlimited.
    type: int
    default: 0
  keep_weekly:
    description: Keep the newest backup of each of the last N ISO weeks that have backups. C(-1) for unlimited.
    type: int
    default: 0
  keep_monthly:
    description: Keep the newest backup of each of the last N months that have backups. C(-1) for unlimited.
    type: int
    default: 0
  keep_yearly:
    description: Keep the newest backup of each of the last N years that have backups. C(-1) for unlimited.
    type: int
    default: 0
  keep_within:
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
