# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""docs/disaster-recovery.md, executed: every ``<!-- dr:NAME -->`` block runs unchanged under bash
(``-e -o pipefail``) on real backups taken by the engine from real PostgreSQL, Redis, file trees
and git, and on a real WAL stream plus base backup (point-in-time recovery). The blocks call
stock tools only (age, zstd, sha256sum, tar, createdb/pg_restore, pg_ctl, redis-server, git and
coreutils); the results are compared with the sources.
"""

import datetime
import os
import pty
import pwd
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import psycopg
import pytest
import redis
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.config_git.source import ConfigGitSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.files.source import FilesSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.postgres.source import PostgresSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.walstream import WalState
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.redis.source import RedisSource
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage

from restore_helpers import tree_state

from .test_postgres_pitr import (  # noqa: F401  pylint: disable=unused-import  # pg is a fixture
    DB, JOB as PITR_JOB, WAL_JOB as PITR_WAL_JOB, _base_backup, _insert, _lsn, _streamer, pg)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(REPO, "docs", "disaster-recovery.md")
BLOCK_RE = re.compile(r"<!-- dr:([a-z0-9-]+) -->\n```sh\n(.*?)```", re.S)
EXPECTED = {"choose-latest", "choose-before", "check-sha256", "passphrase-key", "postgres", "redis", "files",
            "config-git", "pitr-unpack", "pitr-fetch-wal", "pitr-recover", "pitr-stop"}


def doc_blocks():
    with open(DOC, encoding="utf-8") as handle:
        text = handle.read()
    return dict(BLOCK_RE.findall(text))


BLOCKS = doc_blocks()


def run_blocks(names, env, cwd, check=True, user=None):
    """Run the named doc blocks, in order, in one bash session (as an operator would paste them);
    ``user`` (a pwd entry) runs them as that account."""
    script = "\n".join(BLOCKS[name] for name in names)
    environ = {"PATH": os.environ["PATH"], "HOME": env.get("HOME", cwd), "LANG": "C.UTF-8"}
    environ.update(env)
    account = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=environ,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600, check=False,
                          **account)
    if check:
        assert proc.returncode == 0, "blocks %s failed:\n%s\n%s" % (names, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_the_page_has_every_tested_block():
    assert set(BLOCKS) == EXPECTED
    for code in BLOCKS.values():  # nothing of this collection, nor Python, is needed
        assert "biometrics" not in code and "python" not in code and "ansible" not in code


@pytest.fixture
def key(tmp_path):
    identity = x25519.Identity.generate()
    path = tmp_path / "age-identity.txt"
    path.write_text("# created: test\n# public key: %s\n%s\n" % (identity.to_public(), identity))
    return {"file": str(path), "recipients": {"recipients": [str(identity.to_public())]},
            "identities": codecs.parse_identities(str(identity))}


def take(store, job, source, encryption, identities=None):
    storage = open_storage({"backend": "filesystem", "path": str(store)})
    manifest = BackupRun(job, source, storage, compression={"algorithm": "zstd", "level": 3},
                         encryption=encryption, identities=identities).run()
    return manifest, os.path.join(str(store), job, manifest["id"])


def next_second():
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)


def make_tree(root, seed):
    (root / "etc" / "conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "app.conf").write_text("setting = %d\n" % seed)
    (root / "etc" / "conf.d" / "extra.conf").write_text("x\n" * seed)
    (root / "data.bin").write_bytes(os.urandom(30_000))
    os.chmod(root / "etc" / "app.conf", 0o600)
    if not (root / "current").is_symlink():
        os.symlink("etc/app.conf", root / "current")


def test_choose_and_check_blocks(tmp_path, key):
    tree = tmp_path / "tree"
    make_tree(tree, 1)
    store = tmp_path / "store"
    manifests = []
    for step in range(3):
        if step:
            next_second()
            (tree / "etc" / "app.conf").write_text("setting = %d\n" % step)
        manifests.append(take(store, "files-job", FilesSource({"path": str(tree)}), key["recipients"])[0])
    env = {"STORE": str(store), "JOB": "files-job", "KEY": key["file"]}
    latest = run_blocks(["choose-latest"], env, str(tmp_path))
    assert latest.stdout.strip() == os.path.join(str(store), "files-job", manifests[-1]["id"])
    before = run_blocks(["choose-before"], dict(env, BEFORE=manifests[1]["finished_at"]), str(tmp_path))
    assert before.stdout.strip() == os.path.join(str(store), "files-job", manifests[1]["id"])
    none = run_blocks(["choose-before"], dict(env, BEFORE="2000-01-01T00:00:00Z"), str(tmp_path), check=False)
    assert none.returncode != 0 and "no backup finished at or before" in none.stderr

    checked = run_blocks(["choose-latest", "check-sha256"], env, str(tmp_path))
    assert checked.stdout.count("ok: ") == len(manifests[-1]["objects"])
    victim = os.path.join(str(store), "files-job", manifests[-1]["id"], manifests[-1]["objects"][0]["name"])
    with open(victim, "r+b") as handle:
        handle.seek(50)
        byte = handle.read(1)
        handle.seek(50)
        handle.write(bytes([byte[0] ^ 0x01]))
    damaged = run_blocks(["choose-latest", "check-sha256"], env, str(tmp_path), check=False)
    assert damaged.returncode == 1 and "MISMATCH: %s" % manifests[-1]["objects"][0]["name"] in damaged.stderr


def test_files_incremental_chain_with_stock_tools(tmp_path, key):
    tree = tmp_path / "tree"
    make_tree(tree, 3)
    store = tmp_path / "store"
    options = {"path": str(tree), "incremental": True}
    take(store, "chain", FilesSource(options), key["recipients"], key["identities"])
    next_second()
    (tree / "etc" / "conf.d" / "extra.conf").unlink()
    (tree / "new").mkdir()
    (tree / "new" / "file.txt").write_text("added\n")
    take(store, "chain", FilesSource(options), key["recipients"], key["identities"])
    next_second()
    (tree / "data.bin").write_bytes(b"rewritten")
    last = take(store, "chain", FilesSource(options), key["recipients"], key["identities"])[0]
    assert last["parent"] and last["stats"]["type"] == "incremental"
    restore_dir = tmp_path / "restored"
    env = {"STORE": str(store), "JOB": "chain", "KEY": key["file"], "RESTORE_DIR": str(restore_dir)}
    run_blocks(["choose-latest", "check-sha256", "files"], env, str(tmp_path))
    assert tree_state(str(restore_dir)) == tree_state(str(tree))
    assert not (restore_dir / "etc" / "conf.d" / "extra.conf").exists()


def test_passphrase_backup_key_is_opened_on_a_terminal(tmp_path):
    passphrase = "dr-" + uuid.uuid4().hex
    tree = tmp_path / "tree"
    make_tree(tree, 2)
    store = tmp_path / "store"
    backup_dir = take(store, "pass-job", FilesSource({"path": str(tree)}), {"passphrase": passphrase})[1]
    key_file = tmp_path / "recovered-identity.txt"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KEY": str(key_file), "BACKUP": backup_dir}
    output = _run_on_terminal(BLOCKS["passphrase-key"], env, passphrase)
    assert key_file.exists(), output
    restore_dir = tmp_path / "restored"
    run_blocks(["files"], {"KEY": str(key_file), "BACKUP": backup_dir, "RESTORE_DIR": str(restore_dir)},
               str(tmp_path))
    assert tree_state(str(restore_dir)) == tree_state(str(tree))


def _run_on_terminal(script, env, answer, timeout=120):
    """Run ``script`` with a pseudo-terminal (age reads passphrases from /dev/tty) and type ``answer``."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execve("/bin/bash", ["bash", "-e", "-c", script], env)
    output = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _unused, _unused2 = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            if not answered and b"passphrase" in output.lower():
                os.write(fd, answer.encode() + b"\n")
                answered = True
    finally:
        status = os.waitpid(pid, 0)[1]
        os.close(fd)
    assert answered, output
    assert os.waitstatus_to_exitcode(status) == 0, output
    return output.decode(errors="replace")


