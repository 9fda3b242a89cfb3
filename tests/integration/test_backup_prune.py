# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``backup_prune`` run by real ``ansible-playbook`` on locations holding real backups: a
filesystem directory and SeaweedFS S3. Backups are taken by the engine's BackupRun from a
small source defined here (real bytes through the real pipeline); only the clock the run
reads is set, so a history of months can be written in seconds.

Each scenario checks the preview (check mode + diff) deletes nothing and predicts exactly
what the real run then deletes; the rails (failed backups, newest verified, chains,
min_keep, max_delete); orphan removal after the grace period; and a second run that has
nothing left to do.
"""

import datetime
import io
import os
import uuid

from modules_helpers import ansible_playbook

from ansible_collections.biometrics.backup.plugins.module_utils.engine import backup as backup_module
from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import NotFoundError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.prune import plan
from ansible_collections.biometrics.backup.plugins.module_utils.engine.retention import Policy
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.contract import Source
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import new_backup_id, to_iso

UTC = datetime.timezone.utc
FQCN = "biometrics.backup.backup_prune"
JOB = "app-db"


class NoteSource(Source):
    """A source whose payload is a few bytes naming the moment; chains when asked."""
    kind = "files"

    def describe(self):
        return {"note": self.options["note"]}

    def wants_parent(self, context):
        if not self.options.get("incremental"):
            return None
        try:
            return context.latest()
        except NotFoundError:
            return None

    def produce(self, emit, context):
        data = ("backup of %s\n" % self.options["note"]).encode() * 20
        emit("notes.txt", io.BytesIO(data))
        return {"bytes": len(data)}


def take_backup(monkeypatch, storage, moment, incremental=False, job=JOB):
    monkeypatch.setattr(backup_module, "utc_now", lambda: moment)
    run = BackupRun(job, NoteSource({"note": moment.isoformat(), "incremental": incremental}), storage,
                    compression={"algorithm": "gzip"})
    return run.run()


def history(monkeypatch, storage):
    """90 days of nightly backups (Jan-Mar 2024, 02:00Z), plus: an incremental chain in the
    last week of January, two failed runs, one backup that failed verification and one that
    passed it, and leftovers of an interrupted run."""
    start = datetime.datetime(2024, 1, 1, 2, tzinfo=UTC)
    manifests = {}
    for day in range(90):
        moment = start + datetime.timedelta(days=day)
        incremental = datetime.date(2024, 1, 24) <= moment.date() <= datetime.date(2024, 1, 28)
        manifests[moment.date().isoformat()] = take_backup(monkeypatch, storage, moment, incremental)
    catalog = Catalog(storage)
    # Failed runs: a manifest whose status is not complete (as a runner may record one).
    for moment in (datetime.datetime(2024, 3, 30, 5, tzinfo=UTC), datetime.datetime(2024, 2, 10, 5, tzinfo=UTC)):
        failed = dict(take_backup(monkeypatch, storage, moment), status="failed")
        catalog.publish(failed)
        manifests["failed " + moment.date().isoformat()] = failed
    catalog.record_verification(manifests["2024-03-30"], {"result": "failed", "verified_at": "2024-03-30T06:00:00Z"})
    catalog.record_verification(manifests["2024-02-20"], {"result": "ok", "verified_at": "2024-02-20T06:00:00Z"})
    return manifests


def orphan(storage, moment, name="payload.tar.gz"):
    backup_id = new_backup_id(moment)
    storage.put_bytes(mf.object_key(JOB, backup_id, name), b"interrupted run\n")
    return backup_id


def listing(storage):
    return sorted((info.key, info.size) for info in storage.list(""))


POLICY = {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 3, "timezone": "Europe/Berlin"}


def expected_plan(storage, now, **options):
    manifests = Catalog(storage).scan(JOB)
    return plan(manifests, Policy(**POLICY), now=now, **options)


def run_prune(tmp_path, storage_options, tasks_options, check=False, diff=False):
    tasks = []
    for name, options in tasks_options:
        task = {"name": name, "register": name.replace(" ", "_"), "ignore_errors": True,
                FQCN: dict({"job": JOB, "storage": storage_options}, **options)}
        if check:
            task["check_mode"] = True
        tasks.append(task)
    proc, results = ansible_playbook(tmp_path, tasks, diff=diff)
    return proc, results


def test_prune_on_a_filesystem_location(tmp_path, monkeypatch):
    storage_options = {"backend": "filesystem", "path": str(tmp_path / "store")}
    storage = open_storage(storage_options)
    manifests = history(monkeypatch, storage)
    old_orphan = orphan(storage, datetime.datetime(2024, 3, 15, 2, tzinfo=UTC))
    fresh_orphan = orphan(storage, datetime.datetime(2024, 3, 31, 2, tzinfo=UTC))
    old_path = os.path.join(storage.root, JOB, old_orphan, "payload.tar.gz")
    stale = datetime.datetime.now(UTC).timestamp() - 3 * 86400
    os.utime(old_path, (stale, stale))
    tmp_leftover = os.path.join(storage.root, JOB, manifests["2024-03-17"]["id"], ".notes.txt.gz.tmp-0a1b2c3d")
    with open(tmp_leftover, "wb") as handle:
        handle.write(b"half written")
    os.utime(tmp_leftover, (stale, stale))
    (tmp_path / "store" / JOB / "README").write_text("not ours\n")  # junk: reported, never deleted

    before = listing(storage)
    preview_proc, preview = run_prune(tmp_path, storage_options, [
        ("preview", POLICY),
        ("preview refused", dict(POLICY, max_delete=10)),
    ], check=True, diff=True)
    assert preview_proc.returncode == 0, preview_proc.stdout[-3000:] + preview_proc.stderr
    assert listing(storage) == before, "check mode changed the storage"
    result = preview["preview"]
    assert result["changed"] and result["deleted"] == []

    # The preview is the engine's plan for these manifests (rails included) ...
    expected = expected_plan(storage, datetime.datetime.now(UTC), orphan_grace="24h")
    assert [e["id"] for e in result["keep"]] == [e["id"] for e in expected["keep"]]
    assert [e["id"] for e in result["prune"]] == [e["id"] for e in expected["prune"]]
    keep = {e["id"]: e["reasons"] for e in result["keep"]}
    pruned = {e["id"]: e["reason"] for e in result["prune"]}
    ids = {key: value["id"] for key, value in manifests.items()}
    # ... and what it says is right. 30 Mar (the newest) failed verification: it fills no
    # period and stays by the rail only; 29 Mar is daily #1. Weekly: ISO weeks 13 and 12 are
    # used up by daily keeps, so 17, 10, 3 Mar and 25 Feb. Monthly: March is used up, then
    # 29 Feb and 31 Jan, and the rule runs out: the oldest backup (1 Jan) as the third.
    assert keep[ids["2024-03-30"]] == ["newest successful backup (always kept)"]
    assert [keep[ids["2024-03-%02d" % day]] for day in (29, 23)] == [["daily #1"], ["daily #7"]]
    assert [keep[ids[day]] for day in ("2024-03-17", "2024-02-25")] == [["weekly #1"], ["weekly #4"]]
    assert [keep[ids[day]] for day in ("2024-02-29", "2024-01-31")] == [["monthly #1"], ["monthly #2"]]
    assert keep[ids["2024-01-01"]] == ["monthly #3 (oldest, rule not filled)"]
    assert keep[ids["2024-02-20"]] == ["newest verified backup (always kept)"]
    assert len(result["keep"]) == 7 + 4 + 3 + 2
    # Failed runs go once older than the grace period; the incremental chain of 24-28 Jan
    # goes entirely, since no kept backup builds on it.
    assert pruned[manifests["failed 2024-03-30"]["id"]].startswith("failed backup (status failed), older than")
    assert all(ids["2024-01-%02d" % day] in pruned for day in range(24, 29))
    orphans = {e["path"]: e["action"] for e in result["orphans"]}
    assert orphans["%s/%s/" % (JOB, old_orphan)] == "would remove"
    # The grace period runs from the objects' modification time, not from the id.
    assert orphans["%s/%s/" % (JOB, fresh_orphan)] == "kept (within grace)"
    assert orphans["%s/%s/%s" % (JOB, manifests["2024-03-17"]["id"], os.path.basename(tmp_leftover))] == "would remove"
    assert [j["key"] for j in result["junk"]] == ["%s/README" % JOB]
    diff = result["diff"]
    assert ids["2024-01-10"] in diff["before"] and ids["2024-01-10"] not in diff["after"]
    assert ids["2024-03-28"] in diff["after"] and "orphan %s/%s/" % (JOB, old_orphan) in diff["before"]

    refused = preview["preview refused"]
    assert refused["failed"] and refused["refused"]
    assert "would delete %d backups, more than max_delete=10; nothing was deleted" % len(result["prune"]) in refused["msg"]
    assert [e["id"] for e in refused["prune"]] == [e["id"] for e in result["prune"]]

    proc, results = run_prune(tmp_path, storage_options, [
        ("refused", dict(POLICY, max_delete=10)),
        ("prune", dict(POLICY, max_delete=10, force=True)),
        ("again", POLICY),
    ])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert results["refused"]["failed"] and results["refused"]["deleted"] == []
    done = results["prune"]
    assert done["changed"] and sorted(done["deleted"]) == sorted(pruned)
    assert all(entry["deleted"] for entry in done["prune"])
    # Only what the preview predicted is gone; every kept backup is intact and listed.
    remaining = Catalog(storage).scan(JOB)
    assert sorted(m["id"] for m in remaining) == sorted(keep)
    for backup_id in pruned:
        assert not any(key.startswith("%s/%s/" % (JOB, backup_id)) for key, _size in listing(storage))
    assert not os.path.exists(old_path) and not os.path.exists(tmp_leftover)
    assert storage.exists(mf.object_key(JOB, fresh_orphan, "payload.tar.gz"))
    assert os.path.exists(tmp_path / "store" / JOB / "README")
    for manifest in remaining:
        for obj in manifest["objects"]:
            assert storage.exists(mf.object_key(JOB, manifest["id"], obj["name"]))
    again = results["again"]
    assert not again["changed"] and again["prune"] == [] and again["deleted"] == []
    assert [e["id"] for e in again["keep"]] == [e["id"] for e in done["keep"]]


def test_chains_min_keep_and_restic_semantics(tmp_path, monkeypatch):
    storage_options = {"backend": "filesystem", "path": str(tmp_path / "store")}
    storage = open_storage(storage_options)
    now = datetime.datetime.now(UTC).replace(microsecond=0)
    full = take_backup(monkeypatch, storage, now - datetime.timedelta(days=10))
    chain = [take_backup(monkeypatch, storage, now - datetime.timedelta(days=d), incremental=True) for d in (9, 8, 7)]
    assert chain[-1]["parent"] == chain[-2]["id"] and chain[0]["parent"] == full["id"]
    proc, results = run_prune(tmp_path, storage_options, [
        ("last only", {"keep_last": 1, "semantics": "restic"}),
        ("min keep", {"keep_last": 1, "min_keep": 3, "orphan_grace": "0"}),
        ("nothing", {"semantics": "restic"}),
        ("bad timezone", {"keep_daily": 1, "timezone": "Mars/Olympus"}),
        ("bad grace", {"keep_daily": 1, "orphan_grace": "a while"}),
    ], check=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    last_only = results["last only"]
    # The newest backup is an incremental: its whole chain down to the full stays.
    assert [e["id"] for e in last_only["keep"]] == [m["id"] for m in reversed([full] + chain)]
    assert last_only["keep"][0]["reasons"] == ["last #1"]
    assert last_only["keep"][-1]["reasons"] == ["parent of kept backup %s" % chain[0]["id"]]
    assert not last_only["changed"] and last_only["prune"] == []
    assert results["min keep"]["keep"][1]["reasons"] == [
        "min_keep=3 (at least that many successful backups stay)", "parent of kept backup %s" % chain[2]["id"]]
    assert "keeps nothing" in results["nothing"]["msg"] and results["nothing"]["failed"]
    assert "timezone 'Mars/Olympus'" in results["bad timezone"]["msg"]
    assert "orphan_grace 'a while' is not a duration" in results["bad grace"]["msg"]


def test_prune_on_s3(tmp_path, monkeypatch, s3_server):
    storage_options = s3_server.storage_options(prefix="prune-%s" % uuid.uuid4().hex[:8])
    storage = open_storage(storage_options)
    start = datetime.datetime(2023, 12, 20, 23, 30, tzinfo=UTC)
    manifests = [take_backup(monkeypatch, storage, start + datetime.timedelta(hours=12 * n)) for n in range(30)]
    interrupted = orphan(storage, datetime.datetime(2024, 1, 5, tzinfo=UTC))
    client = s3_server.client()
    upload_key = "%s/%s/%s/big.tar.gz" % (storage_options["prefix"], JOB, new_backup_id(datetime.datetime(2024, 1, 6, tzinfo=UTC)))
    upload = client.create_multipart_upload(Bucket=s3_server.bucket, Key=upload_key)
    client.upload_part(Bucket=s3_server.bucket, Key=upload_key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    policy = {"keep_daily": 5, "keep_weekly": 2, "semantics": "restic", "timezone": "America/New_York"}

    before = listing(storage)
    proc, results = run_prune(tmp_path, storage_options, [
        ("wait", dict(policy, orphan_grace="3650d")),
        ("preview", dict(policy, orphan_grace="0")),
    ], check=True, diff=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert listing(storage) == before
    waiting = {e["path"]: e["action"] for e in results["wait"]["orphans"]}
    assert waiting["%s/%s/" % (JOB, interrupted)] == "kept (within grace)"
    preview = results["preview"]
    restic_days = Policy(**policy)
    expected = plan(Catalog(storage).scan(JOB), restic_days, now=datetime.datetime.now(UTC), orphan_grace="0")
    assert [e["id"] for e in preview["keep"]] == [e["id"] for e in expected["keep"]]
    # New York days: the backups at 11:30Z and 23:30Z fall on one local day (06:30 and 18:30).
    # Daily: 4 Jan 06:30, then 18:30 of 3, 2, 1 Jan and 31 Dec; weekly: 2024-W01 (4 Jan) and
    # 2023-W52, whose newest is 31 Dec 18:30 again - restic counts it for both rules.
    assert len(preview["keep"]) == 5 and len(preview["prune"]) == 25
    assert preview["keep"][0]["reasons"] == ["daily #1", "weekly #1"]
    assert preview["keep"][-1]["started_at"] == "2023-12-31T23:30:00Z"
    assert preview["keep"][-1]["reasons"] == ["daily #5", "weekly #2"]
    actions = [e for e in preview["orphans"] if e["action"] == "would remove"]
    assert sum(e["uploads"] for e in actions) == 1 and any(e["path"] == "%s/%s/" % (JOB, interrupted) for e in actions)
    assert storage_options["secret_key"] not in proc.stdout + proc.stderr

    proc, results = run_prune(tmp_path, storage_options, [
        ("prune", dict(policy, orphan_grace="0")),
        ("again", dict(policy, orphan_grace="0")),
    ])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert sorted(results["prune"]["deleted"]) == sorted(e["id"] for e in preview["prune"])
    remaining = sorted(m["id"] for m in Catalog(storage).scan(JOB))
    assert remaining == sorted(e["id"] for e in preview["keep"])
    keys = [key for key, _size in listing(storage)]
    assert not any(key.startswith("%s/%s/" % (JOB, interrupted)) for key in keys)
    for backup_id in results["prune"]["deleted"]:
        assert not any(key.startswith("%s/%s/" % (JOB, backup_id)) for key in keys)
    uploads = client.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=storage_options["prefix"] + "/")
    assert not uploads.get("Uploads")
    assert not results["again"]["changed"] and results["again"]["deleted"] == []
    assert storage_options["secret_key"] not in proc.stdout + proc.stderr
    assert [m["started_at"] for m in manifests[:2]] == [to_iso(start), "2023-12-21T11:30:00Z"]
