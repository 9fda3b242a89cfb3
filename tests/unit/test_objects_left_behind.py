"""The objects_left_behind filter: what a job's CronJob recorded and its new rendering lacks."""

import json

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.biometrics.backup.plugins.filter.objects_left_behind import (
    ANNOTATION, FilterModule, objects_left_behind, rbac_kept_elsewhere, rbac_recorded_elsewhere)
from ansible_collections.biometrics.backup.plugins.filter.rbac_kept_elsewhere import (
    FilterModule as KeptFilterModule)
from ansible_collections.biometrics.backup.plugins.filter.rbac_recorded_elsewhere import (
    FilterModule as RbacFilterModule)

RBAC = "rbac.authorization.k8s.io/v1"


def _cronjob(name, namespace="backup", recorded=None, annotation=None):
    metadata = {"name": name, "namespace": namespace}
    if recorded is not None:
        annotation = json.dumps(recorded)
    if annotation is not None:
        metadata["annotations"] = {ANNOTATION: annotation}
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": metadata}


def _object(api_version, kind, name, namespace="backup"):
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": namespace}}


FULL = [["v1", "ServiceAccount", "backup", "db"],
        [RBAC, "Role", "backup", "db-restic-locks"], [RBAC, "RoleBinding", "backup", "db-restic-locks"],
        ["v1", "ConfigMap", "backup", "db-config"],
        ["networking.k8s.io/v1", "NetworkPolicy", "backup", "db-egress"]]


def _names(left):
    return [(entry["kind"], entry["namespace"], entry["name"]) for entry in left]


def test_objects_no_longer_rendered_are_returned_in_recorded_order():
    now = [_cronjob("db"), _object("v1", "ServiceAccount", "db"), _object("v1", "ConfigMap", "db-config")]
    left = objects_left_behind([_cronjob("db", recorded=FULL)], now)
    assert _names(left) == [("Role", "backup", "db-restic-locks"), ("RoleBinding", "backup", "db-restic-locks"),
                            ("NetworkPolicy", "backup", "db-egress")]
    assert left[0] == {"api_version": RBAC, "kind": "Role", "namespace": "backup", "name": "db-restic-locks", "job": "db"}


def test_everything_rendered_again_leaves_nothing_and_yaml_text_counts_like_mappings():
    rendered = [_cronjob("db")] + [_object(api, kind, name, ns) for api, kind, ns, name in FULL]
    text = "\n---\n".join(yaml.safe_dump(document) for document in rendered)
    assert objects_left_behind([_cronjob("db", recorded=FULL)], rendered) == []
    assert objects_left_behind([_cronjob("db", recorded=FULL)], [text, None]) == []
    assert _names(objects_left_behind([_cronjob("db", recorded=FULL)], [yaml.safe_dump(_cronjob("db"))]))[-1] == (
        "NetworkPolicy", "backup", "db-egress")


def test_cronjobs_this_run_does_not_render_are_left_alone():
    # Another play's job, or one removed from the values (the umbrella role's own task removes those).
    assert objects_left_behind([_cronjob("other", recorded=FULL)], [_cronjob("db")]) == []
    # Same name in another namespace is another job.
    assert objects_left_behind([_cronjob("db", namespace="elsewhere", recorded=FULL)], [_cronjob("db")]) == []


@pytest.mark.parametrize("entry", [
    ["v1", "Secret", "backup", "db-config"],                      # a kind the role never renders
    ["v1", "ConfigMap", "backup", "app-settings"],                # a name not derived from the job
    ["v1", "ConfigMap", "kube-system", "db-config"],              # another namespace
    [RBAC, "Role", "kube-system", "db-restic-locks"],             # only the job's own Role may live elsewhere
    [RBAC, "Role", "kube-system", "db"],                          # and only in the namespaces given
    [RBAC, "RoleBinding", "kube-system", "db"],
    ["apps/v1", "ServiceAccount", "backup", "db"],                # wrong apiVersion for the kind
    ["v1", "ServiceAccount", "backup"],                           # malformed
    "v1/ServiceAccount/backup/db",
])
def test_an_edited_annotation_cannot_name_anything_else(entry):
    assert objects_left_behind([_cronjob("db", recorded=[entry])], [_cronjob("db")], ["velero"]) == []


