"""Cron schedules exactly as a Kubernetes CronJob accepts them, checked in one place.

The runner's job file (jobconfig) and the roles (the ``biometrics.backup.cron_schedule_error``
filter) both use :func:`schedule_error`, so a schedule passes here if and only if the API
server would store it in ``spec.schedule`` of a new CronJob:

- five fields separated by whitespace: minute 0-59, hour 0-23, day of month 1-31, month 1-12
  (or ``jan``-``dec``), day of week 0-6 (or ``sun``-``sat``; 7 is refused). Each field is a
  comma-separated list of ``*``, ``N`` or ``N-M`` (and ``?`` in the two day fields), each
  optionally followed by ``/STEP`` (``N/STEP`` means N to the maximum). This is the grammar
  of the cron library the API server validates with (robfig/cron ``ParseStandard``);
  Quartz-style ``L``, ``W``, ``#`` and a sixth (seconds) field are not part of it.
- or one of the macros ``@yearly``, ``@annually``, ``@monthly``, ``@weekly``, ``@daily``,
  ``@midnight``, ``@hourly``. Not ``@reboot`` (Kubernetes refuses it); ``@every <duration>``,
  which the API server lets through but the Kubernetes documentation does not describe, is
  refused too, because the staleness metric (``backup_schedule_interval_seconds``) cannot be
  derived from it.
- no ``TZ=`` or ``CRON_TZ=`` prefix: Kubernetes refuses both in a new CronJob's schedule (since
  1.29, with or without ``spec.timeZone``); the time zone goes into ``spec.timeZone``.

One check more than the API server's: a schedule that can never fire (``0 0 31 2 *``) is
refused, because a backup that never runs is a mistake and its interval cannot be derived.
"""

import re

from .errors import ConfigError

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MONTHS = dict((name, number) for number, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1))
DAYS = dict((name, number) for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat")))
# (name, minimum, maximum, names) of the five fields, in order.
FIELDS = (
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 6, DAYS),
)
# The most days each month can have (February 29 in leap years).
MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
EXAMPLE = "'0 2 * * *' or @daily"
_DIGITS = re.compile(r"^[0-9]+$")


def _value(text, field):
    name, _low, _high, names = field
    if _DIGITS.match(text):
        return int(text)
    if names and text.lower() in names:
        return names[text.lower()]
    raise ValueError("%s: %r is not a number%s" % (name, text, " or a name" if names else ""))


def _values(item, field):
    """The values ``item`` of ``field`` selects, and whether it is a wildcard (``*``/``?``)."""
    name, low, high, _names = field
    parts = item.split("/")
    if len(parts) > 2:
        raise ValueError("%s: too many slashes in %r" % (name, item))
    bounds = parts[0].split("-")
    wildcard = parts[0] == "*" or (parts[0] == "?" and name.startswith("day"))
    if wildcard:
        start, end = low, high
    elif len(bounds) == 1:
        start = _value(bounds[0], field)
        end = high if len(parts) == 2 else start  # N/STEP: from N to the maximum
    elif len(bounds) == 2:
        start, end = _value(bounds[0], field), _value(bounds[1], field)
    else:
        raise ValueError("%s: too many hyphens in %r" % (name, item))
    step = 1
    if len(parts) == 2:
        if not _DIGITS.match(parts[1]) or int(parts[1]) == 0:
            raise ValueError("%s: the step in %r must be a positive number" % (name, item))
        step = int(parts[1])
    if start < low or end > high:
        raise ValueError("%s: %r is outside %d-%d" % (name, item, low, high))
    if start > end:
        raise ValueError("%s: %r starts after it ends" % (name, item))
    return set(range(start, end + 1, step)), wildcard and step == 1


def schedule_error(schedule):
    """Why Kubernetes would refuse ``schedule`` as a CronJob's schedule, or None if it is valid.

    One addition to Kubernetes' own check: a schedule that never fires (``0 0 31 2 *``, which
    the API server stores and then never runs) is refused too - a backup that never runs.
    """
    if not isinstance(schedule, str):
        return "the schedule must be a string such as %s, got %s" % (EXAMPLE, type(schedule).__name__)
    if "TZ" in schedule:
        return ("TZ= and CRON_TZ= are not allowed in a CronJob's schedule (Kubernetes refuses them): "
                "set the time zone instead (the CronJob's timeZone), got %r" % schedule)
    if schedule.startswith("@"):
        if schedule in MACROS:
            return None
        return "%r is not a schedule Kubernetes runs: use five cron fields or one of %s" % (
            schedule, ", ".join(MACROS))
    fields = schedule.split()
    if len(fields) != len(FIELDS):
        return ("a CronJob's schedule has exactly five fields (minute hour day-of-month month day-of-week) "
                "or is a macro such as @daily; got %d field(s) in %r" % (len(fields), schedule))
    selected = []
    for text, field in zip(fields, FIELDS):
        values, wildcard = set(), False
        for item in text.split(","):
            try:
                item_values, item_wildcard = _values(item, field)
            except ValueError as exc:
                return "invalid cron schedule %r: %s" % (schedule, exc)
            values |= item_values
            wildcard = wildcard or item_wildcard
        selected.append((values, wildcard))
    (days, _any_day), (months, _any_month), (_weekdays, any_weekday) = selected[2:]
    # With a day of week given as well, a run is due on either (cron's rule): it always fires.
    if any_weekday and not any(day <= MONTH_DAYS[month] for day in days for month in months):
        return "cron schedule %r never fires: no month it names has day %s" % (
            schedule, "/".join(str(day) for day in sorted(days)))
    return None


def check_schedule(schedule, where="schedule"):
    """``schedule`` unchanged if Kubernetes accepts it; ConfigError naming ``where`` otherwise."""
    error = schedule_error(schedule)
    if error:
        raise ConfigError("%s: %s" % (where, error))
    return schedule
