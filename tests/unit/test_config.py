"""engine/config: secret references (<x>_file, <x>_env) and redaction."""

import os

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine.config import (
    SECRET_FIELDS, read_secret_file, redact, resolve_secret_refs)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "password"
    path.write_text("s3cr3t value\n")  # mounted Secrets often end with a newline
    return str(path)


def test_file_reference_becomes_the_value_without_trailing_newline(secret_file):
    resolved = resolve_secret_refs({"host": "db", "password_file": secret_file})
    assert resolved == {"host": "db", "password": "s3cr3t value"}


def test_only_line_endings_are_stripped(tmp_path):
    path = tmp_path / "key"
    path.write_text("  padded  \r\n")
    assert resolve_secret_refs({"token_file": str(path)}) == {"token": "  padded  "}


def test_env_reference_becomes_the_value(monkeypatch):
    monkeypatch.setenv("BB_TEST_SECRET_KEY", "from-env")
    resolved = resolve_secret_refs({"access_key": "AK", "secret_key_env": "BB_TEST_SECRET_KEY"})
    assert resolved == {"access_key": "AK", "secret_key": "from-env"}


def test_nested_dicts_are_resolved_and_the_input_is_not_modified(secret_file, monkeypatch):
    monkeypatch.setenv("BB_TEST_PASSPHRASE", "pp")
    options = {"storage": {"secret_key_file": secret_file}, "encryption": {"passphrase_env": "BB_TEST_PASSPHRASE"}}
    resolved = resolve_secret_refs(options)
    assert resolved == {"storage": {"secret_key": "s3cr3t value"}, "encryption": {"passphrase": "pp"}}
    assert options["storage"] == {"secret_key_file": secret_file}


def test_value_and_reference_together_is_an_error(secret_file):
    with pytest.raises(ConfigError, match=r"source: give either password or password_file, not both"):
        resolve_secret_refs({"password": "x", "password_file": secret_file}, "source")


def test_empty_value_beside_a_reference_is_not_a_conflict(secret_file):
    assert resolve_secret_refs({"password": "", "password_file": secret_file}) == {"password": "s3cr3t value"}


def test_unset_env_var_is_named_in_the_error(monkeypatch):
    monkeypatch.delenv("BB_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"storage\.secret_key_env names environment variable BB_TEST_UNSET, which is not set"):
        resolve_secret_refs({"storage": {"secret_key_env": "BB_TEST_UNSET"}}, "job")


def test_unreadable_file_names_field_and_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as info:
        resolve_secret_refs({"password_file": missing}, "source")
    assert "source.password" in str(info.value) and missing in str(info.value)
    assert "No such file" in str(info.value)


def test_non_secret_file_options_are_left_alone(tmp_path):
    options = {"config_file": "/etc/x.conf", "path_file": "y", "recipients_file": "/r", "password_file": None}
    assert resolve_secret_refs(options) == options


def test_non_dict_passes_through():
    assert resolve_secret_refs(["a"]) == ["a"]
    assert resolve_secret_refs(None) is None


def test_read_secret_file_error_mentions_what(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the thing from"):
        read_secret_file(str(tmp_path), "the thing")  # a directory


def test_redact_hides_every_secret_field_at_any_depth():
    options = {
        "storage": {"backend": "s3", "access_key": "AKIA", "secret_key": "SK", "session_token": "",
                    "bucket": "b"},
        "source": {"password": "pw", "host": "h", "items": [{"token": "t"}, {"name": "n"}]},
        "encryption": {"passphrase": "pp", "identity": "AGE-SECRET-KEY-1", "recipients": ["age1x"]},
        "metrics": {"basic_auth_password": "bp"},
    }
    text = repr(redact(options))
    for secret in ("AKIA", "'SK'", "'pw'", "'t'", "'pp'", "AGE-SECRET-KEY", "'bp'"):
        assert secret not in text
    red = redact(options)
    assert red["storage"]["bucket"] == "b" and red["source"]["host"] == "h"
    assert red["storage"]["session_token"] == ""  # empty stays empty: nothing to hide
    assert red["encryption"]["recipients"] == ["age1x"]  # public keys stay readable
    assert options["source"]["password"] == "pw"  # a copy, not in place


def test_secret_fields_cover_every_credential_option_of_the_shared_specs():
    # Any credential option the adapters declare no_log must be redacted by the engine too.
    for name in ("password", "access_key", "secret_key", "session_token", "passphrase", "identity", "token"):
        assert name in SECRET_FIELDS


def test_env_resolution_reads_the_process_environment_at_call_time(monkeypatch):
    monkeypatch.setenv("BB_TEST_LATE", "one")
    first = resolve_secret_refs({"token_env": "BB_TEST_LATE"})
    os.environ["BB_TEST_LATE"] = "two"
    assert first == {"token": "one"}
    assert resolve_secret_refs({"token_env": "BB_TEST_LATE"}) == {"token": "two"}


@pytest.mark.parametrize("content", [b"\xff\xfe p\x00w\x00", b"age1\xc3(", b"\x80"])
def test_a_secret_file_that_is_not_utf8_is_a_config_error_naming_the_option(tmp_path, content):
    path = tmp_path / "password"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"^source\.password: .*password is not UTF-8 text \(byte 0x[0-9a-f]{2} at offset"):
        resolve_secret_refs({"password_file": str(path)}, "source")
