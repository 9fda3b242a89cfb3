# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""engine/cron.py: schedules exactly as a Kubernetes CronJob accepts them, for the runner and the roles."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ansible_collections.biometrics.backup.plugins.filter.cron_schedule_error import FilterModule
from ansible_collections.biometrics.backup.plugins.module_utils.engine import cron
from ansible_collections.biometrics.backup.plugins.module_utils.engine.errors import ConfigError
from ansible_collections.biometrics.backup.plugins.module_utils.engine.metrics import schedule_interval_seconds

ACCEPTED = ["0 2 * * *", "*/15 * * * *", "0 */6 * * *", "30 2 * * *", "0 4 * * 0", "  0  2 * * *  ",
            "0 0 1 1 *", "59 23 31 12 6", "0 9 * * mon-fri", "0 0 1 JAN,jul *", "5/15 * * * *",
            "0 0 ? * *", "0 0 * * ?", "0-30/10 8-18 1-15 1-12/2 0-6", "0 0 * * sun,sat",
            "0 0 29 2 *", "0 0 31 2 mon", "0 0 31 2,3 *", "0 0 31 2 */2",
            "@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"]
REFUSED = {
    "": "exactly five fields",
    "0 2 * *": "got 4 field",
    "0 0 2 * * *": "got 6 field",                      # seconds: Kubernetes has no such field
    "@reboot": "not a schedule Kubernetes runs",
    "@every 1h": "not a schedule Kubernetes runs",
    "@DAILY": "not a schedule Kubernetes runs",
    "@daily ": "not a schedule Kubernetes runs",
    "CRON_TZ=Europe/Berlin 0 2 * * *": "CRON_TZ= are not allowed",
    "TZ=UTC @daily": "CRON_TZ= are not allowed",
    "60 * * * *": "minute: '60' is outside 0-59",
    "0 24 * * *": "hour: '24' is outside 0-23",
    "0 0 0 * *": "day of month: '0' is outside 1-31",
    "0 0 * 13 *": "month: '13' is outside 1-12",
    "0 0 * * 7": "day of week: '7' is outside 0-6",
    "0 0 L * *": "day of month: 'L' is not a number",
    "0 0 * * 1#2": "day of week: '1#2' is not a number",
    "0 0 * * mon-fry": "'fry' is not a number or a name",
    "*/0 * * * *": "step in '\\*/0' must be a positive number",
    "1/2/3 * * * *": "too many slashes",
    "1-2-3 * * * *": "too many hyphens",
    "30-10 * * * *": "starts after it ends",
    "? * * * *": "minute: '\\?' is not a number",
    "1,,2 * * * *": "minute: '' is not a number",
    "-1 * * * *": "minute: '' is not a number",
    "every night": "got 2 field",
    "0 0 31 2 *": "never fires: no month it names has day 31",
    "0 0 30,31 2 *": "never fires: no month it names has day 30/31",
    "0 0 31 apr,jun,sep,nov *": "never fires",
}


@pytest.mark.parametrize("schedule", ACCEPTED)
def test_what_kubernetes_accepts_is_accepted_and_has_an_interval(schedule):
    assert cron.schedule_error(schedule) is None
    assert cron.check_schedule(schedule) == schedule
    assert schedule_interval_seconds(schedule, samples=5) > 0  # the staleness metric can be derived


@pytest.mark.parametrize("schedule, message", sorted(REFUSED.items()))
def test_what_kubernetes_refuses_is_refused_with_the_reason(schedule, message):
    with pytest.raises(ConfigError, match="^job x: schedule: .*" + message):
        cron.check_schedule(schedule, "job x: schedule")


@pytest.mark.parametrize("value", [None, 5, ["0 2 * * *"], {"cron": "@daily"}])
def test_only_strings_are_schedules(value):
    assert "must be a string" in cron.schedule_error(value)


def test_macros_mean_their_five_field_expressions():
    for macro, expression in cron.MACROS.items():
        assert cron.schedule_error(expression) is None
        assert schedule_interval_seconds(macro, samples=20) == schedule_interval_seconds(expression, samples=20)


def test_the_roles_filter_is_the_engine_check():
    check = FilterModule().filters()["cron_schedule_error"]
    assert check("@daily") == ""
    assert check("0 0 2 * * *") == cron.schedule_error("0 0 2 * * *")


def _item(low, high):
    number = st.integers(low, high)
    plain = st.one_of(st.just("*"), number.map(str),
                      st.tuples(number, number).map(lambda pair: "%d-%d" % tuple(sorted(pair))))
    return st.tuples(plain, st.one_of(st.none(), st.integers(1, high))).map(
        lambda parts: parts[0] if parts[1] is None else "%s/%d" % parts)


@given(st.tuples(*[st.lists(_item(low, high), min_size=1, max_size=3).map(",".join)
                   for _name, low, high, _names in cron.FIELDS]))
def test_every_well_formed_expression_has_an_interval_unless_it_never_fires(fields):
    schedule = " ".join(fields)
    error = cron.schedule_error(schedule)
    if error is None:
        assert schedule_interval_seconds(schedule, samples=3) > 0
    else:
        assert "never fires" in error, error
        with pytest.raises(Exception, match="failed to find"):
            schedule_interval_seconds(schedule, samples=3)
