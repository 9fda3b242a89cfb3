# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The harness itself: CI turns skips into failures, process groups really stop, errors
carry the server log. Inner pytest runs load tests/conftest.py as a plugin (``-p conftest``)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from server_fixtures import ServerProcess, ServerStartError, free_ports

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_inner(tmp_path, source, ci, extra_env=None):
    """Run pytest on one generated test file with the harness loaded; (exit code, output)."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = TESTS_DIR
    if ci:
        env["CI"] = "true"
    env.update(extra_env or {})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-rA",
         str(tmp_path / "test_inner.py")],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300, check=False)
    return result.returncode, result.stdout


REQUIRE = """
    from ci_env import require_or_skip

    def test_needs_something():
        require_or_skip("the frobnicator is not installed")
"""


def test_require_or_skip_fails_under_ci(tmp_path):
    code, out = run_inner(tmp_path, REQUIRE, ci=True)
    assert code == 1, out
    assert "1 failed" in out and "the frobnicator is not installed" in out


def test_require_or_skip_skips_outside_ci(tmp_path):
    code, out = run_inner(tmp_path, REQUIRE, ci=False)
    assert code == 0, out
    assert "1 skipped" in out and "the frobnicator is not installed" in out


def test_plain_skip_fails_under_ci_unless_allowed(tmp_path):
    source = """
        import pytest

        def test_passes():
            assert 1 + 1 == 2

        def test_skips():
            pytest.skip("not today")

        @pytest.mark.allow_skip
        def test_allowed_to_skip():
            pytest.skip("allowed: unrelated condition")
    """
    code, out = run_inner(tmp_path, source, ci=True)
    assert code == 1, out
    assert "1 failed, 1 passed, 1 skipped" in out
    assert "CI=true turns this skip into a failure" in out and "not today" in out


def test_module_level_skip_fails_under_ci(tmp_path):
    source = """
        import pytest

        pytest.importorskip("no_such_module_anywhere")

        def test_never_runs():
            assert False
    """
    code, out = run_inner(tmp_path, source, ci=False)
    assert "1 skipped" in out and code == 5, out  # 5: nothing collected
    code, out = run_inner(tmp_path, source, ci=True)
    assert code not in (0, 5), out
    assert "no_such_module_anywhere" in out and "CI=true turns this skipped collection" in out


def test_run_without_a_pass_fails_under_ci(tmp_path):
    source = """
        import pytest

        @pytest.mark.allow_skip
        def test_only_skips():
            pytest.skip("nothing to do")
    """
    assert run_inner(tmp_path, source, ci=False)[0] == 0
    code, out = run_inner(tmp_path, source, ci=True)
    assert code == 1, out


def test_hypothesis_ci_profile_is_derandomized(tmp_path):
    source = """
        from hypothesis import settings

        def test_profile():
            assert settings.default.derandomize is True
            assert settings.default.database is None
    """
    code, out = run_inner(tmp_path, source, ci=True)
    assert code == 0, out


def test_server_that_cannot_start_fails_under_ci_with_reason(tmp_path):
    source = """
        def test_uses_postgres(postgres_server):
            assert postgres_server.port
    """
    env = {"BIOMETRICS_PG_BIN_DIR": str(tmp_path / "no-such-postgres")}
    code, out = run_inner(tmp_path, source, ci=True, extra_env=env)
    assert code == 1, out
    assert "postgres_server could not start" in out and "no-such-postgres" in out
    code, out = run_inner(tmp_path, source, ci=False, extra_env=env)
    assert code == 0 and "1 skipped" in out, out


def test_startup_failure_reports_the_log_tail(tmp_path):
    process = ServerProcess("fake", ["sh", "-c", "echo starting; echo 'FATAL: no such config' >&2; exit 3"],
                            str(tmp_path / "log")).start()
    with pytest.raises(ServerStartError) as info:
        process.wait_ready(lambda: False, timeout=30)
    process.stop()
    message = str(info.value)
    assert "exited during startup" in message and "exited with 3" in message
    assert "FATAL: no such config" in message


def test_not_ready_in_time_reports_and_stops(tmp_path):
    process = ServerProcess("idle", ["sleep", "300"], str(tmp_path / "log")).start()
    with pytest.raises(ServerStartError) as info:
        process.wait_ready(lambda: False, timeout=0.5)
    assert "not ready after" in str(info.value)
    process.stop()
    assert process.proc.returncode is not None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent reaps it later).
    with open("/proc/%d/stat" % pid, encoding="ascii") as handle:
        return handle.read().split(")")[-1].split()[0] != "Z"


def test_stop_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The shell ignores SIGTERM and leaves a grandchild behind: both must go.
    script = "trap '' TERM; sleep 300 & echo $! > %s; wait" % pid_file
    process = ServerProcess("stubborn", ["sh", "-c", script], str(tmp_path / "log"),
                            stop_timeout=0.5).start()
    process.wait_ready(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"), timeout=30)
    child = int(pid_file.read_text().strip())
    assert _alive(child)
    process.stop()
    assert process.proc.returncode == -signal.SIGKILL
    for dummy in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)


def test_free_ports_are_distinct_and_bindable():
    import socket
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
