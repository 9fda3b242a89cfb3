# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""engine/schema.py: typed option fields, and booleans exactly as Ansible reads them."""

import importlib
import inspect
import re

import pytest
from ansible.module_utils.parsing.convert_bool import boolean
from hypothesis import given
from hypothesis import strategies as st

from ansible_collections.biometrics.backup.plugins.module_utils import adapter
from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs, jobconfig, kinds
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage import location
from ansible_collections.biometrics.backup.plugins.module_utils.engine.schema import (
    Field, Schema, parse_bool, parse_int, parse_number)

SPELLINGS = ["yes", "no", "YES", " On ", "off", "true", "False", "t", "f", "y", "n", "1", "0", "", "2",
             "no thanks", "nein", "ja", "n\u200b", "disabled", "none", "null", "-1", "1.0", "0.0"]


def ansible_reads(value):
    try:
        return boolean(value, strict=True)
    except TypeError:
        return "refused"


def engine_reads(value):
    try:
        return parse_bool(value, "target.swap")
    except ConfigError as exc:
        assert str(exc).startswith("target.swap must be a boolean"), exc
        return "refused"


@pytest.mark.parametrize("value", SPELLINGS + [True, False, 1, 0, 1.0, 0.0, 2, -1, 0.5, None, [], {}, ["yes"]])
def test_booleans_are_read_exactly_as_ansible_reads_them(value):
    assert engine_reads(value) == ansible_reads(value)


@given(st.one_of(st.text(max_size=6), st.integers(-3, 3), st.floats(allow_nan=False), st.booleans()))
def test_booleans_agree_with_ansible_on_any_value(value):
    assert engine_reads(value) == ansible_reads(value)


def test_the_data_loss_spellings():
    # swap: "n" swapped a live database out and drop_old: "no thanks" dropped one: every
    # unrecognised string read as true. "n" is false; "no thanks" is an error.
    assert parse_bool("n", "target.swap") is False
    with pytest.raises(ConfigError, match="target.drop_old must be a boolean .*got 'no thanks'"):
        parse_bool("no thanks", "target.drop_old")


@pytest.mark.parametrize("value, expected", [(5, 5), ("5", 5), (" -3 ", -3), ("+7", 7)])
def test_whole_numbers(value, expected):
    assert parse_int(value, "x") == expected


@pytest.mark.parametrize("value", [True, 1.5, 2.0, "2.0", "", "five", None, [1], "1e3"])
def test_not_whole_numbers(value):
    with pytest.raises(ConfigError, match="x must be a whole number"):
        parse_int(value, "x")


@pytest.mark.parametrize("value", [True, "", "fast", float("nan"), float("inf"), [1]])
def test_not_numbers(value):
    with pytest.raises(ConfigError, match="x must be a number"):
        parse_number(value, "x")


def test_bounds_name_the_field_and_value():
    with pytest.raises(ConfigError, match="storage.part_size must be at least 5, got 0"):
        parse_int(0, "storage.part_size", minimum=5)
    with pytest.raises(ConfigError, match="compression.threads must be at most 256, got 100000"):
        parse_int(100000, "compression.threads", maximum=256)


SAMPLE = Schema("target", {
    "swap": Field("bool", "swap"),
    "port": Field("int", "port", minimum=1, maximum=65535),
    "timeout": Field("number", "seconds", exclusive_minimum=0),
    "mode": Field("enum", "mode", choices=("a", "b")),
    "path": Field("path", "path", absolute=True),
    "names": Field("list", "names", split=","),
    "password": Field("str", "password", secret=True),
    "labels": Field("dict", "labels"),
})


def test_validate_converts_and_drops_unset_values():
    assert SAMPLE.validate({"swap": "no", "port": "5432", "timeout": "2.5", "mode": "a", "path": "/x",
                            "names": "a, b,,c", "password_file": "/run/pw", "labels": {"k": "v"},
                            "password": None}) == \
        {"swap": False, "port": 5432, "timeout": 2.5, "mode": "a", "path": "/x", "names": ["a", "b", "c"],
         "password_file": "/run/pw", "labels": {"k": "v"}}
    assert SAMPLE.validate(None) == {}


