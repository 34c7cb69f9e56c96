"""``prepare`` (download + lay out a dataset, or print the manual steps) and ``verify`` (counts, missing files,
undecodable images). The CLI wires these in later; both return a report object and print it unless ``quiet``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError
from .datasets import load_benchmark
from .files import is_image
from .loader import open_image
from .specs import DatasetSpec, Download, get_spec, imagenet_a_wnids, imagenet_r_wnids

__all__ = ["download_file", "extract_archive", "file_checksum", "prepare", "verify", "PrepareReport", "VerifyReport"]

_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------------------------
# Download machinery
# --------------------------------------------------------------------------------------------------------------------


def file_checksum(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algo, sep, digest = checksum.partition(":")
    if not sep or algo not in ("md5", "sha256") or not digest:
        raise DataError(f"checksum must look like 'md5:<hex>' or 'sha256:<hex>', got {checksum!r}")
    return algo, digest.lower()


def download_file(
    url: str,
    dest: str | os.PathLike,
    checksum: str | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, resuming a previous partial download (``dest + '.part'``) with an HTTP Range
    request, then check ``checksum`` (``md5:...`` / ``sha256:...``).

    A server that ignores the Range header is handled by starting over. On a checksum mismatch the downloaded bytes
    are deleted and :class:`DataError` reports expected and actual digests. Network errors keep the partial file so
    the next call resumes.
    """
    dest = Path(dest)
    expected = _parse_checksum(checksum) if checksum else None
    if dest.is_file():
        if expected is None or file_checksum(dest, expected[0]) == expected[1]:
            return dest
        dest.unlink()  # stale or corrupt: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "promptclip"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:  # nothing left to fetch: the partial file is complete
                response = None
            else:
                raise
        if response is not None:
            with response:
                status = getattr(response, "status", 200)
                if offset and status != 206:
                    offset = 0  # the server sent the whole file
                length = response.headers.get("Content-Length")
                total = int(length) + offset if length is not None else None
                mode = "ab" if offset else "wb"
                with open(part, mode) as f, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=not progress, leave=False,
                ) as bar:
                    while True:
                        block = response.read(_CHUNK)
                        if not block:
                            break
                        f.write(block)
                        bar.update(len(block))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"download of {url} failed: {reason}. The partial file {part} is kept; run again to resume."
        ) from None
    if expected is not None:
        actual = file_checksum(part, expected[0])
        if actual != expected[1]:
            part.unlink()
            raise DataError(
                f"checksum mismatch for {url}: expected {expected[0]} {expected[1]}, got {actual}. The downloaded file "
                "was deleted; run again to download it afresh, or check that the URL still serves the same release."
            )
    os.replace(part, dest)
    return dest


