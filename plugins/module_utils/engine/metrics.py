"""Prometheus metrics of backup runs: pushed to a Pushgateway or written for the textfile collector.

One :class:`BackupMetrics` object describes one job on one instance. The runner records what
happened (a backup, a verification, a restore drill, a retention pass) and then ships the
values with :meth:`BackupMetrics.push` or :meth:`BackupMetrics.write_textfile`.

Only the metrics recorded in this run are shipped, and both outputs *merge* them into what is
already there instead of replacing it:

* push uses the Pushgateway's POST ("pushadd") method, which replaces only the metric names
  contained in the request. A failed run that pushes ``backup_last_failure_timestamp_seconds``
  therefore leaves the previous ``backup_last_success_timestamp_seconds`` in place, which is
  what the staleness and "job failing" alerts compare against. A PUT would wipe the group.
* the textfile writer reads the current ``.prom`` file and keeps the families this run did
  not record, then replaces the file atomically (write to a temporary file, rename).

The counters (``backup_retention_pruned_total``, ``backup_wal_segments_stored_total``,
``backup_wal_gaps_total``) only know what *this* push adds. Before shipping, the previous
total is read back (from the gateway's ``/metrics`` or from the old ``.prom`` file) and the
increment is added, so the value only grows and ``increase()`` works. If the gateway lost its
state the total restarts from the increment, which Prometheus treats as an ordinary counter
reset. A long-running command (the WAL stream) pushes a fresh object each time, holding the
increments since its previous push.

Basic-auth credentials for the gateway come from arguments, the environment
(``BACKUP_PUSHGATEWAY_USERNAME``, ``BACKUP_PUSHGATEWAY_PASSWORD`` or
``BACKUP_PUSHGATEWAY_PASSWORD_FILE``) or a file; they are never part of an error message.
"""

from __future__ import annotations

import base64
import datetime
import math
import os
import tempfile
import urllib.parse
import urllib.request

from .config import read_secret_file
from .errors import BackupError, ConfigError, MissingDependencyError

try:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.exposition import basic_auth_handler, default_handler, generate_latest
    from prometheus_client.exposition import pushadd_to_gateway
    from prometheus_client.parser import text_string_to_metric_families
    HAS_PROMETHEUS_CLIENT = True
    PROMETHEUS_CLIENT_IMPORT_ERROR = None
except ImportError as exc:  # the engine stays importable; shipping metrics then fails clearly
    HAS_PROMETHEUS_CLIENT = False
    PROMETHEUS_CLIENT_IMPORT_ERROR = exc

GAUGE = "gauge"
COUNTER = "counter"

# The labels that identify a series. On the Pushgateway they are the grouping key (the
# gateway attaches them to every sample); in a textfile they are written on each sample.
IDENTITY_LABELS = ("job", "kind", "instance")

