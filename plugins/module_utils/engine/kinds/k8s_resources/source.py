# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""``k8s_resources``: the seed's ``kubectl get all,configmap,secret,ingress,service -o yaml``.

The objects of the chosen resource types in the chosen namespaces are read through the API
(paginated lists, so memory stays bounded by a page) and written as one multi-document YAML
stream, ``resources.yaml``, stripped of what the server manages (uid, resourceVersion,
managedFields, status, creation time, generated cluster IPs, stale owner references...) so
that ``kubectl apply --server-side -f`` or the ``k8s_resources`` restore target re-applies
it cleanly. Each namespace's own Namespace object (labels such as Pod Security levels) comes
first when the backup identity may read it.

Objects a controller re-creates from their owner (ReplicaSets of Deployments, Pods of
ReplicaSets and Jobs, Jobs of CronJobs) and the per-namespace ``kube-root-ca.crt``
ConfigMap are not exported: re-applying them would fight their controllers.

Secrets are exported unless excluded (``exclude_resources: [secrets]`` or a ``resources``
list without them); a backup holding Secrets is refused without encryption.
"""

import copy

from ...errors import ConfigError
from ...schema import Field
from ...kubeapi import (CONNECTION, Discovery, KubeConnection, KubeError, check_namespace_name,
                        require_kubernetes, string_list)
from ..contract import Source

try:
    import yaml
    _DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
except ImportError:  # PyYAML is a dependency of the kubernetes client itself
    yaml = None
    _DUMPER = None

RESOURCES_PAYLOAD = "resources.yaml"
# kubectl's "all" category for namespaced workloads.
ALL_ALIAS = ("pods", "services", "deployments", "replicasets", "statefulsets", "daemonsets", "jobs",
             "cronjobs", "horizontalpodautoscalers")
# The seed: kubectl get all,configmap,secret,ingress,service
DEFAULT_RESOURCES = ("all", "configmaps", "secrets", "ingresses", "services")
# Applied first on restore: what other objects refer to.
APPLY_ORDER = ("serviceaccounts", "secrets", "configmaps", "persistentvolumeclaims", "roles.rbac.authorization.k8s.io",
               "rolebindings.rbac.authorization.k8s.io", "services")
PAGE_SIZE = 500
SCHEMA = CONNECTION.extend("source", {
    "namespaces": Field("list", "namespaces to export (a list or comma-separated)", split=","),
    "resources": Field("list", "resource types to export (default: all, configmaps, secrets, ingresses, services)",
                       split=","),
    "exclude_resources": Field("list", "resource types to leave out", split=","),
    "label_selector": Field("str", "only objects matching this label selector, e.g. app=web,tier!=cache"),
    "preserve_node_ports": Field("bool", "keep the nodePort of Services (default false)"),
    "page_size": Field("int", "objects per list request (default 500)", minimum=1, maximum=10000),
})

_METADATA_DROP = ("uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
                  "deletionGracePeriodSeconds", "managedFields", "selfLink", "ownerReferences")
_ANNOTATIONS_DROP = (
    "kubectl.kubernetes.io/last-applied-configuration",  # client-side apply's copy of the object
    "deployment.kubernetes.io/revision",
    "pv.kubernetes.io/bind-completed", "pv.kubernetes.io/bound-by-controller",
    "volume.beta.kubernetes.io/storage-provisioner", "volume.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/selected-node",
)
_SA_TOKEN_DATA = ("token", "ca.crt", "namespace")
_JOB_UID_LABELS = ("controller-uid", "batch.kubernetes.io/controller-uid")


def _secret_name(name):
    return name.strip().lower() in ("secret", "secrets")


def expand_resources(resources, exclude):
    """The requested resource names with ``all`` expanded, duplicates and exclusions removed."""
    excluded = {name.lower() for name in exclude}
    if any(_secret_name(name) for name in exclude):
        excluded.update(("secret", "secrets"))
    names = []
    for name in resources:
        for item in (ALL_ALIAS if name.lower() == "all" else (name,)):
            if item.lower() not in excluded and item not in names:
                names.append(item)
    return names


def _drop_empty(mapping, key):
    if key in mapping and not mapping[key]:
        del mapping[key]


def clean_object(obj, resource_key, preserve_node_ports=False):
    """``(cleaned copy, None)`` ready to re-apply, or ``(None, reason)`` when it is not exported."""
    metadata = obj.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return None, "terminating"
    if any(ref.get("controller") for ref in metadata.get("ownerReferences") or []):
        return None, "owned"
    if resource_key == "configmaps" and metadata.get("name") == "kube-root-ca.crt":
        return None, "managed"
    obj = copy.deepcopy(obj)
    obj.pop("status", None)
    metadata = obj.setdefault("metadata", {})
    for key in _METADATA_DROP:
        metadata.pop(key, None)
    annotations = metadata.get("annotations") or {}
    for key in _ANNOTATIONS_DROP:
        annotations.pop(key, None)
    _drop_empty(metadata, "annotations")
    _drop_empty(metadata, "labels")
    spec = obj.get("spec")
    if resource_key == "services" and isinstance(spec, dict):
        if spec.get("clusterIP") not in ("None",):  # headless services keep "None"
            spec.pop("clusterIP", None)
            spec.pop("clusterIPs", None)
        if not preserve_node_ports:
            spec.pop("healthCheckNodePort", None)
            for port in spec.get("ports") or []:
                port.pop("nodePort", None)
    elif resource_key == "persistentvolumeclaims" and isinstance(spec, dict):
        spec.pop("volumeName", None)
    elif resource_key == "pods" and isinstance(spec, dict):
        spec.pop("nodeName", None)
        _strip_service_account_volume(spec)
    elif resource_key == "jobs.batch" and isinstance(spec, dict):
        if not spec.get("manualSelector"):
            spec.pop("selector", None)
        for labels in (metadata.get("labels") or {},
                       ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}):
            for key in _JOB_UID_LABELS:
                labels.pop(key, None)
        _drop_empty(metadata, "labels")
    elif resource_key == "serviceaccounts":
        obj.pop("secrets", None)  # token Secret references the token controller maintains
    elif resource_key == "secrets" and obj.get("type") == "kubernetes.io/service-account-token":
        for key in _SA_TOKEN_DATA:  # the token controller fills these in again
            (obj.get("data") or {}).pop(key, None)
        _drop_empty(obj, "data")
        # The old ServiceAccount's uid: kept, the token controller would delete the restored
        # Secret as belonging to a ServiceAccount that no longer exists.
        (metadata.get("annotations") or {}).pop("kubernetes.io/service-account.uid", None)
        _drop_empty(metadata, "annotations")
    return obj, None


def _strip_service_account_volume(spec):
    """Remove the kube-api-access-* projected volume admission injected (it is injected again)."""
    injected = {volume.get("name") for volume in spec.get("volumes") or []
                if str(volume.get("name", "")).startswith("kube-api-access-") and "projected" in volume}
    if not injected:
        return
    spec["volumes"] = [volume for volume in spec["volumes"] if volume.get("name") not in injected]
    _drop_empty(spec, "volumes")
    for group in ("initContainers", "containers", "ephemeralContainers"):
        for container in spec.get(group) or []:
            mounts = [mount for mount in container.get("volumeMounts") or [] if mount.get("name") not in injected]
            if mounts:
                container["volumeMounts"] = mounts
            else:
                container.pop("volumeMounts", None)


def clean_namespace(obj):
    """The parts of a Namespace worth restoring: name, labels, annotations."""
    metadata = obj.get("metadata") or {}
    labels = {key: value for key, value in (metadata.get("labels") or {}).items()
              if key != "kubernetes.io/metadata.name"}  # set by the API server from the name
    annotations = {key: value for key, value in (metadata.get("annotations") or {}).items()
                   if key not in _ANNOTATIONS_DROP}
    cleaned = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": metadata.get("name")}}
    if labels:
        cleaned["metadata"]["labels"] = labels
    if annotations:
        cleaned["metadata"]["annotations"] = annotations
    return cleaned


def dump_document(obj):
    """One YAML document (with its ``---`` separator) as bytes."""
    return ("---\n" + yaml.dump(obj, Dumper=_DUMPER, default_flow_style=False, sort_keys=True,
                                allow_unicode=True)).encode("utf-8")


class _DocumentStream:
    """A readable over YAML documents produced lazily from a generator of objects."""

    def __init__(self, documents):
        self._documents = documents
        self._buffer = b""
        self._done = False

    def read(self, size=-1):
        if size is None or size < 0:
            size = 1 << 20
        while len(self._buffer) < size and not self._done:
            try:
                self._buffer += dump_document(next(self._documents))
            except StopIteration:
                self._done = True
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def readable(self):
        return True

    def close(self):
        self._documents.close()


class K8sResourcesSource(Source):
    kind = "k8s_resources"
    SCHEMA = SCHEMA

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        namespaces = options.get("namespaces")
        self.namespaces = [check_namespace_name(name, "k8s_resources.namespaces")
                           for name in string_list(namespaces, "k8s_resources.namespaces")]
        if not self.namespaces:
            raise ConfigError("k8s_resources.namespaces: name at least one namespace to export")
        if len(set(self.namespaces)) != len(self.namespaces):
            raise ConfigError("k8s_resources.namespaces lists a namespace twice")
        requested = options.get("resources")
        self.resources = string_list(DEFAULT_RESOURCES if requested is None else requested,
                                     "k8s_resources.resources")
        self.exclude = string_list(options.get("exclude_resources"), "k8s_resources.exclude_resources")
        self.names = expand_resources(self.resources, self.exclude)
        if not self.names:
            raise ConfigError("k8s_resources: no resource type left to export (resources minus exclude_resources)")
        # Decided from the options alone, before anything runs: BackupRun refuses an
        # unencrypted job whose payload would hold Secrets.
        self.requires_encryption = any(_secret_name(name) for name in self.names)
        self.label_selector = options.get("label_selector") or None
        self.preserve_node_ports = options.get("preserve_node_ports", False)
        self.page_size = options.get("page_size", PAGE_SIZE)
        self.conn = KubeConnection(options, "k8s_resources source")
        self._types = None

    def describe(self):
        described = dict(self.conn.describe(), namespaces=list(self.namespaces), resources=list(self.names))
        if self.exclude:
            described["exclude_resources"] = list(self.exclude)
        if self.label_selector:
            described["label_selector"] = self.label_selector
        return described

    def tool_versions(self):
        return self.conn.tool_versions()

    def close(self):
        self.conn.close()

    def _resolve(self):
        if self._types is None:
            discovery = Discovery(self.conn)
            types = []
            for name in self.names:
                resource = discovery.resolve(name)
                if not resource.namespaced:
                    raise ConfigError("k8s_resources: %s is not a namespaced resource; only namespaced ones are "
                                      "exported" % resource.key)
                if "list" not in resource.verbs:
                    raise ConfigError("k8s_resources: the API cannot list %s" % resource.key)
                excluded = {item.lower() for item in self.exclude}
                if resource.key in excluded or resource.plural in excluded:
                    continue
                if resource.key not in [known.key for known in types]:
                    types.append(resource)
            order = {key: index for index, key in enumerate(APPLY_ORDER)}
            self._types = sorted(types, key=lambda item: (order.get(item.key, len(order)), types.index(item)))
        return self._types

    def preflight(self):
        require_kubernetes("k8s_resources backups")
        if yaml is None:
            raise ConfigError("k8s_resources backups need PyYAML")
        self.conn.server_version()
        types = self._resolve()
        if any(item.key == "secrets" for item in types) != self.requires_encryption:
            raise ConfigError("k8s_resources: could not tell from the options whether Secrets are exported; "
                              "name them as 'secrets' in resources or exclude_resources")
        for namespace in self.namespaces:
            self._namespace_object(namespace)  # 404 -> clear error before anything is stored

    def _namespace_object(self, namespace):
        """The Namespace, or None when this identity may not read it (namespaced RBAC only)."""
        try:
            found = self.conn.get("/api/v1/namespaces/%s" % namespace, doing="read namespace %s" % namespace,
                                  missing_ok=True)
        except KubeError as exc:
            if exc.status == 403:
                return None
            raise
        if found is None:
            raise ConfigError("k8s_resources: namespace %s does not exist" % namespace)
        return found

    def _list(self, resource, namespace):
        """Every object of ``resource`` in ``namespace``, page by page."""
        token = None
        while True:
            params = {"limit": self.page_size}
            if token:
                params["_continue"] = token
            if self.label_selector:
                params["label_selector"] = self.label_selector
            page = self.conn.get(resource.path(namespace), doing="list %s in namespace %s" % (resource.key, namespace),
                                 **params)
            for item in page.get("items") or []:
                # List items carry no apiVersion/kind of their own.
                item["apiVersion"] = resource.api_version
                item["kind"] = resource.kind
                yield item
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return

    def produce(self, emit, context):
        types = self._resolve()
        per_namespace = {namespace: {item.key: 0 for item in types} for namespace in self.namespaces}
        skipped = {"owned": 0, "managed": 0, "terminating": 0}
        namespace_objects = []

        def documents():
            for namespace in self.namespaces:
                found = self._namespace_object(namespace)
                if found is not None:
                    namespace_objects.append(namespace)
                    yield clean_namespace(found)
            for namespace in self.namespaces:
                for resource in types:
                    for item in self._list(resource, namespace):
                        cleaned, reason = clean_object(item, resource.key, self.preserve_node_ports)
                        if cleaned is None:
                            skipped[reason] += 1
                            continue
                        cleaned["metadata"]["namespace"] = namespace
                        per_namespace[namespace][resource.key] += 1
                        yield cleaned

        stream = _DocumentStream(documents())
        try:
            emit(RESOURCES_PAYLOAD, stream)
        finally:
            stream.close()
        kinds = {item.key: sum(per_namespace[namespace][item.key] for namespace in self.namespaces) for item in types}
        return {
            "namespaces": list(self.namespaces),
            "resources": [item.key for item in types],
            "objects": sum(kinds.values()),
            "kinds": kinds,
            "per_namespace": per_namespace,
            "skipped": skipped,
            "namespace_objects": namespace_objects,
            "secrets_included": any(item.key == "secrets" for item in types),
        }
