"""The job file: what one backup job is, as the runner in a CronJob container reads it.

The file is YAML or JSON, mounted from a ConfigMap, so it must never carry a secret: every
secret field (``password``, ``secret_key``, ``passphrase``, ``identity``...) appears only as
``<field>_file`` (a path inside a mounted Secret) or ``<field>_env`` (an environment
variable filled by ``secretKeyRef``). Everything is checked when the file is loaded, before
anything runs; secrets are read later, per command, by :meth:`JobConfig.prepare`, so that a
``list`` does not need the database password.

Layout (only ``job``, ``kind`` and ``storage`` are required)::

    job: nightly-db               # name: path segment and metrics label
    kind: postgres                # see kinds/__init__.py
    source: {host: db, dbname: app, user: backup, password_env: PGPASSWORD}
    storage: {backend: s3, bucket: backups, endpoint_url: http://s3:8333,
              access_key_env: S3_ACCESS_KEY, secret_key_file: /secrets/s3/secret_key}
    compression: {algorithm: zstd, level: 3}
    encryption:                   # writing: recipients or passphrase; reading: identity or passphrase
      recipients: [age1...]       # or recipients_file: /etc/backup/recipients.txt
      identity_file: /secrets/age/identity   # used by restore, verify and drill only
    retention: {keep_daily: 30, keep_weekly: 12, keep_monthly: 12, keep_yearly: 7}
                                  # + require_copy: true keeps what copy.destination lacks
    size_anomaly: {warn_above: 2.0, warn_below: 0.5, fail_below: 0.1}
    schedule: "0 2 * * *"         # cron; exported as backup_schedule_interval_seconds
    metrics: {pushgateway_url: http://pushgateway:9091, instance: db-primary,
              username: push, password_file: /secrets/push/password}
    restore: {target: {...}}      # target options for `runner restore`
    drill: {job: nightly-db, target: {...}}  # the job whose backups a drill restores (default:
                                  # this job) and scratch target options (default: derived
                                  # from the source's connection options)
    verify: {backup: latest, test_restore: false}
    copy:                         # `runner copy`: the offsite copy of this job's backups
      destination: {backend: s3, bucket: offsite, endpoint_url: https://s3.other.site,
                    access_key_file: /secrets/offsite/access_key,
                    secret_key_file: /secrets/offsite/secret_key}
      backup: all                 # all (default), latest or a backup id (with its chain)
      recheck: size               # size (listing) or full (read back every copied object)
      retention: {keep_yearly: 7} # the destination's own policy: `runner prune --destination`
                                  # applies it there, and copy skips what it would not keep
      reencrypt:                  # optional: encrypt the copies to the destination's owners
        recipients: [age1...]     # or recipients_file: their public keys
        identity_file: /secrets/age-source/identity  # the source's key, given explicitly
                                  # (or identity_env, passphrase_file, passphrase_env)
    log_format: text              # or json (JSON lines on stderr)
"""

import json
import re

from . import codecs
from . import kinds
from . import resticstore
from .restic import repository_location
from .anomaly import SizePolicy
from .config import SECRET_FIELDS, read_text_file, resolve_secret_refs
from .errors import ConfigError
from .manifest import validate_job_name
from .schema import Field, Schema
from .storage import location

try:
    import yaml
    HAS_YAML = True
except ImportError:
    HAS_YAML = False

TOP_LEVEL = ("job", "kind", "source", "storage", "compression", "encryption", "retention",
             "size_anomaly", "schedule", "metrics", "restore", "drill", "verify", "copy", "log_format",
             "description")
LOG_FORMATS = ("text", "json")
_URL_RE = re.compile(r"^https?://[^\s/]+")

ENCRYPTION = Schema("encryption", {
    "enabled": Field("bool", "false stores backups unencrypted (default: encrypted when keys are given)"),
    "recipients": Field("list", "age public keys (age1...) backups are encrypted to"),
    "recipients_file": Field("path", "file of age public keys, one per line (# comments)"),
    "passphrase": Field("str", "passphrase (scrypt) instead of recipients", secret=True),
    "identity": Field("str", "age private key (AGE-SECRET-KEY-1...) for restore, verify and drill", secret=True),
})
RETENTION_KEYS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly",
                  "keep_yearly", "keep_within", "semantics", "timezone")