# name -> (type, help). Names follow the Prometheus conventions: base units (seconds, bytes),
# ``_timestamp_seconds`` for Unix times, ``_total`` only on the counter.
METRICS = {
    "backup_duration_seconds": (
        GAUGE, "Wall-clock duration of the last successful backup run."),
    "backup_size_bytes": (
        GAUGE, "Stored size of the last successful backup (after compression and encryption)."),
    "backup_stored_new_bytes": (
        GAUGE, "Bytes the last successful backup added to storage: its whole stored size in the archive "
               "format, the new (deduplicated, compressed) data in the restic format."),
    "backup_repository_size_bytes": (
        GAUGE, "Bytes the job's restic repository occupies in storage after the last successful backup "
               "(restic format only)."),
    "backup_size_change_ratio": (
        GAUGE, "Size of the last successful backup divided by the size of the one before it."),
    "backup_last_success_timestamp_seconds": (
        GAUGE, "Unix time at which the last successful backup finished."),
    "backup_last_failure_timestamp_seconds": (
        GAUGE, "Unix time at which the last failed backup attempt ended."),
    "backup_schedule_interval_seconds": (
        GAUGE, "Longest gap between two scheduled runs of the job; alerts derive staleness from it."),
    "backup_last_verified_timestamp_seconds": (
        GAUGE, "Unix time at which a stored backup of the job last passed verification."),
    "backup_last_verification_failure_timestamp_seconds": (
        GAUGE, "Unix time at which a stored backup of the job last failed verification."),
    "backup_restore_drill_duration_seconds": (
        GAUGE, "Recovery time of the last successful restore drill (restore plus checks)."),
    "backup_restore_drill_last_success_timestamp_seconds": (
        GAUGE, "Unix time at which the last successful restore drill finished."),
    "backup_restore_drill_last_failure_timestamp_seconds": (
        GAUGE, "Unix time at which the last failed restore drill ended."),
    "backup_restore_drill_phase_seconds": (
        GAUGE, "Wall time of each phase (label phase) of the last successful drill's restore; phase=total is "
               "the expected recovery time (RTO) of the job."),
    "backup_retention_kept": (
        GAUGE, "Number of backups the last retention pass kept."),
    "backup_retention_pruned_total": (
        COUNTER, "Backups deleted by retention passes since the series started."),
    "backup_retention_last_run_timestamp_seconds": (
        GAUGE, "Unix time at which the last retention pass finished."),
    "backup_copy_last_success_timestamp_seconds": (
        GAUGE, "Unix time at which the last offsite copy run that copied everything it had to finished."),
    "backup_copy_last_failure_timestamp_seconds": (
        GAUGE, "Unix time at which the last offsite copy run that failed (or left a backup behind) ended."),
    "backup_copy_lag_seconds": (
        GAUGE, "Age of the oldest backup the offsite copy does not hold yet (0 when in sync)."),
    "backup_copy_bytes": (
        GAUGE, "Bytes the last offsite copy run copied to its destination."),
    # PostgreSQL WAL stream (runner wal-stream), pushed every partial interval while it runs.
    "backup_wal_stream_up": (
        GAUGE, "1 while the WAL stream runs, 0 once it stopped (gap, server lost, shut down)."),
    "backup_wal_stream_heartbeat_timestamp_seconds": (
        GAUGE, "Unix time of the WAL stream's last status report while streaming."),
    "backup_wal_last_archived_timestamp_seconds": (
        GAUGE, "Unix time at which the newest WAL segment or partial segment copy was stored."),
    "backup_wal_archive_lag_bytes": (
        GAUGE, "Bytes of WAL the server has written that are not stored yet."),
    "backup_wal_archive_lag_seconds": (
        GAUGE, "Age of the oldest WAL the server has written that is not stored yet (0 when caught up)."),
    "backup_wal_segments_stored_total": (
        COUNTER, "Complete WAL segments stored by the stream since the series started."),
    "backup_wal_gaps_total": (
        COUNTER, "Gaps (WAL that will never be stored) the stream detected since the series started."),
    "backup_wal_last_gap_timestamp_seconds": (
        GAUGE, "Unix time at which the WAL stream last detected a gap in the archive."),
    "backup_wal_recovery_window_start_timestamp_seconds": (
        GAUGE, "Oldest time a point-in-time restore can reach: the end of the oldest base backup with stored WAL."),
    "backup_wal_recovery_window_end_timestamp_seconds": (
        GAUGE, "Newest time a point-in-time restore can reach: the reach of the newest stored WAL "
        "(a partial copy's reach_time, else the last commit it holds)."),
}

# Metrics with one series per value of an extra label: name -> label name.
LABELLED_METRICS = {"backup_restore_drill_phase_seconds": "phase"}

COUNTER_METRICS = frozenset(name for name, (kind, _help) in METRICS.items() if kind == COUNTER)

ENV_USERNAME = "BACKUP_PUSHGATEWAY_USERNAME"
ENV_PASSWORD = "BACKUP_PUSHGATEWAY_PASSWORD"
ENV_PASSWORD_FILE = "BACKUP_PUSHGATEWAY_PASSWORD_FILE"


class MetricsError(BackupError):
    """Metrics could not be shipped (gateway unreachable, rejected, file not writable)."""


def _require_client():
    if not HAS_PROMETHEUS_CLIENT:
        raise MissingDependencyError("prometheus_client", "shipping backup metrics")


