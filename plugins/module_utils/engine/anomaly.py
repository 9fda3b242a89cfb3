"""Size anomaly: does a backup's size differ suspiciously from the job's previous good one?

A sudden drop often means a dump that silently lost tables or a source that was emptied; a
sudden jump, a runaway table or a wrong source. :func:`evaluate_size` is pure: it takes the
new size and the previous one and returns a verdict.

For a backup run there is :func:`check_new_backup`: given the catalog and the manifest of a
backup that is about to be published, it finds the baseline (the job's newest successful
backup of the same sort, full or incremental, whose own size check did not fail) and judges
the new size against it. :func:`manifest_fields` turns the verdict into the manifest's
``size_change_ratio`` and ``size_check`` entries. Failing the run on a ``fail`` verdict and
shipping ``backup_size_change_ratio`` is the runner's business.

The ratio is ``current / previous``: 1.0 is unchanged, 0.5 half the size, 2.0 double.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError
from .manifest import Manifest
from .timeutil import parse_iso

OK = "ok"
WARN = "warn"
FAIL = "fail"


def size_change_ratio(current_bytes, previous_bytes):
    """``current / previous``; None without a previous backup; +inf when growing from zero."""
    current = _size("current_bytes", current_bytes)
    if previous_bytes is None:
        return None
    previous = _size("previous_bytes", previous_bytes)
    if previous == 0:
        return 1.0 if current == 0 else math.inf
    return current / previous


def _size(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ConfigError("%s must be a non-negative number of bytes, got %r" % (name, value))
    return value


@dataclass(frozen=True)
class SizePolicy:
    """Bounds on the size change ratio. ``None`` disables a bound.

    A ratio above ``*_above`` or below ``*_below`` triggers that level; ``fail`` wins over
    ``warn``. ``min_previous_bytes`` skips the check against tiny baselines, where a few
    bytes more or less make a huge ratio that means nothing.
    """

    warn_above: float | None = 2.0
    warn_below: float | None = 0.5
    fail_above: float | None = None
    fail_below: float | None = None
    min_previous_bytes: int = 0

    def __post_init__(self):
        for name in ("warn_above", "warn_below", "fail_above", "fail_below"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or math.isnan(value) or value <= 0):
                raise ConfigError("size policy %s must be a positive number or null, got %r" % (name, value))
        if isinstance(self.min_previous_bytes, bool) or not isinstance(self.min_previous_bytes, int) \
                or self.min_previous_bytes < 0:
            raise ConfigError("size policy min_previous_bytes must be a non-negative integer, got %r"
                              % (self.min_previous_bytes,))
        for level in ("warn", "fail"):
            above, below = getattr(self, level + "_above"), getattr(self, level + "_below")
            if above is not None and above <= 1:
                raise ConfigError("size policy %s_above must be greater than 1, got %r" % (level, above))
            if below is not None and below >= 1:
                raise ConfigError("size policy %s_below must be less than 1, got %r" % (level, below))
        if None not in (self.warn_above, self.fail_above) and self.fail_above < self.warn_above:
            raise ConfigError("size policy fail_above (%r) must not be below warn_above (%r)"
                              % (self.fail_above, self.warn_above))
        if None not in (self.warn_below, self.fail_below) and self.fail_below > self.warn_below:
            raise ConfigError("size policy fail_below (%r) must not be above warn_below (%r)"
                              % (self.fail_below, self.warn_below))

    @classmethod
    def from_mapping(cls, options):
        """Build from job configuration (e.g. ``size_anomaly: {warn_above: 3, fail_below: 0.1}``)."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError("unknown size policy option(s): %s" % ", ".join(unknown))
        return cls(**options)


@dataclass(frozen=True)
class SizeVerdict:
    level: str               # ok | warn | fail
    ratio: float | None      # None: nothing to compare with
    current_bytes: int
    previous_bytes: int | None
    reason: str
    previous_id: str | None = None   # the baseline backup, when the verdict came from a catalog

    @property
    def failed(self):
        return self.level == FAIL

    @property
    def json_ratio(self):
        """The ratio as JSON allows it: an infinite ratio (growth from zero bytes) becomes None."""
        return self.ratio if self.ratio is None or math.isfinite(self.ratio) else None

    def as_dict(self):
        """JSON-safe summary (for module results and logs)."""
        return {"level": self.level, "ratio": self.json_ratio, "previous_id": self.previous_id,
                "previous_bytes": self.previous_bytes, "reason": self.reason}


