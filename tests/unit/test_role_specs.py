# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The roles' and modules' options that become job-file fields agree with the engine's schemas.

Each role option a template writes into a runner job file (``source.port: {{ postgres_port }}``,
``backend: {{ storage_backend }}``) must have a field of the engine schema behind it, of a
compatible type, with the same choices, and a default the engine accepts. A field renamed,
retyped or given new choices on one side and not the other fails here, without a cluster.
"""

import ast
import importlib
import re
from pathlib import Path

import pytest
import yaml

from ansible_collections.biometrics.backup.plugins.module_utils.engine import codecs, jobconfig, kinds
from ansible_collections.biometrics.backup.plugins.module_utils.engine.anomaly import SizePolicy
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage import location

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
# Which role option types can carry each engine field type.
ROLE_TYPES = {"bool": {"bool"}, "int": {"int"}, "number": {"float", "int"}, "str": {"str"}, "path": {"str", "path"},
              "enum": {"str"}, "list": {"list"}, "dict": {"dict"}, "any": {"str", "int", "raw"}}
# A line of a job-file template that writes one role option into one field: "  port: {{ postgres_port | int }}".
MAPPED = re.compile(r"^  (\w+): \{\{ (\w+)\b", re.M)
# Job-file fields of the runner that the modules do not offer, and why.
# The runner's retention.require_copy is a flag that points at the job file's copy.destination;
# backup_prune's require_copy is the copy's location itself (a dict): compared nowhere.
RUNNER_ONLY_RETENTION = {"require_copy": "needs the job file's copy.destination (backup_copy is a module of its own)"}


def role_options(role):
    spec = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
    return spec["argument_specs"]["main"]["options"]


def job_template_roles():
    return sorted(path.parent.parent.name for path in ROLES.glob("*/templates/job.yml.j2")
                  if re.search(r"^source:", path.read_text(), re.M) and re.search(r"^kind: \w+$", path.read_text(), re.M))


def source_block(text):
    """The lines of the template's ``source:`` mapping."""
    lines = []
    for line in text.split("\nsource:\n", 1)[1].splitlines():
        if not line.startswith(("  ", "{%")):
            break
        lines.append(line)
    return "\n".join(lines)


def assert_agrees(option_name, option, field, where):
    assert option.get("type", "str") in ROLE_TYPES[field.type], (where, option_name, option.get("type"), field.type)
    if field.type == "enum":
        assert tuple(option.get("choices") or ()) == field.choices, (where, option_name)
    if field.type == "list" and option.get("type") == "list":
        assert option.get("elements") == "str", (where, option_name)
    if "default" in option and option["default"] not in ("", None):
        field.parse(option["default"], "%s default of %s" % (where, option_name))


@pytest.mark.parametrize("role", job_template_roles())
def test_each_kind_roles_source_options_agree_with_the_kinds_source_schema(role):
    text = (ROLES / role / "templates" / "job.yml.j2").read_text()
    kind = re.search(r"^kind: (\w+)$", text, re.M).group(1)
    schema = kinds.SOURCES[kind].SCHEMA
    options = role_options(role)
    mapped = [(field, option) for field, option in MAPPED.findall(source_block(text)) if option in options]
    assert mapped, "no option of %s found under source: in its job.yml.j2" % role
    for field_name, option_name in mapped:
        assert field_name in schema.fields, "%s writes source.%s, which kind %s does not have" % (role, field_name, kind)
        assert_agrees(option_name, options[option_name], schema.fields[field_name], role)


def test_the_kind_roles_cover_the_kinds_the_deploy_role_includes():
    deploy_kinds = yaml.safe_load((ROLES / "deploy" / "vars" / "main.yml").read_text())["deploy_job_kinds"]
    assert set(deploy_kinds) <= set(job_template_roles())


def test_the_storage_roles_options_agree_with_the_storage_schema():
    options = role_options("storage")
    text = (ROLES / "storage" / "templates" / "runner.yml.j2").read_text()
    mapped = [(field, option) for field, option in MAPPED.findall(text) if option in options]
    assert {field for field, _option in mapped} >= {"backend", "bucket", "region", "endpoint_url", "prefix", "path"}
    for field_name, option_name in mapped:
        assert field_name in location.SCHEMA.fields, field_name
        field = location.SCHEMA.fields[field_name]
        if field.type == "enum":  # a role may offer fewer backends than the engine, never others
            assert set(options[option_name]["choices"]) <= set(field.choices), option_name
            assert option_name == "storage_backend"
            continue
        assert_agrees(option_name, options[option_name], field, "storage")
    assert set(options["storage_backend"]["choices"]) == set(location.BACKENDS)