def test_the_jobs_own_role_in_veleros_namespace_is_recorded_there():
    recorded = [[RBAC, "Role", "velero", "pvc-backup"], [RBAC, "RoleBinding", "velero", "pvc-backup"]]
    left = objects_left_behind([_cronjob("pvc-backup", recorded=recorded)], [_cronjob("pvc-backup")], ["velero"])
    assert _names(left) == [("Role", "velero", "pvc-backup"), ("RoleBinding", "velero", "pvc-backup")]
    assert objects_left_behind([_cronjob("pvc-backup", recorded=recorded)], [_cronjob("pvc-backup")]) == []


@pytest.mark.parametrize("annotation", ["not json", "{\"a\": 1}", "null", ""])
def test_an_unreadable_or_missing_annotation_removes_nothing(annotation):
    assert objects_left_behind([_cronjob("db", annotation=annotation)], [_cronjob("db")]) == []
    assert objects_left_behind([_cronjob("db")], [_cronjob("db")]) == []


def test_wrong_input_is_a_filter_error():
    with pytest.raises(AnsibleFilterError, match="two lists"):
        objects_left_behind({"metadata": {}}, [])
    with pytest.raises(AnsibleFilterError, match="mapping or YAML text"):
        objects_left_behind([], [42])
    with pytest.raises(AnsibleFilterError, match="rbac_namespaces"):
        objects_left_behind([], [], "velero")
    assert FilterModule().filters()["objects_left_behind"] is objects_left_behind


COPY = [["v1", "ServiceAccount", "backup", "db-copy"],
        ["networking.k8s.io/v1", "NetworkPolicy", "backup", "db-copy-egress"]]
PRUNE = [["v1", "ServiceAccount", "backup", "db-copy-prune"],
         [RBAC, "Role", "backup", "db-copy-prune-restic-locks"], [RBAC, "RoleBinding", "backup", "db-copy-prune-restic-locks"]]
WITH_COPY = FULL + [["batch/v1", "CronJob", "backup", "db-copy"], ["batch/v1", "CronJob", "backup", "db-copy-prune"]]


def _copy_cronjob(name, of, recorded, component="copy", namespace="backup"):
    """A CronJob as copy.yml.j2 renders it: the copy's component, the copied job's file mounted."""
    cronjob = _cronjob(name, namespace=namespace, recorded=recorded)
    cronjob["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "biometrics.backup",
                                     "app.kubernetes.io/component": component}
    cronjob["spec"] = {"jobTemplate": {"spec": {"template": {"spec": {"volumes": [
        {"name": "scratch", "emptyDir": {}}, {"name": "job-config", "configMap": {"name": of + "-config"}}]}}}}}
    return cronjob


def test_a_copy_turned_off_takes_its_cronjobs_and_their_objects_each_before_its_cronjob():
    previous = [_cronjob("db", recorded=WITH_COPY), _copy_cronjob("db-copy", "db", COPY),
                _copy_cronjob("db-copy-prune", "db", PRUNE)]
    now = [_cronjob("db")] + [_object(api, kind, name, ns) for api, kind, ns, name in FULL]
    left = objects_left_behind(previous, now)
    assert _names(left) == [
        ("ServiceAccount", "backup", "db-copy"), ("NetworkPolicy", "backup", "db-copy-egress"),
        ("CronJob", "backup", "db-copy"),
        ("ServiceAccount", "backup", "db-copy-prune"), ("Role", "backup", "db-copy-prune-restic-locks"),
        ("RoleBinding", "backup", "db-copy-prune-restic-locks"), ("CronJob", "backup", "db-copy-prune")]
    assert [entry["job"] for entry in left] == ["db-copy", "db-copy", "db", "db-copy-prune", "db-copy-prune",
                                                "db-copy-prune", "db"]
    # Only the destination's prune turned off (copy.retention removed): the copy stays whole.
    copy_now = now + [_cronjob("db-copy")] + [_object(api, kind, name, ns) for api, kind, ns, name in COPY]
    assert _names(objects_left_behind(previous, copy_now))[-1] == ("CronJob", "backup", "db-copy-prune")
    assert ("CronJob", "backup", "db-copy") not in _names(objects_left_behind(previous, copy_now))
    # A copy CronJob already gone (removed by hand): nothing to delete, nothing named.
    assert objects_left_behind(previous[:1], now) == []