def unix_time(moment):
    """Seconds since the epoch for a datetime (naive = UTC) or a number."""
    if isinstance(moment, datetime.datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return moment.timestamp()
    if isinstance(moment, (int, float)) and not isinstance(moment, bool):
        return float(moment)
    raise ConfigError("expected a datetime or a Unix time, got %r" % (moment,))


def _non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ConfigError("%s must be a non-negative number, got %r" % (name, value))
    return float(value)


def schedule_interval_seconds(cron_expression, start=None, samples=500):
    """The longest gap between consecutive runs of a cron schedule, in seconds.

    Staleness alerts allow a multiple of this. Using the longest gap (not the first one)
    keeps a weekday-only schedule from alerting every Monday. ``samples`` bounds the work:
    500 consecutive runs cover a year for daily and a week for every-20-minutes schedules.
    """
    try:
        from croniter import croniter
    except ImportError:
        raise MissingDependencyError("croniter", "deriving the schedule interval") from None
    start = start or datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    try:
        schedule = croniter(cron_expression, start)
    except (ValueError, KeyError) as exc:
        raise ConfigError("invalid cron expression %r: %s" % (cron_expression, exc)) from None
    previous = schedule.get_next(float)
    longest = 0.0
    for _sample in range(samples):
        current = schedule.get_next(float)
        longest = max(longest, current - previous)
        previous = current
    return longest


class BackupMetrics:
    """The metrics of one backup job on one instance, recorded during a run and then shipped.

    ``job`` is the backup job name, ``kind`` its source kind (postgres, redis, files, ...),
    ``instance`` what was backed up (a database host, a cluster name); together they form the
    Pushgateway grouping key and the labels of every series.
    """

    def __init__(self, job, kind, instance):
        for label, value in (("job", job), ("kind", kind), ("instance", instance)):
            if not isinstance(value, str) or not value:
                raise ConfigError("metrics label %s must be a non-empty string, got %r" % (label, value))
        self.job = job
        self.kind = kind
        self.instance = instance
        self._values = {}
        self._increments = {}  # counter name -> what this run adds
        self._labelled = {}  # LABELLED_METRICS name -> {label value: value}

    @property
    def identity(self):
        return {"job": self.job, "kind": self.kind, "instance": self.instance}

    @property
    def recorded(self):
        """Metric name -> value of everything recorded so far (the counter as this run's increment).

        A LABELLED_METRICS name maps to ``{label value: value}``.
        """
        values = dict(self._values)
        values.update((name, float(value)) for name, value in self._increments.items())
        values.update((name, dict(series)) for name, series in self._labelled.items())
        return values

    def _add(self, name, increment):
        if METRICS.get(name, (None,))[0] != COUNTER:
            raise ConfigError("unknown backup counter %s" % name)
        if isinstance(increment, bool) or not isinstance(increment, int) or increment < 0:
            raise ConfigError("%s increment must be a non-negative integer, got %r" % (name, increment))
        self._increments[name] = self._increments.get(name, 0) + increment

    def _set(self, name, value):
        if name not in METRICS:
            raise ConfigError("unknown backup metric %s" % name)
        self._values[name] = float(value)

    # -- recording ---------------------------------------------------------------------

    def record_backup_result(self, success, finished_at, duration_seconds=None, size_bytes=None,
                             size_change_ratio=None, stored_new_bytes=None, repository_bytes=None):
        """One backup attempt. Duration, sizes and ratio describe successful backups only:
        a failed attempt just moves ``backup_last_failure_timestamp_seconds``."""
        when = unix_time(finished_at)
        if not success:
            self._set("backup_last_failure_timestamp_seconds", when)
            return
        self._set("backup_last_success_timestamp_seconds", when)
        if duration_seconds is not None:
            self._set("backup_duration_seconds", _non_negative("duration_seconds", duration_seconds))
        if size_bytes is not None:
            self._set("backup_size_bytes", _non_negative("size_bytes", size_bytes))
        if size_change_ratio is not None:
            # +Inf is a legal ratio (the previous backup was empty); NaN is not.
            self._set("backup_size_change_ratio", _non_negative("size_change_ratio", size_change_ratio))
        if stored_new_bytes is not None:
            self._set("backup_stored_new_bytes", _non_negative("stored_new_bytes", stored_new_bytes))
        if repository_bytes is not None:
            self._set("backup_repository_size_bytes", _non_negative("repository_bytes", repository_bytes))

    def record_size_change_ratio(self, ratio):
        """The size ratio of a stored backup on its own, for a run the size policy failed.

        Such a backup counts as a failed attempt (``record_backup_result(False, ...)``), but its
        ratio must still reach ``backup_size_change_ratio`` so the size alert names the cause.
        None (nothing to compare with) records nothing.
        """
        if ratio is not None:
            self._set("backup_size_change_ratio", _non_negative("size_change_ratio", ratio))

    def record_schedule(self, interval_seconds=None, cron_expression=None):
        """The job's expected run interval, given directly or derived from its cron schedule."""
        if (interval_seconds is None) == (cron_expression is None):
            raise ConfigError("give exactly one of interval_seconds and cron_expression")
        if cron_expression is not None:
            interval_seconds = schedule_interval_seconds(cron_expression)
        if _non_negative("interval_seconds", interval_seconds) == 0:
            raise ConfigError("interval_seconds must be positive")
        self._set("backup_schedule_interval_seconds", interval_seconds)

    def record_verification(self, success, finished_at):
        """A verification of a stored backup (checksum, decrypt, decompress, optional test restore)."""
        name = ("backup_last_verified_timestamp_seconds" if success
                else "backup_last_verification_failure_timestamp_seconds")
        self._set(name, unix_time(finished_at))

    def record_drill(self, success, finished_at, duration_seconds=None):
        """A restore drill; ``duration_seconds`` (recovery time) is kept for successful drills only."""
        when = unix_time(finished_at)
        if not success:
            self._set("backup_restore_drill_last_failure_timestamp_seconds", when)
            return
        self._set("backup_restore_drill_last_success_timestamp_seconds", when)
        if duration_seconds is not None:
            self._set("backup_restore_drill_duration_seconds",
                      _non_negative("duration_seconds", duration_seconds))

    def record_drill_phases(self, phases):
        """The phases of a successful drill's restore (``{phase: seconds}``, with ``total``)."""
        if not isinstance(phases, dict) or "total" not in phases:
            raise ConfigError("drill phases must be a mapping that includes total, got %r" % (phases,))
        self._labelled["backup_restore_drill_phase_seconds"] = {
            str(name): _non_negative("phase %s" % name, value) for name, value in phases.items()}

    def record_retention(self, kept, pruned, finished_at):
        """A retention pass that kept ``kept`` backups and deleted ``pruned`` of them."""
        for name, value in (("kept", kept), ("pruned", pruned)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError("retention %s must be a non-negative integer, got %r" % (name, value))
        self._set("backup_retention_kept", kept)
        self._set("backup_retention_last_run_timestamp_seconds", unix_time(finished_at))
        self._add("backup_retention_pruned_total", pruned)

    def record_copy(self, success, finished_at, lag_seconds=None, bytes_copied=None):
        """An offsite copy run: its outcome, the lag it left and the bytes it copied."""
        self._set("backup_copy_last_success_timestamp_seconds" if success
                  else "backup_copy_last_failure_timestamp_seconds", unix_time(finished_at))
        if lag_seconds is not None:
            self._set("backup_copy_lag_seconds", _non_negative("lag_seconds", lag_seconds))
        if bytes_copied is not None:
            self._set("backup_copy_bytes", _non_negative("bytes_copied", bytes_copied))

    def record_wal_stream(self, up, reported_at=None, last_archived_at=None, lag_bytes=None, lag_seconds=None,
                          segments_stored=0, window_start=None, window_end=None):
        """One status report of the WAL stream.

        ``up``: the stream runs (False once it stopped); ``reported_at`` (while streaming) moves
        the heartbeat; ``segments_stored`` is the number of complete segments stored since the
        previous report (added to the counter). Times are datetimes or Unix times; None leaves a
        value as last published.
        """
        self._set("backup_wal_stream_up", 1 if up else 0)
        if reported_at is not None:
            self._set("backup_wal_stream_heartbeat_timestamp_seconds", unix_time(reported_at))
        if last_archived_at is not None:
            self._set("backup_wal_last_archived_timestamp_seconds", unix_time(last_archived_at))
        if lag_bytes is not None:
            self._set("backup_wal_archive_lag_bytes", _non_negative("lag_bytes", lag_bytes))
        if lag_seconds is not None:
            self._set("backup_wal_archive_lag_seconds", _non_negative("lag_seconds", lag_seconds))
        if segments_stored:
            self._add("backup_wal_segments_stored_total", segments_stored)
        if window_start is not None:
            self._set("backup_wal_recovery_window_start_timestamp_seconds", unix_time(window_start))
        if window_end is not None:
            self._set("backup_wal_recovery_window_end_timestamp_seconds", unix_time(window_end))

    def record_wal_gap(self, detected_at):
        """The stream found WAL that will never be stored (slot lost, spool lost, timeline change)."""
        self._set("backup_wal_last_gap_timestamp_seconds", unix_time(detected_at))
        self._set("backup_wal_stream_up", 0)
        self._add("backup_wal_gaps_total", 1)

    # -- building ----------------------------------------------------------------------

    def registry(self, previous_pruned_total=0.0, with_identity_labels=True, previous_totals=None):
        """A fresh ``CollectorRegistry`` holding exactly the recorded metrics.

        ``previous_totals`` (counter name -> value already published; ``previous_pruned_total``
        for the pruned counter) are what this run's increments are added to. Without identity
        labels the exposition suits a Pushgateway, which adds the grouping key itself.
        """
        _require_client()
        previous = {"backup_retention_pruned_total": float(previous_pruned_total or 0.0)}
        previous.update(previous_totals or {})
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_RecordedCollector(self, previous, with_identity_labels))
        return registry

    def exposition(self, previous_pruned_total=0.0, with_identity_labels=True, previous_totals=None):
        """The recorded metrics in the Prometheus text format (bytes)."""
        return generate_latest(self.registry(previous_pruned_total, with_identity_labels, previous_totals))

    # -- shipping ----------------------------------------------------------------------

    def push(self, gateway_url, timeout=10.0, username=None, password=None, password_file=None):
        """Merge the recorded metrics into this job's group on a Pushgateway (HTTP POST).

        Credentials default to the ``BACKUP_PUSHGATEWAY_*`` environment variables. Returns
        the grouping key used.
        """
        _require_client()
        url = _check_gateway_url(gateway_url)
        credentials = resolve_credentials(username, password, password_file)
        handler = _auth_handler(credentials)
        previous = {}
        if self._increments:
            previous = self._published_totals(url, timeout, credentials)
        registry = self.registry(with_identity_labels=False, previous_totals=previous)
        try:
            pushadd_to_gateway(url, job=self.job, registry=registry,
                               grouping_key={"kind": self.kind, "instance": self.instance},
                               timeout=timeout, handler=handler)
        except Exception as exc:  # urllib raises several unrelated types; none carry the password
            raise MetricsError("pushing metrics of job %s to %s failed: %s"
                               % (self.job, _redact_url(url), _describe(exc))) from None
        return self.identity

    def _published_totals(self, url, timeout, credentials):
        try:
            text = _http_get_text(url.rstrip("/") + "/metrics", timeout, credentials)
        except Exception as exc:
            raise MetricsError("reading the current metrics from %s failed (needed to continue the "
                               "counters): %s" % (_redact_url(url), _describe(exc))) from None
        return {name: previous_counter_value(text, name, self.identity) for name in self._increments}

    def write_textfile(self, path):
        """Merge the recorded metrics into a ``.prom`` file for node_exporter's textfile collector.

        The file is replaced atomically so the collector never reads a half-written file.
        Families recorded by earlier runs and not by this one are kept.
        """
        _require_client()
        if not str(path).endswith(".prom"):
            raise ConfigError("textfile collector files must end in .prom: %s" % path)
        old_text = ""
        try:
            with open(path, encoding="utf-8") as handle:
                old_text = handle.read()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise MetricsError("cannot read %s: %s" % (path, exc)) from None
        previous = {name: previous_counter_value(old_text, name, self.identity) for name in self._increments}
        new_text = self.exposition(with_identity_labels=True, previous_totals=previous).decode("utf-8")
        merged = merge_expositions(old_text, new_text)
        directory = os.path.dirname(os.path.abspath(path))
        try:
            handle, temp_path = tempfile.mkstemp(prefix=".backup-metrics-", suffix=".tmp", dir=directory)
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(merged)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp_path, 0o644)
            os.replace(temp_path, path)
        except OSError as exc:
            raise MetricsError("cannot write %s: %s" % (path, exc)) from None
        return path


