"""Turn the shared ``storage`` option into a Storage object.

``storage: {backend: filesystem|s3|nfs, path, bucket, prefix, endpoint_url, region,
access_key, secret_key, ...}`` — the same dict for every module, the lookup's callers and
the runner's job file.
"""

import os
import re

from ..config import resolve_secret_refs
from ..errors import ConfigError
from ..restic import check_read_data_subset
from ..schema import Field, Schema
from .filesystem import FilesystemStorage
from .s3 import DEFAULT_MAX_ATTEMPTS, DEFAULT_PART_SIZE, MAX_PART_SIZE, MIN_PART_SIZE, S3Storage

BACKENDS = ("filesystem", "s3", "nfs")
FORMATS = ("archive", "restic")
_URL_RE = re.compile(r"^https?://[^\s/]+")

SCHEMA = Schema("storage", {
    "backend": Field("enum", "where backups are stored (default filesystem)", choices=BACKENDS),
    "path": Field("path", "directory of a filesystem or nfs location", absolute=True),
    "bucket": Field("str", "S3 bucket", nonempty=True),
    "prefix": Field("str", "key prefix (S3) or subdirectory (filesystem) below the location"),
    "endpoint_url": Field("str", "S3 endpoint URL, http(s)://host[:port] (default: AWS)", nonempty=True),
    "endpoint": Field("str", "alias of endpoint_url", nonempty=True),
    "region": Field("str", "S3 region", nonempty=True),
    "access_key": Field("str", "S3 access key id", secret=True),
    "secret_key": Field("str", "S3 secret access key", secret=True),
    "session_token": Field("str", "S3 session token", secret=True),
    "path_style": Field("bool", "path-style addressing (default: true with an endpoint_url)"),
    "verify_tls": Field("bool", "verify the endpoint's TLS certificate (default true)"),
    "server_side_encryption": Field("enum", "S3 server-side encryption at rest", choices=("AES256", "aws:kms")),
    "sse_kms_key_id": Field("str", "KMS key for aws:kms", nonempty=True),
    "part_size": Field("int", "bytes per multipart part at the start of an upload (default 16 MiB)",
                       minimum=MIN_PART_SIZE, maximum=MAX_PART_SIZE),
    "max_attempts": Field("int", "tries per S3 request, the first included (default %d)" % DEFAULT_MAX_ATTEMPTS,
                          minimum=1, maximum=100),
    "format": Field("enum", "how a job's backups are stored: archive (default; age archives) or restic "
                    "(a restic repository per job under _restic/<job>)", choices=FORMATS),
    "restic_password": Field("str", "password of the jobs' restic repositories (format restic)", secret=True),
    "restic_read_data_subset": Field("str", "part of the restic repository's pack data a verification reads "
                                     "with restic check (n%, n/t, a size such as 500M, or all; default: "
                                     "structure only)", nonempty=True),
})


RESTIC_PASSWORD_KEYS = ("restic_password", "restic_password_file", "restic_password_env")


def check_storage(options, where="storage"):
    """``options`` validated field by field, and complete for their backend; no secret is read."""
    options = SCHEMA.validate(options, where)
    backend = options.get("backend", "filesystem")
    if options.get("format") == "restic" and not any(
            options.get(key) for key in RESTIC_PASSWORD_KEYS):
        raise ConfigError("%s.format restic needs the repository password: give %s.restic_password or "
                          "restic_password_file (restic_password_env in a runner job file)" % (where, where))
    if options.get("restic_read_data_subset") is not None:
        # Refused here, before a backup runs, not first by the verification that would use it.
        check_read_data_subset(options["restic_read_data_subset"], "%s.restic_read_data_subset" % where)
    if backend in ("filesystem", "nfs"):
        if not options.get("path"):
            raise ConfigError("%s.path is required for backend %s: an absolute directory" % (where, backend))
    else:
        if not options.get("bucket"):
            raise ConfigError("%s.bucket is required for backend s3" % where)
        if options.get("endpoint") not in (None, options.get("endpoint_url")) and options.get("endpoint_url"):
            raise ConfigError("%s: give endpoint_url or endpoint, not both" % where)
        endpoint = options.get("endpoint_url") or options.get("endpoint")
        if endpoint and not _URL_RE.match(endpoint):
            raise ConfigError("%s.endpoint_url must be an http(s) URL, got %r" % (where, endpoint))
    return options


def storage_options(options):
    """``options`` checked and with their secrets read: the one place the ``*_file`` /
    ``*_env`` references of the storage option are resolved (modules, runner and tests all
    come through here). The result is what :func:`build_storage` takes; adapters that mask
    secrets register its values before building."""
    if not isinstance(options, dict):
        raise ConfigError("storage must be a mapping with at least 'backend', got %s" % type(options).__name__)
    # access_key_file / secret_key_env ... : unresolved, they were silently ignored and boto3
    # fell back to whatever credentials the environment or instance happened to have.
    return resolve_secret_refs(check_storage(options), "storage")


def open_storage(options):
    """A Storage for the ``storage`` option as the user wrote it (secret references unread)."""
    return build_storage(storage_options(options))


def build_storage(options):
    """A Storage for options :func:`storage_options` returned (checked, secrets read).

    The storage keeps ``options`` as ``location_options``: the restic format
    (engine/resticstore.py) derives a job's repository and its password from them."""
    storage = _build_storage(options)
    storage.location_options = dict(options)
    return storage


def _build_storage(options):
    backend = options.get("backend", "filesystem")
    prefix = (options.get("prefix") or "").strip("/")
    if backend in ("filesystem", "nfs"):
        path = options["path"]
        if prefix:
            path = os.path.join(path, *prefix.split("/"))
        return FilesystemStorage(path, backend=backend)
    endpoint = options.get("endpoint_url") or options.get("endpoint")
    path_style = options.get("path_style")
    if path_style is None:
        path_style = bool(endpoint)  # S3-compatible servers want path-style; AWS picks itself
    return S3Storage(
        bucket=options["bucket"], prefix=prefix, endpoint_url=endpoint,
        region=options.get("region"), access_key=options.get("access_key"),
        secret_key=options.get("secret_key"), session_token=options.get("session_token"),
        path_style=path_style, verify_tls=options.get("verify_tls", True),
        server_side_encryption=options.get("server_side_encryption"),
        sse_kms_key_id=options.get("sse_kms_key_id"),
        part_size=options.get("part_size", DEFAULT_PART_SIZE),
        max_attempts=options.get("max_attempts", DEFAULT_MAX_ATTEMPTS),
    )
