"""Verified downloads into promptclip's cache: a file is kept under its final name only once its sha256 matches."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from http.client import HTTPException
from pathlib import Path

from ...errors import WeightsError


def cache_dir() -> Path:
    """Where downloaded weights live: ``$PROMPTCLIP_CACHE`` if set, else ``~/.cache/promptclip``."""
    env = os.environ.get("PROMPTCLIP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "promptclip"



def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _local_file_hint(filename: str, dest_dir: Path) -> str:
    return (
        f"To use a copy you already have, pass its path instead of the name: "
        f'promptclip.clip.load("/path/to/{filename}") in Python, or --backbone /path/to/{filename} on the command '
        f"line. Or put the file in the cache as {dest_dir / filename} (cache directory {dest_dir}; set "
        f"PROMPTCLIP_CACHE to move it): it is checked against its sha256 and used without downloading."
    )


def download(url: str, sha256: str, dest_dir: str | os.PathLike, progress: bool = True, timeout: float = 60.0
             ) -> Path:
    """Download ``url`` into ``dest_dir`` (once) and return the verified file's path.

    A cached file with the right sha256 is returned as is; one with a wrong hash is downloaded again (with a
    warning). The download streams into a temporary file in ``dest_dir``, hashed on the fly, and is renamed into
    place only once verified, so an interrupted or corrupt download never leaves a file under the final name.
    """
    dest_dir = Path(dest_dir).expanduser()
    filename = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    target = dest_dir / filename
    sha256 = sha256.lower()
    if target.exists() and not target.is_file():
        raise WeightsError(f"{target} exists and is not a regular file; remove it or choose another cache directory.")
    if target.is_file():
        actual = file_sha256(target)
        if actual == sha256:
            return target
        warnings.warn(
            f"{target} is in the cache but its sha256 is {actual}, not {sha256}; downloading it again.", stacklevel=2
        )
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"cannot create the cache directory {dest_dir}: {e}. Set PROMPTCLIP_CACHE to a "
                           f"writable folder.") from e

    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest, received, expected_size = _stream(url, out, filename, progress, timeout, dest_dir)
        if expected_size is not None and received != expected_size:
            raise WeightsError(
                f"the download of {url} stopped after {received} of {expected_size} bytes (connection lost?). "
                f"Try again. {_local_file_hint(filename, dest_dir)}"
            )
        actual = digest.hexdigest()
        if actual != sha256:
            raise WeightsError(
                f"the file downloaded from {url} has sha256 {actual}, but {sha256} was expected; it was deleted. "
                f"The download was corrupted or the server sent another file: try again. "
                f"{_local_file_hint(filename, dest_dir)}"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; a cache may be shared
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


def _stream(url: str, out, filename: str, progress: bool, timeout: float, dest_dir: Path):
    from tqdm import tqdm

    def failed(reason: object, unreachable: bool = True) -> WeightsError:
        why = ("The machine looks offline or the server is unreachable." if unreachable
               else "The server is reachable but does not serve this file.")
        return WeightsError(f"could not download {url}: {reason}. {why} {_local_file_hint(filename, dest_dir)}")

    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected_size = int(length) if length and length.isdigit() else None
            with tqdm(total=expected_size, unit="B", unit_scale=True, unit_divisor=1024, desc=filename,
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise failed(f"the server answered HTTP {e.code} {e.reason}", unreachable=e.code >= 500) from e
    except urllib.error.URLError as e:
        raise failed(e.reason) from e
    except TimeoutError as e:
        raise failed(f"timed out after {timeout:g} s") from e
    except (ConnectionError, HTTPException) as e:
        raise failed(f"{type(e).__name__}: {e}") from e
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise WeightsError(f"cannot write the download of {url} into {dest_dir}: {e}") from e
        raise failed(e) from e
    return digest, received, expected_size
