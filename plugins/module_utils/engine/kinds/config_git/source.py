"""``config_git``: the seed's "configuration to git" — commit changed config files and push.

The config directory (typically a mounted ConfigMap or Secret volume) is copied into a
clone of the remote repository under ``subdir`` (default: the job name), committed only
when something changed, and pushed. The backup's payload is ``config.bundle``: a
``git bundle`` of the branch (full history), so a restore needs nothing but the bundle —
``git clone config.bundle`` recovers every commit.

Projected volumes (ConfigMap, Secret, downward API) keep their files in a timestamped
``..2024_...`` directory behind a ``..data`` symlink, with one top-level symlink per key.
Only the keys are copied (each followed into ``..data``); the ``..*`` entries never are.

Credentials never appear in argv, URLs or messages: https passwords/tokens reach git via
``GIT_ASKPASS`` reading an environment variable of the git process only; ssh keys are
files (``ssh_key_file``, ``known_hosts_file``). A repository URL with an embedded password
is refused.
"""

import contextlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import urllib.parse

from ...config import read_secret_file
from ...errors import ConfigError, SourceError
from ...schema import Field, Schema
from ...procutil import ToolStream, find_tool, run_tool, scrub, tool_env, tool_version
from ...timeutil import to_iso, utc_now
from ..contract import Source

BUNDLE_PAYLOAD = "config.bundle"
PUSH_ATTEMPTS = 3
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
DEFAULT_AUTHOR = ("biometrics.backup", "backup@localhost")
_ASKPASS = """#!/bin/sh
case "$1" in
  Username*|username*) printf '%s\\n' "$BIOMETRICS_GIT_USERNAME" ;;
  *) printf '%s\\n' "$BIOMETRICS_GIT_PASSWORD" ;;
esac
"""
_BRANCH_RE = re.compile(r"^(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]+(?<!/)(?<!\.lock)$")


def check_repo_url(url):
    """Refuse URLs that carry a password; return the URL safe to record."""
    if not url or not isinstance(url, str):
        raise ConfigError("config_git.repo (GIT_REPO) is required: a file://, ssh:// or https:// URL or a path")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme in ("http", "https", "ssh", "git", "ftp", "ftps") and parsed.password:
        raise ConfigError("config_git.repo must not embed a password or token: put it in password_file "
                          "(https) or use ssh_key_file (ssh)")
    return url


def safe_subdir(value):
    parts = [part for part in str(value).split("/") if part not in ("", ".")]
    if any(part in ("..", ".git") for part in parts):
        raise ConfigError("config_git.subdir %r must stay inside the repository and not touch .git" % value)
    return "/".join(parts)


def config_entries(root):
    """``[(relative path, absolute source path, 'file'|'symlink')]`` of a config directory.

    A projected volume (``..data`` symlink present) contributes its keys, followed into
    ``..data``; any other directory its tree as is (symlinks kept as symlinks, ``.git`` and
    special files skipped).
    """
    real_root = os.path.realpath(root)
    projected = os.path.islink(os.path.join(root, "..data"))
    found = []
    for name in sorted(os.listdir(root)):
        if name == ".git" or (projected and name.startswith("..")):
            continue
        full = os.path.join(root, name)
        if projected:
            real = os.path.realpath(full)
            if real != real_root and not real.startswith(real_root + "/"):
                raise SourceError("config key %s points outside the volume (%s)" % (full, real))
            _collect(real, name, found, follow=True)
        else:
            _collect(full, name, found, follow=False)
    return found


def _collect(path, rel, found, follow):
    info = os.stat(path) if follow else os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        found.append((rel, path, "symlink"))
    elif stat.S_ISREG(info.st_mode):
        found.append((rel, path, "file"))
    elif stat.S_ISDIR(info.st_mode):
        for name in sorted(os.listdir(path)):
            if name == ".git":
                continue
            _collect(os.path.join(path, name), rel + "/" + name, found, follow)


def parse_ls_tree(output):
    """``git ls-tree -r -l -z`` output -> (files, bytes)."""
    files = size = 0
    for record in output.split("\0"):
        if not record:
            continue
        meta = record.partition("\t")[0]
        fields = meta.split()
        if len(fields) == 4 and fields[1] == "blob":
            files += 1
            size += int(fields[3]) if fields[3].isdigit() else 0
    return files, size


