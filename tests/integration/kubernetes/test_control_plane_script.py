"""hack/control-plane.sh itself: start, status, env, stop with nothing left behind.

Runs a second, private control plane in a temporary state dir (a few seconds once the
binaries are built) so the session cluster of the other tests is not disturbed. It starts
without the node (BIOMETRICS_NODE=0); test_node.py starts and stops one.
"""

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

from kube_fixtures import CONTROL_PLANE, KubeCluster, unavailable
from process_helpers import alive, processes_mentioning

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def _run(command, state_dir, timeout=600):
    env = dict(os.environ, BIOMETRICS_CLUSTER_DIR=str(state_dir), BIOMETRICS_NODE="0")
    env.pop("BIOMETRICS_KUBECONFIG", None)
    return subprocess.run(["bash", str(CONTROL_PLANE), command], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _evict_from_page_cache(paths):
    """Drop ``paths`` from the page cache, as on a machine that has not run them since boot."""
    for path in paths:
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def test_start_status_env_stop_leaves_nothing_behind(tmp_path):
    state_dir = tmp_path / "cluster"
    assert _run("status", state_dir).returncode != 0

    # A cold binary makes the exec slow enough to be seen half done (empty cmdline): start
    # once took that for "kube-apiserver exited". The session cluster has built them by now.
    cache = Path(os.environ.get("BIOMETRICS_CACHE") or Path.home() / ".cache/biometrics-backup")
    _evict_from_page_cache(sorted(cache.glob("kube/*/kube-*")) + sorted(cache.glob("etcd/*/usr/bin/etcd")))

    started = _run("start", state_dir, timeout=3600)
    if started.returncode != 0:
        _run("stop", state_dir)
        unavailable("hack/control-plane.sh start failed: %s" % started.stderr[-2000:])
    try:
        assert "ready in" in started.stderr
        pids = {name: int((state_dir / "pids" / ("%s.pid" % name)).read_text()) for name in COMPONENTS}
        assert all(alive(pid) for pid in pids.values())

        status = _run("status", state_dir)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "ready" in status.stdout

        # `env` prints shell exports of the kubeconfig the other tools use.
        env_lines = _run("env", state_dir).stdout.splitlines()
        exported = dict(shlex.split(line[len("export "):])[0].split("=", 1) for line in env_lines)
        kubeconfig = str(state_dir.resolve() / "kubeconfig")
        assert exported == {"KUBECONFIG": kubeconfig, "K8S_AUTH_KUBECONFIG": kubeconfig,
                            "BIOMETRICS_KUBECONFIG": kubeconfig}
        assert os.stat(kubeconfig).st_mode & 0o077 == 0  # holds the admin token

        cluster = KubeCluster(kubeconfig)
        assert cluster.server.startswith("https://127.0.0.1:")
        version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
        assert version["serverVersion"]["gitVersion"] == os.environ.get("KUBE_VERSION", "v1.34.4")
        assert cluster.kubectl("get", "crd", "backups.velero.io", "-o", "name").stdout.strip() == \
            "customresourcedefinition.apiextensions.k8s.io/backups.velero.io"

        # A second start finds it running and changes nothing.
        again = _run("start", state_dir)
        assert again.returncode == 0 and "already running" in again.stderr
        assert {name: int((state_dir / "pids" / ("%s.pid" % name)).read_text()) for name in COMPONENTS} == pids
    finally:
        stopped = _run("stop", state_dir)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, pid in pids.items() if alive(pid)]
    assert processes_mentioning(str(state_dir.resolve()) + "/") == []
    assert _run("status", state_dir).returncode != 0


def test_start_refuses_to_wipe_a_foreign_directory(tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = _run("start", foreign)
    assert result.returncode != 0
    assert "refusing to wipe" in result.stderr
    assert sorted(path.name for path in foreign.iterdir()) == ["notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert processes_mentioning(str(foreign.resolve()) + "/") == []
