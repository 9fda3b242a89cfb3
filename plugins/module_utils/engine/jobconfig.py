"""The job file: what one backup job is, as the runner in a CronJob container reads it.

The file is YAML or JSON, mounted from a ConfigMap, so it must never carry a secret: every
secret field (``password``, ``secret_key``, ``passphrase``, ``identity``...) appears only as
``<field>_file`` (a path inside a mounted Secret) or ``<field>_env`` (an environment
variable filled by ``secretKeyRef``). Everything is checked when the file is loaded, before
anything runs; secrets are read later, per command, by :meth:`JobConfig.prepare`, so that a
``list`` does not need the database password.

Layout (only ``job``, ``kind`` and ``storage`` are required)::

    job: nightly-db               # name: path segment and metrics label
    kind: postgres                # see kinds.py
    source: {host: db, dbname: app, user: backup, password_env: PGPASSWORD}
    storage: {backend: s3, bucket: backups, endpoint_url: http://s3:8333,
              access_key_env: S3_ACCESS_KEY, secret_key_file: /secrets/s3/secret_key}
    compression: {algorithm: zstd, level: 3}
    encryption:                   # writing: recipients or passphrase; reading: identity or passphrase
      recipients: [age1...]       # or recipients_file: /etc/backup/recipients.txt
      identity_file: /secrets/age/identity   # used by restore, verify and drill only
    retention: {keep_daily: 30, keep_weekly: 12, keep_monthly: 12, keep_yearly: 7}
    size_anomaly: {warn_above: 2.0, warn_below: 0.5, fail_below: 0.1}
    schedule: "0 2 * * *"         # cron; exported as backup_schedule_interval_seconds
    metrics: {pushgateway_url: http://pushgateway:9091, instance: db-primary,
              username: push, password_file: /secrets/push/password}
    restore: {target: {...}}      # target options for `runner restore`
    drill: {job: nightly-db, target: {...}}  # the job whose backups a drill restores (default:
                                  # this job) and scratch target options (default: derived
                                  # from the source's connection options)
    verify: {backup: latest, test_restore: false}
    log_format: text              # or json (JSON lines on stderr)
"""

import json
import os
import re

from . import codecs
from . import kinds
from .anomaly import SizePolicy
from .config import SECRET_FIELDS, resolve_secret_refs
from .errors import ConfigError
from .manifest import validate_job_name
from .storage.location import open_storage

try:
    import yaml
    HAS_YAML = True
except ImportError:
    HAS_YAML = False

TOP_LEVEL = ("job", "kind", "source", "storage", "compression", "encryption", "retention",
             "size_anomaly", "schedule", "metrics", "restore", "drill", "verify", "log_format",
             "description")
STORAGE_KEYS = ("backend", "path", "bucket", "prefix", "endpoint_url", "endpoint", "region",
                "access_key", "secret_key", "session_token", "path_style", "verify_tls",
                "server_side_encryption", "sse_kms_key_id", "part_size", "max_attempts")
ENCRYPTION_KEYS = ("enabled", "recipients", "recipients_file", "passphrase", "identity")
COMPRESSION_KEYS = ("enabled", "algorithm", "level", "threads")
METRICS_KEYS = ("pushgateway_url", "instance", "username", "password", "timeout", "textfile",
                "enabled")
RETENTION_KEYS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly",
                  "keep_yearly", "keep_within", "semantics", "timezone")
# Options of the prune step itself (engine/prune.py), next to the policy.
PRUNE_KEYS = ("min_keep", "max_delete", "force", "orphan_grace")
VERIFY_KEYS = ("backup", "test_restore")
RESTORE_KEYS = ("target", "backup", "point_in_time")
LOG_FORMATS = ("text", "json")
_URL_RE = re.compile(r"^https?://[^\s/]+")


def _secret_refs(keys):
    """Allowed spellings of a section's keys: secret fields only as ``_file`` / ``_env``."""
    allowed = set()
    for key in keys:
        if key in SECRET_FIELDS:
            allowed.update((key + "_file", key + "_env"))
        else:
            allowed.add(key)
    return allowed


