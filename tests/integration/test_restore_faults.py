# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fault injection at orchestration level: every damaged backup is refused before the target is touched.

One pristine storage location holds real backups (unencrypted, age recipients, age
passphrase, an incremental chain, and a backup of another job encrypted to another key).
Each case copies it, injects one fault — byte flips, truncations, appended bytes, objects
swapped between backups or taken from the other job, deleted objects, manifest edits, stray
objects, wrong keys — and then asks for a restore into a directory that holds data.

Every case runs on both restore paths. Two-pass (``DirTarget``, which declares nothing):
the restore must raise IntegrityError (DecryptionError for keys) with the target's
``restore`` never called and the directory byte-for-byte as it was; ``verify`` of the same
backup must not report it good either. One-pass (``StagingDirTarget``, which declares every
payload and so restores while the streams verify): the same error class as the two-pass
path, the live directory byte-for-byte as it was, no staging directory left, and no swap;
a flipped payload byte must reach the target (the fault is found on the fly, not before).

A last group edits only the manifest's ``stats``: the bytes are intact, so verification
passes, and the target's own checks must refuse the restored data while the live
directory stays unchanged (restore next to it, then swap), on both paths.
"""

import json
import os
import random
import shutil

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine import verify as vf
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import IntegrityError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

from restore_helpers import BlobSource, DirTarget, StagingDirTarget, tree_state

JOB = "blobs"
OTHER_JOB = "elsewhere"
PASSPHRASE = "a long and correct passphrase"
KEY = x25519.Identity.generate()
OTHER_KEY = x25519.Identity.generate()
RNG = random.Random(20240115)
# Payload sizes: one spans several zstd/age chunks, one is tiny.
PAYLOADS = {"big.bin": RNG.randbytes(200_000) + b"text " * 20_000, "small.txt": b"small payload\n"}


def _take(store, job, payloads, encryption=None, compression=None, incremental=False):
    source = BlobSource({"payloads": payloads, "incremental": incremental})
    storage = open_storage({"backend": "filesystem", "path": store})
    return BackupRun(job, source, storage, compression=compression, encryption=encryption).run()


def _next_second():
    import time
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The untouched location and the manifests in it, by role."""
    store = str(tmp_path_factory.mktemp("pristine") / "store")
    rcpt = {"recipients": [str(KEY.to_public())]}
    made = {}
    made["plain"] = _take(store, JOB, PAYLOADS, compression={"algorithm": "zstd"})
    _next_second()
    made["gzip"] = _take(store, JOB, PAYLOADS, compression={"algorithm": "gzip", "level": 1})
    _next_second()
    made["rcpt"] = _take(store, JOB, PAYLOADS, encryption=rcpt)
    _next_second()
    made["pass"] = _take(store, JOB, PAYLOADS, encryption={"passphrase": PASSPHRASE})
    _next_second()
    made["pass2"] = _take(store, JOB, {"big.bin": b"other" * 999, "small.txt": b"x"}, encryption={"passphrase": PASSPHRASE})
    _next_second()
    made["full"] = _take(store, JOB, PAYLOADS, encryption=rcpt)
    _next_second()
    changed = dict(PAYLOADS, **{"small.txt": b"changed since the full\n"})
    made["incr"] = _take(store, JOB, changed, encryption=rcpt, incremental=True)
    assert made["incr"]["parent"] == made["full"]["id"]
    made["other"] = _take(store, OTHER_JOB, PAYLOADS, encryption={"recipients": [str(OTHER_KEY.to_public())]})
    return store, made


KEYS = {
    "plain": {}, "gzip": {}, "rcpt": {"identity": str(KEY)}, "pass": {"passphrase": PASSPHRASE},
    "pass2": {"passphrase": PASSPHRASE}, "full": {"identity": str(KEY)}, "incr": {"identity": str(KEY)},
}


# -- fault builders: each returns (case id, role restored, mutate(store, made)) ----------

def _path(store, manifest, name):
    return os.path.join(store, manifest["job"], manifest["id"], name)


def _objects(manifest):
    return [obj["name"] for obj in manifest["objects"]]


