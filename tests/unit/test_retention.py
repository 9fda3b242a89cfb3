# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""engine/retention.py: worked examples of both semantics, validation, time zones, and
Hypothesis properties (newest kept, idempotence, monotonicity, an independent model of
restic's rules). The differential tests against the real tools are in
tests/integration/test_retention_reference.py."""

import datetime
import itertools

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.retention import (
    COUNT_RULES, Backup, Duration, Policy, RetentionError, apply_policy, backups_from_items,
    evaluate)

UTC = datetime.timezone.utc


def kept(result):
    return [b.key for b in result.keep]


def ten_days_twice_a_day():
    return ["2024-01-%02dT%02d:00:00Z" % (day, hour) for day in range(1, 11) for hour in (3, 15)]


# -- worked examples ---------------------------------------------------------------------

def test_borg_rules_run_in_order_and_used_up_periods_do_not_count():
    result = evaluate(ten_days_twice_a_day(), keep_last=2, keep_daily=3, keep_weekly=2,
                      keep_monthly=3, semantics="borg")
    # last takes both backups of 10 Jan, so daily starts with 9 Jan. Both ISO weeks (2: 8-10 Jan,
    # 1: 1-7 Jan) have their newest backup kept already: weekly counts nothing, runs out and
    # keeps the oldest backup. Monthly finds January used up and the oldest already kept.
    assert [(b.key, result.reasons[b.key]) for b in result.keep] == [
        ("2024-01-10T15:00:00Z", ["last #1"]),
        ("2024-01-10T03:00:00Z", ["last #2"]),
        ("2024-01-09T15:00:00Z", ["daily #1"]),
        ("2024-01-08T15:00:00Z", ["daily #2"]),
        ("2024-01-07T15:00:00Z", ["daily #3"]),
        ("2024-01-01T03:00:00Z", ["weekly #1 (oldest, rule not filled)"]),
    ]
    assert len(result.prune) == 20 - 6
    assert [b.key for b in result.prune][:2] == ["2024-01-09T03:00:00Z", "2024-01-08T03:00:00Z"]


def test_restic_rules_are_independent_and_one_snapshot_serves_several():
    result = evaluate(ten_days_twice_a_day(), keep_last=2, keep_daily=3, keep_weekly=2,
                      keep_monthly=3, semantics="restic")
    assert [(b.key, result.reasons[b.key]) for b in result.keep] == [
        ("2024-01-10T15:00:00Z", ["last #1", "daily #1", "weekly #1", "monthly #1"]),
        ("2024-01-10T03:00:00Z", ["last #2"]),
        ("2024-01-09T15:00:00Z", ["daily #2"]),
        ("2024-01-08T15:00:00Z", ["daily #3"]),
        ("2024-01-07T15:00:00Z", ["weekly #2"]),
    ]


def test_borg_keeps_oldest_only_when_a_rule_runs_out():
    backups = ["2024-03-01T10:00:00Z", "2024-03-02T10:00:00Z", "2024-03-03T10:00:00Z"]
    assert kept(evaluate(backups, keep_daily=2)) == backups[:0:-1]
    result = evaluate(backups, keep_daily=5)
    assert kept(result) == backups[::-1]
    assert result.reasons["2024-03-01T10:00:00Z"] == ["daily #3"]  # a real period, not a fallback
    two_a_day = ["2024-03-01T10:00:00Z", "2024-03-01T11:00:00Z", "2024-03-02T10:00:00Z"]
    result = evaluate(two_a_day, keep_daily=5)
    assert result.reasons["2024-03-01T10:00:00Z"] == ["daily #3 (oldest, rule not filled)"]
    # restic 0.14 has no such fallback.
    assert kept(evaluate(two_a_day, keep_daily=5, semantics="restic")) == [
        "2024-03-02T10:00:00Z", "2024-03-01T11:00:00Z"]


def test_unlimited_keeps_every_period_and_never_falls_back():
    two_a_day = ["2024-03-01T10:00:00Z", "2024-03-01T11:00:00Z", "2024-03-02T10:00:00Z"]
    for semantics in ("borg", "restic"):
        result = evaluate(two_a_day, keep_daily=-1, semantics=semantics)
        assert kept(result) == ["2024-03-02T10:00:00Z", "2024-03-01T11:00:00Z"]


def test_borg_last_is_secondly_but_restic_last_counts_snapshots():
    same_second = ["2024-03-01T10:00:00.100000Z", "2024-03-01T10:00:00.900000Z", "2024-03-01T09:00:00Z"]
    assert kept(evaluate(same_second, keep_last=2, semantics="borg")) == [
        "2024-03-01T10:00:00.900000Z", "2024-03-01T09:00:00Z"]
    assert kept(evaluate(same_second, keep_last=2, semantics="restic")) == [
        "2024-03-01T10:00:00.900000Z", "2024-03-01T10:00:00.100000Z"]


def test_borg_within_counts_from_the_newest_backup_and_uses_up_periods():
    backups = ["2024-03-%02dT12:00:00Z" % day for day in range(1, 11)]
    result = evaluate(backups, keep_within="3d", keep_daily=2)
    # within 3 days of 10 Mar 12:00 (strictly after 7 Mar 12:00): 8, 9, 10 Mar.
    assert [(b.key, result.reasons[b.key]) for b in result.keep] == [
        ("2024-03-10T12:00:00Z", ["within 3d"]),
        ("2024-03-09T12:00:00Z", ["within 3d"]),
        ("2024-03-08T12:00:00Z", ["within 3d"]),
        ("2024-03-07T12:00:00Z", ["daily #1"]),
        ("2024-03-06T12:00:00Z", ["daily #2"]),
    ]
    # borg's own reference point (the clock) is available explicitly.
    late = datetime.datetime(2024, 3, 12, 12, tzinfo=UTC)
    result = evaluate(backups, within_reference=late, keep_within="3d", keep_daily=1)
    assert kept(result) == ["2024-03-10T12:00:00Z", "2024-03-09T12:00:00Z"]


def test_borg_within_months_are_31_days_restic_months_are_calendar_months():
    newest = "2024-03-31T12:00:00Z"
    older = ["2024-03-01T12:00:00Z", "2024-03-02T12:00:00Z", "2024-03-03T12:00:00Z", "2024-02-29T13:00:00Z"]
    backups = [newest] + older
    # borg: 31 days before 31 Mar 12:00 is 29 Feb 12:00, so 29 Feb 13:00 is within.
    assert set(kept(evaluate(backups, keep_within="1m", semantics="borg"))) == set(backups)
    # restic: Go's AddDate(0, -1, 0) on 31 Mar gives "31 Feb" = 2 Mar (2024 is a leap year);
    # strictly after 2 Mar 12:00 leaves 3 Mar and 31 Mar.
    assert kept(evaluate(backups, keep_within="1m", semantics="restic")) == [
        "2024-03-31T12:00:00Z", "2024-03-03T12:00:00Z"]


def test_restic_within_ignores_future_snapshots_when_finding_the_newest():
    now = datetime.datetime(2024, 6, 1, tzinfo=UTC)
    backups = ["2030-01-01T00:00:00Z", "2024-05-30T00:00:00Z", "2024-05-20T00:00:00Z"]
    result = evaluate(backups, now=now, keep_within="2d", semantics="restic")
    assert kept(result) == ["2030-01-01T00:00:00Z", "2024-05-30T00:00:00Z"]
    only_future = evaluate(backups[:1], now=now, keep_within="2d", semantics="restic")
    assert kept(only_future) == ["2030-01-01T00:00:00Z"]


def test_restic_within_hours_and_days_combined():
    newest = datetime.datetime(2024, 3, 10, 12, tzinfo=UTC)
    backups = [newest - datetime.timedelta(hours=h) for h in (0, 25, 26, 27)]
    result = evaluate(backups, keep_within="1d2h", semantics="restic")
    # cutoff: newest - 1 day - 2 h = 26 h before; strictly after it.
    assert [b.timestamp for b in result.keep] == backups[:2]


# -- time zones and calendar edges ---------------------------------------------------------

def test_days_are_local_days_of_the_timezone():
    backups = ["2024-01-01T22:30:00Z", "2024-01-01T23:30:00Z"]
    # UTC: one day, one kept. Berlin (UTC+1): 23:30 and 00:30 fall on two different days.
    assert kept(evaluate(backups, keep_daily=5, semantics="restic")) == ["2024-01-01T23:30:00Z"]
    assert kept(evaluate(backups, keep_daily=5, semantics="restic", timezone="Europe/Berlin")) == [
        "2024-01-01T23:30:00Z", "2024-01-01T22:30:00Z"]


def test_iso_weeks_span_new_year():
    # 2020-12-31 (Thu) and 2021-01-03 (Sun) are both in ISO week 2020-W53; 2021-01-04 starts W01.
    backups = ["2020-12-28T10:00:00Z", "2020-12-31T10:00:00Z", "2021-01-03T10:00:00Z", "2021-01-04T10:00:00Z"]
    assert kept(evaluate(backups, keep_weekly=5, semantics="restic")) == [
        "2021-01-04T10:00:00Z", "2021-01-03T10:00:00Z"]
    # Years are calendar years, not ISO years.
    assert kept(evaluate(backups, keep_yearly=5, semantics="restic")) == [
        "2021-01-04T10:00:00Z", "2020-12-31T10:00:00Z"]


def test_leap_day_and_month_ends():
    backups = ["2024-02-28T23:00:00Z", "2024-02-29T01:00:00Z", "2024-02-29T23:00:00Z", "2024-03-01T00:30:00Z"]
    assert kept(evaluate(backups, keep_daily=10, semantics="restic")) == [
        "2024-03-01T00:30:00Z", "2024-02-29T23:00:00Z", "2024-02-28T23:00:00Z"]
    assert kept(evaluate(backups, keep_monthly=10, semantics="restic")) == [
        "2024-03-01T00:30:00Z", "2024-02-29T23:00:00Z"]
    # In New York (UTC-5) 1 Mar 00:30Z is still 29 Feb.
    assert kept(evaluate(backups, keep_monthly=10, semantics="restic", timezone="America/New_York")) == [
        "2024-03-01T00:30:00Z"]


def test_hours_during_dst_change_follow_the_wall_clock():
    # Berlin leaves DST on 2023-10-29: 02:30 CEST (00:30Z) and 02:30 CET (01:30Z) are the
    # same wall-clock hour, and 02:10 CET (01:10Z) sits between them in that hour.
    backups = ["2023-10-29T00:30:00Z", "2023-10-29T01:10:00Z", "2023-10-29T01:30:00Z"]
    result = evaluate(backups, keep_hourly=10, semantics="restic", timezone="Europe/Berlin")
    assert kept(result) == ["2023-10-29T01:30:00Z"]


def test_input_order_and_offsets_do_not_matter():
    backups = ["2024-01-03T00:00:00+02:00", "2024-01-01T12:00:00Z", "2024-01-02T12:00:00-05:00"]
    # 3 Jan 00:00+02:00 is 2 Jan 22:00Z, the newest; 2 Jan 12:00-05:00 is 2 Jan 17:00Z, the
    # same UTC day; 1 Jan is the second day.
    result = evaluate(backups, keep_daily=2, semantics="borg")
    assert kept(result) == ["2024-01-03T00:00:00+02:00", "2024-01-01T12:00:00Z"]
    assert [b.key for b in result.prune] == ["2024-01-02T12:00:00-05:00"]


# -- input and policy validation --------------------------------------------------------------

def test_items_are_returned_unchanged_and_named_by_id():
    items = [{"id": "b1", "timestamp": "2024-01-01T00:00:00Z", "size": 3},
             {"id": 7, "timestamp": "2024-01-02T00:00:00Z"},
             "2024-01-03T00:00:00Z",
             datetime.datetime(2024, 1, 4, tzinfo=UTC),
             datetime.date(2024, 1, 5)]
    result = evaluate(items, keep_daily=2)
    assert [b.item for b in result.keep] == [items[4], items[3]]
    assert result.keep[0].item is items[4]
    assert set(result.reasons) == {"2024-01-05", "2024-01-04T00:00:00+00:00"}
    assert [b.key for b in result.prune] == ["2024-01-03T00:00:00Z", "7", "b1"]
    assert result.prune[2].item is items[0]


@pytest.mark.parametrize("items, fragment", [
    (["2024-01-01T00:00:00Z", "last tuesday"], "'last tuesday'"),
    ([{"id": "x"}], "has no 'timestamp'"),
    ([{"id": "a", "timestamp": "2024-01-01"}, {"id": "a", "timestamp": "2024-01-02"}], "duplicate backup id 'a'"),
    (["2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z"], "duplicate backup '2024-01-01T00:00:00Z'"),
    ([42], "42"),
    ([{"id": "n", "timestamp": None}], "'n'"),
])
def test_invalid_items_name_the_offender(items, fragment):
    with pytest.raises(RetentionError) as info:
        evaluate(items, keep_daily=1)
    assert fragment in str(info.value)
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("options, fragment", [
    ({"keep_daily": -2}, "keep_daily must be >= 0 or -1"),
    ({"keep_weekly": "many"}, "keep_weekly must be an integer"),
    ({"keep_monthly": True}, "keep_monthly must be an integer"),
    ({"keep_yearly": 1.5}, "keep_yearly must be an integer"),
    ({"keep_daily": 1, "semantics": "zfs"}, "semantics 'zfs' is unknown"),
    ({"keep_daily": 1, "timezone": "Mars/Olympus"}, "timezone 'Mars/Olympus'"),
    ({"keep_daily": 1, "timezone": "../etc"}, "timezone '../etc'"),
    ({}, "keeps nothing"),
    ({"keep_daily": 0, "keep_last": 0}, "keeps nothing"),
    ({"keep_within": "7 days"}, "keep_within '7 days' is not a duration"),
    ({"keep_within": "1y1y"}, "repeats the unit"),
    ({"keep_within": "0d"}, "is zero"),
])
def test_invalid_policies_are_explained(options, fragment):
    with pytest.raises(RetentionError) as info:
        Policy(**options)
    assert fragment in str(info.value)


def test_policy_accepts_numeric_strings_and_none():
    policy = Policy(keep_daily="30", keep_weekly=None, keep_yearly="-1", semantics=None, timezone=None)
    assert policy.as_dict() == {"keep_last": 0, "keep_hourly": 0, "keep_daily": 30, "keep_weekly": 0,
                                "keep_monthly": 0, "keep_yearly": -1, "keep_within": None,
                                "semantics": "borg", "timezone": "UTC"}


@pytest.mark.parametrize("text, parts, borg_hours", [
    ("36h", (0, 0, 0, 36), 36),
    ("36H", (0, 0, 0, 36), 36),
    ("7d", (0, 0, 7, 0), 168),
    ("2w", (0, 0, 14, 0), 336),
    ("6m", (0, 6, 0, 0), 6 * 31 * 24),
    ("1y", (1, 0, 0, 0), 365 * 24),
    ("1y6m2d5h", (1, 6, 2, 5), (365 + 6 * 31 + 2) * 24 + 5),
])
def test_durations(text, parts, borg_hours):
    duration = Duration(text)
    assert (duration.years, duration.months, duration.days, duration.hours) == parts
    assert duration.borg_hours() == borg_hours
    assert str(duration) == text


def test_empty_list_keeps_and_prunes_nothing():
    result = evaluate([], keep_daily=3)
    assert (result.keep, result.prune, result.reasons) == ([], [], {})


# -- properties --------------------------------------------------------------------------------

START = datetime.datetime(2019, 12, 20, tzinfo=UTC)
ZONES = ["UTC", "Europe/Berlin", "America/St_Johns", "Australia/Lord_Howe", "Pacific/Kiritimati"]


@st.composite
def histories(draw, max_size=60):
    """Backups with gaps from seconds to months: several a day, long pauses, year ends."""
    gaps = draw(st.lists(st.one_of(
        st.integers(1, 3600),                 # several per hour
        st.integers(3600, 86400 * 2),         # daily-ish
        st.integers(86400 * 2, 86400 * 120),  # long gaps, sparse years
    ), min_size=1, max_size=max_size))
    moments, moment = [], START + datetime.timedelta(seconds=draw(st.integers(0, 86400 * 30)))
    for gap in gaps:
        moment += datetime.timedelta(seconds=gap)
        moments.append(moment)
    order = draw(st.permutations(range(len(moments))))
    return [Backup("b%04d" % i, moments[i]) for i in order]


counts = st.one_of(st.just(0), st.integers(1, 8), st.just(-1))


@st.composite
def policies(draw, semantics=None):
    options = {"keep_" + rule: draw(counts) for rule in COUNT_RULES}
    if draw(st.booleans()) and draw(st.booleans()):
        options["keep_within"] = draw(st.sampled_from(["12h", "3d", "2w", "1m", "1y", "1m3d4h"]))
    if not any(options.values()):
        options["keep_daily"] = draw(st.integers(1, 5))
    options["semantics"] = semantics or draw(st.sampled_from(["borg", "restic"]))
    options["timezone"] = draw(st.sampled_from(ZONES))
    return options


NOW = datetime.datetime(2035, 1, 1, tzinfo=UTC)  # after every generated backup


@settings(max_examples=300)
@given(histories(), policies())
def test_newest_is_always_kept_and_sets_partition_the_input(backups, options):
    result = apply_policy(backups, Policy(**options), now=NOW)
    newest = max(backups, key=lambda b: b.timestamp)
    assert result.keep[0].timestamp == newest.timestamp
    keys = [b.key for b in result.keep] + [b.key for b in result.prune]
    assert sorted(keys) == sorted(b.key for b in backups)
    assert set(result.reasons) == {b.key for b in result.keep}
    for part in (result.keep, result.prune):
        stamps = [b.timestamp for b in part]
        assert stamps == sorted(stamps, reverse=True)
    if options["semantics"] == "borg":
        assert all(len(why) == 1 for why in result.reasons.values())


@settings(max_examples=300)
@given(histories(), policies())
def test_applying_the_policy_again_prunes_nothing_more(backups, options):
    policy = Policy(**options)
    first = apply_policy(backups, policy, now=NOW)
    second = apply_policy(first.keep, policy, now=NOW)
    assert second.prune == []
    assert [b.key for b in second.keep] == [b.key for b in first.keep]


@settings(max_examples=300)
@given(histories(), policies(), st.sampled_from(COUNT_RULES), st.integers(1, 4))
def test_a_larger_count_never_keeps_less(backups, options, rule, more):
    name = "keep_" + rule
    smaller = apply_policy(backups, Policy(**options), now=NOW)
    larger_count = -1 if options[name] == -1 else options[name] + more
    larger = apply_policy(backups, Policy(**dict(options, **{name: larger_count})), now=NOW)
    assert {b.key for b in smaller.keep} <= {b.key for b in larger.keep}
    unlimited = apply_policy(backups, Policy(**dict(options, **{name: -1})), now=NOW)
    if options["semantics"] == "restic":
        assert {b.key for b in larger.keep} <= {b.key for b in unlimited.keep}
    else:
        # borg: -1 never runs out, so it never keeps the oldest backup as a fallback; a
        # finite count that runs out may. Apart from that fallback, -1 keeps at least as much.
        oldest = min(backups, key=lambda b: (b.timestamp, ))
        assert {b.key for b in larger.keep} - {oldest.key} <= {b.key for b in unlimited.keep}


def _restic_model(backups, counts_by_rule, zone):
    """restic's count rules said differently: per rule, the newest backup of each of the N
    newest periods (periods grouped, not walked). Valid where the wall clock never runs
    backwards, so the test uses zones without DST here."""
    from zoneinfo import ZoneInfo
    tz = UTC if zone == "UTC" else ZoneInfo(zone)
    ordered = sorted(backups, key=lambda b: b.timestamp, reverse=True)
    period = {
        "hourly": lambda t: (t.year, t.month, t.day, t.hour),
        "daily": lambda t: (t.year, t.month, t.day),
        "weekly": lambda t: tuple(t.isocalendar())[:2],
        "monthly": lambda t: (t.year, t.month),
        "yearly": lambda t: t.year,
    }
    reasons = {}
    for rule in COUNT_RULES:
        count = counts_by_rule[rule]
        if not count:
            continue
        if rule == "last":
            heads = ordered
        else:
            groups = {}
            for backup in ordered:
                groups.setdefault(period[rule](backup.timestamp.astimezone(tz)), []).append(backup)
            heads = sorted((members[0] for members in groups.values()),
                           key=lambda b: b.timestamp, reverse=True)
        chosen = heads if count == -1 else heads[:count]
        for number, backup in enumerate(chosen, 1):
            reasons.setdefault(backup.key, []).append("%s #%d" % (rule, number))
    return reasons


@settings(max_examples=300)
@given(histories(), policies(semantics="restic"), st.sampled_from(["UTC", "Asia/Kolkata", "Pacific/Kiritimati"]))
def test_restic_semantics_match_an_independent_model(backups, options, zone):
    assume(len({b.timestamp for b in backups}) == len(backups))
    options = dict(options, timezone=zone)
    options.pop("keep_within", None)
    if not any(options.get("keep_" + rule) for rule in COUNT_RULES):
        options["keep_daily"] = 1
    result = apply_policy(backups, Policy(**options), now=NOW)
    counts_by_rule = {rule: options.get("keep_" + rule, 0) for rule in COUNT_RULES}
    assert result.reasons == _restic_model(backups, counts_by_rule, zone)


def _borg_model(backups, counts_by_rule, zone):
    """borg's rules said differently: a rule counts the N newest periods whose newest backup
    no earlier rule kept; when there are fewer, it also takes the oldest backup."""
    from zoneinfo import ZoneInfo
    tz = UTC if zone == "UTC" else ZoneInfo(zone)
    ordered = sorted(backups, key=lambda b: b.timestamp, reverse=True)
    period = {
        "last": lambda t: (t.year, t.month, t.day, t.hour, t.minute, t.second),
        "hourly": lambda t: (t.year, t.month, t.day, t.hour),
        "daily": lambda t: (t.year, t.month, t.day),
        "weekly": lambda t: tuple(t.isocalendar())[:2],
        "monthly": lambda t: (t.year, t.month),
        "yearly": lambda t: t.year,
    }
    reasons = {}
    for rule in COUNT_RULES:
        count = counts_by_rule[rule]
        if not count:
            continue
        groups = {}
        for backup in ordered:
            groups.setdefault(period[rule](backup.timestamp.astimezone(tz)), []).append(backup)
        heads = sorted((members[0] for members in groups.values()), key=lambda b: b.timestamp, reverse=True)
        fresh = [head for head in heads if head.key not in reasons]
        chosen = fresh if count == -1 else fresh[:count]
        for number, backup in enumerate(chosen, 1):
            reasons[backup.key] = ["%s #%d" % (rule, number)]
        if count != -1 and len(chosen) < count and ordered[-1].key not in reasons:
            reasons[ordered[-1].key] = ["%s #%d (oldest, rule not filled)" % (rule, len(chosen) + 1)]
    return reasons


@settings(max_examples=300)
@given(histories(), policies(semantics="borg"), st.sampled_from(["UTC", "Asia/Kolkata", "Pacific/Kiritimati"]))
def test_borg_semantics_match_an_independent_model(backups, options, zone):
    assume(len({b.timestamp for b in backups}) == len(backups))
    options = dict(options, timezone=zone)
    options.pop("keep_within", None)
    if not any(options.get("keep_" + rule) for rule in COUNT_RULES):
        options["keep_daily"] = 1
    result = apply_policy(backups, Policy(**options), now=NOW)
    counts_by_rule = {rule: options.get("keep_" + rule, 0) for rule in COUNT_RULES}
    assert result.reasons == _borg_model(backups, counts_by_rule, zone)


def test_models_agree_with_the_engine_on_the_worked_example():
    # Guards the models themselves: on the worked example both match the hand-derived result.
    backups = backups_from_items(ten_days_twice_a_day())
    counts_by_rule = dict.fromkeys(COUNT_RULES, 0)
    counts_by_rule.update(last=2, daily=3, weekly=2, monthly=3)
    assert _borg_model(backups, counts_by_rule, "UTC")["2024-01-01T03:00:00Z"] == [
        "weekly #1 (oldest, rule not filled)"]
    assert _restic_model(backups, counts_by_rule, "UTC")["2024-01-10T15:00:00Z"] == [
        "last #1", "daily #1", "weekly #1", "monthly #1"]


def test_many_backups_of_one_second_are_one_borg_period():
    base = datetime.datetime(2024, 5, 5, 5, 5, 5, tzinfo=UTC)
    backups = [Backup("b%d" % i, base + datetime.timedelta(microseconds=i)) for i in range(5)]
    result = apply_policy(backups, Policy(keep_last=3))
    assert kept(result) == ["b4", "b0"]  # b4 is last #1; nothing else left -> oldest fallback
    assert result.reasons["b0"] == ["last #2 (oldest, rule not filled)"]
    assert list(itertools.chain.from_iterable(result.reasons.values())) == [
        "last #1", "last #2 (oldest, rule not filled)"]
