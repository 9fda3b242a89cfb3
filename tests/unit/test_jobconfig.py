# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner's job file: every mistake is reported clearly before anything runs."""

import json

import pytest
from pyrage import x25519

from ansible_collections.biometrics.backup.plugins.module_utils.engine import kinds
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import JobConfig
from ansible_collections.biometrics.backup.plugins.module_utils.engine.retention import Policy
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.filesystem import FilesystemStorage

RECIPIENT = str(x25519.Identity.generate().to_public())


def base(**changes):
    data = {"job": "app-files", "kind": "files", "source": {"path": "/srv/data"},
            "storage": {"backend": "filesystem", "path": "/backups"}}
    data.update(changes)
    return data


def load(data):
    return JobConfig.from_mapping(data)


def test_minimal_file_gets_defaults():
    config = load(base())
    assert (config.job, config.kind) == ("app-files", "files")
    assert config.compression["algorithm"] == "zstd"
    assert config.encrypted is False and config.retention_policy is None
    assert config.log_format == "text" and not config.metrics_enabled
    assert config.instance == "app-files"


def test_yaml_and_json_files_load(tmp_path):
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("job: app-files\nkind: files\nsource: {path: /srv}\nstorage:\n  backend: filesystem\n"
                         "  path: /b\nretention: {keep_daily: 7, keep_weekly: 4}\nschedule: '0 2 * * *'\n")
    config = JobConfig.load(str(yaml_file))
    assert isinstance(config.retention_policy, Policy)
    assert config.retention_policy.counts["daily"] == 7
    json_file = tmp_path / "job.json"
    json_file.write_text(json.dumps(base()))
    assert JobConfig.load(str(json_file)).job == "app-files"


@pytest.mark.parametrize("content, message", [
    ("job: [unclosed", "not valid YAML at line 1"),
    ("- a list\n- of things\n", "must hold a mapping"),
    ("", "must hold a mapping"),
])
def test_unparseable_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "job.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        JobConfig.load(str(path))


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read job file from /nonexistent/job.yaml: No such file"):
        JobConfig.load("/nonexistent/job.yaml")


