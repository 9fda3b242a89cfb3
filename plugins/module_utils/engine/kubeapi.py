# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Talking to a Kubernetes API server for the ``k8s_resources`` and ``velero`` kinds.

The ``kubernetes`` Python client is optional (guarded import): only these kinds need it.
Requests go through its ``DynamicClient.request`` transport with plain dicts (no generated
models), so objects keep every field, including those of custom resources, and the code
does not depend on how a client release generates its models.

Where the cluster is, in this order: ``host`` (+ ``token``, ``ca_cert``), ``kubeconfig``
(+ ``context``), the environment's ``K8S_AUTH_KUBECONFIG`` then ``KUBECONFIG``, the pod's
service account (in-cluster), ``~/.kube/config``.
"""

import json
import os
import re
import tempfile
import uuid

from .config import resolve_secret_refs
from .lazyimport import LazyModule
from .schema import Field, Schema
from .errors import ConfigError, MissingDependencyError, SourceError

# Imported on first use (see lazyimport.py): about a second, three on a busy machine.
kubernetes = LazyModule("kubernetes", also=("kubernetes.client", "kubernetes.client.exceptions", "kubernetes.config",
                                            "kubernetes.dynamic"))

# How the Kubernetes kinds reach the API server: in-cluster by default, else a kubeconfig or host + token.
CONNECTION = Schema("kubernetes connection", {
    "kubeconfig": Field("path", "kubeconfig file (default: in-cluster service account, else ~/.kube/config)"),
    "context": Field("str", "kubeconfig context", nonempty=True),
    "host": Field("str", "API server URL (with token)", nonempty=True),
    "token": Field("str", "bearer token", secret=True),
    "ca_cert": Field("path", "CA certificate of the API server"),
    "validate_certs": Field("bool", "verify the API server's certificate (default true)"),
    "request_timeout": Field("number", "seconds per API request (default 60)", exclusive_minimum=0, maximum=3600),
})
CONNECTION_KEYS = tuple(CONNECTION.fields)
FIELD_MANAGER = "biometrics-backup"
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def require_kubernetes(purpose):
    if not kubernetes.available:
        raise MissingDependencyError("kubernetes", purpose)


def check_namespace_name(name, where):
    """ConfigError unless ``name`` is a valid namespace name (RFC 1123 label)."""
    if not isinstance(name, str) or len(name) > 63 or not _DNS_LABEL_RE.match(name):
        raise ConfigError("%s: %r is not a valid namespace name (lowercase RFC 1123 label, at most 63 characters)"
                          % (where, name))
    return name


def string_list(value, where):
    """A list of non-empty strings from a list or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ConfigError("%s must be a list of strings" % where)
    return [item.strip() for item in value if item.strip()]


class KubeError(SourceError):
    """A Kubernetes API request failed; ``status`` is the HTTP status (0 when unreachable)."""

    def __init__(self, message, status=0, reason=None):
        super().__init__(message)
        self.status = status
        self.reason = reason


def _status_message(exc):
    """The API's own one-line explanation from a Status body, else the HTTP reason."""
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if body:
        try:
            status = json.loads(body)
        except ValueError:
            status = None
        if isinstance(status, dict) and status.get("message"):
            return status["message"], status.get("reason")
    return (getattr(exc, "reason", None) or str(exc)).strip(), None


