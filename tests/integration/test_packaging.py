# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection as a user gets it: ``ansible-galaxy collection build`` from a copy of the
repository full of local junk, an offline install into an empty collections path (with
kubernetes.core built from the ``ansible`` bundle, since Galaxy is not reachable), and then
the installed plugins run from there: a real encrypted filesystem backup read back with stock
age/zstd/tar, verify and restore, the retention lookup, ``ansible-doc`` of every plugin and
role, the site playbook in render-only mode, ansible-builder's introspection of the installed
collection, an execution-environment build context, and a changelog release in a scratch copy.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import yaml

from ansible_collections.biometrics.backup.plugins.module_utils.engine.retention import evaluate
from ci_env import require_or_skip
from restore_helpers import tree_state

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
GALAXY = yaml.safe_load((REPO_ROOT / "galaxy.yml").read_text())
TARBALL_NAME = "%s-%s-%s.tar.gz" % (GALAXY["namespace"], GALAXY["name"], GALAXY["version"])
FQCN = "%s.%s" % (GALAXY["namespace"], GALAXY["name"])

# Local state a developer's checkout holds that must never reach the tarball. Each is planted
# into the copy the tarball is built from.
JUNK = {
    ".venv/bin/python": "#!/bin/false\n",
    ".venv/pyvenv.cfg": "home = /usr/bin\n",
    "build/collections/leftover.txt": "build output\n",
    "build/sanity/ansible_collections/x.txt": "sanity copy\n",
    "tests/output/junit/result.xml": "<testsuite/>\n",
    "bench/results/latest.json": "{}\n",
    ".pytest_cache/v/cache/lastfailed": "{}\n",
    ".hypothesis/examples/abc": "x\n",
    ".git/config": "[core]\n",
    ".ci/run": "#!/bin/sh\n",
    "plugins/modules/__pycache__/backup_run.cpython-311.pyc": "\0\0",
    "plugins/module_utils/engine/stale.pyc": "\0\0",
    "biometrics-backup-0.0.1.tar.gz": "old artifact",
    # where docs/awx.md builds the tarball for the execution environment
    "awx/collections/biometrics-backup-0.1.0.tar.gz": "artifact",
    # the demo's keys and data (hack/demo.sh keeps them in build/demo)
    "build/demo/run/identity.txt": "AGE-SECRET-KEY-1" + "Q" * 58 + "\n",
}
JUNK_PARTS = {".venv", "build", ".git", ".pytest_cache", ".hypothesis", "__pycache__", ".ci"}

# A real age identity or private key in the tarball would be a leak (documentation only ever
# shows placeholders such as AGE-SECRET-KEY-...).
SECRET_PATTERNS = [
    re.compile(rb"AGE-SECRET-KEY-1[0-9A-Z]{58}"),
    re.compile(rb"-----BEGIN (?:RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----\s*[A-Za-z0-9+/=]{40}"),
    re.compile(rb"\bAKIA[0-9A-Z]{16}\b"),
]