@pytest.mark.parametrize("options, message", [
    ({"swp": True}, r"^target: unknown option\(s\) swp \(known: swap, port"),
    ({"port": 0}, r"^target.port must be at least 1, got 0$"),
    ({"port": True}, r"^target.port must be a whole number, got True$"),
    ({"timeout": 0}, r"^target.timeout must be greater than 0, got 0$"),
    ({"mode": "c"}, r"^target.mode must be one of a, b, got 'c'$"),
    ({"path": "rel/dir"}, r"^target.path must be an absolute path, got 'rel/dir'$"),
    ({"path": ""}, r"^target.path must not be empty$"),
    ({"path": ["/x"]}, r"^target.path must be a string, got \['/x'\]$"),
    ({"names": [1]}, r"^target.names must be a list of strings; 1 is not a string$"),
    ({"labels": "k=v"}, r"^target.labels must be a mapping, got 'k=v'$"),
    ({"password_env": "not a name"}, r"^target.password_env must name an environment variable"),
    ({"password_file": 3}, r"^target.password_file must be the path of a file"),
    ({"password": 12345}, r"^target.password must be a string$"),
])
def test_validate_refuses_with_one_line_naming_the_field(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        SAMPLE.validate(options)
    assert "\n" not in str(info.value)


def test_a_secret_value_is_never_shown():
    with pytest.raises(ConfigError) as info:
        SAMPLE.validate({"password": ["hunter2"]})
    assert "hunter2" not in str(info.value)


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as info:
        SAMPLE.validate({"mode": "x" * 500})
    assert len(str(info.value)) < 200


def test_every_kind_declares_typed_fields_with_descriptions():
    for table in (kinds.SOURCES, kinds.TARGETS):
        for kind, cls in table.items():
            assert cls.SCHEMA is not None, kind
            for name, field in cls.SCHEMA.fields.items():
                assert field.description and field.type in Field.TYPES, (kind, name)


def test_field_definitions_are_checked():
    with pytest.raises(ValueError):
        Field("boolean", "x")
    with pytest.raises(ValueError):
        Field("enum", "x")
    with pytest.raises(ValueError):
        Field("str", "x", choices=("a",))


ANSIBLE_TYPES = {"bool": ("bool",), "int": ("int",), "number": ("float", "int"), "str": ("str",), "path": ("path",),
                 "enum": ("str",), "list": ("list",), "dict": ("dict",)}


@pytest.mark.parametrize("spec_name, schema", [
    ("STORAGE_OPTIONS", location.SCHEMA), ("ENCRYPTION_OPTIONS", jobconfig.ENCRYPTION)])
def test_the_modules_sub_option_specs_agree_with_the_engine_schema(spec_name, schema):
    # The modules' typed sub-options and the engine's schema describe the same dict: a field
    # added to one and not the other, or typed differently, fails here.
    spec = getattr(adapter, spec_name)
    aliases = {alias for option in spec.values() for alias in option.get("aliases", ())}
    secret_files = {name + "_file" for name, field in schema.fields.items() if field.secret}
    assert set(schema.fields) == (set(spec) - secret_files) | aliases
    for key, option in spec.items():
        if key in secret_files:
            assert option["type"] == "path", key
            continue
        field = schema.fields[key]
        assert option["type"] in ANSIBLE_TYPES[field.type], key
        assert tuple(option.get("choices") or ()) == (field.choices or ()), key
        assert bool(option.get("no_log")) == field.secret, key


def test_the_compression_option_of_backup_run_agrees_with_the_engine_schema():
    module = importlib.import_module("ansible_collections.biometrics.backup.plugins.modules.backup_run")
    source = inspect.getsource(module.main)
    for key, field in codecs.SCHEMA.fields.items():
        if key == "enabled":
            continue  # the seed's job-file spelling; the module says algorithm: none
        assert re.search(r"\b%s=dict\(type=\"%s\"" % (key, ANSIBLE_TYPES[field.type][0]), source), key
