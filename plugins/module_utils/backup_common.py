# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What backup_run, backup_info, backup_verify and backup_restore share beyond adapter.py:
turning their options into engine objects while every secret they read (values, files,
environment variables) is registered with the module so that Ansible masks it in any output.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

from ansible_collections.biometrics.backup.plugins.module_utils.adapter import drop_none
from ansible_collections.biometrics.backup.plugins.module_utils.engine.config import resolve_secret_refs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import (
    backup_encryption_options, read_keys, secret_values)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import (
    build_storage, storage_options)


def resolved(module, name, options=None, resolve=None):
    """Option ``name`` (a dict) with ``*_file``/``*_env`` read (by ``resolve``, default the
    engine's ``resolve_secret_refs``) and every secret, given or read, masked."""
    raw = drop_none(module.params.get(name) if options is None else options) or {}
    module.no_log_values.update(secret_values(raw))
    result = resolve(raw) if resolve is not None else resolve_secret_refs(raw, name)
    module.no_log_values.update(secret_values(result))
    return result


def open_location(module, name="storage"):
    """The location of option ``name`` (``storage``, or backup_copy's ``destination``); its
    secrets are read once, by the engine's ``storage_options``, and masked before anything is
    built from them."""
    return build_storage(resolved(module, name, resolve=storage_options))


def writing_encryption(module):
    """Encryption options for BackupRun (recipients, recipients_file or passphrase)."""
    return backup_encryption_options(resolved(module, "encryption"))


def reading_keys(module):
    """``(identity_text, passphrase)`` from the ``encryption`` option (either may be None)."""
    return read_keys(resolved(module, "encryption"))


def text_of(value):
    """Stable multi-line text of a value, for ``diff`` before/after."""
    return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"