@pytest.mark.parametrize("impostor", [
    _copy_cronjob("db-copy", "db", COPY, component="postgres"),    # a job of its own named db-copy
    _copy_cronjob("db-copy", "other", COPY),                       # another job's copy (its file)
    _cronjob("db-copy", recorded=COPY),                            # no labels, no pod
    dict(_copy_cronjob("db-copy", "db", COPY), metadata={           # not managed by the collection
        "name": "db-copy", "namespace": "backup", "labels": {"app.kubernetes.io/component": "copy"}}),
    dict(_copy_cronjob("db-copy", "db", COPY), spec={"jobTemplate": None}),
])
def test_a_recorded_cronjob_that_is_not_the_jobs_copy_is_left_alone(impostor):
    previous = [_cronjob("db", recorded=WITH_COPY), impostor]
    left = objects_left_behind(previous, [_cronjob("db")] + [_object(api, kind, name, ns) for api, kind, ns, name in FULL])
    assert left == []


@pytest.mark.parametrize("entry", [
    ["batch/v1", "CronJob", "backup", "db-nightly"],      # a CronJob not derived as the job's copy
    ["batch/v1", "CronJob", "backup", "other-copy"],
    ["batch/v1beta1", "CronJob", "backup", "db-copy"],
    ["batch/v1", "CronJob", "elsewhere", "db-copy"],
])
def test_only_the_jobs_own_copy_cronjobs_may_be_recorded(entry):
    previous = [_cronjob("db", recorded=[entry]), _copy_cronjob(entry[3], "db", [], namespace=entry[2])]
    assert objects_left_behind(previous, [_cronjob("db")], ["elsewhere"]) == []


def test_a_cronjob_recorded_twice_is_left_once():
    previous = [_cronjob("db", recorded=[["batch/v1", "CronJob", "backup", "db-copy"]] * 2),
                _copy_cronjob("db-copy", "db", [["batch/v1", "CronJob", "backup", "db-copy-copy"]]),
                _copy_cronjob("db-copy-copy", "db-copy", [])]
    assert _names(objects_left_behind(previous, [_cronjob("db")])) == [
        ("CronJob", "backup", "db-copy-copy"), ("CronJob", "backup", "db-copy")]


# The Velero job's Role and RoleBinding once the values move Velero's namespace from "velero-old".
MOVED = [[RBAC, "Role", "velero-old", "pvc-backup"], [RBAC, "RoleBinding", "velero-old", "pvc-backup"]]
LABELS = {"app.kubernetes.io/managed-by": "biometrics.backup", "backup.biometrics.io/job": "pvc-backup"}


def _read(kind, name="pvc-backup", namespace="velero-old", labels=None, subjects=None):
    """A Role or RoleBinding as the API returns it, by default as the job role makes it for pvc-backup."""
    found = {"apiVersion": RBAC, "kind": kind,
             "metadata": {"name": name, "namespace": namespace, "labels": LABELS if labels is None else labels}}
    if kind == "RoleBinding":
        found["roleRef"] = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        found["subjects"] = [{"kind": "ServiceAccount", "name": "pvc-backup", "namespace": "backup"}] \
            if subjects is None else subjects
    return found


def test_rbac_in_a_namespace_no_longer_named_is_read_first():
    previous = [_cronjob("pvc-backup", recorded=MOVED + [["v1", "ServiceAccount", "backup", "pvc-backup"]])]
    now = [_cronjob("pvc-backup"), _object("v1", "ServiceAccount", "pvc-backup")]
    assert _names(rbac_recorded_elsewhere(previous, now, ["velero"])) == [
        ("Role", "velero-old", "pvc-backup"), ("RoleBinding", "velero-old", "pvc-backup")]
    # Not read, not removed; still in the namespaces given, nothing to read.
    assert objects_left_behind(previous, now, ["velero"]) == []
    assert rbac_recorded_elsewhere(previous, now, ["velero-old"]) == []
    # Only the job's own RBAC is ever read: the lock Role never lives elsewhere.
    assert rbac_recorded_elsewhere([_cronjob("pvc-backup", recorded=[[RBAC, "Role", "x", "pvc-backup-restic-locks"]])],
                                   now, ["velero"]) == []


def test_rbac_elsewhere_made_for_the_job_is_removed_as_read_or_from_k8s_info_results():
    previous = [_cronjob("pvc-backup", recorded=MOVED)]
    now = [_cronjob("pvc-backup")]
    read = [_read("Role"), _read("RoleBinding")]
    expected = [("Role", "velero-old", "pvc-backup"), ("RoleBinding", "velero-old", "pvc-backup")]
    assert _names(objects_left_behind(previous, now, ["velero"], read)) == expected
    results = [{"changed": False, "resources": [found], "item": {}} for found in read]
    assert _names(objects_left_behind(previous, now, ["velero"], results)) == expected
    # Gone already (k8s_info found nothing): nothing to remove.
    assert objects_left_behind(previous, now, ["velero"], [{"resources": []}, {"resources": []}]) == []


