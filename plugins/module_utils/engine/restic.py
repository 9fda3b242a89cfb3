"""The restic storage format: a restic repository driven by the engine (issue 16).

A job stored in the restic format keeps its payloads in a restic repository on the same
backends as the age archives (filesystem, NFS/PVC path, S3) instead of one full archive per
backup; restic deduplicates, compresses (repository version 2) and encrypts. The engine's
manifest still lives in the job's prefix and names the snapshot (see :func:`build_manifest`
and docs/restic-format.md).

:class:`ResticRepository` maps the engine's ``storage`` options (as
``storage.location.storage_options`` returns them: checked, secrets read) to a restic
repository URL and environment and runs the restic commands the engine needs. Secrets reach
restic only through its environment (``RESTIC_PASSWORD``, ``AWS_*``), never argv, and every
message built from restic's output is scrubbed of them.

Locks: restic 0.14 has no ``--retry-lock``. A command refused because of a lock first has the
*stale* locks removed (``restic unlock``, which removes only locks restic itself considers
stale: older than 30 minutes, or taken on this host by a process that is gone) and is retried
until ``lock_wait`` seconds have passed; a live lock then raises :class:`RepositoryLockedError`
naming who holds it. In a job's pod the runner also asks the API server whether the pod named in
a lock has finished (``podlocks.py``); such a lock is stale too, and its file is deleted by id.

Standard library only (no Ansible imports).
"""

import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

from . import manifest as mf
from .errors import ConfigError, IntegrityError, NotFoundError, StorageError
from .procutil import STDERR_TAIL_LINES, _StderrTail, feed_stdin, find_tool, pump, scrub, tool_env

MIN_VERSION = (0, 14, 0)
REPOSITORY_VERSION = 2
REPOSITORY_DIR = "_restic"  # job names start with a letter or digit: no job can be named so
COMPRESSIONS = ("auto", "off", "max")
STALE_LOCK_SECONDS = 30 * 60  # restic 0.14: a lock not refreshed for 30 minutes is stale
DEFAULT_HOST = "biometrics-backup"
FORMAT_NAME = "restic"

_VERSION_RE = re.compile(r"restic (\d+)\.(\d+)\.(\d+)")
_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_TAG_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:+@-]*$")
_SNAPSHOT_RE = re.compile(r"^[0-9a-f]{8,64}$")
_LOCK_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_SUBSET_RE = re.compile(r"^(?:\d+(?:\.\d+)?%|\d+/\d+|\d+[KMGT])$")
_MAX_UNUSED_RE = re.compile(r"^(?:\d+(?:\.\d+)?%|\d+[KMGT]?|unlimited)$")
_FILENAME_RE = re.compile(r"^[A-Za-z0-9_.+][A-Za-z0-9_.+/-]*$")
# Inherited variables that would change which repository, password or settings restic uses.
_DROP_ENV = ("RESTIC_REPOSITORY", "RESTIC_REPOSITORY_FILE", "RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE",
             "RESTIC_PASSWORD_COMMAND", "RESTIC_KEY_HINT", "RESTIC_COMPRESSION", "RESTIC_PACK_SIZE",
             "RESTIC_CACHE_DIR", "RESTIC_FROM_REPOSITORY", "RESTIC_FROM_REPOSITORY_FILE", "RESTIC_FROM_PASSWORD",
             "RESTIC_FROM_PASSWORD_FILE", "RESTIC_FROM_PASSWORD_COMMAND", "RESTIC_FROM_KEY_HINT")

_LOCKED = "repository is already locked"
_WRONG_PASSWORD = "wrong password or no key found"
_NO_REPOSITORY = ("Is there a repository at the following location?", "unable to open config file")
_ABSENT = ("no such file or directory", "does not exist")
_CHECK_FOUND_ERRORS = "repository contains errors"
_DATA_ERRORS = ("ciphertext verification failed", "does not match", "hash mismatch", "invalid data returned",
                "pack file cannot be listed", "Load(<data/", "unexpected end of", "checksum mismatch",
                "no matching ID found")


class RepositoryLockedError(StorageError):
    """Another restic process holds a live lock on the repository."""


def job_repository_options(storage_options, job):
    """The storage options of the restic repository of ``job``: ``<prefix>/_restic/<job>`` of the
    same location (a name no job can have, so the catalog never takes it for a job)."""
    mf.validate_job_name(job)
    options = dict(storage_options)
    prefix = (options.get("prefix") or "").strip("/")
    options["prefix"] = "/".join(part for part in (prefix, REPOSITORY_DIR, job) if part)
    return options


def repository_location(options):
    """``(url, extended_options, flags, env)`` of the restic repository for storage ``options``.

    ``env`` holds the S3 credentials (secrets); the other three never hold a secret.
    """
    backend = options.get("backend", "filesystem")
    prefix = (options.get("prefix") or "").strip("/")
    if backend in ("filesystem", "nfs"):
        path = options.get("path")
        if not path or not os.path.isabs(path):
            raise ConfigError("storage.path must be an absolute directory for a restic repository, got %r" % (path,))
        if prefix:
            path = os.path.join(path, *prefix.split("/"))
        return "local:" + os.path.normpath(path), [], [], {}
    if backend != "s3":
        raise ConfigError("storage.backend %r cannot hold a restic repository (filesystem, nfs or s3)" % (backend,))
    for unsupported in ("server_side_encryption", "sse_kms_key_id"):
        if options.get(unsupported):
            raise ConfigError(
                "storage.%s is not supported by the restic format (restic 0.14 cannot ask S3 for "
                "server-side encryption; the repository is encrypted by restic itself): remove it "
                "or keep this job in the archive format" % unsupported)
    bucket = options.get("bucket")
    if not bucket:
        raise ConfigError("storage.bucket is required for backend s3")
    endpoint = (options.get("endpoint_url") or options.get("endpoint") or "").rstrip("/")
    region = options.get("region")
    if not endpoint:
        endpoint = "s3.%s.amazonaws.com" % region if region else "s3.amazonaws.com"
    url = "s3:%s/%s" % (endpoint, "/".join(part for part in (bucket, prefix) if part))
    path_style = options.get("path_style")
    if path_style is None:
        path_style = bool(options.get("endpoint_url") or options.get("endpoint"))
    extended = ["s3.bucket-lookup=%s" % ("path" if path_style else "auto")]
    if region:
        extended.append("s3.region=%s" % region)
    flags = []
    if options.get("verify_tls") is False:
        flags.append("--insecure-tls")
    env = {}
    if options.get("access_key") or options.get("secret_key"):
        env = {"AWS_ACCESS_KEY_ID": options.get("access_key"),
               "AWS_SECRET_ACCESS_KEY": options.get("secret_key"),
               "AWS_SESSION_TOKEN": options.get("session_token")}
    return url, extended, flags, env


