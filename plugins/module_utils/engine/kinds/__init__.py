"""The registry of backup kinds: kind name -> Source class and Target class.

Imports here are deliberately static (``from .postgres.source import PostgresSource``): Ansible's module
packer (AnsiballZ) only ships the module_utils a module imports visibly, so a registry built
with ``importlib`` would work from a checkout and break inside a module run on a host.

The modules that talk to a kind's server (``postgres/connection.py``, ``redis/connection.py``,
the engine's ``kubeapi.py``) bind their client libraries lazily (psycopg, redis, kubernetes), so importing
every kind here stays cheap and never fails for a missing library; using a kind whose library
is absent raises MissingDependencyError then.
"""

from ..errors import ConfigError
from .config_git.source import ConfigGitSource
from .directory_sync.source import DirectorySyncSource
from .files.source import FilesSource
from .k8s_resources.source import K8sResourcesSource
from .postgres.source import PostgresSource
from .postgres.wal import PostgresBaseSource
from .redis.source import RedisSource
from .velero.source import VeleroSource
from .config_git.target import ConfigGitTarget
from .directory_sync.target import DirectorySyncTarget
from .files.target import FilesTarget
from .k8s_resources.target import K8sResourcesTarget
from .postgres.target import PostgresTarget
from .redis.target import RedisTarget

# kind -> Source subclass (the backup side)
SOURCES = {cls.kind: cls for cls in (
    PostgresSource, RedisSource, FilesSource, DirectorySyncSource, ConfigGitSource, K8sResourcesSource,
    VeleroSource, PostgresBaseSource)}

# kind -> Target subclass (the restore side)
# Velero has no target here: Velero itself restores its backups.
TARGETS = {cls.kind: cls for cls in (PostgresTarget, RedisTarget, FilesTarget, DirectorySyncTarget,
                                     ConfigGitTarget, K8sResourcesTarget)}


def known_kinds():
    """Every kind with a source, sorted."""
    return sorted(SOURCES)


def _unknown(kind, what, table):
    known = ", ".join(sorted(table)) or "none"
    return ConfigError("unknown backup kind %r: %s kinds are %s" % (kind, what, known))


def source_class(kind):
    """The Source class of ``kind``; ConfigError naming the known kinds otherwise."""
    try:
        return SOURCES[kind]
    except (KeyError, TypeError):
        raise _unknown(kind, "the known", SOURCES) from None


def target_class(kind):
    """The Target class restoring ``kind``; ConfigError when the kind cannot be restored here."""
    try:
        return TARGETS[kind]
    except (KeyError, TypeError):
        if kind in SOURCES:
            raise ConfigError("backups of kind %r cannot be restored by this collection; restorable "
                              "kinds are %s" % (kind, ", ".join(sorted(TARGETS)) or "none")) from None
        raise _unknown(kind, "the restorable", TARGETS) from None


def make_source(kind, options):
    """Instantiate the source of ``kind`` (the class validates its own options)."""
    return source_class(kind)(options or {})


def make_target(kind, options):
    """Instantiate the target of ``kind`` (the class validates its own options)."""
    return target_class(kind)(options or {})


def target_factory(options, kind=None, job=None):
    """``factory(kind)`` for restore.restore, which calls it once the backup (and so its kind)
    is chosen: the target of that kind built from ``options``. With ``kind`` the backup must be
    of that kind; this is the one place a restore compares the two."""
    def factory(chosen):
        if kind is not None and chosen != kind:
            raise ConfigError("backup of job %s is of kind %s, not %s" % (job, chosen, kind))
        return make_target(chosen, options)
    return factory


def check_source_options(kind, options):
    """``options`` checked against the source schema of ``kind`` (types, bounds, unknown fields)
    before any ``_file``/``_env`` secret is read or anything is built."""
    return source_class(kind).SCHEMA.validate(options or {}, "source")


def check_target_options(kind, options):
    """The same for the target of ``kind``: for callers that know the kind before choosing a backup."""
    return target_class(kind).SCHEMA.validate(options or {}, "target")


def scratch_options_from_source(kind, source_options):
    """Options for ``Target.scratch`` derived from a job's source options.

    A restore drill runs with the backed-up job's source access: the scratch database of a
    postgres drill lives on the same server, reached with the same credentials. Only the
    options the kind's target knows are kept (its ``SCHEMA``); kinds whose scratch target
    needs nothing from the source (files, config_git) ignore what they get.
    """
    cls = target_class(kind)
    if cls.SCHEMA is None:
        return {}
    keep = set(cls.SCHEMA.spellings())
    return {key: value for key, value in (source_options or {}).items() if key in keep}
