# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore target of ``k8s_resources``: server-side apply into the same or mapped namespaces.

Steps, each over the verified ``resources.yaml`` stream (read again per step, never held in
memory as a whole):

1. **read**: every document is parsed and checked (apiVersion, kind, name, a namespace of
   the backup) and counted per namespace and resource type; the counts must equal the
   manifest's ``stats`` — otherwise IntegrityError, and nothing was touched;
2. **plan**: every resource type must exist on the target cluster; destination namespaces
   (``namespace_map``: ``{backed-up: restore-into}``) must exist or be creatable
   (``create_namespaces``, default true; labels such as Pod Security levels come from the
   backup's Namespace object);
3. **dry run**: every object is applied with ``dryRun=All`` (server-side apply, field
   manager ``biometrics-backup``): admission, validation, RBAC and field-ownership conflicts
   show up here. Any failure stops the restore; namespaces it created are deleted again, so
   the cluster is as it was;
4. **apply** (skipped in check mode / ``dry_run``): the same requests for real, each object
   compared with what was there before: ``created``, ``updated`` or ``unchanged``;
5. **verify**: per namespace and resource type, the number of backed-up objects now present
   in the destination is compared with ``stats``.

Conflicts with fields other managers own fail the dry run unless ``force_conflicts: true``.
RoleBinding subjects that name a ServiceAccount of a mapped namespace follow the mapping.
``scratch()`` dry-runs the backup into throwaway namespaces (a ``backup_verify`` test
restore that starts no workload) and deletes them afterwards.

One pass (``one_pass_payloads``): ``resources.yaml`` is declared. Step 1 reads the stream to
its end and finishes it (size and SHA-256 checked) before step 2 creates a namespace or
step 3 sends a request (step 1 only reads the API's discovery), so a damaged backup stops
there with the cluster untouched. The later steps read the stream again, and each of those reads is checked at
its end as on the two-pass path.
"""

import contextlib
import copy
import time
import uuid

from ...errors import ConfigError, IntegrityError, SourceError
from ...manifest import Manifest
from ...schema import Field
from ...kubeapi import (CONNECTION, FIELD_MANAGER, Discovery, KubeConnection, KubeError, check_namespace_name,
                        require_kubernetes, string_list)
from .source import RESOURCES_PAYLOAD
from ..contract import Target

try:
    import yaml
    _LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
except ImportError:
    yaml = None
    _LOADER = None

SCHEMA = CONNECTION.extend("target", {
    "namespace_map": Field("dict", "restore backed-up namespaces into others, e.g. {prod: prod-restored}"),
    "namespaces": Field("list", "restore only these backed-up namespaces (default: all)", split=","),
    "create_namespaces": Field("bool", "create missing namespaces (default true)"),
    "force_conflicts": Field("bool", "take over fields owned by other field managers (default false)"),
    "dry_run": Field("bool", "server-side dry run only (default false)"),
})
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
_COMPARE_DROP = ("managedFields", "resourceVersion", "generation")
_REPORTED_OBJECTS = 1000  # per-object actions listed in the report; counts always cover all


def _comparable(obj):
    """The object without what changes on every write (for created/updated/unchanged)."""
    if obj is None:
        return None
    obj = copy.deepcopy(obj)
    obj.pop("status", None)
    for key in _COMPARE_DROP:
        (obj.get("metadata") or {}).pop(key, None)
    return obj


class K8sResourcesTarget(Target):
    kind = "k8s_resources"
    plans_in_check_mode = True
    SCHEMA = SCHEMA

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        mapping = options.get("namespace_map") or {}
        self.namespace_map = {check_namespace_name(str(src), "namespace_map"): check_namespace_name(str(dst), "namespace_map")
                              for src, dst in mapping.items()}
        if len(set(self.namespace_map.values())) != len(self.namespace_map):
            raise ConfigError("k8s_resources target: namespace_map sends two namespaces into one")
        self.only = [check_namespace_name(name, "namespaces")
                     for name in string_list(options.get("namespaces"), "k8s_resources target namespaces")]
        self.create_namespaces = options.get("create_namespaces", True)
        self.force_conflicts = options.get("force_conflicts", False)
        self.dry_run = options.get("dry_run", False)
        self.conn = KubeConnection(options, "k8s_resources target")
        self.temporary_namespaces = False  # scratch(): create namespaces, delete them afterwards
        self.created_namespaces = []

    def close(self):
        self.conn.close()

    def describe(self):
        described = dict(self.conn.describe(), force_conflicts=self.force_conflicts,
                         create_namespaces=self.create_namespaces)
        if self.namespace_map:
            described["namespace_map"] = dict(self.namespace_map)
        if self.only:
            described["namespaces"] = list(self.only)
        if self.dry_run:
            described["dry_run"] = True
        return described

    def _dest(self, namespace):
        return self.namespace_map.get(namespace, namespace)

    def _selected(self, stats):
        namespaces = list(stats.get("namespaces") or [])
        if self.only:
            missing = sorted(set(self.only) - set(namespaces))
            if missing:
                raise ConfigError("k8s_resources target: the backup holds no namespace %s (it has %s)"
                                  % (", ".join(missing), ", ".join(namespaces) or "none"))
            namespaces = [name for name in namespaces if name in self.only]
        unknown = sorted(set(self.namespace_map) - set(stats.get("namespaces") or []))
        if unknown:
            raise ConfigError("k8s_resources target: namespace_map names %s, which the backup does not hold"
                              % ", ".join(unknown))
        return namespaces

    def preflight(self, manifest):
        require_kubernetes("k8s_resources restores")
        if yaml is None:
            raise ConfigError("k8s_resources restores need PyYAML")
        manifest = self._backup_of_kind(manifest, RESOURCES_PAYLOAD)
        self._selected(manifest.stats)
        self.conn.get("/version", doing="reach the API server")

    def one_pass_payloads(self, manifest, chain):
        """``resources.yaml``: step 1 finishes it before the cluster is touched."""
        return {(Manifest.wrap(manifest).id, RESOURCES_PAYLOAD)}

    # -- reading the payload ---------------------------------------------------------------

    def _documents(self, context):
        stream = context.open_payload(context.manifest, RESOURCES_PAYLOAD)
        try:
            for document in yaml.load_all(stream, Loader=_LOADER):
                if document is not None:
                    yield document
            if hasattr(stream, "finish"):
                stream.finish()
        finally:
            stream.close()

    def _read(self, context, stats, discovery):
        """Step 1: parse and count; IntegrityError unless the counts equal ``stats``."""
        namespaces = set(stats.get("namespaces") or [])
        counts = {namespace: {} for namespace in namespaces}
        namespace_objects = {}
        by_type = {}
        for document in self._documents(context):
            if not isinstance(document, dict) or not isinstance(document.get("metadata"), dict):
                raise IntegrityError("k8s_resources: %s holds a document that is not a Kubernetes object"
                                     % RESOURCES_PAYLOAD)
            api_version, kind = document.get("apiVersion"), document.get("kind")
            name = document["metadata"].get("name")
            if not (isinstance(api_version, str) and isinstance(kind, str) and isinstance(name, str)):
                raise IntegrityError("k8s_resources: an object of %s lacks apiVersion, kind or name" % RESOURCES_PAYLOAD)
            if kind == "Namespace" and api_version == "v1":
                if name not in namespaces:
                    raise IntegrityError("k8s_resources: the payload holds namespace %s, not one the manifest lists"
                                         % name)
                namespace_objects[name] = document
                continue
            namespace = document["metadata"].get("namespace")
            if namespace not in namespaces:
                raise IntegrityError("k8s_resources: %s %s is in namespace %r, not one the manifest lists"
                                     % (kind, name, namespace))
            resource = by_type.get((api_version, kind))
            if resource is None:
                resource = by_type[(api_version, kind)] = discovery.by_kind(api_version, kind)
                if not resource.namespaced:
                    raise IntegrityError("k8s_resources: the payload holds %s, which is not namespaced" % resource.key)
            counts[namespace][resource.key] = counts[namespace].get(resource.key, 0) + 1
        expected = stats.get("per_namespace") or {}
        checks = [{"what": "Namespace objects in the backup", "expected": sorted(stats.get("namespace_objects") or []),
                   "actual": sorted(namespace_objects),
                   "ok": sorted(stats.get("namespace_objects") or []) == sorted(namespace_objects)}]
        for namespace in sorted(namespaces):
            for key in sorted(set(expected.get(namespace) or {}) | set(counts[namespace])):
                want = (expected.get(namespace) or {}).get(key, 0)
                have = counts[namespace].get(key, 0)
                if want == have == 0:
                    continue  # a type the backup looked for and found nothing of
                checks.append({"what": "%s in namespace %s of the backup" % (key, namespace), "expected": want,
                               "actual": have, "ok": want == have})
        failed = [check for check in checks if not check["ok"]]
        if failed:
            raise IntegrityError("k8s_resources: the payload does not match the manifest: %s: expected %s, found %s"
                                 % (failed[0]["what"], failed[0]["expected"], failed[0]["actual"]))
        return checks, namespace_objects, by_type

    # -- namespaces ------------------------------------------------------------------------

    def _namespace_exists(self, name):
        return self.conn.get("/api/v1/namespaces/%s" % name, doing="read namespace %s" % name,
                             missing_ok=True) is not None

    def _namespace_body(self, source_namespace, namespace_objects):
        empty = {"apiVersion": "v1", "kind": "Namespace", "metadata": {}}
        body = copy.deepcopy(namespace_objects.get(source_namespace) or empty)
        body["metadata"]["name"] = self._dest(source_namespace)
        return body

    def _create_namespace(self, source_namespace, namespace_objects):
        name = self._dest(source_namespace)
        self.conn.request("PATCH", "/api/v1/namespaces/%s" % name, body=self._namespace_body(source_namespace,
                                                                                             namespace_objects),
                          doing="create namespace %s" % name, content_type=APPLY_CONTENT_TYPE,
                          field_manager=FIELD_MANAGER)
        self.created_namespaces.append(name)
        # The ServiceAccount admission plugin refuses pods until "default" exists.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.conn.get("/api/v1/namespaces/%s/serviceaccounts/default" % name, missing_ok=True,
                             doing="wait for the default ServiceAccount of %s" % name) is not None:
                return
            time.sleep(0.2)

    def delete_created_namespaces(self):
        """Remove the namespaces this target created (rollback of a failed restore, scratch cleanup)."""
        errors = []
        for name in self.created_namespaces:
            try:
                self.conn.request("DELETE", "/api/v1/namespaces/%s" % name, doing="delete namespace %s" % name)
            except KubeError as exc:
                if exc.status != 404:
                    errors.append(str(exc))
        self.created_namespaces = []
        return errors

    # -- applying --------------------------------------------------------------------------

    def _prepared(self, document):
        body = copy.deepcopy(document)
        source_namespace = body["metadata"]["namespace"]
        body["metadata"]["namespace"] = self._dest(source_namespace)
        if body.get("kind") == "RoleBinding" and self.namespace_map:
            for subject in body.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in self.namespace_map:
                    subject["namespace"] = self.namespace_map[subject["namespace"]]
        return source_namespace, body

    def _apply(self, resource, body, dry_run):
        params = {"content_type": APPLY_CONTENT_TYPE, "field_manager": FIELD_MANAGER}
        if self.force_conflicts:
            params["force_conflicts"] = True
        if dry_run:
            params["dry_run"] = "All"
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        return self.conn.request("PATCH", resource.path(namespace, name), body=body,
                                 doing="%sapply %s %s/%s" % ("dry-run " if dry_run else "", resource.key, namespace,
                                                             name), **params)

    def _pass(self, context, selected, resources, dry_run, skip_namespaces=()):
        """Apply every selected object once (dry run or for real); returns per-object actions."""
        actions = []
        failures = []
        for document in self._documents(context):
            if document.get("kind") == "Namespace" and document.get("apiVersion") == "v1":
                continue
            if document["metadata"].get("namespace") not in selected:
                continue
            source_namespace, body = self._prepared(document)
            resource = resources[(body["apiVersion"], body["kind"])]
            entry = {"namespace": body["metadata"]["namespace"], "resource": resource.key,
                     "name": body["metadata"]["name"], "source_namespace": source_namespace}
            if body["metadata"]["namespace"] in skip_namespaces:
                actions.append(dict(entry, action="create"))  # its namespace does not exist yet (check mode)
                continue
            path = resource.path(body["metadata"]["namespace"], body["metadata"]["name"])
            try:
                before = self.conn.get(path, missing_ok=True, doing="read %s %s" % (resource.key, entry["name"]))
                after = self._apply(resource, body, dry_run)
            except KubeError as exc:
                failures.append(str(exc))
                if not dry_run:
                    break  # stop at the first real failure: what was applied is reported
                continue
            if before is None:
                action = "create"
            elif _comparable(before) == _comparable(after):
                action = "unchanged"
            else:
                action = "update"
            actions.append(dict(entry, action=action))
        return actions, failures

    def _present(self, resources, selected, actions):
        """Per (source namespace, resource): how many backed-up objects now exist in the destination."""
        wanted = {}
        for item in actions:
            wanted.setdefault((item["source_namespace"], item["resource"]), set()).add(item["name"])
        by_key = {resource.key: resource for resource in resources.values()}
        present = {}
        for (source_namespace, key), names in wanted.items():
            resource = by_key[key]
            found = set()
            token = None
            while True:
                params = {"limit": 500}
                if token:
                    params["_continue"] = token
                page = self.conn.get(resource.path(self._dest(source_namespace)), doing="list %s" % key, **params)
                found.update(item["metadata"]["name"] for item in page.get("items") or [])
                token = (page.get("metadata") or {}).get("continue")
                if not token:
                    break
            present[(source_namespace, key)] = len(names & found)
        return present

    def restore(self, context):
        started = time.monotonic()
        manifest = context.manifest
        stats = manifest.stats
        dry_run = bool(context.check_mode or self.dry_run)
        selected = self._selected(stats)
        discovery = Discovery(self.conn)
        try:
            read_checks, namespace_objects, resources = self._read(context, stats, discovery)
            missing = [namespace for namespace in selected if not self._namespace_exists(self._dest(namespace))]
            if missing and not self.create_namespaces:
                raise ConfigError("k8s_resources target: namespace %s does not exist and create_namespaces is false"
                                  % ", ".join(self._dest(name) for name in missing))
            would_create = []
            if dry_run and not self.temporary_namespaces:
                would_create = [self._dest(name) for name in missing]
            else:
                for namespace in missing:
                    self._create_namespace(namespace, namespace_objects)
            planned, failures = self._pass(context, selected, resources, dry_run=True, skip_namespaces=would_create)
            if failures:
                raise SourceError("k8s_resources restore refused by the API server's dry run (%d of %d objects; "
                                  "nothing was changed): %s"
                                  % (len(failures), len(planned) + len(failures), "; ".join(failures[:3])))
        except BaseException:
            if not dry_run or self.temporary_namespaces:
                self.delete_created_namespaces()
            raise
        if dry_run:
            actions = planned
        else:
            actions, failures = self._pass(context, selected, resources, dry_run=False)
            if failures:
                done = sum(1 for item in actions if item["action"] != "unchanged")
                raise SourceError("k8s_resources restore failed after %d of %d objects were applied (they stay "
                                  "applied; re-run the restore once the cause is fixed): %s"
                                  % (done, len(planned), failures[0]))
        counts = {"create": 0, "update": 0, "unchanged": 0}
        for item in actions:
            counts[item["action"]] += 1
        checks = list(read_checks)
        expected = stats.get("per_namespace") or {}
        if dry_run:
            accepted = {}
            for item in actions:
                key = (item["source_namespace"], item["resource"])
                accepted[key] = accepted.get(key, 0) + 1
        else:
            accepted = self._present(resources, selected, actions)
        for namespace in selected:
            for key in sorted(expected.get(namespace) or {}):
                want = expected[namespace][key]
                have = accepted.get((namespace, key), 0)
                if want == have == 0:
                    continue
                checks.append({"what": "%s %s in namespace %s" % (key, "accepted by dry run" if dry_run else "present",
                                                                  self._dest(namespace)),
                               "expected": want, "actual": have, "ok": want == have})
        report = {
            "changed": (not dry_run) and (counts["create"] + counts["update"] > 0 or bool(self.created_namespaces)),
            "dry_run": dry_run,
            "created": counts["create"], "updated": counts["update"], "unchanged": counts["unchanged"],
            "namespaces": {namespace: self._dest(namespace) for namespace in selected},
            "created_namespaces": list(would_create if dry_run and not self.temporary_namespaces
                                       else self.created_namespaces),
            "objects": [{key: item[key] for key in ("namespace", "resource", "name", "action")}
                        for item in actions[:_REPORTED_OBJECTS]],
            "checks": checks,
            "field_manager": FIELD_MANAGER,
            "duration_seconds": round(time.monotonic() - started, 3),
        }
        if len(actions) > _REPORTED_OBJECTS:
            report["objects_truncated"] = len(actions) - _REPORTED_OBJECTS
        failed = [check for check in checks if not check["ok"]]
        if failed:
            raise IntegrityError("k8s_resources restore of %s: %s: expected %s, found %s" % (
                manifest.id, failed[0]["what"], failed[0]["expected"], failed[0]["actual"]))
        return report

    @classmethod
    @contextlib.contextmanager
    def scratch(cls, manifest, options):
        """Dry-run the backup into fresh namespaces (deleted afterwards); starts no workload."""
        keep = {key: value for key, value in (options or {}).items() if key in CONNECTION.spellings()}
        suffix = uuid.uuid4().hex[:6]
        mapping = {}
        for namespace in Manifest.wrap(manifest).stats.get("namespaces") or []:
            mapping[namespace] = "%s-verify-%s" % (namespace[:48].rstrip("-"), suffix)
        target = cls(dict(keep, namespace_map=mapping, dry_run=True, create_namespaces=True))
        target.temporary_namespaces = True
        try:
            yield target
        finally:
            target.delete_created_namespaces()
            target.close()