def evaluate_size(current_bytes, previous_bytes, policy=None):
    """Judge ``current_bytes`` against ``previous_bytes`` (None when there is no previous backup)."""
    policy = policy or SizePolicy()
    ratio = size_change_ratio(current_bytes, previous_bytes)
    if ratio is None:
        return SizeVerdict(OK, None, current_bytes, None, "no previous successful backup to compare with")
    if previous_bytes < policy.min_previous_bytes:
        return SizeVerdict(OK, ratio, current_bytes, previous_bytes,
                           "previous backup (%d bytes) is below the %d-byte baseline minimum; not judged"
                           % (previous_bytes, policy.min_previous_bytes))
    level, bound = OK, None
    for candidate, above, below in ((WARN, policy.warn_above, policy.warn_below),
                                    (FAIL, policy.fail_above, policy.fail_below)):
        if above is not None and ratio > above:
            level, bound = candidate, "above %g" % above
        elif below is not None and ratio < below:
            level, bound = candidate, "below %g" % below
    shown = "inf" if math.isinf(ratio) else "%.3f" % ratio
    if level == OK:
        reason = "size ratio %s against the previous backup is within policy" % shown
    else:
        reason = ("size changed from %d to %d bytes (ratio %s, %s)"
                  % (previous_bytes, current_bytes, shown, bound))
    return SizeVerdict(level, ratio, current_bytes, previous_bytes, reason)


def previous_successful(summaries, job, before=None, incremental=None, exclude_id=None):
    """The newest successful backup of ``job`` finished before ``before`` (a timestamp), or None.

    ``summaries`` are manifests or catalog summaries (dicts with ``job``, ``status``,
    ``finished_at`` and ``size_bytes``), in any order. A backup counts as successful when it
    is complete and its own size check (``size_check.level``) did not fail: a suspiciously
    small dump must not become the baseline that makes the next one look normal.
    ``incremental`` (True/False) keeps only backups with/without a ``parent``, so that an
    incremental is compared with incrementals and a full backup with full ones.
    ``exclude_id`` skips one backup (the one being judged).
    """
    limit = parse_iso(before) if before is not None else None
    best, best_time = None, None
    for item in map(Manifest.wrap, summaries):
        # job and id read leniently: a summary without them is skipped, not an error.
        if item.get("job") != job or not item.is_complete or item.size_bytes is None:
            continue
        if exclude_id is not None and item.get("id") == exclude_id:
            continue
        if item.size_check_level == FAIL:
            continue
        if incremental is not None and bool(item.parent) != bool(incremental):
            continue
        finished = parse_iso(item.finished_at)
        if limit is not None and finished >= limit:
            continue
        # Timestamps have whole seconds: ties go to the later start, then the larger id.
        order = (finished, parse_iso(item.get("started_at") or item.finished_at), str(item.get("id")))
        if best_time is None or order > best_time:
            best, best_time = item, order
    return best


def check_new_backup(catalog, manifest, policy=None):
    """Judge the size of a backup about to be published against the job's previous good one.

    ``catalog`` is an :class:`~.catalog.Catalog` (anything with ``scan(job, with_orphans=False)``
    returning manifests); ``manifest`` the new backup's manifest (``id``, ``job``, ``parent``,
    ``size_bytes``). ``policy`` is a :class:`SizePolicy`, a mapping for
    :meth:`SizePolicy.from_mapping`, or None for the defaults. Returns a :class:`SizeVerdict`
    whose ``previous_id`` names the baseline.
    """
    if not isinstance(policy, SizePolicy):
        policy = SizePolicy.from_mapping(policy)
    manifest = Manifest.wrap(manifest)
    history = catalog.scan(manifest.job, with_orphans=False)
    previous = previous_successful(history, manifest.job, incremental=bool(manifest.parent), exclude_id=manifest.id)
    verdict = evaluate_size(manifest.size_bytes, previous.size_bytes if previous else None, policy)
    if previous is None:
        return verdict
    return SizeVerdict(verdict.level, verdict.ratio, verdict.current_bytes, verdict.previous_bytes,
                       verdict.reason, previous_id=previous.id)


def manifest_fields(verdict):
    """The manifest entries recording a verdict: ``size_change_ratio`` and ``size_check``.

    ``size_change_ratio`` is null for a first backup and for growth from an empty baseline
    (JSON has no infinity; ``size_check.reason`` says which).
    """
    return {
        "size_change_ratio": verdict.json_ratio,
        "size_check": {"level": verdict.level, "previous_id": verdict.previous_id,
                       "previous_bytes": verdict.previous_bytes, "reason": verdict.reason},
    }