def _safe_members_tar(tar: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    base = dest.resolve()
    members = []
    for m in tar.getmembers():
        target = (base / m.name).resolve()
        if base != target and base not in target.parents:
            raise DataError(f"archive member {m.name!r} would be written outside {dest}; refusing to extract")
        if m.issym() or m.islnk():
            link = (target.parent / m.linkname).resolve()
            if base != link and base not in link.parents:
                raise DataError(f"archive link {m.name!r} -> {m.linkname!r} points outside {dest}; refusing")
        members.append(m)
    return members


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a .zip / .tar / .tar.gz / .tgz archive into ``dest``; members escaping ``dest`` are refused."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                base = dest.resolve()
                for info in zf.infolist():
                    target = (base / info.filename).resolve()
                    if base != target and base not in target.parents:
                        raise DataError(f"archive member {info.filename!r} would be written outside {dest}; refusing")
                zf.extractall(dest)
        elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            with tarfile.open(archive) as tf:
                members = _safe_members_tar(tf, dest)
                try:
                    tf.extractall(dest, members=members, filter="data")
                except TypeError:  # Python without extraction filters; members were checked above
                    tf.extractall(dest, members=members)
        else:
            raise DataError(f"do not know how to extract {archive} (expected .zip, .tar, .tar.gz or .tgz)")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DataError(f"archive {archive} is damaged: {e}; delete it and run prepare again") from None
    return dest


def _find(base: Path, name: str, want_dir: bool, depth: int = 3) -> Path | None:
    frontier = [base]
    for _ in range(depth + 1):
        nxt = []
        for d in frontier:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.name == name and (e.is_dir() if want_dir else e.is_file()):
                    return Path(e.path)
                if e.is_dir() and not e.name.startswith("."):
                    nxt.append(Path(e.path))
        frontier = nxt
    return None


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    dataset: str
    root: str
    dataset_dir: str
    status: str = "ok"  # ok | manual | incomplete
    actions: list[str] = field(default_factory=list)
    manual_steps: list[str] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"prepare {self.dataset} (root: {self.root})", f"  dataset folder: {self.dataset_dir}"]
        lines += [f"  - {a}" for a in self.actions]
        for name, digest in self.checksums.items():
            lines.append(f"  sha256 {digest}  {name}")
        if self.manual_steps:
            lines.append("  manual steps:")
            lines += [f"    {i}. {s}" for i, s in enumerate(self.manual_steps, 1)]
        lines.append(f"  status: {self.status}")
        return "\n".join(lines)


@dataclass
class VerifyReport:
    dataset: str
    root: str
    image_dir: str = ""
    images_on_disk: int = 0
    classes: int = 0
    expected_classes: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int | None] = field(default_factory=dict)
    split_source: str = ""
    missing: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)
    unreferenced: int = 0
    decoded: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"verify {self.dataset} (root: {self.root})"]
        if self.image_dir:
            lines.append(f"  image folder: {self.image_dir}")
            lines.append(f"  images on disk: {self.images_on_disk:,}")
            exp = f" (expected {self.expected_classes})" if self.expected_classes is not None else ""
            lines.append(f"  classes: {self.classes}{exp}")
            if self.split_source:
                lines.append(f"  split: {self.split_source}")
            for k, v in self.counts.items():
                e = self.expected.get(k)
                lines.append(f"  {k:5s}: {v:>9,}" + (f"   expected {e:,}" if e is not None else ""))
            lines.append(f"  missing files: {len(self.missing)}")
            lines += [f"    {p}" for p in self.missing[:10]]
            lines.append(f"  undecodable images: {len(self.undecodable)} (decoded {self.decoded:,})")
            lines += [f"    {p}" for p in self.undecodable[:10]]
            if self.unreferenced:
                lines.append(f"  images on disk in no split: {self.unreferenced:,}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        lines.append("  result: " + ("OK" if self.ok else f"{len(self.problems)} problem(s)"))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# prepare / verify
# --------------------------------------------------------------------------------------------------------------------


def _present(spec: DatasetSpec, root: Path) -> bool:
    image_dir = spec.image_path(root)
    return image_dir.is_dir() and any(os.scandir(image_dir))


def prepare(
    name: str | DatasetSpec,
    root: str | os.PathLike | None,
    *,
    download: bool = True,
    keep_archives: bool = False,
    progress: bool = True,
    quiet: bool = False,
) -> PrepareReport:
    """Download and lay out a dataset under ``root`` where a public URL exists; otherwise list the manual steps.

    When the images are in place and the split file is missing but CoOp has a generator, the split is generated
    (seed 1) and saved. Downloads resume after an interruption and are checked against their published checksums.
    """
    spec = get_spec(name) if not isinstance(name, DatasetSpec) else name
    if spec.bundled:
        report = PrepareReport(spec.name, "(package)", "(package)", actions=["bundled with promptclip; nothing to do"])
        if not quiet:
            print(report)
        return report
    if root is None:
        raise DataError(f"prepare {spec.name}: pass root=DIR, the folder that will hold '{spec.dataset_dir}/'")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"prepare {spec.name}: the data root {root} is a file, not a directory")
    root.mkdir(parents=True, exist_ok=True)
    dataset_dir = spec.dataset_path(root)
    report = PrepareReport(spec.name, str(root), str(dataset_dir))

    if _present(spec, root):
        report.actions.append(f"images already present in {spec.image_path(root)}")
    elif spec.downloads and download:
        dataset_dir.mkdir(parents=True, exist_ok=True)
        downloads_dir = root / "_downloads"
        for d in spec.downloads:
            _fetch_one(d, spec, root, dataset_dir, downloads_dir, report, progress, keep_archives)
        _finish_layout(spec, root, dataset_dir, report)
        if not keep_archives and downloads_dir.is_dir() and not any(downloads_dir.iterdir()):
            downloads_dir.rmdir()
    elif spec.downloads:
        report.manual_steps += [f"download {d.url} into {root / '_downloads'}" for d in spec.downloads]
    if not spec.downloads or not _present(spec, root):
        report.manual_steps += list(spec.manual_steps)
    else:
        report.manual_steps += [s for s in spec.manual_steps if s.startswith("Optional")]

    if _present(spec, root) and spec.split_file:
        split_path = dataset_dir / spec.split_file
        if split_path.is_file():
            report.actions.append(f"split file present: {split_path.name}")
        elif spec.generator:
            load_benchmark(spec, root)  # generates and saves with CoOp's procedure
            report.actions.append(
                f"generated {split_path.name} with CoOp's procedure (seed 1); it is not CoOp's published file"
                + (f" — for exact CoOp splits download it from {spec.split_url}" if spec.split_url else "")
            )
        else:
            report.manual_steps.append(
                f"Download {spec.split_file} from {spec.split_url} into {dataset_dir} (required: promptclip cannot "
                "generate this split)."
            )
    if report.manual_steps and not _present(spec, root):
        report.status = "manual"
    elif report.manual_steps and any(not s.startswith("Optional") for s in report.manual_steps):
        report.status = "incomplete"
    if not quiet:
        print(report)
    return report


