# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Whether the pod that holds a restic lock has finished (issue 16, stale locks of killed pods).

restic 0.14 calls a lock stale when it is 30 minutes old, or when it was taken on this host by a
process that is gone. A backup pod killed mid-run (OOM, eviction) leaves its lock behind under
its own hostname, the pod's name, so for the next pod (another host) that lock stays live for 30
minutes, and a drill or retention job in that window waits and is refused.

The runner, in its pod, may ask the API server instead (the job role grants ``get`` on pods of
the namespace and mounts the service account token, ``job_restic_lock_check``). The lock's holder
has finished when the pod of that name in the runner's namespace

* carries the collection's label (``app.kubernetes.io/managed-by: biometrics.backup``): a pod of
  one of our jobs, not a StatefulSet's or another workload's of the same name;
* is in phase ``Succeeded`` or ``Failed``;
* and reports every container, init containers included, as terminated: the pod garbage
  collector marks pods of a lost node ``Failed`` while their containers may still run.

Anything else proves nothing and leaves restic's rule in charge: a pod that is gone (its
container may outlive a forced deletion for a moment), no token mounted, no permission, an API
server that does not answer within the timeout, a hostname that is no pod name.

Only the runner asks (``runner.py`` installs the checker): a module run inside some other pod
(an AWX execution environment) must not take its own namespace for the backup jobs'. Standard
library only: one GET per question with a timeout and no retries, no discovery.
"""

import http.client
import json
import os
import re
import socket
import ssl
import urllib.parse

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MANAGED_BY = "biometrics.backup"
FINISHED_PHASES = ("Succeeded", "Failed")
TIMEOUT = 10  # seconds per request: an egress policy that drops packets must not eat lock_wait
_POD_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class _Unanswered(Exception):
    """The API server did not give a usable answer."""


class PodLockHolders:
    """Answers "has the pod that holds this lock finished?" from the API server at ``server``."""

    def __init__(self, namespace, server, token, ca_file=None, own_hostname=None, timeout=TIMEOUT, token_file=None):
        self.namespace = namespace
        self.server = server.rstrip("/")
        self.own_hostname = own_hostname or socket.gethostname()
        self.timeout = timeout
        self._token = token
        self._token_file = token_file
        self._context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        self.unusable_reason = None

    @classmethod
    def in_cluster(cls, directory=SERVICE_ACCOUNT_DIR, environ=None):
        """The checker of a pod with its service account token mounted, else None (nothing asked)."""
        environ = os.environ if environ is None else environ
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT") or "443"
        if not host:
            return None
        try:
            with open(os.path.join(directory, "namespace"), encoding="utf-8") as handle:
                namespace = handle.read().strip()
            with open(os.path.join(directory, "token"), encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError:
            return None
        if not namespace or not token:
            return None
        ca_file = os.path.join(directory, "ca.crt")
        server = "https://%s:%s" % ("[%s]" % host if ":" in host else host, port)
        # The kubelet rotates the projected token in place: read again at every question.
        return cls(namespace, server, token, ca_file if os.path.exists(ca_file) else None,
                   token_file=os.path.join(directory, "token"))

    def _get(self, path):
        """The decoded object at ``path``, None when it does not exist; _Unanswered otherwise."""
        if self._token_file:
            try:
                with open(self._token_file, encoding="utf-8") as handle:
                    self._token = handle.read().strip() or self._token
            except OSError:
                pass  # keep the token read before
        where = urllib.parse.urlsplit(self.server)
        connection = http.client.HTTPSConnection(where.hostname, where.port or 443, timeout=self.timeout,
                                                 context=self._context)
        try:
            connection.request("GET", path, headers={"Authorization": "Bearer " + self._token,
                                                     "Accept": "application/json"})
            response = connection.getresponse()
            body = response.read()
            if response.status == 404:
                return None
            if response.status != 200:
                raise _Unanswered("GET %s: HTTP %s %s" % (path, response.status, response.reason))
            return json.loads(body.decode("utf-8"))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _Unanswered("GET %s on %s: %s" % (path, self.server, exc or type(exc).__name__)) from None
        finally:
            connection.close()

    def finished(self, lock):
        """Why the holder of ``lock`` (its ``hostname``) has finished, or None when that is not
        proven. Never raises; after an unanswered request it stops asking (``unusable_reason``)."""
        hostname = lock.get("hostname")
        if self.unusable_reason or not isinstance(hostname, str) or hostname == self.own_hostname:
            return None
        if len(hostname) > 253 or not _POD_NAME_RE.match(hostname):
            return None  # no pod name: a host outside the cluster
        path = "/api/v1/namespaces/%s/pods/%s" % (urllib.parse.quote(self.namespace), urllib.parse.quote(hostname))
        try:
            pod = self._get(path)
        except _Unanswered as exc:
            self.unusable_reason = str(exc)
            return None
        return _finished_pod(pod, self.namespace, hostname)


def _finished_pod(pod, namespace, name):
    """The reason ``pod`` (an API object, or None) proves its processes gone, else None."""
    if not isinstance(pod, dict):
        return None
    labels = (pod.get("metadata") or {}).get("labels") or {}
    status = pod.get("status") or {}
    if labels.get("app.kubernetes.io/managed-by") != MANAGED_BY or status.get("phase") not in FINISHED_PHASES:
        return None
    containers = (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or [])
    if not containers or not all(isinstance(item, dict) and "terminated" in (item.get("state") or {})
                                 for item in containers):
        return None
    return "its pod %s/%s has finished (%s, every container terminated)" % (namespace, name, status["phase"])
