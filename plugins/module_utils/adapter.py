# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared plumbing of the collection's modules: option specs and error translation.

Modules stay thin: they build their argument_spec from the pieces here, call the engine
inside ``engine_errors`` and shape the result. The engine never imports Ansible.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import traceback

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    BackupError, MissingDependencyError)

# The shared ``storage`` option (architecture §3). Secrets are no_log; ``*_file``/``*_env``
# indirections are resolved by the engine's storage.location.storage_options.
STORAGE_OPTIONS = dict(
    backend=dict(type="str", default="filesystem", choices=["filesystem", "s3", "nfs"]),
    path=dict(type="path"),
    bucket=dict(type="str"),
    prefix=dict(type="str", default=""),
    endpoint_url=dict(type="str", aliases=["endpoint"]),
    region=dict(type="str"),
    access_key=dict(type="str", no_log=True),
    secret_key=dict(type="str", no_log=True),
    access_key_file=dict(type="path"),
    secret_key_file=dict(type="path"),
    session_token=dict(type="str", no_log=True),
    path_style=dict(type="bool"),
    verify_tls=dict(type="bool", default=True),
    server_side_encryption=dict(type="str", choices=["AES256", "aws:kms"]),
    sse_kms_key_id=dict(type="str"),
    part_size=dict(type="int"),
    max_attempts=dict(type="int"),
    format=dict(type="str", default="archive", choices=["archive", "restic"]),
    restic_password=dict(type="str", no_log=True),
    restic_password_file=dict(type="path"),
    restic_read_data_subset=dict(type="str"),
)

STORAGE_SPEC = dict(type="dict", required=True, options=STORAGE_OPTIONS)

# Encryption for writing (recipients or passphrase) and reading (identity or passphrase).
ENCRYPTION_OPTIONS = dict(
    enabled=dict(type="bool"),
    recipients=dict(type="list", elements="str"),
    recipients_file=dict(type="path"),
    passphrase=dict(type="str", no_log=True),
    passphrase_file=dict(type="path"),
    identity=dict(type="str", no_log=True),
    identity_file=dict(type="path"),
)

ENCRYPTION_SPEC = dict(type="dict", options=ENCRYPTION_OPTIONS)

# backup_copy's reencrypt: the destination's recipients and the source's key, given the same way.
REENCRYPT_SPEC = dict(type="dict", options={name: spec for name, spec in ENCRYPTION_OPTIONS.items() if name != "enabled"})


def drop_none(options):
    """Ansible fills unset sub-options with None; the engine wants them absent."""
    if not isinstance(options, dict):
        return options
    return dict((key, drop_none(value)) for key, value in options.items() if value is not None)


class engine_errors:  # pylint: disable=invalid-name  # used as `with engine_errors(module):`
    """Turn engine exceptions into ``fail_json`` with the engine's message (never a traceback dump)."""

    def __init__(self, module, **extra):
        self.module = module
        self.extra = extra

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        if issubclass(exc_type, MissingDependencyError):
            self.module.fail_json(msg=missing_required_lib(exc.library, reason=exc.purpose),
                                  exception=traceback.format_exc(), **self.extra)
        if issubclass(exc_type, BackupError):
            self.module.fail_json(msg=str(exc), error=exc_type.__name__, **self.extra)
        return False
