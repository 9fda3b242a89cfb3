"""Running the external tools that sources and targets drive (pg_dump, redis-cli, ...).

Three shapes cover every use:

* ``ToolStream``: a tool whose stdout *is* the backup payload, read as a stream;
* ``feed_tool``: a tool that reads a payload on stdin (pg_restore);
* ``run_tool``: a short command whose (small) output we want (``--version``, psql -c).

Secrets reach tools only through the environment (``PGPASSWORD``, ``REDISCLI_AUTH``),
never through argv, and every error message built from a tool's stderr goes through
``scrub`` so that a secret a tool echoes back never reaches a log or a report.

``pipeline.ProducerStream`` is the in-process counterpart (a Python function writing into
a pipe); tools write straight into an OS pipe that we read, so no copying thread is needed.
"""

import collections
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading

from .errors import ConfigError, SourceError

CHUNK = 1 << 20
STDERR_TAIL_LINES = 20
_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def scrub(text, secrets):
    """``text`` with every non-empty secret replaced by ``********``."""
    for secret in secrets or ():
        if secret:
            text = text.replace(secret, "********")
    return text


def find_tool(name, bin_dir=None):
    """Absolute path of ``name`` (in ``bin_dir`` when given, else on PATH) or ConfigError."""
    if bin_dir:
        path = os.path.join(bin_dir, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        raise ConfigError("%s not found in %s" % (name, bin_dir))
    path = shutil.which(name)
    if path is None:
        raise ConfigError("%s is not installed (not found on PATH)" % name)
    return path


def tool_env(extra, drop=()):
    """A copy of this process's environment with ``extra`` set (None values removed) and ``drop`` unset."""
    env = dict(os.environ)
    for key in drop:
        env.pop(key, None)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


class _StderrTail(threading.Thread):
    """Drains a tool's stderr (so it never blocks on a full pipe), keeping the last lines."""

    def __init__(self, pipe, lines=STDERR_TAIL_LINES, on_line=None):
        super().__init__(name="stderr-tail", daemon=True)
        self._pipe = pipe
        self._tail = collections.deque(maxlen=lines)
        # on_line(line) -> True: the line was progress chatter, used and not kept for messages.
        self._on_line = on_line

    def run(self):
        try:
            for raw in iter(self._pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip()
                if line and not (self._on_line is not None and self._on_line(line)):
                    self._tail.append(line[:1000])
        except (OSError, ValueError):
            pass
        finally:
            try:
                self._pipe.close()
            except OSError:
                pass

    def lines(self):
        return list(self._tail)

    def text(self):
        return "; ".join(self._tail)


def _describe_failure(what, returncode, stderr_text, secrets):
    if returncode is not None and returncode < 0:
        status = "was killed by signal %d" % -returncode
    else:
        status = "failed (exit %s)" % returncode
    detail = scrub(stderr_text, secrets) or "no error output"
    return "%s %s: %s" % (what, status, detail)


def _spawn(argv, env, what, stdin, stdout, cwd=None, pass_fds=()):
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                env=env, cwd=cwd, close_fds=True, pass_fds=pass_fds)
    except OSError as exc:
        raise SourceError("cannot start %s (%s): %s" % (what, argv[0], exc.strerror)) from None


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class ToolStream:
    """A readable of a tool's stdout. EOF raises ``error_class`` if the tool failed.

    ``close()`` must be called in a ``finally``: it kills the tool when the reader stopped
    early (storage failure, interrupt) so that no orphan keeps the database busy.
    """

    def __init__(self, argv, env=None, what=None, secrets=(), error_class=SourceError):
        self.what = what or os.path.basename(argv[0])
        self._secrets = tuple(secrets)
        self._error_class = error_class
        self._proc = _spawn(argv, env, self.what, subprocess.DEVNULL, subprocess.PIPE)
        self._stderr = _StderrTail(self._proc.stderr)
        self._stderr.start()
        self.bytes_read = 0
        self.returncode = None

    def read(self, size=CHUNK):
        if size is None or size < 0:
            size = CHUNK
        data = self._proc.stdout.read(size)
        if data:
            self.bytes_read += len(data)
            return data
        self._finish()
        return b""

    def readable(self):
        return True

    def _finish(self):
        if self.returncode is not None:
            return
        self.returncode = self._proc.wait()
        self._stderr.join()
        if self.returncode != 0:
            raise self._error_class(_describe_failure(self.what, self.returncode, self._stderr.text(),
                                                      self._secrets))

    def stderr_lines(self):
        """The last lines the tool wrote to stderr (complete once EOF was read)."""
        return [scrub(line, self._secrets) for line in self._stderr.lines()]

    def close(self):
        _stop(self._proc)
        try:
            self._proc.stdout.close()
        except OSError:
            pass
        self._stderr.join()


def pump(read, write, chunk=CHUNK, hashed=True):
    """Move bytes from ``read(size)`` to ``write(data)`` until ``read`` returns nothing.

    Returns ``(SHA-256 hex digest, byte count)`` of what went through (the digest None unless
    ``hashed``: hashing costs a core's time on a restore's critical path). An error of
    ``write`` (BrokenPipeError from a tool that stopped reading) propagates.
    """
    digest = hashlib.sha256() if hashed else None
    size = 0
    while True:
        data = read(chunk)
        if not data:
            return (digest.hexdigest() if hashed else None), size
        if hashed:
            digest.update(data)
        size += len(data)
        write(data)


def feed_stdin(proc, readable, hashed=True):
    """Stream ``readable`` into ``proc``'s stdin and close it.

    Returns ``(SHA-256 hex digest, byte count, broken)``; ``broken``: the tool stopped reading
    before the end (its stdin pipe broke), and then the digest is None.
    """
    sha256, size, broken = None, 0, False
    try:
        sha256, size = pump(readable.read, proc.stdin.write, hashed=hashed)
    except BrokenPipeError:
        broken = True
    try:
        proc.stdin.close()
    except BrokenPipeError:
        broken = True
    return sha256, size, broken


def feed_tool(argv, readable, env=None, what=None, secrets=(), error_class=SourceError, cwd=None, pass_fds=(),
              on_stderr_line=None):
    """Run ``argv`` with ``readable`` streamed into its stdin; return its stderr lines.

    The tool's stdout is discarded. If the tool stops reading early, the remaining input
    is not read and ``error_class`` is raised with the tool's own explanation. An error
    raised by ``readable`` (a failed integrity check) kills the tool and propagates.
    ``pass_fds``: open file descriptors the tool inherits (see ``fd_path``). ``on_stderr_line``
    sees every stderr line as it comes (progress); a line it returns True for is left out of
    the lines kept for messages.
    """
    what = what or os.path.basename(argv[0])
    proc = _spawn(argv, env, what, subprocess.PIPE, subprocess.DEVNULL, cwd=cwd, pass_fds=pass_fds)
    tail = _StderrTail(proc.stderr, on_line=on_stderr_line)
    tail.start()
    try:
        broken = feed_stdin(proc, readable, hashed=False)[2]
        returncode = proc.wait()
    except BaseException:
        _stop(proc)
        tail.join()
        raise
    tail.join()
    if returncode != 0 or broken:
        raise error_class(_describe_failure(what, returncode, tail.text(), secrets))
    return [scrub(line, secrets) for line in tail.lines()]


def fd_path(fd):
    """A path under which a child that inherits ``fd`` opens that file again (with an offset
    of its own): the way to hand a tool that wants a file name a file that has none."""
    return "%s/%d" % ("/dev/fd" if os.path.isdir("/dev/fd") else "/proc/self/fd", fd)


def run_tool(argv, env=None, what=None, secrets=(), error_class=SourceError, timeout=120, input_bytes=None):
    """Run a short command; return its stdout as text. Failures raise ``error_class``."""
    what = what or os.path.basename(argv[0])
    try:
        done = subprocess.run(argv, env=env, input=input_bytes, capture_output=True, timeout=timeout,
                              check=False, stdin=None if input_bytes is not None else subprocess.DEVNULL)
    except OSError as exc:
        raise error_class("cannot start %s (%s): %s" % (what, argv[0], exc.strerror)) from None
    except subprocess.TimeoutExpired:
        raise error_class("%s did not finish within %d seconds" % (what, timeout)) from None
    if done.returncode != 0:
        stderr = "; ".join(line for line in done.stderr.decode("utf-8", "replace").splitlines()[-STDERR_TAIL_LINES:]
                           if line.strip())
        raise error_class(_describe_failure(what, done.returncode, stderr, secrets))
    return done.stdout.decode("utf-8", "replace")


# sockaddr_un.sun_path on Linux holds 108 bytes, the path's terminating NUL included.
UNIX_SOCKET_PATH_MAX = 107


def socket_directory(preferred, socket_name):
    """Where a server this process starts may listen on the unix socket ``socket_name``:
    ``(directory, temporary)``. ``preferred`` when the socket's path fits a socket address;
    otherwise a new private directory under the system temp directory, which the caller
    removes when the server is gone (``temporary`` true). A scratch directory on a volume
    easily makes the path too long, and the server then fails before it reads anything."""
    if len(os.fsencode(os.path.join(preferred, socket_name))) <= UNIX_SOCKET_PATH_MAX:
        return preferred, False
    directory = tempfile.mkdtemp(prefix="bb-sock-")
    if len(os.fsencode(os.path.join(directory, socket_name))) > UNIX_SOCKET_PATH_MAX:
        shutil.rmtree(directory, ignore_errors=True)
        raise ConfigError("the unix socket %s fits neither under %s nor under %s (a socket path holds at most "
                          "%d bytes): set TMPDIR to a shorter directory"
                          % (socket_name, preferred, tempfile.gettempdir(), UNIX_SOCKET_PATH_MAX))
    return directory, True


def tool_version(path):
    """``(text, (major, minor, patch))`` from ``<tool> --version``, e.g. ``('15.18', (15, 18, 0))``."""
    output = run_tool([path, "--version"], what="%s --version" % os.path.basename(path),
                      error_class=ConfigError, timeout=30)
    match = _VERSION_RE.search(output)
    if match is None:
        raise ConfigError("cannot read the version of %s from %r" % (path, output.strip()[:200]))
    text = match.group(0)
    return text, tuple(int(part or 0) for part in match.groups())
