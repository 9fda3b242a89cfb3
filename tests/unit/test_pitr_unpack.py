"""The base backup's member checks for interpreters without tarfile's data filter.

The runner image's Python (Debian 12's 3.11.2) has no ``tarfile.data_filter``; the engine
then checks every member itself. These tests call that path whatever this interpreter has.
"""

import io
import os
import stat
import tarfile

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import pitr


def _archive(*members):
    """A tar stream of (name, type, extra) members: type 'file', 'dir', 'sym', 'link', 'fifo'."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, extra in members:
            info = tarfile.TarInfo(name)
            data = b""
            if kind == "file":
                data = extra.encode()
                info.size = len(data)
                info.mode = 0o4777
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o777
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, extra
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, extra
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            info.uid, info.gid = 12345, 12345
            tar.addfile(info, io.BytesIO(data) if data else None)
    buffer.seek(0)
    return buffer


def _unpack(tmp_path, *members):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    with tarfile.open(fileobj=_archive(*members), mode="r|") as archive:
        pitr._extract_checked(archive, str(data_dir))  # pylint: disable=protected-access
    return data_dir


def test_a_base_backup_shape_unpacks_with_safe_modes(tmp_path):
    data_dir = _unpack(tmp_path, ("base", "dir", None), ("base/1", "dir", None),
                       ("base/1/1259", "file", "heap"), ("PG_VERSION", "file", "15\n"),
                       ("pg_wal", "dir", None), ("current", "sym", "base/1"))
    assert (data_dir / "PG_VERSION").read_text() == "15\n"
    assert (data_dir / "base" / "1" / "1259").read_text() == "heap"
    assert os.readlink(data_dir / "current") == "base/1"
    mode = stat.S_IMODE((data_dir / "PG_VERSION").stat().st_mode)
    assert mode & (stat.S_ISUID | stat.S_IWGRP | stat.S_IWOTH) == 0 and mode & 0o600 == 0o600
    assert stat.S_IMODE((data_dir / "base").stat().st_mode) & 0o022 == 0
    assert (data_dir / "PG_VERSION").stat().st_uid == os.geteuid()


@pytest.mark.parametrize("members, message", [
    ([("/etc/evil", "file", "x")], "outside the data directory"),
    ([("../evil", "file", "x")], "outside the data directory"),
    ([("a/../../evil", "file", "x")], "outside the data directory"),
    ([("up", "sym", "..")], "points outside"),
    ([("abs", "sym", "/etc")], "points outside"),
    # Each link alone looks harmless; through the first, the second leaves the tree.
    ([("here", "sym", "."), ("here/up", "sym", "../x")], "points outside"),
    ([("d", "dir", None), ("d/out", "sym", "../.."), ("d/out/evil", "file", "x")], "points outside"),
    ([("hard", "link", "PG_VERSION")], "neither a file, a directory nor a symbolic link"),
    ([("fifo", "fifo", None)], "neither a file, a directory nor a symbolic link"),
])
def test_members_that_leave_the_data_directory_are_refused(tmp_path, members, message):
    with pytest.raises(tarfile.TarError, match=message):
        _unpack(tmp_path, *members)
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()