def test_postgres_with_stock_tools(tmp_path, key, postgres_server, postgres_database):
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("CREATE TABLE subjects (id bigserial PRIMARY KEY, template bytea, meta jsonb)")
        conn.execute("INSERT INTO subjects (template, meta) SELECT decode(md5(g::text), 'hex'), "
                     "jsonb_build_object('n', g) FROM generate_series(1, 777) g")
        conn.execute("CREATE SCHEMA audit; CREATE TABLE audit.log (line text)")
        conn.execute("INSERT INTO audit.log SELECT 'l' || g FROM generate_series(1, 12) g")
    source = PostgresSource({"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
                             "database": postgres_database.name, "bin_dir": postgres_server.bin_dir})
    store = tmp_path / "store"
    manifest = take(store, "pg-job", source, key["recipients"])[0]
    new_db = "dr_%s" % uuid.uuid4().hex[:10]
    env = {"STORE": str(store), "JOB": "pg-job", "KEY": key["file"], "NEW_DB": new_db,
           "PGHOST": postgres_server.host, "PGPORT": str(postgres_server.port), "PGUSER": postgres_server.user,
           "PATH": postgres_server.bin_dir + os.pathsep + os.environ["PATH"]}
    try:
        run_blocks(["choose-latest", "check-sha256", "postgres"], env, str(tmp_path))
        expected = manifest["stats"]["tables"]
        assert expected == {"public.subjects": 777, "audit.log": 12}
        for database in (postgres_database.name, new_db):
            with postgres_server.connect(database) as conn:
                counts = {"public.subjects": conn.execute("SELECT count(*) FROM public.subjects").fetchone()[0],
                          "audit.log": conn.execute("SELECT count(*) FROM audit.log").fetchone()[0]}
                digest = conn.execute("SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM subjects t").fetchone()[0]
            assert counts == expected
            if database == postgres_database.name:
                source_digest = digest
        assert digest == source_digest
    finally:
        postgres_server.drop_database(new_db)