class _RecordedCollector:
    """Yields one family per recorded metric; nothing for metrics the run did not record."""

    def __init__(self, metrics, previous_totals, with_identity_labels):
        self._metrics = metrics
        self._previous_totals = previous_totals
        self._labels = dict(metrics.identity) if with_identity_labels else {}

    def collect(self):
        names = list(self._metrics.recorded)
        label_names = list(self._labels)
        label_values = [self._labels[name] for name in label_names]
        for name in sorted(names):
            kind, help_text = METRICS[name]
            value = self._metrics.recorded[name]
            if name in LABELLED_METRICS:
                family = GaugeMetricFamily(name, help_text, labels=label_names + [LABELLED_METRICS[name]])
                for label_value, series_value in sorted(value.items()):
                    family.add_metric(label_values + [label_value], series_value)
                yield family
                continue
            if kind == COUNTER:
                family = CounterMetricFamily(name, help_text, labels=label_names)
                value += float(self._previous_totals.get(name) or 0.0)
            else:
                family = GaugeMetricFamily(name, help_text, labels=label_names)
            family.add_metric(label_values, value)
            yield family


def previous_counter_value(exposition_text, sample_name, identity):
    """The value of ``sample_name`` for the series whose labels include ``identity`` (0 if none)."""
    if not exposition_text:
        return 0.0
    _require_client()
    family_name = sample_name[:-len("_total")] if sample_name.endswith("_total") else sample_name
    for family in text_string_to_metric_families(exposition_text):
        if family.name not in (family_name, sample_name):
            continue
        for sample in family.samples:
            if sample.name == sample_name and _labels_match(sample.labels, identity):
                return float(sample.value)
    return 0.0


