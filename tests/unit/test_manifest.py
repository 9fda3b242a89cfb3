"""engine/manifest: what a backup is, and what a manifest may never hold."""

import copy
import json
import pickle

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import manifest as mf
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError, IntegrityError

SHA = "ab" * 32


def sample(**overrides):
    args = dict(
        backup_id="20240115T020304Z-0a1b2c", job="pg-main", kind="postgres",
        started_at="2024-01-15T02:03:04Z", finished_at="2024-01-15T02:05:00Z",
        objects=[{"name": "dump.pgdump.zst.age", "payload": "dump.pgdump", "size": 1000, "sha256": SHA},
                 {"name": "globals.sql.zst.age", "payload": "globals.sql", "size": 24, "sha256": "cd" * 32}],
        compression={"algorithm": "zstd", "level": 3},
        encryption={"mode": "age", "recipients": ["age1qqq"]},
        tool_versions={"pg_dump": "15.5"},
        stats={"tables": {"public.users": 10}},
        parent=None, source={"host": "db", "dbname": "app", "password_file": "/run/secrets/pg"},
    )
    args.update(overrides)
    return mf.build(**args)


def test_build_holds_every_required_field_and_round_trips():
    manifest = sample()
    for field in ("schema", "id", "job", "kind", "status", "started_at", "finished_at", "objects",
                  "compression", "encryption", "tool_versions", "parent", "stats"):
        assert field in manifest
    assert manifest["status"] == mf.STATUS_COMPLETE
    assert manifest["size_bytes"] == 1024
    data = mf.dumps(manifest)
    assert data.endswith(b"\n")
    assert mf.loads(data) == manifest
    assert mf.loads(data.decode()) == manifest


def test_dumps_is_deterministic():
    assert mf.dumps(sample()) == mf.dumps(json.loads(mf.dumps(sample())))


def test_extra_fields_are_merged():
    manifest = sample(extra={"duration_seconds": 1.5, "raw_bytes": 4096})
    assert manifest["duration_seconds"] == 1.5 and manifest["raw_bytes"] == 4096


def test_keys_and_layout():
    assert mf.object_key("job", "20240115T020304Z-0a1b2c", mf.MANIFEST_NAME) == "job/20240115T020304Z-0a1b2c/manifest.json"
    assert mf.backup_dir("job", "x") == "job/x"


@pytest.mark.parametrize("where, fields", [
    ("source", {"source": {"host": "db", "password": "hunter2"}}),
    ("source", {"source": {"Auth": {"DB_PASSWORD": "hunter2"}}}),
    ("source", {"source": {"secret_key": "abc"}}),
    ("source", {"source": {"token": "abc"}}),
    ("source", {"source": {"identity": "AGE-SECRET-KEY-1XYZ"}}),
    ("source", {"source": {"privateKey": "-----BEGIN"}}),
    ("source", {"source": {"passphrase": b"bytes too"}}),
    ("source", {"source": {"hosts": [{"name": "a", "password": "x"}]}}),
    ("source", {"source": {"tokens": ["t1", "t2"]}}),
    ("stats", {"stats": {"secret": "oops"}}),
    ("extra", {"extra": {"keySecret": "backup-encryption-key"}}),
])
def test_secret_looking_text_is_refused_naming_the_field(where, fields):
    with pytest.raises(ConfigError, match="secret-looking field"):
        sample(**fields)


def test_the_refusal_names_the_path():
    with pytest.raises(ConfigError, match=r"manifest\.source\.hosts\[1\]\.password"):
        sample(source={"hosts": [{"name": "a"}, {"name": "b", "password": "x"}]})


