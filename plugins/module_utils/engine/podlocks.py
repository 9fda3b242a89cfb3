# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Whether the pod that holds a restic lock has finished (issue 16, stale locks of killed pods).

restic 0.14 calls a lock stale when it is 30 minutes old, or when it was taken on this host by a
process that is gone. A backup pod killed mid-run (OOM, eviction, a node that went away) leaves
its lock behind under its own hostname, the pod's name, so for the next pod (another host) that
lock stays live for 30 minutes, and a drill or retention job in that window waits and is refused.

A runner pod may ask the API server instead. The lock's hostname is the holder's pod name; in
the runner's own namespace:

* the pod exists and its phase is ``Succeeded`` or ``Failed``: its containers have stopped (the
  kubelet reported it), so no restic process of it can hold the lock any more;
* the pod no longer exists, its name is that of a pod of a Job this collection deployed
  (``<job>-<5 characters>``, the Job labelled ``app.kubernetes.io/managed-by: biometrics.backup``)
  and the lock has not been refreshed for two of restic's refresh intervals: a force-deleted
  pod's container may outlive its API object for a moment, a live restic refreshes every 5
  minutes.

Anything else (not in a pod, no token mounted, no permission, the API unreachable, a hostname
that is not such a pod's) proves nothing, and restic's own rule stands. The job role grants
``get`` on pods and Jobs in the namespace to the pods that open a restic repository
(``job_restic_lock_check``).

Standard library plus the guarded ``kubernetes`` client (imported only when a lock is asked about).
"""

import os
import re
import socket

from .kubeapi import KubeConnection, KubeError
from .errors import ConfigError, MissingDependencyError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
REFRESH_SECONDS = 5 * 60  # restic 0.14 refreshes the lock of a running command every 5 minutes
MANAGED_BY = "biometrics.backup"
FINISHED_PHASES = ("Succeeded", "Failed")
_JOB_POD_RE = re.compile(r"^(?P<job>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-[a-z0-9]{5}$")


class PodLockHolders:
    """Answers "has the pod that holds this lock finished?" from the API server."""

    def __init__(self, namespace, connection_options=None, own_hostname=None):
        self.namespace = namespace
        self.own_hostname = own_hostname or socket.gethostname()
        self._options = dict(connection_options or {})
        self._connection = None
        self._usable = True
        self.unusable_reason = None

    @classmethod
    def in_cluster(cls, directory=SERVICE_ACCOUNT_DIR):
        """The checker of a pod whose service account token is mounted, else None (no API calls)."""
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            return None
        try:
            with open(os.path.join(directory, "namespace"), encoding="utf-8") as handle:
                namespace = handle.read().strip()
        except OSError:
            return None
        if not namespace or not os.path.exists(os.path.join(directory, "token")):
            return None
        # A short timeout: an egress policy that drops the API server's packets must not hold
        # every lock retry for the client's default minute.
        return cls(namespace, {"request_timeout": 10})

    def _connect(self):
        if self._connection is None:
            self._connection = KubeConnection(self._options, "restic lock check")
        return self._connection

    def _get(self, path, what):
        return self._connect().get(path, doing="read %s" % what, missing_ok=True)

    def finished(self, lock, age_seconds):
        """Why the holder of ``lock`` (its ``hostname``; ``age_seconds`` since restic last wrote it)
        has finished, or None when that is not proven. Never raises: an API that cannot answer
        leaves restic's rule in charge."""
        hostname = lock.get("hostname")
        if not self._usable or not isinstance(hostname, str) or hostname == self.own_hostname:
            return None
        if len(hostname) > 253 or not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", hostname):
            return None  # not a pod name: a host outside the cluster
        try:
            pod = self._get("/api/v1/namespaces/%s/pods/%s" % (self.namespace, hostname), "pod " + hostname)
            if pod is not None:
                phase = (pod.get("status") or {}).get("phase")
                if phase in FINISHED_PHASES:
                    return "its pod %s/%s has finished (%s)" % (self.namespace, hostname, phase)
                return None
            return self._gone_pod_of_our_job(hostname, age_seconds)
        except (KubeError, ConfigError, MissingDependencyError) as exc:
            # No permission, no client, no API: say why once, then stop asking.
            self._usable = False
            self.unusable_reason = str(exc)
            return None

    def _gone_pod_of_our_job(self, hostname, age_seconds):
        match = _JOB_POD_RE.match(hostname)
        if not match or age_seconds is None or age_seconds <= 2 * REFRESH_SECONDS:
            return None
        name = match.group("job")
        job = self._get("/apis/batch/v1/namespaces/%s/jobs/%s" % (self.namespace, name), "job " + name)
        labels = ((job or {}).get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/managed-by") != MANAGED_BY:
            return None
        return ("its pod %s/%s no longer exists (Job %s) and the lock was not refreshed for %d minutes"
                % (self.namespace, hostname, name, age_seconds // 60))

    def close(self):
        if self._connection is not None:
            self._connection.close()
            self._connection = None
