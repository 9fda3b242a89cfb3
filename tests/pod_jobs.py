# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running the collection's CronJobs as real pods on the local node (tests and `make demo`).

``run_cronjob_now`` is what an operator does to run a CronJob outside its schedule,
``kubectl create job <name> --from=cronjob/<cronjob>``, then waits for the Job to complete
or fail and reads the pod's log back through the API server (the kubelet serves it). The
runner logs lines on stderr and prints its JSON result last on stdout; both end up in the
container log, and ``JobRun.result`` picks the result out.

``hostpath_claim`` backs a PersistentVolumeClaim with a hostPath PersistentVolume on the
node (a directory of the host), bound to that claim only: what a storage class provisioner
would do in a real cluster.

``create_seed_inputs`` creates what the seed's values refer to but do not create.
"""

import json
import os
import re
import shutil
import subprocess
import time
import uuid

# The runner image's user (images/runner/Containerfile), who must be able to write the
# hostPath directories of writable claims.
RUNNER_UID = 65532


def _kubernetes():
    import kubernetes  # test requirement; imported late so importing this module is cheap
    return kubernetes


def kubectl_binary():
    """kubectl of the venv (make venv installs it), else the one on PATH."""
    import sys
    candidate = os.path.join(os.path.dirname(sys.executable), "kubectl")
    return candidate if os.access(candidate, os.X_OK) else (shutil.which("kubectl") or "kubectl")


def create_seed_inputs(api, namespace, recipient, identity, access_key, secret_key, config_files,
                       restic_password=None):
    """The objects the seed's values refer to but do not create: the encryption key Secret
    (recipients and identity), the S3 credentials Secret and the application's configuration
    ConfigMap (what the config-to-git job commits); with ``restic_password`` the restic
    repositories' password Secret (``backup-restic-password``). An operator creates these before
    deploying."""
    client = _kubernetes().client
    core = client.CoreV1Api(api)
    if restic_password is not None:
        core.create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name="backup-restic-password"), string_data={"password": restic_password}))
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="backup-encryption-key"),
        string_data={"recipients": recipient + "\n", "identity": identity}))
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="backup-s3-credentials"),
        string_data={"access_key": access_key, "secret_key": secret_key}))
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="biometrics-config"), data=config_files))


def hostpath_claim(api, namespace, claim, directory, capacity="1Gi", writable=True, create_claim=True):
    """A PVC ``claim`` in ``namespace`` bound to a new hostPath PV of ``directory``.

    With ``create_claim=False`` only the PV is made, reserved for that claim (``claimRef``):
    for a claim something else creates (the storage role), which the binder then binds to it.

    The directory is made (and, when ``writable``, given to the runner's uid: the pod runs
    as that user and the kubelet does not chown hostPath volumes). Returns the PV's name;
    ``delete_persistent_volume`` removes it (the claim goes with its namespace).
    """
    client = _kubernetes().client
    core = client.CoreV1Api(api)
    os.makedirs(directory, exist_ok=True)
    if writable:
        for root, dirs, files in os.walk(directory):
            for name in [root] + [os.path.join(root, item) for item in dirs + files]:
                os.lchown(name, RUNNER_UID, RUNNER_UID)
    else:  # readable by the runner's uid, whatever the umask or the test's tmp dir gave
        for root, dirs, files in os.walk(directory):
            os.chmod(root, 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
    pv_name = "bb-%s-%s" % (claim[:30], uuid.uuid4().hex[:8])
    core.create_persistent_volume(client.V1PersistentVolume(
        metadata=client.V1ObjectMeta(name=pv_name, labels={"backup.biometrics.io/test": "hostpath"}),
        spec=client.V1PersistentVolumeSpec(
            capacity={"storage": capacity}, access_modes=["ReadWriteOnce"],
            persistent_volume_reclaim_policy="Retain", storage_class_name="",
            host_path=client.V1HostPathVolumeSource(path=str(directory), type="Directory"),
            claim_ref=client.V1ObjectReference(namespace=namespace, name=claim))))
    if not create_claim:
        return pv_name
    existing = {item.metadata.name for item in core.list_namespaced_persistent_volume_claim(namespace).items}
    if claim not in existing:
        core.create_namespaced_persistent_volume_claim(namespace, client.V1PersistentVolumeClaim(
            metadata=client.V1ObjectMeta(name=claim),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"], storage_class_name="", volume_name=pv_name,
                resources=client.V1VolumeResourceRequirements(requests={"storage": capacity}))))
    _wait(lambda: core.read_namespaced_persistent_volume_claim(claim, namespace).status.phase == "Bound",
          120, "PVC %s/%s Bound to %s" % (namespace, claim, pv_name))
    return pv_name


def delete_persistent_volume(api, name):
    client = _kubernetes().client
    try:
        client.CoreV1Api(api).delete_persistent_volume(name)
    except _kubernetes().client.exceptions.ApiException as exc:
        if exc.status != 404:
            raise


def _wait(predicate, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


# A runner log line (stderr): "2026-12-04T21:07:23Z INFO drill redis-backup: ...".
RUNNER_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ [A-Z]+ ")


def result_of(log_text):
    """The runner's JSON result: the last pretty-printed document in the log, from a line "{"
    or "[" to the matching closing line at column 0 (log lines may follow it).

    The container log interleaves stdout and stderr in the order the runtime read them, so
    log lines can land inside the document: they are dropped first (no JSON line starts
    with a timestamp)."""
    lines = [line for line in log_text.splitlines() if not RUNNER_LOG_LINE.match(line)]
    closing = {"{": "}", "[": "]"}
    for start in range(len(lines) - 1, -1, -1):
        if lines[start] not in closing:
            continue
        for end in range(start + 1, len(lines)):
            if lines[end] == closing[lines[start]]:
                try:
                    return json.loads("\n".join(lines[start:end + 1]))
                except ValueError:
                    break
    return None


class JobRun:
    """One Job made from a CronJob: outcome, the pod's log, times and, on failure, events."""

    def __init__(self, name, namespace, succeeded, seconds, log, pod, events):
        self.name = name
        self.namespace = namespace
        self.succeeded = succeeded
        self.seconds = seconds
        self.log = log
        self.pod = pod
        self.events = events

    @property
    def result(self):
        return result_of(self.log)

    def describe(self):
        """Everything a person debugging a failed run looks at first."""
        return "job %s/%s %s after %.1fs\n--- pod log:\n%s\n--- events:\n%s" % (
            self.namespace, self.name, "succeeded" if self.succeeded else "FAILED", self.seconds,
            self.log[-6000:], "\n".join(self.events[-30:]))


