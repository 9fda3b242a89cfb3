import datetime
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ansible_collections.biometrics.backup.plugins.module_utils.engine import metrics
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.metrics import BackupMetrics

T0 = 1_700_000_000


def samples(text):
    """{(sample name, frozenset(labels)): value} of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def values_by_name(text):
    return {name: value for (name, _labels), value in samples(text).items()}


def everything_recorded():
    m = BackupMetrics("pg-main", "postgres", "db1")
    m.record_backup_result(True, T0, duration_seconds=12.5, size_bytes=4096, size_change_ratio=1.25,
                           stored_new_bytes=512, repository_bytes=65536)
    m.record_backup_result(False, T0 + 1)
    m.record_schedule(interval_seconds=3600)
    m.record_verification(True, T0 + 2)
    m.record_verification(False, T0 + 3)
    m.record_drill(True, T0 + 4, duration_seconds=30)
    m.record_drill(False, T0 + 5)
    m.record_drill_phases({"verify": 4.0, "transfer": 20.5, "load": 3.0, "checks": 0.5, "total": 29.0})
    m.record_retention(kept=7, pruned=2, finished_at=T0 + 6)
    m.record_copy(True, T0 + 7, lag_seconds=0, bytes_copied=1234)
    m.record_copy(False, T0 + 8)
    m.record_wal_stream(True, reported_at=T0 + 9, last_archived_at=T0 + 8, lag_bytes=8192, lag_seconds=1.5,
                        segments_stored=3, window_start=T0 - 86400, window_end=T0 + 8)
    m.record_wal_gap(T0 + 10)
    return m


def test_every_declared_metric_is_emitted_with_its_type_and_identity_labels():
    text = everything_recorded().exposition().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    emitted = {s.name for f in families.values() for s in f.samples}
    assert emitted == metrics.metric_names()
    for family in families.values():
        sample_name = family.samples[0].name
        assert family.type == metrics.METRICS[sample_name][0]
        extra = metrics.LABELLED_METRICS.get(sample_name)
        for sample in family.samples:
            labels = dict(sample.labels)
            if extra:
                labels.pop(extra)
            assert labels == {"job": "pg-main", "kind": "postgres", "instance": "db1"}
    assert families["backup_retention_pruned"].type == "counter"


def test_drill_phases_are_one_series_per_phase_and_survive_a_textfile_merge(tmp_path):
    phases = {"select": 0.1, "verify": 4.0, "prepare": 0.2, "transfer": 20.5, "load": 3.0, "checks": 0.5,
              "total": 29.0}
    m = BackupMetrics("pg-main", "postgres", "db1")
    m.record_drill(True, T0, duration_seconds=30)
    m.record_drill_phases(phases)
    got = {labels: value for (name, labels), value in samples(m.exposition().decode()).items()
           if name == "backup_restore_drill_phase_seconds"}
    assert {dict(labels)["phase"]: value for labels, value in got.items()} == phases
    path = str(tmp_path / "drill.prom")
    m.write_textfile(path)
    later = BackupMetrics("pg-main", "postgres", "db1")
    later.record_drill(False, T0 + 60)   # a failed drill keeps the last good drill's phases
    later.write_textfile(path)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert text.count("backup_restore_drill_phase_seconds{") == len(phases)
    with pytest.raises(ConfigError):
        m.record_drill_phases({"verify": -1.0, "total": 1.0})
    with pytest.raises(ConfigError):
        m.record_drill_phases({"verify": 1.0})


def test_names_follow_prometheus_conventions():
    for name, (kind, help_text) in metrics.METRICS.items():
        assert name.startswith("backup_") and help_text
        assert name.endswith("_total") == (kind == metrics.COUNTER)
        if "timestamp" in name or "duration" in name or "interval" in name:
            assert name.endswith("_seconds")


def test_values_and_timestamps():
    finished = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    m = BackupMetrics("pg", "postgres", "db1")
    m.record_backup_result(True, finished, duration_seconds=1.5, size_bytes=10, size_change_ratio=float("inf"))
    values = values_by_name(m.exposition().decode())
    assert values["backup_last_success_timestamp_seconds"] == finished.timestamp()
    assert values["backup_duration_seconds"] == 1.5
    assert values["backup_size_bytes"] == 10
    assert values["backup_size_change_ratio"] == float("inf")
    naive = datetime.datetime(2024, 1, 2, 3, 4, 5)
    assert metrics.unix_time(naive) == finished.timestamp()
    assert "backup_stored_new_bytes" not in values and "backup_repository_size_bytes" not in values
    m.record_backup_result(True, finished, size_bytes=1000, stored_new_bytes=37, repository_bytes=5000)
    values = values_by_name(m.exposition().decode())
    assert (values["backup_stored_new_bytes"], values["backup_repository_size_bytes"]) == (37, 5000)
    with pytest.raises(ConfigError):
        m.record_backup_result(True, finished, stored_new_bytes=-1)


def test_failure_records_only_the_failure_timestamp():
    m = BackupMetrics("pg", "postgres", "db1")
    m.record_backup_result(False, T0, duration_seconds=3, size_bytes=5)
    assert m.recorded == {"backup_last_failure_timestamp_seconds": float(T0)}
    d = BackupMetrics("pg", "postgres", "db1")
    d.record_drill(False, T0, duration_seconds=9)
    assert d.recorded == {"backup_restore_drill_last_failure_timestamp_seconds": float(T0)}


def test_size_ratio_of_a_failed_run_is_recorded_on_its_own():
    m = BackupMetrics("pg", "postgres", "db1")
    m.record_backup_result(False, T0)
    m.record_size_change_ratio(0.05)
    m.record_size_change_ratio(None)
    assert m.recorded == {"backup_last_failure_timestamp_seconds": float(T0), "backup_size_change_ratio": 0.05}
    with pytest.raises(ConfigError):
        m.record_size_change_ratio(-1)


def test_push_exposition_leaves_identity_to_the_grouping_key():
    text = everything_recorded().exposition(with_identity_labels=False).decode()
    assert all(labels == frozenset() or (name in metrics.LABELLED_METRICS and len(labels) == 1)
               for (name, labels) in samples(text))


def test_counter_adds_this_runs_pruned_count_to_the_published_total():
    m = BackupMetrics("pg", "postgres", "db1")
    m.record_retention(kept=3, pruned=2, finished_at=T0)
    m.record_retention(kept=3, pruned=1, finished_at=T0 + 1)
    assert values_by_name(m.exposition(previous_pruned_total=10).decode())["backup_retention_pruned_total"] == 13
    published = (
        '# TYPE backup_retention_pruned_total counter\n'
        'backup_retention_pruned_total{instance="db1",job="pg",kind="postgres"} 10\n'
        'backup_retention_pruned_total{instance="db2",job="pg",kind="postgres"} 99\n')
    assert metrics.previous_counter_value(published, "backup_retention_pruned_total", m.identity) == 10
    other = BackupMetrics("pg", "postgres", "db3")
    assert metrics.previous_counter_value(published, "backup_retention_pruned_total", other.identity) == 0


@pytest.mark.parametrize("call", [
    lambda m: m.record_backup_result(True, T0, duration_seconds=-1),
    lambda m: m.record_backup_result(True, T0, size_bytes=float("nan")),
    lambda m: m.record_backup_result(True, "yesterday"),
    lambda m: m.record_retention(kept=1.5, pruned=0, finished_at=T0),
    lambda m: m.record_retention(kept=1, pruned=-2, finished_at=T0),
    lambda m: m.record_schedule(),
    lambda m: m.record_schedule(interval_seconds=0),
    lambda m: m.record_schedule(interval_seconds=60, cron_expression="* * * * *"),
    lambda m: m.record_schedule(cron_expression="not a cron"),
])
def test_invalid_values_are_rejected(call):
    with pytest.raises(ConfigError):
        call(BackupMetrics("pg", "postgres", "db1"))


def test_identity_must_be_non_empty():
    with pytest.raises(ConfigError):
        BackupMetrics("", "postgres", "db1")


@pytest.mark.parametrize("cron, expected", [
    ("0 2 * * *", 86400),
    ("*/15 * * * *", 900),
    ("0 2 * * 1-5", 3 * 86400),      # Friday to Monday is the longest gap
    ("0 3 * * 0", 7 * 86400),
])
def test_schedule_interval_is_the_longest_gap(cron, expected):
    assert metrics.schedule_interval_seconds(cron) == expected


def test_textfile_merges_with_previous_runs_and_continues_the_counter(tmp_path):
    path = str(tmp_path / "backup_pg.prom")
    first = BackupMetrics("pg", "postgres", "db1")
    first.record_backup_result(True, T0, duration_seconds=5, size_bytes=100)
    first.record_retention(kept=4, pruned=3, finished_at=T0)
    first.write_textfile(path)

    second = BackupMetrics("pg", "postgres", "db1")
    second.record_backup_result(False, T0 + 3600)
    second.record_retention(kept=4, pruned=2, finished_at=T0 + 3600)
    second.write_textfile(path)

    with open(path, encoding="utf-8") as handle:
        values = values_by_name(handle.read())
    assert values["backup_last_success_timestamp_seconds"] == T0           # kept from run one
    assert values["backup_last_failure_timestamp_seconds"] == T0 + 3600
    assert values["backup_size_bytes"] == 100
    assert values["backup_retention_pruned_total"] == 5
    assert values["backup_retention_last_run_timestamp_seconds"] == T0 + 3600
    assert os.listdir(tmp_path) == ["backup_pg.prom"]   # no temp file left
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_textfile_needs_prom_suffix(tmp_path):
    with pytest.raises(ConfigError):
        everything_recorded().write_textfile(str(tmp_path / "x.txt"))


def test_credentials_from_arguments_env_and_file(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cr3t\n")
    env = {metrics.ENV_USERNAME: "pusher", metrics.ENV_PASSWORD_FILE: str(secret)}
    assert metrics.resolve_credentials(environ=env) == ("pusher", "s3cr3t")
    env_plain = {metrics.ENV_USERNAME: "u", metrics.ENV_PASSWORD: "p"}
    assert metrics.resolve_credentials(environ=env_plain) == ("u", "p")
    assert metrics.resolve_credentials("a", "b", environ=env) == ("a", "b")
    assert metrics.resolve_credentials(environ={}) is None
    with pytest.raises(ConfigError):
        metrics.resolve_credentials(environ={metrics.ENV_USERNAME: "only-user"})
    with pytest.raises(ConfigError) as err:
        metrics.resolve_credentials("u", password_file=str(tmp_path / "missing"), environ={})
    assert "missing" in str(err.value)


def test_gateway_url_with_credentials_is_refused_without_echoing_them():
    m = everything_recorded()
    with pytest.raises(ConfigError) as err:
        m.push("http://user:hunter2@127.0.0.1:9091")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError):
        m.push("ftp://127.0.0.1:9091")


def test_wal_stream_report_values_and_counters_continue():
    m = BackupMetrics("pg-wal", "postgres_base", "db1")
    m.record_wal_stream(True, reported_at=T0, last_archived_at=T0 - 2, lag_bytes=0, lag_seconds=0,
                        segments_stored=2, window_start=T0 - 3600, window_end=T0 - 2)
    values = values_by_name(m.exposition(previous_totals={"backup_wal_segments_stored_total": 40}).decode())
    assert values["backup_wal_stream_up"] == 1
    assert values["backup_wal_stream_heartbeat_timestamp_seconds"] == T0
    assert values["backup_wal_last_archived_timestamp_seconds"] == T0 - 2
    assert values["backup_wal_segments_stored_total"] == 42
    assert values["backup_wal_recovery_window_start_timestamp_seconds"] == T0 - 3600
    assert "backup_wal_gaps_total" not in values and "backup_wal_last_gap_timestamp_seconds" not in values
    # a report without new segments does not touch the counter; a gap stops the stream
    quiet = BackupMetrics("pg-wal", "postgres_base", "db1")
    quiet.record_wal_stream(True, reported_at=T0 + 10)
    assert "backup_wal_segments_stored_total" not in quiet.recorded
    quiet.record_wal_gap(T0 + 11)
    values = values_by_name(quiet.exposition(previous_totals={"backup_wal_gaps_total": 1}).decode())
    assert values["backup_wal_gaps_total"] == 2 and values["backup_wal_stream_up"] == 0
    assert values["backup_wal_last_gap_timestamp_seconds"] == T0 + 11
    with pytest.raises(ConfigError):
        quiet.record_wal_stream(True, lag_bytes=-1)