@pytest.mark.parametrize("read, left", [
    # Not the collection's, or another job's: kept.
    ([_read("Role", labels={}), _read("RoleBinding", labels={})], []),
    ([_read("Role", labels=dict(LABELS, **{"backup.biometrics.io/job": "other"})), _read("RoleBinding")],
     [("RoleBinding", "velero-old", "pvc-backup")]),
    # A binding that also grants someone else (a job of that name in another namespace): both kept.
    ([_read("Role"), _read("RoleBinding", subjects=[
        {"kind": "ServiceAccount", "name": "pvc-backup", "namespace": "backup"},
        {"kind": "ServiceAccount", "name": "pvc-backup", "namespace": "backup-two"}])], []),
    ([_read("Role"), _read("RoleBinding", subjects=[
        {"kind": "ServiceAccount", "name": "pvc-backup", "namespace": "backup-two"}])], []),
    ([_read("Role"), _read("RoleBinding", subjects=[])], []),
    # Only the Role was read: its binding may grant somebody else.
    ([_read("Role")], []),
    # A binding of another Role, or with a subject that is no ServiceAccount mapping.
    ([_read("Role"), dict(_read("RoleBinding"), roleRef={"kind": "Role", "name": "velero-server"})], []),
    ([_read("Role"), _read("RoleBinding", subjects=["pvc-backup"])], []),
    ([_read("Role"), dict(_read("RoleBinding"), roleRef="pvc-backup")], []),
    # An object read elsewhere than recorded proves nothing.
    ([_read("Role", namespace="velero-other"), _read("RoleBinding", namespace="velero-other")], []),
])
def test_rbac_elsewhere_not_made_for_the_job_is_kept(read, left):
    assert _names(objects_left_behind([_cronjob("pvc-backup", recorded=MOVED)], [_cronjob("pvc-backup")],
                                      ["velero"], read)) == left


def test_rbac_elsewhere_must_be_a_list():
    with pytest.raises(AnsibleFilterError, match="rbac_elsewhere"):
        objects_left_behind([], [], ["velero"], {"resources": []})
    with pytest.raises(AnsibleFilterError, match="rbac_recorded_elsewhere: rbac_namespaces"):
        rbac_recorded_elsewhere([], [], "velero")
    assert RbacFilterModule().filters()["rbac_recorded_elsewhere"] is rbac_recorded_elsewhere


def _result(kind, resources, name="pvc-backup", namespace="velero-old", **extra):
    """One item of a registered k8s_info loop over what rbac_recorded_elsewhere returned."""
    result = {"changed": False, "ansible_loop_var": "elsewhere",
              "elsewhere": {"api_version": RBAC, "kind": kind, "namespace": namespace, "name": name, "job": "pvc-backup"}}
    if resources is not None:
        result["resources"] = resources
    result.update(extra)
    return result


def test_a_recorded_role_is_read_with_its_binding_and_goes_once_that_is_known_gone():
    previous = [_cronjob("pvc-backup", recorded=MOVED[:1])]  # the Role alone recorded
    now = [_cronjob("pvc-backup")]
    assert _names(rbac_recorded_elsewhere(previous, now, ["velero"])) == [
        ("Role", "velero-old", "pvc-backup"), ("RoleBinding", "velero-old", "pvc-backup")]
    # Read, and no binding of that name there: the Role grants nothing, it goes.
    gone = [_result("Role", [_read("Role")]), _result("RoleBinding", [])]
    assert _names(objects_left_behind(previous, now, ["velero"], gone)) == [("Role", "velero-old", "pvc-backup")]
    # Another namespace's job of that name binds it there: kept.
    shared = [_result("Role", [_read("Role")]), _result("RoleBinding", [_read("RoleBinding", subjects=[
        {"kind": "ServiceAccount", "name": "pvc-backup", "namespace": "team-b"}])])]
    assert objects_left_behind(previous, now, ["velero"], shared) == []


@pytest.mark.parametrize("binding", [
    # Refused (403) under failed_when: false, as the registered item then looks: nothing proven.
    _result("RoleBinding", None, failed=False, failed_when_result=False, msg="Failed to retrieve requested object: Forbidden"),
    _result("RoleBinding", [], api_found=False),                 # an API the server lacks answers nothing
    _result("RoleBinding", None, skipped=True),
    {"resources": []},                                             # no loop item: what was asked is unknown
    "junk", None, {"resources": [None, "x", {"kind": "RoleBinding", "metadata": "x"}]},
])
def test_a_binding_not_read_keeps_the_role(binding):
    previous = [_cronjob("pvc-backup", recorded=MOVED)]
    assert objects_left_behind(previous, [_cronjob("pvc-backup")], ["velero"], [_result("Role", [_read("Role")]), binding]) == []


