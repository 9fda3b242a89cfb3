"""A storage location that is not there is an error, never an empty catalog (issue 13, point 3).

A mistyped ``storage.path``, an unmounted volume or a path that is a regular file used to read
as "no backups": ``backup_info`` listed nothing, ``backup_prune`` succeeded, ``backup_verify``
blamed the job ("no complete backup yet"). Now every reader fails with one line naming the
path, through the modules (real ``ansible-playbook``) and the runner (real subprocess), and
nothing is created; only a backup run creates its directory, as before.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest
import yaml

from modules_helpers import ansible_playbook

FQCN = "biometrics.backup."
RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def runner(command, *configs, extra=()):
    argv = [sys.executable, "-m", RUNNER, command]
    for config in configs:
        argv += ["--config", str(config)]
    environ = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"))
    return subprocess.run(argv + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=environ, timeout=600, cwd="/", check=False)


def make_location(tmp_path, shape):
    """``(path, expected message)`` of a location of the given shape; nothing else is there."""
    path = tmp_path / "store"
    if shape == "regular file":
        path.write_text("not a directory\n")
        return path, "storage path %s is not a directory: check storage.path" % path
    if shape == "dangling symlink":
        path.symlink_to(tmp_path / "unmounted")
        return path, "storage path %s is a symbolic link to %s, which does not exist: check storage.path" % (
            path, tmp_path / "unmounted")
    return path, "storage directory %s does not exist (only a backup run creates it): check storage.path" % path


def shape_of(path):
    if os.path.islink(path):
        return ("symlink", os.readlink(path), os.path.exists(path))
    if os.path.isfile(path):
        return ("file", open(path, "rb").read())
    return ("dir", sorted(os.listdir(path))) if os.path.isdir(path) else None


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.txt").write_text("alpha\n" * 100)
    return root


@pytest.mark.parametrize("shape", ["missing", "regular file", "dangling symlink"])
def test_runner_readers_fail_with_exit_2_naming_the_path(tmp_path, tree, shape):
    path, message = make_location(tmp_path, shape)
    (tmp_path / "passphrase").write_text("correct horse battery staple\n")
    job = {"job": "located", "kind": "files", "source": {"path": str(tree)},
           "storage": {"backend": "filesystem", "path": str(path)},
           "encryption": {"passphrase_file": str(tmp_path / "passphrase")},
           "retention": {"keep_daily": 3}, "restore": {"target": {"path": str(tmp_path / "restored")}}}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    before = shape_of(str(path))
    for command, extra in (("list", ()), ("verify", ()), ("prune", ("--check",)), ("restore", ())):
        result = runner(command, config, extra=extra)
        assert result.returncode == 2, (command, result.returncode, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].endswith("%s of job located failed: %s" % (command, message)), (command, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert shape_of(str(path)) == before, "%s changed the location" % command
        assert not (tmp_path / "restored").exists()
    # Several jobs in one prune/list run (the retention CronJob): the bad one fails the run,
    # the good one is still handled.
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(dict(job, job="other", storage={"backend": "filesystem", "path": str(tmp_path)})))
    both = runner("list", good, config)
    assert both.returncode == 2 and message in both.stderr
    listed = json.loads(both.stdout)
    assert listed[0]["job"] == "other" and listed[0]["backups"] == [] and listed[1] is None

    backup = runner("backup", config)
    if shape != "missing":
        # Refused before the source is read: nothing is written into or around a regular
        # file, nor beside a symlink whose target (an unmounted volume) is gone.
        assert backup.returncode == 2 and backup.stderr.strip().endswith(message), backup.stderr
        assert shape_of(str(path)) == before and not (tmp_path / "unmounted").exists()
        return
    # A backup run creates the location, with a passphrase, whose parent lookup must take
    # the missing location for "no parent yet".
    assert backup.returncode == 0, backup.stderr
    backup_id = json.loads(backup.stdout)["backup_id"]
    listing = runner("list", config)
    assert listing.returncode == 0, listing.stderr
    assert [b["id"] for b in json.loads(listing.stdout)["backups"]] == [backup_id]
    verify = runner("verify", config)
    assert verify.returncode == 0 and json.loads(verify.stdout)["verified"] == 1, verify.stderr


@pytest.mark.parametrize("shape", ["missing", "regular file"])
def test_modules_fail_naming_the_path_and_backup_run_creates_it(tmp_path, tree, shape):
    path, message = make_location(tmp_path, shape)
    storage = {"backend": "filesystem", "path": str(path)}
    before = shape_of(str(path))
    readers = [
        ("info", "backup_info", {"storage": storage}),
        ("info of a job", "backup_info", {"storage": storage, "job": "located"}),
        ("info latest", "backup_info", {"storage": storage, "job": "located", "backup": "latest"}),
        ("prune", "backup_prune", {"storage": storage, "job": "located", "keep_daily": 3}),
        ("verify", "backup_verify", {"storage": storage, "job": "located"}),
        ("restore", "backup_restore", {"storage": storage, "job": "located",
                                       "target": {"path": str(tmp_path / "restored")}}),
    ]
    tasks = [{"name": name, "ignore_errors": True, FQCN + module: options} for name, module, options in readers]
    tasks += [{"name": name + " (check)", "ignore_errors": True, "check_mode": True, FQCN + module: options}
              for name, module, options in readers if module in ("backup_prune", "backup_restore")]
    proc, results = ansible_playbook(tmp_path, tasks, diff=True)
    assert set(results) == {task["name"] for task in tasks}, proc.stdout[-2000:]
    for name, result in results.items():
        assert result.get("failed") and result["msg"] == message, (name, result.get("msg"))
        # One line from the engine (error class recorded), not a crash of the module.
        assert result["error"] == "MissingLocationError" and "module_stderr" not in result, name
        if "backups" in result:  # backup_info's empty fields stay typed on failure
            assert result["backups"] == [] and result["incomplete_uploads"] == []
    assert shape_of(str(path)) == before and not (tmp_path / "restored").exists()

    proc, results = ansible_playbook(tmp_path, [
        {"name": "backup", "ignore_errors": True, FQCN + "backup_run": {
            "job": "located", "kind": "files", "source": {"path": str(tree)}, "storage": storage,
            "encryption": {"enabled": False}}},
        {"name": "info", "ignore_errors": True, FQCN + "backup_info": {"storage": storage, "job": "located"}},
    ], diff=True)
    backup, info = results["backup"], results["info"]
    if shape != "missing":
        assert backup.get("failed") and backup["msg"] == message, backup.get("msg")
        assert info.get("failed") and info["msg"] == message
        assert shape_of(str(path)) == before
        return
    assert not backup.get("failed"), backup.get("msg")
    assert '"backups": 0' in backup["diff"]["before"] and '"backups": 1' in backup["diff"]["after"]
    assert not info.get("failed") and [b["id"] for b in info["backups"]] == [backup["backup_id"]]
    assert info["incomplete_uploads"] == [] and info["incomplete_uploads_summary"]["count"] == 0


def test_an_empty_job_in_an_existing_location_is_an_empty_listing(tmp_path):
    (tmp_path / "store").mkdir()
    storage = {"backend": "filesystem", "path": str(tmp_path / "store")}
    proc, results = ansible_playbook(tmp_path, [
        {"name": "info", FQCN + "backup_info": {"storage": storage, "job": "nothing-yet"}},
        {"name": "prune", FQCN + "backup_prune": {"storage": storage, "job": "nothing-yet", "keep_daily": 3}},
    ])
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert results["info"]["count"] == 0 and results["prune"]["counts"]["backups"] == 0


def test_a_missing_bucket_is_a_configuration_error_for_every_reader(tmp_path, s3_server):
    storage = dict(s3_server.storage_options(), bucket="no-such-bucket-%s" % uuid.uuid4().hex[:8])
    message = "s3 bucket %r does not exist at %s" % (storage["bucket"], s3_server.endpoint_url)
    proc, results = ansible_playbook(tmp_path, [
        {"name": "info", "ignore_errors": True, FQCN + "backup_info": {"storage": storage}},
        {"name": "prune", "ignore_errors": True, FQCN + "backup_prune": {"storage": storage, "job": "j", "keep_daily": 1}},
        {"name": "verify", "ignore_errors": True, FQCN + "backup_verify": {"storage": storage, "job": "j"}},
    ])
    for name in ("info", "prune", "verify"):
        assert results[name].get("failed") and results[name]["msg"] == message, (name, results[name].get("msg"))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "job": "j", "kind": "files", "source": {"path": str(tmp_path)}, "encryption": {"enabled": False},
        "storage": {"backend": "s3", "bucket": storage["bucket"], "prefix": storage["prefix"],
                    "endpoint_url": s3_server.endpoint_url, "region": s3_server.region,
                    "access_key_env": "LOC_S3_ACCESS", "secret_key_env": "LOC_S3_SECRET"}}))
    os.environ["LOC_S3_ACCESS"], os.environ["LOC_S3_SECRET"] = s3_server.access_key, s3_server.secret_key
    try:
        listed = runner("list", config)
    finally:
        del os.environ["LOC_S3_ACCESS"], os.environ["LOC_S3_SECRET"]
    assert listed.returncode == 2 and message in listed.stderr and "Traceback" not in listed.stderr
