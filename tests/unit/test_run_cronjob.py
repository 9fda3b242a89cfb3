# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Path rewriting and argument parsing of hack/run_cronjob.py (no cluster needed)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))
from run_cronjob import LocalRunError, parse_claims, rewrite_path, rewrite_tree  # noqa: E402  pylint: disable=wrong-import-position

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