def _labels_match(labels, identity):
    return all(labels.get(key) == value for key, value in identity.items())


def merge_expositions(old_text, new_text):
    """Text of ``old_text`` with every family present in ``new_text`` replaced by the new one.

    Families are kept as text blocks (HELP, TYPE and samples) so nothing is re-formatted. Only
    files this module wrote are expected (one file per job), so a family is recognised by its
    ``# HELP`` line.
    """
    new_blocks = _split_families(new_text)
    merged = dict(_split_families(old_text))
    merged.update(new_blocks)
    return "".join(merged[name] for name in sorted(merged))


def _split_families(text):
    blocks = {}
    current = None
    for line in text.splitlines(keepends=True):
        if line.startswith("# HELP "):
            current = line.split()[2]
            blocks[current] = ""
        if current is None:
            continue  # stray lines before the first family: not written by us, dropped
        blocks[current] += line
    return blocks


# -- gateway helpers --------------------------------------------------------------------

def _check_gateway_url(gateway_url):
    parsed = urllib.parse.urlsplit(str(gateway_url or ""))
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError("pushgateway URL must be http(s)://host[:port][/path], got %r"
                          % _redact_url(str(gateway_url)))
    if parsed.username or parsed.password:
        raise ConfigError("do not put credentials in the pushgateway URL; use %s and %s or %s"
                          % (ENV_USERNAME, ENV_PASSWORD, ENV_PASSWORD_FILE))
    return str(gateway_url)


