# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The AWX definitions (awx/biometrics-backup.json, the format of `awx export` / `awx import`)
and the execution environment files: well-formed, importable by awxkit's rules, every survey
variable used by its playbook, every playbook present and passing --syntax-check, and the
awx CLI sequence in docs/awx.md consistent with them.
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jinja2
import jinja2.meta
import pytest
import yaml

from ci_env import require_or_skip

REPO_ROOT = Path(__file__).resolve().parents[2]
AWX_FILE = REPO_ROOT / "awx" / "biometrics-backup.json"
DEFINITIONS = json.loads(AWX_FILE.read_text())
JOB_TEMPLATES = {jt["name"]: jt for jt in DEFINITIONS["job_templates"]}
# AWX's survey question types (awx/api/views JobTemplateSurveySpec validation).
SURVEY_TYPES = {"text", "textarea", "password", "integer", "float", "multiplechoice", "multiselect"}
# What the issue asks AWX to offer.
REQUIRED_PLAYBOOKS = {"playbooks/site.yml", "playbooks/restore.yml", "playbooks/verify.yml",
                      "playbooks/prune.yml", "playbooks/drill.yml"}
# Keywords whose values Ansible templates implicitly (bare Jinja expressions).
BARE_JINJA_KEYS = {"when", "that", "changed_when", "failed_when", "until", "loop", "with_items"}


def _awxkit_api():
    try:
        from awxkit.api.pages import api
    except ImportError:
        require_or_skip("awxkit is not installed (requirements-test.txt)")
    return api


def _natural_key_fields(type_name):
    """NATURAL_KEY of awxkit's page class for an AWX object type (what `awx import` matches on)."""
    from awxkit.api.pages import page

    classes = {}

    def walk(cls):
        for sub in cls.__subclasses__():
            classes.setdefault(sub.__name__, sub)
            walk(sub)

    walk(page.Page)
    camel = "".join(part.capitalize() for part in type_name.split("_"))
    cls = classes.get(camel)
    assert cls is not None and getattr(cls, "NATURAL_KEY", None), "awxkit knows no %s" % type_name
    return cls.NATURAL_KEY


def _all_natural_keys(node):
    if isinstance(node, dict):
        if "natural_key" in node:
            yield node["natural_key"]
        for value in node.values():
            yield from _all_natural_keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from _all_natural_keys(value)


def _references(node):
    """Natural-key references (dicts with a type) other than an asset's own natural_key."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "natural_key":
                continue
            if isinstance(value, dict) and "type" in value and "natural_key" not in value:
                yield value
            yield from _references(value)
    elif isinstance(node, list):
        for value in node:
            yield from _references(value)


class _AnyName(dict):
    """Filters and tests by any name: Ansible's (dict2items, bool, match, ...) are not in plain Jinja."""

    def __contains__(self, key):
        return True

    def __missing__(self, key):
        return lambda *args, **kwargs: None

    def get(self, key, default=None):
        return self[key]


def _jinja():
    env = jinja2.Environment()
    env.filters = _AnyName(env.filters)
    env.tests = _AnyName(env.tests)
    return env


def _playbook_variables(path):
    """Every variable name a playbook's Jinja expressions (explicit or bare) refer to."""
    env = _jinja()
    names = set()

    def expressions(node, key=None):
        if isinstance(node, dict):
            for k, value in node.items():
                yield from expressions(value, k)
        elif isinstance(node, list):
            for value in node:
                yield from expressions(value, key)
        elif isinstance(node, str):
            if key in BARE_JINJA_KEYS and "{{" not in node:
                yield "{{ %s }}" % node
            elif "{{" in node or "{%" in node:
                yield node

    for text in expressions(yaml.safe_load(path.read_text())):
        names |= jinja2.meta.find_undeclared_variables(env.parse(text))
    return names


def _play_vars(path):
    merged = {}
    for play in yaml.safe_load(path.read_text()):
        merged.update(play.get("vars") or {})
    return merged


# -- the import file ------------------------------------------------------------------------------

def test_top_level_resources_are_exportable_kinds():
    api = _awxkit_api()
    assert set(DEFINITIONS) <= set(api.EXPORTABLE_RESOURCES)
    assert {"job_templates", "projects", "execution_environments", "credential_types", "inventory"} <= set(DEFINITIONS)


def test_natural_keys_follow_awxkit():
    _awxkit_api()
    keys = list(_all_natural_keys(DEFINITIONS))
    assert len(keys) >= 10
    for key in keys:
        fields = _natural_key_fields(key["type"])
        assert set(key) - {"type"} <= set(fields), key
        assert "name" not in fields or key.get("name"), key


