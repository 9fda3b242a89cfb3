"""Retention policy evaluation (grandfather-father-son) with an explanation per kept backup.

Two semantics are implemented, each reproducing a widely used tool as packaged in Debian 12:

``borg``
    ``borg prune`` 1.2.4.  ``keep_within`` first, then the rules one after the other
    (``last`` -- borg's "secondly" --, hourly, daily, weekly, monthly, yearly).  Every rule walks
    the backups from newest to oldest, looks at the newest backup of each period and keeps it
    unless an earlier rule already kept it; such a period is used up without counting.  When a
    rule runs out of backups before its count is reached, the oldest backup is kept for it
    (unless it is already kept).  Each kept backup has exactly one reason.

``restic``
    ``restic forget`` 0.14.0.  A single walk from newest to oldest; every rule with a count left
    keeps the newest backup of each of its periods, independently of the other rules, so one
    backup may be kept for several reasons.  No "oldest" fallback.

Deliberate, documented differences from the tools (see docs/retention.md):

* ``-1`` means "unlimited" for every rule.  borg 1.2 behaves so by construction; restic 0.14
  silently ignores a rule set to -1 (a policy of only ``--keep-daily -1`` removes everything),
  so for ``restic`` we follow the meaning later restic releases gave -1.
* ``keep_within`` is measured from the newest backup in both semantics (restic does so; borg
  1.2 measures from the current clock).  Pass ``within_reference`` to measure from another
  moment, e.g. ``now`` to get borg's own behaviour.
* Durations accept ``w`` (weeks) in both semantics, ``h`` or ``H`` for hours, and several
  units at once (``1y6m``); a unit may appear once (restic keeps only the last of repeated
  units, borg accepts a single unit).
* Periods are wall-clock periods of ``policy.timezone``.  borg uses the local zone of the
  machine that prunes; restic uses the UTC offset recorded in each snapshot (the zone of the
  machine that took it).  Both agree with this module when that zone is ``timezone``.
* Backups with equal timestamps stay in input order.  restic 0.14 sorts them unstably, so
  which of two simultaneous snapshots it keeps is arbitrary; the kept *times* are the same.
* The list is one group.  restic groups snapshots by host and paths first (``--group-by``).

Pure Python, standard library only: importable without Ansible.
"""

import datetime
import re
from collections.abc import Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ConfigError
from .timeutil import parse_iso

UTC = datetime.timezone.utc
UNLIMITED = -1
SEMANTICS = ("borg", "restic")
# Order matters: borg applies its rules in this order (keep_last is borg's "secondly").
COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
OLDEST_SUFFIX = " (oldest, rule not filled)"

_DURATION_PART = re.compile(r"(\d+)([hHdwmy])")
_DURATION_FULL = re.compile(r"^(?:\d+[hHdwmy])+$")
# borg's interval(): a month is 31 days and a year 365 days, all counted in hours.
_BORG_HOURS = {"h": 1, "H": 1, "d": 24, "w": 24 * 7, "m": 24 * 31, "y": 24 * 365}


class RetentionError(ConfigError):
    """Invalid policy or backup list; ``item`` is the offending value (or None)."""

    def __init__(self, message, item=None):
        super().__init__(message)
        self.item = item


class Duration:
    """A ``keep_within`` duration such as ``36h``, ``7d``, ``2w``, ``6m``, ``1y`` or ``1y6m``."""

    __slots__ = ("text", "years", "months", "days", "hours")

    def __init__(self, text, what="keep_within"):
        text = str(text).strip()
        if not _DURATION_FULL.match(text):
            raise RetentionError(
                "%s %r is not a duration: use a number and a unit h, d, w, m or y "
                "(e.g. 36h, 7d, 2w, 6m, 1y, or combined like 1y6m)" % (what, text), text)
        self.text = text
        self.years = self.months = self.days = self.hours = 0
        seen = set()
        for number, unit in _DURATION_PART.findall(text):
            unit_name = unit.lower()
            if unit_name in seen:
                raise RetentionError("%s %r repeats the unit %r: write each unit once "
                                     "(e.g. 1y6m)" % (what, text, unit), text)
            seen.add(unit_name)
            number = int(number)
            if unit == "y":
                self.years += number
            elif unit == "m":
                self.months += number
            elif unit == "w":
                self.days += 7 * number
            elif unit == "d":
                self.days += number
            else:
                self.hours += number
        if not (self.years or self.months or self.days or self.hours):
            raise RetentionError("%s %r is zero; leave it out instead" % (what, text), text)

    def borg_hours(self):
        return (self.years * _BORG_HOURS["y"] + self.months * _BORG_HOURS["m"]
                + self.days * 24 + self.hours)

    def __str__(self):
        return self.text

    def __repr__(self):
        return "Duration(%r)" % self.text


