# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""images/runner/Containerfile and bindep.txt, checked statically (no container runtime here):
every program the engine's kinds call is installed and checked by the image build and named in
bindep.txt, the image runs non-root with HOME on the scratch volume, and its ENTRYPOINT is the
runner module the CronJobs' arguments are written for.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ci_env import require_or_skip

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE = REPO_ROOT / "plugins" / "module_utils" / "engine"
CONTAINERFILE = (REPO_ROOT / "images" / "runner" / "Containerfile").read_text()
RUNNER_MODULE = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
# Not called by the engine, but what the architecture promises in the image: stock recovery
# (age, zstd) and the Kubernetes clients (kubectl, velero).
PROMISED = {"age", "age-keygen", "zstd", "kubectl", "velero"}

# find_tool("redis-cli"), conn.tool("pg_dump"), and options named after their tool with the
# tool as default: options.get("rsync") or "rsync".
TOOL_PATTERNS = [
    re.compile(r"""(?:find_tool|\.tool)\(\s*["']([a-z][\w.-]*)["']"""),
    re.compile(r"""\.get\(\s*["']([a-z][\w-]*)["']\s*\)\s*or\s*["']\1["']"""),
]


# What only the point-in-time restore needs, from the PostgreSQL server package:
# postgresql-15 pulls in LLVM, about 160 MB, over the image's 400 MB budget. Such a restore
# runs where the server is installed (docs/postgres-pitr.md; the image's pitr variant).
SERVER_ONLY = {"postgres"}
# Taken out of a package the image does not install (the server's): pg_waldump, with which the
# WAL stream records commit times. Only the stream runs it, and the stream runs in the image's
# pods, never in an execution environment: bindep.txt leaves the server package out.
EXTRACTED = {"pg_waldump": "postgresql-${PG_MAJOR}"}


def engine_tools():
    """The tools the engine calls that the image must carry."""
    tools = set()
    for path in ENGINE.rglob("*.py"):
        text = path.read_text()
        for pattern in TOOL_PATTERNS:
            tools.update(pattern.findall(text))
    return tools - SERVER_ONLY


def test_server_only_tools_are_still_called_by_the_engine():
    # Drop a name from SERVER_ONLY once the engine no longer calls it.
    called = set()
    for path in ENGINE.rglob("*.py"):
        for pattern in TOOL_PATTERNS:
            called.update(pattern.findall(path.read_text()))
    assert SERVER_ONLY <= called


def instructions():
    """Containerfile instructions with continuation lines joined and comments dropped."""
    lines = [line for line in CONTAINERFILE.splitlines() if not line.lstrip().startswith("#")]
    return [line.strip() for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if line.strip()]


def final_stage():
    stages, current = [], None
    for instruction in instructions():
        if instruction.upper().startswith("FROM "):
            current = []
            stages.append(current)
        if current is not None:
            current.append(instruction)
    return stages[-1]


def checked_tools():
    """The tools the image build fails without (its `for tool in ...; command -v` loop)."""
    for instruction in final_stage():
        match = re.search(r"for tool in ([^;]+);\s*do\b.*?command -v \"\$tool\"", instruction)
        if match:
            return set(match.group(1).split())
    return set()


def extracted_tools():
    """``{tool: package}`` the final stage takes out of a downloaded package (not installed)."""
    found = {}
    for instruction in final_stage():
        for package, path in re.findall(r'apt-get download "([^"=]+)[="].*?tar -x -C / "([^"]+)"', instruction):
            found[path.rsplit("/", 1)[-1]] = package
    return found


def apt_packages():
    packages = set()
    for instruction in final_stage():
        for match in re.finditer(r"apt-get install -y --no-install-recommends ((?:[^&])+)", instruction):
            packages.update(word.strip('"') for word in shlex.split(match.group(1)) if not word.startswith("-"))
    return packages


def test_engine_tool_scan_finds_the_known_tools():
    # The scan must see what the kinds demonstrably run; if a refactoring hides a tool from
    # it, this fails instead of the image test passing vacuously.
    assert {"pg_dump", "pg_restore", "psql", "redis-cli", "redis-server", "rsync", "git"} <= engine_tools()


def test_every_engine_tool_is_installed_and_checked_by_the_image_build():
    missing = (engine_tools() | PROMISED) - checked_tools()
    assert missing == set()


def test_the_runtime_stage_runs_as_65532_with_home_in_tmp():
    stage = final_stage()
    users = [i.split(None, 1)[1] for i in stage if i.upper().startswith("USER ")]
    assert users and users[-1] == "65532:65532"
    env = " ".join(i for i in stage if i.upper().startswith("ENV "))
    assert "HOME=/tmp" in env and "TMPDIR=/tmp" in env
    # Nothing is written outside /tmp at run time: no byte-code caches next to the engine.
    assert "PYTHONDONTWRITEBYTECODE=1" in env