@pytest.mark.parametrize("changes, message", [
    ({"job": "Bad Name"}, "invalid job name"),
    ({"job": None}, "invalid job name"),
    ({"kind": None}, "'kind' is required"),
    ({"kind": "mysql"}, "unknown backup kind 'mysql'.*files.*postgres"),
    ({"storage": None}, "'storage' is required"),
    ({"storage": "s3://bucket"}, "'storage' must be a mapping"),
    ({"storage": {"backend": "ftp"}}, "storage.backend must be one of filesystem, s3, nfs, got 'ftp'"),
    ({"storage": {"backend": "filesystem", "path": "relative/dir"}}, "storage.path must be an absolute"),
    ({"storage": {"backend": "s3"}}, "storage.bucket is required"),
    ({"storage": {"backend": "s3", "bucket": "b", "endpoint_url": "s3.local:8333"}}, "must be an http"),
    ({"storage": {"backend": "filesystem", "path": "/b", "pth": "/c"}}, "storage: unknown option\\(s\\) pth"),
    ({"compression": {"algorithm": "bzip2"}}, "compression.algorithm must be one of none, gzip, zstd, got 'bzip2'"),
    ({"compression": {"algorithm": "zstd", "level": 42}}, "compression.level must be at most 19, got 42"),
    ({"encryption": {"recipients": ["age1notakey"]}}, "invalid age recipient"),
    ({"encryption": {"recipients": "x", "passphrase_env": "P"}}, "invalid age recipient"),
    ({"encryption": {"recipients": [RECIPIENT], "passphrase_env": "P"}}, "recipients or a passphrase, not both"),
    ({"encryption": {"enabled": True}}, "neither recipients"),
    ({"retention": {"keep_daily": -2}}, "retention.keep_daily must be at least -1, got -2"),
    ({"retention": {"keep_daily": 7, "semantics": "tarsnap"}}, "retention.semantics must be one of borg, restic, got 'tarsnap'"),
    ({"retention": {"keep_dayly": 7}}, "retention: unknown option\\(s\\) keep_dayly"),
    ({"retention": {"keep_daily": 0}}, "keeps nothing"),
    ({"size_anomaly": {"warn_above": 0.5}}, "warn_above must be greater than 1"),
    ({"size_anomaly": {"max_ratio": 3}}, "unknown size policy option"),
    ({"schedule": "every night"}, "schedule: a CronJob's schedule has exactly five fields"),
    ({"schedule": "61 * * * *"}, "schedule: invalid cron schedule '61 \\* \\* \\* \\*': minute"),
    ({"schedule": "0 0 2 * * *"}, "exactly five fields .*got 6 field"),
    ({"schedule": "@reboot"}, "'@reboot' is not a schedule Kubernetes runs"),
    ({"schedule": "CRON_TZ=UTC 0 2 * * *"}, "CRON_TZ= are not allowed"),
    ({"metrics": {"pushgateway_url": "pushgateway:9091"}}, "pushgateway_url must be an http"),
    ({"metrics": {"textfile": "/var/lib/metrics.txt"}}, "must end in .prom"),
    ({"metrics": {"pushgateway_url": "http://p:9091", "timeout": 0}}, "metrics.timeout must be greater than 0, got 0"),
    ({"metrics": {"pushgateway": "http://p:9091"}}, "metrics: unknown option\\(s\\) pushgateway"),
    ({"log_format": "xml"}, "log_format must be one of"),
    ({"verify": {"test_restore": "sometimes"}}, "verify.test_restore must be a boolean .*got 'sometimes'"),
    ({"verify": {"backup": ""}}, "verify.backup must not be empty"),
    ({"storage": {"backend": "s3", "bucket": "b", "part_size": 0}}, "storage.part_size must be at least 5242880, got 0"),
    ({"compression": {"threads": 100000}}, "compression.threads must be at most 256, got 100000"),
    ({"compression": {"level": "3x"}}, "compression.level must be a whole number, got '3x'"),
    ({"retention": {"keep_daily": 7, "force": "no thanks"}}, "retention.force must be a boolean .*got 'no thanks'"),
    ({"retention": {"keep_daily": 7, "max_delete": -1}}, "retention.max_delete must be at least 0"),
    ({"source": {"path": "/srv", "incremental": "n thanks"}}, "source.incremental must be a boolean"),
    ({"source": {"path": "/srv", "full_every": 2.5}}, "source.full_every must be a whole number, got 2.5"),
    ({"source": {"path": "/srv", "pth": "/x"}}, "source: unknown option\\(s\\) pth"),
    ({"restore": {"target": "/srv"}}, "restore.target must be a mapping, got '/srv'"),
    ({"drill": {"job": "Not A Job"}}, "invalid job name"),
    ({"retension": {}}, "unknown top-level option\\(s\\) retension"),
])
def test_invalid_files_are_refused_with_a_clear_message(changes, message):
    with pytest.raises(ConfigError, match=message):
        load(base(**changes))


@pytest.mark.parametrize("section, key", [
    ("source", "password"), ("storage", "secret_key"), ("storage", "access_key"),
    ("encryption", "passphrase"), ("encryption", "identity"), ("metrics", "password"),
])
def test_literal_secrets_are_refused_and_the_fix_is_named(section, key):
    data = base()
    data.setdefault(section, {})
    if section == "storage":
        data["storage"] = {"backend": "s3", "bucket": "b"}
    data[section] = dict(data[section], **{key: "hunter2-secret"})
    with pytest.raises(ConfigError) as caught:
        load(data)
    message = str(caught.value)
    assert "%s_file" % key in message and "%s_env" % key in message
    assert "hunter2-secret" not in message