def _flip(offset_of):
    def mutate(store, made, role, name):
        path = _path(store, made[role], name)
        size = os.path.getsize(path)
        offset = offset_of(size) % size
        with open(path, "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)[0]
            handle.seek(offset)
            handle.write(bytes([byte ^ 0x5A]))
    return mutate


def _truncate(length_of):
    def mutate(store, made, role, name):
        path = _path(store, made[role], name)
        with open(path, "r+b") as handle:
            handle.truncate(max(0, length_of(os.path.getsize(path))))
    return mutate


def _append(tail_of):
    def mutate(store, made, role, name):
        path = _path(store, made[role], name)
        with open(path, "rb") as handle:
            content = handle.read()
        with open(path, "ab") as handle:
            handle.write(tail_of(content))
    return mutate


def _delete(store, made, role, name):
    os.unlink(_path(store, made[role], name))


FLIP_OFFSETS = {
    "first": lambda size: 0, "second": lambda size: 1, "tenth": lambda size: 9,
    "quarter": lambda size: size // 4, "middle": lambda size: size // 2,
    "three-quarters": lambda size: 3 * size // 4, "second-last": lambda size: size - 2,
    "last": lambda size: size - 1,
}
FLIP_OFFSETS.update({"random-%d" % i: (lambda size, seed=i: random.Random(seed).randrange(size)) for i in range(6)})
TRUNCATIONS = {
    "empty": lambda size: 0, "one-byte": lambda size: 1, "half": lambda size: size // 2,
    "minus-one": lambda size: size - 1, "minus-sixteen": lambda size: size - 16,
}
APPENDS = {
    "one-byte": lambda content: b"\0", "garbage-kib": lambda content: bytes(RNG.randbytes(1024)),
    "itself": lambda content: content,
}


def _objects_of(role):
    """Objects each role's backup holds: passphrase backups also store the key envelope."""
    return ("big.bin", "small.txt", "key.age") if role.startswith("pass") else ("big.bin", "small.txt")


def _byte_cases():
    cases = []
    # passphrase backups pay an scrypt per restore: fewer cases, still every object
    offsets_by_role = {"plain": list(FLIP_OFFSETS), "gzip": list(FLIP_OFFSETS), "rcpt": list(FLIP_OFFSETS),
                       "full": list(FLIP_OFFSETS)[:8], "incr": list(FLIP_OFFSETS)[:8],
                       "pass": ["middle"]}
    for role, offsets in offsets_by_role.items():
        for obj in _objects_of(role):
            for offset in offsets:
                cases.append(("flip-%s-%s-%s" % (role, obj, offset), role, ("flip", offset, obj)))
    truncs_by_role = {"plain": TRUNCATIONS, "gzip": TRUNCATIONS, "rcpt": TRUNCATIONS, "incr": TRUNCATIONS,
                      "full": TRUNCATIONS, "pass": ["half"]}
    for role, truncs in truncs_by_role.items():
        for obj in _objects_of(role):
            for trunc in truncs:
                cases.append(("truncate-%s-%s-%s" % (role, obj, trunc), role, ("truncate", trunc, obj)))
    for role in ("plain", "gzip", "rcpt", "incr"):
        for obj in ("big.bin", "small.txt"):
            for tail in APPENDS:
                cases.append(("append-%s-%s-%s" % (role, obj, tail), role, ("append", tail, obj)))
    for role in ("plain", "gzip", "rcpt", "pass", "full", "incr"):
        for obj in _objects_of(role):
            cases.append(("delete-%s-%s" % (role, obj), role, ("delete", None, obj)))
    return cases


def _resolve_object(manifest, short):
    """'big.bin' -> 'big.bin.zst.age' etc.; None when the backup has no such object."""
    for obj in manifest["objects"]:
        if obj["name"] == short or obj.get("payload") == short:
            return obj["name"]
    return None


def apply_byte_fault(store, made, role, spec):
    action, which, short = spec
    if role == "full":
        # the chain's full is damaged, the incremental built on it is restored
        target_role = "full"
    else:
        target_role = role
    name = _resolve_object(made[target_role], short)
    if name is None:
        return False
    if action == "flip":
        _flip(FLIP_OFFSETS[which])(store, made, target_role, name)
    elif action == "truncate":
        _truncate(TRUNCATIONS[which])(store, made, target_role, name)
    elif action == "append":
        _append(APPENDS[which])(store, made, target_role, name)
    else:
        _delete(store, made, target_role, name)
    return True


# -- swaps and foreign objects -------------------------------------------------------------

def _copy_object(store, made, src_role, dst_role, short):
    src = _path(store, made[src_role], _resolve_object(made[src_role], short))
    dst = _path(store, made[dst_role], _resolve_object(made[dst_role], short))
    shutil.copyfile(src, dst)


def _swap_objects(store, made, role_a, role_b, short):
    a = _path(store, made[role_a], _resolve_object(made[role_a], short))
    b = _path(store, made[role_b], _resolve_object(made[role_b], short))
    tmp = a + ".swap"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def _swap_payloads_within(store, made, role):
    names = [n for n in _objects(made[role]) if n != "key.age"]
    a, b = (_path(store, made[role], n) for n in names[:2])
    tmp = a + ".swap"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def _foreign_dir(store, made):
    """The other job's backup directory copied under this job (same id)."""
    shutil.copytree(os.path.join(store, OTHER_JOB, made["other"]["id"]),
                    os.path.join(store, JOB, made["other"]["id"]))


def _foreign_manifest_over(role):
    def mutate(store, made):
        shutil.copyfile(_path(store, made["other"], "manifest.json"), _path(store, made[role], "manifest.json"))
    return mutate


def _stray(role, name, data=b"stray"):
    def mutate(store, made):
        with open(_path(store, made[role], name), "wb") as handle:
            handle.write(data)
    return mutate


def _other_objects_over(role, short):
    def mutate(store, made):
        src = _path(store, made["other"], _resolve_object(made["other"], short))
        shutil.copyfile(src, _path(store, made[role], _resolve_object(made[role], short)))
    return mutate


SWAP_CASES = [
    ("swap-rcpt-full-big", "rcpt", lambda s, m: _swap_objects(s, m, "rcpt", "full", "big.bin")),
    ("swap-rcpt-full-small", "rcpt", lambda s, m: _swap_objects(s, m, "rcpt", "full", "small.txt")),
    ("swap-full-incr-small", "incr", lambda s, m: _swap_objects(s, m, "full", "incr", "small.txt")),
    ("swap-full-incr-big", "incr", lambda s, m: _swap_objects(s, m, "full", "incr", "big.bin")),
    ("copy-incr-small-over-full", "incr", lambda s, m: _copy_object(s, m, "incr", "full", "small.txt")),
    ("copy-full-small-over-incr", "incr", lambda s, m: _copy_object(s, m, "full", "incr", "small.txt")),
    ("swap-pass-envelopes", "pass", lambda s, m: _swap_objects(s, m, "pass", "pass2", "key.age")),
    ("copy-pass2-envelope", "pass", lambda s, m: _copy_object(s, m, "pass2", "pass", "key.age")),
    ("swap-pass-payloads", "pass", lambda s, m: _swap_objects(s, m, "pass", "pass2", "small.txt")),
    ("swap-within-plain", "plain", lambda s, m: _swap_payloads_within(s, m, "plain")),
    ("swap-within-rcpt", "rcpt", lambda s, m: _swap_payloads_within(s, m, "rcpt")),
    ("swap-within-gzip", "gzip", lambda s, m: _swap_payloads_within(s, m, "gzip")),
    ("other-job-big-over-rcpt", "rcpt", _other_objects_over("rcpt", "big.bin")),
    ("other-job-small-over-rcpt", "rcpt", _other_objects_over("rcpt", "small.txt")),
    ("other-job-big-over-incr", "incr", _other_objects_over("incr", "big.bin")),
    ("other-job-small-over-full", "incr", _other_objects_over("full", "small.txt")),
    ("foreign-manifest-over-rcpt", "rcpt", _foreign_manifest_over("rcpt")),
    ("foreign-manifest-over-plain", "plain", _foreign_manifest_over("plain")),
    ("stray-object-plain", "plain", _stray("plain", "extra.bin")),
    ("stray-object-rcpt", "rcpt", _stray("rcpt", "big.bin.zst")),
    ("stray-object-in-full", "incr", _stray("full", "evil.sh", b"#!/bin/sh\n")),
    ("stray-copy-of-payload", "gzip", _stray("gzip", "big.bin.gz.bak", b"\x1f\x8b")),
]


# -- manifest edits ------------------------------------------------------------------------

def _edit(role, change):
    def mutate(store, made):
        path = _path(store, made[role], "manifest.json")
        with open(path, "rb") as handle:
            manifest = json.load(handle)
        change(manifest, made)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle)
    return mutate


