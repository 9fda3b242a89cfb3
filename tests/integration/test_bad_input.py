# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Bad input, field by field: every module and the runner's job file, with wrong types and
values for every field the engine declares (engine/schema.py), against real servers.

Each case must fail with one clear line naming the field, with no traceback, and nothing
may change: the storage tree, the source tree, the PostgreSQL server's databases, the Redis
keys and the git remote are compared before and after. The fields come from the schemas
themselves, so a field added to a kind is tested here without editing this file.

The modules run in-process (``patch_module_args``, as ansible-core's own unit tests run
modules): hundreds of cases cost seconds, and an exception escaping a module's ``main``
would fail the test instead of hiding in a subprocess. A few cases also go through a real
``ansible-playbook`` run to show what a user sees there.
"""

import contextlib
import importlib
import io
import json
import os

import pytest
import yaml
from ansible.module_utils.testing import patch_module_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs, jobconfig, kinds, runner
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage import location

from modules_helpers import ansible_playbook
from restore_helpers import tree_state

MODULES = "ansible_collections.biometrics.backup.plugins.modules."


# -- wrong values, by field type ----------------------------------------------------------

def wrong_values(field):
    """Deterministic wrong values for ``field``: other types, empty, out of bounds, off the enum."""
    values = {
        "bool": ["no thanks", "maybe", "", 2, -1, 0.5, ["yes"], {"on": True}],
        "int": ["five", "", 1.5, True, [1], {"n": 1}],
        "number": ["soon", "", True, [1], {"n": 1}],
        "enum": ["no-such-choice", "", 3, True, ["x"]],
        "str": [True, [1], {"k": "v"}],
        "path": [True, ["/x"], {"k": "v"}, ""],
        "list": [5, True, {"k": "v"}, [1, 2]],
        "dict": ["k=v", 5, ["a"], True],
        "any": [],
    }[field.type]
    if field.type == "int":
        if field.minimum is not None:
            values.append(field.minimum - 1)
        if field.maximum is not None:
            values.append(field.maximum + 1)
    if field.type == "number":
        if field.exclusive_minimum is not None:
            values.append(field.exclusive_minimum)
        if field.maximum is not None:
            values.append(field.maximum * 2 + 1)
    if field.type == "str" and field.nonempty:
        values.append("")
    if field.type == "path" and field.absolute:
        values.append("relative/dir")
    if field.secret:
        values = [True, [1], {"k": "v"}]
    return values


def wrong_value_strategy(field):
    """Random wrong values: any value the field's parser must refuse (checked by the caller)."""
    anything = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                         st.booleans(), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    return anything


def refused(field, value):
    try:
        field.parse(value, "x")
    except ConfigError:
        return True
    return False


def cases(schema, section):
    """(section, field name, wrong value) for every field of ``schema``, and its secret spellings."""
    found = []
    for name, field in schema.fields.items():
        for value in wrong_values(field):
            found.append((section, name, value))
        if field.secret:
            found.append((section, name + "_env", "not a variable name"))
            found.append((section, name + "_file", 5))
    found.append((section, "no_such_option", "x"))
    return found


# -- the real world that must not change ----------------------------------------------------