def test_literal_secret_nested_in_a_restore_target_is_refused():
    with pytest.raises(ConfigError, match="restore.target.password"):
        load(base(restore={"target": {"path": "/x", "password": "pw"}}))


def test_secret_references_resolve_per_command(tmp_path, monkeypatch):
    secret = tmp_path / "secret_key"
    secret.write_text("s3-secret-value\n")
    identity = x25519.Identity.generate()
    ident_file = tmp_path / "identity"
    ident_file.write_text("# created by age-keygen\n%s\n" % identity)
    monkeypatch.setenv("S3_ACCESS", "access-value")
    config = load(base(storage={"backend": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:1",
                                "access_key_env": "S3_ACCESS", "secret_key_file": str(secret)},
                       encryption={"recipients": [str(identity.to_public())], "identity_file": str(ident_file)}))
    options = config.storage_options()
    assert (options["access_key"], options["secret_key"]) == ("access-value", "s3-secret-value")
    assert "access_key_env" not in options
    assert config.backup_encryption() == {"recipients": [str(identity.to_public())]}
    text, passphrase = config.read_keys()
    assert str(identity) in text and passphrase is None
    # nothing secret in what may be logged
    assert "s3-secret-value" not in json.dumps(config.public())


def test_missing_environment_variable_fails_prepare_not_load(monkeypatch):
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    config = load(base(storage={"backend": "s3", "bucket": "b", "secret_key_env": "NOPE_NOT_SET"}))
    with pytest.raises(ConfigError, match="NOPE_NOT_SET, which is not set"):
        config.prepare("list")


def test_recipients_file_is_read_with_comments(tmp_path):
    first, second = str(x25519.Identity.generate().to_public()), str(x25519.Identity.generate().to_public())
    path = tmp_path / "recipients"
    path.write_text("# ops team\n%s\n\n%s\n" % (first, second))
    config = load(base(encryption={"recipients_file": str(path)}))
    assert config.encrypted
    assert config.backup_encryption() == {"recipients": [first, second]}


def test_bad_line_in_recipients_file_fails_prepare(tmp_path):
    path = tmp_path / "recipients"
    path.write_text("age1garbage\n")
    config = load(base(source={"path": str(tmp_path)}, storage={"backend": "filesystem", "path": str(tmp_path / "b")},
                       encryption={"recipients_file": str(path)}))
    with pytest.raises(ConfigError, match="invalid age recipient"):
        config.prepare("backup")


def test_reading_commands_need_a_key_when_encrypted(tmp_path):
    config = load(base(storage={"backend": "filesystem", "path": str(tmp_path)},
                       encryption={"recipients": [RECIPIENT]}))
    for command in ("restore", "verify", "drill"):
        with pytest.raises(ConfigError, match="needs encryption.identity_file"):
            config.prepare(command)
    assert isinstance(config.prepare("list")["storage"], FilesystemStorage)


def test_prune_needs_a_policy(tmp_path):
    config = load(base(storage={"backend": "filesystem", "path": str(tmp_path)}))
    with pytest.raises(ConfigError, match="prune needs a 'retention' policy"):
        config.prepare("prune")
    config = load(base(storage={"backend": "filesystem", "path": str(tmp_path)},
                       retention={"keep_last": 3, "min_keep": 2, "max_delete": 10, "orphan_grace": "12h"}))
    assert config.prune_options() == {"min_keep": 2, "max_delete": 10, "orphan_grace": "12h"}
    assert config.retention_policy.counts["last"] == 3


def test_source_options_are_checked_by_the_kind_when_the_file_is_loaded(tmp_path):
    with pytest.raises(ConfigError, match="job file: source: unknown option\\(s\\) databse"):
        load(base(kind="postgres", source={"host": "db", "databse": "app"},
                  storage={"backend": "filesystem", "path": str(tmp_path)}))