def _clean_env(collections_path, **extra):
    """Only the installed collections: no repository symlink on PYTHONPATH, no bundle on sys.path."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("ANSIBLE_") and key not in ("PYTHONPATH", "K8S_AUTH_KUBECONFIG")}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(collections_path),
        ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_LOCALHOST_WARNING="false",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
        ANSIBLE_DEPRECATION_WARNINGS="false",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="false",
        ANSIBLE_HOME=str(Path(collections_path).parent / "ansible-home"),
        PATH=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
    )
    env.update(extra)
    return env


def _run(argv, env=None, cwd=None, timeout=600):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, "%s failed (%d):\n%s\n%s" % (
        " ".join(str(a) for a in argv), proc.returncode, proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def _tool(name):
    path = shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    if path is None:
        require_or_skip("%s is not installed" % name)
    return path


def _copy_checkout(destination):
    """The repository as a fresh clone plus work in progress, without heavy local state."""
    ignore = shutil.ignore_patterns(".venv", "build", ".git", ".pytest_cache", ".hypothesis", "__pycache__",
                                    "*.tar.gz", "output")
    shutil.copytree(REPO_ROOT, destination, symlinks=True, ignore=ignore)
    return destination


def _bundle_kubernetes_core(workdir):
    """kubernetes.core from the PyPI ``ansible`` bundle, rebuilt as a collection tarball."""
    source = Path(sysconfig.get_paths()["purelib"]) / "ansible_collections" / "kubernetes" / "core"
    if not (source / "MANIFEST.json").is_file():
        require_or_skip("kubernetes.core is not in the ansible bundle at %s" % source)
    copy = workdir / "kubernetes-core-src"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    info = json.loads((copy / "MANIFEST.json").read_text())["collection_info"]
    (copy / "MANIFEST.json").unlink()
    (copy / "FILES.json").unlink()
    galaxy = {key: value for key, value in info.items() if value not in (None, "")}
    (copy / "galaxy.yml").write_text(yaml.safe_dump(galaxy))
    _run([_tool("ansible-galaxy"), "collection", "build", "--output-path", workdir, copy])
    return workdir / ("kubernetes-core-%s.tar.gz" % info["version"]), info["version"]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """Build from a junk-filled copy, then install offline into an empty collections path."""
    work = tmp_path_factory.mktemp("packaging")
    checkout = _copy_checkout(work / "checkout")
    for relative, content in JUNK.items():
        path = checkout / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    dist = work / "dist"
    dist.mkdir()
    _run([_tool("ansible-galaxy"), "collection", "build", "--output-path", dist, checkout])
    tarball = dist / TARBALL_NAME
    assert tarball.is_file(), sorted(os.listdir(dist))

    k8s_tarball, k8s_version = _bundle_kubernetes_core(work)
    collections = work / "collections"
    collections.mkdir()
    env = _clean_env(collections)
    install = _run([_tool("ansible-galaxy"), "collection", "install", "--offline", tarball, k8s_tarball,
                    "-p", collections], env=env, cwd=work)
    installed = collections / "ansible_collections" / GALAXY["namespace"] / GALAXY["name"]
    assert installed.is_dir(), install.stdout
    return {"work": work, "checkout": checkout, "tarball": tarball, "collections": collections, "env": env,
            "installed": installed, "k8s_tarball": k8s_tarball, "k8s_version": k8s_version}


# -- the tarball ------------------------------------------------------------------------------

def test_tarball_holds_the_collection_and_no_junk(package):
    with tarfile.open(package["tarball"]) as archive:
        names = archive.getnames()
        manifest = json.load(archive.extractfile("MANIFEST.json"))
    info = manifest["collection_info"]
    assert (info["namespace"], info["name"], info["version"]) == (
        GALAXY["namespace"], GALAXY["name"], GALAXY["version"])
    assert info["dependencies"] == GALAXY["dependencies"]

    leaked = [name for name in names if JUNK_PARTS & set(Path(name).parts) or name.endswith((".pyc", ".tar.gz"))
              or name.startswith(("tests/output", "bench/results"))]
    assert leaked == []
    # Everything a user needs is there: plugins, roles, playbooks, EE and AWX definitions, docs.
    for required in ("plugins/modules/backup_run.py", "plugins/lookup/retention.py",
                     "plugins/module_utils/engine/runner.py", "roles/deploy/tasks/main.yml",
                     "playbooks/site.yml", "playbooks/values/seed.yml", "meta/runtime.yml",
                     "meta/execution-environment.yml", "requirements.txt", "bindep.txt",
                     "images/runner/Containerfile", "awx/execution-environment.yml", "README.md"):
        assert required in names, required
    source_files = {str(path.relative_to(REPO_ROOT)) for top in ("plugins", "roles", "playbooks", "docs", "awx")
                    for path in (REPO_ROOT / top).rglob("*")
                    if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}
    assert sorted(source_files - set(names)) == []


def test_tarball_holds_no_secret(package):
    # The scanner recognises a real identity, such as age-keygen writes.
    from pyrage import x25519
    assert SECRET_PATTERNS[0].search(str(x25519.Identity.generate()).encode())
    found = []
    with tarfile.open(package["tarball"]) as archive:
        for member in archive.getmembers():
            if not member.isfile():
                continue
            data = archive.extractfile(member).read()
            found += ["%s: %s" % (member.name, pattern.pattern) for pattern in SECRET_PATTERNS if pattern.search(data)]
    assert found == []


def test_files_json_checksums_match_the_installed_files(package):
    files = json.loads((package["installed"] / "FILES.json").read_text())["files"]
    checked = 0
    for entry in files:
        if entry["ftype"] != "file":
            continue
        digest = hashlib.sha256((package["installed"] / entry["name"]).read_bytes()).hexdigest()
        assert digest == entry["chksum_sha256"], entry["name"]
        checked += 1
    assert checked > 50


def test_offline_install_resolves_the_kubernetes_core_dependency(package):
    # Without kubernetes.core the offline install must refuse: the dependency is declared.
    alone = package["work"] / "alone"
    alone.mkdir(exist_ok=True)
    proc = subprocess.run([_tool("ansible-galaxy"), "collection", "install", "--offline", str(package["tarball"]),
                           "-p", str(alone)], capture_output=True, text=True, env=_clean_env(alone), timeout=300,
                          check=False)
    assert proc.returncode != 0
    assert "kubernetes.core" in proc.stdout + proc.stderr
    installed = json.loads((package["collections"] / "ansible_collections" / "kubernetes" / "core"
                            / "MANIFEST.json").read_text())
    assert installed["collection_info"]["version"] == package["k8s_version"]


# -- the installed plugins run ------------------------------------------------------------------

def _docs(package, plugin_type, name):
    proc = _run([_tool("ansible-doc"), "-t", plugin_type, "--json", name], env=package["env"],
                cwd=package["work"])
    return json.loads(proc.stdout)[name]


def _plugin_names(installed, directory):
    return sorted(path.stem for path in (installed / "plugins" / directory).glob("*.py")
                  if not path.name.startswith("_"))


def test_ansible_doc_renders_every_plugin_from_the_install(package):
    installed = package["installed"]
    seen = 0
    for directory, plugin_type in (("modules", "module"), ("lookup", "lookup"), ("filter", "filter"),
                                   ("callback", "callback"), ("inventory", "inventory"), ("test", "test")):
        for name in _plugin_names(installed, directory):
            doc = _docs(package, plugin_type, "%s.%s" % (FQCN, name))["doc"]
            assert doc["filename"].startswith(str(installed)), doc["filename"]
            assert doc["short_description"] and doc["version_added"] == "0.1.0", name
            text = _run([_tool("ansible-doc"), "-t", plugin_type, "%s.%s" % (FQCN, name)], env=package["env"],
                        cwd=package["work"]).stdout
            # The text rendering names the plugin and its install path, and shows every option.
            assert text.startswith("> %s %s.%s (%s" % (plugin_type.upper(), FQCN, name, installed)), text[:200]
            for option in doc.get("options") or {}:
                assert option in text, (name, option)
            seen += 1
    assert seen >= 5


def test_ansible_doc_renders_every_role_argument_spec(package):
    roles = sorted(path.parent.parent.name for path in (package["installed"] / "roles").glob("*/meta/argument_specs.yml"))
    assert len(roles) >= 12
    for role in roles:
        doc = _docs(package, "role", "%s.%s" % (FQCN, role))
        assert doc["entry_points"]["main"]["short_description"], role
        assert doc["entry_points"]["main"]["options"], role


def _adhoc(package, module, args):
    proc = _run([_tool("ansible"), "localhost", "-m", "%s.%s" % (FQCN, module), "-a", json.dumps(args)],
                env=dict(package["env"], ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="minimal"),
                cwd=package["work"])
    return json.loads(proc.stdout[proc.stdout.index("=>") + 2:])


@pytest.fixture(scope="module")
def data_tree(package):
    root = package["work"] / "data"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "notes.txt").write_text("biometric templates, version 3\n" * 200)
    (root / "docs" / "scan.bin").write_bytes(os.urandom(64 * 1024))
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def age_key(package):
    key = package["work"] / "identity.txt"
    _run([_tool("age-keygen"), "-o", key])
    recipient = _run([_tool("age-keygen"), "-y", key]).stdout.strip()
    return {"identity_file": str(key), "recipient": recipient}


@pytest.fixture(scope="module")
def first_backup(package, data_tree, age_key):
    storage = {"backend": "filesystem", "path": str(package["work"] / "store")}
    result = _adhoc(package, "backup_run", {
        "job": "records", "kind": "files", "source": {"path": str(data_tree)}, "storage": storage,
        "encryption": {"recipients": [age_key["recipient"]]}})
    return {"storage": storage, "result": result}


def test_installed_backup_run_writes_a_backup_stock_tools_can_read(package, first_backup, data_tree, age_key):
    result = first_backup["result"]
    assert result["changed"] is True
    manifest = result["manifest"]
    directory = Path(first_backup["storage"]["path"]) / "records" / result["backup_id"]
    assert json.loads((directory / "manifest.json").read_text())["id"] == result["backup_id"]
    # The manifest records the recipient, never the identity.
    assert age_key["recipient"] in json.dumps(manifest)
    assert "AGE-SECRET-KEY" not in json.dumps(result)
    archive = [obj for obj in manifest["objects"] if obj["payload"].endswith(".tar")]
    assert len(archive) == 1
    stored = directory / archive[0]["name"]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == archive[0]["sha256"]

    extracted = package["work"] / "stock-restore"
    extracted.mkdir()
    _run(["bash", "-c", 'set -o pipefail; "$0" -d -i "$1" "$2" | "$3" -dc | tar -x -C "$4"',
          _tool("age"), age_key["identity_file"], stored, _tool("zstd"), extracted])
    assert tree_state(extracted) == tree_state(data_tree)


def test_installed_modules_and_lookup_verify_restore_and_keep(package, first_backup, data_tree, age_key):
    storage = first_backup["storage"]
    restored = package["work"] / "restored"
    results = package["work"] / "results.json"
    backups = ["2024-01-%02dT02:00:00Z" % day for day in range(1, 11)]
    play = [{
        "name": "installed collection",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "tasks": [
            {"name": "list", "register": "listed", FQCN + ".backup_info": {"job": "records", "storage": storage}},
            {"name": "verify with a test restore", "register": "verified", FQCN + ".backup_verify": {
                "job": "records", "test_restore": True, "storage": storage,
                "encryption": {"identity_file": age_key["identity_file"]}}},
            {"name": "restore", "register": "restore", FQCN + ".backup_restore": {
                "job": "records", "backup": "latest", "target": {"path": str(restored)}, "storage": storage,
                "encryption": {"identity_file": age_key["identity_file"]}}},
            {"name": "retention", "ansible.builtin.set_fact": {
                "kept": "{{ lookup('%s.retention', backups, keep_last=2, keep_weekly=2) }}" % FQCN}},
            {"name": "save", "ansible.builtin.copy": {
                "dest": str(results), "mode": "0600",
                "content": "{{ {'listed': listed, 'verified': verified, 'restore': restore, 'kept': kept} | to_json }}"}},
        ],
    }]
    playbook = package["work"] / "installed.yml"
    playbook.write_text(yaml.safe_dump(play, sort_keys=False))
    _run([_tool("ansible-playbook"), "-i", "localhost,", playbook, "-e", json.dumps({"backups": backups})],
         env=package["env"], cwd=package["work"])
    out = json.loads(results.read_text())

    backup_id = first_backup["result"]["backup_id"]
    assert [b["id"] for b in out["listed"]["backups"]] == [backup_id]
    assert out["verified"]["failed"] is False
    assert out["restore"]["backup_id"] == backup_id
    assert tree_state(restored) == tree_state(data_tree)
    # The lookup of the installed collection decides exactly as the engine it wraps.
    kept = out["kept"]
    expected = evaluate(backups, keep_last=2, keep_weekly=2)
    assert kept["keep"] == [b.key for b in expected.keep]
    assert kept["prune"] == [b.key for b in expected.prune]
    # borg semantics: keep_last takes the 10th and 9th; keep_weekly finds ISO week 2 used up
    # (its newest, the 10th, is kept already), keeps week 1's newest (the 7th) and, unable to
    # fill its second week, the oldest backup (the 1st).
    assert kept["keep"] == [backups[9], backups[8], backups[6], backups[0]]


def test_installed_site_playbook_renders_the_seed_values(package):
    render = package["work"] / "render"
    render.mkdir()
    values = package["installed"] / "playbooks" / "values" / "seed.yml"
    _run([_tool("ansible-playbook"), "%s.site" % FQCN, "-e",
          json.dumps({"values_file": str(values), "render_dir": str(render)})],
         env=package["env"], cwd=package["work"])
    documents = [doc for path in sorted(render.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    cronjobs = {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "CronJob"}
    assert cronjobs["postgres-backup"]["spec"]["schedule"] == "0 2 * * *"
    assert cronjobs["redis-backup"]["spec"]["schedule"] == "*/15 * * * *"
    assert "retention-prune" in cronjobs
    assert all(doc["kind"] != "Secret" for doc in documents)


def _playbook(package, name, variables, *args):
    vars_file = package["work"] / ("vars-%s-%d.json" % (name, len(list(package["work"].glob("vars-*.json")))))
    vars_file.write_text(json.dumps(variables))
    return subprocess.run([_tool("ansible-playbook"), "%s.%s" % (FQCN, name), "-e", "@%s" % vars_file, *args],
                          capture_output=True, text=True, env=package["env"], cwd=str(package["work"]), timeout=600,
                          check=False)


def test_installed_awx_playbooks_back_up_drill_and_prune(package, data_tree, age_key):
    """The playbooks behind the AWX job templates, run from the installed collection."""
    store = package["work"] / "store-awx"
    variables = {
        "backup_storage": {"backend": "filesystem", "path": str(store)},
        "backup_encryption": {"recipients": [age_key["recipient"]], "identity_file": age_key["identity_file"]},
        "backup_jobs": {"records": {"kind": "files", "source": {"path": str(data_tree)}}},
        "backup_retention": {"keep_last": 1},
    }
    for attempt in range(2):
        run = _playbook(package, "backup", variables)
        assert run.returncode == 0, "backup %d: %s" % (attempt, run.stdout[-3000:] + run.stderr[-3000:])
    backups = sorted(path.name for path in (store / "records").iterdir() if (path / "manifest.json").is_file())
    assert len(backups) == 2

    drill = _playbook(package, "drill", variables)
    assert drill.returncode == 0, drill.stdout[-3000:] + drill.stderr[-3000:]
    assert "Every drill passed: records" in drill.stdout
    assert json.loads((store / "records" / backups[-1] / "verification.json").read_text())["result"] == "ok"

    preview = _playbook(package, "prune", dict(variables, dry_run=True))
    assert preview.returncode == 0, preview.stdout[-3000:] + preview.stderr[-3000:]
    assert "would prune 1" in preview.stdout
    assert sorted(path.name for path in (store / "records").iterdir() if path.is_dir()) == backups

    prune = _playbook(package, "prune", variables)
    assert prune.returncode == 0, prune.stdout[-3000:] + prune.stderr[-3000:]
    assert sorted(path.name for path in (store / "records").iterdir()
                  if (path / "manifest.json").is_file()) == backups[-1:]

    # A damaged backup fails the drill, and the AWX job with it.
    payload = next(path for path in (store / "records" / backups[-1]).iterdir() if ".tar" in path.name)
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    failed = _playbook(package, "drill", variables)
    assert failed.returncode != 0
    assert "Recovery drill failed for records" in failed.stdout


def test_getting_started_try_block_runs_against_the_install(package):
    """docs/getting-started.md's first look at the engine, run as written (with /tmp made private)."""
    text = (REPO_ROOT / "docs" / "getting-started.md").read_text()
    block = re.search(r"To see the engine work.*?```sh\n(.*?)```", text, re.S).group(1)
    private = package["work"] / "try"
    home = private / "home"
    (home / ".ansible").mkdir(parents=True)
    (home / ".ansible" / "collections").symlink_to(package["collections"])
    script = block.replace("/tmp/", "%s/" % private)
    proc = _run(["bash", "-e", "-c", script],
                env=dict(package["env"], HOME=str(home)), cwd=package["work"])
    listed = proc.stdout.split()
    assert "manifest.json" in listed and "files.tar.zst.age" in listed
    # tar -t | head: the first entries of the archive are the installed docs pages.
    pages = {path.name for path in (package["installed"] / "docs").glob("*.md")}
    assert len([name for name in listed if name.lstrip("./") in pages]) >= 3, listed