class Policy:
    """Validated retention policy.  Counts are ints >= 0 or -1 (unlimited)."""

    __slots__ = ("counts", "keep_within", "semantics", "timezone", "zone")

    def __init__(self, keep_last=0, keep_hourly=0, keep_daily=0, keep_weekly=0, keep_monthly=0,
                 keep_yearly=0, keep_within=None, semantics="borg", timezone="UTC"):
        given = {"last": keep_last, "hourly": keep_hourly, "daily": keep_daily,
                 "weekly": keep_weekly, "monthly": keep_monthly, "yearly": keep_yearly}
        self.counts = {rule: _validate_count("keep_" + rule, given[rule]) for rule in COUNT_RULES}
        self.keep_within = None if keep_within in (None, "") else Duration(keep_within)
        semantics = semantics or "borg"
        if semantics not in SEMANTICS:
            raise RetentionError("semantics %r is unknown; use one of: %s"
                                 % (semantics, ", ".join(SEMANTICS)), semantics)
        self.semantics = semantics
        self.timezone = timezone or "UTC"
        self.zone = _load_zone(self.timezone)
        if self.keep_within is None and not any(self.counts.values()):
            raise RetentionError(
                "the policy keeps nothing: set keep_within or at least one keep_* count "
                "(> 0, or -1 for unlimited)")

    def as_dict(self):
        result = {"keep_" + rule: count for rule, count in self.counts.items()}
        result.update(keep_within=self.keep_within.text if self.keep_within else None,
                      semantics=self.semantics, timezone=self.timezone)
        return result


def _validate_count(name, value):
    if isinstance(value, bool):
        raise RetentionError("%s must be an integer, got %r" % (name, value), value)
    if value is None:
        return 0
    if isinstance(value, str):
        text = value.strip()
        if not re.match(r"^-?\d+$", text):
            raise RetentionError("%s must be an integer, got %r" % (name, value), value)
        value = int(text)
    if not isinstance(value, int):
        raise RetentionError("%s must be an integer, got %r" % (name, value), value)
    if value < UNLIMITED:
        raise RetentionError("%s must be >= 0 or -1 (unlimited), got %d" % (name, value), value)
    return value


