# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``config_git`` kind against real bare git remotes (``git_remote``): a ConfigMap volume
laid out the way kubelet writes it (``..data`` symlink farm), commit only on change, push,
restore of any commit from the stored bundle, and recovery with ``age``/``zstd``/``git``.
"""

import base64
import http.server
import json
import os
import subprocess
import threading
import time

import pytest

from ansible_collections.biometrics.backup.plugins.module_utils.engine import kinds
from ansible_collections.biometrics.backup.plugins.module_utils.engine import restore as rs
from ansible_collections.biometrics.backup.plugins.module_utils.engine.backup import BackupRun
from ansible_collections.biometrics.backup.plugins.module_utils.engine.catalog import Catalog
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import (
    ConfigError, IntegrityError, SourceError)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.config_git.source import (
    ConfigGitSource, GitSession)
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage
from ansible_collections.biometrics.backup.plugins.module_utils.engine.kinds.config_git.target import ConfigGitTarget

from .files_helpers import age_key, decode_cmd, flip_byte, sh, snapshot, stored_object, write

JOB = "app-config"


@pytest.fixture
def storage(tmp_path):
    return open_storage({"backend": "filesystem", "path": str(tmp_path / "store")})


class ProjectedVolume:
    """A ConfigMap volume as kubelet's atomic writer makes it: ``..<timestamp>/`` holding the
    data, ``..data`` -> that directory, and one top-level symlink per key (or per first path
    component of an ``items[].path``)."""

    def __init__(self, root):
        self.root = str(root)
        os.makedirs(self.root)
        self.generation = 0

    def publish(self, data):
        self.generation += 1
        stamp = "..2024_01_01_00_00_%02d.%09d" % (self.generation, self.generation)
        for key, value in data.items():
            write(os.path.join(self.root, stamp, key), value, mode=0o644)
        temp = os.path.join(self.root, "..data_tmp")
        os.symlink(stamp, temp)
        old = os.readlink(os.path.join(self.root, "..data")) if os.path.islink(os.path.join(self.root, "..data")) else None
        os.rename(temp, os.path.join(self.root, "..data"))
        tops = {key.split("/")[0] for key in data}
        for name in os.listdir(self.root):
            if not name.startswith("..") and name not in tops:
                os.unlink(os.path.join(self.root, name))
        for top in tops:
            if not os.path.lexists(os.path.join(self.root, top)):
                os.symlink(os.path.join("..data", top), os.path.join(self.root, top))
        if old:
            subprocess.run(["rm", "-rf", os.path.join(self.root, old)], check=True)


def tree_contents(root):
    """{relative path: bytes} of every file, following symlinks, ignoring '..*' and .git."""
    found = {}
    for directory, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith("..") and d != ".git"]
        for name in names:
            if name.startswith(".."):
                continue
            full = os.path.join(directory, name)
            with open(full, "rb") as handle:
                found[os.path.relpath(full, root)] = handle.read()
    return found


def remote_files(remote, ref="main"):
    out = remote.git("ls-tree", "-r", "--name-only", ref)
    return sorted(out.split())


def backup(storage, options, **kwargs):
    return BackupRun(JOB, ConfigGitSource(options), storage, **kwargs).run()


V1 = {"app.yaml": "replicas: 2\n", "env": "MODE=prod\n", "nested/inner.conf": "[x]\ny=1\n"}
V2 = {"env": "MODE=staging\n", "nested/inner.conf": "[x]\ny=1\n", "new.yaml": "feature: on\n"}


def test_configmap_commit_on_change_push_and_restore_any_commit(tmp_path, storage, git_remote):
    volume = ProjectedVolume(tmp_path / "config")
    volume.publish(V1)
    options = {"path": volume.root, "repo": git_remote.url}

    first = backup(storage, options)
    stats = first["stats"]
    assert git_remote.refs() == {"refs/heads/main": stats["commit"]}
    assert remote_files(git_remote) == ["app-config/app.yaml", "app-config/env", "app-config/nested/inner.conf"]
    assert (stats["files"], stats["changed"], stats["pushed"], stats["added"]) == (3, True, True, 3)
    assert stats["bytes"] == sum(len(value) for value in V1.values()) and stats["subdir"] == JOB
    assert [obj["payload"] for obj in first["objects"]] == ["config.bundle"]

    unchanged = backup(storage, options)
    assert unchanged["stats"]["commit"] == stats["commit"]
    assert (unchanged["stats"]["changed"], unchanged["stats"]["pushed"]) == (False, False)
    assert git_remote.refs() == {"refs/heads/main": stats["commit"]}
    assert git_remote.git("rev-list", "--count", "main").strip() == "1"

    volume.publish(V2)  # kubelet's update: new timestamp dir, ..data swapped, app.yaml gone
    third = backup(storage, options)["stats"]
    assert (third["added"], third["modified"], third["deleted"], third["changed"]) == (1, 1, 1, True)
    assert git_remote.refs()["refs/heads/main"] == third["commit"]
    assert git_remote.git("rev-list", "--count", "main").strip() == "2"
    assert remote_files(git_remote) == ["app-config/env", "app-config/nested/inner.conf", "app-config/new.yaml"]
    assert "..data" not in git_remote.git("log", "--all", "--name-only", "--format=")

    latest = tmp_path / "restored-latest"
    report = rs.restore(storage, JOB, ConfigGitTarget({"path": str(latest)}))
    assert all(check["ok"] for check in report["checks"]), report["checks"]
    assert tree_contents(latest) == {k: v.encode() for k, v in V2.items()}

    old = tmp_path / "restored-old"
    report = rs.restore(storage, JOB, ConfigGitTarget({"path": str(old), "commit": stats["commit"]}))
    assert report["restore"]["commit"] == stats["commit"]
    assert tree_contents(old) == {k: v.encode() for k, v in V1.items()}

    clone = tmp_path / "restored-clone"
    report = rs.restore(storage, JOB, ConfigGitTarget({"path": str(clone), "clone": True}))
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert head.stdout.strip() == third["commit"]
    assert tree_contents(clone / JOB) == {k: v.encode() for k, v in V2.items()}

    # A restore drill's scratch target, with options derived from the job's source options.
    scratch_options = kinds.scratch_options_from_source("config_git", dict(options, git="git"))
    with ConfigGitTarget.scratch(first, scratch_options) as target:
        assert not target.as_clone
        report = rs.restore(storage, JOB, target)
        assert tree_contents(target.path) == {k: v.encode() for k, v in V2.items()}
    assert not os.path.exists(target.path)

    with pytest.raises(IntegrityError, match="not in the bundle"):
        rs.restore(storage, JOB, ConfigGitTarget({"path": str(tmp_path / "x"), "commit": "0" * 40}))
    assert not (tmp_path / "x").exists()


def test_stock_tools_recover_the_bundle(tmp_path, storage, git_remote):
    volume = ProjectedVolume(tmp_path / "config")
    volume.publish(V1)
    identity_file, recipient = age_key(tmp_path)[:2]
    manifest = backup(storage, {"path": volume.root, "repo": git_remote.url}, encryption={"recipients": [recipient]})
    bundle = stored_object(tmp_path / "store", JOB, manifest, "config.bundle")
    assert bundle.endswith("config.bundle.zst.age")
    sh("%s > %s" % (decode_cmd(bundle, identity_file), tmp_path / "config.bundle"))
    sh("git clone -q %s %s" % (tmp_path / "config.bundle", tmp_path / "clone"))
    sh("git -C %s bundle verify %s" % (tmp_path / "clone", tmp_path / "config.bundle"))
    head = sh("git -C %s rev-parse HEAD" % (tmp_path / "clone")).decode().strip()
    assert head == manifest["stats"]["commit"]
    assert tree_contents(tmp_path / "clone" / JOB) == {k: v.encode() for k, v in V1.items()}


def test_plain_tree_keeps_symlinks_exec_bits_and_other_repository_content(tmp_path, storage, git_remote):
    # The repository already holds someone else's files: only our subdir is ours.
    seed = tmp_path / "seed"
    sh("git clone -q %s %s" % (git_remote.url, seed))
    write(seed / "README.md", "shared repository\n")
    sh("git -C %s add -A && git -C %s -c user.name=t -c user.email=t@t commit -qm seed && git -C %s push -q origin HEAD:main"
       % (seed, seed, seed))
    config = tmp_path / "etc-app"
    write(config / "app.conf", "x = 1\n")
    write(config / "hooks" / "reload.sh", "#!/bin/sh\nkill -HUP 1\n", mode=0o755)
    os.symlink("app.conf", config / "current.conf")
    write(config / ".hidden", "dotfiles count too\n")
    options = {"path": str(config), "repo": git_remote.url, "subdir": "hosts/web-1/app"}
    manifest = backup(storage, options)
    assert remote_files(git_remote) == ["README.md", "hosts/web-1/app/.hidden", "hosts/web-1/app/app.conf",
                                        "hosts/web-1/app/current.conf", "hosts/web-1/app/hooks/reload.sh"]
    assert manifest["stats"]["files"] == 4

    restored = tmp_path / "restored"
    report = rs.restore(storage, JOB, ConfigGitTarget({"path": str(restored)}))
    assert all(check["ok"] for check in report["checks"])
    assert snapshot(restored, owners=False, mtimes=False, dir_mtimes=False) == snapshot(
        config, owners=False, mtimes=False, dir_mtimes=False)
    assert os.readlink(restored / "current.conf") == "app.conf"
    assert os.stat(restored / "hooks" / "reload.sh").st_mode & 0o111

    whole = tmp_path / "whole"
    rs.restore(storage, JOB, ConfigGitTarget({"path": str(whole), "subdir": "/"}))
    assert (whole / "README.md").read_text() == "shared repository\n"


def test_push_race_is_retried_on_top_of_the_other_commit(tmp_path, storage, git_remote):
    """Another writer updates the branch while our push is on its way (a pre-receive hook
    moves the ref once): the push is rejected, and the backup rebuilds on top and pushes."""
    volume = ProjectedVolume(tmp_path / "config")
    volume.publish(V1)
    workdir = str(tmp_path / "persistent-clone")
    options = {"path": volume.root, "repo": git_remote.url, "workdir": workdir}
    first = backup(storage, options)["stats"]

    other = tmp_path / "other"
    sh("git clone -q %s %s" % (git_remote.url, other))
    write(other / "other-team" / "settings.ini", "[team]\n")
    sh("git -C %s add -A && git -C %s -c user.name=o -c user.email=o@o commit -qm other && "
       "git -C %s push -q origin HEAD:refs/hidden/other" % (other, other, other))
    other_commit = git_remote.refs()["refs/hidden/other"]
    hook = os.path.join(git_remote.path, "hooks", "pre-receive")
    marker = tmp_path / "raced"
    with open(hook, "w", encoding="utf-8") as handle:
        handle.write("#!/bin/sh\nif [ ! -e %s ]; then\n  touch %s\n"
                     "  env -u GIT_QUARANTINE_PATH -u GIT_OBJECT_DIRECTORY -u GIT_ALTERNATE_OBJECT_DIRECTORIES "
                     "git update-ref refs/heads/main %s\nfi\nexit 0\n" % (marker, marker, other_commit))
    os.chmod(hook, 0o755)

    volume.publish(V2)
    second = backup(storage, options)["stats"]
    assert marker.exists()  # the race happened
    assert git_remote.refs()["refs/heads/main"] == second["commit"]
    parent = git_remote.git("rev-parse", "%s^" % second["commit"]).strip()
    assert parent == other_commit
    assert git_remote.git("merge-base", "--is-ancestor", first["commit"], second["commit"]) == ""
    assert "other-team/settings.ini" in remote_files(git_remote)
    assert (second["added"], second["modified"], second["deleted"]) == (1, 1, 1)


def test_empty_config_on_a_new_repository(tmp_path, storage, git_remote):
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = backup(storage, {"path": str(empty), "repo": git_remote.url, "branch": "configs"})
    assert manifest["stats"]["files"] == 0 and manifest["stats"]["changed"] is True
    assert list(git_remote.refs()) == ["refs/heads/configs"]
    restored = tmp_path / "restored"
    rs.restore(storage, JOB, ConfigGitTarget({"path": str(restored)}))
    assert os.listdir(restored) == []


def test_corrupted_bundle_refuses_restore(tmp_path, storage, git_remote):
    volume = ProjectedVolume(tmp_path / "config")
    volume.publish(V1)
    manifest = backup(storage, {"path": volume.root, "repo": git_remote.url})
    flip_byte(stored_object(tmp_path / "store", JOB, manifest, "config.bundle"))
    destination = tmp_path / "live"
    write(destination / "keep.txt", "live\n")
    with pytest.raises(IntegrityError):
        rs.restore(storage, JOB, ConfigGitTarget({"path": str(destination), "overwrite": True}))
    assert tree_contents(destination) == {"keep.txt": b"live\n"}
    with pytest.raises(ConfigError, match="not empty"):
        ConfigGitTarget({"path": str(destination)}).preflight(manifest)


def test_unreachable_remote_and_bad_options(tmp_path, storage, monkeypatch):
    config = tmp_path / "config"
    write(config / "a", "a")
    with pytest.raises(SourceError, match="not reachable"):
        backup(storage, {"path": str(config), "repo": "file://%s/missing.git" % tmp_path})
    assert Catalog(storage).scan(JOB) == []
    with pytest.raises(ConfigError, match="must not embed a password"):
        ConfigGitSource({"path": str(config), "repo": "https://user:s3cret@git.example/x.git"})
    with pytest.raises(ConfigError, match="branch"):
        ConfigGitSource({"path": str(config), "repo": "file:///x", "branch": "bad..name"})
    with pytest.raises(ConfigError, match="subdir"):
        ConfigGitSource({"path": str(config), "repo": "file:///x", "subdir": "../escape"})
    monkeypatch.delenv("GIT_REPO", raising=False)
    with pytest.raises(ConfigError, match="required"):
        ConfigGitSource({"path": str(config)})
    monkeypatch.setenv("GIT_REPO", "file:///srv/the-seed-way.git")
    assert ConfigGitSource({"path": str(config)}).describe()["repo"] == "file:///srv/the-seed-way.git"


def test_credentials_reach_git_only_through_askpass(tmp_path, storage, git_remote):
    secret = "tok-%d-secret" % time.time_ns()
    secret_file = tmp_path / "token"
    secret_file.write_text(secret + "\n")
    config = tmp_path / "config"
    write(config / "a.conf", "a\n")
    options = {"path": str(config), "repo": git_remote.url, "username": "backup-bot",
               "password_file": str(secret_file)}
    manifest = backup(storage, options)
    assert secret not in json.dumps(manifest)
    session = GitSession(options, str(tmp_path))
    assert secret not in " ".join(session.base(str(tmp_path)))
    askpass = session.env["GIT_ASKPASS"]

    def ask(prompt):
        return subprocess.run([askpass, prompt], env=session.env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert ask("Username for 'https://git.example': ") == "backup-bot"
    assert ask("Password for 'https://backup-bot@git.example': ") == secret
    assert session.env["GIT_TERMINAL_PROMPT"] == "0"


# --------------------------------------------------------------------------- http(s) credentials

class _GitHttpHandler(http.server.BaseHTTPRequestHandler):
    """``git http-backend`` (smart HTTP) behind Basic authentication, for one test."""

    project_root = None
    credentials = None

    def do_GET(self):  # noqa: N802  (http.server's naming)
        self._backend()

    def do_POST(self):  # noqa: N802
        self._backend()

    def log_message(self, *_args):
        pass

    def _backend(self):
        expected = "Basic " + base64.b64encode(("%s:%s" % self.credentials).encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, query = self.path.partition("?")[::2]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        env = dict(os.environ, GIT_PROJECT_ROOT=self.project_root, GIT_HTTP_EXPORT_ALL="1", PATH_INFO=path,
                   QUERY_STRING=query, REQUEST_METHOD=self.command, REMOTE_USER=self.credentials[0],
                   REMOTE_ADDR="127.0.0.1", CONTENT_TYPE=self.headers.get("Content-Type", ""),
                   CONTENT_LENGTH=str(len(body)), HTTP_CONTENT_ENCODING=self.headers.get("Content-Encoding", ""),
                   GIT_PROTOCOL=self.headers.get("Git-Protocol", ""))
        done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=False)
        head, payload = done.stdout.partition(b"\r\n\r\n")[::2]
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, value = line.partition(":")[::2]
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def http_remote(git_remote):
    handler = type("Handler", (_GitHttpHandler,), {
        "project_root": os.path.dirname(git_remote.path),
        "credentials": ("backup-bot", "pw-%d" % time.time_ns())})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = "http://127.0.0.1:%d/%s" % (server.server_address[1], os.path.basename(git_remote.path))
    try:
        yield git_remote, url, handler.credentials
    finally:
        server.shutdown()
        server.server_close()


def test_http_remote_with_password_file(tmp_path, storage, http_remote):
    remote, url, (user, password) = http_remote
    secret_file = tmp_path / "password"
    secret_file.write_text(password + "\n")
    volume = ProjectedVolume(tmp_path / "config")
    volume.publish(V1)
    options = {"path": volume.root, "repo": url, "username": user, "password_file": str(secret_file)}
    manifest = backup(storage, options)
    assert remote.refs() == {"refs/heads/main": manifest["stats"]["commit"]}
    assert password not in json.dumps(manifest)

    secret_file.write_text("wrong-password\n")
    with pytest.raises(SourceError) as failure:
        backup(storage, options)
    assert "not reachable" in str(failure.value) and "wrong-password" not in str(failure.value)
    with pytest.raises(SourceError):
        backup(storage, dict(options, password_file=None))  # no credentials, no prompt: fails, never hangs
    assert len(Catalog(storage).scan(JOB)) == 1
