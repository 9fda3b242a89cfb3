# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Test harness shared by tests/unit and tests/integration.

- makes ``ansible_collections.biometrics.backup`` importable (build/collections, a symlink
  to this repository made by ``hack/collection-layout.sh link``) in this process and in
  subprocesses (PYTHONPATH, ANSIBLE_COLLECTIONS_PATH, PATH with the venv's bin first);
- loads every ``tests/*_fixtures.py`` as a pytest plugin (real-server fixtures);
- registers the Hypothesis profiles ``ci`` (fixed examples, no example database) and ``dev``;
- under ``CI=true`` any skip is turned into a failure, and a run in which no test passed fails
  (``require_or_skip`` and ``in_ci`` live in tests/ci_env.py, a plain module tests import).
"""

import glob
import os
import subprocess
import sys
import sysconfig

import pytest

from ci_env import REPO_ROOT, TESTS_DIR, in_ci

COLLECTIONS_DIR = os.path.join(REPO_ROOT, "build", "collections")
COLLECTION_LINK = os.path.join(COLLECTIONS_DIR, "ansible_collections", "biometrics", "backup")


def _prepend_env_path(name, entry):
    parts = [p for p in os.environ.get(name, "").split(os.pathsep) if p and p != entry]
    os.environ[name] = os.pathsep.join([entry] + parts)


def _setup_collection_imports():
    if not os.path.isdir(os.path.join(COLLECTION_LINK, "plugins")):
        subprocess.run(["bash", os.path.join(REPO_ROOT, "hack", "collection-layout.sh"), "link"],
                       check=True, stdout=subprocess.DEVNULL)
    if COLLECTIONS_DIR not in sys.path:
        sys.path.insert(0, COLLECTIONS_DIR)
    # The helper modules of tests/ (conftest, *_fixtures) are importable by name.
    if TESTS_DIR not in sys.path:
        sys.path.insert(1, TESTS_DIR)
    # Subprocesses (ansible-playbook, the runner's `python -m`, ...) see the same collection
    # and kubernetes.core from the `ansible` bundle in the interpreter's site-packages.
    _prepend_env_path("PYTHONPATH", COLLECTIONS_DIR)
    os.environ["ANSIBLE_COLLECTIONS_PATH"] = os.pathsep.join(
        [COLLECTIONS_DIR, sysconfig.get_paths()["purelib"]])
    # The venv's tools (ansible-playbook, weed, kubectl, ...) even when it is not activated.
    _prepend_env_path("PATH", os.path.dirname(sys.executable))


def _register_hypothesis_profiles():
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # Hypothesis is a test requirement; without it only its tests break.
        return
    # No deadline anywhere: two shared cores make timings meaningless (and tests never time).
    settings.register_profile(
        "ci", derandomize=True, database=None, deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None, max_examples=100)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if in_ci() else "dev"))


def _fixture_plugins():
    names = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(TESTS_DIR, "*_fixtures.py")))
    return names


_setup_collection_imports()
_register_hypothesis_profiles()

# Every tests/*_fixtures.py (server_fixtures, kube_fixtures, ...) is a plugin of this run.
pytest_plugins = _fixture_plugins()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "allow_skip(reason): this test may be skipped even under CI=true "
                   "(only for conditions that are not a missing server or tool)")


def pytest_report_header(config):
    return "biometrics.backup harness: CI=%s, hypothesis profile %s, fixture plugins: %s" % (
        "true" if in_ci() else "false",
        os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if in_ci() else "dev"),
        ", ".join(pytest_plugins) or "none")


# A machine has one session cluster (build/pytest-cluster with its one kubelet) and one
# runner-image build cache. Under pytest-xdist (`make integration` runs two workers) the test
# files that use them form one unit of work, run by one worker in collection order; every
# other test file is a unit of its own, so module fixtures are built once.
CLUSTER_TEST_FILES = (
    "tests/integration/kubernetes/",
    "tests/integration/roles/test_postgres_wal_role.py",
    "tests/integration/roles/test_roles_cluster.py",
    "tests/integration/roles/test_roles_preconditions.py",
    "tests/integration/test_monitoring_role.py",
    "tests/integration/test_runner_image.py",
)
CLUSTER_UNIT = "session-cluster"


def work_unit(nodeid):
    """The xdist unit of work of a test: CLUSTER_UNIT, else the test's file."""
    path = nodeid.split("::", 1)[0]
    return CLUSTER_UNIT if path.startswith(CLUSTER_TEST_FILES) else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

    class ClusterAwareScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return work_unit(nodeid)

    return ClusterAwareScheduling(config, log)


OUTSIDE_CLUSTER_UNIT = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kube_cluster" in item.fixturenames and work_unit(item.nodeid) != CLUSTER_UNIT:
            item.stash[OUTSIDE_CLUSTER_UNIT] = True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # A failure of the test rather than of the collection: under xdist a collection error on
    # a worker only shows as "no active workers", without this message.
    if item.stash.get(OUTSIDE_CLUSTER_UNIT, False):
        pytest.fail("%s uses the session cluster, but its file is missing from CLUSTER_TEST_FILES in "
                    "tests/conftest.py: another xdist worker could start and stop the same cluster under it"
                    % item.nodeid, pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not in_ci() or not report.skipped or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("allow_skip") is not None:
        return
    # Under CI a skip is a failure: nothing may pass by not running.
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = "CI=true turns this skip into a failure: %s" % reason


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if not in_ci() or not report.skipped:
        return
    # A whole module skipped at import (pytest.importorskip, allow_module_level=True).
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = "CI=true turns this skipped collection of %s into a failure: %s" % (collector.nodeid, reason)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus != 0 or session.config.option.collectonly:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter is not None else None
    if passed == 0 and session.testscollected > 0 and in_ci():
        # Tests were collected but none of them passed (all skipped or deselected).
        reporter.write_line("CI=true: %d tests collected and none passed: failing the run"
                            % session.testscollected, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