def refuse_literal_secrets(value, where):
    """ConfigError when a secret field holds a literal value anywhere below ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in SECRET_FIELDS and item not in (None, ""):
                raise ConfigError(
                    "%s.%s: secrets must not be written into the job file; use %s_file (a path "
                    "in a mounted Secret) or %s_env (an environment variable set from a Secret)"
                    % (where, key, key, key))
            refuse_literal_secrets(item, "%s.%s" % (where, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            refuse_literal_secrets(item, "%s[%d]" % (where, index))


def secret_values(options):
    """Every value of a secret field below ``options`` (resolved options), to mask in output."""
    found = []
    if isinstance(options, dict):
        for key, value in options.items():
            if key in SECRET_FIELDS and isinstance(value, str) and value:
                found.append(value)
            else:
                found.extend(secret_values(value))
    elif isinstance(options, list):
        for item in options:
            found.extend(secret_values(item))
    return found


def _section(data, name, keys=None, required=False):
    value = data.get(name)
    if value is None:
        if required:
            raise ConfigError("job file: '%s' is required" % name)
        return {}
    if not isinstance(value, dict):
        raise ConfigError("job file: '%s' must be a mapping, got %s" % (name, type(value).__name__))
    if keys is not None:
        unknown = sorted(set(value) - _secret_refs(keys))
        if unknown:
            raise ConfigError("job file: unknown option(s) in '%s': %s (known: %s)"
                              % (name, ", ".join(unknown), ", ".join(sorted(_secret_refs(keys)))))
    return value


def read_recipients_file(path):
    """Recipients from a file (one ``age1...`` per line, ``#`` comments), as age -R reads them."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ConfigError("cannot read the recipients file %s: %s" % (path, exc.strerror)) from None
    recipients = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not recipients:
        raise ConfigError("the recipients file %s lists no recipient" % path)
    return recipients


def backup_encryption_options(options):
    """Encryption options for writing a backup: recipients (incl. recipients_file) or passphrase.

    ``options`` must already have its secret references resolved. Reading keys (identity)
    are dropped: a backup never needs them.
    """
    options = dict(options or {})
    recipients = list(options.get("recipients") or [])
    if isinstance(options.get("recipients"), str):
        recipients = [options["recipients"]]
    if options.get("recipients_file"):
        recipients.extend(read_recipients_file(options["recipients_file"]))
    result = {}
    if options.get("enabled") is not None:
        result["enabled"] = options["enabled"]
    if recipients:
        result["recipients"] = recipients
    if options.get("passphrase") not in (None, ""):
        result["passphrase"] = options["passphrase"]
    if (options.get("identity") and options.get("enabled") is not False
            and not recipients and "passphrase" not in result):
        # An identity alone decrypts but cannot encrypt: writing the backup in clear because
        # the caller handed over the wrong half of the key pair must not happen silently.
        raise ConfigError("encryption: an identity only decrypts; a backup needs recipients (or recipients_file) "
                          "or a passphrase - refusing to write it unencrypted (set enabled: false to mean that)")
    return result


def read_keys(options):
    """``(identity_text, passphrase)`` for reading backups, from resolved encryption options."""
    options = options or {}
    identity = options.get("identity") or None
    passphrase = options.get("passphrase")
    return identity, (passphrase if passphrase not in (None, "") else None)


def parse_text(text, where):
    """YAML (a superset of JSON) or, without PyYAML, JSON."""
    if HAS_YAML:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            place = " at line %d" % (mark.line + 1) if mark is not None else ""
            raise ConfigError("%s is not valid YAML%s: %s" % (where, place, getattr(exc, "problem", exc))) from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError("%s is not valid JSON (PyYAML is not installed, so YAML cannot be read): %s"
                              % (where, exc)) from None
    if not isinstance(data, dict):
        raise ConfigError("%s must hold a mapping of options, got %s" % (where, type(data).__name__))
    return data


class JobConfig:
    """A validated job file. Build with :meth:`load` or :meth:`from_mapping`."""

    def __init__(self, data, where="job file"):
        if not isinstance(data, dict):
            raise ConfigError("%s must be a mapping" % where)
        unknown = sorted(set(data) - set(TOP_LEVEL))
        if unknown:
            raise ConfigError("%s: unknown top-level option(s) %s (known: %s)"
                              % (where, ", ".join(unknown), ", ".join(TOP_LEVEL)))
        self.where = where
        self.raw = data
        self.job = validate_job_name(data.get("job"))
        self.kind = data.get("kind")
        if not self.kind:
            raise ConfigError("%s: 'kind' is required (one of %s)" % (where, ", ".join(kinds.known_kinds()) or "none"))
        kinds.source_class(self.kind)  # unknown kind -> ConfigError listing the known ones
        self.source = _section(data, "source")
        self.storage = _section(data, "storage", STORAGE_KEYS, required=True)
        self.compression_options = _section(data, "compression", COMPRESSION_KEYS)
        self.encryption = _section(data, "encryption", ENCRYPTION_KEYS)
        self.retention = _section(data, "retention", RETENTION_KEYS + PRUNE_KEYS)
        self.size_anomaly = _section(data, "size_anomaly")
        self.metrics = _section(data, "metrics", METRICS_KEYS)
        self.restore = _section(data, "restore", RESTORE_KEYS)
        self.drill = _section(data, "drill", ("job", "target"))
        if self.drill.get("job") is not None:
            validate_job_name(self.drill["job"])
        self.verify = _section(data, "verify", VERIFY_KEYS)
        for name in ("source", "storage", "encryption", "metrics", "restore", "drill"):
            refuse_literal_secrets(data.get(name) or {}, name)
        self._check_storage()
        self.compression = codecs.compression_settings(self.compression_options)
        self._check_encryption()
        self.size_policy = SizePolicy.from_mapping(self.size_anomaly)
        self.retention_policy = self._check_retention()
        self.schedule = data.get("schedule")
        if self.schedule is not None:
            self._check_schedule()
        self._check_metrics()
        for section in ("restore", "drill"):
            target = getattr(self, section).get("target")
            if target is not None and not isinstance(target, dict):
                raise ConfigError("%s: %s.target must be a mapping of target options" % (where, section))
        if self.verify.get("test_restore") not in (None, True, False):
            raise ConfigError("%s: verify.test_restore must be true or false" % where)
        self.log_format = data.get("log_format") or "text"
        if self.log_format not in LOG_FORMATS:
            raise ConfigError("%s: log_format must be one of %s" % (where, ", ".join(LOG_FORMATS)))

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, path):
        try:
            with open(path, "r", encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError("cannot read job file %s: %s" % (path, exc.strerror)) from None
        return cls(parse_text(text, "job file %s" % path), where="job file %s" % path)

    @classmethod
    def from_mapping(cls, data, where="job file"):
        return cls(data, where=where)

    # -- structural checks (no secret is read) -----------------------------------------
    def _check_storage(self):
        backend = self.storage.get("backend") or "filesystem"
        if backend in ("filesystem", "nfs"):
            path = self.storage.get("path")
            if not path or not isinstance(path, str) or not os.path.isabs(path):
                raise ConfigError("%s: storage.path must be an absolute directory for backend %s"
                                  % (self.where, backend))
        elif backend == "s3":
            if not self.storage.get("bucket"):
                raise ConfigError("%s: storage.bucket is required for backend s3" % self.where)
            endpoint = self.storage.get("endpoint_url") or self.storage.get("endpoint")
            if endpoint and not _URL_RE.match(str(endpoint)):
                raise ConfigError("%s: storage.endpoint_url must be an http(s) URL, got %r" % (self.where, endpoint))
        else:
            raise ConfigError("%s: unknown storage backend %r: choose one of filesystem, s3, nfs"
                              % (self.where, backend))

    def _check_encryption(self):
        enc = self.encryption
        recipients = enc.get("recipients")
        if recipients is not None:
            if isinstance(recipients, str):
                recipients = [recipients]
            if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
                raise ConfigError("%s: encryption.recipients must be a list of age public keys" % self.where)
            for recipient in recipients:
                codecs.parse_recipient(recipient)  # ConfigError names the bad key
        writes = bool(recipients or enc.get("recipients_file") or enc.get("passphrase_file")
                      or enc.get("passphrase_env"))
        if (recipients or enc.get("recipients_file")) and (enc.get("passphrase_file") or enc.get("passphrase_env")):
            raise ConfigError("%s: encryption: give recipients or a passphrase, not both" % self.where)
        if enc.get("enabled") is True and not writes:
            raise ConfigError("%s: encryption.enabled is true but neither recipients, recipients_file, "
                              "passphrase_file nor passphrase_env is given" % self.where)
        self.encrypted = writes and enc.get("enabled") is not False
        if kinds.source_class(self.kind).requires_encryption and not self.encrypted:
            raise ConfigError("%s: kind %s stores secrets and must be encrypted: add encryption.recipients"
                              % (self.where, self.kind))

    def _check_retention(self):
        if not self.retention:
            return None
        from .retention import Policy  # local: retention is only needed when configured
        policy = {key: value for key, value in self.retention.items() if key in RETENTION_KEYS}
        try:
            return Policy(**policy)
        except ConfigError as exc:
            raise ConfigError("%s: retention: %s" % (self.where, exc)) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError("%s: retention: %s" % (self.where, exc)) from None

    def _check_schedule(self):
        if not isinstance(self.schedule, str) or len(self.schedule.split()) not in (5, 6):
            raise ConfigError("%s: schedule must be a cron expression such as '0 2 * * *', got %r"
                              % (self.where, self.schedule))
        from .metrics import schedule_interval_seconds
        try:
            schedule_interval_seconds(self.schedule)
        except ConfigError as exc:
            raise ConfigError("%s: schedule: %s" % (self.where, exc)) from None

    def _check_metrics(self):
        metrics = self.metrics
        url = metrics.get("pushgateway_url")
        if url is not None and not _URL_RE.match(str(url)):
            raise ConfigError("%s: metrics.pushgateway_url must be an http(s) URL, got %r" % (self.where, url))
        textfile = metrics.get("textfile")
        if textfile is not None and not str(textfile).endswith(".prom"):
            raise ConfigError("%s: metrics.textfile must end in .prom" % self.where)
        instance = metrics.get("instance")
        if instance is not None and (not isinstance(instance, str) or not instance):
            raise ConfigError("%s: metrics.instance must be a non-empty string" % self.where)
        timeout = metrics.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ConfigError("%s: metrics.timeout must be a positive number of seconds" % self.where)

    # -- what the commands need (secrets are read here) --------------------------------
    @property
    def metrics_enabled(self):
        return bool(self.metrics.get("enabled", True)
                    and (self.metrics.get("pushgateway_url") or self.metrics.get("textfile")))

    @property
    def instance(self):
        """The metrics ``instance`` label: configured, else the source host, else the job name."""
        return (self.metrics.get("instance") or (self.source.get("host") if isinstance(self.source.get("host"), str) else None)
                or self.job)

    def storage_options(self):
        return resolve_secret_refs(self.storage, "storage")

    def open_storage(self):
        return open_storage(self.storage_options())

    def source_options(self):
        return resolve_secret_refs(self.source, "source")

    def make_source(self):
        return kinds.make_source(self.kind, self.source_options())

    def backup_encryption(self):
        """Options for codecs.encryption_settings (recipients or passphrase), secrets resolved."""
        if not self.encrypted:
            return {}
        return backup_encryption_options(resolve_secret_refs(self.encryption, "encryption"))

    def read_keys(self):
        """``(identity_text, passphrase)`` for restore/verify/drill (either may be None)."""
        resolved = resolve_secret_refs(
            {key: value for key, value in self.encryption.items()
             if key.startswith(("identity", "passphrase"))}, "encryption")
        return read_keys(resolved)

    def target_options(self, section="restore", override=None):
        options = dict((getattr(self, section).get("target") or {}))
        if override:
            refuse_literal_secrets(override, "%s.target" % section)
            options.update(override)
        return resolve_secret_refs(options, "%s.target" % section)

    def metrics_credentials(self):
        resolved = resolve_secret_refs(
            {key: value for key, value in self.metrics.items() if key.startswith(("username", "password"))},
            "metrics")
        return resolved.get("username"), resolved.get("password")

    def prune_options(self):
        return {key: value for key, value in self.retention.items() if key in PRUNE_KEYS}

    def prepare(self, command):
        """Read every secret ``command`` needs and build its objects, so that a missing file or
        environment variable fails the run before anything is read from or written to a source,
        target or storage location. Returns a dict of what was built."""
        prepared = {"storage": self.open_storage()}
        if command == "backup":
            prepared["source"] = self.make_source()
            prepared["encryption"] = self.backup_encryption()
            for recipient in prepared["encryption"].get("recipients") or []:
                codecs.parse_recipient(recipient)  # a bad line in recipients_file fails here
        if command in ("restore", "verify", "drill"):
            prepared["keys"] = self.read_keys()
            if self.encrypted and prepared["keys"] == (None, None):
                # Recipients-only configuration: reading needs the private half.
                raise ConfigError("%s: %s needs encryption.identity_file, identity_env, passphrase_file "
                                  "or passphrase_env to read encrypted backups" % (self.where, command))
        if command == "prune" and self.retention_policy is None:
            raise ConfigError("%s: prune needs a 'retention' policy" % self.where)
        if self.metrics_enabled:
            prepared["metrics_credentials"] = self.metrics_credentials()
        return prepared

    def public(self):
        """The job file as given, safe to log: it holds only secret references by construction."""
        return json.loads(json.dumps(self.raw, default=str))
