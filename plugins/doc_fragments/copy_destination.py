# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.biometrics.backup.plugins.doc_fragments.storage import ModuleDocFragment as _Storage

# The destination takes exactly the storage option's fields: its documentation is the
# storage fragment's, under another name and description, so the two cannot drift apart.
_TYPE_LINES = "    type: dict\n    required: true\n"
_STORAGE_FIELDS = _Storage.DOCUMENTATION.split(_TYPE_LINES, 1)[1]


class ModuleDocFragment:
    """backup_copy's ``destination`` option: a second location with the ``storage`` fields."""

    DOCUMENTATION = r"""
options:
  destination:
    description:
      - Where the backups are copied to, with the same fields as O(storage) and credentials of its own
        (another S3 endpoint, bucket or region, or a C(filesystem)/C(nfs) directory such as a mounted PVC).
      - Credentials may be given as values (hidden from output), or as C(access_key_file) and
        C(secret_key_file) (files holding them).
""" + _TYPE_LINES + _STORAGE_FIELDS.replace("O(storage.", "O(destination.")

    # backup_prune's require_copy: the same fields, where the copies are looked for.
    REQUIRE_COPY = r"""
options:
  require_copy:
    description:
      - The offsite copy's location (the O(storage) fields, see M(biometrics.backup.backup_copy)). When given,
        a successful backup this location does not hold with the same objects is never pruned, nor are the
        parents of its incremental chain.
      - Credentials may be given as values (hidden from output), or as C(access_key_file) and
        C(secret_key_file) (files holding them).
""" + "    type: dict\n" + _STORAGE_FIELDS.replace("O(storage.", "O(require_copy.")
