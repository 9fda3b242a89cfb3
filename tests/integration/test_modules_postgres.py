# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The modules on the postgres kind, by real ansible-playbook against real PostgreSQL 15:
backup, scratch verification, check-mode restore (no database created), restore with swap,
and passwords given as plain module values never appearing in -vvv output.
"""

import json
import uuid

import pytest

from modules_helpers import ansible_playbook

FQCN = "biometrics.backup."


@pytest.fixture
def app_db(postgres_server, postgres_database):
    with postgres_server.connect(postgres_database.name) as conn:
        conn.execute("CREATE TABLE subjects (id int PRIMARY KEY, template bytea, meta jsonb)")
        conn.execute("INSERT INTO subjects SELECT g, decode(md5(g::text), 'hex'), jsonb_build_object('g', g) "
                     "FROM generate_series(1, 250) g")
    return postgres_database.name


def databases(server):
    with server.connect() as conn:
        return sorted(row[0] for row in conn.execute("SELECT datname FROM pg_database").fetchall())


def test_postgres_modules_end_to_end_without_leaking_passwords(tmp_path, postgres_server, app_db):
    password = "pw-" + uuid.uuid4().hex
    passphrase = "pp-" + uuid.uuid4().hex
    connection = {"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
                  "password": password, "bin_dir": postgres_server.bin_dir}
    storage = {"backend": "filesystem", "path": str(tmp_path / "store")}
    target_db = "restored_%s" % uuid.uuid4().hex[:8]
    before = databases(postgres_server)
    tasks = [
        {"name": "backup", FQCN + "backup_run": {
            "job": "app-db", "kind": "postgres", "source": dict(connection, database=app_db), "storage": storage,
            "encryption": {"passphrase": passphrase}}},
        {"name": "verify", FQCN + "backup_verify": {
            "job": "app-db", "test_restore": True, "scratch": dict(connection, database=app_db),
            "storage": storage, "encryption": {"passphrase": passphrase}}},
        {"name": "restore plan", "check_mode": True, FQCN + "backup_restore": {
            "job": "app-db", "target": dict(connection, database=target_db), "storage": storage,
            "encryption": {"passphrase": passphrase}}},
    ]
    proc, results = ansible_playbook(tmp_path, tasks, verbosity=3)
    assert proc.returncode == 0, proc.stdout[-3000:]
    manifest = results["backup"]["manifest"]
    assert manifest["stats"]["tables"] == {"public.subjects": 250}
    verified = results["verify"]
    rows = [c for c in verified["results"][0]["checks"] if c["what"] == "rows public.subjects"]
    assert rows and rows[0]["ok"] and rows[0]["actual"] == 250
    assert results["restore plan"]["check_mode"] and results["restore plan"]["verification"]["objects"] >= 2
    assert databases(postgres_server) == before  # scratch dropped, check mode created nothing
    args = results["backup"]["invocation"]["module_args"]
    assert args["source"]["password"] != password and args["encryption"]["passphrase"] != passphrase
    for secret in (password, passphrase):
        assert secret not in proc.stdout and secret not in proc.stderr

    restore = [
        {"name": "restore", "register": "restored", FQCN + "backup_restore": {
            "job": "app-db", "target": dict(connection, database=target_db, swap=True), "storage": storage,
            "encryption": {"passphrase": passphrase}}},
        {"name": "keep the result", "ansible.builtin.copy": {
            "content": "{{ restored | ansible.builtin.to_json }}", "dest": str(tmp_path / "restored.json"),
            "mode": "0600"}},
    ]
    try:
        proc, results = ansible_playbook(tmp_path, restore, verbosity=3, diff=True, callback="default")
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert "rows public.subjects" in proc.stdout
        for secret in (password, passphrase):
            assert secret not in proc.stdout and secret not in proc.stderr
        with postgres_server.connect(target_db) as conn:
            assert conn.execute("SELECT count(*) FROM subjects").fetchone()[0] == 250
        restored = json.loads((tmp_path / "restored.json").read_text())
        phases = restored["phases"]
        assert set(phases) == {"select", "verify", "prepare", "transfer", "load", "checks", "total"}
        assert all(value >= 0 for value in phases.values()), phases
        assert sum(value for name, value in phases.items() if name != "total") <= phases["total"] + 1e-9, phases
        assert phases["verify"] > 0 and phases["transfer"] > 0 and phases["checks"] > 0, phases
        assert phases["total"] == restored["duration_seconds"]
    finally:
        for name in databases(postgres_server):
            if name.startswith(target_db):
                postgres_server.drop_database(name)
