# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``velero``: the seed's ``velero backup create NAME --include-namespaces NS --snapshot-volumes``.

Instead of the velero CLI, the source creates the ``velero.io/v1`` ``Backup`` object itself
(what the CLI does) in Velero's namespace, then follows its ``status.phase`` as the Velero
server reports it:

- ``Completed`` — the run succeeds;
- ``PartiallyFailed`` — the run fails (the error names the error and warning counts) unless
  ``accept_partial: true``, in which case it is recorded with that phase;
- ``Failed`` / ``FailedValidation`` — the run fails with Velero's reason;
- no phase at all within ``pickup_timeout`` — no Velero server handles Backups here: fail;
- not finished within ``timeout`` — fail (the Backup object stays; Velero may still finish it).

With ``wait: false`` the Backup is only created and recorded with the phase seen right
after creation. The payload ``velero-backup.yaml`` is the Backup as submitted plus the last
status read from the server; ``stats`` hold the phase and Velero's counters.
"""

import io
import re
import time

from ...errors import ConfigError, SourceError
from ...schema import Field
from ...kubeapi import CONNECTION, KubeConnection, KubeError, check_namespace_name, require_kubernetes, string_list
from ...timeutil import utc_now
from ..contract import Source
from ..k8s_resources.source import dump_document

BACKUP_PAYLOAD = "velero-backup.yaml"
API_PATH = "/apis/velero.io/v1/namespaces/%s/backups"
TERMINAL_PHASES = ("Completed", "PartiallyFailed", "Failed", "FailedValidation")
SCHEMA = CONNECTION.extend("source", {
    "velero_namespace": Field("str", "namespace Velero runs in (default velero)", nonempty=True),
    "include_namespaces": Field("list", "namespaces to back up ('*' for all)", split=","),
    "exclude_namespaces": Field("list", "namespaces to leave out", split=","),
    "include_resources": Field("list", "resource types to back up (default: all)", split=","),
    "exclude_resources": Field("list", "resource types to leave out", split=","),
    "label_selector": Field("dict", "only objects with these labels ({label: value})"),
    "snapshot_volumes": Field("bool", "take volume snapshots (default true)"),
    "default_volumes_to_fs_backup": Field("bool", "back up volume data with the node agent (file-system backup)"),
    "storage_location": Field("str", "BackupStorageLocation name (default: Velero's default)", nonempty=True),
    "volume_snapshot_locations": Field("list", "VolumeSnapshotLocation names", split=","),
    "ttl": Field("str", "how long Velero keeps the backup, a Go duration such as 720h0m0s"),
    "backup_name": Field("str", "prefix of the Backup object's name (default: the job name)", nonempty=True),
    "labels": Field("dict", "labels put on the Backup object"),
    "wait": Field("bool", "wait until Velero finishes the backup (default true)"),
    "timeout": Field("number", "seconds to wait for the backup to finish (default 14400)",
                     exclusive_minimum=0, maximum=7 * 86400),
    "pickup_timeout": Field("number", "seconds Velero may take to start the backup (default 300)",
                            exclusive_minimum=0, maximum=86400),
    "poll_interval": Field("number", "seconds between status reads (default 5)", exclusive_minimum=0, maximum=3600),
    "accept_partial": Field("bool", "count a PartiallyFailed backup as a success (default false)"),
})
_TTL_RE = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
_NAME_PREFIX_RE = re.compile(r"[^a-z0-9-]+")
STATUS_COUNTERS = (("itemsBackedUp", "progress", "itemsBackedUp"), ("totalItems", "progress", "totalItems"),
                   ("errors", None, "errors"), ("warnings", None, "warnings"),
                   ("volumeSnapshotsAttempted", None, "volumeSnapshotsAttempted"),
                   ("volumeSnapshotsCompleted", None, "volumeSnapshotsCompleted"))


def backup_name(prefix, moment):
    """``<prefix>-YYYYMMDDhhmmss``: a valid, sortable Backup name of at most 63 characters."""
    cleaned = _NAME_PREFIX_RE.sub("-", str(prefix).lower()).strip("-")[:48].rstrip("-") or "backup"
    return "%s-%s" % (cleaned, moment.strftime("%Y%m%d%H%M%S"))


def _queued_hint(backup):
    """Why a Backup can sit in Velero's queue, for a run that gave up waiting on it."""
    position = (backup.get("status") or {}).get("queuePosition")
    return (" (queue position %s). Velero starts a queued backup only while fewer than --concurrent-backups "
            "(default 1) backups are ReadyToStart or InProgress, and none of them nor an earlier Queued one covers "
            "one of its namespaces (see `velero backup get`). When no backup is ReadyToStart or InProgress and the "
            "queue has not moved for more than a minute, Velero's in-memory count is stuck (velero-io/velero#10519, "
            "up to 1.18.3): restarting the Velero server clears it, and fails any backup or restore InProgress at "
            "that moment"
            % (position if isinstance(position, int) else "unknown"))


