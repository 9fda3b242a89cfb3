"""The storage option's secret references are read in one place: engine/storage/location.py
``storage_options``. The modules (backup_common.open_location), the runner's job file
(JobConfig.open_storage) and ``open_storage`` all come through it, each exactly once.

The real config readers run; a spy only counts the calls (nothing is faked).
"""

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils import backup_common
from ansible_collections.biometrics.backup.plugins.module_utils.engine import config as engine_config
from ansible_collections.biometrics.backup.plugins.module_utils.engine import jobconfig
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.jobconfig import JobConfig
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage import location
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.s3 import S3Storage

SECRET = "s3-secret-from-a-file"
ACCESS = "access-from-the-environment"


class ModuleParams:
    """What backup_common uses of an AnsibleModule: its params and its no_log_values set."""

    def __init__(self, **params):
        self.params = params
        self.no_log_values = set()


@pytest.fixture
def s3_options(tmp_path, monkeypatch):
    secret = tmp_path / "secret_key"
    secret.write_text(SECRET + "\n")
    monkeypatch.setenv("TEST_S3_ACCESS", ACCESS)
    # Nothing listens on port 9: building the client sends no request.
    return {"backend": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:9",
            "access_key_env": "TEST_S3_ACCESS", "secret_key_file": str(secret)}


@pytest.fixture
def reads(monkeypatch):
    """Every secret file read, as (path, where)."""
    seen = []
    real = engine_config.read_secret_file

    def spy(path, where):
        seen.append((path, where))
        return real(path, where)

    monkeypatch.setattr(engine_config, "read_secret_file", spy)
    return seen


@pytest.fixture
def resolutions(monkeypatch):
    """Every resolution of the storage option, wherever a module imported the resolver."""
    seen = []
    real = engine_config.resolve_secret_refs

    def spy(options, where="options"):
        if where == "storage":
            seen.append(sorted(options))
        return real(options, where)

    for module in (engine_config, location, backup_common, jobconfig):
        monkeypatch.setattr(module, "resolve_secret_refs", spy)
    return seen


def credentials(storage):
    assert isinstance(storage, S3Storage)
    found = storage.client._request_signer._credentials  # pylint: disable=protected-access
    return found.access_key, found.secret_key


def test_storage_options_reads_references_and_checks(s3_options, reads):
    options = location.storage_options(s3_options)
    assert (options["access_key"], options["secret_key"]) == (ACCESS, SECRET)
    assert not any(key.endswith(("_file", "_env")) for key in options)
    assert reads == [(s3_options["secret_key_file"], "storage.secret_key")]
    with pytest.raises(ConfigError, match="storage.bucket is required"):
        location.storage_options({"backend": "s3"})
    with pytest.raises(ConfigError, match="storage must be a mapping"):
        location.storage_options(["s3"])


def test_open_storage_reads_each_secret_once(s3_options, reads, resolutions):
    assert credentials(location.open_storage(s3_options)) == (ACCESS, SECRET)
    assert len(reads) == 1 and len(resolutions) == 1


def test_modules_read_each_secret_once_and_mask_it(s3_options, reads, resolutions):
    module = ModuleParams(storage=dict(s3_options, region=None))
    storage = backup_common.open_location(module)
    assert credentials(storage) == (ACCESS, SECRET)
    assert len(reads) == 1 and len(resolutions) == 1
    assert {ACCESS, SECRET} <= module.no_log_values


def test_modules_check_the_option_before_reading_secrets(tmp_path, reads):
    module = ModuleParams(storage={"backend": "s3", "secret_key_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="storage.bucket is required"):
        backup_common.open_location(module)
    assert reads == []


def test_job_file_reads_each_secret_once(s3_options, reads, resolutions):
    config = JobConfig.from_mapping({"job": "app-files", "kind": "files", "source": {"path": "/srv/data"},
                                     "storage": s3_options})
    assert reads == [] and resolutions == []  # loading reads no secret
    assert credentials(config.open_storage()) == (ACCESS, SECRET)
    assert len(reads) == 1 and len(resolutions) == 1