class KubeConnection:
    """One API client for one run; ``close()`` when done."""

    def __init__(self, options, where):
        require_kubernetes("the Kubernetes backup kinds")
        self.where = where
        # Only the connection's own fields: the caller validated the whole dict already.
        options = resolve_secret_refs(CONNECTION.validate(
            {key: value for key, value in options.items() if key in CONNECTION.spellings()}, where), where)
        self.host = options.get("host")
        self.token = options.get("token")
        self.kubeconfig = options.get("kubeconfig")
        self.context = options.get("context")
        self.ca_cert = options.get("ca_cert")
        self.validate_certs = options.get("validate_certs", True)
        self.request_timeout = float(options.get("request_timeout", 60))
        if self.host and self.kubeconfig:
            raise ConfigError("%s: give either host (with token) or kubeconfig, not both" % where)
        if self.token and not self.host:
            raise ConfigError("%s: token needs host (a kubeconfig carries its own credentials)" % where)
        self._api = None
        self._dynamic = None
        self._cache_file = None
        self._server_version = None
        self.server = None

    def _configuration(self):
        configuration = kubernetes.client.Configuration()
        try:
            if self.host:
                configuration.host = self.host
                if self.token:
                    configuration.api_key = {"BearerToken": "Bearer " + self.token}
                if self.ca_cert:
                    configuration.ssl_ca_cert = self.ca_cert
                configuration.verify_ssl = self.validate_certs
                return configuration
            kubeconfig = (self.kubeconfig or os.environ.get("K8S_AUTH_KUBECONFIG")
                          or os.environ.get("KUBECONFIG"))
            if kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                kubernetes.config.load_kube_config(config_file=kubeconfig, context=self.context,
                                                   client_configuration=configuration)
            else:
                kubernetes.config.load_incluster_config(client_configuration=configuration)
        except (kubernetes.config.ConfigException, OSError, ValueError, TypeError) as exc:
            raise ConfigError("%s: no usable Kubernetes configuration: %s" % (self.where, exc)) from None
        if self.ca_cert:
            configuration.ssl_ca_cert = self.ca_cert
        if not self.validate_certs:
            configuration.verify_ssl = False
        return configuration

    @property
    def dynamic(self):
        if self._dynamic is None:
            configuration = self._configuration()
            self.server = configuration.host
            self._api = kubernetes.client.ApiClient(configuration)
            # The discovery cache goes to a private file removed by close(): never one shared
            # between runs, users or clusters.
            self._cache_file = os.path.join(tempfile.gettempdir(), "bb-kube-discovery-%s.json" % uuid.uuid4().hex)
            try:
                self._dynamic = kubernetes.dynamic.DynamicClient(self._api, cache_file=self._cache_file)
            except Exception as exc:  # pylint: disable=broad-except  # urllib3/ApiException on first contact
                self._fail(exc, "connect to %s" % self.server)
        return self._dynamic

    def describe(self):
        return {"cluster": self.server or self.host or self.kubeconfig or "default configuration"}

    def _fail(self, exc, doing):
        if kubernetes.available and isinstance(exc, kubernetes.client.exceptions.ApiException):
            message, reason = _status_message(exc)
            raise KubeError("%s: %s failed: HTTP %s %s" % (self.where, doing, exc.status, message),
                            status=exc.status or 0, reason=reason) from None
        raise KubeError("%s: %s failed: %s" % (self.where, doing, str(exc).splitlines()[0] if str(exc) else
                                               type(exc).__name__)) from None

    def request(self, method, path, body=None, doing=None, **params):
        """One API request; returns the decoded JSON body (a dict). KubeError on failure."""
        dynamic = self.dynamic
        params.setdefault("_request_timeout", self.request_timeout)
        try:
            response = dynamic.request(method, path, body=body, serialize=False, **params)
            data = response.data
        except Exception as exc:  # pylint: disable=broad-except  # ApiException and urllib3 errors
            self._fail(exc, doing or "%s %s" % (method, path))
        if not data:
            return {}
        try:
            return json.loads(data)
        except ValueError:
            raise KubeError("%s: %s %s answered something that is not JSON" % (self.where, method, path)) from None

    def get(self, path, doing=None, missing_ok=False, **params):
        """GET ``path``; with ``missing_ok`` a 404 returns None."""
        try:
            return self.request("GET", path, doing=doing, **params)
        except KubeError as exc:
            if missing_ok and exc.status == 404:
                return None
            raise

    def server_version(self):
        """The server's gitVersion (remembered for tool_versions), None when it cannot be read."""
        if self._server_version is None:
            try:
                self._server_version = self.get("/version", doing="read the server version").get("gitVersion")
            except KubeError:
                return None
        return self._server_version

    def tool_versions(self):
        versions = {"kubernetes-python": getattr(kubernetes.load(), "__version__", "unknown")}
        if self._server_version:
            versions["kube-apiserver"] = self._server_version
        return versions

    def close(self):
        if self._api is not None:
            try:
                self._api.close()
            except Exception:  # pylint: disable=broad-except  # closing pools must not mask results
                pass
            self._api = None
        self._dynamic = None
        if self._cache_file:
            try:
                os.unlink(self._cache_file)
            except OSError:
                pass
            self._cache_file = None


