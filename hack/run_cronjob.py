#!/usr/bin/env python
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run a deployed CronJob's container command here, the way its pod would run it.

There is no kubelet on a development machine or in CI, so nothing ever runs the pods of
the CronJobs the roles deploy. This tool does what the kubelet would do for the one
container of a CronJob's pod template, reading everything from the API server:

* ConfigMap and Secret volumes are written into a private work directory (``items`` and
  ``defaultMode`` honoured), ``emptyDir`` volumes become empty directories, and each
  PersistentVolumeClaim is a local directory given with ``--claim NAME=DIR``;
* env values are copied, ``secretKeyRef`` / ``configMapKeyRef`` (and ``envFrom``) are resolved
  from the objects in the API server; nothing else of this process's environment leaks in
  apart from PATH, PYTHONPATH and the locale;
* when the pod would get a service account token, the tool asks the API server for a
  token of the pod's ServiceAccount (TokenRequest) and hands the command a kubeconfig with
  it: the command has exactly the rights its Role grants, not the caller's;
* container paths (``/etc/biometrics-backup/...``, ``/tmp``, PVC mount points) in the
  arguments, in env values and inside the job files named by the arguments are rewritten
  to their local directories. Only what comes from the pod spec is rewritten, and only a
  path whose leading components are a whole mount path; paths of this machine (the
  interpreter, PYTHONPATH, the work directory) never are, so a checkout below ``/tmp`` or
  below any other mount path works;
* the command is the container's ``command`` + ``args``; without a ``command`` it is the
  runner image's entrypoint, ``python -m ansible_collections.biometrics.backup.plugins.
  module_utils.engine.runner`` (run with this interpreter);
* ``activeDeadlineSeconds`` of the job template bounds the run.

    python hack/run_cronjob.py --kubeconfig K -n NAMESPACE CRONJOB [--claim PVC=DIR ...] [-- EXTRA ARGS]