class GitSession:
    """Runs git with an isolated configuration and the job's credentials (env only)."""

    def __init__(self, options, askpass_dir):
        self.git = find_tool(options.get("git") or "git")
        self.secrets = []
        extra = {
            "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_AUTHOR_NAME": options.get("author_name") or DEFAULT_AUTHOR[0],
            "GIT_AUTHOR_EMAIL": options.get("author_email") or DEFAULT_AUTHOR[1],
            "GIT_COMMITTER_NAME": options.get("author_name") or DEFAULT_AUTHOR[0],
            "GIT_COMMITTER_EMAIL": options.get("author_email") or DEFAULT_AUTHOR[1],
            "LC_ALL": "C",
        }
        password = options.get("password") or options.get("token")
        for name in ("password_file", "token_file"):
            if not password and options.get(name):
                password = read_secret_file(options[name], "config_git.%s" % name[:-5])
        for name in ("password_env", "token_env"):
            if not password and options.get(name):
                password = os.environ.get(options[name]) or None
                if password is None:
                    raise ConfigError("config_git.%s names environment variable %s, which is not set"
                                      % (name, options[name]))
        if password:
            token = any(options.get(name) for name in ("token", "token_file", "token_env"))
            askpass = os.path.join(askpass_dir, "askpass.sh")
            with open(os.open(askpass, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700), "w", encoding="ascii") as out:
                out.write(_ASKPASS)
            extra.update(GIT_ASKPASS=askpass, BIOMETRICS_GIT_PASSWORD=password,
                         BIOMETRICS_GIT_USERNAME=options.get("username") or ("git" if token else ""))
            self.secrets.append(password)
        ssh = ["ssh", "-o", "BatchMode=yes"]
        if options.get("ssh_key_file"):
            ssh += ["-i", options["ssh_key_file"], "-o", "IdentitiesOnly=yes"]
        if options.get("known_hosts_file"):
            ssh += ["-o", "UserKnownHostsFile=%s" % options["known_hosts_file"], "-o", "StrictHostKeyChecking=yes"]
        extra["GIT_SSH_COMMAND"] = " ".join(shlex.quote(part) for part in ssh)
        self.env = tool_env(extra, drop=("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_SSH"))

    def base(self, workdir=None):
        argv = [self.git]
        if workdir:
            argv += ["-C", workdir]
        # No hooks, no signing, no stored credentials, whatever the repository says.
        return argv + ["-c", "core.hooksPath=%s" % os.devnull, "-c", "commit.gpgsign=false",
                       "-c", "credential.helper=", "-c", "core.autocrlf=false", "-c", "core.symlinks=true"]

    def run(self, workdir, *args, what=None, extra_env=None, timeout=600):
        """Run git; its stdout as text. SourceError (stderr scrubbed of secrets) on failure."""
        env = dict(self.env, **extra_env) if extra_env else self.env
        return run_tool(self.base(workdir) + list(args), env=env, what=what or "git %s" % _subcommand(args),
                        secrets=self.secrets, timeout=timeout)

    def status(self, workdir, *args):
        """Exit code of a git command whose answer is its status (diff --quiet, ls-remote --exit-code)."""
        done = subprocess.run(self.base(workdir) + list(args), env=self.env, capture_output=True, check=False,
                              stdin=subprocess.DEVNULL, timeout=600)
        return done.returncode, done.stderr.decode("utf-8", "replace")

    def stream(self, workdir, *args):
        return ToolStream(self.base(workdir) + list(args), env=self.env, what="git %s" % _subcommand(args),
                          secrets=self.secrets)

    def version(self):
        return tool_version(self.git)[0]