# Options of the prune step itself (engine/prune.py), next to the policy.
PRUNE_KEYS = ("min_keep", "max_delete", "force", "orphan_grace", "require_copy")
_COUNT = "backups kept by the %s rule (-1: unlimited)"
RETENTION = Schema("retention", dict(
    {key: Field("int", _COUNT % key[5:], minimum=-1) for key in RETENTION_KEYS if key.startswith("keep_")
     and key != "keep_within"},
    keep_within=Field("str", "keep every backup within this span of the newest (e.g. 7d, 2w3d, 1y)", nonempty=True),
    semantics=Field("enum", "rule semantics (default borg)", choices=("borg", "restic")),
    timezone=Field("str", "IANA time zone the calendar rules count in (default UTC)", nonempty=True),
    min_keep=Field("int", "never keep fewer complete backups than this (default 1)", minimum=0),
    max_delete=Field("int", "refuse a prune that would delete more backups than this (unless force)", minimum=0),
    force=Field("bool", "prune even beyond max_delete (default false)"),
    orphan_grace=Field("any", "age after which leftovers of failed runs are removed (default 24h)"),
    require_copy=Field("bool", "never prune a backup copy.destination does not hold yet (default false)"),
))
METRICS = Schema("metrics", {
    "enabled": Field("bool", "push or write metrics (default true when a destination is given)"),
    "pushgateway_url": Field("str", "Pushgateway URL, http(s)://host:port", nonempty=True),
    "instance": Field("str", "the instance label (default: the source host, else the job name)", nonempty=True),
    "username": Field("str", "Pushgateway basic-auth user", nonempty=True),
    "password": Field("str", "Pushgateway basic-auth password", secret=True),
    "timeout": Field("number", "seconds per push (default 10)", exclusive_minimum=0, maximum=600),
    "textfile": Field("path", "write a node-exporter textfile (*.prom) instead of or besides pushing"),
})
VERIFY = Schema("verify", {
    "backup": Field("str", "which backup: an id, latest (default) or an ISO-8601 time", nonempty=True),
    "test_restore": Field("bool", "also restore into a scratch target and check the data (default false)"),
})
RESTORE = Schema("restore", {
    "target": Field("dict", "the kind's target options"),
    "backup": Field("str", "which backup: an id, latest (default) or an ISO-8601 time", nonempty=True),
    "point_in_time": Field("str", "restore the newest backup finished at or before this ISO-8601 time",
                           nonempty=True),
    "restore_point": Field("str", "postgres_base: recover to this named restore point (pg_create_restore_point)",
                           nonempty=True),
})
COPY = Schema("copy", {
    "destination": Field("dict", "the storage location the backups are copied to (the storage option's fields)"),
    "backup": Field("str", "which backups: all (default), latest or a backup id (with its chain)", nonempty=True),
    "recheck": Field("enum", "how copied backups are re-checked: size (listing, default) or full (read back)",
                     choices=("size", "full")),
    "retention": Field("dict", "the destination's own retention policy and prune options (runner prune "
                               "--destination); copy skips what it would not keep"),
    "reencrypt": Field("dict", "re-encrypt the copies to other age recipients (a destination held by "
                               "another team); needs the source's key"),
})
REENCRYPT = Schema("copy.reencrypt", {
    "recipients": Field("list", "age public keys (age1...) the copies are encrypted to"),
    "recipients_file": Field("path", "file of the destination's age public keys, one per line (# comments)"),
    "identity": Field("str", "the source's age private key (AGE-SECRET-KEY-1...) that decrypts the backups "
                             "being copied", secret=True),
    "passphrase": Field("str", "the source's passphrase, for passphrase-encrypted backups", secret=True),
})
DRILL = Schema("drill", {
    "job": Field("str", "the job whose backups the drill restores (default: this job)", nonempty=True),
    "target": Field("dict", "scratch target options (default: derived from the source's connection)"),
})


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


def _section(data, name, schema=None):
    """Section ``name`` of the job file, checked field by field by ``schema`` (types and all)."""
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("'%s' must be a mapping, got %s" % (name, type(value).__name__))
    return schema.validate(value, name) if schema is not None else value