def _load_zone(name):
    if name in ("UTC", "Etc/UTC", "Z"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise RetentionError("timezone %r is not a known IANA time zone name (e.g. "
                             "Europe/Berlin, UTC)" % (name,), name) from None


class Backup:
    """One backup to evaluate: ``item`` is the caller's value, returned unchanged."""

    __slots__ = ("key", "timestamp", "item", "status", "verified")

    def __init__(self, key, timestamp, item=None, status=None, verified=None):
        self.key = key
        self.timestamp = timestamp
        self.item = item if item is not None else key
        self.status = status
        self.verified = verified

    def __repr__(self):
        return "Backup(%r, %s)" % (self.key, self.timestamp.isoformat())


class RetentionResult:
    """``keep`` and ``prune`` newest first; ``reasons`` maps a kept backup's key to its reasons."""

    __slots__ = ("keep", "prune", "reasons")

    def __init__(self, keep, prune, reasons):
        self.keep = keep
        self.prune = prune
        self.reasons = reasons


def backups_from_items(items):
    """Turn ISO-8601 strings, datetimes or mappings with ``timestamp`` into :class:`Backup` objects.

    The key of a backup is its ``id`` when given, else its timestamp as written.  Keys must be
    unique, since they name the backup in ``reasons``.
    """
    backups = []
    seen = set()
    for item in items:
        if isinstance(item, str):
            raw, ident, status, verified = item, None, None, None
        elif isinstance(item, (dict, Mapping)):
            if "timestamp" not in item:
                raise RetentionError("backup %r has no 'timestamp'" % (item,), item)
            raw = item["timestamp"]
            ident = item.get("id")
            status = item.get("status")
            verified = item.get("verified")
        elif isinstance(item, datetime.date):
            raw, ident, status, verified = item, None, None, None
        else:
            raise RetentionError("backup %r is neither an ISO-8601 timestamp nor a dict with "
                                 "'timestamp'" % (item,), item)
        try:
            moment = _parse_moment(raw)
        except (ValueError, TypeError):
            raise RetentionError("backup %r: timestamp %r is not ISO-8601"
                                 % (ident if ident is not None else item, raw), item) from None
        if ident is not None:
            key = str(ident)
            if key in seen:
                raise RetentionError("duplicate backup id %r" % (key,), item)
        else:
            key = raw.isoformat() if isinstance(raw, datetime.date) else str(raw)
            if key in seen:
                raise RetentionError("duplicate backup %r (same timestamp, no id to tell them "
                                     "apart)" % (key,), item)
        seen.add(key)
        backups.append(Backup(key, moment, item, status, verified))
    return backups


def _parse_moment(raw):
    if not isinstance(raw, str):
        if isinstance(raw, datetime.datetime):
            return parse_iso(raw)
        if isinstance(raw, datetime.date):  # a bare date (YAML reads 2025-01-31 so): midnight UTC
            return datetime.datetime(raw.year, raw.month, raw.day, tzinfo=UTC)
        raise TypeError("not a string")
    try:
        # Fast path for long histories (Python 3.11 reads a trailing "Z" itself).
        moment = datetime.datetime.fromisoformat(raw)
    except ValueError:
        return parse_iso(raw)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    if moment.tzinfo is UTC:
        return moment
    return moment.astimezone(UTC)


def apply_policy(backups, policy, now=None, within_reference=None):
    """Evaluate ``policy`` over ``backups`` (a list of :class:`Backup`).

    ``now`` (aware datetime, default the current time) only matters for restic, which ignores
    backups in the future when it looks for the newest one.  ``within_reference`` replaces the
    newest backup as the moment ``keep_within`` is measured from.
    """
    # Newest first; equal timestamps keep their input order (sorted() is stable).
    ordered = sorted(backups, key=_timestamp_of, reverse=True)
    if not ordered:
        return RetentionResult([], [], {})
    zone = policy.zone
    if zone is UTC:
        local = [b.timestamp for b in ordered]
    else:
        local = [b.timestamp.astimezone(zone) for b in ordered]
    if policy.semantics == "borg":
        reasons = _borg(ordered, local, policy, within_reference)
    else:
        reasons = _restic(ordered, local, policy, now, within_reference)
    keep, prune, by_key = [], [], {}
    for index, backup in enumerate(ordered):
        why = reasons.get(index)
        if why:
            keep.append(backup)
            by_key[backup.key] = why
        else:
            prune.append(backup)
    return RetentionResult(keep, prune, by_key)


def evaluate(items, now=None, within_reference=None, **policy_options):
    """Convenience: parse ``items`` and policy options, then :func:`apply_policy`."""
    policy = Policy(**policy_options)
    return apply_policy(backups_from_items(items), policy, now=now,
                        within_reference=within_reference)


def _timestamp_of(backup):
    return backup.timestamp


# Period keys, computed from local wall-clock fields as both tools do (borg formats them with
# strftime, restic packs them into integers).  A key is only compared with the key of the
# previous (next newer) backup, so backups whose wall clock runs backwards at the end of
# daylight saving time may open a period twice, in both tools and here alike.
_PERIOD_KEY = {
    # borg's --keep-last is its --keep-secondly: backups within one wall-clock second share a period.
    "last": lambda t: (t.year, t.month, t.day, t.hour, t.minute, t.second),
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


def _period_heads(rule, local, semantics):
    """Indexes of the newest backup of each period of ``rule``, newest first (lazily, so a rule
    that is satisfied early never looks at the rest of a long history)."""
    if rule == "last" and semantics == "restic":
        # restic: every snapshot is a period of its own.
        yield from range(len(local))
        return
    key_of = _PERIOD_KEY[rule]
    previous = None
    for index, moment in enumerate(local):
        key = key_of(moment)
        if key != previous:
            previous = key
            yield index


def _within(ordered, cutoff):
    """Indexes of the backups newer than ``cutoff`` (every one when it is None), newest first."""
    for index, backup in enumerate(ordered):
        if cutoff is not None and backup.timestamp <= cutoff:
            return  # newest first: everything after is older still
        yield index


def _counted_rules(policy):
    """(rule, count) of the count rules the policy uses, in the tools' order (last ... yearly)."""
    return [(rule, policy.counts[rule]) for rule in COUNT_RULES if policy.counts[rule] != 0]


def _borg(ordered, local, policy, within_reference):
    reasons = {}
    within = policy.keep_within
    if within is not None:
        reference = within_reference or ordered[0].timestamp
        try:
            cutoff = reference - datetime.timedelta(hours=within.borg_hours())
        except OverflowError:
            cutoff = None  # longer than the calendar: everything is within
        label = ["within " + within.text]
        for index in _within(ordered, cutoff):
            reasons[index] = label
    last_index = len(ordered) - 1
    for rule, wanted in _counted_rules(policy):
        kept = 0
        for index in _period_heads(rule, local, "borg"):
            if index in reasons:
                continue  # the period's newest backup is kept already: the period is used up
            kept += 1
            reasons[index] = ["%s #%d" % (rule, kept)]
            if kept == wanted:
                break
        else:
            # The rule ran out of backups before its count: borg keeps the oldest one as well.
            if wanted != UNLIMITED and last_index not in reasons:
                reasons[last_index] = ["%s #%d%s" % (rule, kept + 1, OLDEST_SUFFIX)]
    # borg gives each archive exactly one reason; the lists are shared only for "within".
    return {index: list(why) for index, why in reasons.items()}


def _restic(ordered, local, policy, now, within_reference):
    reasons = {}
    within = policy.keep_within
    if within is not None:
        cutoff = _restic_within_cutoff(ordered, policy, within, now, within_reference)
        label = "within " + within.text
        for index in _within(ordered, cutoff):
            reasons[index] = [label]
    # Every rule with a count left keeps the newest backup of each of its periods, whatever
    # the other rules did; reasons come out in restic's order (within, last ... yearly).
    for rule, wanted in _counted_rules(policy):
        kept = 0
        for index in _period_heads(rule, local, "restic"):
            kept += 1
            reasons.setdefault(index, []).append("%s #%d" % (rule, kept))
            if kept == wanted:
                break
    return reasons


def _restic_within_cutoff(ordered, policy, within, now, within_reference):
    """The instant after which restic keeps everything; None keeps all (no usable newest)."""
    if within_reference is not None:
        latest = within_reference
    else:
        # restic: the newest snapshot that is not in the future.
        now = now or datetime.datetime.now(UTC)
        latest = next((b.timestamp for b in ordered if b.timestamp < now), None)
        if latest is None:
            return None
    start = _go_add_date(latest, -within.years, -within.months, -within.days, policy.zone)
    if start is None:
        return None
    try:
        return start - datetime.timedelta(hours=within.hours)
    except OverflowError:
        return None


def _go_add_date(moment, years, months, days, zone):
    """Go's ``time.AddDate`` in ``zone``: calendar arithmetic on the wall clock, normalised
    the way Go does it (31 March minus one month is 3 March, or 2 March in leap years), then
    mapped back to an instant as Go maps wall clocks that fall into a DST gap or overlap."""
    wall = moment.astimezone(zone)
    month_index = (wall.year + years) * 12 + (wall.month - 1) + months
    year, month0 = divmod(month_index, 12)
    if year < 1:
        return None
    try:
        day = datetime.date(year, month0 + 1, 1) + datetime.timedelta(days=wall.day - 1 + days)
        naive = datetime.datetime.combine(day, wall.time())
        if zone is UTC:
            return naive.replace(tzinfo=UTC)
        # Go: take the zone offset valid at "wall clock read as UTC"; if the resulting instant
        # is outside that offset's validity, use the offset valid at that instant instead.
        as_utc = naive.replace(tzinfo=UTC)
        first = as_utc.astimezone(zone).utcoffset()
        candidate = as_utc - first
        second = candidate.astimezone(zone).utcoffset()
        return as_utc - second
    except (OverflowError, ValueError):
        return None  # before year 1: every backup is within
