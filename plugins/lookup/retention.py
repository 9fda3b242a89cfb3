# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: retention
author: biometrics.backup contributors (@biometrics)
version_added: "0.1.0"
short_description: Compute which backups a retention policy keeps and which it prunes
description:
  - Evaluates a grandfather-father-son retention policy over a list of backups and returns one
    dictionary with the backups to keep, the backups to prune and, for every kept backup, the
    rules that keep it.
  - O(semantics=borg) reproduces C(borg prune) 1.2 (rules applied one after the other, a period
    whose newest backup is already kept is used up, the oldest backup is kept when a rule cannot
    be filled). O(semantics=restic) reproduces C(restic forget) 0.14 (one backup may satisfy
    several rules at once). See C(docs/retention.md) in the collection for worked examples.
  - The lookup returns a list with one element, so C(lookup()) yields the dictionary itself and
    C(query()) (or O(ignore:wantlist=true)) a list holding that dictionary.
  - The lookup only looks at timestamps. Drop failed or incomplete backups before calling it, or use
    M(biometrics.backup.backup_prune), which does that and adds safety rails.
  - For PostgreSQL base backups (manifests of kind C(postgres_base), or dictionaries with C(wal_start)
    or C(stats.wal_start)) the reasons of the oldest kept one name the first WAL segment kept,
    and C(wal_keep_from) returns it; M(biometrics.backup.backup_prune) prunes the WAL before it.
options:
  _terms:
    description:
      - The backups, usually one list given as the only term; several terms are flattened one level.
      - Each backup is an ISO-8601 timestamp string, or a dictionary with a C(timestamp) key and
        optionally C(id); other keys are returned unchanged and not looked at. Timestamps without a
        UTC offset are taken as UTC.
      - Backups are named in the result's C(reasons) by their C(id), or by their timestamp as written when
        they have no C(id); these names must be unique.
    type: list
    elements: raw
    required: true
extends_documentation_fragment:
  - biometrics.backup.retention_policy
notes:
  - C(-1) means unlimited with both semantics. restic 0.14 itself ignores a rule set to C(-1);
    this lookup uses the meaning later restic releases give it.
  - C(keep_within) is measured from the newest backup with both semantics (borg 1.2 measures it from
    the current time, which keeps nothing once backups stop).
seealso:
  - module: biometrics.backup.backup_prune
"""

EXAMPLES = r"""
- name: Decide what the seed policy keeps (borg meaning, local days in Berlin)
  ansible.builtin.set_fact:
    retention: >-
      {{ lookup('biometrics.backup.retention', backup_timestamps,
                keep_daily=30, keep_weekly=12, keep_monthly=12, keep_yearly=7,
                timezone='Europe/Berlin') }}

- name: Show why each backup stays
  ansible.builtin.debug:
    msg: "{{ retention.reasons }}"

- name: restic's meaning, with dictionaries as input and a time window
  ansible.builtin.debug:
    msg: >-
      {{ lookup('biometrics.backup.retention',
                [{'id': 'b1', 'timestamp': '2025-01-31T23:00:00Z'},
                 {'id': 'b2', 'timestamp': '2025-02-01T01:00:00Z'}],
                keep_daily=7, keep_within='2d', semantics='restic').prune | map(attribute='id') }}

- name: query() returns a list holding the single result dictionary
  ansible.builtin.assert:
    that:
      - query('biometrics.backup.retention', ['2025-01-01T00:00:00Z'], keep_last=1) | length == 1
"""

RETURN = r"""
_raw:
  description:
    - A list with exactly one dictionary (C(lookup()) unwraps it).
  type: list
  elements: dict
  contains:
    keep:
      description: The backups to keep, as given, newest first.
      type: list
      elements: raw
    prune:
      description: The backups to prune, as given, newest first.
      type: list
      elements: raw
    reasons:
      description:
        - 'For each kept backup (by C(id), else timestamp as written) the rules that keep it, such as
          C(daily #3), C(weekly #1) or C(within 7d). With O(semantics=borg), the oldest backup kept because a
          rule ran out says so, for example C(yearly #2 \(oldest, rule not filled\)).'
        - With O(semantics=borg) each backup has exactly one reason; with O(semantics=restic) it may have several.
        - 'PostgreSQL base backups (see the notes in the description): the oldest kept one also gets a reason naming
          the WAL kept, for example C(oldest kept base backup: WAL of job db-wal kept from 000000010000000000000003 on
          \(older WAL is pruned\)).'
      type: dict
    wal_keep_from:
      description:
        - Only when the kept backups include PostgreSQL base backups with a C(wal_start) (or C(start_lsn) and
          C(timeline)) - the first WAL segment the oldest kept one needs; WAL before it can go.
      type: str
"""

from ansible.errors import AnsibleError, AnsibleLookupError
from ansible.plugins.lookup import LookupBase

from ansible_collections.biometrics.backup.plugins.module_utils.engine.pgwal import (
    base_wal_start, wal_job_of, wal_keep_reason)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.retention import (
    SEMANTICS,
    RetentionError,
    evaluate,
)

_POLICY_OPTIONS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly",
                   "keep_yearly", "keep_within", "semantics", "timezone")


def _flatten_one_level(terms):
    items = []
    for term in terms:
        if isinstance(term, (list, tuple)):
            items.extend(term)
        else:
            items.append(term)
    return items


class LookupModule(LookupBase):

    def run(self, terms, variables=None, **kwargs):
        unknown = sorted(set(kwargs) - set(_POLICY_OPTIONS))
        if unknown:
            raise AnsibleLookupError("retention: unknown option%s %s; valid options: %s" % (
                "s" if len(unknown) > 1 else "", ", ".join(unknown), ", ".join(_POLICY_OPTIONS)))
        semantics = kwargs.get("semantics")
        if semantics is not None and semantics not in SEMANTICS:
            raise AnsibleLookupError("retention: semantics %r is unknown; use one of: %s"
                                     % (semantics, ", ".join(SEMANTICS)))
        try:
            self.set_options(var_options=variables, direct=kwargs)
            policy = {name: self.get_option(name) for name in _POLICY_OPTIONS}
        except AnsibleLookupError:
            raise
        except AnsibleError as err:
            raise AnsibleLookupError("retention: invalid option: %s" % err) from err
        items = _flatten_one_level(terms)
        try:
            result = evaluate(items, **policy)
        except RetentionError as err:
            raise AnsibleLookupError("retention: %s" % err) from err
        answer = {
            "keep": [backup.item for backup in result.keep],
            "prune": [backup.item for backup in result.prune],
            "reasons": result.reasons,
        }
        for backup in reversed(result.keep):  # the oldest kept base backup names the WAL kept
            start = base_wal_start(backup.item)
            if start is not None:
                wal_job = wal_job_of(backup.item.get("job") or "<job>", backup.item)
                answer["reasons"][backup.key].append(wal_keep_reason(wal_job, start[2]))
                answer["wal_keep_from"] = start[2]
                break
        return [answer]