def _raw_edit(role, change):
    def mutate(store, made):
        path = _path(store, made[role], "manifest.json")
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(change(data))
    return mutate


def _payload_obj(manifest, short):
    return next(obj for obj in manifest["objects"] if obj.get("payload") == short)


def _set(short, field, value):
    def change(manifest, made):
        _payload_obj(manifest, short)[field] = value(_payload_obj(manifest, short)) if callable(value) else value
    return change


def _drop_object(short):
    def change(manifest, made):
        manifest["objects"] = [o for o in manifest["objects"] if o.get("payload") != short and o["name"] != short]
    return change


def _swap_payload_fields(manifest, made):
    a, b = [o for o in manifest["objects"] if o.get("payload")][:2]
    a["payload"], b["payload"] = b["payload"], a["payload"]


def _swap_object_entries_sha(manifest, made):
    a, b = [o for o in manifest["objects"] if o.get("payload")][:2]
    a["sha256"], b["sha256"] = b["sha256"], a["sha256"]


def _flip_hex(value):
    return ("0" if value["sha256"][0] != "0" else "1") + value["sha256"][1:]


def _set_top(field, value):
    def change(manifest, made):
        manifest[field] = value(made) if callable(value) else value
    return change


def _set_encryption(field, value):
    def change(manifest, made):
        manifest["encryption"][field] = value
    return change


