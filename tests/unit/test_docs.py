# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The user documentation: every relative link and anchor resolves, the index lists every
page, code blocks parse, the role and migration pages cover every role and every seed key,
and every plugin and role renders with ansible-doc, with examples that use documented
options only.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ci_env import require_or_skip

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs"
FQCN = "biometrics.backup"
PAGES = sorted(DOCS.glob("*.md")) + [REPO_ROOT / "README.md", REPO_ROOT / "images" / "runner" / "README.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _without_code(text):
    return FENCE.sub("", re.sub(r"`[^`\n]*`", "", text))


def _slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path):
    text = FENCE.sub("", path.read_text())
    return {_slug(match) for match in re.findall(r"^#{1,6}\s+(.*)$", text, re.M)}


def _links(path):
    for target in LINK.findall(_without_code(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    for target in _links(page):
        path_part, anchor = (target.split("#", 1) + [""])[:2]
        resolved = (page.parent / path_part).resolve() if path_part else page
        assert resolved.exists(), "%s links to %s, which does not exist" % (page.name, target)
        assert str(resolved).startswith(str(REPO_ROOT)), target
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), "%s links to #%s, not a heading of %s" % (
                page.name, anchor, resolved.name)


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nsee [x](missing.md) and [y](#title) and `[z](ignored.md)`\n")
    assert list(_links(page)) == ["missing.md", "#title"]
    assert "title" in _anchors(page)


def test_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    listed = {target.partition("#")[0] for target in LINK.findall(index)}
    missing = [page.name for page in DOCS.glob("*.md") if page.name != "README.md" and page.name not in listed]
    assert missing == [], "docs/README.md does not list %s" % missing
    assert "docs/README.md" in LINK.findall((REPO_ROOT / "README.md").read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_code_blocks_parse(page):
    for language, body in FENCE.findall(page.read_text()):
        if language == "yaml":
            try:
                list(yaml.safe_load_all(body))
            except yaml.YAMLError as exc:
                pytest.fail("%s: a yaml block does not parse: %s\n%s" % (page.name, exc, body))
        elif language in ("sh", "bash"):
            # <commit>, <registry> and the like are placeholders for the reader, not redirections.
            body = re.sub(r"<[A-Za-z][\w .-]*>", "PLACEHOLDER", body)
            proc = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True, check=False)
            assert proc.returncode == 0, "%s: a shell block does not parse: %s\n%s" % (page.name, proc.stderr, body)
        elif language == "json":
            json.loads(body)


def test_roles_page_has_a_section_per_role():
    headings = set(re.findall(r"^## (\w+)$", (DOCS / "roles.md").read_text(), re.M))
    roles = {path.name for path in (REPO_ROOT / "roles").iterdir() if (path / "tasks").is_dir()}
    assert roles - headings == set()


def _leaf_keys(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaf_keys(value, "%s%s." % (prefix, key))
    else:
        yield prefix[:-1]


def test_migration_page_names_every_seed_key():
    text = (DOCS / "migrating-from-helm.md").read_text()
    seed = yaml.safe_load((REPO_ROOT / "playbooks" / "values" / "seed.yml").read_text())
    missing = [key for key in _leaf_keys(seed) if "`%s`" % key not in text]
    assert missing == []


def test_migration_page_names_every_values_key_the_deploy_role_reads():
    # Every values path the mapping template reads (through its aliases such as
    # `{% set s3 = st.s3 | default({}) %}`) is explained on the page.
    template = (REPO_ROOT / "roles" / "deploy" / "templates" / "settings.yml.j2").read_text()
    aliases = {"v": ""}
    for alias, source in re.findall(r"\{% set (\w+) = ([\w.]+) \| default\(\{\}\) %\}", template):
        first, rest = (source.split(".", 1) + [""])[:2]
        aliases[alias] = aliases[first] + rest + "."

    def expand(dotted):
        first, rest = (dotted.split(".", 1) + [""])[:2]
        return aliases[first] + rest

    # A trailing method call (`.items()`) is not a key: the lookahead drops it.
    pattern = r"\b(%s)\.([A-Za-z]\w*(?:\.[A-Za-z]\w*)*)(?![\w(])" % "|".join(
        sorted(aliases, key=len, reverse=True))
    read = {expand("%s.%s" % match) for match in re.findall(pattern, template)}
    # `(backup.pvc | default({})).veleroNamespace`
    read |= {expand(section) + "." + key
             for section, key in re.findall(r"\(([\w.]+) \| default\(\{\}\)\)\.(\w+)(?![\w(])", template)}
    leaves = {key for key in read if not any(other.startswith(key + ".") for other in read)}
    assert len(leaves) > 30, sorted(leaves)
    assert {"storage.s3.endpoint", "backup.retention.days", "backup.pvc.veleroNamespace"} <= leaves
    text = (DOCS / "migrating-from-helm.md").read_text()
    missing = sorted(key for key in leaves if "`%s`" % key not in text)
    assert missing == []


# -- ansible-doc --------------------------------------------------------------------------------

def _ansible_doc(*args):
    binary = Path(sys.executable).parent / "ansible-doc"
    if not binary.exists():
        require_or_skip("ansible-doc is not installed in this interpreter's environment")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=300, check=False,
                          cwd=str(REPO_ROOT), env=dict(os.environ, ANSIBLE_NOCOLOR="1"))


PLUGIN_DIRS = {"modules": "module", "lookup": "lookup", "filter": "filter", "test": "test", "callback": "callback",
               "inventory": "inventory"}
PLUGINS = sorted((PLUGIN_DIRS[path.parent.name], "%s.%s" % (FQCN, path.stem))
                 for directory in PLUGIN_DIRS for path in (REPO_ROOT / "plugins" / directory).glob("*.py")
                 if not path.name.startswith("_"))


def test_there_are_plugins_to_document():
    assert len(PLUGINS) >= 6


@pytest.mark.parametrize("plugin_type,name", PLUGINS)
def test_every_plugin_renders_with_ansible_doc(plugin_type, name):
    proc = _ansible_doc("-t", plugin_type, "--json", name)
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)[name]
    doc = entry["doc"]
    assert doc["short_description"] and doc["description"] and doc["version_added"] == "0.1.0"
    assert doc.get("author")
    text = _ansible_doc("-t", plugin_type, name)
    assert text.returncode == 0 and name in text.stdout, text.stderr
    options = set(doc.get("options") or {})
    aliases = {alias for option in (doc.get("options") or {}).values() for alias in option.get("aliases") or []}
    if plugin_type == "module":
        assert entry["examples"] and entry["return"], name
        examples = yaml.safe_load(entry["examples"])
        uses = [task[name] for task in examples if name in task]
        assert uses, "%s: no example uses the module" % name
        assert doc["attributes"]["action_group"]["membership"] == ["%s.backup" % FQCN], name
        for args in uses:
            assert set(args) <= options | aliases, "%s: an example uses undocumented options %s" % (
                name, set(args) - options - aliases)


def test_the_action_group_holds_every_module_and_nothing_else():
    groups = yaml.safe_load((REPO_ROOT / "meta" / "runtime.yml").read_text())["action_groups"]
    modules = sorted(path.stem for path in (REPO_ROOT / "plugins" / "modules").glob("*.py") if not path.name.startswith("_"))
    assert modules and groups == {"backup": modules}


ROLES = sorted(path.parent.parent.name for path in (REPO_ROOT / "roles").glob("*/meta/argument_specs.yml"))


@pytest.mark.parametrize("role", ROLES)
def test_every_role_argument_spec_renders_with_ansible_doc(role):
    proc = _ansible_doc("-t", "role", "--json", "%s.%s" % (FQCN, role))
    assert proc.returncode == 0, proc.stderr
    main = json.loads(proc.stdout)["%s.%s" % (FQCN, role)]["entry_points"]["main"]
    assert main["short_description"] and main["options"]
