# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Path rewriting and argument parsing of hack/run_cronjob.py (no cluster needed)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))
from run_cronjob import (  # noqa: E402  pylint: disable=wrong-import-position
    ENTRYPOINT, LocalRunError, container_argv, parse_claims, rewrite_path, rewrite_tree)

MOUNTS = sorted([("/etc/biometrics-backup/config", "/w/config"), ("/etc/biometrics-backup", "/w/all"),
                 ("/tmp", "/w/scratch"), ("/data", "/srv/data")],
                key=lambda item: len(item[0].rstrip("/")), reverse=True)


@pytest.mark.parametrize("value,expected", [
    ("/etc/biometrics-backup/config/job.yaml", "/w/config/job.yaml"),  # the longest mount wins
    ("/etc/biometrics-backup/keys/recipients", "/w/all/keys/recipients"),
    ("/etc/biometrics-backup", "/w/all"),
    ("/data/", "/srv/data/"),  # a trailing slash (rsync semantics) is kept
    ("/data", "/srv/data"),
    ("/tmp", "/w/scratch"),
    ("/database", "/database"),  # not below /data
    ("/tmpfile", "/tmpfile"),
    ("relative/path", "relative/path"),
    ("http://s3:8333/bucket", "http://s3:8333/bucket"),
    (5432, 5432),
])
def test_rewrite_path_replaces_only_whole_mount_prefixes(value, expected):
    assert rewrite_path(value, MOUNTS) == expected


@pytest.mark.parametrize("value,expected", [
    ("/tmp-clone/.venv/bin/python", "/tmp-clone/.venv/bin/python"),  # shares the prefix "/tmp", not a component
    ("/tmpfs/x", "/tmpfs/x"),
    ("/etc/biometrics-backup-src/hack", "/etc/biometrics-backup-src/hack"),
    ("/etc/biometrics-backup/configs", "/w/all/configs"),  # below /etc/biometrics-backup, not .../config
    ("/data.d/x", "/data.d/x"),
    ("/dat", "/dat"),
    ("/tmp//x", "/w/scratch//x"),
])
def test_rewrite_path_never_matches_a_mere_string_prefix(value, expected):
    assert rewrite_path(value, MOUNTS) == expected


def test_a_mount_at_the_root_takes_every_absolute_path_and_longer_mounts_win():
    mounts = [("/tmp", "/w/scratch"), ("/", "/w/root")]
    assert rewrite_path("/etc/x", mounts) == "/w/root/etc/x"
    assert rewrite_path("/", mounts) == "/w/root/"
    assert rewrite_path("/tmp/x", mounts) == "/w/scratch/x"


# Where a user may have cloned the repository: its .venv interpreter is a path of this
# machine and must reach the command untouched, even below a directory that is a mount
# path in the pod (the runner's scratch volume is /tmp) or shares a prefix with one.
CHECKOUTS = ["/tmp/biometrics.backup", "/tmp", "/tmp/x/tmp", "/tmpclone", "/tmp-clone", "/data/src/backup",
             "/etc/biometrics-backup", "/etc/biometrics-backup/config/clone", "/home/me/my code/backup", "/"]


@pytest.mark.parametrize("checkout", CHECKOUTS)
def test_the_interpreter_of_a_checkout_anywhere_is_not_rewritten(checkout):
    interpreter = checkout.rstrip("/") + "/.venv/bin/python"
    container = {"args": ["backup", "--config", "/etc/biometrics-backup/config/job.yaml", "--scratch", "/tmp/run"]}
    argv = container_argv(container, MOUNTS, interpreter=interpreter)
    assert argv == [interpreter] + ENTRYPOINT[1:] + [
        "backup", "--config", "/w/config/job.yaml", "--scratch", "/w/scratch/run"]


def test_container_argv_defaults_to_this_interpreter_and_rewrites_a_given_command():
    argv = container_argv({"args": ["prune"]}, MOUNTS)
    assert argv == [sys.executable] + ENTRYPOINT[1:] + ["prune"]
    # A command of the image's own (a container path) is rewritten like any argument.
    assert container_argv({"command": ["/data/bin/run", "/tmp/x"]}, MOUNTS) == ["/srv/data/bin/run", "/w/scratch/x"]
    assert container_argv({"command": ["python3", "-c", "pass"], "args": ["/data"]}, MOUNTS,
                          interpreter="/tmp/v/bin/python") == ["/tmp/v/bin/python", "-c", "pass", "/srv/data"]


def test_rewrite_tree_walks_nested_job_files_and_keeps_other_values():
    job = {"job": "db", "source": {"path": "/data/sub", "port": 5432, "list": ["/tmp/x", "plain"]},
           "encryption": {"recipients_file": "/etc/biometrics-backup/keys/recipients"}}
    assert rewrite_tree(job, MOUNTS) == {
        "job": "db", "source": {"path": "/srv/data/sub", "port": 5432, "list": ["/w/scratch/x", "plain"]},
        "encryption": {"recipients_file": "/w/all/keys/recipients"}}


def test_parse_claims():
    assert parse_claims(["data=/srv/a", "backup-storage=rel/dir=x"]) == {"data": "/srv/a", "backup-storage": "rel/dir=x"}
    for bad in ("data", "=/x", "data="):
        with pytest.raises(LocalRunError, match="NAME=DIR"):
            parse_claims([bad])