def test_every_reference_resolves_inside_the_file_or_to_the_default_organization():
    defined = [json.dumps(key, sort_keys=True) for key in _all_natural_keys(DEFINITIONS)]
    builtin = [json.dumps({"name": "Default", "type": "organization"}, sort_keys=True)]
    for reference in _references(DEFINITIONS):
        if reference["type"] == "organization":
            assert json.dumps(reference, sort_keys=True) in builtin, reference
        else:
            assert json.dumps(reference, sort_keys=True) in defined, reference


def test_job_templates_cover_the_issue_and_point_at_existing_playbooks():
    playbooks = {jt["playbook"] for jt in JOB_TEMPLATES.values()}
    assert REQUIRED_PLAYBOOKS <= playbooks
    for name, jt in JOB_TEMPLATES.items():
        assert (REPO_ROOT / jt["playbook"]).is_file(), (name, jt["playbook"])
        assert jt["survey_enabled"] is True and jt["related"]["survey_spec"]["spec"], name
        assert yaml.safe_load(jt["extra_vars"]) in (None, {}), name


def _syntax_check(playbook):
    binary = Path(sys.executable).parent / "ansible-playbook"
    if not binary.exists():
        require_or_skip("ansible-playbook is not installed in this interpreter's environment")
    return subprocess.run([str(binary), "--syntax-check", "-i", "localhost,", str(playbook)], capture_output=True,
                          text=True, cwd=str(REPO_ROOT), timeout=300, check=False)


@pytest.mark.parametrize("playbook", sorted({jt["playbook"] for jt in DEFINITIONS["job_templates"]}))
def test_every_playbook_passes_syntax_check(playbook):
    proc = _syntax_check(REPO_ROOT / playbook)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_syntax_check_catches_an_unknown_module(tmp_path):
    # The check above must be able to fail: a playbook with a misspelt module does.
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump([{"hosts": "localhost", "gather_facts": False, "tasks": [
        {"name": "typo", "biometrics.backup.backup_prnue": {"job": "x"}}]}]))
    assert _syntax_check(broken).returncode != 0


# -- surveys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(JOB_TEMPLATES))
def test_survey_spec_is_valid_for_awx(name):
    survey = JOB_TEMPLATES[name]["related"]["survey_spec"]
    assert survey["name"] and isinstance(survey["description"], str)
    variables = [item["variable"] for item in survey["spec"]]
    assert len(variables) == len(set(variables)), "duplicate survey variables"
    for item in survey["spec"]:
        assert item["type"] in SURVEY_TYPES, item
        assert re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", item["variable"]), item
        assert item["question_name"] and isinstance(item["required"], bool), item
        default = item.get("default")
        if item["type"] in ("multiplechoice", "multiselect"):
            choices = item["choices"] if isinstance(item["choices"], list) else item["choices"].split("\n")
            assert choices and len(choices) == len(set(choices)), item
            assert default in ("", None) or default in choices, item
        if item["type"] == "integer":
            assert isinstance(item["min"], int) and isinstance(item["max"], int) and item["min"] <= item["max"]
            assert default in ("", None) or (isinstance(default, int) and item["min"] <= default <= item["max"])
        if item["type"] in ("text", "textarea") and default:
            assert item["min"] <= len(default) <= item["max"], item
        if item["required"]:
            assert default in ("", None) or item["type"] != "password", item


@pytest.mark.parametrize("name", sorted(JOB_TEMPLATES))
def test_every_survey_variable_is_used_by_the_playbook(name):
    jt = JOB_TEMPLATES[name]
    playbook = REPO_ROOT / jt["playbook"]
    used = _playbook_variables(playbook)
    declared = _play_vars(playbook)
    for item in jt["related"]["survey_spec"]["spec"]:
        variable = item["variable"]
        assert variable in used, "%s: survey variable %s is not used by %s" % (name, variable, jt["playbook"])
        # A survey answer left empty still leaves the playbook a default to run with.
        if not item["required"]:
            assert variable in declared, "%s: %s has no default in %s" % (name, variable, jt["playbook"])


def test_variable_check_detects_an_unused_variable():
    used = _playbook_variables(REPO_ROOT / "playbooks" / "verify.yml")
    assert "job" in used and "test_restore" in used
    assert "values_file" not in used


# -- credential types and inventory ---------------------------------------------------------------

