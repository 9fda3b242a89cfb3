"""A restic repository in engine storage, served to restic over its REST protocol on loopback.

restic 0.14 reads the S3 credentials of every repository a command opens from one set of
``AWS_*`` variables, so ``restic copy`` cannot read one bucket and write another with other
credentials (the usual offsite case). The copy therefore writes to the destination through
this server: restic speaks its REST protocol (version 2) to ``127.0.0.1``, and the server
stores what it receives through the engine's own Storage of the destination (filesystem, NFS,
S3 with that location's credentials and TLS settings). The objects keep restic's native layout
(``config``, ``keys/``, ``locks/``, ``snapshots/``, ``index/``, ``data/<2 hex>/``), so restic
reads the copy directly afterwards (``verify --from-copy``, restores, drills, prune).

Each object restic writes other than ``config`` is named by the SHA-256 of its bytes: the
server checks the name while the body streams and publishes nothing that does not match.
Bodies and payloads stream in bounded pieces. The server answers only requests carrying the
random credentials of its URL (Basic authentication), which reaches restic through its
environment, never argv. Standard library only (no Ansible imports).
"""

import base64
import hashlib
import hmac
import http.server
import json
import re
import secrets
import threading

from .errors import NotFoundError, StorageError
from .storage.base import is_unfinished

