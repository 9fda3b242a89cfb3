# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The runner image, built for real from images/runner/Containerfile by hack/runner-image.sh
(buildah, from a Debian base made here) and run with runc the way a restricted pod runs it:
uid 65532, read-only root, only /tmp writable, no capabilities.

The build goes through the script and its content cache (~/.cache/biometrics-backup/runner-image),
so on a machine that built it before this costs seconds; a cold build takes minutes.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from ci_env import require_or_skip

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "hack" / "runner-image.sh"
RUNNER_MODULE = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
MAX_BYTES = 400 * 1000 * 1000
# Programs the kinds call (pg_dump, redis-cli, rsync, git), stock recovery (age, zstd) and PID 1.
# kubectl and velero are optional build inputs, left out by default here (hack/runner-image.sh).
TOOLS = ["pg_dump", "pg_restore", "psql", "redis-cli", "redis-server", "rsync", "git", "ssh", "age",
         "age-keygen", "zstd", "tini"]


def _default_image():
    defaults = (REPO_ROOT / "roles" / "job" / "defaults" / "main.yml").read_text()
    line = next(line for line in defaults.splitlines() if line.startswith("job_image:"))
    return line.split("default('", 1)[1].split("'", 1)[0]


def _build():
    started = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True, timeout=1800,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Path(proc.stdout.strip().splitlines()[-1]), time.monotonic() - started, proc.stderr


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def built():
    for tool in ("buildah", "mmdebstrap", "umoci", "runc"):
        if shutil.which(tool) is None:
            require_or_skip("%s is not installed (hack/install-deps.sh)" % tool)
    if os.geteuid() != 0:
        require_or_skip("building the image and running runc need root")
    archive, first_seconds, _stderr = _build()
    # The second build right away: in a checkout others edit, the engine may change later on.
    second = _build()
    return {"archive": archive, "first_seconds": first_seconds, "sha256": _sha256(archive), "second": second}


@pytest.fixture(scope="module")
def layout(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("runner-image")
    with tarfile.open(built["archive"]) as archive:
        archive.extractall(root / "layout")
    index = json.loads((root / "layout" / "index.json").read_text())
    manifest_desc, = index["manifests"]
    tag = manifest_desc["annotations"]["org.opencontainers.image.ref.name"]

    def blob(desc):
        algorithm, digest = desc["digest"].split(":")
        return root / "layout" / "blobs" / algorithm / digest

    manifest = json.loads(blob(manifest_desc).read_text())
    config = json.loads(blob(manifest["config"]).read_text())
    return {"root": root, "tag": tag, "manifest": manifest, "config": config, "blob": blob,
            "manifest_digest": manifest_desc["digest"]}


@pytest.fixture(scope="module")
def bundle(layout):
    path = layout["root"] / "bundle"
    proc = subprocess.run(["umoci", "unpack", "--image", "%s:%s" % (layout["root"] / "layout", layout["tag"]),
                           str(path)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return path


def run_in_pod_like_container(bundle, args=None):
    """runc with the image's own process (user, env, cwd, args from the image config, as umoci
    generated it), changed like a restricted pod: read-only root, /tmp a fresh tmpfs, no
    capabilities, no new privileges."""
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    config["process"]["noNewPrivileges"] = True
    config["process"]["capabilities"] = {key: [] for key in config["process"]["capabilities"]}
    if args is not None:
        config["process"]["args"] = args
    config["root"]["readonly"] = True
    config["mounts"] = [m for m in config["mounts"] if m["destination"] != "/tmp"]
    config["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                             "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]})
    config_path.write_text(json.dumps(config))
    state = bundle.parent / "runc-state"
    name = "runner-image-test-%s" % uuid.uuid4().hex[:8]
    try:
        return subprocess.run(["runc", "--root", str(state), "run", "--bundle", str(bundle), name],
                              capture_output=True, text=True, timeout=300, check=False)
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "--force", name], capture_output=True,
                       check=False)


def test_image_config_runs_the_runner_as_65532(layout):
    config = layout["config"]["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "python3", "-m", RUNNER_MODULE]
    assert config["Cmd"] == ["--help"]
    assert config["WorkingDir"] == "/tmp"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    # Tagged as the job role's default image: the archive names the tag, the import the repository.
    assert _default_image().endswith(":" + layout["tag"])


def test_image_is_at_most_400_mb_uncompressed(layout):
    total = 0
    for layer in layout["manifest"]["layers"]:
        path = layout["blob"](layer)
        if layer["mediaType"].endswith("+gzip"):
            proc = subprocess.run("gzip -dc < '%s' | wc -c" % path, shell=True, capture_output=True, text=True,
                                  check=True)
            total += int(proc.stdout)
        else:
            assert layer["mediaType"].endswith(".tar"), layer["mediaType"]
            total += path.stat().st_size
    assert 50 * 1000 * 1000 < total <= MAX_BYTES, total


def test_runner_help_runs_as_65532_on_a_read_only_root(bundle):
    # The image's own ENTRYPOINT + CMD: tini -> python3 -m <runner> --help.
    proc = run_in_pod_like_container(bundle)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout and "usage:" in proc.stdout


def test_tools_are_there_and_only_tmp_is_writable(bundle):
    script = "; ".join([
        "echo uid=$(id -u) gid=$(id -g)",
        "if touch /probe 2>/dev/null; then echo root-writable; fi",
        "if touch /opt/venv/probe 2>/dev/null; then echo venv-writable; fi",
        "touch /tmp/probe && echo tmp-writable",
        "for tool in %s; do command -v $tool >/dev/null && echo have=$tool || echo missing=$tool; done"
        % " ".join(TOOLS),
        "pg_dump --version; redis-cli --version; zstd --version; age --version",
        # the Python dependencies import (redis on Python 3.11.2 needs async-timeout)
        # kubernetes.aio is removed from the image; the client and the dynamic client stay
        "python3 -c 'import boto3, psycopg, redis, redis.asyncio, pyrage, zstandard, kubernetes.client,"
        " kubernetes.dynamic, croniter, yaml, prometheus_client; print(\"imports-ok\")'",
        "if python3 -c 'import pip' 2>/dev/null; then echo pip-present; fi",
        "if python3 -c 'import kubernetes.aio' 2>/dev/null; then echo aio-present; fi",
    ])
    proc = run_in_pod_like_container(bundle, ["/bin/sh", "-c", script])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "uid=65532 gid=65532" in out
    assert "root-writable" not in out and "venv-writable" not in out
    assert "tmp-writable" in out
    assert [line for line in out.splitlines() if line.startswith("missing=")] == []
    assert "pg_dump (PostgreSQL)" in out and "imports-ok" in out
    assert "pip-present" not in out and "aio-present" not in out


def test_second_build_is_a_cache_hit_with_the_same_digest(built, layout):
    archive, seconds, stderr = built["second"]
    assert archive == built["archive"]
    assert "cached" in stderr
    assert seconds < 15, seconds
    assert _sha256(archive) == built["sha256"]
    index = json.loads(tarfile.open(archive).extractfile("index.json").read())
    assert index["manifests"][0]["digest"] == layout["manifest_digest"]


def test_builds_leave_nothing_mounted(built):
    # buildah mounts the stages' images and its overlay home; the script unmounts them after
    # each build, so repeated builds do not pile up mounts on the machine.
    assert built["archive"].exists()
    cache = str(built["archive"].parent)
    mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
               if line.split()[1].startswith(cache + "/")]
    assert mounted == []