The command's stdout and stderr pass through; the tool exits with the command's exit code
(its own errors: 2). ``--dry-run`` shows what would run (env names only, never values).
Importable: ``LocalCronJob`` is what tests and the demo use.
"""

import argparse
import base64
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIONS_DIR = os.path.join(REPO_ROOT, "build", "collections")
RUNNER_MODULE = "ansible_collections.biometrics.backup.plugins.module_utils.engine.runner"
# The runner image's ENTRYPOINT (images/runner/Containerfile, behind tini); `python` is this interpreter here.
ENTRYPOINT = ["python", "-m", RUNNER_MODULE]
# What of this process's environment a command may see besides the container's own env.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
TOKEN_SECONDS = 3600


class LocalRunError(Exception):
    """The CronJob cannot be run locally (missing object, unsupported volume, ...)."""


def _kubernetes():
    try:
        import kubernetes  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise LocalRunError("the Python package 'kubernetes' is required (make venv)") from None
    return kubernetes


def api_client(kubeconfig=None, context=None):
    """A ``kubernetes.client.ApiClient`` for ``kubeconfig`` (else K8S_AUTH_KUBECONFIG / KUBECONFIG)."""
    kubernetes = _kubernetes()
    kubeconfig = kubeconfig or os.environ.get("K8S_AUTH_KUBECONFIG") or os.environ.get("KUBECONFIG")
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, context=context,
                                       client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


def rewrite_path(value, mounts):
    """``value`` (a path in the container) with its mount path replaced by the local directory.

    A mount path matches whole leading components only: with ``/tmp`` mounted, ``/tmp`` and
    ``/tmp/x`` are rewritten, ``/tmpfs/x`` and ``/tmp-clone/x`` are not. ``mounts`` is
    [(mount path, local directory)], longest mount path first. Apply it to container paths
    only: a path of this machine that happens to lie below a mount path would be mangled.
    """
    if not isinstance(value, str) or not value.startswith("/"):
        return value
    for mount_path, local in mounts:
        base = mount_path.rstrip("/")  # "" for a mount at /
        if value == base or value.startswith(base + "/"):
            return local + value[len(base):]
    return value


def rewrite_tree(value, mounts):
    """Every string below ``value`` (dicts, lists) passed through :func:`rewrite_path`."""
    if isinstance(value, dict):
        return {key: rewrite_tree(item, mounts) for key, item in value.items()}
    if isinstance(value, list):
        return [rewrite_tree(item, mounts) for item in value]
    return rewrite_path(value, mounts)


def container_argv(container, mounts, interpreter=None):
    """The argv that runs ``container`` here: ``command`` (default: the runner image's
    entrypoint) + ``args``, container paths rewritten to their local directories, then a
    ``python`` / ``python3`` command replaced by ``interpreter`` (default: this one).

    The interpreter is substituted after the rewriting: it is a path of this machine, and
    a checkout below a directory that is also a mount path in the pod (``/tmp`` is the
    scratch volume) must not have its ``.venv`` moved into that volume.
    """
    argv = [rewrite_path(arg, mounts)
            for arg in list(container.get("command") or ENTRYPOINT) + list(container.get("args") or [])]
    if argv and argv[0] in ("python", "python3"):
        argv[0] = interpreter or sys.executable
    return argv


def _field(obj, name, default=None):
    """``obj[name]`` of a plain dict (API objects are read with sanitize_for_serialization)."""
    value = (obj or {}).get(name)
    return default if value is None else value


class LocalCronJob:
    """One CronJob, materialized for a local run. Use as a context manager, or call
    :meth:`materialize` then :meth:`run`, and :meth:`cleanup` at the end."""

    def __init__(self, api, namespace, name, claims=None, workdir=None, container=None, keep=False,
                 log=None):
        self.api = api
        self.namespace = namespace
        self.name = name
        self.claims = dict(claims or {})
        self.container_name = container
        self.keep = keep
        self.log = log or (lambda message: None)
        self._own_workdir = workdir is None
        self.workdir = workdir
        self.cronjob = None
        self.pod_spec = None
        self.container = None
        self.mounts = []  # (container mount path, local path), longest first
        self.env = {}
        self.env_sources = {}  # env name -> where its value came from (no values)
        self.argv = []
        self.timeout = None
        self.rewritten = []  # job files whose paths were rewritten

    # -- API reads ---------------------------------------------------------------------
    def _core(self):
        return _kubernetes().client.CoreV1Api(self.api)

    def _read(self, what, name, optional=False):
        kubernetes = _kubernetes()
        core = self._core()
        reader = core.read_namespaced_config_map if what == "ConfigMap" else core.read_namespaced_secret
        try:
            obj = reader(name, self.namespace)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 404:
                if optional:
                    return None
                raise LocalRunError("%s %s/%s (needed by CronJob %s) does not exist"
                                    % (what, self.namespace, name, self.name)) from None
            raise
        return self.api.sanitize_for_serialization(obj)

    def _data(self, what, name, optional=False):
        """{key: bytes} of a ConfigMap (data + binaryData) or a Secret (base64 data)."""
        obj = self._read(what, name, optional)
        if obj is None:
            return None
        if what == "Secret":
            return {key: base64.b64decode(value) for key, value in _field(obj, "data", {}).items()}
        data = {key: value.encode("utf-8") for key, value in _field(obj, "data", {}).items()}
        data.update({key: base64.b64decode(value) for key, value in _field(obj, "binaryData", {}).items()})
        return data

    # -- materializing -----------------------------------------------------------------
    def materialize(self):
        batch = _kubernetes().client.BatchV1Api(self.api)
        try:
            cronjob = batch.read_namespaced_cron_job(self.name, self.namespace)
        except _kubernetes().client.exceptions.ApiException as exc:
            if exc.status == 404:
                raise LocalRunError("CronJob %s/%s does not exist" % (self.namespace, self.name)) from None
            raise
        self.cronjob = self.api.sanitize_for_serialization(cronjob)
        job_spec = self.cronjob["spec"]["jobTemplate"]["spec"]
        self.pod_spec = job_spec["template"]["spec"]
        self.timeout = job_spec.get("activeDeadlineSeconds")
        containers = self.pod_spec["containers"]
        if self.container_name:
            matching = [c for c in containers if c["name"] == self.container_name]
            if not matching:
                raise LocalRunError("CronJob %s has no container %s" % (self.name, self.container_name))
            self.container = matching[0]
        elif len(containers) != 1:
            raise LocalRunError("CronJob %s has %d containers: choose one with --container"
                                % (self.name, len(containers)))
        else:
            self.container = containers[0]
        if self.pod_spec.get("initContainers"):
            raise LocalRunError("CronJob %s has init containers, which this tool does not run" % self.name)
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix="cronjob-%s-" % self.name)
        self.workdir = os.path.abspath(self.workdir)
        os.chmod(self.workdir, 0o700)
        volumes = self._volumes()
        self._mounts(volumes)
        self._service_account()
        self._environment()
        self._command()
        return self

    def _volumes(self):
        """{volume name: local directory} for every volume of the pod."""
        local = {}
        root = os.path.join(self.workdir, "volumes")
        os.makedirs(root, exist_ok=True)
        for volume in self.pod_spec.get("volumes") or []:
            name = volume["name"]
            path = os.path.join(root, name)
            if volume.get("configMap") is not None or volume.get("secret") is not None:
                self._write_projection(volume, path)
            elif volume.get("emptyDir") is not None:
                os.makedirs(path, mode=0o700)
            elif volume.get("persistentVolumeClaim") is not None:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if claim not in self.claims:
                    raise LocalRunError("volume %s of CronJob %s is PersistentVolumeClaim %s: give its local "
                                        "directory with --claim %s=DIR" % (name, self.name, claim, claim))
                path = os.path.abspath(self.claims[claim])
                if not os.path.isdir(path):
                    raise LocalRunError("--claim %s=%s: not a directory" % (claim, path))
            else:
                kinds = sorted(key for key, value in volume.items() if key != "name" and value is not None)
                raise LocalRunError("volume %s of CronJob %s is of an unsupported type (%s)"
                                    % (name, self.name, ", ".join(kinds)))
            local[name] = path
        return local

    def _write_projection(self, volume, path):
        if volume.get("configMap") is not None:
            source, what, ref = volume["configMap"], "ConfigMap", volume["configMap"]["name"]
            default_mode = _field(source, "defaultMode", 0o644)
        else:
            source, what, ref = volume["secret"], "Secret", volume["secret"]["secretName"]
            default_mode = _field(source, "defaultMode", 0o644)
        data = self._data(what, ref, optional=bool(source.get("optional")))
        os.makedirs(path, mode=0o700)
        if data is None:
            return
        items = source.get("items")
        if items:
            chosen = []
            for item in items:
                if item["key"] not in data:
                    if source.get("optional"):
                        continue
                    raise LocalRunError("%s %s/%s has no key %s (volume %s of CronJob %s)"
                                        % (what, self.namespace, ref, item["key"], volume["name"], self.name))
                chosen.append((item["key"], item["path"], _field(item, "mode", default_mode)))
        else:
            chosen = [(key, key, default_mode) for key in sorted(data)]
        for key, relative, mode in chosen:
            target = os.path.join(path, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
                handle.write(data[key])
            # The kubelet applies the mode as given; keep the owner able to read what it wrote.
            os.chmod(target, mode | 0o400)
        self.log("volume %s: %s %s (%d files)" % (volume["name"], what, ref, len(chosen)))

    def _mounts(self, volumes):
        mounts = []
        for mount in self.container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                raise LocalRunError("volumeMount %s of CronJob %s names no volume" % (mount["name"], self.name))
            local = volumes[mount["name"]]
            if mount.get("subPath"):
                local = os.path.join(local, mount["subPath"])
            mounts.append((mount["mountPath"], local))
        self.mounts = sorted(mounts, key=lambda item: len(item[0].rstrip("/")), reverse=True)

    def _service_account(self):
        """A kubeconfig with a token of the pod's ServiceAccount when the pod mounts one."""
        self.service_account_kubeconfig = None
        if self.pod_spec.get("automountServiceAccountToken") is False:
            return
        kubernetes = _kubernetes()
        account = self.pod_spec.get("serviceAccountName") or "default"
        core = self._core()
        try:
            sa = core.read_namespaced_service_account(account, self.namespace)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 404:
                raise LocalRunError("ServiceAccount %s/%s of CronJob %s does not exist"
                                    % (self.namespace, account, self.name)) from None
            raise
        if self.pod_spec.get("automountServiceAccountToken") is None and sa.automount_service_account_token is False:
            return
        request = kubernetes.client.AuthenticationV1TokenRequest(
            spec=kubernetes.client.V1TokenRequestSpec(audiences=[], expiration_seconds=TOKEN_SECONDS))
        token = core.create_namespaced_service_account_token(account, self.namespace, request).status.token
        configuration = self.api.configuration
        cluster = {"server": configuration.host}
        if configuration.ssl_ca_cert:
            with open(configuration.ssl_ca_cert, "rb") as handle:
                cluster["certificate-authority-data"] = base64.b64encode(handle.read()).decode("ascii")
        if not configuration.verify_ssl:
            cluster["insecure-skip-tls-verify"] = True
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "cluster", "cluster": cluster}],
            "users": [{"name": account, "user": {"token": token}}],
            "contexts": [{"name": "pod",
                          "context": {"cluster": "cluster", "user": account, "namespace": self.namespace}}],
        }
        path = os.path.join(self.workdir, "serviceaccount.kubeconfig")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
            yaml.safe_dump(kubeconfig, handle)
        self.service_account_kubeconfig = path
        self.log("service account %s: a token from the API server (TokenRequest, %ds)" % (account, TOKEN_SECONDS))

    def _environment(self):
        env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
        env.setdefault("LANG", "C.UTF-8")
        pythonpath = [COLLECTIONS_DIR] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pythonpath))
        sources = {}
        for source in self.container.get("envFrom") or []:
            prefix = source.get("prefix") or ""
            if source.get("secretRef") is not None or source.get("configMapRef") is not None:
                what = "Secret" if source.get("secretRef") is not None else "ConfigMap"
                ref = source.get("secretRef") or source.get("configMapRef")
                data = self._data(what, ref["name"], optional=bool(ref.get("optional"))) or {}
                for key, value in data.items():
                    env[prefix + key] = value.decode("utf-8")
                    sources[prefix + key] = "%s %s" % (what, ref["name"])
        for item in self.container.get("env") or []:
            name = item["name"]
            if item.get("valueFrom") is None:
                env[name] = rewrite_path(item.get("value") or "", self.mounts)
                sources[name] = "value"
                continue
            ref_from = item["valueFrom"]
            if ref_from.get("secretKeyRef") is not None or ref_from.get("configMapKeyRef") is not None:
                what = "Secret" if ref_from.get("secretKeyRef") is not None else "ConfigMap"
                ref = ref_from.get("secretKeyRef") or ref_from.get("configMapKeyRef")
                data = self._data(what, ref["name"], optional=bool(ref.get("optional")))
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise LocalRunError("env %s of CronJob %s: %s %s/%s has no key %s"
                                        % (name, self.name, what, self.namespace, ref["name"], ref["key"]))
                env[name] = data[ref["key"]].decode("utf-8")
                sources[name] = "%s %s key %s" % (what, ref["name"], ref["key"])
            elif (ref_from.get("fieldRef") or {}).get("fieldPath") == "metadata.namespace":
                env[name] = self.namespace
                sources[name] = "fieldRef metadata.namespace"
            else:
                raise LocalRunError("env %s of CronJob %s uses an unsupported valueFrom" % (name, self.name))
        if self.service_account_kubeconfig:
            env["KUBECONFIG"] = self.service_account_kubeconfig
            sources["KUBECONFIG"] = "service account token (TokenRequest)"
        self.env = env
        self.env_sources = sources

    def _command(self):
        self.argv = container_argv(self.container, self.mounts)
        # Job files named on the command line live in ConfigMap volumes: their container
        # paths are rewritten too (data files that are only mounted stay byte for byte).
        for position, arg in enumerate(self.argv):
            if arg.startswith(self.workdir + os.sep) and os.path.isfile(arg) and position > 0 \
                    and self.argv[position - 1].startswith("--"):
                self._rewrite_job_file(arg)

    def _rewrite_job_file(self, path):
        with open(path, "r", encoding="utf-8") as handle:
            text = handle.read()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            return
        if not isinstance(data, (dict, list)):
            return
        rewritten = rewrite_tree(data, self.mounts)
        if rewritten == data:
            return
        os.chmod(path, 0o600)
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(rewritten, handle, sort_keys=True)
        self.rewritten.append(path)

    # -- running -----------------------------------------------------------------------
    def describe(self):
        """Lines saying what runs (no secret values)."""
        lines = ["cronjob %s/%s (schedule %r)" % (self.namespace, self.name, self.cronjob["spec"]["schedule"]),
                 "command: %s" % " ".join(shlex.quote(arg) for arg in self.argv)]
        lines.extend("mount %s -> %s" % item for item in sorted(self.mounts))
        lines.extend("env %s from %s" % (name, where) for name, where in sorted(self.env_sources.items()))
        lines.extend("rewrote container paths in %s" % path for path in self.rewritten)
        return lines

    def scratch_dir(self):
        for mount_path, local in self.mounts:
            if mount_path.rstrip("/") == "/tmp":
                return local
        return self.workdir

    def run(self, extra_args=(), capture=False, timeout=None, env=None):
        """Run the command; returns ``subprocess.CompletedProcess`` (text when ``capture``)."""
        if not self.argv:
            self.materialize()
        command_env = dict(self.env, **(env or {}))
        return subprocess.run(
            self.argv + list(extra_args), env=command_env, cwd=self.scratch_dir(),
            stdin=subprocess.DEVNULL, capture_output=capture, text=capture, check=False,
            timeout=timeout or self.timeout)

    def cleanup(self):
        if self.keep or not self._own_workdir or not self.workdir:
            return
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.materialize()

    def __exit__(self, *exc_info):
        self.cleanup()
        return False


