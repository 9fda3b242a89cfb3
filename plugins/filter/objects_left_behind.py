# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
name: objects_left_behind
author: biometrics.backup contributors (@biometrics)
version_added: "0.1.0"
short_description: The objects of a backup job that its new rendering no longer has
description:
  - Every CronJob the roles render records, in its annotation C(backup.biometrics.io/objects), the
    objects rendered with it (ServiceAccount, Roles, RoleBindings, ConfigMap, egress NetworkPolicy) and,
    for a job with an offsite copy, the copy's CronJobs C(<job>-copy) and C(<job>-copy-prune).
  - Given the CronJobs as they were before this run applied anything, and the manifests this run
    applies (or removes), returns the recorded objects of each of those CronJobs that the run does
    not render again, for example the C(<job>-egress) NetworkPolicy once the egress policy is turned
    off, the C(<job>-restic-locks) Role and RoleBinding once the lock check is, or the copy's CronJobs
    once the copy (or its C(retention)) is.
  - A recorded CronJob is returned only when it exists and looks like that job's offsite copy (managed
    by the collection, component label C(copy), the job's own ConfigMap mounted), and brings the objects
    it recorded itself (its ServiceAccount, egress policy, lock Role), listed before it, so that the
    record outlives the deletions it names. A job of its own that happens to be named C(<job>-copy) is
    not returned.
  - Other CronJobs this run does not render (another play's jobs, jobs removed from the values) are left
    alone; removing whole jobs is another task's choice.
  - An entry is only returned when it names an object the job role itself renders for that job (the
    kind and the name derived from the job's name), so an edited annotation cannot point the
    deploying identity at anything else.
  - The job's own Role and RoleBinding recorded in a namespace that is neither the CronJob's nor in
    C(rbac_namespaces) (Velero's namespace before the values moved it) are returned only when read
    (C(rbac_elsewhere), the objects C(biometrics.backup.rbac_recorded_elsewhere) names) and made by
    the collection for that job alone (its labels; the binding of the job's name granting the job's Role
    to the job's ServiceAccount only; a Role goes with such a binding, or once that binding was read and
    found gone).
positional: _input, manifests, rbac_namespaces, rbac_elsewhere
extends_documentation_fragment:
  - biometrics.backup.recorded_objects
options:
  rbac_namespaces:
    description:
      - Other namespaces in which a job's own Role and RoleBinding (named like the job) may be removed,
        such as Velero's. Every other entry must be in the CronJob's namespace.
    type: list
    elements: str
    default: []
  rbac_elsewhere:
    description:
      - The Roles and RoleBindings read in other namespaces, as objects or as the registered results of
        M(kubernetes.core.k8s_info) run over what C(biometrics.backup.rbac_recorded_elsewhere) returns.
      - Without it, what a job recorded outside its namespace and C(rbac_namespaces) is never returned.
    type: list
    elements: dict
"""

EXAMPLES = r"""
- name: Read the CronJobs before applying
  kubernetes.core.k8s_info:
    api_version: batch/v1
    kind: CronJob
    namespace: backup
    label_selectors:
      - app.kubernetes.io/managed-by=biometrics.backup
  register: previous

# elsewhere: the jobs' RBAC recorded outside these namespaces, read as in the example of the
# biometrics.backup.rbac_recorded_elsewhere filter (leave it out to keep what lives there).
- name: Remove what the jobs applied since no longer render
  kubernetes.core.k8s:
    state: absent
    api_version: "{{ item.api_version }}"
    kind: "{{ item.kind }}"
    namespace: "{{ item.namespace }}"
    name: "{{ item.name }}"
  loop: "{{ previous.resources | biometrics.backup.objects_left_behind(applied_manifests, ['velero'], elsewhere.results) }}"
"""

RETURN = r"""
_value:
  description:
    - One mapping per object to remove, in the order recorded, with the object's C(api_version), C(kind),
      C(namespace) and C(name), and C(job), the CronJob that recorded it.
  type: list
  elements: dict
  sample:
    - {api_version: networking.k8s.io/v1, kind: NetworkPolicy, namespace: backup, name: db-backup-egress, job: db-backup}
"""

import json

from ansible.errors import AnsibleFilterError
from ansible.module_utils.six import string_types

import yaml  # a dependency of ansible-core itself

ANNOTATION = "backup.biometrics.io/objects"

# What the job role renders beside a job's CronJob (resources.yml.j2): kind -> (apiVersion, the
# name suffixes it uses). The job's own Role/RoleBinding (rbac_rules) may live in another namespace
# (Velero's); the other objects are always in the CronJob's.
_COMPANIONS = {
    "ServiceAccount": ("v1", ("",)),
    "ConfigMap": ("v1", ("-config",)),
    "Role": ("rbac.authorization.k8s.io/v1", ("", "-restic-locks")),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", ("", "-restic-locks")),
    "NetworkPolicy": ("networking.k8s.io/v1", ("-egress",)),
    # The offsite copy's CronJobs (copy.yml.j2), each with companions of its own.
    "CronJob": ("batch/v1", ("-copy", "-copy-prune")),
}


def _documents(manifests):
    for manifest in manifests:
        if isinstance(manifest, dict):
            yield manifest
        elif isinstance(manifest, string_types):
            for document in yaml.safe_load_all(manifest):
                if isinstance(document, dict):
                    yield document
        elif manifest is not None:
            raise AnsibleFilterError("objects_left_behind: a manifest must be a mapping or YAML text, got %s"
                                     % type(manifest).__name__)


def _companions(cronjob):
    """The entries of a CronJob's annotation that name one of its own companions (kind, and name
    derived from the job's), as keys, wherever they are recorded."""
    metadata = cronjob.get("metadata") or {}
    job = metadata.get("name")
    text = (metadata.get("annotations") or {}).get(ANNOTATION)
    if not text or not job:
        return []
    try:
        entries = json.loads(text)
    except ValueError:
        return []  # not ours to interpret: nothing is removed on its say-so
    keys = []
    for entry in entries if isinstance(entries, list) else []:
        if not (isinstance(entry, list) and len(entry) == 4 and all(isinstance(part, string_types) for part in entry)):
            continue
        api_version, kind, where, name = entry
        expected = _COMPANIONS.get(kind)
        if expected is None or api_version != expected[0] or name not in [job + suffix for suffix in expected[1]]:
            continue
        keys.append((api_version, kind, where, name))
    return keys


def _elsewhere(key, cronjob, rbac_namespaces):
    """Whether ``key`` is the job's own Role or RoleBinding recorded outside the CronJob's namespace
    and the namespaces given: for example in Velero's namespace as it was before the values moved it."""
    metadata = cronjob["metadata"]
    return (key[1] in ("Role", "RoleBinding") and key[3] == metadata["name"]
            and key[2] != metadata.get("namespace") and key[2] not in rbac_namespaces)


def _binds_only(binding, job, namespace):
    """Whether a RoleBinding (as read) grants the job's Role to the job's ServiceAccount and nobody else."""
    role, subjects = binding.get("roleRef"), binding.get("subjects")
    return (isinstance(role, dict) and role.get("kind") == "Role" and role.get("name") == job
            and isinstance(subjects, list) and len(subjects) > 0
            and all(isinstance(s, dict) and s.get("kind") == "ServiceAccount" and s.get("name") == job
                    and s.get("namespace") == namespace for s in subjects))


def _made_for(key, cronjob, elsewhere):
    """Whether the object ``key`` names, as read (``elsewhere``), is the one the job role made for
    this CronJob's job: the collection's labels for that job, and the job's own ServiceAccount as the
    only subject of the binding of that name. A Role goes only with its binding so shown, or once
    that binding was read and found gone: a Role whose binding grants somebody else (a job of the
    same name in another namespace), or whose binding was not read, is kept."""
    job, namespace = cronjob["metadata"]["name"], cronjob["metadata"].get("namespace")
    found = elsewhere.objects.get((key[1], key[2], key[3]))
    if found is None:
        return False  # gone already, or not read: nothing is removed unseen
    labels = (found.get("metadata") or {}).get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") != "biometrics.backup" or labels.get("backup.biometrics.io/job") != job:
        return False
    binding_key = ("RoleBinding", key[2], key[3])
    binding = elsewhere.objects.get(binding_key)
    if binding is not None:
        return _binds_only(binding, job, namespace)
    return key[1] == "Role" and binding_key in elsewhere.read


def _copy_of(cronjob, job):
    """Whether ``cronjob`` (as read, or None) is an offsite copy CronJob of ``job``: the copy's
    component label and the job's own file mounted (copy.yml.j2). A job of its own named
    ``<job>-copy`` is neither, and is never removed on the strength of another job's record."""
    metadata = (cronjob or {}).get("metadata") or {}
    labels = metadata.get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") != "biometrics.backup" or labels.get("app.kubernetes.io/component") != "copy":
        return False
    try:
        volumes = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"] or []
    except (KeyError, TypeError):
        return False
    return any(isinstance(volume, dict) and (volume.get("configMap") or {}).get("name") == job + "-config"
               for volume in volumes)


def _left(previous, manifests, rbac_namespaces, elsewhere, unread, name):
    """What the CronJobs in ``previous`` that ``manifests`` render again recorded and no longer
    render, as ``objects_left_behind`` returns it. The job's own RBAC recorded outside
    ``rbac_namespaces`` and not yet read (``elsewhere``, a _ReadElsewhere) goes to ``unread`` instead."""
    if not isinstance(previous, list) or not isinstance(manifests, list):
        raise AnsibleFilterError("%s expects two lists (the CronJobs read before, the manifests now)" % name)
    if isinstance(rbac_namespaces, string_types) or not all(isinstance(ns, string_types) for ns in rbac_namespaces):
        raise AnsibleFilterError("%s: rbac_namespaces must be a list of namespace names" % name)
    rendered = set()
    rendered_jobs = set()
    for document in _documents(manifests):
        metadata = document.get("metadata") or {}
        rendered.add((document.get("apiVersion"), document.get("kind"), metadata.get("namespace"), metadata.get("name")))
        if document.get("kind") == "CronJob":
            rendered_jobs.add((metadata.get("namespace"), metadata.get("name")))
    previous_jobs = {}
    for cronjob in previous:
        metadata = (cronjob.get("metadata") if isinstance(cronjob, dict) else None) or {}
        if metadata.get("name"):
            previous_jobs.setdefault((metadata.get("namespace"), metadata["name"]), cronjob)
    left, seen = [], set()

    def leave(cronjob):
        job = cronjob["metadata"]["name"]
        for key in _companions(cronjob):
            if key in rendered or key in seen:
                continue
            if _elsewhere(key, cronjob, rbac_namespaces):
                if (key[1], key[2], key[3]) not in elsewhere.read:
                    # A Role is read with the binding of its name, recorded or not (_made_for).
                    for kind in (key[1], "RoleBinding"):
                        wanted = {"api_version": key[0], "kind": kind, "namespace": key[2], "name": key[3], "job": job}
                        if wanted not in unread:
                            unread.append(wanted)
                    continue
                if not _made_for(key, cronjob, elsewhere):
                    continue
            elif key[2] != cronjob["metadata"].get("namespace") and not (
                    key[1] in ("Role", "RoleBinding") and key[3] == job):
                continue  # only the job's own RBAC may live in another namespace
            copy = previous_jobs.get((key[2], key[3])) if key[1] == "CronJob" else None
            if key[1] == "CronJob" and not _copy_of(copy, job):
                continue  # gone already, or a job of its own that happens to carry that name
            seen.add(key)
            if copy is not None:
                leave(copy)  # its own objects first: a run stopped between keeps the record
            left.append({"api_version": key[0], "kind": key[1], "namespace": key[2], "name": key[3], "job": job})

    for where_name, cronjob in previous_jobs.items():
        if where_name in rendered_jobs:
            leave(cronjob)
    return left


def _answered(result):
    """Whether a k8s_info loop result is an answer (a list of resources, maybe empty); a refused
    read (403) or an API the server does not serve proves nothing."""
    return isinstance(result.get("resources"), list) and result.get("api_found") is not False


def _asked(result):
    """What a k8s_info loop result looked up: its loop item (a mapping, else empty)."""
    asked = result.get(result.get("ansible_loop_var") or "item")
    return asked if isinstance(asked, dict) else {}


class _ReadElsewhere(object):
    """The Roles and RoleBindings read outside the CronJobs' namespaces: ``objects`` by (kind,
    namespace, name), and ``read``, the keys known either way (found, or looked up and absent)."""

    def __init__(self, rbac_elsewhere=None):
        self.objects, self.read = {}, set()
        if rbac_elsewhere is None:
            return
        if not isinstance(rbac_elsewhere, list):
            raise AnsibleFilterError("objects_left_behind: rbac_elsewhere must be a list of the objects read")
        for item in rbac_elsewhere:
            if not isinstance(item, dict):
                continue
            if "metadata" in item:
                self._found(item)
                continue
            # A k8s_info result of a loop: what it looked up (its loop item) is known only when it
            # answered (a list of resources, maybe empty); a failed read (403) proves nothing.
            if not _answered(item):
                continue  # refused (no resources), or an API the server lacks: nothing proven
            asked = _asked(item)
            if all(isinstance(asked.get(part), string_types) for part in ("kind", "namespace", "name")):
                self.read.add((asked["kind"], asked["namespace"], asked["name"]))
            for found in item["resources"]:
                self._found(found)

    def _found(self, found):
        if not isinstance(found, dict) or not isinstance(found.get("metadata"), dict):
            return
        metadata = found["metadata"]
        if found.get("kind") in ("Role", "RoleBinding") and metadata.get("name"):
            key = (found["kind"], metadata.get("namespace"), metadata["name"])
            self.objects[key] = found
            self.read.add(key)


def objects_left_behind(previous, manifests, rbac_namespaces=(), rbac_elsewhere=None):
    return _left(previous, manifests, rbac_namespaces, _ReadElsewhere(rbac_elsewhere), [], "objects_left_behind")


def rbac_recorded_elsewhere(previous, manifests, rbac_namespaces=()):
    unread = []
    _left(previous, manifests, rbac_namespaces, _ReadElsewhere(), unread, "rbac_recorded_elsewhere")
    return unread


def rbac_kept_elsewhere(reads, left_behind):
    """What a run keeps of the Roles and RoleBindings it read outside the jobs' namespaces, each
    with the line that tells the user why: the API refused the read, or what was read is not
    among ``left_behind`` (not shown to be the job's alone)."""
    if not isinstance(reads, list) or not isinstance(left_behind, list):
        raise AnsibleFilterError("rbac_kept_elsewhere: its input (the registered k8s_info results) and "
                                 "left_behind (what objects_left_behind returned) must be lists")
    going = set((left.get("kind"), left.get("namespace"), left.get("name")) for left in left_behind if isinstance(left, dict))
    kept = []
    for result in reads:
        if not isinstance(result, dict) or result.get("skipped"):
            continue
        asked = _asked(result)
        if not _answered(result):
            kind, name, namespace = asked.get("kind"), asked.get("name"), asked.get("namespace")
            kept.append(dict(kind=kind, name=name, namespace=namespace, job=asked.get("job"),
                             message="Not read, so kept: %s/%s in namespace %s, recorded by %s: %s"
                             % (kind, name, namespace, asked.get("job"), result.get("msg") or "no answer")))
            continue
        for found in result["resources"]:
            metadata = found.get("metadata") if isinstance(found, dict) else None
            if not isinstance(metadata, dict) or not metadata.get("name"):
                continue
            kind, name, namespace = found.get("kind"), metadata["name"], metadata.get("namespace")
            if (kind, namespace, name) in going:
                continue
            kept.append(dict(kind=kind, name=name, namespace=namespace, job=asked.get("job"),
                             message="Kept: %s/%s in namespace %s is not shown to be the job's alone (labels, "
                             "roleRef or subjects); the job no longer names that namespace, so delete it by hand "
                             "once nobody needs it" % (kind, name, namespace)))
    return kept


class FilterModule(object):
    def filters(self):
        return {"objects_left_behind": objects_left_behind}