# -- execution environment ---------------------------------------------------------------------

def _ansible_builder():
    try:
        import ansible_builder
    except ImportError:
        require_or_skip("ansible-builder is not installed (requirements-test.txt)")
    return Path(ansible_builder.__file__).parent


def test_ansible_builder_introspects_the_installed_collection(package):
    introspect = _ansible_builder() / "_target_scripts" / "introspect.py"
    work = package["work"] / "introspect"
    work.mkdir()
    _run([sys.executable, introspect, "introspect", package["collections"],
          "--write-pip", work / "requirements.txt", "--write-bindep", work / "bindep.txt"])
    pip_lines = (work / "requirements.txt").read_text().splitlines()
    bindep_lines = (work / "bindep.txt").read_text().splitlines()
    ours = "# from collection %s" % FQCN
    requirements = [line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                    if line.split("#")[0].strip()]
    # ansible-builder leaves out what every EE has already (PyYAML among them).
    skipped = {"pyyaml", "yaml"}
    requirements = [r for r in requirements if re.split(r"[<>=\[ ]", r)[0].lower() not in skipped]
    assert len(requirements) >= 7
    for requirement in requirements:
        assert any(line.startswith(requirement) and line.endswith(ours) for line in pip_lines), requirement
    for package_name in ("postgresql-client", "redis-tools", "redis-server", "rsync", "git", "age", "zstd"):
        assert any(line.startswith(package_name + " ") and line.endswith(ours) for line in bindep_lines), package_name