def test_redis_with_stock_tools(tmp_path, key, redis_server):
    client = redis_server.client(0)
    client.flushall()
    client.set("subject:1", b"\x00\x01template")
    client.hset("subject:2", mapping={"finger": "3", "quality": "0.9"})
    client.rpush("queue", "a", "b", "c")
    client.set("session", "x", ex=3600)
    redis_server.client(3).set("other-db", "value")
    source = RedisSource({"host": redis_server.host, "port": redis_server.port})
    store = tmp_path / "store"
    manifest = take(store, "redis-job", source, key["recipients"])[0]
    assert manifest["stats"]["keys"] == {"db0": 4, "db3": 1}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    restore_dir = tmp_path / "redis-restore"
    env = {"STORE": str(store), "JOB": "redis-job", "KEY": key["file"], "RESTORE_DIR": str(restore_dir),
           "REDIS_PORT": str(port)}
    run_blocks(["choose-latest", "check-sha256", "redis"], env, str(tmp_path))
    restored = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if restored.ping():
                    break
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        assert restored.get("subject:1") == b"\x00\x01template"
        assert restored.hgetall("subject:2") == {b"finger": b"3", b"quality": b"0.9"}
        assert restored.lrange("queue", 0, -1) == [b"a", b"b", b"c"]
        assert 0 < restored.ttl("session") <= 3600
        assert restored.dbsize() == 4
        assert redis.Redis(host="127.0.0.1", port=port, db=3).get("other-db") == b"value"
    finally:
        try:
            restored.shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass


def test_config_git_with_stock_tools(tmp_path, key, git_remote):
    config = tmp_path / "config"
    config.mkdir()
    (config / "app.yaml").write_text("replicas: 3\n")
    (config / "feature.flags").write_text("beta=false\n")
    source = ConfigGitSource({"path": str(config), "repo": git_remote.url})
    store = tmp_path / "store"
    manifest = take(store, "cfg-job", source, key["recipients"])[0]
    restore_dir = tmp_path / "cfg-restore"
    env = {"STORE": str(store), "JOB": "cfg-job", "KEY": key["file"], "RESTORE_DIR": str(restore_dir)}
    run_blocks(["choose-latest", "check-sha256", "config-git"], env, str(tmp_path))
    head = subprocess.run(["git", "-C", str(restore_dir), "rev-parse", "HEAD"], stdout=subprocess.PIPE, text=True,
                          check=True).stdout.strip()
    assert head == manifest["stats"]["commit"]
    subdir = manifest["stats"].get("subdir") or "cfg-job"
    assert (restore_dir / subdir / "app.yaml").read_text() == "replicas: 3\n"