class ResourceType:
    """One API resource: where to list it and how to address its objects."""

    def __init__(self, group, version, plural, kind, namespaced, verbs, singular="", short_names=()):
        self.group = group
        self.version = version
        self.plural = plural
        self.kind = kind
        self.namespaced = namespaced
        self.verbs = tuple(verbs or ())
        self.singular = singular or kind.lower()
        self.short_names = tuple(short_names or ())

    @property
    def api_version(self):
        return "%s/%s" % (self.group, self.version) if self.group else self.version

    @property
    def key(self):
        """``plural[.group]`` as kubectl spells it: the name used in stats and reports."""
        return "%s.%s" % (self.plural, self.group) if self.group else self.plural

    def path(self, namespace=None, name=None):
        base = "/apis/%s/%s" % (self.group, self.version) if self.group else "/api/%s" % self.version
        if self.namespaced and namespace:
            base += "/namespaces/%s" % namespace
        base += "/" + self.plural
        if name:
            base += "/" + name
        return base

    def __repr__(self):
        return "ResourceType(%s)" % self.key


class Discovery:
    """Resolves resource names (plural, singular, kind, short name, ``plural.group``) like kubectl.

    The core group wins over named groups, named groups are asked in the server's order,
    each at its preferred version. Group resource lists are fetched only when needed.
    """

    def __init__(self, connection):
        self.connection = connection
        self._groups = None  # [(group, preferred version)]
        self._loaded = {}    # group -> [ResourceType]
        self._by_version = {}  # (group, version) -> [ResourceType]

    def _group_list(self):
        if self._groups is None:
            self._groups = [("", "v1")]
            listing = self.connection.get("/apis", doing="discover API groups")
            for group in listing.get("groups") or []:
                preferred = (group.get("preferredVersion") or {}).get("version")
                if not preferred and group.get("versions"):
                    preferred = group["versions"][0].get("version")
                if group.get("name") and preferred:
                    self._groups.append((group["name"], preferred))
        return self._groups

    def _resources(self, group, version):
        if group not in self._loaded:
            path = "/apis/%s/%s" % (group, version) if group else "/api/%s" % version
            listing = self.connection.get(path, doing="discover %s" % (group or "core") + " resources",
                                          missing_ok=True) or {}
            found = []
            for item in listing.get("resources") or []:
                if "/" in item.get("name", ""):
                    continue  # subresources (status, scale, log...)
                found.append(ResourceType(group, version, item["name"], item.get("kind", ""),
                                          bool(item.get("namespaced")), item.get("verbs"),
                                          item.get("singularName"), item.get("shortNames")))
            self._loaded[group] = found
        return self._loaded[group]

    def by_kind(self, api_version, kind):
        """The ResourceType serving ``kind`` at exactly ``api_version``; ConfigError when there is none."""
        group, version = api_version.rpartition("/")[::2]
        if (group, version) not in self._by_version:
            path = "/apis/%s/%s" % (group, version) if group else "/api/%s" % version
            listing = self.connection.get(path, doing="discover %s" % api_version, missing_ok=True) or {}
            self._by_version[(group, version)] = [
                ResourceType(group, version, item["name"], item.get("kind", ""), bool(item.get("namespaced")),
                             item.get("verbs"), item.get("singularName"), item.get("shortNames"))
                for item in listing.get("resources") or [] if "/" not in item.get("name", "")]
        for resource in self._by_version[(group, version)]:
            if resource.kind == kind:
                return resource
        raise ConfigError("the Kubernetes API server does not serve %s %s (is its CRD installed?)" % (api_version, kind))

    def resolve(self, name):
        """The ResourceType for ``name``; ConfigError when the server knows no such resource."""
        wanted = name.strip()
        lowered = wanted.lower()
        group_hint = None
        if "." in lowered:
            lowered, group_hint = lowered.split(".", 1)
        for group, version in self._group_list():
            if group_hint is not None and group != group_hint:
                continue
            for resource in self._resources(group, version):
                if (lowered in (resource.plural, resource.singular, resource.kind.lower())
                        or lowered in resource.short_names):
                    return resource
        raise ConfigError("the Kubernetes API server has no resource type %r (kubectl api-resources lists them)"
                          % wanted)