def test_credential_types_inject_only_their_inputs_and_the_inventory_uses_what_they_inject():
    env = _jinja()
    injected = set()
    for credential_type in DEFINITIONS["credential_types"]:
        inputs = {field["id"] for field in credential_type["inputs"]["fields"]}
        assert set(credential_type["inputs"].get("required", [])) <= inputs
        secret = {field["id"] for field in credential_type["inputs"]["fields"] if field.get("secret")}
        assert secret, "a credential type without a secret field has no reason to exist"
        injectors = credential_type["injectors"]
        files = {key.split(".", 1)[1] for key in injectors.get("file", {})}
        for template in injectors.get("file", {}).values():
            assert jinja2.meta.find_undeclared_variables(env.parse(template)) <= inputs
        for key, template in injectors.get("extra_vars", {}).items():
            names = jinja2.meta.find_undeclared_variables(env.parse(template))
            assert names <= inputs | {"tower"}, key
            assert re.findall(r"tower\.filename\.(\w+)", template) and set(
                re.findall(r"tower\.filename\.(\w+)", template)) <= files, key
            injected.add(key)
        # Secrets reach the playbook as files, never as plain extra variables.
        for template in injectors.get("extra_vars", {}).values():
            assert not jinja2.meta.find_undeclared_variables(env.parse(template)) & secret
    variables = DEFINITIONS["inventory"][0]["variables"]
    inventory = yaml.safe_load(variables)
    assert {"backup_storage", "backup_encryption", "backup_jobs"} <= set(inventory)
    used = set()
    for text in re.findall(r"\{\{.*?\}\}", variables):
        used |= jinja2.meta.find_undeclared_variables(env.parse(text))
    assert injected <= used


# -- documented CLI sequence -----------------------------------------------------------------------

def _awx_commands():
    text = (REPO_ROOT / "docs" / "awx.md").read_text()
    commands = []
    for block in re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("awx "):
                commands.append(shlex.split(line, comments=True))
    return commands


def test_docs_cli_sequence_imports_this_file_and_names_the_templates_it_defines():
    commands = _awx_commands()
    assert any(c[:2] == ["awx", "import"] for c in commands)
    text = (REPO_ROOT / "docs" / "awx.md").read_text()
    assert "awx import < awx/biometrics-backup.json" in text
    launched = set()
    for command in commands:
        if command[1:3] == ["job_templates", "launch"]:
            launched.add(command[3])
        if command[1:3] == ["job_templates", "associate"]:
            assert command[3] in JOB_TEMPLATES, command
    assert launched and launched <= set(JOB_TEMPLATES)
    for credential_type in DEFINITIONS["credential_types"]:
        assert credential_type["name"] in text


# -- execution environment ---------------------------------------------------------------------------

def test_execution_environment_files_follow_ansible_builder_schemas():
    try:
        from ansible_builder.ee_schema import validate_schema
    except ImportError:
        require_or_skip("ansible-builder is not installed (requirements-test.txt)")
    collection_meta = yaml.safe_load((REPO_ROOT / "meta" / "execution-environment.yml").read_text())
    validate_schema(collection_meta)
    # The collection's file names paths relative to the collection root (ansible-builder's introspection).
    for key, filename in (("python", "requirements.txt"), ("system", "bindep.txt")):
        assert collection_meta["dependencies"][key] == filename
        assert (REPO_ROOT / filename).is_file()
    definition = yaml.safe_load((REPO_ROOT / "awx" / "execution-environment.yml").read_text())
    validate_schema(definition)
    assert definition["version"] == 3
    galaxy = yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())
    requirements = yaml.safe_load((REPO_ROOT / "awx" / definition["dependencies"]["galaxy"]).read_text())
    tarball = "collections/%s-%s-%s.tar.gz" % (galaxy["namespace"], galaxy["name"], galaxy["version"])
    assert {"name": tarball, "type": "file"} in requirements["collections"]
    assert any(c["name"] == "kubernetes.core" for c in requirements["collections"])
    image = DEFINITIONS["execution_environments"][0]["image"]
    assert image.endswith(":" + galaxy["version"])


def test_schema_validation_rejects_a_wrong_definition():
    try:
        from ansible_builder.ee_schema import validate_schema
        from ansible_builder.exceptions import DefinitionError
    except ImportError:
        require_or_skip("ansible-builder is not installed (requirements-test.txt)")
    with pytest.raises(DefinitionError):
        validate_schema({"version": 3, "dependencies": {"pyhton": "requirements.txt"}})
