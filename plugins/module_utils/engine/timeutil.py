"""UTC timestamps and backup ids."""

import datetime
import re
import secrets

UTC = datetime.timezone.utc
_ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-[0-9a-f]{6}$")


def utc_now():
    return datetime.datetime.now(UTC)


def to_iso(moment):
    """ISO-8601 in UTC with a ``Z`` suffix and microseconds dropped (manifest format)."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text):
    """Parse an ISO-8601 timestamp; naive values are taken as UTC."""
    if isinstance(text, datetime.datetime):
        moment = text
    else:
        value = str(text).strip()
        if value.endswith(("Z", "z")):
            value = value[:-1] + "+00:00"
        try:
            moment = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("not an ISO-8601 timestamp: %r" % (text,)) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def new_backup_id(moment=None):
    """Sortable, unique id: the UTC start time, its fraction of a second, 16 random bits.

    The six hex digits after the dash are the sub-second part in 1/256 s (two digits) and
    a random part (four). Ids of backups started within the same second therefore still
    sort in start order, which the catalog relies on for ``latest`` (manifest times are
    whole seconds).
    """
    moment = (moment or utc_now()).astimezone(UTC)
    return "%s-%02x%s" % (moment.strftime("%Y%m%dT%H%M%SZ"), moment.microsecond * 256 // 1000000,
                          secrets.token_hex(2))


def is_backup_id(text):
    return bool(_ID_RE.match(text or ""))
