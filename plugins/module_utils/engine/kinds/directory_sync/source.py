"""``directory_sync``: the seed's ``rsync -a [--delete] /data/ /backup/data/`` — a mirror.

This is NOT a versioned backup: the destination holds one copy, the latest, and a sync
with ``delete: true`` propagates deletions (and mistakes) on the next run. What the catalog
records for each run is the *sync record*: rsync's itemized change list and summary
(payload ``sync.log``) plus the parsed ``--stats`` in the manifest, so a sync shows up
next to every other job, with its files and bytes transferred, and metrics and alerts work
the same way. For point-in-time recovery use the ``files`` kind (incremental chains).
"""

import os
import re

from ...errors import ConfigError, SourceError
from ...procutil import ToolStream, find_tool, tool_env, tool_version
from ...schema import Field, Schema
from ..contract import Source

LOG_PAYLOAD = "sync.log"
TAIL_BYTES = 16384
# rsync exit 24: "some files vanished before they could be transferred" — the rest is in
# place; reported as a warning (vanished_warning) as most rsync wrappers do.
VANISHED = 24
_ITEM_RE = re.compile(rb"^(?:[<>ch.][fdLDSp][^ ]{9} |\*deleting )")
_STATS = {
    "Number of files": "files",
    "Number of created files": "created",
    "Number of deleted files": "deleted",
    "Number of regular files transferred": "transferred",
    "Total file size": "total_bytes",
    "Total transferred file size": "transferred_bytes",
    "Literal data": "literal_bytes",
    "Matched data": "matched_bytes",
    "Total bytes sent": "bytes_sent",
    "Total bytes received": "bytes_received",
}
_BREAKDOWN = {"reg": "regular_files", "dir": "directories", "link": "symlinks", "dev": "devices",
              "special": "specials"}


def parse_stats(text):
    """The numbers of rsync's ``--stats`` block (thousands separators tolerated)."""
    stats = {}
    for line in text.splitlines():
        label, sep, rest = line.partition(":")
        key = _STATS.get(label.strip())
        if not sep or key is None:
            continue
        match = re.match(r"\s*([\d,.]+)", rest)
        if not match:
            continue
        stats[key] = int(match.group(1).replace(",", "").replace(".", ""))
        if key == "files":
            for name, count in re.findall(r"(\w+): ([\d,.]+)", rest):
                if name in _BREAKDOWN:
                    stats[_BREAKDOWN[name]] = int(count.replace(",", "").replace(".", ""))
    return stats


class _SyncLog:
    """Passes rsync's stdout through as the payload, counting itemized lines, keeping the tail."""

    def __init__(self, tool):
        self._tool = tool
        self.tail = b""
        self.changes = 0
        self._partial = b""
        self.vanished = False

    def read(self, size=-1):
        try:
            data = self._tool.read(size)
        except SourceError:
            if self._tool.returncode == VANISHED:
                self.vanished = True
                return b""
            raise
        if data:
            self.tail = (self.tail + data)[-TAIL_BYTES:]
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
            self.changes += sum(1 for line in lines if _ITEM_RE.match(line))
        return data

    def readable(self):
        return True