@pytest.fixture
def world(tmp_path, postgres_server, redis_server, git_remote):
    """Real servers and trees, a valid base job file per kind, and a snapshot of everything."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "sub" / "b.bin").write_bytes(os.urandom(4096))
    storage = tmp_path / "backups"
    storage.mkdir()
    identity = x25519.Identity.generate()
    (tmp_path / "recipients").write_text("%s\n" % identity.to_public())
    (tmp_path / "identity").write_text("%s\n" % identity)
    pg_database = postgres_server.create_database(prefix="badinput")
    redis_client = redis_server.client(0)
    redis_client.set("bad-input-marker", "kept")
    sources = {
        "postgres": {"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
                     "database": pg_database.name},
        "postgres_base": {"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
                          "spool_dir": str(tmp_path / "wal-spool")},
        "redis": {"host": redis_server.host, "port": redis_server.port},
        "files": {"path": str(data)},
        "directory_sync": {"path": str(data), "destination": str(tmp_path / "mirror")},
        "config_git": {"path": str(data), "repo": git_remote.url},
        "k8s_resources": {"namespaces": ["default"], "kubeconfig": str(tmp_path / "no-kubeconfig")},
        "velero": {"include_namespaces": ["default"], "kubeconfig": str(tmp_path / "no-kubeconfig")},
    }
    targets = {
        "postgres": {"host": postgres_server.host, "port": postgres_server.port, "user": postgres_server.user,
                     "database": pg_database.name},
        "redis": {"host": redis_server.host, "port": redis_server.port},
        "files": {"path": str(tmp_path / "restored")},
        "directory_sync": {"path": str(tmp_path / "restored")},
        "config_git": {"path": str(tmp_path / "restored")},
        "k8s_resources": {"kubeconfig": str(tmp_path / "no-kubeconfig")},
    }

    def snapshot():
        with postgres_server.connect() as conn:
            databases = sorted(row[0] for row in conn.execute("SELECT datname FROM pg_database"))
        return {"storage": tree_state(str(storage)), "data": tree_state(str(data)),
                "mirror": tree_state(str(tmp_path / "mirror")), "restored": tree_state(str(tmp_path / "restored")),
                "databases": databases, "redis": sorted(redis_client.keys("*")),
                "redis_marker": redis_client.get("bad-input-marker"), "git": git_remote.refs()}

    world = {"tmp": tmp_path, "storage": str(storage), "sources": sources, "targets": targets,
             "recipients_file": str(tmp_path / "recipients"), "identity_file": str(tmp_path / "identity"),
             "snapshot": snapshot}
    world["before"] = snapshot()
    yield world
    postgres_server.drop_database(pg_database.name)
    redis_client.delete("bad-input-marker")


def assert_nothing_changed(world):
    assert world["snapshot"]() == world["before"], "bad input changed something"


# -- the runner's job file ------------------------------------------------------------------

def base_job(world, kind):
    job = {
        "job": "bad-input-%s" % kind.replace("_", "-"), "kind": kind,
        "source": dict(world["sources"][kind]),
        "storage": {"backend": "filesystem", "path": world["storage"]},
        "compression": {"algorithm": "zstd", "level": 3},
        "encryption": {"recipients_file": world["recipients_file"], "identity_file": world["identity_file"]},
        "retention": {"keep_daily": 7},
        "metrics": {"enabled": False, "pushgateway_url": "http://127.0.0.1:9"},
        "verify": {"backup": "latest"},
    }
    if kind in world["targets"]:
        job["restore"] = {"target": dict(world["targets"][kind])}
    return job


def job_cases(kind):
    source_schema = kinds.source_class(kind).SCHEMA
    found = cases(source_schema, "source") + cases(location.SCHEMA, "storage")
    found += cases(codecs.SCHEMA, "compression") + cases(jobconfig.ENCRYPTION, "encryption")
    found += cases(jobconfig.RETENTION, "retention") + cases(jobconfig.METRICS, "metrics")
    found += cases(jobconfig.VERIFY, "verify")
    target_class = kinds.TARGETS.get(kind)
    if target_class is not None:
        found += cases(target_class.SCHEMA, "restore.target")
    return found


def run_runner(world, job, command):
    path = world["tmp"] / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = runner.main([command, "--config", str(path)])
    return code, out.getvalue(), err.getvalue()


def put(job, section, key, value):
    node = job
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value


def expected_names(section, key):
    """What the message must name: the field (a secret's _file/_env spelling names the secret)."""
    if key == "no_such_option":
        return ["%s: unknown option(s) no_such_option" % section]
    return ["%s.%s" % (section, key)]


@pytest.mark.parametrize("kind", sorted(kinds.SOURCES))
def test_runner_refuses_every_wrong_field_with_one_line_and_changes_nothing(world, kind):
    counted = 0
    for section, key, value in job_cases(kind):
        job = base_job(world, kind)
        put(job, section, key, value)
        command = "restore" if section == "restore.target" else "backup"
        code, out, err = run_runner(world, job, command)
        lines = err.strip().splitlines()
        where = "%s %s=%r" % (section, key, value)
        assert code == runner.EXIT_CONFIG, (where, code, err)
        assert len(lines) == 1 and "Traceback" not in err and out == "", (where, err, out)
        assert any(name in lines[0] for name in expected_names(section, key)), (where, lines[0])
        counted += 1
    assert_nothing_changed(world)
    assert counted >= 60, counted  # every field of every section was exercised


def test_runner_refuses_literal_secrets_before_reading_them(world):
    for section, key in (("source", "password"), ("storage", "secret_key"), ("encryption", "identity"),
                         ("metrics", "password"), ("restore.target", "password")):
        job = base_job(world, "postgres")
        put(job, section, key, "hunter2-%s" % key)
        code, out, err = run_runner(world, job, "backup")
        assert code == runner.EXIT_CONFIG and "%s.%s: secrets must not be written" % (section, key) in err
        assert "hunter2" not in err + out
    assert_nothing_changed(world)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_runner_refuses_random_wrong_values(world, data):
    kind = data.draw(st.sampled_from(sorted(kinds.SOURCES)))
    schema = kinds.source_class(kind).SCHEMA
    key = data.draw(st.sampled_from(sorted(k for k, f in schema.fields.items() if f.type != "any")))
    field = schema.fields[key]
    value = data.draw(wrong_value_strategy(field).filter(lambda v: refused(field, v)))
    job = base_job(world, kind)
    job["source"][key] = value
    code, out, err = run_runner(world, job, "backup")
    assert code == runner.EXIT_CONFIG and len(err.strip().splitlines()) == 1, (key, value, err)
    assert "source.%s" % key in err, (key, value, err)
    assert_nothing_changed(world)


# -- the modules, in-process ------------------------------------------------------------------

def run_module(name, args, check_mode=False):
    """``main()`` of one module with ``args``; returns its JSON result (``failed`` set on fail_json)."""
    module = importlib.import_module(MODULES + name)
    if check_mode:
        args = dict(args, _ansible_check_mode=True)
    out = io.StringIO()
    with patch_module_args(args), contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main()
    return json.loads(out.getvalue())


def storage_option(world):
    return {"backend": "filesystem", "path": world["storage"]}


def module_cases(world):
    """(module, args, section, key) for every field of every dict option of every module."""
    found = []
    encryption = {"recipients_file": world["recipients_file"]}
    reading = {"identity_file": world["identity_file"]}
    for kind in sorted(kinds.SOURCES):
        base = {"job": "bad-input", "kind": kind, "source": dict(world["sources"][kind]),
                "storage": storage_option(world), "encryption": encryption}
        for section, key, value in cases(kinds.source_class(kind).SCHEMA, "source"):
            args = json.loads(json.dumps(base))
            args["source"][key] = value
            found.append(("backup_run", args, section, key))
    for kind, target_class in sorted(kinds.TARGETS.items()):
        base = {"job": "bad-input", "kind": kind, "target": dict(world["targets"][kind]),
                "storage": storage_option(world), "encryption": reading}
        for section, key, value in cases(target_class.SCHEMA, "target"):
            args = json.loads(json.dumps(base))
            args["target"][key] = value
            found.append(("backup_restore", args, section, key))
    # storage: Ansible's sub-option types catch wrong types; the engine the bounds and shapes.
    for module, extra in (("backup_info", {}), ("backup_verify", {"encryption": reading}),
                          ("backup_prune", {"keep_daily": 7}),
                          ("backup_run", {"kind": "files", "source": dict(world["sources"]["files"]),
                                          "encryption": encryption}),
                          ("backup_restore", {"kind": "files", "target": dict(world["targets"]["files"]),
                                              "encryption": reading})):
        for key, value in (("part_size", 0), ("part_size", "16M"), ("max_attempts", 0), ("backend", "ftp"),
                           ("verify_tls", "no thanks"), ("path", "relative/dir"), ("endpoint_url", "s3.local")):
            storage = dict(storage_option(world), **{key: value})
            if key in ("part_size", "max_attempts", "endpoint_url"):
                storage = {"backend": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:9", key: value}
            found.append((module, dict({"job": "bad-input", "storage": storage}, **extra), "storage", key))
    compression_cases = [("threads", 100000), ("threads", "many"), ("level", 42), ("algorithm", "bzip2")]
    for key, value in compression_cases:
        found.append(("backup_run", {"job": "bad-input", "kind": "files", "source": dict(world["sources"]["files"]),
                                     "storage": storage_option(world), "encryption": encryption,
                                     "compression": {key: value}}, "compression", key))
    for key, value in (("keep_daily", -2), ("keep_daily", "seven"), ("min_keep", -1), ("max_delete", -3),
                       ("force", "no thanks"), ("semantics", "tarsnap"), ("orphan_grace", "soon")):
        args = {"job": "bad-input", "storage": storage_option(world), "keep_daily": 7}
        args[key] = value
        found.append(("backup_prune", args, "retention", key))
    return found


def test_modules_refuse_every_wrong_field_with_one_line_and_change_nothing(world):
    counted = 0
    for module, args, section, key in module_cases(world):
        for check_mode in (False, True):
            result = run_module(module, args, check_mode=check_mode)
            where = "%s %s.%s=%r" % (module, section, key, args.get(section, args).get(key) if isinstance(
                args.get(section), dict) else args.get(key))
            assert result.get("failed") is True, (where, result)
            message = result["msg"]
            assert "\n" not in message.strip() and "Traceback" not in message, (where, message)
            assert key in message, (where, message)
            assert "exception" not in result or "MissingDependencyError" in result.get("error", ""), (where, result)
            assert result.get("changed") in (None, False), (where, result)
            counted += 1
    assert_nothing_changed(world)
    assert counted >= 300, counted


def test_backup_selectors_that_would_be_misread_are_refused(world):
    # `backup: ""` would mean latest, a point_in_time in the future would restore the newest.
    files = {"kind": "files", "target": dict(world["targets"]["files"]),
             "storage": storage_option(world), "encryption": {"identity_file": world["identity_file"]}}
    for module, args, message in (
            ("backup_restore", dict(files, job="bad-input", backup=""), "backup must be a backup id"),
            ("backup_verify", {"job": "bad-input", "storage": storage_option(world), "backup": ""},
             "backup must be a backup id"),
            ("backup_restore", dict(files, job="bad-input", point_in_time="2999-01-01T00:00:00Z"),
             "point_in_time 2999-01-01T00:00:00Z is in the future"),
            ("backup_restore", dict(files, job="bad-input", point_in_time="yesterday"),
             "point_in_time 'yesterday' is not an ISO-8601 time"),
            ("backup_restore", dict(files, job="bad-input", backup="2999-01-01T00:00:00Z"),
             "backup 2999-01-01T00:00:00Z is in the future")):
        result = run_module(module, args)
        assert result.get("failed") is True and message in result["msg"], (args, result)
    assert_nothing_changed(world)


def test_a_user_sees_one_clear_line_through_ansible_playbook(world, tmp_path):
    tasks = [
        {"name": "swap n", "biometrics.backup.backup_restore": {
            "job": "bad-input", "kind": "postgres", "storage": storage_option(world),
            "target": dict(world["targets"]["postgres"], swap=True, drop_old="no thanks")},
         "ignore_errors": True},
        {"name": "threads", "biometrics.backup.backup_run": {
            "job": "bad-input", "kind": "files", "source": dict(world["sources"]["files"], incremental="perhaps"),
            "storage": storage_option(world), "encryption": {"recipients_file": world["recipients_file"]}},
         "ignore_errors": True},
    ]
    proc, results = ansible_playbook(tmp_path, tasks)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert results["swap n"]["failed"] and results["swap n"]["msg"].startswith(
        "target.drop_old must be a boolean (true/false, yes/no, on/off, 1/0), got 'no thanks'")
    assert results["threads"]["failed"] and results["threads"]["msg"].startswith(
        "source.incremental must be a boolean")
    assert_nothing_changed(world)