def read_recipients_file(path):
    """Recipients from a file (one ``age1...`` per line, ``#`` comments), as age -R reads them."""
    lines = read_text_file(path, "encryption.recipients_file").splitlines()
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
        self.where = where
        self.raw = data
        try:
            self._validate(data)
        except ConfigError as exc:
            # Every message names the field; the job file's path goes in front once.
            if str(exc).startswith(where):
                raise
            raise ConfigError("%s: %s" % (where, exc)) from None

    def _validate(self, data):
        unknown = sorted(set(data) - set(TOP_LEVEL))
        if unknown:
            raise ConfigError("unknown top-level option(s) %s (known: %s)" % (", ".join(unknown), ", ".join(TOP_LEVEL)))
        self.job = validate_job_name(data.get("job"))
        self.kind = data.get("kind")
        if not self.kind:
            raise ConfigError("'kind' is required (one of %s)" % (", ".join(kinds.known_kinds()) or "none"))
        source_class = kinds.source_class(self.kind)  # unknown kind -> ConfigError listing the known ones
        # Secret fields appear only as _file/_env in a job file: checked first, so that the
        # message is about the secret and not about the field's type.
        for name in ("source", "storage", "encryption", "metrics", "restore", "drill", "copy"):
            refuse_literal_secrets(data.get(name) or {}, name)
        self.source = _section(data, "source", source_class.SCHEMA)
        if data.get("storage") is None:
            raise ConfigError("'storage' is required")
        self.storage = location.check_storage(_section(data, "storage"))
        self.compression_options = _section(data, "compression", codecs.SCHEMA)
        self.encryption = _section(data, "encryption", ENCRYPTION)
        self.retention = _section(data, "retention", RETENTION)
        self.size_anomaly = _section(data, "size_anomaly")
        self.metrics = _section(data, "metrics", METRICS)
        self.restore = _section(data, "restore", RESTORE)
        self.drill = _section(data, "drill", DRILL)
        if self.drill.get("job") is not None:
            validate_job_name(self.drill["job"])
        self.verify = _section(data, "verify", VERIFY)
        self.copy = _section(data, "copy", COPY)
        if self.copy.get("destination") is not None:
            self.copy["destination"] = location.check_storage(self.copy["destination"], "copy.destination")
        self.copy_retention = RETENTION.validate(self.copy["retention"], "copy.retention") if self.copy.get(
            "retention") is not None else {}
        if self.copy.get("reencrypt") is not None:
            self.copy["reencrypt"] = self._check_reencrypt(REENCRYPT.validate(self.copy["reencrypt"], "copy.reencrypt"))
        self.compression = codecs.compression_settings(self.compression_options)
        self._check_encryption()
        self._check_storage_format()
        self.size_policy = SizePolicy.from_mapping(self.size_anomaly)
        self.retention_policy = self._check_retention()
        self.copy_policy = self._check_retention("copy.retention")
        self.schedule = data.get("schedule")
        if self.schedule is not None:
            self._check_schedule()
        self._check_metrics()
        target_class = kinds.TARGETS.get(self.kind)
        for section in ("restore", "drill"):
            target = getattr(self, section).get("target")
            if target is not None and target_class is not None and target_class.SCHEMA is not None:
                target_class.SCHEMA.validate(target, "%s.target" % section)
        self.log_format = data.get("log_format") or "text"
        if self.log_format not in LOG_FORMATS:
            raise ConfigError("log_format must be one of %s, got %r" % (", ".join(LOG_FORMATS), self.log_format))

    # -- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, path):
        text = read_text_file(path, "job file")
        return cls(parse_text(text, "job file %s" % path), where="job file %s" % path)

    @classmethod
    def from_mapping(cls, data, where="job file"):
        return cls(data, where=where)

    # -- structural checks (no secret is read) -----------------------------------------
    def _check_encryption(self):
        enc = self.encryption
        recipients = enc.get("recipients")
        if recipients is not None:
            if isinstance(recipients, str):
                recipients = [recipients]
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

    def _check_storage_format(self):
        """What BackupRun and the copy would refuse of a restic-format job, refused with the job file
        (the roles' deploy-time check runs this, not a backup). The copy rules hold for a job
        moved back to archives too while its storage names the password (restic backups left)."""
        restic_format = resticstore.storage_format_of(self.storage) == resticstore.RESTIC
        if restic_format or any(self.storage.get(key) for key in location.RESTIC_PASSWORD_KEYS):
            if self.copy.get("reencrypt"):
                raise ConfigError("%s: copy.reencrypt cannot apply to backups in the restic format (this job's "
                                  "storage names a restic password): their copies are encrypted by the "
                                  "destination's restic repository (copy.destination.restic_password, else the "
                                  "job's); remove reencrypt" % self.where)
            if self.copy.get("destination"):
                try:
                    repository_location(self.copy["destination"])  # a backend restic reads the copies from
                except ConfigError as exc:
                    raise ConfigError("%s: copy.destination of a job with backups in the restic format: %s"
                                      % (self.where, exc)) from None
        if not restic_format:
            return
        resticstore.check_kind(self.kind, self.job, self.source)
        if self.encrypted:
            raise ConfigError("%s: storage.format restic encrypts with the repository password: remove the "
                              "encryption recipients (encryption.enabled: false), or keep the job in the archive "
                              "format" % self.where)

    @staticmethod
    def _check_reencrypt(options):
        """Structure of copy.reencrypt (no secret read): recipients and the source's key."""
        recipients = options.get("recipients") or []
        for recipient in recipients:
            if recipient.strip().upper().startswith("AGE-SECRET-KEY-"):
                raise ConfigError("copy.reencrypt.recipients holds an age secret key; it takes the destination's "
                                  "public keys (age1...)")
            codecs.parse_recipient(recipient)  # ConfigError names the bad key
        if not (recipients or options.get("recipients_file")):
            raise ConfigError("copy.reencrypt needs the destination's recipients (recipients or recipients_file)")
        if not any(options.get(key) for key in ("identity_file", "identity_env", "passphrase_file", "passphrase_env")):
            raise ConfigError("copy.reencrypt needs the source's key, given explicitly: identity_file, identity_env, "
                              "passphrase_file or passphrase_env (the encryption section's keys are not used)")
        return options

    def _check_retention(self, section="retention"):
        values = self.retention if section == "retention" else self.copy_retention
        if not values:
            return None
        from .retention import Policy  # local: retention is only needed when configured
        policy = {key: value for key, value in values.items() if key in RETENTION_KEYS}
        try:
            return Policy(**policy)
        except ConfigError as exc:
            raise ConfigError("%s: %s: %s" % (self.where, section, exc)) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError("%s: %s: %s" % (self.where, section, exc)) from None

    def _check_schedule(self):
        from .cron import check_schedule  # exactly what a Kubernetes CronJob accepts
        check_schedule(self.schedule, "%s: schedule" % self.where)
        from .metrics import schedule_interval_seconds
        try:
            schedule_interval_seconds(self.schedule)
        except ConfigError as exc:
            raise ConfigError("%s: schedule: %s" % (self.where, exc)) from None

    def _check_metrics(self):
        url = self.metrics.get("pushgateway_url")
        if url is not None and not _URL_RE.match(url):
            raise ConfigError("%s: metrics.pushgateway_url must be an http(s) URL, got %r" % (self.where, url))
        textfile = self.metrics.get("textfile")
        if textfile is not None and not textfile.endswith(".prom"):
            raise ConfigError("%s: metrics.textfile must end in .prom" % self.where)

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
        return location.storage_options(self.storage)

    def copy_destination(self):
        """The ``copy.destination`` storage option as given (references unread), with the job's
        restic password reference when it names none of its own: the copies of restic backups
        open with the job's password unless the destination has its own
        (resticstore.share_password does the same for the modules). None without a copy section."""
        destination = self.copy.get("destination")
        if not destination:
            return None
        if any(key in destination for key in location.RESTIC_PASSWORD_KEYS):
            return dict(destination)
        return dict(destination, **{key: value for key, value in self.storage.items() if key in location.RESTIC_PASSWORD_KEYS})

    def copy_destination_options(self):
        """The copy destination's storage options, secrets read (None without a copy section)."""
        if not self.copy.get("destination"):
            return None
        return location.storage_options(self.copy_destination())

    def copy_reencrypt(self):
        """copy.reencrypt normalised (offsite.reencrypt_settings), its key read; None without it."""
        if not self.copy.get("reencrypt"):
            return None
        from .offsite import reencrypt_settings  # local: offsite pulls in the restore engine
        return reencrypt_settings(resolve_secret_refs(self.copy["reencrypt"], "copy.reencrypt"))

    def open_storage(self):
        return location.build_storage(self.storage_options())

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

    def prune_options(self, section="retention"):
        values = self.retention if section == "retention" else self.copy_retention
        return {key: value for key, value in values.items() if key in PRUNE_KEYS}

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
        if command == "copy":
            if not self.copy.get("destination"):
                raise ConfigError("%s: copy needs a 'copy' section with a destination storage" % self.where)
            prepared["destination"] = location.build_storage(self.copy_destination_options())
            prepared["reencrypt"] = self.copy_reencrypt()
        if command == "prune" and self.retention_policy is None:
            raise ConfigError("%s: prune needs a 'retention' policy" % self.where)
        if command == "prune" and self.retention.get("require_copy"):
            if not self.copy.get("destination"):
                raise ConfigError("%s: retention.require_copy needs the 'copy' section's destination, where "
                                  "the copies are checked" % self.where)
            prepared["destination"] = location.build_storage(self.copy_destination_options())
        if self.metrics_enabled:
            prepared["metrics_credentials"] = self.metrics_credentials()
        return prepared

    def public(self):
        """The job file as given, safe to log: it holds only secret references by construction."""
        return json.loads(json.dumps(self.raw, default=str))