CHUNK = 1 << 20
_TYPES = ("data", "keys", "locks", "snapshots", "index")
_NAME_RE = re.compile(r"^[0-9a-f]{64}$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
_V2 = "application/vnd.x.restic.rest.v2"


class RequestError(Exception):
    """A request the server refuses (status and reason)."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


def object_key(prefix, path):
    """``(storage key or listing prefix, type, name)`` for a request path; RequestError when it
    names nothing of a repository. ``name`` is None for the type's listing (``/data/``)."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    if parts == ["config"]:
        return prefix + "/config", "config", "config"
    if not parts or parts[0] not in _TYPES or len(parts) > 2:
        raise RequestError(404, "no such repository path %r" % path)
    kind = parts[0]
    if len(parts) == 1 or not parts[1]:
        return "%s/%s/" % (prefix, kind), kind, None
    name = parts[1]
    if not _NAME_RE.match(name):
        raise RequestError(400, "%r is not a restic object name" % name)
    if kind == "data":
        return "%s/data/%s/%s" % (prefix, name[:2], name), kind, name
    return "%s/%s/%s" % (prefix, kind, name), kind, name


class RepositoryServer:
    """Serves the restic repository stored under ``prefix`` of ``storage`` while in a ``with``.

    ``url`` is the repository URL for restic (with its credentials: give it to restic through
    ``RESTIC_REPOSITORY`` and scrub ``secret`` from messages); ``bytes_received`` counts the
    bytes of the objects stored (restic's lock files left out); ``errors`` lists what the server failed to do, for the caller's
    message when restic reports the failure only as an HTTP status."""

    def __init__(self, storage, prefix):
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.secret = secrets.token_hex(16)
        self.bytes_received = 0
        self.errors = []
        self.keys_stored = []   # keys/ objects this server stored (see the config refusal)
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    def describe(self):
        """Where restic reaches the server, without its credentials."""
        host, port = self._server.server_address[:2]
        return "rest:http://%s:%d/" % (host, port)

    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return "rest:http://restic:%s@%s:%d/" % (self.secret, host, port)

    def __enter__(self):
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="restic-rest", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        return False

    def authorised(self, header):
        expected = "Basic " + base64.b64encode(("restic:" + self.secret).encode()).decode()
        return hmac.compare_digest((header or "").encode(), expected.encode())

    def failed(self, message):
        with self._lock:
            self.errors.append(message)

    def received(self, size):
        with self._lock:
            self.bytes_received += size

    def size_of(self, key, kind):
        """The stored size of ``key``; NotFoundError when it is not there."""
        if kind != "data":
            # Small objects (config, keys, locks, snapshots, index): read, where a listing would
            # walk their whole directory (filesystem) or cost a request more (S3).
            return len(self.storage.get_bytes(key))
        for info in self.storage.list(key):
            if info.key == key:
                return info.size
        raise NotFoundError("%s is not stored" % key)

    def listing(self, prefix):
        """``[{name, size}]`` of the objects under a type's prefix (unfinished writes left out)."""
        try:
            infos = self.storage.list(prefix)
        except NotFoundError:
            infos = []
        found = []
        for info in infos:
            name = info.key.rsplit("/", 1)[-1]
            if not is_unfinished(name) and _NAME_RE.match(name):
                found.append({"name": name, "size": info.size})
        return found


def _handler_for(server):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # pylint: disable=redefined-builtin
            pass  # restic reports failures itself; the server keeps its own in server.errors

        def _answer(self, status, body=b"", content_type="application/octet-stream"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                # Said, so that the client does not send its next request on a closed connection
                # (Go's client retries only idempotent requests there; a POST would fail).
                self.send_header("Connection", "close")
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _serve(self, action):
            self.headers_out = False
            try:
                if not server.authorised(self.headers.get("Authorization")):
                    raise RequestError(401, "wrong credentials")
                action()
                return
            except RequestError as exc:
                status, message = exc.status, str(exc)
            except NotFoundError as exc:
                status, message = 404, str(exc)
            except ValueError as exc:   # a malformed Content-Length or chunk size
                status, message = 400, "malformed request: %s" % exc
            except (StorageError, OSError) as exc:
                status, message = 500, str(exc)
            except Exception as exc:  # pylint: disable=broad-exception-caught
                # A thread of the server: what escapes here would be a traceback on stderr and a
                # connection left without an answer; restic gets a 500 and the caller the reason.
                status, message = 500, "%s: %s" % (type(exc).__name__, exc)
            if status >= 500:
                server.failed("%s %s: %s" % (self.command, self.path.split("?")[0], message))
            # A refused POST may leave its body unread, and after the headers only a cut
            # connection can end the answer: the connection closes then; after a 404 it is reused.
            if self.command == "POST" or self.headers_out or status >= 500:
                self.close_connection = True
            if not self.headers_out:   # after the headers, only the cut connection can tell restic
                self._answer(status, message.encode(), "text/plain")

        def do_HEAD(self):
            self._serve(self._head)

        def do_GET(self):
            self._serve(self._get)

        def do_POST(self):
            self._serve(self._post)

        def do_DELETE(self):
            self._serve(self._delete)

        def _head(self):
            key, kind, name = object_key(server.prefix, self.path)
            if name is None:
                raise RequestError(400, "HEAD of a listing")
            size = server.size_of(key, kind)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()

        def _get(self):
            key, kind, name = object_key(server.prefix, self.path)
            if name is None:
                body = json.dumps(server.listing(key)).encode()
                self._answer(200, body, content_type=_V2)
                return
            if kind != "data" and not self.headers.get("Range"):
                body = server.storage.get_bytes(key)   # small: one read, no size lookup
                self._answer(200, body)
                return
            size = server.size_of(key, kind)
            start, end = 0, size
            status = 200
            wanted = self.headers.get("Range")
            if wanted:
                match = _RANGE_RE.match(wanted.strip())
                if not match:
                    raise RequestError(416, "unsupported range %r" % wanted)
                start = int(match.group(1))
                end = min(size, int(match.group(2)) + 1) if match.group(2) else size
                if start >= size or start >= end:
                    raise RequestError(416, "range %r outside %d bytes" % (wanted, size))
                status = 206
            reader = server.storage.open_reader(key)
            try:
                skip = start
                while skip:  # the Storage interface reads from the start
                    piece = reader.read(min(CHUNK, skip))
                    if not piece:
                        raise StorageError("%s ended before byte %d" % (key, start))
                    skip -= len(piece)
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(end - start))
                if status == 206:
                    self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end - 1, size))
                self.end_headers()
                self.headers_out = True
                left = end - start
                while left:
                    piece = reader.read(min(CHUNK, left))
                    if not piece:
                        raise StorageError("%s ended %d bytes early" % (key, left))
                    self.wfile.write(piece)
                    left -= len(piece)
            finally:
                reader.close()

        def _body(self):
            """The request body in pieces (Content-Length or chunked transfer encoding)."""
            if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                if self.headers.get("Content-Length") is None:
                    raise RequestError(411, "a body needs Content-Length or chunked transfer encoding")
                yield from self._exactly(int(self.headers["Content-Length"]))
                return
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise RequestError(400, "request body cut short")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from self._exactly(size)
                self.rfile.readline(1024)  # the CRLF after each chunk

        def _exactly(self, size):
            left = size
            while left:
                piece = self.rfile.read(min(CHUNK, left))
                if not piece:
                    raise RequestError(400, "request body cut short")
                left -= len(piece)
                yield piece

        def _post(self):
            if self.path.split("?", 1)[0].strip("/") == "" and "create=true" in self.path:
                server.storage.ensure_ready()
                if self.headers.get("Content-Length") is not None or self.headers.get("Transfer-Encoding"):
                    for piece in self._body():
                        del piece   # nothing restic sends here matters
                self._answer(200)
                return
            key, kind, name = object_key(server.prefix, self.path)
            if name is None:
                raise RequestError(400, "POST to a listing")
            if kind == "config" and server.storage.exists(key):
                # Two first copies at once: both found no config, the second must not replace
                # the first's (its restic init fails; ResticRepository.copy_from then opens the
                # repository the first one made). The key its init stored wraps a master key no
                # config belongs to; left there, restic could try it first and fail: removed.
                for stored in server.keys_stored:
                    server.storage.delete(stored)
                raise RequestError(403, "the repository already has a config")
            digest = hashlib.sha256()
            size = 0
            with server.storage.open_writer(key) as writer:
                for piece in self._body():
                    digest.update(piece)
                    size += len(piece)
                    writer.write(piece)
                if kind != "config" and digest.hexdigest() != name:
                    # restic names every object but config by the SHA-256 of its bytes.
                    raise RequestError(400, "%s/%s: the body's SHA-256 is %s" % (kind, name, digest.hexdigest()))
                writer.commit()
            if kind == "keys":
                server.keys_stored.append(key)
            if kind != "locks":
                server.received(size)
            self._answer(200)

        def _delete(self):
            key, dummy, name = object_key(server.prefix, self.path)
            if name is None:
                raise RequestError(400, "DELETE of a listing")
            server.storage.delete(key)
            self._answer(200)

    return Handler
