# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Helpers shared by the files / incremental / directory_sync / config_git tests.

``snapshot`` describes a directory tree independently of the engine (its own walk, its own
hashing) so that equality between a source tree and a restored one is proven by code that
does not share the engine's bugs.
"""

import hashlib
import os
import stat
import subprocess

from pyrage import x25519


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot(root, owners=True, mtimes=True, dir_mtimes=True, root_entry=False):
    """``{relative path (bytes): description}`` of every entry below ``root``.

    Files: type, mode, SHA-256 (and mtime, owner); symlinks: target (and mtime, owner);
    directories: mode (and mtime, owner); fifos: mode.
    """
    base = os.fsencode(str(root))
    state = {}

    def describe(full):
        info = os.lstat(full)
        mode = stat.S_IMODE(info.st_mode)
        extra = ()
        if owners:
            extra += (info.st_uid, info.st_gid)
        if stat.S_ISLNK(info.st_mode):
            value = ("link", os.readlink(full))
            if mtimes:
                extra += (info.st_mtime_ns,)
        elif stat.S_ISDIR(info.st_mode):
            value = ("dir", oct(mode))
            if dir_mtimes:
                extra += (info.st_mtime_ns,)
        elif stat.S_ISREG(info.st_mode):
            value = ("file", oct(mode), sha256_of(full), info.st_size)
            if mtimes:
                extra += (info.st_mtime_ns,)
        elif stat.S_ISFIFO(info.st_mode):
            value = ("fifo", oct(mode))
        else:
            value = ("other", oct(mode))
        return value + extra

    def visit(rel):
        directory = os.path.join(base, rel) if rel else base
        for name in sorted(os.listdir(directory)):
            child = os.path.join(rel, name) if rel else name
            full = os.path.join(base, child)
            state[child] = describe(full)
            if os.path.isdir(full) and not os.path.islink(full):
                visit(child)

    if root_entry:
        state[b"."] = describe(base)
    visit(b"")
    return state


def regular_file_totals(root):
    """(number of regular files, their total size) below ``root``, counted with os.walk."""
    count = size = 0
    for directory, _dirs, names in os.walk(os.fsencode(str(root))):
        for name in names:
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(info.st_mode):
                count += 1
                size += info.st_size
    return count, size


def write(path, data, mode=None, mtime_ns=None):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    if mode is not None:
        os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def age_key(tmp_path):
    """A fresh X25519 identity: ``(identity_file, recipient, identity_text)``."""
    identity = x25519.Identity.generate()
    key_file = tmp_path / "age-identity.txt"
    key_file.write_text(str(identity) + "\n", encoding="ascii")
    os.chmod(key_file, 0o600)
    return str(key_file), str(identity.to_public()), str(identity)


def stored_object(store_root, job, manifest, payload):
    """Filesystem path of one payload object of a backup stored under ``store_root``."""
    for obj in manifest["objects"]:
        if obj.get("payload") == payload:
            return os.path.join(str(store_root), job, manifest["id"], obj["name"])
    raise KeyError(payload)


def decode_cmd(path, identity_file=None):
    """The stock-tool pipeline (shell text) that prints a stored payload's plaintext."""
    steps = []
    if identity_file:
        steps.append("age -d -i %s %s" % (identity_file, path))
    else:
        steps.append("cat %s" % path)
    if path.endswith(".zst") or path.endswith(".zst.age"):
        steps.append("zstd -d -q")
    elif path.endswith(".gz") or path.endswith(".gz.age"):
        steps.append("gzip -d")
    return " | ".join(steps)


def sh(command, cwd=None):
    """Run a shell pipeline with pipefail; return stdout (bytes); raise with stderr on failure."""
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, capture_output=True, check=False)
    if done.returncode != 0:
        raise AssertionError("command failed (%d): %s\n%s" % (
            done.returncode, command, done.stderr.decode("utf-8", "replace")))
    return done.stdout


def flip_byte(path, offset=None):
    """Corrupt one byte of a stored object (in the middle unless told)."""
    size = os.path.getsize(path)
    offset = size // 2 if offset is None else offset
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