class DirectorySyncSource(Source):
    """Options: ``path`` (source directory), ``destination`` (local directory, e.g. a mounted
    volume), ``delete`` (propagate deletions, rsync ``--delete``), ``exclude`` (rsync patterns),
    ``checksum`` (compare by checksum, ``-c``), ``hard_links`` (``-H``), ``acls`` (``-A``),
    ``xattrs`` (``-X``), ``numeric_ids`` (default true), ``rsync`` (path of the binary)."""

    kind = "directory_sync"
    SCHEMA = Schema("source", {
        "path": Field("path", "directory to mirror", absolute=True),
        "destination": Field("path", "directory the mirror is kept in (e.g. a mounted volume)", absolute=True),
        "delete": Field("bool", "propagate deletions (rsync --delete; default false)"),
        "exclude": Field("list", "rsync exclude patterns"),
        "checksum": Field("bool", "compare files by checksum (rsync -c; default false)"),
        "hard_links": Field("bool", "preserve hard links (rsync -H; default false)"),
        "acls": Field("bool", "preserve ACLs (rsync -A; default false)"),
        "xattrs": Field("bool", "preserve extended attributes (rsync -X; default false)"),
        "numeric_ids": Field("bool", "keep numeric owner ids (default true)"),
        "rsync": Field("path", "rsync binary (default: PATH)"),
    })

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        self.path = self._absolute("path")
        self.destination = self._absolute("destination")
        exclude = options.get("exclude") or []
        if not all(exclude):
            raise ConfigError("source.exclude must be a list of rsync patterns (no empty one)")
        self.exclude = list(exclude)
        self.delete = options.get("delete", False)
        self.flags = [flag for option, flag in (("checksum", "--checksum"), ("hard_links", "--hard-links"),
                                                ("acls", "--acls"), ("xattrs", "--xattrs"))
                      if options.get(option, False)]
        if options.get("numeric_ids", True):
            self.flags.append("--numeric-ids")
        self.rsync = options.get("rsync") or "rsync"
        real_src, real_dst = os.path.realpath(self.path), os.path.realpath(self.destination)
        if real_dst == real_src:
            raise ConfigError("directory_sync.destination is the source directory itself (%s)" % self.path)
        if real_dst.startswith(real_src.rstrip("/") + "/"):
            # Never mirror the mirror into itself: exclude it, anchored at the transfer root.
            self.exclude.append("/%s/" % os.path.relpath(real_dst, real_src))
        if real_src.startswith(real_dst.rstrip("/") + "/") and self.delete:
            raise ConfigError("directory_sync source %s lies inside the destination %s: with delete: true "
                              "the sync would remove it" % (self.path, self.destination))
        self._version = None

    def _absolute(self, name):
        value = self.options.get(name)
        if not value:
            raise ConfigError("source.%s is required: an absolute directory path" % name)
        return os.path.normpath(value)

    def describe(self):
        desc = {"path": self.path, "destination": self.destination, "delete": self.delete,
                "mode": "mirror (not versioned)"}
        if self.exclude:
            desc["exclude"] = self.exclude
        if self.flags:
            desc["flags"] = self.flags
        return desc

    def argv(self):
        argv = [find_tool(self.rsync) if not os.path.isabs(self.rsync) else self.rsync,
                "--archive", "--no-human-readable", "--stats", "--out-format=%i %n%L"] + self.flags
        if self.delete:
            argv.append("--delete")
        argv.extend("--exclude=%s" % pattern for pattern in self.exclude)
        # Trailing slashes: copy the *contents* of path into destination (the seed's /data/ /backup/data/).
        argv += ["--", self.path.rstrip("/") + "/", self.destination.rstrip("/") + "/"]
        return argv

    def preflight(self):
        if not os.path.isdir(self.path):
            raise SourceError("directory_sync source %s is not a directory (or does not exist)" % self.path)
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise SourceError("directory_sync source %s is not readable" % self.path)
        parent = os.path.dirname(self.destination)
        if not os.path.isdir(self.destination) and not os.path.isdir(parent):
            raise SourceError("directory_sync destination %s: its parent %s does not exist (is the volume mounted?)"
                              % (self.destination, parent))
        if os.path.exists(self.destination) and not os.path.isdir(self.destination):
            raise SourceError("directory_sync destination %s exists and is not a directory" % self.destination)
        self.tool_versions()

    def tool_versions(self):
        if self._version is None:
            binary = find_tool(self.rsync) if not os.path.isabs(self.rsync) else self.rsync
            self._version = tool_version(binary)[0]
        return {"rsync": self._version}

    def produce(self, emit, context):
        tool = ToolStream(self.argv(), env=tool_env({}), what="rsync %s/ -> %s/" % (self.path, self.destination))
        log = _SyncLog(tool)
        try:
            emit(LOG_PAYLOAD, log)
        finally:
            tool.close()
        stats = parse_stats(log.tail.decode("utf-8", "replace"))
        missing = [key for key in ("files", "total_bytes", "transferred", "transferred_bytes") if key not in stats]
        if missing:
            raise SourceError("rsync finished without the --stats summary (missing %s)" % ", ".join(missing))
        stats.update(changes=log.changes, destination=self.destination, delete=self.delete, mirror=True,
                     exit_code=VANISHED if log.vanished else 0)
        if log.vanished:
            stats["warning"] = "some source files vanished during the sync (rsync exit 24)"
        return stats
