# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``runner copy`` against two SeaweedFS instances with their own credentials.

1. The job file's ``copy`` section (destination credentials as ``*_file``), check mode,
   the copy, idempotence, metrics on a real Pushgateway; at the destination ``runner
   verify`` and ``runner restore`` with a job file that only names the copy's location
   give back the tree that was backed up. No secret is printed.
2. The copy killed with SIGKILL (its whole process group) at random moments, at least
   20 times: after every kill each backup the destination lists verifies (with the key),
   a killed copy's leftovers are taken over by the next run, and the last run leaves the
   destination in sync with the source. The seed is printed and named in failures
   (``BIOMETRICS_CRASH_SEED=<n>``); ``BIOMETRICS_COPY_KILLS=<n>`` sets the count.
3. ``copy.reencrypt``: the copies are encrypted to another team's recipients with the source's
   key given explicitly; they restore with that team's key only; a missing or wrong key stops
   the run before anything is written; killed at random moments (at least 10 times), every
   backup listed at the destination verifies with the team's key.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.base import MissingLocationError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.verify import verify

from restore_helpers import tree_state
from .offsite_helpers import offsite_s3  # noqa: F401  pylint: disable=unused-import  # a fixture

RUNNER = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1 << 20
KILLS = int(os.environ.get("BIOMETRICS_COPY_KILLS") or 24)


@pytest.fixture
def keys(tmp_path):
    identity = x25519.Identity.generate()
    (tmp_path / "identity").write_text("%s\n" % identity)
    (tmp_path / "recipients").write_text("%s\n" % identity.to_public())
    return {"identity": str(identity), "identity_file": str(tmp_path / "identity"),
            "recipients_file": str(tmp_path / "recipients")}


def runner_env(extra=None):
    environ = dict(os.environ, PYTHONPATH=os.path.join(REPO, "build", "collections"))
    environ.update(extra or {})
    return environ


def run(command, config, *extra, env=None):
    argv = [sys.executable, "-m", RUNNER, command, "--config", str(config)] + list(extra)
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runner_env(env),
                          timeout=600, cwd="/", check=False)


def storage_by_env(server, prefix):
    return {"backend": "s3", "bucket": server.bucket, "prefix": prefix, "endpoint_url": server.endpoint_url,
            "region": server.region, "access_key_env": "SRC_S3_ACCESS", "secret_key_env": "SRC_S3_SECRET"}


def storage_by_file(server, prefix, directory):
    directory.mkdir(exist_ok=True)
    (directory / "access_key").write_text(server.access_key)
    (directory / "secret_key").write_text(server.secret_key + "\n")
    return {"backend": "s3", "bucket": server.bucket, "prefix": prefix, "endpoint_url": server.endpoint_url,
            "region": server.region, "access_key_file": str(directory / "access_key"),
            "secret_key_file": str(directory / "secret_key")}


def config_storage_prefix(config):
    return yaml.safe_load(config.read_text())["storage"]["prefix"]