class ConfigGitSource(Source):
    """Options: ``path`` (config directory), ``repo`` (remote URL; default env ``GIT_REPO``),
    ``branch`` (default main), ``subdir`` (where in the repository; default the job name, ``/``
    for the repository root), ``push`` (default true), ``workdir`` (a persistent clone; default
    a fresh clone per run), ``author_name``/``author_email``, ``message`` (commit message,
    ``{job}``, ``{time}``, ``{added}``, ``{modified}``, ``{deleted}`` expand), ``username`` +
    ``password_file``/``token_file`` (https), ``ssh_key_file``/``known_hosts_file`` (ssh)."""

    kind = "config_git"
    SCHEMA = Schema("source", {
        "path": Field("path", "configuration directory (default: environment variable CONFIG_PATH)", absolute=True),
        "repo": Field("str", "remote repository URL (default: environment variable GIT_REPO)", nonempty=True),
        "branch": Field("str", "branch to commit to (default main)", nonempty=True),
        "subdir": Field("str", "where in the repository (default: the job name; / for the root)", nonempty=True),
        "push": Field("bool", "push the commit (default true)"),
        "workdir": Field("path", "a persistent clone (default: a fresh clone per run)", absolute=True),
        "author_name": Field("str", "commit author name", nonempty=True),
        "author_email": Field("str", "commit author e-mail", nonempty=True),
        "message": Field("str", "commit message; {job} {time} {added} {modified} {deleted} expand", nonempty=True),
        "username": Field("str", "https user name", nonempty=True),
        "password": Field("str", "https password", secret=True),
        "token": Field("str", "https access token", secret=True),
        "ssh_key_file": Field("path", "ssh private key file"),
        "known_hosts_file": Field("path", "ssh known_hosts file (strict host key checking)"),
        "git": Field("path", "git binary (default: PATH)"),
    })

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        path = options.get("path") or os.environ.get("CONFIG_PATH")
        if not path or not os.path.isabs(path):
            raise ConfigError("config_git.path (CONFIG_PATH) must be an absolute directory path, got %r" % (path,))
        self.path = os.path.normpath(path)
        self.repo = check_repo_url(options.get("repo") or os.environ.get("GIT_REPO"))
        self.branch = options.get("branch") or "main"
        if not _BRANCH_RE.match(self.branch):
            raise ConfigError("config_git.branch %r is not a valid branch name" % self.branch)
        subdir = options.get("subdir")
        self.subdir = None if subdir is None else safe_subdir(subdir)
        self.push = options.get("push", True)
        self.workdir = options.get("workdir")
        self.message = options.get("message") or "config backup {job} {time}: {added} added, {modified} modified, {deleted} deleted"
        self._version = None

    def describe(self):
        return {"path": self.path, "repo": self.repo, "branch": self.branch,
                "subdir": self.subdir if self.subdir is not None else "(job name)", "push": self.push}

    def tool_versions(self):
        if self._version is None:
            with self._session() as session:
                self._version = session.version()
        return {"git": self._version}

    @contextlib.contextmanager
    def _session(self):
        private = tempfile.mkdtemp(prefix="config-git-")
        try:
            yield GitSession(self.options, private)
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def preflight(self):
        if not os.path.isdir(self.path):
            raise SourceError("config_git source %s is not a directory (or does not exist)" % self.path)
        with self._session() as session:
            code, err = session.status(None, "ls-remote", "--heads", self.repo, "refs/heads/%s" % self.branch)
            if code != 0:
                raise SourceError("git repository %s is not reachable: %s" % (self.repo, _scrub(err, session.secrets)))
        self.tool_versions()

    # -- producing -----------------------------------------------------------------------
    def produce(self, emit, context):
        subdir = self.subdir if self.subdir is not None else context.job
        with self._session() as session, self._workdir() as workdir:
            for attempt in range(1, PUSH_ATTEMPTS + 1):
                self._checkout(session, workdir)
                counts = self._sync(workdir, subdir)
                session.run(workdir, "add", "-A", "--", subdir or ".")
                changes = self._staged(session, workdir)
                has_head = session.status(workdir, "rev-parse", "--verify", "-q", "HEAD")[0] == 0
                changed = bool(changes) or not has_head
                if changed:
                    added, modified, deleted = (sum(1 for c in changes if c == k) for k in ("A", "M", "D"))
                    message = self.message.format(job=context.job, time=to_iso(utc_now()), added=added,
                                                  modified=modified, deleted=deleted)
                    session.run(workdir, "commit", "-q", "--allow-empty", "--no-verify", "-m", message)
                if not (changed and self.push):
                    break
                code, err = session.status(workdir, "push", "-q", "origin", "HEAD:refs/heads/%s" % self.branch)
                if code == 0:
                    break
                if attempt == PUSH_ATTEMPTS or not re.search(r"rejected|fetch first|non-fast-forward", err):
                    raise SourceError("git push to %s failed: %s" % (self.repo, _scrub(err, session.secrets)))
            commit = session.run(workdir, "rev-parse", "HEAD").strip()
            tree = self._tree(session, workdir, subdir)
            files, size = parse_ls_tree(session.run(workdir, "ls-tree", "-r", "-l", "-z", "HEAD", "--",
                                                    *([subdir] if subdir else [])))
            stream = session.stream(workdir, "bundle", "create", "-q", "-", "HEAD", "refs/heads/%s" % self.branch)
            try:
                emit(BUNDLE_PAYLOAD, stream)
            finally:
                stream.close()
        stats = {"commit": commit, "branch": self.branch, "subdir": subdir, "tree": tree, "files": files,
                 "bytes": size, "changed": changed, "pushed": bool(changed and self.push),
                 "added": sum(1 for c in changes if c == "A"), "modified": sum(1 for c in changes if c == "M"),
                 "deleted": sum(1 for c in changes if c == "D"), "source_files": counts}
        return stats

    @contextlib.contextmanager
    def _workdir(self):
        if self.workdir:
            os.makedirs(self.workdir, exist_ok=True)
            yield self.workdir
            return
        scratch = tempfile.mkdtemp(prefix="config-git-clone-")
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _checkout(self, session, workdir):
        """Make ``workdir`` a clean checkout of the remote branch (or an unborn branch)."""
        if session.status(workdir, "rev-parse", "--git-dir")[0] != 0 or not os.path.isdir(os.path.join(workdir, ".git")):
            session.run(None, "init", "-q", workdir)
        session.run(workdir, "symbolic-ref", "HEAD", "refs/heads/%s" % self.branch)
        if session.status(workdir, "remote", "get-url", "origin")[0] == 0:
            session.run(workdir, "remote", "set-url", "origin", self.repo)
        else:
            session.run(workdir, "remote", "add", "origin", self.repo)
        code, err = session.status(workdir, "ls-remote", "--exit-code", "--heads", "origin", "refs/heads/%s" % self.branch)
        if code == 0:
            session.run(workdir, "fetch", "-q", "origin", "+refs/heads/%s:refs/remotes/origin/%s" % (self.branch, self.branch))
            session.run(workdir, "checkout", "-q", "-f", "-B", self.branch, "refs/remotes/origin/%s" % self.branch)
        elif code == 2:
            # A new branch: start from nothing (no local leftovers of an earlier run).
            if session.status(workdir, "rev-parse", "--verify", "-q", "HEAD")[0] == 0:
                session.run(workdir, "update-ref", "-d", "refs/heads/%s" % self.branch)
            session.run(workdir, "read-tree", "--empty")
        else:
            raise SourceError("git repository %s is not reachable: %s" % (self.repo, _scrub(err, session.secrets)))
        session.run(workdir, "clean", "-q", "-f", "-d", "-x")

    def _sync(self, workdir, subdir):
        """Replace the repository's ``subdir`` with the config tree; return the number of entries."""
        target = os.path.join(workdir, subdir) if subdir else workdir
        if os.path.lexists(target) and not os.path.isdir(target):
            os.unlink(target)
        os.makedirs(target, exist_ok=True)
        for name in os.listdir(target):
            if name == ".git" and not subdir:
                continue
            full = os.path.join(target, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)
        try:
            entries = config_entries(self.path)
        except OSError as exc:
            raise SourceError("reading config directory %s failed: %s" % (self.path, exc.strerror)) from None
        for rel, source, kind in entries:
            dest = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if kind == "symlink":
                os.symlink(os.readlink(source), dest)
            else:
                shutil.copyfile(source, dest)
                if os.stat(source).st_mode & 0o111:
                    os.chmod(dest, 0o755)
        return len(entries)

    @staticmethod
    def _tree(session, workdir, subdir):
        """The git tree id of ``subdir`` at HEAD (the empty tree when it holds nothing)."""
        spec = "HEAD:%s" % subdir if subdir else "HEAD^{tree}"
        if session.status(workdir, "rev-parse", "--verify", "-q", spec)[0] != 0:
            return EMPTY_TREE
        return session.run(workdir, "rev-parse", spec).strip()

    @staticmethod
    def _staged(session, workdir):
        """Status letters (A, M, D, ...) of what is staged against HEAD."""
        output = session.run(workdir, "diff", "--cached", "--name-status", "-z", "--no-renames")
        fields = output.split("\0")
        return [fields[i][:1] for i in range(0, len(fields) - 1, 2) if fields[i]]


def _subcommand(args):
    """The git subcommand of an argument list (for messages): the first word not an option or its value."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--git-dir", "--work-tree", "-C", "-c"):
            skip = True
        elif not arg.startswith("-"):
            return arg
    return "command"


def _scrub(text, secrets):
    text = scrub(text, secrets)
    return " ".join(text.strip().splitlines()[-3:]) or "no error output"
