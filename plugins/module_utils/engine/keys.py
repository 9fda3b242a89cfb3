"""The age identities that open a backup: from an identity, or a passphrase and the backup's
key envelope (``key.age``, whose SHA-256 is checked against the manifest before it is opened).

A key that cannot open a backup raises :class:`KeyMismatchError`, so that callers tell a
wrong key from a damaged backup.
"""

import hashlib

from . import codecs
from . import manifest as mf
from . import resticstore
from .catalog import Catalog
from .errors import DecryptionError, IntegrityError, NotFoundError
from .storage.base import MissingLocationError


class KeyMismatchError(DecryptionError):
    """The given key cannot open the backup (wrong identity or passphrase): the backup itself may be fine."""


def _read_checked(storage, manifest, entry):
    """A small object (the key envelope) read whole and checked against its manifest entry."""
    key = mf.object_key(manifest.job, manifest.id, entry.name)
    try:
        data = storage.get_bytes(key)
    except NotFoundError:
        raise IntegrityError("%s is listed in the manifest but missing from storage" % key) from None
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise IntegrityError("%s does not match its manifest entry (size or SHA-256): corrupted or swapped" % key)
    return data


def identities(storage, manifest, identity=None, passphrase=None):
    """Identities that decrypt ``manifest``'s payloads (None for unencrypted backups).

    With a passphrase the backup's ``key.age`` envelope is verified, then opened. With an
    identity, its public key must be one of the backup's recipients, so a wrong key is named
    as such instead of surfacing later as an undecryptable payload.
    """
    manifest = mf.Manifest.wrap(manifest)
    encryption = manifest.encryption
    mode = encryption.get("mode", "none")
    if mode == "none" or (mode == "restic" and resticstore.is_restic(manifest)):
        return None  # restic decrypts with the repository password (storage.restic_password)
    if mode != "age":
        raise IntegrityError("backup %s uses unknown encryption mode %r" % (manifest.id, mode))
    key_object = encryption.get("key_object")
    if key_object and passphrase is not None:
        entry = manifest.object_named(key_object)
        if entry is None:
            raise IntegrityError("backup %s names key envelope %s but its manifest does not list it"
                                 % (manifest.id, key_object))
        envelope = _read_checked(storage, manifest, entry)
        try:
            found = codecs.identities_for(encryption, passphrase=passphrase, envelope_bytes=envelope)
        except DecryptionError:
            raise KeyMismatchError("the passphrase does not open the key envelope of backup %s "
                                   "(wrong passphrase?)" % manifest.id) from None
    elif identity:
        found = codecs.identities_for(encryption, identity_text=identity)
    elif passphrase is not None:
        raise KeyMismatchError("backup %s was encrypted to age recipients, not with a passphrase: "
                               "give encryption.identity_file (the matching AGE-SECRET-KEY)" % manifest.id)
    else:
        raise KeyMismatchError("backup %s is encrypted: give encryption.identity_file (or identity) or "
                               "the passphrase" % manifest.id)
    recipients = set(encryption.get("recipients") or [])
    if recipients and not any(str(item.to_public()) in recipients for item in found):
        raise KeyMismatchError(
            "the given age identity is not a recipient of backup %s (it was encrypted to %s): wrong key"
            % (manifest.id, ", ".join(sorted(recipients))))
    return found


def parent_identities(storage, job, identity=None, passphrase=None):
    """Identities an incremental backup needs to read its parent's payloads, or None.

    With an identity text: its keys. With a passphrase: the keys in the envelope of the job's
    latest backup (the parent an incremental builds on), when it has one.
    """
    found = []
    if identity:
        found.extend(codecs.parse_identities(identity))
    if passphrase is not None:
        try:
            latest = Catalog(storage).latest(job)
            found.extend(identities(storage, latest, passphrase=passphrase) or [])
        except (NotFoundError, IntegrityError, MissingLocationError):
            # No parent (a first backup creates its location), or not a passphrase backup:
            # the source explains if it needs one.
            pass
    return found or None


def chain_identities(storage, chain, identity=None, passphrase=None):
    """``{backup id: identities}`` for every backup of a chain (passphrase envelopes differ per backup)."""
    return {item.id: identities(storage, item, identity, passphrase) for item in chain}
