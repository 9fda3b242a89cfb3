"""Restore a ``config_git`` backup: check out a chosen commit from its ``config.bundle``.

By default the files of the backed-up ``subdir`` at the backup's commit are written as
plain files into the destination (what the config directory looked like). ``commit``
picks any other commit the bundle holds (the bundle carries the branch's full history),
``subdir`` another part of the repository (``/`` for all of it), and ``clone: true`` makes
the destination a git clone with that commit checked out instead.

Verification before the destination is touched: the commit resolves inside the bundle
(and is the manifest's own commit when none was asked for), the restored files hash back
to exactly the commit's git tree id (``git add`` into a throwaway index + ``write-tree``),
and file count and bytes match the manifest's ``stats``.

One pass (``one_pass_payloads``): ``config.bundle`` is declared. It is spooled into a private
work directory and the stream finished (size and SHA-256 checked) before git reads it;
the destination changes only in ``move_into_place`` after the checks, and any exception
removes the staging and work directories.
"""

import os
import shutil
import tempfile

from ...errors import ConfigError, IntegrityError
from ...manifest import Manifest
from ...schema import Field
from . import source as src
from ..files import archive as fmt
from ..files.target import DirectoryTarget, destination_schema, force_rmtree

CHUNK = 1 << 20


class ConfigGitTarget(DirectoryTarget):
    """Options: ``path`` (destination directory), ``commit`` (default: the backup's commit),
    ``subdir`` (default: the backed-up subdir; ``/`` = whole repository), ``clone`` (a git
    clone instead of plain files), ``overwrite`` (replace a non-empty destination)."""

    kind = "config_git"
    SCHEMA = destination_schema(
        commit=Field("str", "commit to check out (default: the backup's commit)", nonempty=True),
        subdir=Field("str", "part of the repository (default: the backed-up subdir; / for all)", nonempty=True),
        clone=Field("bool", "restore a git clone instead of plain files (default false)"),
    )

    def __init__(self, options):
        super().__init__(options)
        options = self.options
        self.commit = options.get("commit")
        if self.commit is not None and (not isinstance(self.commit, str) or not self.commit.strip()
                                        or self.commit.startswith("-")):
            raise ConfigError("config_git target commit must be a commit id or ref name")
        subdir = options.get("subdir")
        self.subdir = None if subdir is None else src.safe_subdir(subdir)
        self.as_clone = options.get("clone", False)

    def describe(self):
        desc = {"path": self.path, "overwrite": self.overwrite, "clone": self.as_clone}
        if self.commit:
            desc["commit"] = self.commit
        if self.subdir is not None:
            desc["subdir"] = self.subdir or "/"
        return desc

    def preflight(self, manifest):
        manifest = Manifest.wrap(manifest)
        if manifest.kind != self.kind:
            raise ConfigError("backup %s is a %s backup, not config_git" % (manifest.id, manifest.kind))
        self.destination.preflight()

    def one_pass_payloads(self, manifest, chain):
        """``config.bundle``: spooled and finished before git or the destination see it."""
        return {(Manifest.wrap(manifest).id, src.BUNDLE_PAYLOAD)}

    def restore(self, context):
        manifest = context.manifest
        stats = manifest.stats
        subdir = self.subdir if self.subdir is not None else stats.get("subdir", "")
        work = tempfile.mkdtemp(prefix="config-git-restore-")
        try:
            session = src.GitSession({}, work)
            bundle = os.path.join(work, "config.bundle")
            self._spool(context, manifest, bundle)
            repo = os.path.join(work, "repo.git")
            session.run(None, "clone", "-q", "--bare", bundle, repo, what="git clone of the bundle")
            wanted = self.commit or stats.get("commit")
            if not wanted:
                raise IntegrityError("backup %s records no commit in its stats" % manifest.id)
            code, _err = session.status(None, "--git-dir", repo, "rev-parse", "--verify", "-q", "%s^{commit}" % wanted)
            if code != 0:
                raise IntegrityError("commit %s is not in the bundle of backup %s" % (wanted, manifest.id))
            commit = session.run(None, "--git-dir", repo, "rev-parse", "%s^{commit}" % wanted).strip()
            checks = []
            if not self.commit:
                checks.append({"what": "bundle holds the backup's commit", "expected": stats.get("commit"),
                               "actual": commit, "ok": commit == stats.get("commit")})
            tree = self._tree_of(session, repo, commit, "" if self.as_clone else subdir)
            expected_files, expected_bytes = src.parse_ls_tree(session.run(
                None, "--git-dir", repo, "ls-tree", "-r", "-l", "-z", tree))
            if context.check_mode:
                return {"changed": True, "destination": self.path, "commit": commit, "tree": tree,
                        "checks": checks, "plan": "would check out %d files of %s into %s"
                        % (expected_files, commit[:12], self.path)}
            staging, inside = self.destination.make_staging()
            try:
                if self.as_clone:
                    session.run(None, "clone", "-q", "--no-checkout", bundle, staging, what="git clone of the bundle")
                    session.run(staging, "checkout", "-q", "--detach", commit)
                    session.run(staging, "remote", "remove", "origin")
                else:
                    index = os.path.join(work, "restore.index")
                    session.run(None, "--git-dir", repo, "read-tree", tree, extra_env={"GIT_INDEX_FILE": index})
                    session.run(None, "--git-dir", repo, "--work-tree", staging, "checkout-index", "-a", "-f",
                                extra_env={"GIT_INDEX_FILE": index})
                checks += self._verify(session, repo, staging, tree, commit, subdir, stats,
                                       expected_files, expected_bytes, work)
                failed = [check for check in checks if not check["ok"]]
                if failed:
                    raise IntegrityError("restored config of backup %s does not match commit %s: %s" % (
                        manifest.id, commit[:12], "; ".join("%s: expected %s, got %s" % (
                            c["what"], c["expected"], c["actual"]) for c in failed)))
                os.chmod(staging, 0o755)
                self.destination.move_into_place(staging, inside)
            except BaseException:
                force_rmtree(staging)
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"changed": True, "destination": self.path, "commit": commit, "tree": tree,
                "subdir": None if self.as_clone else subdir, "clone": self.as_clone,
                "files": expected_files, "bytes": expected_bytes, "checks": checks}

    @staticmethod
    def _spool(context, manifest, path):
        stream = context.open_payload(manifest, src.BUNDLE_PAYLOAD)
        try:
            with open(path, "wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
            stream.finish()
        finally:
            stream.close()

    @staticmethod
    def _tree_of(session, repo, commit, subdir):
        spec = "%s:%s" % (commit, subdir) if subdir else "%s^{tree}" % commit
        code, _err = session.status(None, "--git-dir", repo, "rev-parse", "--verify", "-q", spec)
        if code != 0:
            return src.EMPTY_TREE
        return session.run(None, "--git-dir", repo, "rev-parse", spec).strip()

    def _verify(self, session, repo, staging, tree, commit, subdir, stats, expected_files, expected_bytes, work):
        checks = []
        if self.as_clone:
            head = session.run(staging, "rev-parse", "HEAD").strip()
            dirty = session.run(staging, "status", "--porcelain", "--untracked-files=all", "--ignored")
            checks.append({"what": "clone is at the commit, clean", "expected": [commit, ""],
                           "actual": [head, dirty.strip()], "ok": head == commit and not dirty.strip()})
        else:
            index = os.path.join(work, "verify.index")
            session.run(None, "--git-dir", repo, "--work-tree", staging, "add", "-A", "-f", ".",
                        extra_env={"GIT_INDEX_FILE": index})
            written = session.run(None, "--git-dir", repo, "write-tree", extra_env={"GIT_INDEX_FILE": index}).strip()
            checks.append({"what": "restored files hash to the commit's git tree", "expected": tree,
                           "actual": written, "ok": written == tree})
        files, size = _count(staging)
        checks.append({"what": "files and bytes on disk", "expected": [expected_files, expected_bytes],
                       "actual": [files, size], "ok": [files, size] == [expected_files, expected_bytes]})
        same_view = not self.commit and not self.as_clone and subdir == stats.get("subdir")
        if same_view and "files" in stats:
            checks.append({"what": "files and bytes recorded in the manifest",
                           "expected": [stats.get("files"), stats.get("bytes")],
                           "actual": [files, size], "ok": [files, size] == [stats.get("files"), stats.get("bytes")]})
        return checks


def _count(root):
    """Files and symlinks below ``root`` (``.git`` excluded) and their git blob sizes."""
    files = size = 0
    for rel, info in fmt.walk(root, exclude=[".git"]):
        kind = fmt.file_type(info.st_mode)
        if kind == fmt.TYPE_FILE:
            files += 1
            size += info.st_size
        elif kind == fmt.TYPE_SYMLINK:
            files += 1
            size += len(os.fsencode(os.readlink(os.path.join(root, rel))))
    return files, size