def _manifest_time(moment):
    """A time written like the manifests' (UTC, ``Z``), with microseconds."""
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_postgres_point_in_time_with_stock_tools(pg, key):
    """The PITR walkthrough on a real WAL stream (a segment switch, a stream restart, a partial
    copy) and base backup: the recovered server holds exactly the batches committed before the
    target, and a damaged WAL object stops the recovery with the file named."""
    owner = pwd.getpwuid(os.stat(pg.data_dir).st_uid)  # the account running PostgreSQL: pg_ctl refuses root
    work = tempfile.mkdtemp(prefix="bb-dr-pitr-")  # short: the private server's socket lives below it
    recovered = []
    try:
        os.chmod(work, 0o755)
        storage = open_storage({"backend": "filesystem", "path": os.path.join(work, "store")})
        streamer = _streamer(pg, storage, os.path.join(work, "spool"), key["recipients"])
        streamer.prepare()
        _insert(pg, 0)
        _base_backup(pg, storage, key["recipients"])
        next_second()  # manifests record whole seconds: the targets lie after the base backup's
        marks = {}
        for batch in range(1, 6):
            time.sleep(0.3)
            marks[batch] = _insert(pg, batch)
            if batch == 2:
                _lsn(pg, switch=True)  # batch 3 on lands in a new segment
            if batch == 3:
                streamer.run(end_lsn=_lsn(pg))
                streamer = _streamer(pg, storage, os.path.join(work, "spool"), key["recipients"])
        result = streamer.run(end_lsn=_lsn(pg))
        assert result["gaps"] == [] and result["partials_stored"] >= 1  # batches 4 and 5: a partial copy only
        with open(key["file"], encoding="utf-8") as handle:
            identity = handle.read()
        with open(os.path.join(work, "age-identity.txt"), "w", encoding="utf-8") as handle:
            handle.write(identity)
        subprocess.run(["chown", "-R", "%d:%d" % (owner.pw_uid, owner.pw_gid), work], check=True)
        os.chmod(os.path.join(work, "age-identity.txt"), 0o600)
        env = {"STORE": os.path.join(work, "store"), "JOB": PITR_JOB, "WAL_JOB": PITR_WAL_JOB,
               "KEY": os.path.join(work, "age-identity.txt"), "RECOVERY_PORT": "54329",
               "PATH": pg.bin_dir + os.pathsep + os.environ["PATH"]}

        def recover(name, after, before, check=True):
            target = _manifest_time(marks[after] + (marks[before] - marks[after]) / 2)
            recovery_dir = os.path.join(work, name)
            recovered.append(recovery_dir)
            run_env = dict(env, TARGET=target, BEFORE=target, RECOVERY_DIR=recovery_dir)
            done = run_blocks(["choose-before", "check-sha256", "pitr-unpack", "pitr-fetch-wal", "pitr-recover"],
                              run_env, work, check=False, user=owner)
            if check and done.returncode != 0:
                log = os.path.join(recovery_dir, "postgres.log")
                with open(log if os.path.exists(log) else os.devnull, encoding="utf-8") as handle:
                    pytest.fail("the walkthrough failed:\n%s\n%s\npostgres.log:\n%s" % (
                        done.stdout[-2000:], done.stderr[-2000:], handle.read()[-3000:]))
            return done, run_env

        # Across the segment switch, from completed segments.
        done, run_env = recover("r1", 2, 3)
        assert "recovery stopping before commit" in done.stdout
        assert _recovered_batches(run_env) == {0: 50, 1: 50, 2: 50}
        run_blocks(["pitr-stop"], run_env, work, user=owner)
        # After the stream restart, from the partial copy of the segment in progress.
        done, run_env = recover("r2", 4, 5)
        assert _recovered_batches(run_env) == {0: 50, 1: 50, 2: 50, 3: 50, 4: 50}
        run_blocks(["pitr-stop"], run_env, work, user=owner)
        # One flipped byte in a WAL object the recovery needs: it stops with the file named.
        state = WalState.load(storage, PITR_WAL_JOB)
        victim = state.segments[max(state.segments)]
        obj = victim["objects"][0]
        path = os.path.join(work, "store", PITR_WAL_JOB, victim["id"], obj["name"])
        with open(path, "r+b") as handle:
            handle.seek(obj["size"] // 2)
            byte = handle.read(1)
            handle.seek(obj["size"] // 2)
            handle.write(bytes([byte[0] ^ 0x01]))
        done, run_env = recover("r3", 4, 5, check=False)
        assert done.returncode != 0
        with open(os.path.join(run_env["RECOVERY_DIR"], "postgres.log"), encoding="utf-8") as handle:
            log = handle.read()
        assert "fetch-wal: %s: SHA-256 mismatch" % victim["stats"]["file"] in log, log[-3000:]
    finally:
        for recovery_dir in recovered:
            if os.path.exists(os.path.join(recovery_dir, "data", "postmaster.pid")):
                subprocess.run([os.path.join(pg.bin_dir, "pg_ctl"), "-D", os.path.join(recovery_dir, "data"),
                                "-m", "immediate", "stop"], user=owner.pw_uid, group=owner.pw_gid, extra_groups=[],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work, check=False)
        shutil.rmtree(work, ignore_errors=True)


def _recovered_batches(env):
    with psycopg.connect(host=env["RECOVERY_DIR"], port=env["RECOVERY_PORT"], user="postgres", dbname=DB) as conn:
        return dict(conn.execute("SELECT batch, count(*) FROM enrolments GROUP BY batch ORDER BY batch").fetchall())
