"""The one reader of tools/make_shards.py shards, for the training loader and the FID shard source.

- Manifest shard names are data: each must be a plain relative path inside the shard folder (no `..`, not
  absolute, no shell metacharacters), and it is shlex-quoted before it fills a `data.shard_url` template such
  as `pipe:cat DIR/{shard}`. A bad name is refused with one line, nothing is opened.
- Opening a shard has a timeout (OPEN_TIMEOUT_S, up to its first tar block): a FIFO, a hung `pipe:` command or
  a dead mount is skipped and counted instead of hanging every rank. Local shards must be regular files.
- A member larger than the caller's bound (member_limit: MEMBER_FACTOR x the raw bytes of the largest image the
  bucket holds) is skipped as corrupt without being read into memory; its sample is dropped and counted.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
import subprocess
import threading
from collections import Counter

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

OPEN_TIMEOUT_S = 60.0
# An encoded image is at most ~1.01x its raw bytes (PNG of noise; JPEG at q100 of tiny images ~1.5x plus its
# tables), so 4x the raw H*W*C bytes, plus room for headers/EXIF/ICC and the json member, is never a real image.
MEMBER_FACTOR = 4
MEMBER_SLACK = 1 << 16
SAFE_NAME = re.compile(r"[A-Za-z0-9._+@%=,-]+(/[A-Za-z0-9._+@%=,-]+)*")  # no spaces, quotes, ;|&$`<>*?(){}
CHUNK = 1 << 20
DEFAULT_MAX_PIXELS = 89_478_485  # tools/make_shards.py --max-pixels default (Pillow's bomb limit)


class ShardError(OSError):
    """A shard that cannot be read; `reason` is the skip counter it goes under."""

    def __init__(self, message: str, reason: str = "corrupt_shard"):
        super().__init__(message)
        self.reason = reason


def member_limit(width: int, height: int, channels: int = 4) -> int:
    """Largest tar member accepted for an image of at most width x height x channels (4 covers RGBA/CMYK)."""
    return MEMBER_FACTOR * width * height * channels + MEMBER_SLACK


# ------------------------------------------------------------------------------------------------
# Manifest and shard names
# ------------------------------------------------------------------------------------------------

def read_manifest(path: str) -> tuple:
    """manifest.json (or a folder holding one) -> (manifest dict, folder the shard urls are relative to)."""
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.shards: no manifest at '{path}'; write shards with tools/make_shards.py "
                                f"and point data.shards at its output folder or manifest.json")
    with open(path, "rb") as f:
        try:
            manifest = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"'{path}' is not a JSON manifest ({str(e)[:80]}); rewrite it with tools/make_shards.py")
    if not isinstance(manifest, dict) or manifest.get("format") != "dimscale-shards":
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"'{path}' is not a tools/make_shards.py manifest (format={got!r})")
    return manifest, os.path.dirname(os.path.abspath(path))


def check_shard_name(name) -> str:
    """A manifest shard name, or ValueError: it must be a plain relative path inside the shard folder."""
    parts = name.split("/") if isinstance(name, str) else []
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in parts or name.startswith("-"):
        raise ValueError(f"manifest shard url {name!r} is refused: shard urls must be relative paths inside the "
                         f"shard folder (letters, digits, ._-/ only, no '..', not absolute); rewrite the manifest "
                         f"with tools/make_shards.py")
    return name


def shard_urls(entry: dict, base: str, url_template: str) -> list:
    """Local paths next to the manifest, or data.shard_url with {shard} filled in (e.g. 'pipe:curl -s URL/{shard}')."""
    names = [check_shard_name(s.get("url") if isinstance(s, dict) else s) for s in entry["shards"]]
    if url_template:
        return [url_template.format(shard=shlex.quote(n)) for n in names]
    return [os.path.join(base, n) for n in names]


# ------------------------------------------------------------------------------------------------
# Opening a shard
# ------------------------------------------------------------------------------------------------

class _Pipe:
    """stdout of a `pipe:` command in its own session, so closing kills the whole command (sh and its children)."""

    def __init__(self, cmd: str):
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.read = self.proc.stdout.read

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdout.close()
        self.proc.wait()


class _Stream:
    """A shard stream whose first block was read already (under the open timeout)."""

    def __init__(self, raw, head: bytes):
        self.raw, self.head = raw, head

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out + (self.raw.read(n - len(out)) if len(out) < n else b"")
        return self.raw.read(n)

    def skip(self, n: int) -> None:
        """Drop n bytes without holding them: seek on files, read in chunks on pipes."""
        take = min(n, len(self.head))
        self.head, n = self.head[take:], n - take
        seekable = getattr(self.raw, "seekable", lambda: False)()
        if n and seekable:
            self.raw.seek(n, os.SEEK_CUR)
            return
        while n > 0:
            got = len(self.raw.read(min(n, CHUNK)))
            if got == 0:
                raise EOFError("shard ends inside a member (cut short?)")
            n -= got

    def close(self) -> None:
        self.raw.close()


def open_shard(url: str, timeout: float | None = None) -> _Stream:
    """Open a shard (path, file:, pipe: or a URL gopen knows) and read its first block within `timeout` seconds."""
    timeout = OPEN_TIMEOUT_S if timeout is None else timeout
    local = not url.startswith("pipe:") and "://" not in url
    if local:
        path = url[5:] if url.startswith("file:") else url
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            raise ShardError(f"{url} is not a regular file", "not_a_file")
    box: dict = {}

    def first_block():
        try:
            box["raw"] = _Pipe(url[5:]) if url.startswith("pipe:") else open(path, "rb") if local else gopen(url)
            box["head"] = box["raw"].read(512)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=first_block, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if "raw" in box:
            box["raw"].close()  # kills a hung pipe: command; a blocked local open stays parked in its daemon thread
        raise ShardError(f"{url} did not open within {timeout:g} s", "shard_timeout")
    if "error" in box:
        raise box["error"]
    return _Stream(box["raw"], box["head"])


# ------------------------------------------------------------------------------------------------
# Reading samples
# ------------------------------------------------------------------------------------------------

def read_samples(stream: _Stream, max_member: int, skipped: Counter):
    """Samples {"__key__", ext: bytes} of a ustar stream as make_shards writes it; raises on a cut or garbled shard.

    A lean reader instead of tarfile + webdataset.group_by_keys: Python's tarfile costs ~10% of the decode time
    per sample (three members each) on this path. Files are grouped by webdataset's base_plus_ext rule. A member
    over `max_member` bytes is skipped unread and its sample dropped (counted as oversized_member).
    """
    sample, bad = None, False
    while True:
        header = stream.read(512)
        if len(header) < 512:
            raise EOFError("shard ends without the tar end marker (cut short?)")
        if header.count(0) == 512:
            break
        checksum = sum(header[:148]) + 256 + sum(header[156:])  # the checksum field counts as 8 spaces
        if int(header[148:156].strip(b"\0 ") or b"-1", 8) != checksum:
            raise ValueError("bad tar header checksum (not a tar, or garbled)")
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        if header[156:157] not in (b"0", b"\0"):
            if header[156:157] in (b"x", b"g", b"L", b"K"):
                raise ValueError("pax/GNU long-name tar headers are not supported; write shards with tools/make_shards.py")
            stream.skip(size + (-size % 512))
            continue
        prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace")
        name = (prefix + "/" if prefix else "") + header[:100].rstrip(b"\0").decode("utf-8", "replace")
        key, ext = base_plus_ext(name)
        if key is not None and sample is not None and sample["__key__"] != key:
            if not bad:
                yield sample
            sample, bad = None, False
        if size > max_member:
            stream.skip(size + (-size % 512))
            skipped["oversized_member"] += 1
            bad = True
            if key is not None and sample is None:
                sample = {"__key__": key}
            continue
        data = stream.read(size)
        if len(data) < size:
            raise EOFError("shard ends inside a member (cut short?)")
        stream.read(-size % 512)
        if key is None:
            continue
        if sample is None:
            sample = {"__key__": key}
        sample[ext.lower()] = data
    if sample is not None and not bad:
        yield sample


def shard_samples(url: str, max_member: int, skipped: Counter, timeout: float | None = None):
    """Open `url` (with the timeout) and yield its samples; the stream is closed when the generator ends."""
    stream = open_shard(url, timeout)
    try:
        yield from read_samples(stream, max_member, skipped)
    finally:
        stream.close()


def bucket_member_limit(manifest: dict, bucket: str) -> int:
    """Member bound of one bucket's shards: its (w, h) when images were resized, the largest input for 'orig'."""
    if manifest.get("image_format") == "orig":  # original files: up to make_shards' --max-pixels, 4 bytes each
        return member_limit(int((manifest.get("options") or {}).get("max_pixels", DEFAULT_MAX_PIXELS)), 1)
    return member_limit(*manifest["buckets"][bucket]["size"])