def _fetch_one(
    d: Download, spec: DatasetSpec, root: Path, dataset_dir: Path, downloads_dir: Path, report: PrepareReport,
    progress: bool, keep_archives: bool,
) -> None:
    if not d.extract:
        target = dataset_dir / d.filename
        download_file(d.url, target, d.checksum, progress=progress)
        report.actions.append(f"downloaded {d.filename}")
        if d.checksum is None:
            report.checksums[d.filename] = file_checksum(target)
        return
    archive = download_file(d.url, downloads_dir / d.filename, d.checksum, progress=progress)
    report.actions.append(f"downloaded {d.filename}" + (" (checksum ok)" if d.checksum else " (no published checksum)"))
    if d.checksum is None:
        report.checksums[d.filename] = file_checksum(archive)
    where = root if d.into == "root" else dataset_dir
    extract_archive(archive, where)
    report.actions.append(f"extracted {d.filename} into {where}")
    if not keep_archives:
        archive.unlink()


def _finish_layout(spec: DatasetSpec, root: Path, dataset_dir: Path, report: PrepareReport) -> None:
    for nested in spec.nested_archives:
        found = _find(dataset_dir, nested, want_dir=False)
        if found is not None:
            extract_archive(found, found.parent)
            found.unlink()
            report.actions.append(f"extracted nested archive {found.name}")
    for src, dst in spec.moves:
        s, t = root / src, root / dst
        if s.is_dir():
            if t.exists() and not any(t.iterdir()):
                t.rmdir()
            if not t.exists():
                shutil.move(str(s), str(t))
                report.actions.append(f"moved {s} -> {t}")
                parent = s.parent
                if parent != root and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
    image_dir = spec.image_path(root)
    if not image_dir.is_dir() and spec.image_dir:
        found = _find(dataset_dir, Path(spec.image_dir).name, want_dir=True)
        if found is not None and found != image_dir:
            image_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(found), str(image_dir))
            report.actions.append(f"moved {found} -> {image_dir}")
    if not image_dir.is_dir():
        raise DataError(
            f"prepare {spec.name}: after download and extraction {image_dir} does not exist; the archive layout may "
            f"have changed. Expected layout:\n{spec.layout}"
        )


