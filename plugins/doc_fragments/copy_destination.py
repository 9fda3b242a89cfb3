# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.biometrics.backup.plugins.doc_fragments.storage import ModuleDocFragment as _Storage


def _storage_fields_for(option):
    """The storage option's suboptions, word for word, with O(storage.x) references naming *option*."""
    text = _Storage.DOCUMENTATION
    return text[text.index("    suboptions:\n"):].replace("O(storage.", "O(%s." % option)


class ModuleDocFragment:
    """backup_copy's ``destination`` and backup_prune's ``require_copy``: a second location
    with exactly the ``storage`` fields, taken from the storage fragment so they cannot drift."""

    DOCUMENTATION = r"""
options:
  destination:
    description:
      - Where the backups are copied to, with the same fields as O(storage) and credentials of its own
        (another S3 endpoint, bucket or region, or a C(filesystem)/C(nfs) directory such as a mounted PVC).
      - Credentials may be given as values (hidden from output), or as C(access_key_file) and
        C(secret_key_file) (files holding them).
    type: dict
    required: true
""" + _storage_fields_for("destination")

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
    type: dict
""" + _storage_fields_for("require_copy")