def test_a_refused_role_leaves_its_binding_to_its_own_test_and_an_unlabelled_binding_stays():
    previous = [_cronjob("pvc-backup", recorded=MOVED)]
    now = [_cronjob("pvc-backup")]
    refused = _result("Role", None, failed=False, msg="Forbidden")
    # The Role could not be read: kept; its binding, the job's alone, goes (the access goes with it).
    assert _names(objects_left_behind(previous, now, ["velero"], [refused, _result("RoleBinding", [_read("RoleBinding")])])) == [
        ("RoleBinding", "velero-old", "pvc-backup")]
    # A binding without the collection's labels that binds only the job: it stays, the Role (ours) goes.
    unlabelled = _result("RoleBinding", [_read("RoleBinding", labels={})])
    assert _names(objects_left_behind(previous, now, ["velero"], [_result("Role", [_read("Role")]), unlabelled])) == [
        ("Role", "velero-old", "pvc-backup")]


def _kept(reads, left_behind):
    return [(entry["kind"], entry["namespace"], entry["name"], entry["message"]) for entry in rbac_kept_elsewhere(reads, left_behind)]


def test_what_is_kept_elsewhere_is_named_with_its_reason():
    previous = [_cronjob("pvc-backup", recorded=MOVED)]
    now = [_cronjob("pvc-backup")]
    shared = [_result("Role", [_read("Role")]), _result("RoleBinding", [_read("RoleBinding", subjects=[
        {"kind": "ServiceAccount", "name": "pvc-backup", "namespace": "team-b"}])])]
    left = objects_left_behind(previous, now, ["velero"], shared)
    assert left == []
    kept = _kept(shared, left)
    assert [entry[:3] for entry in kept] == [("Role", "velero-old", "pvc-backup"), ("RoleBinding", "velero-old", "pvc-backup")]
    assert kept[0][3] == (
        "Kept: Role/pvc-backup in namespace velero-old is not shown to be the job's alone (labels, roleRef or "
        "subjects); the job no longer names that namespace, so delete it by hand once nobody needs it")
    assert rbac_kept_elsewhere(shared, left)[0]["job"] == "pvc-backup"
    # The job's alone: both go, nothing is reported.
    own = [_result("Role", [_read("Role")]), _result("RoleBinding", [_read("RoleBinding")])]
    assert rbac_kept_elsewhere(own, objects_left_behind(previous, now, ["velero"], own)) == []


def test_a_refused_read_is_reported_with_the_apis_message_and_a_skipped_one_is_not():
    previous = [_cronjob("pvc-backup", recorded=MOVED)]
    now = [_cronjob("pvc-backup")]
    reads = [_result("Role", None, failed=False, msg="Failed to retrieve requested object: Forbidden"),
             _result("RoleBinding", [_read("RoleBinding")]), _result("Role", None, skipped=True), "junk",
             _result("RoleBinding", [None, {"kind": "RoleBinding", "metadata": {}}])]
    left = objects_left_behind(previous, now, ["velero"], reads)
    assert _names(left) == [("RoleBinding", "velero-old", "pvc-backup")]
    assert _kept(reads, left) == [(
        "Role", "velero-old", "pvc-backup",
        "Not read, so kept: Role/pvc-backup in namespace velero-old, recorded by pvc-backup: "
        "Failed to retrieve requested object: Forbidden")]
    unserved = [_result("RoleBinding", [], api_found=False, msg="Failed to find API for resource")]
    assert _kept(unserved, []) == [(
        "RoleBinding", "velero-old", "pvc-backup",
        "Not read, so kept: RoleBinding/pvc-backup in namespace velero-old, recorded by pvc-backup: "
        "Failed to find API for resource")]
    no_answer = [_result("Role", None)]
    assert _kept(no_answer, [])[0][3].endswith("recorded by pvc-backup: no answer")


def test_rbac_kept_elsewhere_wants_lists():
    with pytest.raises(AnsibleFilterError, match="rbac_kept_elsewhere: its input"):
        rbac_kept_elsewhere({"results": []}, [])
    with pytest.raises(AnsibleFilterError, match="left_behind"):
        rbac_kept_elsewhere([], None)
    assert KeptFilterModule().filters()["rbac_kept_elsewhere"] is rbac_kept_elsewhere
