"""engine/timeutil: the manifest time format and backup ids."""

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ansible_collections.biometrics.backup.plugins.module_utils.engine import timeutil
from ansible_collections.biometrics.backup.plugins.module_utils.engine.timeutil import (
    UTC, is_backup_id, new_backup_id, parse_iso, to_iso)

aware_times = st.datetimes(
    min_value=datetime.datetime(1971, 1, 1), max_value=datetime.datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, datetime.timezone(datetime.timedelta(hours=5, minutes=30)),
                               datetime.timezone(datetime.timedelta(hours=-8))]))


def test_to_iso_is_utc_with_z_and_whole_seconds():
    moment = datetime.datetime(2024, 1, 15, 3, 4, 5, 987654, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    assert to_iso(moment) == "2024-01-15T01:04:05Z"


@given(aware_times)
def test_to_iso_then_parse_iso_is_the_same_instant_to_the_second(moment):
    back = parse_iso(to_iso(moment))
    assert back.tzinfo is not None
    assert back == moment.replace(microsecond=0)


@pytest.mark.parametrize("text, expected", [
    ("2024-01-15T02:00:00Z", datetime.datetime(2024, 1, 15, 2, 0, tzinfo=UTC)),
    ("2024-01-15T02:00:00z", datetime.datetime(2024, 1, 15, 2, 0, tzinfo=UTC)),
    ("2024-01-15T04:00:00+02:00", datetime.datetime(2024, 1, 15, 2, 0, tzinfo=UTC)),
    ("2024-01-15T02:00:00", datetime.datetime(2024, 1, 15, 2, 0, tzinfo=UTC)),  # naive = UTC
    ("2024-01-15T02:00:00.250Z", datetime.datetime(2024, 1, 15, 2, 0, 0, 250000, tzinfo=UTC)),
    ("  2024-01-15T02:00:00Z ", datetime.datetime(2024, 1, 15, 2, 0, tzinfo=UTC)),
])
def test_parse_iso_accepts_the_usual_spellings(text, expected):
    parsed = parse_iso(text)
    assert parsed == expected
    assert parsed.utcoffset() == datetime.timedelta(0)


def test_parse_iso_passes_datetimes_through_as_utc():
    naive = datetime.datetime(2024, 5, 1, 12, 0)
    assert parse_iso(naive) == datetime.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    other = datetime.datetime(2024, 5, 1, 14, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    assert parse_iso(other).tzinfo == UTC and parse_iso(other).hour == 12


@pytest.mark.parametrize("text", ["", "yesterday", "2024-13-01T00:00:00Z", "None", None, "2024-01-15T25:00:00Z"])
def test_parse_iso_rejects_junk_with_value_error_naming_it(text):
    with pytest.raises(ValueError, match="not an ISO-8601 timestamp"):
        parse_iso(text)


def test_backup_id_format_and_recognition():
    moment = datetime.datetime(2024, 1, 15, 2, 3, 4, tzinfo=UTC)
    backup_id = new_backup_id(moment)
    assert backup_id.startswith("20240115T020304Z-")
    assert is_backup_id(backup_id)
    for junk in ("", None, "20240115T020304Z", "20240115T020304Z-ABCDEF", "20240115T020304Z-abcdefg",
                 "index.json", "../20240115T020304Z-abcdef"):
        assert not is_backup_id(junk)


def test_backup_id_uses_utc_even_for_other_offsets():
    moment = datetime.datetime(2024, 1, 15, 3, 0, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    assert new_backup_id(moment).startswith("20240115T020000Z-")


def test_backup_ids_started_at_the_same_instant_still_differ():
    moment = timeutil.utc_now()
    ids = [new_backup_id(moment) for dummy in range(200)]
    assert all(is_backup_id(i) for i in ids)
    # 16 random bits within one 1/256 s: ~0.3 collisions expected among 200 draws.
    assert len(set(ids)) >= 190


@given(st.lists(st.integers(min_value=0, max_value=999999), min_size=2, max_size=20, unique=True))
def test_ids_within_one_second_sort_in_start_order(microseconds):
    """'latest' relies on this: manifest times have whole seconds only."""
    base = datetime.datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    moments = sorted(base.replace(microsecond=us) for us in microseconds)
    ids = [new_backup_id(m) for m in moments]
    for (m1, id1), (m2, id2) in zip(zip(moments, ids), zip(moments[1:], ids[1:])):
        # Same 1/256 s bucket: order undefined (random part); otherwise strictly ordered.
        if m1.microsecond * 256 // 1000000 != m2.microsecond * 256 // 1000000:
            assert id1 < id2
