"""The local control plane is a real Kubernetes API: admission, controllers and RBAC act.

The pods here name an image that no registry serves (the node's containerd refuses every
pull), so they stay Pending whether or not the session's node runs (test_node.py runs pods);
everything asserted here is done by kube-apiserver (Pod Security admission, RBAC,
authentication of ServiceAccount tokens) or by kube-controller-manager (CronJob -> Job -> Pod,
garbage collection).
"""

import kubernetes
import pytest

from kube_fixtures import wait_for

client = kubernetes.client
ApiException = kubernetes.client.exceptions.ApiException


def _pod(name, privileged):
    if privileged:
        container = client.V1Container(
            name="main", image="registry.invalid/busybox:1", command=["sleep", "3600"],
            security_context=client.V1SecurityContext(privileged=True, run_as_user=0),
        )
        return client.V1Pod(metadata=client.V1ObjectMeta(name=name),
                            spec=client.V1PodSpec(containers=[container]))
    container = client.V1Container(
        name="main", image="registry.invalid/busybox:1", command=["sleep", "3600"],
        security_context=client.V1SecurityContext(
            allow_privilege_escalation=False, run_as_non_root=True, run_as_user=65532,
            capabilities=client.V1Capabilities(drop=["ALL"]),
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
    )
    return client.V1Pod(metadata=client.V1ObjectMeta(name=name),
                        spec=client.V1PodSpec(containers=[container]))


def test_restricted_pod_security_refuses_noncompliant_pod(kube_api, make_kube_namespace):
    core = client.CoreV1Api(kube_api)
    restricted = make_kube_namespace("psa", labels={
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    })

    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(restricted, _pod("privileged", privileged=True))
    assert refused.value.status == 403
    assert "violates PodSecurity" in refused.value.body
    assert "restricted" in refused.value.body
    assert "privileged" in refused.value.body
    names = [pod.metadata.name for pod in core.list_namespaced_pod(restricted).items]
    assert "privileged" not in names

    # The same admission accepts a pod that meets the profile: it refuses by policy, not always.
    created = core.create_namespaced_pod(restricted, _pod("compliant", privileged=False))
    assert created.metadata.uid
    assert core.read_namespaced_pod("compliant", restricted).status.phase == "Pending"

    # And the privileged pod is refused because of the namespace label, not cluster-wide.
    unlabelled = make_kube_namespace("psa-none")
    assert core.create_namespaced_pod(unlabelled, _pod("privileged", privileged=True)).metadata.uid


def test_cronjob_controller_creates_job_and_pod(kube_api, kube_namespace):
    batch = client.BatchV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    container = client.V1Container(name="tick", image="registry.invalid/busybox:1", command=["true"])
    cronjob = client.V1CronJob(
        metadata=client.V1ObjectMeta(name="every-minute"),
        spec=client.V1CronJobSpec(
            schedule="* * * * *",
            job_template=client.V1JobTemplateSpec(spec=client.V1JobSpec(
                backoff_limit=0,
                template=client.V1PodTemplateSpec(spec=client.V1PodSpec(
                    restart_policy="Never", containers=[container])),
            )),
        ),
    )
    created = batch.create_namespaced_cron_job(kube_namespace, cronjob)

    def owned_jobs():
        return [job for job in batch.list_namespaced_job(kube_namespace).items
                if any(ref.uid == created.metadata.uid for ref in job.metadata.owner_references or [])]

    # The schedule fires at the next full minute; allow for a loaded machine beyond that.
    jobs = wait_for(owned_jobs, timeout=150, interval=2, what="the CronJob controller to create a Job")
    job = jobs[0]
    assert job.metadata.name.startswith("every-minute-")
    assert job.spec.template.spec.containers[0].command == ["true"]

    # The Job controller in turn creates the Pod (Pending: its image cannot be pulled).
    def job_pods():
        return core.list_namespaced_pod(kube_namespace, label_selector="job-name=%s" % job.metadata.name).items

    pods = wait_for(job_pods, timeout=60, interval=1, what="the Job controller to create a Pod")
    assert pods[0].metadata.owner_references[0].uid == job.metadata.uid

    # Garbage collector: deleting the CronJob in the background removes the Jobs it owns.
    batch.delete_namespaced_cron_job("every-minute", kube_namespace, propagation_policy="Background")
    wait_for(lambda: not owned_jobs(), timeout=60, interval=1,
             what="the garbage collector to delete the CronJob's Jobs")


def test_rbac_denies_service_account_what_its_role_does_not_grant(kube_cluster, kube_api, make_kube_namespace):
    core = client.CoreV1Api(kube_api)
    rbac = client.RbacAuthorizationV1Api(kube_api)
    namespace = make_kube_namespace("rbac")
    other = make_kube_namespace("rbac-other")
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="reader")))
    rbac.create_namespaced_role(namespace, client.V1Role(
        metadata=client.V1ObjectMeta(name="configmap-reader"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])]))
    rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="reader"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="configmap-reader"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)]))
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="settings"), data={"mode": "test"}))

    # A real token, signed by the apiserver's service-account key (TokenRequest API).
    token = core.create_namespaced_service_account_token("reader", namespace, client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600))).status.token
    with kube_cluster.api_client(token=token) as sa_api:
        sa_core = client.CoreV1Api(sa_api)
        # Granted: RBAC propagation is immediate, but poll briefly in case the binding cache lags.
        maps = wait_for(lambda: _allowed(lambda: sa_core.list_namespaced_config_map(namespace)),
                        timeout=10, what="the RoleBinding to take effect")
        assert [item.metadata.name for item in maps.items if item.metadata.name == "settings"] == ["settings"]
        assert sa_core.read_namespaced_config_map("settings", namespace).data == {"mode": "test"}

        denied = [
            lambda: sa_core.list_namespaced_secret(namespace),
            lambda: sa_core.create_namespaced_config_map(namespace, client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="nope"))),
            lambda: sa_core.delete_namespaced_config_map("settings", namespace),
            lambda: sa_core.list_namespaced_config_map(other),
            sa_core.list_namespace,
        ]
        for call in denied:
            with pytest.raises(ApiException) as refused:
                call()
            assert refused.value.status == 403
            assert "system:serviceaccount:%s:reader" % namespace in refused.value.body
    # Nothing the denied calls tried happened.
    assert core.read_namespaced_config_map("settings", namespace).data == {"mode": "test"}
    assert "nope" not in [item.metadata.name for item in core.list_namespaced_config_map(namespace).items]


def _allowed(call):
    try:
        return call()
    except ApiException as exc:
        if exc.status == 403:
            return None
        raise


def test_admin_token_authenticates_and_a_wrong_token_does_not(kube_cluster, kube_api):
    names = {ns.metadata.name for ns in client.CoreV1Api(kube_api).list_namespace().items}
    assert {"default", "kube-system"} <= names
    review = client.AuthenticationV1Api(kube_api).create_self_subject_review(
        client.V1SelfSubjectReview(metadata=client.V1ObjectMeta()))
    assert "system:masters" in review.status.user_info.groups
    with kube_cluster.api_client(token="not-a-valid-token") as bad_api:
        with pytest.raises(ApiException) as refused:
            client.CoreV1Api(bad_api).list_namespace()
        assert refused.value.status == 401