def _deploy_assert_list(text, setting):
    match = re.search(re.escape(setting) + r"[^\n]* in (\[[^\]]*\])", text)
    assert match, setting
    return ast.literal_eval(match.group(1))


def test_the_deploy_roles_checks_use_the_engines_choices():
    tasks = (ROLES / "deploy" / "tasks" / "main.yml").read_text()
    assert tuple(_deploy_assert_list(tasks, "deploy_settings.job.compression.algorithm")) == codecs.ALGORITHMS
    assert set(_deploy_assert_list(tasks, "deploy_settings.storage.storage_backend")) == set(
        role_options("storage")["storage_backend"]["choices"])
    settings = (ROLES / "deploy" / "templates" / "settings.yml.j2").read_text()
    keys = set(re.findall(r"^    (keep_\w+):", settings, re.M))
    assert keys and keys <= set(jobconfig.RETENTION.fields)


def _job_default(name):
    """The literal inside ``default(...)`` of a job role default such as ``{{ x | default({...}) }}``."""
    text = yaml.safe_load((ROLES / "job" / "defaults" / "main.yml").read_text())[name]
    return ast.literal_eval(re.search(r"default\((.*)\) \}\}$", text).group(1))


@pytest.mark.parametrize("name, schema", [
    ("job_compression", codecs.SCHEMA), ("job_retention", jobconfig.RETENTION), ("job_metrics", jobconfig.METRICS)])
def test_the_job_roles_defaults_are_valid_engine_sections(name, schema):
    assert schema.validate(_job_default(name), name) is not None


def test_the_compression_default_is_the_engines_only():
    # One default: the job role leaves compression to the runner, the deploy role sets only what
    # the values say, and the documentation states the engine's default.
    assert _job_default("job_compression") == {}
    assert codecs.compression_settings({})["algorithm"] == "zstd" and codecs.DEFAULT_LEVEL["zstd"] == 3
    described = " ".join(role_options("job")["job_compression"]["description"])
    assert "zstd at level 3" in described
    settings = (ROLES / "deploy" / "templates" / "settings.yml.j2").read_text()
    assert "default('gzip')" not in settings and "default('zstd')" not in settings


def test_the_size_anomaly_keys_the_job_role_documents_exist_in_the_engine():
    fields = set(SizePolicy.__dataclass_fields__)
    described = " ".join(role_options("job")["job_size_anomaly"]["description"])
    documented = set(re.findall(r"C\((\w+)\)", described)) - {"size_anomaly"}
    assert documented == fields
    defaults = (ROLES / "job" / "defaults" / "main.yml").read_text()
    comment = re.search(r"# Size anomaly policy.*?\njob_size_anomaly", defaults, re.S).group(0)
    assert set(re.findall(r"\b(\w+): [0-9]", comment)) == fields


def _module_options(name):
    """A plugin's documented options, with those of the collection's doc fragments it extends
    (what ansible-doc and the plugin loader see)."""
    module = importlib.import_module("ansible_collections.biometrics.backup.plugins.%s" % name)
    documentation = yaml.safe_load(module.DOCUMENTATION)
    options = {}
    for fragment in documentation.get("extends_documentation_fragment") or []:
        fragment_module, dummy, section = fragment[len("biometrics.backup."):].partition(".")
        doc_class = importlib.import_module(
            "ansible_collections.biometrics.backup.plugins.doc_fragments.%s" % fragment_module).ModuleDocFragment
        options.update(yaml.safe_load(getattr(doc_class, section.upper() or "DOCUMENTATION")).get("options") or {})
    options.update(documentation["options"])
    return options


@pytest.mark.parametrize("plugin", ["modules.backup_prune", "lookup.retention"])
def test_the_retention_options_agree_with_the_engine_schema(plugin):
    # validate-modules (ansible-test sanity) holds the module's argument spec to its documentation.
    options = _module_options(plugin)
    policy = {key for key in jobconfig.RETENTION.fields if key in options and key not in RUNNER_ONLY_RETENTION}
    assert set(jobconfig.RETENTION_KEYS) <= policy, plugin
    for key in policy:
        assert_agrees(key, options[key], jobconfig.RETENTION.fields[key], plugin)
    if plugin.startswith("modules."):
        missing = set(jobconfig.RETENTION.fields) - set(options) - set(RUNNER_ONLY_RETENTION)
        assert missing == set(), missing