MANIFEST_EDITS = []
for _role in ("plain", "gzip", "rcpt", "incr"):
    MANIFEST_EDITS += [
        ("manifest-%s-sha-big" % _role, _role, _edit(_role, _set("big.bin", "sha256", _flip_hex))),
        ("manifest-%s-sha-small" % _role, _role, _edit(_role, _set("small.txt", "sha256", _flip_hex))),
        ("manifest-%s-size-big-minus" % _role, _role, _edit(_role, _set("big.bin", "size", lambda o: o["size"] - 1))),
        ("manifest-%s-size-small-plus" % _role, _role, _edit(_role, _set("small.txt", "size", lambda o: o["size"] + 1))),
        ("manifest-%s-name-missing" % _role, _role, _edit(_role, _set("big.bin", "name", lambda o: o["name"] + ".x"))),
        ("manifest-%s-payload-fields-swapped" % _role, _role, _edit(_role, _swap_payload_fields)),
        ("manifest-%s-sha-entries-swapped" % _role, _role, _edit(_role, _swap_object_entries_sha)),
        ("manifest-%s-drop-small" % _role, _role, _edit(_role, _drop_object("small.txt"))),
        ("manifest-%s-compression-none" % _role, _role, _edit(_role, _set_top("compression", {"algorithm": "none", "level": 0}))),
        ("manifest-%s-compression-bogus" % _role, _role, _edit(_role, _set_top("compression", {"algorithm": "lz4", "level": 1}))),
        ("manifest-%s-id-changed" % _role, _role, _edit(_role, _set_top("id", "20000101T000000Z-000000"))),
        ("manifest-%s-job-changed" % _role, _role, _edit(_role, _set_top("job", OTHER_JOB))),
        ("manifest-%s-schema" % _role, _role, _edit(_role, _set_top("schema", 99))),
        ("manifest-%s-objects-empty" % _role, _role, _edit(_role, _set_top("objects", []))),
        ("manifest-%s-truncated-json" % _role, _role, _raw_edit(_role, lambda data: data[:len(data) // 2])),
        ("manifest-%s-not-json" % _role, _role, _raw_edit(_role, lambda data: b"\x00" + data)),
        ("manifest-%s-finished-garbage" % _role, _role, _edit(_role, _set_top("finished_at", "yesterday"))),
    ]
for _role in ("plain", "gzip"):
    MANIFEST_EDITS += [
        ("manifest-%s-claims-zstd-gzip" % _role, _role,
         _edit(_role, _set_top("compression", {"algorithm": "gzip" if _role == "plain" else "zstd", "level": 3}))),
        ("manifest-%s-claims-encrypted" % _role, _role,
         _edit(_role, _set_top("encryption", {"mode": "age", "recipients": [str(KEY.to_public())]}))),
    ]
for _role in ("rcpt", "incr"):
    MANIFEST_EDITS += [
        ("manifest-%s-claims-unencrypted" % _role, _role, _edit(_role, _set_top("encryption", {"mode": "none"}))),
        ("manifest-%s-recipients-replaced" % _role, _role,
         _edit(_role, _set_encryption("recipients", [str(OTHER_KEY.to_public())]))),
        ("manifest-%s-mode-unknown" % _role, _role, _edit(_role, _set_encryption("mode", "gpg"))),
    ]


def _same_size_edit(role, change):
    """Edit keeping manifest.json's exact size: the catalog index would serve its cached copy."""
    def mutate(store, made):
        path = _path(store, made[role], "manifest.json")
        with open(path, "rb") as handle:
            data = handle.read()
        edited = change(data, made[role])
        assert len(edited) == len(data) and edited != data
        with open(path, "wb") as handle:
            handle.write(edited)
    return mutate


def _hex_digit_edit(data, manifest):
    digest = _payload_obj(manifest, "big.bin")["sha256"]
    return data.replace(digest.encode(), (("1" if digest[0] == "0" else "0") + digest[1:]).encode())


def _stats_digit_edit(data, manifest):
    old = b'"bytes": %d' % manifest["stats"]["payloads"]["small.txt"]["bytes"]
    new = b'"bytes": %d' % ((manifest["stats"]["payloads"]["small.txt"]["bytes"] + 1) % 10 + 10)
    assert len(old) == len(new)
    return data.replace(old, new)


for _role in ("plain", "gzip", "rcpt", "incr", "pass"):
    MANIFEST_EDITS += [
        ("manifest-%s-same-size-sha-edit" % _role, _role, _same_size_edit(_role, _hex_digit_edit)),
        ("manifest-%s-same-size-stats-edit" % _role, _role, _same_size_edit(_role, _stats_digit_edit)),
    ]
MANIFEST_EDITS += [
    ("manifest-incr-parent-missing", "incr", _edit("incr", _set_top("parent", "20000101T000000Z-abcdef"))),
    ("manifest-incr-parent-self", "incr", _edit("incr", _set_top("parent", lambda made: made["incr"]["id"]))),
    ("manifest-incr-parent-other-job", "incr", _edit("incr", _set_top("parent", lambda made: made["other"]["id"]))),
    ("manifest-full-parent-loop", "incr", _edit("full", _set_top("parent", lambda made: made["incr"]["id"]))),
    ("manifest-incr-parent-newer", "full", _edit("full", _set_top("parent", lambda made: made["incr"]["id"]))),
    ("manifest-full-kind-changed", "incr", _edit("full", _set_top("kind", "files"))),
    ("manifest-pass-envelope-sha", "pass", _edit("pass", lambda m, made: next(
        o for o in m["objects"] if o["name"] == "key.age").update(sha256="0" * 64))),
    ("manifest-pass-envelope-dropped", "pass", _edit("pass", _drop_object("key.age"))),
    ("manifest-pass-key-object-renamed", "pass", _edit("pass", _set_encryption("key_object", "nokey.age"))),
    ("foreign-dir-copied-in", "other-in-job", _foreign_dir),
]


# -- keys ----------------------------------------------------------------------------------

KEY_CASES = [
    ("key-rcpt-stranger-identity", "rcpt", {"identity": str(x25519.Identity.generate())}),
    ("key-rcpt-other-job-identity", "rcpt", {"identity": str(OTHER_KEY)}),
    ("key-rcpt-no-key", "rcpt", {}),
    ("key-rcpt-passphrase-instead", "rcpt", {"passphrase": PASSPHRASE}),
    ("key-incr-stranger", "incr", {"identity": str(OTHER_KEY)}),
    ("key-incr-passphrase-instead", "incr", {"passphrase": PASSPHRASE}),
    ("key-pass-wrong-passphrase", "pass", {"passphrase": PASSPHRASE + "!"}),
    ("key-pass-empty-passphrase", "pass", {"passphrase": ""}),
    ("key-pass-identity-instead", "pass", {"identity": str(KEY)}),
    ("key-pass-no-key", "pass", {}),
    ("key-other-with-our-key", "other", {"identity": str(KEY)}),
]


ALL_CASES = ([(cid, role, ("bytes", spec)) for cid, role, spec in _byte_cases()]
             + [(cid, role, ("mutate", fn)) for cid, role, fn in SWAP_CASES + MANIFEST_EDITS]
             + [(cid, role, ("keys", keys)) for cid, role, keys in KEY_CASES])


PATHS = ("two-pass", "one-pass")
PATH_CASES = [(path, case) for path in PATHS for case in ALL_CASES]


def test_at_least_two_hundred_distinct_faults():
    assert len({case[0] for case in ALL_CASES}) == len(ALL_CASES) >= 200
    for path in PATHS:  # every fault runs on each path
        assert len({case[0] for which, case in PATH_CASES if which == path}) == len(ALL_CASES)


def _workspace(tmp_path, pristine):
    store, made = pristine
    copy = str(tmp_path / "store")
    shutil.copytree(store, copy)
    live = tmp_path / "live"
    live.mkdir()
    (live / "big.bin").write_bytes(b"the data that is in production now")
    (live / "notes").mkdir()
    (live / "notes" / "keep.txt").write_text("do not lose me")
    os.symlink("notes/keep.txt", str(live / "link"))
    return copy, made, str(live)


@pytest.mark.parametrize("path, case", PATH_CASES, ids=["%s-%s" % (path, case[0]) for path, case in PATH_CASES])
def test_fault_is_refused_and_the_live_directory_is_unchanged(tmp_path, pristine, path, case):
    if path == "two-pass":
        _two_pass_refuses_before_the_target_is_touched(tmp_path, pristine, *case)
    else:
        _one_pass_refuses_and_discards_its_staging(tmp_path, pristine, *case)


def _faulty_backup(tmp_path, pristine, role, fault):
    """The workspace with ``fault`` injected: ``(store, live, job, backup id, keys)``."""
    store, made, live = _workspace(tmp_path, pristine)
    how, what = fault
    keys = dict(KEYS.get(role, {}))
    job = JOB
    if how == "bytes":
        assert apply_byte_fault(store, made, role, what), "backup %s has no object %s" % (role, what[2])
        if role == "full":
            role = "incr"  # restore the incremental whose full was damaged
            keys = dict(KEYS["incr"])
    elif how == "mutate":
        what(store, made)
    else:
        keys = what
        if role == "other":
            job = OTHER_JOB
    backup_id = made["other"]["id"] if role in ("other-in-job", "other") else made[role]["id"]
    return store, live, job, backup_id, keys


def _two_pass_refuses_before_the_target_is_touched(tmp_path, pristine, case_id, role, fault):
    store, live, job, backup_id, keys = _faulty_backup(tmp_path, pristine, role, fault)
    storage = open_storage({"backend": "filesystem", "path": store})
    before = tree_state(live)
    target = DirTarget({"path": live})
    with pytest.raises(IntegrityError) as caught:
        rs.restore(storage, job, target, backup=backup_id, **keys)
    message = str(caught.value)
    if os.environ.get("SHOW_FAULT_MESSAGES"):
        print("\nFAULT %s -> %s: %s" % (case_id, type(caught.value).__name__, message))
    assert message and "Traceback" not in message
    assert target.calls == [], "the target was used despite: %s" % message
    assert tree_state(live) == before
    # verify must not call the damaged backup good (recording the verdict is allowed)
    try:
        outcome = vf.verify(storage, job, backup=backup_id, test_restore=True, target_class=DirTarget, **keys)
    except IntegrityError:
        return
    assert not outcome["ok"], outcome
    assert outcome["results"][0]["error"]


def _two_pass_error(storage, job, backup_id, keys, live):
    """The error the two-pass path raises for this backup (the target is never called)."""
    target = DirTarget({"path": live})
    with pytest.raises(IntegrityError) as caught:
        rs.restore(storage, job, target, backup=backup_id, verify_first=True, **keys)
    assert target.calls == []
    return caught.value


def _one_pass_refuses_and_discards_its_staging(tmp_path, pristine, case_id, role, fault):
    store, live, job, backup_id, keys = _faulty_backup(tmp_path, pristine, role, fault)
    storage = open_storage({"backend": "filesystem", "path": store})
    before = tree_state(live)
    expected = _two_pass_error(storage, job, backup_id, keys, live)
    target = StagingDirTarget({"path": live})
    with pytest.raises(IntegrityError) as caught:
        rs.restore(storage, job, target, backup=backup_id, **keys)
    message = str(caught.value)
    if os.environ.get("SHOW_FAULT_MESSAGES"):
        print("\nFAULT one-pass %s -> %s (%s): %s" % (case_id, type(caught.value).__name__, target.calls, message))
    assert type(caught.value) is type(expected), (message, str(expected))
    assert message and "Traceback" not in message
    assert not target.swapped
    assert tree_state(live) == before
    assert not os.path.exists(target.staging_path())
    if fault[0] == "bytes" and fault[1][0] == "flip" and fault[1][2] != "key.age":
        # a changed byte keeps the size: only the stream can find it, inside the target
        assert target.calls == ["preflight", "restore"], message


# Edits of the manifest's stats: the stored bytes are intact, so only the data checks can tell.
STATS_EDITS = [
    ("stats-plain-sha", "plain", lambda m: m["stats"]["payloads"]["big.bin"].update(sha256="0" * 64)),
    ("stats-plain-bytes", "plain", lambda m: m["stats"]["payloads"]["small.txt"].update(bytes=1)),
    ("stats-rcpt-extra-payload", "rcpt", lambda m: m["stats"]["payloads"].update(ghost={"bytes": 0, "sha256": "0" * 64})),
    ("stats-incr-old-content", "incr", lambda m: m["stats"]["payloads"]["small.txt"].update(
        bytes=len(PAYLOADS["small.txt"]))),
    ("stats-gzip-swapped", "gzip", lambda m: m["stats"].update(payloads={
        "big.bin": m["stats"]["payloads"]["small.txt"], "small.txt": m["stats"]["payloads"]["big.bin"]})),
]


@pytest.mark.parametrize("target_class", [DirTarget, StagingDirTarget], ids=PATHS)
@pytest.mark.parametrize("case_id, role, change", STATS_EDITS, ids=[c[0] for c in STATS_EDITS])
def test_stats_edit_is_refused_by_the_data_checks_and_the_live_target_is_unchanged(tmp_path, pristine, case_id, role,
                                                                                   change, target_class):
    store, made, live = _workspace(tmp_path, pristine)
    _edit(role, lambda manifest, _made: change(manifest))(store, made)
    storage = open_storage({"backend": "filesystem", "path": store})
    before = tree_state(live)
    target = target_class({"path": live})
    with pytest.raises(IntegrityError) as caught:
        rs.restore(storage, JOB, target, backup=made[role]["id"], **KEYS[role])
    assert "restored payloads differ" in str(caught.value)  # the target's own error, not a diagnosis
    assert target.calls == ["preflight", "restore"]
    assert tree_state(live) == before
    assert not os.path.exists(live + ".staging")
    outcome = vf.verify(storage, JOB, backup=made[role]["id"], test_restore=True, target_class=DirTarget, **KEYS[role])
    assert outcome["failed"] == 1


def test_the_pristine_backups_restore(tmp_path, pristine):
    """Control: without a fault every backup restores, so the refusals above are about the faults."""
    store, made, live = _workspace(tmp_path, pristine)
    storage = open_storage({"backend": "filesystem", "path": store})
    for role, target_class in [(role, target_class) for role in ("plain", "gzip", "rcpt", "pass", "incr")
                               for target_class in (DirTarget, StagingDirTarget)]:
        target = target_class({"path": live})
        report = rs.restore(storage, JOB, target, backup=made[role]["id"], **KEYS[role])
        assert target.calls == ["preflight", "restore"]
        assert report["verification"]["mode"] == ("one-pass" if target_class is StagingDirTarget else "two-pass")
        assert all(check["ok"] for check in report["checks"])
        expected = PAYLOADS if role != "incr" else dict(PAYLOADS, **{"small.txt": b"changed since the full\n"})
        for name, data in expected.items():
            with open(os.path.join(live, name), "rb") as handle:
                assert handle.read() == data
    other = rs.restore(storage, OTHER_JOB, DirTarget({"path": live}), identity=str(OTHER_KEY))
    assert other["backup_id"] == made["other"]["id"]
