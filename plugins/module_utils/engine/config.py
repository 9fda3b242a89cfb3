"""Option handling shared by the modules and the runner.

Secrets reach the engine three ways: as a value (Ansible modules, where the option is
``no_log``), as ``<name>_file`` (a mounted Secret) or as ``<name>_env`` (an env var filled
by ``secretKeyRef``). ``resolve_secret_refs`` turns the last two into the first, so the
rest of the engine only ever sees values and never has to know where they came from.
"""

import os

from .errors import ConfigError

SECRET_FIELDS = frozenset((
    "password", "access_key", "secret_key", "session_token", "passphrase", "token",
    "identity", "basic_auth_password", "restic_password",
))


def read_text_file(path, what):
    """The UTF-8 text of ``path``; ConfigError naming ``what`` when it cannot be read or is not text.

    Key, password and recipients files are often written by hand or copied from elsewhere: a
    binary file (a DER key, a file saved as UTF-16) gets a message, not a UnicodeDecodeError.
    """
    if not isinstance(path, str) or not path:
        # An int would open that file descriptor; a list would crash.
        raise ConfigError("%s must be the path of a file, got %r" % (what, path))
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError("cannot read %s from %s: %s" % (what, path, exc.strerror or exc)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: %s is not UTF-8 text (byte 0x%02x at offset %d); it must hold the value as text"
                          % (what, path, data[exc.start], exc.start)) from None


def read_secret_file(path, what):
    return read_text_file(path, what).rstrip("\r\n")


def resolve_secret_refs(options, where="options"):
    """Return a copy of ``options`` where ``x_file`` / ``x_env`` of secret fields became ``x``."""
    if not isinstance(options, dict):
        return options
    resolved = {}
    for key, value in options.items():
        if isinstance(value, dict):
            resolved[key] = resolve_secret_refs(value, "%s.%s" % (where, key))
        else:
            resolved[key] = value
    for key, value in list(resolved.items()):
        for suffix in ("_file", "_env"):
            base = key[:-len(suffix)] if isinstance(key, str) and key.endswith(suffix) else None
            if base not in SECRET_FIELDS or value in (None, ""):
                continue
            if resolved.get(base) not in (None, ""):
                raise ConfigError("%s: give either %s or %s, not both" % (where, base, key))
            if suffix == "_file":
                resolved[base] = read_secret_file(value, "%s.%s" % (where, base))
            else:
                if value not in os.environ:
                    raise ConfigError("%s.%s names environment variable %s, which is not set"
                                      % (where, key, value))
                resolved[base] = os.environ[value]
            del resolved[key]
    return resolved


def redact(options):
    """A copy safe to print: every secret field replaced by a marker."""
    if isinstance(options, dict):
        return {key: ("********" if key in SECRET_FIELDS and value not in (None, "") else redact(value))
                for key, value in options.items()}
    if isinstance(options, list):
        return [redact(item) for item in options]
    return options