def _events(core, namespace, names):
    lines = []
    for event in core.list_namespaced_event(namespace).items:
        if event.involved_object.name in names:
            lines.append("%s %s %s: %s" % (event.type, event.involved_object.kind, event.reason, event.message))
    return lines


def hold_schedules(api, namespace):
    """Suspend every CronJob in ``namespace``. Tests that start each Job themselves (run_cronjob_now:
    kubectl create job --from=cronjob, which a suspended CronJob allows) call it after deploying, so
    that a schedule firing while they run (the seed's hourly Redis backup at minute 0) cannot add a
    backup their assertions do not expect."""
    batch = _kubernetes().client.BatchV1Api(api)
    for cronjob in batch.list_namespaced_cron_job(namespace).items:
        batch.patch_namespaced_cron_job(cronjob.metadata.name, namespace, {"spec": {"suspend": True}})


def run_cronjob_now(kubeconfig, api, namespace, cronjob, timeout=300, job_name=None):
    """``kubectl create job --from=cronjob/<cronjob>``, wait until it completes or fails.

    Returns a JobRun; raises TimeoutError (with the pod's state and events) when the Job has
    not finished after ``timeout`` seconds.
    """
    client = _kubernetes().client
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    name = job_name or ("%s-%s" % (cronjob[:48], uuid.uuid4().hex[:6]))
    started = time.monotonic()
    created = subprocess.run(
        [kubectl_binary(), "--kubeconfig", str(kubeconfig), "-n", namespace, "create", "job", name,
         "--from=cronjob/%s" % cronjob],
        capture_output=True, text=True, timeout=120, check=False)
    if created.returncode != 0:
        raise RuntimeError("kubectl create job %s --from=cronjob/%s failed: %s" % (name, cronjob, created.stderr))
    state = {}

    def finished():
        job = batch.read_namespaced_job(name, namespace)
        for condition in job.status.conditions or []:
            if condition.status == "True" and condition.type in ("Complete", "Failed"):
                state["outcome"] = condition.type
                return True
        return False

    try:
        _wait(finished, timeout, "job %s/%s" % (namespace, name))
    except TimeoutError as exc:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=%s" % name).items
        detail = "; ".join("pod %s phase %s: %s" % (pod.metadata.name, pod.status.phase, [
            (status.name, status.state.to_dict()) for status in pod.status.container_statuses or []])
            for pod in pods)
        events = _events(core, namespace, {name} | {pod.metadata.name for pod in pods})
        raise TimeoutError("%s (%s)\n%s" % (exc, detail or "no pod", "\n".join(events[-30:]))) from None
    seconds = time.monotonic() - started
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=%s" % name).items
    pods.sort(key=lambda pod: pod.metadata.creation_timestamp)
    pod = pods[-1].metadata.name if pods else None
    log = ""
    if pod:
        try:
            log = core.read_namespaced_pod_log(pod, namespace, container="runner")
        except client.exceptions.ApiException as exc:
            log = "(no log: %s)" % exc.reason
    events = [] if state["outcome"] == "Complete" else _events(core, namespace, {name} | {p.metadata.name for p in pods})
    return JobRun(name, namespace, state["outcome"] == "Complete", seconds, log, pod, events)