class VeleroSource(Source):
    kind = "velero"
    SCHEMA = SCHEMA

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        self.velero_namespace = check_namespace_name(options.get("velero_namespace") or "velero",
                                                     "velero.velero_namespace")
        self.include_namespaces = string_list(options.get("include_namespaces"), "velero.include_namespaces")
        if not self.include_namespaces:
            raise ConfigError("velero.include_namespaces: name the namespaces to back up ('*' for all)")
        for name in self.include_namespaces:
            if name != "*":
                check_namespace_name(name, "velero.include_namespaces")
        self.spec = {"includedNamespaces": self.include_namespaces,
                     "snapshotVolumes": options.get("snapshot_volumes", True)}
        for option, field in (("exclude_namespaces", "excludedNamespaces"), ("include_resources", "includedResources"),
                              ("exclude_resources", "excludedResources"),
                              ("volume_snapshot_locations", "volumeSnapshotLocations")):
            values = string_list(options.get(option), "velero.%s" % option)
            if values:
                self.spec[field] = values
        if options.get("storage_location"):
            self.spec["storageLocation"] = str(options["storage_location"])
        if options.get("ttl"):
            if not _TTL_RE.match(str(options["ttl"])):
                raise ConfigError("velero.ttl must be a Go duration such as 720h0m0s, not %r" % options["ttl"])
            self.spec["ttl"] = str(options["ttl"])
        if options.get("default_volumes_to_fs_backup") is not None:
            self.spec["defaultVolumesToFsBackup"] = options["default_volumes_to_fs_backup"]
        if options.get("label_selector"):
            selector = options["label_selector"]
            self.spec["labelSelector"] = {"matchLabels": {str(k): str(v) for k, v in selector.items()}}
        self.labels = options.get("labels") or {}
        self.name_prefix = options.get("backup_name")
        self.wait = options.get("wait", True)
        self.timeout = float(options.get("timeout", 4 * 3600))
        self.pickup_timeout = float(options.get("pickup_timeout", 300))
        self.poll_interval = float(options.get("poll_interval", 5))
        self.accept_partial = options.get("accept_partial", False)
        self.conn = KubeConnection(options, "velero source")
        self.sleep = time.sleep  # the only clock the wait loop uses besides time.monotonic
        self.created = None

    def describe(self):
        return dict(self.conn.describe(), velero_namespace=self.velero_namespace,
                    include_namespaces=list(self.include_namespaces),
                    snapshot_volumes=self.spec["snapshotVolumes"], wait=self.wait)

    def tool_versions(self):
        return self.conn.tool_versions()

    def close(self):
        self.conn.close()

    def preflight(self):
        require_kubernetes("velero backups")
        self.conn.server_version()
        try:
            self.conn.get(API_PATH % self.velero_namespace, doing="list Velero backups in %s" % self.velero_namespace,
                          limit=1)
        except KubeError as exc:
            if exc.status == 404:
                raise SourceError("velero: the API has no velero.io/v1 Backup resource in namespace %s "
                                  "(is Velero installed? its CRDs are missing)" % self.velero_namespace) from None
            raise

    def _body(self, job):
        name = backup_name(self.name_prefix or job, utc_now())
        labels = {str(k): str(v) for k, v in self.labels.items()}
        labels.setdefault("app.kubernetes.io/managed-by", "biometrics-backup")
        labels.setdefault("backup.biometrics.io/job", _NAME_PREFIX_RE.sub("-", job.lower()).strip("-")[:63])
        return {"apiVersion": "velero.io/v1", "kind": "Backup",
                "metadata": {"name": name, "namespace": self.velero_namespace, "labels": labels},
                "spec": dict(self.spec)}

    def _read(self, name):
        return self.conn.get("%s/%s" % (API_PATH % self.velero_namespace, name),
                             doing="read Velero backup %s" % name)

    def _wait(self, name, created):
        """The Backup once its phase is terminal; SourceError on no pickup / timeout."""
        started = time.monotonic()
        current = created
        while True:
            phase = (current.get("status") or {}).get("phase")
            if phase in TERMINAL_PHASES:
                return current
            waited = time.monotonic() - started
            if not phase and waited >= self.pickup_timeout:
                raise SourceError("velero: no Velero server picked up backup %s/%s within %ds (status.phase is "
                                  "still empty): is Velero running and watching namespace %s?"
                                  % (self.velero_namespace, name, self.pickup_timeout, self.velero_namespace))
            if waited >= self.timeout:
                raise SourceError("velero: backup %s/%s still %s after %ds; it was left for Velero to finish%s"
                                  % (self.velero_namespace, name, phase or "without a phase", self.timeout,
                                     _queued_hint(current) if phase == "Queued" else ""))
            self.sleep(min(self.poll_interval, max(0.05, self.timeout - waited)))
            current = self._read(name)

    def produce(self, emit, context):
        body = self._body(context.job)
        name = body["metadata"]["name"]
        try:
            created = self.conn.request("POST", API_PATH % self.velero_namespace, body=body,
                                        doing="create Velero backup %s" % name)
        except KubeError as exc:
            if exc.status == 409:
                raise SourceError("velero: a Backup named %s already exists in %s" % (name, self.velero_namespace)) \
                    from None
            raise
        self.created = created
        final = self._wait(name, created) if self.wait else created
        status = final.get("status") or {}
        phase = status.get("phase") or ""  # "" with wait: false before Velero has seen it
        stats = {"backup_name": name, "velero_namespace": self.velero_namespace, "phase": phase,
                 "waited": self.wait, "uid": (final.get("metadata") or {}).get("uid")}
        for key, group, field in STATUS_COUNTERS:
            source = (status.get(group) or {}) if group else status
            if isinstance(source.get(field), int):
                stats[key] = source[field]
        if phase in ("Failed", "FailedValidation"):
            reasons = status.get("validationErrors") or [status.get("failureReason") or "no reason given"]
            raise SourceError("velero: backup %s/%s finished %s: %s" % (
                self.velero_namespace, name, phase, "; ".join(str(reason) for reason in reasons)[:500]))
        if phase == "PartiallyFailed" and not self.accept_partial:
            raise SourceError("velero: backup %s/%s finished PartiallyFailed (%s errors, %s warnings; "
                              "`velero backup logs %s`); set accept_partial: true to keep such backups"
                              % (self.velero_namespace, name, status.get("errors", "?"), status.get("warnings", "?"),
                                 name))
        record = dict(body, status=status)
        emit(BACKUP_PAYLOAD, io.BytesIO(dump_document(record)))
        return stats