def metric(gateway, name, job):
    for family in text_string_to_metric_families(gateway.metrics_text()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("job") == job:
                return sample.value
    return None


def test_runner_copy_then_verify_and_restore_at_the_destination(
        tmp_path, keys, s3_server, offsite_s3, pushgateway_server):
    job = "copy-%s" % uuid.uuid4().hex[:6]
    tree = tmp_path / "data"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n" * 100)
    (tree / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    env = {"SRC_S3_ACCESS": s3_server.access_key, "SRC_S3_SECRET": s3_server.secret_key}
    destination = storage_by_file(offsite_s3, "offsite-%s" % uuid.uuid4().hex[:6], tmp_path / "offsite-secret")
    encryption = {"recipients_file": keys["recipients_file"], "identity_file": keys["identity_file"]}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "job": job, "kind": "files", "source": {"path": str(tree)},
        "storage": storage_by_env(s3_server, "primary-%s" % uuid.uuid4().hex[:6]), "encryption": encryption,
        "copy": {"destination": destination},
        "metrics": {"pushgateway_url": pushgateway_server.url, "instance": "node-a"},
        "restore": {"target": {"path": str(tmp_path / "restored-from-copy")}},
    }))
    ids = []
    for dummy in range(2):
        made = run("backup", config, env=env)
        assert made.returncode == 0, made.stderr
        ids.append(json.loads(made.stdout)["backup_id"])
        time.sleep(1.05)
        (tree / "a.txt").write_text("changed\n")

    plan = run("copy", config, "--check", env=env)
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert [step["id"] for step in planned["planned"]] == ids and planned["changed"]
    offsite = open_storage(dict(offsite_s3.storage_options(prefix=destination["prefix"])))
    assert Catalog(offsite).scan(job) == []

    copied = run("copy", config, env=env)
    assert copied.returncode == 0, copied.stderr
    outcome = json.loads(copied.stdout)
    assert [item["id"] for item in outcome["copied"]] == ids and outcome["lag_seconds"] == 0
    assert metric(pushgateway_server, "backup_copy_lag_seconds", job) == 0
    assert metric(pushgateway_server, "backup_copy_bytes", job) == outcome["bytes_copied"] > 0
    assert abs(metric(pushgateway_server, "backup_copy_last_success_timestamp_seconds", job) - time.time()) < 600

    again = run("copy", config, env=env)
    assert again.returncode == 0, again.stderr
    assert not json.loads(again.stdout)["changed"] and metric(pushgateway_server, "backup_copy_bytes", job) == 0

    # The copy is an ordinary location: a job file naming it verifies and restores there.
    at_offsite = tmp_path / "offsite.yaml"
    at_offsite.write_text(yaml.safe_dump({
        "job": job, "kind": "files", "storage": destination, "encryption": encryption,
        "restore": {"target": {"path": str(tmp_path / "restored")}}}))
    checked = run("verify", at_offsite, "--backup", "all")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["verified"] == 2
    restored = run("restore", at_offsite)
    assert restored.returncode == 0, restored.stderr
    assert tree_state(str(tmp_path / "restored")) == tree_state(str(tree))
    # ... and the job's own file reads the copy with --from-copy: the monthly drill from offsite.
    # The primary's credentials are not given (the site is gone, its Secret with it): nothing
    # run from the copy may need them.
    drill = run("drill", config, "--from-copy")
    assert drill.returncode == 0, drill.stderr
    assert json.loads(drill.stdout)["results"][0]["id"] == ids[-1]
    # The verdict is recorded where the drill read: at the copy, not at the source.
    assert Catalog(offsite).get(job, ids[-1])["verification"]["test_restore"] is True
    primary = open_storage(dict(s3_server.storage_options(prefix=config_storage_prefix(config))))
    assert Catalog(primary).get(job, ids[-1])["verification"] is None
    listed_offsite = run("list", config, "--from-copy")
    assert listed_offsite.returncode == 0, listed_offsite.stderr
    assert json.loads(listed_offsite.stdout)["storage"]["bucket"] == offsite_s3.bucket
    verified_offsite = run("verify", config, "--from-copy", "--backup", "all")
    assert verified_offsite.returncode == 0, verified_offsite.stderr
    assert json.loads(verified_offsite.stdout)["verified"] == 2
    restored_offsite = run("restore", config, "--from-copy")
    assert restored_offsite.returncode == 0, restored_offsite.stderr
    assert tree_state(str(tmp_path / "restored-from-copy")) == tree_state(str(tree))
    for step in (plan, copied, again, checked, restored, drill, listed_offsite, verified_offsite, restored_offsite):
        for secret in (s3_server.secret_key, s3_server.access_key, offsite_s3.secret_key, offsite_s3.access_key):
            assert secret not in step.stdout and secret not in step.stderr