def check_read_data_subset(value, name="read_data_subset"):
    """``value`` when restic check accepts it as a share of the pack data (``all``, ``n%``,
    ``n/t`` or a size such as ``500M``); ConfigError naming ``name`` otherwise."""
    if value == "all" or (isinstance(value, str) and _SUBSET_RE.match(value)):
        return value
    raise ConfigError("%s %r: use all, n%%, n/t or a size such as 500M" % (name, value))


def format_tags(tags):
    """``{"job": "pg", "kind": "postgres"}`` -> ``["job=pg", "kind=postgres"]`` (sorted), checked:
    restic separates tags with commas, so keys and values are kept to a safe alphabet."""
    result = []
    for key, value in sorted((tags or {}).items()):
        value = "" if value is None else str(value)
        if not _TAG_RE.match(str(key)) or not _TAG_VALUE_RE.match(value):
            raise ConfigError("restic tag %s=%s: use letters, digits and . _ - (values also : + @)" % (key, value))
        result.append("%s=%s" % (key, value))
    return result


def parse_tags(tags):
    """The inverse of :func:`format_tags` (tags without ``=`` map to an empty string)."""
    result = {}
    for tag in tags or ():
        key, dummy, value = tag.partition("=")
        result[key] = value
    return result


def _check_snapshot_id(snapshot):
    if not isinstance(snapshot, str) or not _SNAPSHOT_RE.match(snapshot):
        raise ConfigError("%r is not a restic snapshot id (8 to 64 lowercase hex digits)" % (snapshot,))
    return snapshot


def _snapshot_path(filename):
    if not isinstance(filename, str) or not _FILENAME_RE.match(filename) or ".." in filename.split("/"):
        raise ConfigError("restic stdin file name %r: use a relative name of letters, digits and . _ + - /"
                          % (filename,))
    return "/" + filename.strip("/")