def _count_images(image_dir: Path) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(image_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, image_dir)
        for f in filenames:
            if is_image(f):
                found.add(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
    return found


def _decodes(path: str) -> str | None:
    try:
        open_image(path)
        return None
    except DataError as e:
        return str(e)


def verify(
    name: str | DatasetSpec,
    root: str | os.PathLike | None = None,
    *,
    decode: bool = True,
    workers: int = 8,
    quiet: bool = False,
) -> VerifyReport:
    """Check a prepared dataset: images on disk, per-split counts against the expected numbers, classes, missing
    files and (with ``decode``) images that do not decode. Never writes: a missing split is generated in memory."""
    spec = get_spec(name) if not isinstance(name, DatasetSpec) else name
    report = VerifyReport(spec.name, str(root) if root is not None else "(package)")
    report.expected = dict(spec.counts)
    report.expected_classes = spec.num_classes
    try:
        splits = load_benchmark(spec, root, write_split=False)
    except DataError as e:
        report.problems.append(str(e))
        if not quiet:
            print(report)
        return report
    image_dir = Path(splits.image_dir)
    report.image_dir = str(image_dir)
    report.split_source = splits.meta.get("split_source", "")
    if report.split_source == "generated":
        report.notes.append(
            f"{spec.split_file} is missing; the counts are those of a split generated in memory (seed "
            f"{splits.meta.get('split_seed')}); `prepare` saves it"
        )
    on_disk = _count_images(image_dir)
    report.images_on_disk = len(on_disk)
    report.classes = splits.num_classes
    report.counts = splits.counts()
    if spec.test_only:
        report.counts = {"test": len(splits.test)}
    if report.classes != spec.num_classes:
        report.problems.append(f"{report.classes} classes, expected {spec.num_classes}")
    for k, n in report.counts.items():
        e = spec.counts.get(k)
        if e is not None and n != e:
            msg = f"{k} has {n:,} images, expected {e:,}"
            (report.problems if spec.counts_exact else report.notes).append(msg)
    if spec.subset_wnids and splits.wnids is not None:
        fixed = imagenet_a_wnids() if spec.subset_wnids == "a" else imagenet_r_wnids()
        if splits.wnids != fixed:
            extra = sorted(set(splits.wnids) - set(fixed))
            lacking = sorted(set(fixed) - set(splits.wnids))
            report.problems.append(
                f"class folders differ from the fixed {len(fixed)}-wnid list: extra {extra[:5]}, missing {lacking[:5]}"
            )
    records = {r.path: r for part in (splits.train, splits.val, splits.test) for r in part}
    report.missing = sorted(p for p in records if not os.path.isfile(p))
    if report.missing:
        report.problems.append(f"{len(report.missing):,} image(s) listed in the splits are missing")
    referenced = {r.relpath for r in records.values()}
    report.unreferenced = len(on_disk - referenced)
    if decode:
        missing = set(report.missing)
        present = sorted(p for p in records if p not in missing)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
            total=len(present), desc=f"decoding {spec.name}", unit="img", disable=quiet, leave=False
        ) as bar:
            for path, err in zip(present, pool.map(_decodes, present, chunksize=64), strict=True):
                bar.update(1)
                if err is not None:
                    report.undecodable.append(path)
        report.decoded = len(present) - len(report.undecodable)
        if report.undecodable:
            report.problems.append(f"{len(report.undecodable):,} image(s) do not decode")
    if not quiet:
        print(report)
    return report
