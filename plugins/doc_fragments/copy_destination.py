# -*- coding: utf-8 -*-
# Copyright: contributors to biometrics.backup
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment:
    """backup_copy's ``destination`` and backup_prune's ``require_copy``: a second location
    with exactly the ``storage`` fields. ansible-test reads fragments as literal strings, so
    the fields are written out here; tests/unit/test_doc_fragments_copy.py fails when they
    drift from the storage fragment's."""

    DOCUMENTATION = r"""
options:
  destination:
    description:
      - Where the backups are copied to, with the same fields as O(storage) and credentials of its own
        (another S3 endpoint, bucket or region, or a C(filesystem)/C(nfs) directory such as a mounted PVC).
      - Credentials may be given as values (hidden from output), or as C(access_key_file) and
        C(secret_key_file) (files holding them).
    type: dict
    required: true
    suboptions:
      backend:
        description: C(filesystem) (a directory, such as a mounted PVC), C(nfs) (a directory on an NFS mount) or C(s3).
        type: str
        default: filesystem
        choices: [filesystem, s3, nfs]
      path:
        description: Absolute directory of the C(filesystem) and C(nfs) backends.
        type: path
      bucket:
        description: Bucket of the C(s3) backend.
        type: str
      prefix:
        description: Key prefix (C(s3)) or subdirectory (C(filesystem), C(nfs)) below which the jobs live.
        type: str
        default: ""
      endpoint_url:
        description: URL of an S3-compatible server (SeaweedFS, MinIO, Ceph RGW); omit for AWS.
        type: str
        aliases: [endpoint]
      region:
        description: S3 region.
        type: str
      access_key:
        description: S3 access key id.
        type: str
      secret_key:
        description: S3 secret access key.
        type: str
      access_key_file:
        description: File holding the S3 access key id (for example a mounted Secret).
        type: path
      secret_key_file:
        description: File holding the S3 secret access key.
        type: path
      session_token:
        description: S3 session token for temporary credentials.
        type: str
      path_style:
        description: Path-style addressing; by default on when O(destination.endpoint_url) is set.
        type: bool
      verify_tls:
        description: Verify the S3 server's TLS certificate.
        type: bool
        default: true
      server_side_encryption:
        description: Ask S3 to encrypt the stored objects at rest (in addition to age encryption).
        type: str
        choices: [AES256, "aws:kms"]
      sse_kms_key_id:
        description: KMS key id for O(destination.server_side_encryption=aws:kms).
        type: str
      part_size:
        description:
          - Size in bytes of the first parts of an S3 multipart upload, from 5 MiB to 5 GiB (default 16 MiB).
          - The part size doubles every 625 parts up to 1 GiB, so that a stream of any size up to S3's 5 TiB object
            limit fits in its 10,000 parts; the memory an upload holds is three times the current part size.
        type: int
      max_attempts:
        description:
          - Attempts per S3 request, the first one included. Between attempts the client waits
            an exponentially growing, jittered delay; throttling, 5xx answers and broken
            connections are retried, refusals such as a wrong key are not.
          - Defaults to 5.
        type: int
      format:
        description:
          - How the jobs' backups are stored. C(archive) keeps one age-encrypted archive per payload
            under C(<prefix>/<job>/<backup-id>/). C(restic) streams the payloads into a restic
            repository per job under C(<prefix>/_restic/<job>/) (deduplicated, compressed and encrypted
            by restic, which must be installed, 0.14 or newer); the engine manifest is still written last
            into C(<prefix>/<job>/<backup-id>/).
          - The kinds C(postgres), C(redis), C(k8s_resources), C(config_git) and C(files) (whole trees,
            C(incremental) is refused) can be stored in the C(restic) format; other kinds are refused before
            anything is written.
          - Reading (list, verify, restore, prune) follows each backup's manifest, so a location may
            hold backups of both formats; reading a C(restic) backup needs O(destination.restic_password).
          - The C(encryption) option does not apply to the C(restic) format (restic encrypts with the
            repository password) and is refused with it.
        type: str
        default: archive
        choices: [archive, restic]
      restic_password:
        description:
          - Password of the restic repositories (O(destination.format=restic)); hidden from output and never
            written to a manifest. A new repository is created with it on the first backup (or the first offsite copy
            of restic-format backups into this location, which otherwise takes the source's password).
        type: str
      restic_password_file:
        description: File holding the restic repository password (for example a mounted Secret).
        type: path
      restic_read_data_subset:
        description:
          - What part of the restic repository's data a verification also reads with C(restic check)
            (C(n%), C(n/t), a size such as C(500M), or C(all)). By default C(restic check) checks the
            repository's structure only, and reads all of its data for a test restore or a drill; the
            verified backups themselves are always read in full through C(restic dump) and compared with
            the SHA-256 their manifest records.
        type: str
"""

    # backup_prune's require_copy: the same fields, where the copies are looked for.
    REQUIRE_COPY = r"""
options:
  require_copy:
    description:
      - The offsite copy's location (the O(storage) fields, see M(biometrics.backup.backup_copy)). When given,
        a successful backup this location does not hold with the same objects is never pruned, nor are the
        parents of its incremental chain.
      - Credentials may be given as values (hidden from output), or as C(access_key_file) and
        C(secret_key_file) (files holding them).
    type: dict
    suboptions:
      backend:
        description: C(filesystem) (a directory, such as a mounted PVC), C(nfs) (a directory on an NFS mount) or C(s3).
        type: str
        default: filesystem
        choices: [filesystem, s3, nfs]
      path:
        description: Absolute directory of the C(filesystem) and C(nfs) backends.
        type: path
      bucket:
        description: Bucket of the C(s3) backend.
        type: str
      prefix:
        description: Key prefix (C(s3)) or subdirectory (C(filesystem), C(nfs)) below which the jobs live.
        type: str
        default: ""
      endpoint_url:
        description: URL of an S3-compatible server (SeaweedFS, MinIO, Ceph RGW); omit for AWS.
        type: str
        aliases: [endpoint]
      region:
        description: S3 region.
        type: str
      access_key:
        description: S3 access key id.
        type: str
      secret_key:
        description: S3 secret access key.
        type: str
      access_key_file:
        description: File holding the S3 access key id (for example a mounted Secret).
        type: path
      secret_key_file:
        description: File holding the S3 secret access key.
        type: path
      session_token:
        description: S3 session token for temporary credentials.
        type: str
      path_style:
        description: Path-style addressing; by default on when O(require_copy.endpoint_url) is set.
        type: bool
      verify_tls:
        description: Verify the S3 server's TLS certificate.
        type: bool
        default: true
      server_side_encryption:
        description: Ask S3 to encrypt the stored objects at rest (in addition to age encryption).
        type: str
        choices: [AES256, "aws:kms"]
      sse_kms_key_id:
        description: KMS key id for O(require_copy.server_side_encryption=aws:kms).
        type: str
      part_size:
        description:
          - Size in bytes of the first parts of an S3 multipart upload, from 5 MiB to 5 GiB (default 16 MiB).
          - The part size doubles every 625 parts up to 1 GiB, so that a stream of any size up to S3's 5 TiB object
            limit fits in its 10,000 parts; the memory an upload holds is three times the current part size.
        type: int
      max_attempts:
        description:
          - Attempts per S3 request, the first one included. Between attempts the client waits
            an exponentially growing, jittered delay; throttling, 5xx answers and broken
            connections are retried, refusals such as a wrong key are not.
          - Defaults to 5.
        type: int
      format:
        description:
          - How the jobs' backups are stored. C(archive) keeps one age-encrypted archive per payload
            under C(<prefix>/<job>/<backup-id>/). C(restic) streams the payloads into a restic
            repository per job under C(<prefix>/_restic/<job>/) (deduplicated, compressed and encrypted
            by restic, which must be installed, 0.14 or newer); the engine manifest is still written last
            into C(<prefix>/<job>/<backup-id>/).
          - The kinds C(postgres), C(redis), C(k8s_resources), C(config_git) and C(files) (whole trees,
            C(incremental) is refused) can be stored in the C(restic) format; other kinds are refused before
            anything is written.
          - Reading (list, verify, restore, prune) follows each backup's manifest, so a location may
            hold backups of both formats; reading a C(restic) backup needs O(require_copy.restic_password).
          - The C(encryption) option does not apply to the C(restic) format (restic encrypts with the
            repository password) and is refused with it.
        type: str
        default: archive
        choices: [archive, restic]
      restic_password:
        description:
          - Password of the restic repositories (O(require_copy.format=restic)); hidden from output and never
            written to a manifest. A new repository is created with it on the first backup (or the first offsite copy
            of restic-format backups into this location, which otherwise takes the source's password).
        type: str
      restic_password_file:
        description: File holding the restic repository password (for example a mounted Secret).
        type: path
      restic_read_data_subset:
        description:
          - What part of the restic repository's data a verification also reads with C(restic check)
            (C(n%), C(n/t), a size such as C(500M), or C(all)). By default C(restic check) checks the
            repository's structure only, and reads all of its data for a test restore or a drill; the
            verified backups themselves are always read in full through C(restic dump) and compared with
            the SHA-256 their manifest records.
        type: str
"""