def _parse_time(text):
    # restic writes nanoseconds; fromisoformat() takes at most microseconds.
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text or "")
    if not match:
        return None
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    fraction = (match.group(2) or "0")[:6].ljust(6, "0")
    return datetime.datetime.fromisoformat("%s.%s%s" % (match.group(1), fraction, zone))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_stale(lock, now=None, hostname=None):
    """restic 0.14's rule: older than 30 minutes, or taken on this host by a process that is gone."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    moment = _parse_time(lock.get("time"))
    if moment is None or (now - moment).total_seconds() > STALE_LOCK_SECONDS:
        return True
    if lock.get("hostname") == (hostname or socket.gethostname()):
        pid = lock.get("pid")
        return isinstance(pid, int) and not _pid_alive(pid)
    return False


def parse_backup_summary(lines):
    """The ``summary`` message of ``restic backup --json`` output lines, or None."""
    summary = None
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("message_type") == "summary":
            summary = message
    return summary


class _Done:
    """What a finished restic command left: return code, stdout text (or None), stderr tail."""

    def __init__(self, returncode, stdout, stderr_text):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr_text = stderr_text


class _JsonLines(threading.Thread):
    """Reads ``restic ... --json`` stdout, keeping the summary and the last non-status lines."""

    def __init__(self, pipe):
        super().__init__(name="restic-json", daemon=True)
        self._pipe = pipe
        self.lines = []

    def run(self):
        try:
            for raw in iter(self._pipe.readline, b""):
                line = raw.decode("utf-8", "replace").strip()
                if line and '"message_type":"status"' not in line:
                    self.lines.append(line[:4000])
                    del self.lines[:-STDERR_TAIL_LINES]
        except (OSError, ValueError):
            pass


class _DumpReader:
    """The stdout of a running ``restic dump``; see :meth:`ResticRepository.open_dump`."""

    def __init__(self, repository, proc):
        self._repository = repository
        self._proc = proc
        self._tail = _StderrTail(proc.stderr)
        self._tail.start()
        self._done = False

    def read(self, size=-1):
        if self._done:
            return b""
        data = self._proc.stdout.read(size if size and size > 0 else 1 << 20)
        if data:
            return data
        self._done = True
        returncode = self._proc.wait()
        self._tail.join()
        self._proc.stdout.close()
        if returncode != 0:
            done = _Done(returncode, None, self._tail.text())
            data_error = any(marker in (done.stderr_text or "") for marker in _DATA_ERRORS)
            raise self._repository._failure(  # pylint: disable=protected-access
                "dump", done, IntegrityError if data_error else StorageError)
        return b""

    def close(self):
        stopped_early = self._proc.poll() is None
        if stopped_early:
            # A reader that stops early (a target that failed half-way, an interrupt): a dump
            # writes nothing, so SIGTERM is safe and lets restic remove its own lock.
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc.wait()
        self._tail.join()
        self._proc.stdout.close()
        self._done = True
        if stopped_early:
            # A lock it could not remove would keep other hosts' commands out for 30 minutes.
            self._repository._unlock_quietly()  # pylint: disable=protected-access


class ResticRepository:
    """One restic repository at the location ``storage_options`` describe.

    ``password`` opens the repository; ``compression`` is restic's ``--compression``;
    ``host`` is recorded in every snapshot (a fixed name: pods change hostnames, and restic
    picks a directory backup's parent snapshot by host and paths); ``cache_dir`` is restic's
    cache (default: restic's own, under ``$XDG_CACHE_HOME`` or ``~/.cache``; ``False`` for
    none); ``lock_wait`` is how many seconds a command waits for another job's live lock.
    ``lock_holders`` (a ``podlocks.PodLockHolders``) proves a lock stale when the pod that holds
    it has finished; ``notice`` receives one line per lock removed that way.
    """

    def __init__(self, storage_options, password, restic=None, compression="auto", host=DEFAULT_HOST,
                 cache_dir=None, lock_wait=0, timeout=6 * 3600, lock_holders=None, notice=None, served_at=None):
        if not isinstance(password, str) or not password:
            raise ConfigError("the restic repository password is empty: give it through a Secret, "
                              "a *_file or a *_env reference")
        if compression not in COMPRESSIONS:
            raise ConfigError("restic compression %r is unknown; use one of: %s" % (compression, ", ".join(COMPRESSIONS)))
        if not isinstance(lock_wait, (int, float)) or isinstance(lock_wait, bool) or lock_wait < 0:
            raise ConfigError("lock_wait must be a number of seconds >= 0, got %r" % (lock_wait,))
        self.options = dict(storage_options)
        self.url, extended, flags, self._credentials = repository_location(self.options)
        self._served = None
        if served_at is not None:
            # The repository at ``storage_options``, reached through a restichttp.RepositoryServer
            # (``served_at``: the server). Its URL holds the server's credentials, so it goes to
            # restic in RESTIC_REPOSITORY, and restic needs no credentials of the location.
            self._served = served_at
            self.url = "%s (through %s)" % (self.url, served_at.describe())
            extended, flags, self._credentials = [], [], {}
        self._password = password
        self._secrets = tuple(s for s in (password, self._credentials.get("AWS_SECRET_ACCESS_KEY"),
                                          self._credentials.get("AWS_SESSION_TOKEN"),
                                          served_at.secret if served_at is not None else None) if s)
        self._extended, self._flags = extended, flags
        self.compression = compression
        self.host = host
        self.lock_wait = lock_wait
        self.timeout = timeout
        self.binary = restic if restic and os.path.isabs(restic) else find_tool(restic or "restic")
        self._global = ([] if served_at is not None else ["--repo", self.url]) + ["--compression", compression]
        for option in extended:
            self._global += ["--option", option]
        self._global += flags
        if cache_dir is False:
            self._global.append("--no-cache")
        elif cache_dir:
            self._global += ["--cache-dir", cache_dir]
        self._version = None
        self._config = None
        self._storage = None
        self._copy_source_env = {}
        self._lock_peers = ()   # the other repository a running restic copy locks (see copy_from)
        self.lock_holders = lock_holders
        self._holders_reported = False
        self.notice = notice or (lambda line: None)
        # A runner killed while it streams into restic closes restic's stdin, which restic
        # takes for the end of the stream: it would commit a snapshot of the truncated bytes.
        # setpriv (util-linux, in every Debian image) execs restic with a parent-death signal.
        self._setpriv = shutil.which("setpriv")

    # -- plumbing ---------------------------------------------------------------------------

    def describe(self):
        """The repository URL (no secret in it)."""
        return self.url

    def _env(self):
        extra = {"RESTIC_PASSWORD": self._password, "RESTIC_PROGRESS_FPS": "0.2"}
        if self._credentials:
            extra.update(self._credentials)
        if self._served is not None:
            extra["RESTIC_REPOSITORY"] = self._served.url
        extra.update(self._copy_source_env)
        return tool_env(extra, drop=_DROP_ENV)

    def _argv(self, args, tied=False):
        """restic's argv; ``tied``: restic is killed when this process dies (see ``_tie``)."""
        prefix = [self._setpriv, "--pdeathsig", "KILL"] if tied and self._setpriv else []
        return prefix + [self.binary] + self._global + list(args)

    def _failure(self, what, done, error_class):
        """The error for a failed command, classified by restic's own words, scrubbed."""
        text = scrub(done.stderr_text or "", self._secrets)
        if _WRONG_PASSWORD in text:
            return ConfigError("restic repository %s: the password does not open it (wrong password or "
                               "no key found)" % self.url)
        if any(marker in text for marker in _NO_REPOSITORY):
            if any(marker in text for marker in _ABSENT):
                return NotFoundError("there is no restic repository at %s (initialise it first): %s" % (self.url, text))
            return StorageError("cannot open the restic repository at %s: %s" % (self.url, text))
        if _LOCKED in text:
            return RepositoryLockedError(
                "restic repository %s%s is locked by another process and the lock is live (not stale), "
                "so it was not removed; %s refused: %s"
                % (self.url, "".join(" (or %s)" % peer.url for peer in self._lock_peers), what, text))
        if done.returncode is not None and done.returncode < 0:
            status = "was killed by signal %d" % -done.returncode
        else:
            status = "failed (exit %s)" % done.returncode
        return error_class("restic %s %s on %s: %s" % (what, status, self.url, text or "no error output"))

    def _run_once(self, args, timeout=None):
        try:
            done = subprocess.run(self._argv(args), env=self._env(), capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=timeout or self.timeout, check=False)
        except OSError as exc:
            raise ConfigError("cannot start restic (%s): %s" % (self.binary, exc.strerror)) from None
        except subprocess.TimeoutExpired:
            raise StorageError("restic %s did not finish within %d seconds on %s"
                               % (args[0], timeout or self.timeout, self.url)) from None
        stderr = done.stderr.decode("utf-8", "replace").splitlines()
        stderr_text = "; ".join(line.strip() for line in stderr[-STDERR_TAIL_LINES:] if line.strip())
        return _Done(done.returncode, done.stdout.decode("utf-8", "replace"), stderr_text)

    def _run(self, args, what=None, error_class=StorageError, timeout=None, retry_locked=True):
        """Run a restic command; return its stdout. A refusal because of a lock removes stale locks
        and retries until ``lock_wait`` has passed."""
        what = what or args[0]
        deadline = time.monotonic() + self.lock_wait
        while True:
            done = self._run_once(args, timeout)
            if done.returncode == 0:
                return done.stdout
            error = self._failure(what, done, error_class)
            if not (retry_locked and isinstance(error, RepositoryLockedError)) or not self._wait_out_lock(deadline):
                raise error

    def _wait_out_lock(self, deadline):
        """After a refusal because of a lock: remove the stale locks and retry at once if one went,
        else wait a little; False once ``deadline`` has passed. Tried at every retry, not once: the
        lock of a job killed a moment ago is live until its process is reaped, stale after."""
        freed = False
        for repository in (self,) + self._lock_peers:   # restic copy locks its source as well
            try:
                freed = bool(repository.unlock_stale()) or freed
            except StorageError:
                pass  # the lock listing failed this time: the lock stays, and so does the wait
        if freed:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        return True

    # -- repository -------------------------------------------------------------------------

    def version(self):
        """restic's version as ``(text, (major, minor, patch))``; ConfigError below 0.14.0."""
        if self._version is None:
            done = self._run_once_plain([self.binary, "version"])
            match = _VERSION_RE.search(done)
            if match is None:
                raise ConfigError("cannot read the version of %s from %r" % (self.binary, done.strip()[:200]))
            numbers = tuple(int(part) for part in match.groups())
            text = "%d.%d.%d" % numbers
            if numbers < MIN_VERSION:
                raise ConfigError(
                    "restic %s (%s) is too old for the restic format: it needs %s or newer "
                    "(repository version 2 with compression)" % (text, self.binary, ".".join(map(str, MIN_VERSION))))
            self._version = (text, numbers)
        return self._version

    def _run_once_plain(self, argv):
        try:
            done = subprocess.run(argv, env=tool_env({}, drop=_DROP_ENV), capture_output=True,
                                  stdin=subprocess.DEVNULL, timeout=60, check=False)
        except OSError as exc:
            raise ConfigError("cannot start restic (%s): %s" % (argv[0], exc.strerror)) from None
        except subprocess.TimeoutExpired:
            raise ConfigError("%s version did not answer within 60 seconds" % argv[0]) from None
        if done.returncode != 0:
            raise ConfigError("%s version failed (exit %d)" % (argv[0], done.returncode))
        return done.stdout.decode("utf-8", "replace")

    def config(self):
        """The repository's config (``id``, ``version``...); NotFoundError when there is none.

        Read once per instance: a repository's config never changes, and every restic start
        costs its key derivation (about half a second)."""
        if self._config is None:
            text = self._run(["cat", "config", "--no-lock"], what="cat config")
            try:
                config = json.loads(text)
            except ValueError:
                raise StorageError("restic cat config on %s returned no JSON" % self.url) from None
            self._config = {key: config.get(key) for key in ("id", "version")}
        return dict(self._config)

    def init_if_missing(self):
        """Create the repository (version 2, compression) unless it exists; True when created.

        A repository that exists but does not open with the password is an error, never
        re-initialised.
        """
        self.version()
        try:
            self.config()
            return False
        except NotFoundError:
            pass
        done = self._run_once(["init", "--repository-version", str(REPOSITORY_VERSION)])
        if done.returncode == 0:
            return True
        if "config file already exists" in (done.stderr_text or ""):
            self.config()  # another job created it meanwhile: it must open with our password
            return False
        raise self._failure("init", done, StorageError)

    # -- backups ----------------------------------------------------------------------------

    def backup_stream(self, readable, filename, tags, time_=None):
        """Store the bytes of ``readable`` as the file ``filename`` of a new snapshot.

        Returns ``{snapshot_id, short_id, size, sha256, data_added, total_bytes_processed,
        duration_seconds, summary}`` where ``size``/``sha256`` describe the bytes read from
        ``readable``. If ``readable`` raises (a failed source), restic is killed before its
        stdin is closed, so no snapshot of a truncated stream is ever written; the error
        propagates.
        """
        self.version()
        path = _snapshot_path(filename)
        args = ["backup", "--json", "--stdin", "--stdin-filename", path.lstrip("/"), "--host", self.host]
        for tag in format_tags(tags):
            args += ["--tag", tag]
        if time_:
            args += ["--time", time_]
        self._wait_for_exclusive_locks()
        try:
            proc = subprocess.Popen(self._argv(args, tied=True), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self._env(), close_fds=True)
        except OSError as exc:
            raise ConfigError("cannot start restic (%s): %s" % (self.binary, exc.strerror)) from None
        tail = _StderrTail(proc.stderr)
        out = _JsonLines(proc.stdout)
        tail.start()
        out.start()
        try:
            sha256, size, broken = feed_stdin(proc, readable)
            returncode = proc.wait()
        except BaseException:
            self._abandon(proc, tail, out)
            raise
        tail.join()
        out.join()
        done = _Done(returncode, None, tail.text())
        if returncode != 0 or broken:
            if returncode == 0:
                done.returncode = "0, but it stopped reading its input"
            raise self._failure("backup", done, StorageError)
        summary = parse_backup_summary(out.lines)
        if summary is None or not summary.get("snapshot_id"):
            raise StorageError("restic backup on %s wrote no summary with a snapshot id" % self.url)
        if summary.get("total_bytes_processed") not in (None, size):
            raise IntegrityError("restic backup stored %s bytes of %s, %d were streamed"
                                 % (summary.get("total_bytes_processed"), filename, size))
        return self._backup_result(summary, [path], size=size, sha256=sha256)

    def backup_directory(self, path, tags, excludes=(), time_=None):
        """Back up the directory ``path`` (restic's change detection against the newest snapshot
        of the same host and path); returns the same fields as :meth:`backup_stream` without
        ``sha256`` (``size`` is the bytes processed)."""
        self.version()
        if not os.path.isabs(path) or not os.path.isdir(path):
            raise ConfigError("%s is not an absolute path of a directory" % (path,))
        args = ["backup", "--json", "--host", self.host]
        for tag in format_tags(tags):
            args += ["--tag", tag]
        for pattern in excludes:
            args += ["--exclude", pattern]
        if time_:
            args += ["--time", time_]
        args += ["--", os.path.normpath(path)]
        self._wait_for_exclusive_locks()
        # restic exits 3 when some files could not be read: the snapshot then lacks them.
        done = self._run_once(args)
        if done.returncode == 3:
            raise StorageError("restic backup of %s could not read some files (the snapshot it wrote is "
                               "incomplete): %s" % (path, scrub(done.stderr_text, self._secrets)))
        if done.returncode != 0:
            raise self._failure("backup", done, StorageError)
        summary = parse_backup_summary(done.stdout.splitlines())
        if summary is None or not summary.get("snapshot_id"):
            raise StorageError("restic backup on %s wrote no summary with a snapshot id" % self.url)
        return self._backup_result(summary, [os.path.normpath(path)], size=summary.get("total_bytes_processed"),
                                   sha256=None)

    def _backup_result(self, summary, paths, size, sha256):
        full = self._full_snapshot_id(summary["snapshot_id"])
        return {
            "snapshot_id": full, "short_id": full[:8], "paths": paths, "size": size, "sha256": sha256,
            "data_added": summary.get("data_added"),
            "total_bytes_processed": summary.get("total_bytes_processed"),
            "files_new": summary.get("files_new"), "files_changed": summary.get("files_changed"),
            "files_unmodified": summary.get("files_unmodified"),
            "duration_seconds": summary.get("total_duration"),
        }

    def _full_snapshot_id(self, short):
        """The full id of the snapshot a backup reported by its short id (restic 0.14's summary):
        the one name under the repository's ``snapshots/`` that starts with it, listed through
        the engine's storage (no restic start, whose key derivation costs about half a second,
        and no decryption of every snapshot); restic's own listing when that is not conclusive."""
        _check_snapshot_id(short)
        try:
            names = [info.key.rsplit("/", 1)[-1] for info in self._location().list("snapshots/")]
        except (StorageError, ConfigError, NotFoundError):
            names = []
        found = [name for name in names if len(name) == 64 and name.startswith(short) and _SNAPSHOT_RE.match(name)]
        if len(found) == 1:
            return found[0]
        return self.snapshot(short)["id"]

    def has_snapshot(self, snapshot_id):
        """Whether the repository holds the snapshot with the full id ``snapshot_id``.

        Snapshot files are named by their full id, so the engine's storage confirms one (a stat
        or HEAD request) where ``restic snapshots`` would cost a restic start with its key
        derivation and the decryption of every snapshot of the repository. Only a snapshot the
        storage does not confirm is looked up by restic: a storage that answers "no" for a file
        it cannot read (permissions, a stale NFS handle) must not make an intact backup look
        damaged. Whether the snapshot reads back intact is for the ``restic dump`` that streams
        it to tell."""
        _check_snapshot_id(snapshot_id)
        if len(snapshot_id) == 64:
            try:
                if self._location().exists("snapshots/" + snapshot_id):
                    return True
            except (StorageError, ConfigError):
                pass
        try:
            self.snapshot(snapshot_id)
        except NotFoundError:
            return False
        return True

    def snapshot(self, snapshot):
        """One snapshot by (short or full) id; NotFoundError when the repository has none such."""
        _check_snapshot_id(snapshot)
        found = [s for s in self._snapshots_json(["--no-lock"]) if s.get("id", "").startswith(snapshot)]
        if len(found) != 1:
            raise NotFoundError("restic repository %s has %s snapshot %s"
                                % (self.url, "no" if not found else "more than one", snapshot))
        return found[0]

    def snapshots(self, tags=None):
        """Snapshots carrying every tag of ``tags`` (a dict), oldest first, each with ``tag_map``."""
        args = ["--no-lock"]
        if tags:
            args += ["--tag", ",".join(format_tags(tags))]
        result = self._snapshots_json(args)
        for snap in result:
            snap["tag_map"] = parse_tags(snap.get("tags"))
        result.sort(key=lambda s: (_parse_time(s.get("time")) or datetime.datetime.min.replace(
            tzinfo=datetime.timezone.utc), s.get("id", "")))
        return result

    def _snapshots_json(self, args):
        text = self._run(["snapshots", "--json"] + args, what="snapshots")
        try:
            result = json.loads(text or "[]")
        except ValueError:
            raise StorageError("restic snapshots on %s returned no JSON" % self.url) from None
        return result or []

    # -- verification and restore -------------------------------------------------------------

    def check(self, read_data_subset=None):
        """``restic check``: structure always; pack data too with ``read_data_subset`` ``"all"``,
        ``"n%"``, ``"n/t"`` or a size (``"500M"``). Errors found raise IntegrityError.

        Returns the output's last lines (scrubbed)."""
        args = ["check"]
        if read_data_subset in ("all", True):
            args.append("--read-data")
        elif read_data_subset:
            args.append("--read-data-subset=%s" % check_read_data_subset(read_data_subset))
        deadline = time.monotonic() + self.lock_wait
        while True:
            done = self._run_once(args)
            output = [line for line in (done.stdout or "").splitlines() if line.strip()]
            if done.returncode == 0:
                return [scrub(line, self._secrets) for line in output[-STDERR_TAIL_LINES:]]
            found_errors = _CHECK_FOUND_ERRORS in (done.stderr_text or "") + (done.stdout or "")
            error = self._failure("check", done, IntegrityError if found_errors else StorageError)
            if isinstance(error, RepositoryLockedError):
                if self._wait_out_lock(deadline):
                    continue
                raise error
            if isinstance(error, IntegrityError):
                found = "; ".join(line.strip() for line in output[-STDERR_TAIL_LINES:]
                                  if "error" in line.lower() or "fail" in line.lower() or "mismatch" in line.lower())
                raise IntegrityError("restic check found errors in %s: %s%s"
                                     % (self.url, scrub(found, self._secrets) or "see restic's output",
                                        "; " + scrub(done.stderr_text, self._secrets) if done.stderr_text else ""))
            raise error

    def dump(self, snapshot, filename, writer):
        """Stream the file ``filename`` of ``snapshot`` into ``writer`` (``.write(bytes)``);
        returns ``{"size", "sha256"}`` of what was written."""
        _check_snapshot_id(snapshot)
        path = _snapshot_path(filename)
        try:
            proc = subprocess.Popen(self._argv(["dump", snapshot, path]), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._env(), close_fds=True)
        except OSError as exc:
            raise ConfigError("cannot start restic (%s): %s" % (self.binary, exc.strerror)) from None
        tail = _StderrTail(proc.stderr)
        tail.start()
        try:
            sha256, size = pump(proc.stdout.read, writer.write)
            returncode = proc.wait()
        except BaseException:
            self._abandon(proc, tail)
            raise
        finally:
            proc.stdout.close()
        tail.join()
        if returncode != 0:
            done = _Done(returncode, None, tail.text())
            data_error = any(marker in (done.stderr_text or "") for marker in _DATA_ERRORS)
            raise self._failure("dump", done, IntegrityError if data_error else StorageError)
        return {"size": size, "sha256": sha256}

    def open_dump(self, snapshot, filename):
        """A reader of the file ``filename`` of ``snapshot`` (``restic dump`` streaming): ``read(n)``
        returns bytes, and at the end raises IntegrityError (damaged data) or StorageError when
        restic failed; ``close()`` stops restic early. The caller hashes what it reads."""
        _check_snapshot_id(snapshot)
        path = _snapshot_path(filename)
        self.version()
        try:
            proc = subprocess.Popen(self._argv(["dump", snapshot, path], tied=True), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._env(), close_fds=True)
        except OSError as exc:
            raise ConfigError("cannot start restic (%s): %s" % (self.binary, exc.strerror)) from None
        return _DumpReader(self, proc)

    def restore(self, snapshot, target_dir, verify=True, include=None):
        """``restic restore <snapshot> --target <target_dir>`` (``--verify`` re-reads what was written)."""
        _check_snapshot_id(snapshot)
        if not os.path.isabs(target_dir):
            raise ConfigError("restore target %r must be an absolute directory" % (target_dir,))
        args = ["restore", snapshot, "--target", target_dir]
        if verify:
            args.append("--verify")
        if include:
            args += ["--include", include]
        done = self._run_once(args)
        if done.returncode != 0:
            data_error = any(marker in (done.stderr_text or "") for marker in _DATA_ERRORS)
            raise self._failure("restore", done, IntegrityError if data_error else StorageError)
        return {"target": target_dir}

    # -- retention ----------------------------------------------------------------------------

    def forget(self, ids):
        """Remove the snapshots ``ids`` (no data is deleted until :meth:`prune`); returns them."""
        ids = [_check_snapshot_id(i) for i in ids]
        if not ids:
            return []
        self._run(["forget"] + ids, what="forget")
        return ids

    def prune(self, max_unused="5%", max_repack_size=None):
        """``restic prune``: delete the data no snapshot references (packs less than ``max_unused``
        unused are kept as they are); returns restic's report lines."""
        args = ["prune"]
        if max_unused is not None:
            if not _MAX_UNUSED_RE.match(str(max_unused)):
                raise ConfigError("max_unused %r: use n%%, a size such as 100M, or unlimited" % (max_unused,))
            args.append("--max-unused=%s" % max_unused)
        if max_repack_size:
            args.append("--max-repack-size=%s" % max_repack_size)
        text = self._run(args, what="prune")
        return [scrub(line, self._secrets) for line in (text or "").splitlines() if line.strip()][-40:]

    # -- locks --------------------------------------------------------------------------------

    def locks(self):
        """Every lock in the repository: ``id``, ``time``, ``exclusive``, ``hostname``, ``pid``,
        ``stale`` (restic's rule, see :func:`lock_is_stale`, or a finished holder pod, then
        ``holder_finished`` says why)."""
        ids = [line.strip() for line in self._run(["list", "locks", "--no-lock"], what="list locks",
                                                  retry_locked=False).splitlines() if line.strip()]
        result = []
        for lock_id in ids:
            done = self._run_once(["cat", "lock", lock_id, "--no-lock"])
            if done.returncode != 0:
                continue  # removed between the listing and now
            try:
                lock = json.loads(done.stdout)
            except ValueError:
                continue
            entry = {"id": lock_id, "time": lock.get("time"), "exclusive": bool(lock.get("exclusive")),
                     "hostname": lock.get("hostname"), "pid": lock.get("pid")}
            entry["stale"] = lock_is_stale(entry)
            if not entry["stale"] and self.lock_holders is not None:
                entry["holder_finished"] = self.lock_holders.finished(entry)
                entry["stale"] = entry["holder_finished"] is not None
                if self.lock_holders.unusable_reason and not self._holders_reported:
                    self._holders_reported = True
                    self.notice("cannot ask the API server whether the pod holding a lock of restic repository %s "
                                "has finished, so restic's 30-minute rule stands (asked no more in this run): %s"
                                % (self.url, self.lock_holders.unusable_reason))
            result.append(entry)
        return result

    def unlock_stale(self):
        """Remove the stale locks; returns the ids removed. restic's own ``restic unlock`` removes
        those stale by its rule (it never removes a live one); a lock whose holder pod has finished
        is live to restic for 30 minutes, so its file is deleted from ``locks/`` by name."""
        locks = self.locks()
        stale = [lock["id"] for lock in locks if lock["stale"]]
        if not stale:
            return []
        if any(lock["stale"] and not lock.get("holder_finished") for lock in locks):
            self._run(["unlock"], what="unlock", retry_locked=False)
        for lock in locks:
            if lock.get("holder_finished") and _LOCK_ID_RE.match(lock["id"]):
                self._location().delete("locks/" + lock["id"])
                self.notice("removed the lock %s of PID %s on %s from restic repository %s: %s"
                            % (lock["id"][:12], lock["pid"], lock["hostname"], self.url, lock["holder_finished"]))
        remaining = {lock["id"] for lock in self.locks()}
        return [lock_id for lock_id in stale if lock_id not in remaining]

    def _abandon(self, proc, *readers):
        """After an error in the middle of a command: kill restic first (closing its stdin would
        tell it the stream ended, and it would commit a snapshot of the truncated data), reap
        it, stop the output readers and remove the lock it leaves behind."""
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for reader in readers:
            reader.join()
        self._unlock_quietly()

    def _unlock_quietly(self):
        try:
            self.unlock_stale()
        except (StorageError, ConfigError):
            pass

    def _wait_for_exclusive_locks(self):
        """Before a backup (which cannot be retried once its input was read): wait until no live
        exclusive lock (prune, forget, check) is held, up to ``lock_wait`` seconds."""
        if self._lock_files_present() is False:
            return
        deadline = time.monotonic() + self.lock_wait
        while True:
            locks = self.locks()
            live = [lock for lock in locks if lock["exclusive"] and not lock["stale"]]
            if not live:
                if any(lock["stale"] for lock in locks):
                    self._unlock_quietly()
                return
            if time.monotonic() >= deadline:
                holder = live[0]
                raise RepositoryLockedError(
                    "restic repository %s is locked exclusively by PID %s on %s since %s (a prune, forget "
                    "or check of another job; the lock is live, not stale): backup refused"
                    % (self.url, holder["pid"], holder["hostname"], holder["time"]))
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def _lock_files_present(self):
        """Whether the repository's ``locks/`` holds any object, listed through the engine's own
        storage instead of a restic start (whose key derivation costs about half a second): the
        common case, no lock at all, then needs no restic command. Anything there, a lock being
        written included, sends the caller to restic's own listing; None when it cannot be listed."""
        try:
            return bool(self._location().list("locks/"))
        except (StorageError, ConfigError, NotFoundError):
            return None

    def _location(self):
        """The repository's location as an engine Storage (listings without restic), built once."""
        if self._storage is None:
            from .storage.location import build_storage  # pylint: disable=import-outside-toplevel
            self._storage = build_storage(self.options)
        return self._storage

    # -- copies -------------------------------------------------------------------------------

    def copy_from(self, source, snapshot_ids):
        """``restic copy`` of ``snapshot_ids`` (full ids) from the repository ``source`` into this
        one, which is created with the source's chunker parameters when it does not exist (so
        that what both store chunks alike). restic skips a snapshot copied before; see
        :meth:`origins` for the ids the copies have here.

        This repository is normally one a RepositoryServer serves (``served_at``): restic then
        takes only the source's S3 credentials from its environment. A copy refused because of
        a lock removes the stale locks of both repositories (``_lock_peers``) and is retried
        until ``lock_wait`` has passed; then RepositoryLockedError names both."""
        for snapshot in snapshot_ids:
            if not isinstance(snapshot, str) or not _LOCK_ID_RE.match(snapshot):
                raise ConfigError("restic copy needs full snapshot ids, got %r" % (snapshot,))
        self.version()
        # pylint: disable=protected-access
        source_args = ["--from-repo", source.url] + source._flags
        for option in source._extended:
            source_args += ["--option", option]
        self._copy_source_env = dict(source._credentials, RESTIC_FROM_PASSWORD=source._password)
        self._lock_peers = (source,)
        secrets_before = self._secrets
        self._secrets = self._secrets + source._secrets
        # pylint: enable=protected-access
        try:
            try:
                self.config()
            except NotFoundError:
                done = self._run_once(["init", "--repository-version", str(REPOSITORY_VERSION),
                                       "--copy-chunker-params"] + source_args)
                try:
                    self.config()  # created now, or by another copy meanwhile: it must open with our password
                except NotFoundError:
                    raise self._failure("init", done, StorageError) from None
            if snapshot_ids:
                self._run(["copy"] + source_args + list(snapshot_ids), what="copy")
        finally:
            self._copy_source_env = {}
            self._lock_peers = ()
            self._secrets = secrets_before

    def origins(self):
        """``{original snapshot id: snapshot id here}`` of the snapshots ``restic copy`` made here.
        restic records in each copy the id of the first snapshot of its line (a copy of a copy
        names the snapshot the first copy was made from), as :meth:`lineage` does for a source.
        Where several copies name one original (two copies that raced), the first by id stands."""
        found = {}
        for snap in sorted(self._snapshots_json(["--no-lock"]), key=lambda item: str(item.get("id"))):
            if isinstance(snap.get("original"), str) and isinstance(snap.get("id"), str):
                found.setdefault(snap["original"], snap["id"])
        return found

    def lineage(self):
        """``{snapshot id: the original it stands for}`` of every snapshot here: its ``original``
        when it is a copy, else itself (the key restic copy records and matches by)."""
        return {snap["id"]: snap.get("original") or snap["id"] for snap in self._snapshots_json(["--no-lock"])
                if isinstance(snap.get("id"), str)}

    # -- size ---------------------------------------------------------------------------------

    def snapshot_arrivals(self):
        """``{snapshot id: when its file was stored}`` (the storage's modification times), read
        without a restic start."""
        return {info.key.rsplit("/", 1)[-1]: info.modified for info in self._location().list("snapshots/")}

    def stored_bytes(self):
        """Bytes the repository occupies in storage (every object under its location)."""
        return sum(info.size for info in self._location().list(""))


def build_manifest(backup_id, job, kind, started_at, finished_at, result, repository, tool_versions, stats,
                   filename=None, parent=None, source=None, extra=None):
    """The engine manifest of a backup stored in the restic format.

    ``result`` is what :meth:`ResticRepository.backup_stream` (``filename`` given) or
    :meth:`ResticRepository.backup_directory` returned; ``repository`` is the repository's
    ``config()`` (its ``id`` binds the manifest to that repository). The manifest keeps the
    engine's shape (one entry in ``objects``, so ``size_bytes``, ``backup_info``, metrics and
    the size anomaly work as for archives) and adds ``storage_format: restic`` and a
    ``restic`` section naming the snapshot. For a stream the object entry is the stream's
    size and SHA-256 (a ``restic dump`` must reproduce them); for a directory it is the bytes
    processed and the snapshot id (itself restic's SHA-256 of the snapshot).
    """
    if filename is not None:
        _snapshot_path(filename)
        entry = {"name": filename, "payload": filename, "size": result["size"], "sha256": result["sha256"]}
    else:
        entry = {"name": "snapshot", "payload": "directory", "size": result["total_bytes_processed"] or 0,
                 "sha256": result["snapshot_id"]}
    entry["restic_snapshot"] = result["snapshot_id"]
    section = {
        "snapshot_id": result["snapshot_id"],
        "repository_id": (repository or {}).get("id"),
        "repository_version": (repository or {}).get("version"),
        "paths": result.get("paths"),
        "data_added": result.get("data_added"),
        "total_bytes_processed": result.get("total_bytes_processed"),
    }
    merged = {"storage_format": FORMAT_NAME, "restic": section}
    merged.update(extra or {})
    return mf.build(backup_id, job, kind, started_at, finished_at, [entry],
                    compression={"algorithm": "restic"}, encryption={"mode": "restic"},
                    tool_versions=tool_versions, stats=stats, parent=parent, source=source, extra=merged)


def build_streams_manifest(backup_id, job, kind, started_at, finished_at, streams, repository, tool_versions,
                           stats, source=None, extra=None):
    """The engine manifest of a backup whose payloads were streamed into restic, one snapshot
    per payload: ``streams`` is ``[(payload name, backup_stream result), ...]`` in the order
    they were written. Each object entry holds the size and SHA-256 of the streamed bytes and
    its snapshot; ``restic.snapshot_id`` is the last one, ``restic.snapshots`` all of them."""
    if not streams:
        raise ConfigError("a restic-format manifest needs at least one stream")
    entries = []
    for filename, result in streams:
        _snapshot_path(filename)
        entries.append({"name": filename, "payload": filename, "size": result["size"], "sha256": result["sha256"],
                        "raw_bytes": result["size"], "restic_snapshot": result["snapshot_id"]})
    section = {
        "snapshot_id": streams[-1][1]["snapshot_id"],
        "snapshots": [result["snapshot_id"] for dummy, result in streams],
        "repository_id": (repository or {}).get("id"),
        "repository_version": (repository or {}).get("version"),
        "paths": [path for dummy, result in streams for path in (result.get("paths") or [])],
        "data_added": sum(result.get("data_added") or 0 for dummy, result in streams),
        "total_bytes_processed": sum(result.get("total_bytes_processed") or 0 for dummy, result in streams),
    }
    merged = {"storage_format": FORMAT_NAME, "restic": section}
    merged.update(extra or {})
    return mf.build(backup_id, job, kind, started_at, finished_at, entries,
                    compression={"algorithm": "restic"}, encryption={"mode": "restic"},
                    tool_versions=tool_versions, stats=stats, source=source, extra=merged)


def manifest_snapshots(manifest):
    """Every restic snapshot id a manifest names (its payloads' and ``restic.snapshot_id``),
    [] for an archive-format manifest."""
    first = manifest_snapshot(manifest)
    if first is None:
        return []
    found = []
    for snapshot in [obj.restic_snapshot for obj in mf.Manifest.wrap(manifest).objects] + [first]:
        if snapshot and snapshot not in found:
            if not isinstance(snapshot, str) or not re.match(r"^[0-9a-f]{64}$", snapshot):
                raise IntegrityError("manifest %s/%s names %r as a restic snapshot"
                                     % (manifest.get("job"), manifest.get("id"), snapshot))
            found.append(snapshot)
    return found


def manifest_snapshot(manifest):
    """The restic snapshot id a manifest names, or None for an archive-format manifest."""
    manifest = mf.Manifest.wrap(manifest)
    if manifest.storage_format != FORMAT_NAME:
        return None
    snapshot = manifest.restic.get("snapshot_id")
    if not isinstance(snapshot, str) or not re.match(r"^[0-9a-f]{64}$", snapshot):
        raise IntegrityError("manifest %s/%s is in the restic format but names no snapshot id"
                             % (manifest.get("job"), manifest.get("id")))
    return snapshot
