"""Searches whose storage is a URI (`s3://…`, `gs://…`, anything `pyarrow.fs` resolves).

Layout: `<storage>/<name>/` in the object store holds what a local search folder holds. Ray
Train writes each trial's run there itself (`trials/<trial_id>/`, checkpoints included), so the
trials of a multi-node search need no shared file system. The driver's own files (Ray Tune's
experiment state, `search.yaml`, the Optuna study, the MLflow SQLite store when there is no
tracking server, early-stopping records, `best/`) live in a local *staging folder* that a
`Mirror` uploads every few seconds while the search runs and once more at the end; a resume
(on this machine or another) downloads them into a fresh staging folder first.

- The staging folder is `<AMID_RAY_CACHE>/searches/<hash of the URI>/<name>`: the same path on
  every machine with the same cache root, so the absolute paths a SQLite MLflow store records
  stay valid after a resume elsewhere.
- SQLite files are uploaded as consistent snapshots (the backup API), never copied mid-write.
- Credentials and endpoints are pyarrow's (and Ray's): the AWS_* environment variables
  (AWS_ENDPOINT_URL for S3-compatible servers), GOOGLE_APPLICATION_CREDENTIALS, …
- A driver killed between uploads loses at most the last `every_s` seconds of its own files;
  Tune then re-runs what it had not recorded, from the trials' checkpoints in the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from amid_ray.atomic import atomic_folder

#: The local search folder's record of the URI it mirrors.
STORAGE_URI_FILE = "storage_uri"
#: Sub-folders of a search in the store that are not the driver's (Ray Train writes them).
NOT_MIRRORED = ("trials",)
SQLITE_SUFFIXES = (".db", ".sqlite")


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and path of `uri`, as Ray resolves a storage path; a local path (made
    absolute) resolves to the local file system."""
    return pafs.FileSystem.from_uri(uri if is_uri(uri) else str(Path(uri).absolute()))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def uri_of(filesystem: pafs.FileSystem, path: str) -> str:
    """`path` of `filesystem` as a location a user (and `resolve`) can read: a local path as
    is, an object-store path with its scheme (`s3://bucket/key`)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    scheme = {"gcs": "gs"}.get(filesystem.type_name, filesystem.type_name)
    return f"{scheme}://{path}"


def exists(uri: str) -> bool:
    filesystem, path = resolve(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    filesystem, path = resolve(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def staging_folder(search_uri: str) -> Path:
    """The local folder the driver keeps a URI search's own files in (see the module doc)."""
    from amid_ray.sources import cache_dir

    digest = hashlib.sha256(search_uri.rstrip("/").encode()).hexdigest()[:16]
    return cache_dir() / "searches" / digest / search_uri.rstrip("/").rsplit("/", 1)[-1]


def probe_writable(uri: str) -> None:
    """Write and delete a small object under `uri`; raises OSError naming the reason."""
    filesystem, path = resolve(uri)
    probe = f"{path.rstrip('/')}/.amid-ray-write-check-{os.getpid()}"
    with filesystem.open_output_stream(probe) as stream:
        stream.write(b"ok")
    filesystem.delete_file(probe)


def download_folder(uri: str, local: Path, *, skip: tuple[str, ...] = ()) -> int:
    """Copy every file under `uri` into `local` (created; top-level entries named in `skip`
    left out); returns the number of files."""
    filesystem, root = resolve(uri)
    root = root.rstrip("/")
    count = 0
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        relative = info.path[len(root) + 1:]
        if info.type != pafs.FileType.File or relative.split("/", 1)[0] in skip:
            continue
        target = local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(info.path) as stream, target.open("wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        count += 1
    local.mkdir(parents=True, exist_ok=True)
    return count


def download_checkpoint(uri: str, target: Path) -> Path:
    """Replace the local folder `target` with the folder at `uri`, atomically (a crash leaves
    the old complete folder or the new one)."""
    with atomic_folder(target) as staging:
        download_folder(uri, staging)
    return target


def _snapshot_of(path: Path, scratch: Path) -> Path:
    """A consistent copy of SQLite database `path` (written by other connections meanwhile)."""
    copy = scratch / path.name
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        target = sqlite3.connect(copy)
        with target:
            source.backup(target)
        target.close()
    finally:
        source.close()
    return copy


class Mirror:
    """Uploads a local search folder's new and changed files to its URI."""

    def __init__(self, local: Path, uri: str):
        self.local, self.uri = Path(local), uri.rstrip("/")
        self.filesystem, self.root = resolve(self.uri)
        self._sent: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def push(self) -> int:
        """Upload what changed since the last push; returns the number of files sent."""
        with self._lock, tempfile.TemporaryDirectory(prefix="amid-ray-mirror-") as scratch:
            sent = 0
            for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
                relative = path.relative_to(self.local).as_posix()
                if relative.split("/", 1)[0] in NOT_MIRRORED or "/." in f"/{relative}":
                    continue  # Train's folders, and hidden staging files of atomic writes
                try:
                    stat = path.stat()
                except FileNotFoundError:  # replaced meanwhile: the next push sends it
                    continue
                version = (stat.st_size, stat.st_mtime_ns)
                if self._sent.get(relative) == version:
                    continue
                source = (_snapshot_of(path, Path(scratch)) if path.suffix in SQLITE_SUFFIXES
                          else path)
                target = f"{self.root}/{relative}"
                with source.open("rb") as stream, \
                        self.filesystem.open_output_stream(target) as out:
                    shutil.copyfileobj(stream, out, 1 << 20)
                self._sent[relative] = version
                sent += 1
            return sent

    @contextlib.contextmanager
    def running(self, every_s: float = 5.0) -> Iterator[Mirror]:
        """Push now, every `every_s` seconds while the block runs, and once more when it ends
        (errors of the periodic pushes are retried at the next one; the first and last raise)."""
        self.push()
        stop = threading.Event()

        def loop() -> None:
            failing = False
            while not stop.wait(every_s):
                try:
                    self.push()
                    failing = False
                except Exception as error:  # noqa: BLE001 - retried at the next push
                    if not failing:  # said once per run of failures, not every few seconds
                        failing = True
                        print(f"[amid-ray] uploading the search's files to {self.uri} failed "
                              f"({error}); retrying every {every_s:g} s", file=sys.stderr,
                              flush=True)

        thread = threading.Thread(target=loop, name="amid-ray-mirror", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.push()