def test_ansible_builder_creates_the_execution_environment_context(package):
    _ansible_builder()
    awx = package["work"] / "ee" / "awx"
    shutil.copytree(REPO_ROOT / "awx", awx)
    (awx / "collections").mkdir(exist_ok=True)
    shutil.copy(package["tarball"], awx / "collections")
    context = package["work"] / "ee" / "context"
    _run([_tool("ansible-builder"), "create", "-f", awx / "execution-environment.yml", "--context", context,
          "--output-filename", "Containerfile"])
    containerfile = (context / "Containerfile").read_text()
    requirements = yaml.safe_load((context / "_build" / "requirements.yml").read_text())
    tarballs = [c["name"] for c in requirements["collections"] if c.get("type") == "file"]
    assert tarballs == ["collections/" + TARBALL_NAME]
    assert (context / "_build" / "collections" / TARBALL_NAME).is_file()
    assert "ansible-galaxy collection install" in containerfile
    assert "introspect.py introspect" in containerfile
    assert "install-from-bindep" in containerfile
    for tool in ("pg_dump", "redis-cli", "redis-server", "rsync", "git", "age", "zstd"):
        assert "%s --version" % tool in containerfile, tool


# -- changelog -----------------------------------------------------------------------------------

def test_antsibull_changelog_release_in_a_scratch_copy(package):
    copy = package["work"] / "changelog-copy"
    shutil.copytree(package["checkout"], copy, symlinks=True,
                    ignore=shutil.ignore_patterns(*(name for name in JUNK_PARTS | {"bench", "output"})))
    fragments = sorted(path.name for path in (copy / "changelogs" / "fragments").glob("*.yml"))
    assert fragments, "no changelog fragments"
    # What the repository holds now must still be there, unchanged, after the release in the copy.
    before = {path.name: path.read_bytes() for path in (REPO_ROOT / "changelogs" / "fragments").glob("*.yml")}
    proc = _run([_tool("antsibull-changelog"), "release", "--version", GALAXY["version"],
                 "--date", "2026-01-15"], cwd=copy)
    changelog = (copy / "CHANGELOG.rst").read_text()
    assert "v%s" % GALAXY["version"] in changelog, proc.stdout
    assert "New Modules" in changelog
    for module in _plugin_names(package["installed"], "modules"):
        assert "%s.%s" % (FQCN, module) in changelog, module
    assert "%s.retention" % FQCN in changelog
    release = yaml.safe_load((copy / "changelogs" / "changelog.yaml").read_text())["releases"][GALAXY["version"]]
    assert release["modules"] and release["fragments"]
    assert sorted(release["fragments"]) == fragments
    assert list((copy / "changelogs" / "fragments").glob("*.yml")) == []  # consumed in the copy
    # The real repository's fragments and changelog stay untouched.
    after = {path.name: path.read_bytes() for path in (REPO_ROOT / "changelogs" / "fragments").glob("*.yml")}
    assert {name: after.get(name) for name in before} == before
    assert not (REPO_ROOT / "CHANGELOG.rst").exists()


# -- Galaxy's import checks -------------------------------------------------------------------

def test_galaxy_import_target_fails_when_a_role_has_no_readme(tmp_path):
    """``make galaxy-import`` runs galaxy-importer's checks for real: Galaxy refuses a role without a README."""
    make = shutil.which("make")
    if make is None:
        require_or_skip("make is not installed")
    checkout = _copy_checkout(tmp_path / "checkout")
    (checkout / "roles" / "redis" / "README.md").unlink()
    proc = subprocess.run([make, "-C", str(REPO_ROOT), "--no-print-directory", "galaxy-import",
                           "GALAXY_IMPORT_SRC=%s" % checkout, "GALAXY_IMPORT_DIR=%s" % (tmp_path / "import")],
                          capture_output=True, text=True, timeout=1800, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert "ERROR: The import failed for the following reason: No role readme found." in output, output[-4000:]
    roles_loaded = re.findall(r"^Loading role (\w+)$", output, re.M)
    assert roles_loaded and roles_loaded[-1] == "redis", roles_loaded