@pytest.mark.parametrize("section", ["restore", "drill"])
@pytest.mark.parametrize("target, message", [
    ({"swap": "nope"}, "%s.target.swap must be a boolean .*got 'nope'"),
    ({"swap": True, "drop_old": "no thanks"}, "%s.target.drop_old must be a boolean .*got 'no thanks'"),
    ({"swap_timeout": "soon"}, "%s.target.swap_timeout must be a number, got 'soon'"),
    ({"restore_database": 5.5, "port": "5432x"}, "%s.target.port must be a whole number"),
    ({"swp": True}, "%s.target: unknown option\\(s\\) swp"),
])
def test_target_options_are_checked_by_the_kind_when_the_file_is_loaded(tmp_path, section, target, message):
    with pytest.raises(ConfigError, match=message % section):
        load(base(kind="postgres", source={"host": "db", "database": "app"},
                  storage={"backend": "filesystem", "path": str(tmp_path)}, **{section: {"target": target}}))


def test_metrics_instance_and_credentials(tmp_path, monkeypatch):
    password = tmp_path / "push"
    password.write_text("push-secret")
    config = load(base(kind="postgres", source={"host": "db-primary", "database": "app"},
                       metrics={"pushgateway_url": "http://127.0.0.1:9091", "username": "ops",
                                "password_file": str(password)}))
    assert config.metrics_enabled and config.instance == "db-primary"
    assert config.metrics_credentials() == ("ops", "push-secret")
    config = load(base(metrics={"pushgateway_url": "http://p:9091", "instance": "cluster-a", "enabled": False}))
    assert not config.metrics_enabled and config.instance == "cluster-a"


def test_kinds_that_store_secrets_must_be_encrypted(monkeypatch):
    class SecretSource(kinds.SOURCES["files"]):
        kind = "secretive"
        requires_encryption = True

    monkeypatch.setitem(kinds.SOURCES, "secretive", SecretSource)
    with pytest.raises(ConfigError, match="must be encrypted"):
        load(base(kind="secretive"))
    assert load(base(kind="secretive", encryption={"recipients": [RECIPIENT]})).encrypted


def test_seed_style_compression_and_disabled_encryption_are_accepted():
    config = load(base(compression={"enabled": True, "algorithm": "gzip"}, encryption={"enabled": False}))
    assert config.compression["algorithm"] == "gzip" and not config.encrypted
    assert load(base(compression={"enabled": False})).compression["algorithm"] == "none"


def test_drill_options_and_target_override(tmp_path, monkeypatch):
    monkeypatch.setenv("PGPW", "pg-secret")
    config = load(base(kind="postgres", source={"host": "db", "database": "app", "password_env": "PGPW"},
                       drill={"job": "nightly-db"},
                       restore={"target": {"host": "db", "database": "app", "password_env": "PGPW"}}))
    assert config.drill["job"] == "nightly-db"
    options = config.target_options("restore", {"swap": True})
    assert options == {"host": "db", "database": "app", "password": "pg-secret", "swap": True}
    with pytest.raises(ConfigError, match="restore.target.password"):
        config.target_options("restore", {"password": "literal"})


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        kinds.source_class("oracle")
    for kind in ("config_git", "directory_sync", "files", "k8s_resources", "postgres", "redis", "velero"):
        assert kind in str(caught.value)
    assert sorted(kinds.TARGETS) == ["config_git", "directory_sync", "files", "k8s_resources", "postgres", "redis"]
    with pytest.raises(ConfigError, match="cannot be restored by this collection"):
        kinds.target_class("velero")


def test_an_identity_alone_never_means_an_unencrypted_backup():
    from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import backup_encryption_options
    identity = str(x25519.Identity.generate())
    with pytest.raises(ConfigError, match="identity only decrypts"):
        backup_encryption_options({"identity": identity})
    # With recipients the identity is simply not needed for writing; disabled means disabled.
    recipient = str(x25519.Identity.generate().to_public())
    assert backup_encryption_options({"identity": identity, "recipients": [recipient]}) == {"recipients": [recipient]}
    assert backup_encryption_options({"identity": identity, "enabled": False}) == {"enabled": False}