def test_entrypoint_is_the_runner_module_and_the_cronjobs_only_pass_arguments():
    entrypoints = [i for i in final_stage() if i.upper().startswith("ENTRYPOINT ")]
    assert len(entrypoints) == 1
    argv = __import__("json").loads(entrypoints[0].split(None, 1)[1])
    assert argv[-3:] == ["python3", "-m", RUNNER_MODULE]
    module_path = REPO_ROOT / (RUNNER_MODULE.split(".", 3)[3].replace(".", "/") + ".py")
    assert module_path.is_file()
    # The job template renders args only (no `command:`), so the ENTRYPOINT stays in charge.
    template = (REPO_ROOT / "roles" / "job" / "templates" / "resources.yml.j2").read_text()
    assert "args:" in template and not re.search(r"^\s+command:", template, re.M)
    # The engine is copied to the path PYTHONPATH names, laid out as the collection.
    env = " ".join(i for i in final_stage() if i.upper().startswith("ENV "))
    assert "PYTHONPATH=/opt/biometrics-backup" in env
    assert any(i.startswith("COPY plugins/module_utils/ /opt/biometrics-backup/ansible_collections/biometrics/backup/"
                            "plugins/module_utils/") for i in final_stage())


def test_runner_module_runs_without_ansible_like_in_the_image(tmp_path):
    # The image has the engine and requirements.txt but no Ansible: the runner must start
    # from the collection layout alone.
    collections = REPO_ROOT / "build" / "collections"
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys, runpy; sys.modules['ansible'] = None; sys.argv = ['runner', '--help'];"
         "runpy.run_module('%s', run_name='__main__')" % RUNNER_MODULE],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(collections)), timeout=120,
        check=False)
    assert proc.returncode == 0, proc.stderr
    assert "backup" in proc.stdout and "drill" in proc.stdout and "prune" in proc.stdout


def _dpkg_owner(path):
    proc = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    return proc.stdout.split(":", 1)[0].strip()


def _real_tool(name):
    found = shutil.which(name)
    if found is None:
        # Debian links only the client tools into /usr/bin; the server's stay in its bin directory
        # (the image puts that directory on PATH).
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/%s" % name))
        return str(candidates[-1]) if candidates else None
    real = os.path.realpath(found)
    if os.path.basename(real) == "pg_wrapper":
        # Debian's wrapper picks the newest installed major; the binary itself is versioned.
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/%s" % name))
        real = str(candidates[-1]) if candidates else real
    return real


def _depends(package):
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Depends},${Pre-Depends}", package], capture_output=True,
                          text=True, check=False)
    names = set()
    for alternative in proc.stdout.split(","):
        for option in alternative.split("|"):
            name = option.strip().split(" ")[0].split(":")[0]
            if name:
                names.add(name)
    return names


@pytest.fixture(scope="module")
def debian():
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian system: the package ownership checks need dpkg")
    return True


def test_the_default_image_takes_pg_waldump_out_of_the_server_package_without_installing_it():
    assert extracted_tools() == EXTRACTED
    # Taken from the server package of exactly the client's version (one build of one source).
    pinned = "=$(dpkg-query -W -f='${Version}' \"postgresql-client-${PG_MAJOR}\")\""
    assert any('apt-get download "postgresql-${PG_MAJOR}' + pinned in instruction for instruction in final_stage())
    # The tool check runs it (a library missing from the image fails the build), in every variant.
    checks = " ".join(final_stage())
    assert "pg_waldump --version" in checks
    assert not re.search(r"case \"\$tool\" in [^)]*pg_waldump", checks)


def test_image_packages_provide_every_engine_tool_on_debian(debian):
    packages = apt_packages() | set(extracted_tools().values())
    assert packages
    for tool in sorted(engine_tools()):
        real = _real_tool(tool)
        if real is None:
            require_or_skip("%s is not installed here (hack/install-deps.sh)" % tool)
        owner = _dpkg_owner(real)
        assert owner, real
        # postgresql-client-15 here is postgresql-client-${PG_MAJOR} in the image.
        generic = re.sub(r"-\d+$", "-${PG_MAJOR}", owner)
        assert owner in packages or generic in packages, (tool, owner, sorted(packages))


def test_bindep_lists_every_engine_tool_for_debian_and_it_is_all_installed_here(debian):
    binary = Path(sys.executable).parent / "bindep"
    if not binary.exists():
        require_or_skip("bindep is not installed (requirements-test.txt, with ansible-builder)")
    listed = subprocess.run([str(binary), "-f", str(REPO_ROOT / "bindep.txt"), "-l", "newline"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert listed.returncode == 0, listed.stderr
    closure = set(listed.stdout.split())
    assert "postgresql-client" in closure and "redis-tools" in closure
    frontier = set(closure)
    for depth in range(3):
        frontier = set().union(*(_depends(package) for package in frontier)) - closure
        closure |= frontier
    for tool in sorted((engine_tools() - set(EXTRACTED)) | {"age", "zstd"}):
        real = _real_tool(tool)
        if real is None:
            require_or_skip("%s is not installed here (hack/install-deps.sh)" % tool)
        assert _dpkg_owner(real) in closure, (tool, _dpkg_owner(real))
    # Everything bindep names for this platform is installed (so the tools above are the ones tested).
    missing = subprocess.run([str(binary), "-f", str(REPO_ROOT / "bindep.txt"), "-b"], capture_output=True,
                             text=True, timeout=120, check=False)
    assert missing.returncode == 0 and missing.stdout.strip() == "", missing.stdout


def test_build_arguments_default_to_the_full_image_for_users():
    # Machines without a registry build with other arguments (hack/runner-image.sh); a user's
    # plain `podman build` gets the PostgreSQL project's client and the velero CLI.
    args = dict(i.split(None, 1)[1].split("=", 1) for i in instructions()
                if i.upper().startswith("ARG ") and "=" in i)
    assert args["WITH_VELERO"] == "true"
    assert args["PG_APT_REPOSITORY"] == "pgdg"
    assert args["PIP_WHEELS"] == ""