def _big_backups(storage, job, directory, recipient, count=3, mib=12):
    """``count`` full backups of incompressible files (``mib`` MiB each)."""
    made = []
    for index in range(count):
        root = directory / ("tree-%d" % index)
        root.mkdir(parents=True)
        for part in range(3):
            (root / ("f%d.bin" % part)).write_bytes(os.urandom(mib * MIB // 3))
        made.append(BackupRun(job, FilesSource({"path": str(root)}), storage,
                              encryption={"recipients": [recipient]}).run())
        time.sleep(1.05)
    return made


def test_copy_killed_at_random_points_never_lists_what_does_not_verify(tmp_path, keys, s3_server, offsite_s3):
    seed = int(os.environ.get("BIOMETRICS_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    job = "copykill"
    source_options = s3_server.storage_options()
    source = open_storage(source_options)
    made = _big_backups(source, job, tmp_path, x25519.Identity.from_str(keys["identity"]).to_public().__str__())
    ids = sorted(m["id"] for m in made)
    env = {"SRC_S3_ACCESS": s3_server.access_key, "SRC_S3_SECRET": s3_server.secret_key}

    def job_file(prefix, backend="s3"):
        """A job file copying to a fresh place (S3, or a filesystem directory), and that storage."""
        if backend == "s3":
            destination = dict(storage_by_file(offsite_s3, prefix, tmp_path / "offsite-secret"), part_size=5 * MIB)
            seen = offsite_s3.storage_options(prefix=prefix)
        else:
            destination = seen = {"backend": "filesystem", "path": str(tmp_path / prefix)}
        path = tmp_path / ("job-%s.yaml" % prefix)
        path.write_text(yaml.safe_dump({
            "job": job, "kind": "files", "source": {"path": str(tmp_path)},
            "storage": dict(storage_by_env(s3_server, source_options["prefix"])),
            "encryption": {"recipients_file": keys["recipients_file"]}, "copy": {"destination": destination}}))
        return path, open_storage(seen)

    def start(config):
        return subprocess.Popen([sys.executable, "-m", RUNNER, "copy", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=runner_env(env),
                                cwd="/", start_new_session=True)

    def copying(process):
        """Block until the runner logs that it starts copying (True), or exits first (False)."""
        for line in process.stderr:
            if " copying " in line:
                return True
        return False

    # An uninterrupted copy: the windows the kills are drawn from, interpreter start included
    # (the whole run) and without it (from the runner's "copying" line to its exit).
    config, measured = job_file("measure-%s" % uuid.uuid4().hex[:6])
    began = time.monotonic()
    process = start(config)
    assert copying(process)
    copy_began = time.monotonic()
    assert process.wait() == 0
    ended = time.monotonic()
    window, copy_window = ended - began, ended - copy_began
    assert sorted(m["id"] for m in Catalog(measured).scan(job)) == ids

    landed = {"nothing listed": 0, "some listed": 0, "all listed": 0}
    backends = ["s3", "filesystem"]
    config, offsite = job_file("kill-%s" % uuid.uuid4().hex[:6], backends[0])
    verified_ok = set()
    runs_here = 0
    for kill in range(KILLS):
        # Half over the whole run, half over the copy proper (after the "copying" line).
        during = kill % 2 == 1
        delay = rng.uniform(0, copy_window if during else window)
        began = time.monotonic()
        process = start(config)
        waited = not during or copying(process)  # False: it ended before copying anything
        if waited:
            copy_began = time.monotonic()
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        elif waited and runs_here == 0 and process.returncode == 0:
            # A copy from scratch that beat its kill: the windows measured at the start were
            # too long for this machine now (the load of other tests changes), so use this run.
            ended = time.monotonic()
            window = ended - began
            copy_window = ended - copy_began if during else min(copy_window, window)
        process.wait()
        process.stderr.close()
        try:
            listed = sorted(m["id"] for m in Catalog(offsite).scan(job))
        except MissingLocationError:
            listed = []  # a filesystem destination the killed copy had not created yet
        where = "seed %d, kill %d (%s) after %.2fs" % (seed, kill, "during copy" if during else "anywhere", delay)
        assert set(listed) <= set(ids), where
        for backup_id in listed:
            if backup_id in verified_ok:
                continue
            outcome = verify(offsite, job, backup=backup_id, identity=keys["identity"], record=False)
            assert outcome["ok"], "%s: %s listed but does not verify: %s" % (where, backup_id, outcome["results"])
            verified_ok.add(backup_id)
        landed["all listed" if listed == ids else "some listed" if listed else "nothing listed"] += 1
        runs_here += 1
        if listed == ids or runs_here >= 2:
            # Start over at a fresh place (the other backend), so kills keep landing mid-copy: a
            # run resuming a killed copy has less to do than the window its delay is drawn from.
            runs_here = 0
            backends.reverse()
            config, offsite = job_file("kill-%s" % uuid.uuid4().hex[:6], backends[0])
            verified_ok = set()
    last = run("copy", config, env=env)
    assert last.returncode == 0, "seed %d: %s" % (seed, last.stderr)
    assert sorted(m["id"] for m in Catalog(offsite).scan(job)) == ids
    assert verify(offsite, job, backup="all", identity=keys["identity"], record=False)["ok"]
    print("copy kills: %d (seed %d, run %.2fs, copy proper %.2fs): %s; last run reused %d bytes"
          % (KILLS, seed, window, copy_window, landed, json.loads(last.stdout)["bytes_reused"]))
    assert KILLS < 20 or landed["some listed"] + landed["nothing listed"] >= KILLS // 3, landed


def test_require_copy_and_retention_of_its_own_at_the_destination(tmp_path, keys, s3_server, offsite_s3):
    job = "guarded-%s" % uuid.uuid4().hex[:6]
    tree = tmp_path / "data"
    tree.mkdir()
    env = {"SRC_S3_ACCESS": s3_server.access_key, "SRC_S3_SECRET": s3_server.secret_key}
    destination = storage_by_file(offsite_s3, "offsite-%s" % uuid.uuid4().hex[:6], tmp_path / "offsite-secret")
    encryption = {"recipients_file": keys["recipients_file"]}
    config = tmp_path / "job.yaml"
    base = {"job": job, "kind": "files", "source": {"path": str(tree)}, "encryption": encryption,
            "storage": storage_by_env(s3_server, "primary-%s" % uuid.uuid4().hex[:6])}
    config.write_text(yaml.safe_dump(dict(base, copy={"destination": destination, "retention": {"keep_last": 1}},
                                          retention={"keep_last": 1, "require_copy": True})))
    ids = []
    for index in range(3):
        (tree / ("f%d.txt" % index)).write_text("file %d\n" % index)
        made = run("backup", config, env=env)
        assert made.returncode == 0, made.stderr
        ids.append(json.loads(made.stdout)["backup_id"])
        time.sleep(1.05)
    source = open_storage(dict(s3_server.storage_options(prefix=base["storage"]["prefix"])))

    guarded = run("prune", config, env=env)
    assert guarded.returncode == 0, guarded.stderr
    assert json.loads(guarded.stdout)["deleted"] == []  # nothing copied yet: nothing goes
    assert sorted(m["id"] for m in Catalog(source).scan(job)) == ids

    assert run("copy", config, "--backup", ids[1], env=env).returncode == 0
    pruned = run("prune", config, env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["deleted"] == [ids[1]]  # the only one copied and not the newest
    assert sorted(m["id"] for m in Catalog(source).scan(job)) == [ids[0], ids[2]]

    # The destination keeps by a policy of its own (copy.retention: the newest only), same rails.
    # The copy itself already skips what that policy would not keep: ids[0] is older than ids[2].
    first = run("copy", config, env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["not_wanted"] == [ids[0]]
    offsite = open_storage(dict(offsite_s3.storage_options(prefix=destination["prefix"])))
    assert sorted(m["id"] for m in Catalog(offsite).scan(job)) == [ids[1], ids[2]]
    offsite_prune = run("prune", config, "--destination", env=env)
    assert offsite_prune.returncode == 0, offsite_prune.stderr
    assert [m["id"] for m in Catalog(offsite).scan(job)] == [ids[2]]
    # ... and the copy does not bring back what that policy removed.
    again = run("copy", config, env=env)
    assert again.returncode == 0, again.stderr
    outcome = json.loads(again.stdout)
    assert not outcome["changed"] and outcome["not_wanted"] == [ids[0]] and outcome["lag_seconds"] == 0
    assert [m["id"] for m in Catalog(offsite).scan(job)] == [ids[2]]

    # What the pod of <job>-copy-prune has: the destination's credentials only. Neither the
    # primary storage's (no SRC_S3_* here) nor copy.reencrypt's key is read.
    alone = tmp_path / "destination-only.yaml"
    alone.write_text(yaml.safe_dump(dict(base, copy={
        "destination": destination, "retention": {"keep_last": 1},
        "reencrypt": {"recipients_file": keys["recipients_file"], "identity_file": str(tmp_path / "not-mounted")}})))
    (tree / "late.txt").write_text("late\n")
    newest = run("backup", config, env=env)
    assert newest.returncode == 0, newest.stderr
    assert run("copy", config, env=env).returncode == 0
    assert sorted(m["id"] for m in Catalog(offsite).scan(job)) == sorted([ids[2], json.loads(newest.stdout)["backup_id"]])
    destination_only = run("prune", alone, "--destination")
    assert destination_only.returncode == 0, destination_only.stderr
    assert json.loads(destination_only.stdout)["deleted"] == [ids[2]]
    assert [m["id"] for m in Catalog(offsite).scan(job)] == [json.loads(newest.stdout)["backup_id"]]
    assert offsite_s3.secret_key not in destination_only.stderr + destination_only.stdout

    missing = tmp_path / "no-copy.yaml"
    missing.write_text(yaml.safe_dump(dict(base, retention={"keep_last": 1, "require_copy": True})))
    refused = run("prune", missing, env=env)
    assert refused.returncode == 2 and "require_copy needs the 'copy' section" in refused.stderr


def test_runner_copy_reencrypts_for_another_team(tmp_path, keys, s3_server, offsite_s3):
    """``copy.reencrypt``: the copies are encrypted to the other team's recipients with the
    source's key given explicitly (identity_file); at the destination they restore with the
    other team's key and not with the source's. A missing or wrong source key stops the run
    (exit 2) before anything is written there; no key is printed."""
    job = "reenc-%s" % uuid.uuid4().hex[:6]
    tree = tmp_path / "data"
    tree.mkdir()
    (tree / "a.txt").write_text("alpha\n" * 100)
    (tree / "b.bin").write_bytes(os.urandom(300_000))
    team = x25519.Identity.generate()
    (tmp_path / "team-identity").write_text("%s\n" % team)
    (tmp_path / "team-recipients").write_text("# the other team\n%s\n" % team.to_public())
    env = {"SRC_S3_ACCESS": s3_server.access_key, "SRC_S3_SECRET": s3_server.secret_key}
    destination = storage_by_file(offsite_s3, "team-%s" % uuid.uuid4().hex[:6], tmp_path / "offsite-secret")
    offsite = open_storage(dict(offsite_s3.storage_options(prefix=destination["prefix"])))

    def job_file(name, reencrypt):
        path = tmp_path / name
        path.write_text(yaml.safe_dump({
            "job": job, "kind": "files", "source": {"path": str(tree)},
            "storage": storage_by_env(s3_server, "primary-%s" % job),
            "encryption": {"recipients_file": keys["recipients_file"]},
            "copy": {"destination": destination, "reencrypt": reencrypt}}))
        return path

    config = job_file("job.yaml", {"recipients_file": str(tmp_path / "team-recipients"),
                                   "identity_file": keys["identity_file"]})
    made = run("backup", config, env=env)
    assert made.returncode == 0, made.stderr
    backup_id = json.loads(made.stdout)["backup_id"]

    # The source's key is required, explicitly, and refused when it cannot decrypt.
    wrong = tmp_path / "wrong-identity"
    wrong.write_text("%s\n" % x25519.Identity.generate())
    missing = run("copy", job_file("no-key.yaml", {"recipients_file": str(tmp_path / "team-recipients")}), env=env)
    assert missing.returncode == 2 and "source's key" in missing.stderr
    absent = run("copy", job_file("absent-key.yaml", {"recipients_file": str(tmp_path / "team-recipients"),
                                                      "identity_file": str(tmp_path / "nowhere")}), env=env)
    assert absent.returncode == 2 and "copy.reencrypt.identity" in absent.stderr
    refused = run("copy", job_file("wrong-key.yaml", {"recipients_file": str(tmp_path / "team-recipients"),
                                                      "identity_file": str(wrong)}), env=env)
    assert refused.returncode == 2 and "nothing was written" in refused.stderr, refused.stderr
    assert list(offsite.list("%s/" % job)) == []  # nothing at all was written there

    plan = run("copy", config, "--check", env=env)
    assert plan.returncode == 0, plan.stderr
    assert [step["id"] for step in json.loads(plan.stdout)["planned"]] == [backup_id]
    copied = run("copy", config, env=env)
    assert copied.returncode == 0, copied.stderr
    outcome = json.loads(copied.stdout)
    assert [item["id"] for item in outcome["copied"]] == [backup_id]
    assert outcome["reencrypt"] == {"recipients": [str(team.to_public())]}
    assert "re-encrypted to 1 recipients" in copied.stderr
    again = run("copy", config, env=env)
    assert again.returncode == 0 and not json.loads(again.stdout)["changed"]
    assert Catalog(offsite).get(job, backup_id)["encryption"]["recipients"] == [str(team.to_public())]

    # The other team restores with its own key; the source's key does not open the copy.
    for name, identity_file, code in (("team", tmp_path / "team-identity", 0), ("source", keys["identity_file"], 2)):
        at_offsite = tmp_path / ("offsite-%s.yaml" % name)
        at_offsite.write_text(yaml.safe_dump({
            "job": job, "kind": "files", "storage": destination,
            "encryption": {"identity_file": str(identity_file)},
            "restore": {"target": {"path": str(tmp_path / ("restored-" + name))}}}))
        restored = run("restore", at_offsite)
        assert restored.returncode == code, restored.stderr
    assert tree_state(str(tmp_path / "restored-team")) == tree_state(str(tree))
    assert "not a recipient" in restored.stderr
    secrets = [keys["identity"], str(team), s3_server.secret_key, offsite_s3.secret_key]
    for step in (missing, absent, refused, plan, copied, again):
        for secret in secrets:
            assert secret not in step.stdout and secret not in step.stderr


def test_reencrypting_copy_killed_at_random_points(tmp_path, keys, s3_server):
    """A re-encrypting ``runner copy`` killed with SIGKILL at random moments: every backup the
    destination lists verifies with the other team's key, and the next run finishes the copy."""
    seed = int(os.environ.get("BIOMETRICS_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    job = "reenckill"
    source_options = s3_server.storage_options(prefix="reenckill-%s" % uuid.uuid4().hex[:6])
    source = open_storage(source_options)
    source_key = x25519.Identity.from_str(keys["identity"])
    made = _big_backups(source, job, tmp_path, str(source_key.to_public()), count=3, mib=6)
    ids = sorted(m["id"] for m in made)
    team = x25519.Identity.generate()
    (tmp_path / "team-recipients").write_text("%s\n" % team.to_public())
    env = {"SRC_S3_ACCESS": s3_server.access_key, "SRC_S3_SECRET": s3_server.secret_key}
    target = tmp_path / "team-copy"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "job": job, "kind": "files", "source": {"path": str(tmp_path)},
        "storage": storage_by_env(s3_server, source_options["prefix"]),
        "copy": {"destination": {"backend": "filesystem", "path": str(target)},
                 "reencrypt": {"recipients_file": str(tmp_path / "team-recipients"),
                               "identity_file": keys["identity_file"]}}}))
    offsite = open_storage({"backend": "filesystem", "path": str(target)})
    began = time.monotonic()
    measured = run("copy", config, env=env)
    assert measured.returncode == 0, measured.stderr
    window = time.monotonic() - began
    shutil.rmtree(target)
    kills = max(10, KILLS // 2)
    landed = {"killed": 0, "finished": 0, "partly listed": 0}
    runs_here = 0
    for kill in range(kills):
        delay = rng.uniform(0, window)
        process = subprocess.Popen([sys.executable, "-m", RUNNER, "copy", "--config", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=runner_env(env),
                                   cwd="/", start_new_session=True)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            landed["killed"] += 1
        else:
            landed["finished"] += 1
        try:
            listed = sorted(m["id"] for m in Catalog(offsite).scan(job))
        except MissingLocationError:
            listed = []
        landed["partly listed"] += 1 if listed and listed != ids else 0
        where = "seed %d, kill %d after %.2fs" % (seed, kill, delay)
        for backup_id in listed:
            outcome = verify(offsite, job, backup=backup_id, identity=str(team), record=False)
            assert outcome["ok"], "%s: %s listed but does not verify: %s" % (where, backup_id, outcome["results"])
        runs_here += 1
        if listed == ids or runs_here >= 2:
            # Start over, so that kills keep landing mid-copy: a run resuming a killed copy has
            # less to do than the measured window.
            shutil.rmtree(target, ignore_errors=True)
            runs_here = 0
    last = run("copy", config, env=env)
    assert last.returncode == 0, "seed %d: %s" % (seed, last.stderr)
    assert sorted(m["id"] for m in Catalog(offsite).scan(job)) == ids
    assert verify(offsite, job, backup="all", identity=str(team), record=False)["ok"]
    again = run("copy", config, env=env)
    assert again.returncode == 0 and not json.loads(again.stdout)["changed"]
    print("re-encrypting copy kills: %d (seed %d, run %.2fs): %s" % (kills, seed, window, landed))
    assert landed["killed"] >= kills // 2, landed
