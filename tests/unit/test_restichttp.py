# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""engine/restichttp.py: the loopback server through which restic writes a copy's repository
(requests made with http.client, as restic's REST client makes them; storage on a temporary
directory)."""

import base64
import hashlib
import http.client
import json
import os

from ansible_collections.biometrics.backup.plugins.module_utils.engine.restichttp import RepositoryServer, object_key
from ansible_collections.biometrics.backup.plugins.module_utils.engine.storage.location import open_storage


def test_request_paths_map_to_restics_own_layout():
    name = "ab" + "0" * 62
    assert object_key("_restic/job", "/config") == ("_restic/job/config", "config", "config")
    assert object_key("_restic/job", "/data/" + name) == ("_restic/job/data/ab/" + name, "data", name)
    assert object_key("_restic/job", "/snapshots/" + name)[0] == "_restic/job/snapshots/" + name
    assert object_key("_restic/job", "/index/") == ("_restic/job/index/", "index", None)


def _request(server, method, path, body=None, auth=True, headers=None):
    host, port = server.describe()[len("rest:http://"):].rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = dict(headers or {})
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(("restic:" + server.secret).encode()).decode()
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def test_the_repository_server_checks_credentials_and_object_names(tmp_path):
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path)})
    data = os.urandom(3000)
    name = hashlib.sha256(data).hexdigest()
    with RepositoryServer(storage, "_restic/job") as server:
        assert server.secret not in server.describe()
        assert _request(server, "POST", "/data/" + name, data, auth=False)[0] == 401
        assert _request(server, "POST", "/data/" + "0" * 64, data)[0] == 400  # body does not match its name
        assert _request(server, "POST", "/data/../../x", data)[0] in (400, 404)
        assert [path for path in tmp_path.rglob("*") if path.is_file()] == []  # nothing refused was kept
        assert _request(server, "POST", "/data/" + name, data)[0] == 200
        assert (tmp_path / "_restic" / "job" / "data" / name[:2] / name).read_bytes() == data
        status, body = _request(server, "GET", "/data/")
        assert status == 200 and json.loads(body) == [{"name": name, "size": 3000}]
        assert _request(server, "GET", "/data/" + name) == (200, data)
        assert _request(server, "GET", "/keys/" + name)[0] == 404
        assert server.bytes_received == 3000
        # HEAD gives the size; a range is answered with 206 and only those bytes; outside: 416
        assert _request(server, "HEAD", "/data/" + name)[0] == 200
        assert _head_length(server, "/data/" + name) == 3000
        assert _request(server, "GET", "/data/" + name, headers={"Range": "bytes=100-199"}) == (206, data[100:200])
        assert _request(server, "GET", "/data/" + name, headers={"Range": "bytes=2990-"}) == (206, data[2990:])
        assert _request(server, "GET", "/data/" + name, headers={"Range": "bytes=5000-6000"})[0] == 416
        # a malformed length is refused with an answer, not a traceback in a server thread
        assert _request(server, "POST", "/keys/" + name, headers={"Content-Length": "x"})[0] == 400
        # the config is written once: a second first copy must not replace the first one's
        assert _request(server, "POST", "/config", b"first")[0] == 200
        assert _request(server, "POST", "/config", b"second")[0] == 403
        assert _request(server, "GET", "/config") == (200, b"first")
        # a body in chunked transfer encoding is stored whole
        chunked = os.urandom(5000)
        chunked_name = hashlib.sha256(chunked).hexdigest()
        host, port = server.describe()[len("rest:http://"):].rstrip("/").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("POST", "/snapshots/" + chunked_name, body=iter([chunked[:1234], chunked[1234:]]),
                           encode_chunked=True, headers={"Authorization": "Basic " + base64.b64encode(
                               ("restic:" + server.secret).encode()).decode()})
        assert connection.getresponse().status == 200
        assert (tmp_path / "_restic" / "job" / "snapshots" / chunked_name).read_bytes() == chunked
        # a body without Content-Length (nor chunked) is refused
        assert _request(server, "POST", "/locks/" + name, headers={"Transfer-Encoding": "identity"})[0] in (400, 411)
        assert server.errors == []


def test_the_key_of_an_init_that_lost_the_race_for_the_config_is_removed(tmp_path):
    """Two first copies at once: the second's init stored a key, then found the config taken (403).
    Its key wraps a master key no config belongs to; restic could try it first and fail."""
    storage = open_storage({"backend": "filesystem", "path": str(tmp_path)})
    storage.put_bytes("_restic/job/config", b"the first copy's config")
    key = os.urandom(300)
    key_name = hashlib.sha256(key).hexdigest()
    with RepositoryServer(storage, "_restic/job") as server:
        assert _request(server, "POST", "/keys/" + key_name, key)[0] == 200
        assert (tmp_path / "_restic" / "job" / "keys" / key_name).exists()
        assert _request(server, "POST", "/config", b"the second copy's config")[0] == 403
    assert not (tmp_path / "_restic" / "job" / "keys" / key_name).exists()
    assert (tmp_path / "_restic" / "job" / "config").read_bytes() == b"the first copy's config"


def _head_length(server, path):
    host, port = server.describe()[len("rest:http://"):].rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("HEAD", path, headers={
        "Authorization": "Basic " + base64.b64encode(("restic:" + server.secret).encode()).decode()})
    response = connection.getresponse()
    return int(response.getheader("Content-Length"))