def _redact_url(url):
    parsed = urllib.parse.urlsplit(url)
    if parsed.password or parsed.username:
        netloc = parsed.hostname or ""
        if parsed.port:
            netloc += ":%d" % parsed.port
        parsed = parsed._replace(netloc="***@" + netloc)
    return urllib.parse.urlunsplit(parsed)


def _describe(exc):
    """A short reason for a failed HTTP call, without headers or bodies that might echo secrets."""
    code = getattr(exc, "code", None)
    if code is not None:
        return "HTTP %s %s" % (code, getattr(exc, "reason", "") or "")
    reason = getattr(exc, "reason", None)
    return str(reason if reason is not None else exc.__class__.__name__)


def resolve_credentials(username=None, password=None, password_file=None, environ=None):
    """(username, password) for basic auth, or None. Explicit values win over the environment."""
    environ = os.environ if environ is None else environ
    username = username or environ.get(ENV_USERNAME) or None
    if password is None and password_file is None:
        password = environ.get(ENV_PASSWORD) or None
        password_file = environ.get(ENV_PASSWORD_FILE) or None
    if password is None and password_file:
        password = read_secret_file(password_file, "metrics.password_file")
    if username is None and password is None:
        return None
    if username is None or password is None:
        raise ConfigError("pushgateway basic auth needs both a username and a password")
    return username, password


def _auth_handler(credentials):
    if credentials is None:
        return default_handler
    username, password = credentials

    def handler(url, method, timeout, headers, data):
        return basic_auth_handler(url, method, timeout, headers, data, username, password)
    return handler


def _http_get_text(url, timeout, credentials):
    request = urllib.request.Request(url, method="GET")
    if credentials is not None:
        token = base64.b64encode(("%s:%s" % credentials).encode("utf-8")).decode("ascii")
        request.add_header("Authorization", "Basic " + token)
    # A plain opener (no proxy or file handlers beyond urllib's defaults); the scheme was checked.
    with urllib.request.build_opener().open(request, timeout=timeout) as response:
        return response.read().decode("utf-8")


def metric_names():
    """Every sample name this module can emit (what dashboards and alerts may query)."""
    return frozenset(METRICS)