def create_seed_inputs(api, namespace, recipient, identity, access_key, secret_key, config_files):
    """The objects the seed's values refer to but do not create: the encryption key Secret
    (recipients and identity), the S3 credentials Secret and the application's configuration
    ConfigMap (what the config-to-git job commits). An operator creates these before deploying."""
    client = _kubernetes().client
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="backup-encryption-key"),
        string_data={"recipients": recipient + "\n", "identity": identity}))
    core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name="backup-s3-credentials"),
        string_data={"access_key": access_key, "secret_key": secret_key}))
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="biometrics-config"), data=config_files))


def parse_claims(values):
    claims = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise LocalRunError("--claim wants NAME=DIR, got %r" % value)
        claims[name] = path
    return claims


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run a deployed CronJob's container command locally.")
    parser.add_argument("cronjob", help="name of the CronJob")
    parser.add_argument("-n", "--namespace", default="default")
    parser.add_argument("--kubeconfig", help="default: K8S_AUTH_KUBECONFIG, then KUBECONFIG, then ~/.kube/config")
    parser.add_argument("--context")
    parser.add_argument("--claim", action="append", metavar="PVC=DIR",
                        help="local directory standing in for a PersistentVolumeClaim (repeatable)")
    parser.add_argument("--container", help="container to run when the pod has several")
    parser.add_argument("--workdir", help="materialize into this (existing, empty) directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--dry-run", action="store_true", help="show what would run, run nothing")
    parser.epilog = "Arguments after -- are appended to the container's command."
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    def log(message):
        sys.stderr.write("run-cronjob: %s\n" % message)

    try:
        api = api_client(args.kubeconfig, args.context)
        local = LocalCronJob(api, args.namespace, args.cronjob, claims=parse_claims(args.claim),
                             workdir=args.workdir, container=args.container, keep=args.keep or args.dry_run,
                             log=log)
        with local:
            for line in local.describe():
                log(line)
            if args.dry_run:
                log("dry run: nothing ran; work directory %s" % local.workdir)
                return 0
            return local.run(extra).returncode
    except LocalRunError as exc:
        log("error: %s" % exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