@pytest.mark.parametrize("fields", [
    # Counts keyed by names that merely contain a secret-looking word are data, not secrets.
    {"stats": {"tables": {"public.password_resets": 12, "public.user_tokens": 3, "private_notes": 0}}},
    {"stats": {"kinds": {"secret": 4, "configmap": 2}}},
    {"stats": {"secret": {"ns1": 2, "ns2": 0}}},
    # References to where a secret lives are fine.
    {"source": {"password_file": "/run/secrets/pg", "secret_key_file": "/run/s3", "token_env": "TOKEN",
                "passphrase_ref": "vault:x"}},
    # Empty or missing values hold nothing.
    {"source": {"password": None, "token": "", "secrets_exported": True}},
])
def test_harmless_fields_with_secret_words_pass(fields):
    manifest = sample(**fields)
    assert mf.loads(mf.dumps(manifest)) == manifest


def test_loads_rejects_non_json_and_non_objects():
    with pytest.raises(IntegrityError, match="where/manifest.json is not valid JSON"):
        mf.loads(b"{nope", "where/manifest.json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        mf.loads(b"\xff\xfe")
    with pytest.raises(IntegrityError, match="not a JSON object"):
        mf.loads(b"[1, 2]")


@pytest.mark.parametrize("field", ["schema", "id", "job", "kind", "status", "started_at", "finished_at",
                                   "objects", "compression", "encryption", "tool_versions", "parent", "stats"])
def test_loads_names_a_missing_required_field(field):
    manifest = sample()
    del manifest[field]
    with pytest.raises(IntegrityError, match="lacks required fields: %s" % field):
        mf.loads(json.dumps(manifest))


def test_loads_rejects_other_schema_versions_and_bad_times():
    with pytest.raises(IntegrityError, match="unsupported schema 2"):
        mf.loads(json.dumps(dict(sample(), schema=2)))
    with pytest.raises(IntegrityError, match="invalid finished_at: 'soon'"):
        mf.loads(json.dumps(dict(sample(), finished_at="soon")))


@pytest.mark.parametrize("objects", [
    [],
    "dump",
    [{"name": "/etc/passwd", "size": 1, "sha256": SHA}],
    [{"name": "../other/dump", "size": 1, "sha256": SHA}],
    [{"name": "a/../../b", "size": 1, "sha256": SHA}],
    [{"name": "", "size": 1, "sha256": SHA}],
    [{"name": "dump", "size": -1, "sha256": SHA}],
    [{"name": "dump", "size": "1", "sha256": SHA}],
    [{"name": "dump", "size": 1, "sha256": "AB" * 32}],
    [{"name": "dump", "size": 1, "sha256": "ab" * 31}],
    [{"name": "dump", "size": 1}],
    ["dump"],
])
def test_loads_rejects_malformed_object_lists(objects):
    with pytest.raises(IntegrityError, match="no stored objects|malformed object entry"):
        mf.loads(json.dumps(dict(sample(), objects=objects)))


def test_validate_checks_a_parsed_manifest_as_loads_does():
    assert mf.validate(sample()) == sample()
    with pytest.raises(IntegrityError, match="index entry lacks required fields"):
        mf.validate({"id": "x"}, "index entry")
    with pytest.raises(IntegrityError, match="not a JSON object"):
        mf.validate("manifest text")


@pytest.mark.parametrize("job", ["pg-main", "a", "redis.cache_1", "x" * 63, "0job9"])
def test_valid_job_names(job):
    assert mf.validate_job_name(job) == job


@pytest.mark.parametrize("job", ["", "-x", "x-", "UPPER", "with/slash", "..", "x" * 64, "sp ace", None, 5])
def test_invalid_job_names_are_config_errors(job):
    with pytest.raises(ConfigError, match="invalid job name"):
        mf.validate_job_name(job)


def test_a_manifest_reads_its_fields_as_properties_and_stays_the_json_it_came_from():
    built = sample()
    loaded = mf.loads(mf.dumps(built))
    for manifest in (built, loaded):
        assert isinstance(manifest, mf.Manifest) and all(isinstance(o, mf.StoredObject) for o in manifest["objects"])
        assert (manifest.id, manifest.job, manifest.kind) == ("20240115T020304Z-0a1b2c", "pg-main", "postgres")
        assert manifest.is_complete and manifest.parent is None and manifest.size_bytes == 1024
        assert manifest.stats == {"tables": {"public.users": 10}}
        assert manifest.encryption == {"mode": "age", "recipients": ["age1qqq"]}
        assert manifest.verification is None and manifest.verification_result is None
        assert [(o.name, o.size, o.sha256, o.payload) for o in manifest.objects] == [
            ("dump.pgdump.zst.age", 1000, SHA, "dump.pgdump"), ("globals.sql.zst.age", 24, "cd" * 32, "globals.sql")]
        assert manifest.compression_algorithm == "zstd" and manifest.encryption_mode == "age"
        assert manifest.source == {"host": "db", "dbname": "app", "password_file": "/run/secrets/pg"}
        assert manifest.payload_object("globals.sql").name == "globals.sql.zst.age"
        assert manifest.object_named("dump.pgdump.zst.age").payload == "dump.pgdump"
        assert manifest.payload_object("nope") is None and manifest.object_named("nope") is None
        assert manifest.objects[0].raw_bytes is None and manifest.objects[0].restic_snapshot is None
    # Equal to, and serialised exactly like, the plain JSON: the index cache and the
    # re-read check of a restore compare manifests with what storage holds.
    plain = json.loads(mf.dumps(built))
    assert built == plain and loaded == plain and mf.dumps(loaded) == mf.dumps(plain)
    assert json.dumps(loaded, sort_keys=True) == json.dumps(plain, sort_keys=True)
    assert not isinstance(loaded.to_dict(), mf.Manifest) and not isinstance(loaded.to_dict()["objects"][0], mf.StoredObject)
    assert copy.deepcopy(loaded) == plain and isinstance(copy.deepcopy(loaded), mf.Manifest)
    assert isinstance(loaded.copy(), mf.Manifest) and pickle.loads(pickle.dumps(loaded)) == plain


def test_validate_returns_a_typed_copy_and_leaves_its_argument_alone():
    plain = json.loads(mf.dumps(sample()))
    typed = mf.validate(plain)
    assert not isinstance(plain, mf.Manifest) and not isinstance(plain["objects"][0], mf.StoredObject)
    assert isinstance(typed.objects[0], mf.StoredObject) and typed == plain


def test_copies_keep_the_type_and_never_change_the_original():
    manifest = sample()
    listed = manifest.with_fields(verification={"result": "ok", "verified_at": "2024-01-16T00:00:00Z"})
    assert isinstance(listed, mf.Manifest) and "verification" not in manifest
    assert listed.verification_result == "ok"
    assert listed.without("verification") == manifest and isinstance(listed.without("verification"), mf.Manifest)


@pytest.mark.parametrize("value", [None, "ok", ["ok"], 3])
def test_fields_of_the_wrong_type_read_as_absent(value):
    # validate() does not check these types and verification.json may hold any JSON.
    manifest = mf.Manifest.wrap(dict(sample(), stats=value, encryption=value, compression=value, source=value,
                                     verification=value, restic=value, tool_versions=value, copied_from=value))
    assert manifest.stats == {} and manifest.encryption == {} and manifest.source == {}
    assert manifest.restic == {} and manifest.tool_versions == {} and manifest.copied_from == {}
    assert manifest.encryption_mode is None and manifest.compression_algorithm is None
    assert manifest.verification is None and manifest.verification_result is None


def test_wrap_never_validates_and_required_fields_read_strictly():
    partial = mf.Manifest.wrap({"id": "x", "stats": {"database": "app"}})
    assert partial.id == "x" and partial.stats == {"database": "app"} and partial.objects == []
    assert partial.parent is None and partial.status is None and not partial.is_complete
    with pytest.raises(KeyError):
        partial.job  # pylint: disable=pointless-statement
    assert mf.Manifest.wrap(partial) is partial


def test_no_property_hides_a_dict_method():
    for cls in (mf.Manifest, mf.StoredObject):
        own = {name for name, value in vars(cls).items() if isinstance(value, property)}
        assert own and not own & set(dir(dict)), own
