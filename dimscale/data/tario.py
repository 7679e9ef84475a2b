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
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
from collections import Counter

from webdataset.gopen import gopen

OPEN_TIMEOUT_S = 60.0
# An encoded image is at most ~1.01x its raw bytes (PNG of noise; JPEG at q100 of tiny images ~1.5x plus its
# tables), so 4x the raw H*W*C bytes, plus room for headers/EXIF/ICC and the json member, is never a real image.
MEMBER_FACTOR = 4
MEMBER_SLACK = 1 << 16
SAFE_NAME = re.compile(r"[A-Za-z0-9._+@%=,-]+(/[A-Za-z0-9._+@%=,-]+)*")  # no spaces, quotes, ;|&$`<>*?(){}
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

def _pax_path(payload: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<name>\\n" records), if any."""
    for line in payload.split(b"\n"):
        _, _, record = line.partition(b" ")
        key, eq, value = record.partition(b"=")
        if eq and key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


def tar_index(fd: int, counter: Counter) -> tuple:
    """-> ([(key, {ext: (offset, size)})], error or None) of an open tar file; reads headers only (pread at
    each header's offset), never the members' data.

    A lean reader instead of tarfile (which costs ~10% of the decode time per sample here): ustar as make_shards
    writes it, plus the pax and GNU long-name headers other WebDataset writers use (the name of the next member).
    Members are grouped into samples by key, webdataset's rule (the key ends at the first dot of the file name).
    A cut or garbled shard returns the samples whose members all lie in the file, and the error.
    """
    samples, pos, long_name = [], 0, None
    try:
        while True:
            header = os.pread(fd, 512, pos)
            counter["bytes_read"] += len(header)
            if len(header) < 512:
                raise EOFError("shard ends without the tar end marker (cut short?)")
            if header.count(0) == 512:
                return samples, None
            field = header[148:156]
            checksum = sum(header) - sum(field) + 256  # the checksum field counts as 8 spaces
            if int(field.strip(b"\0 ") or b"-1", 8) != checksum:
                raise ValueError("bad tar header checksum (not a tar, or garbled)")
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            kind = header[156:157]
            data_at, pos = pos + 512, pos + 512 + size + (-size % 512)
            if kind in (b"x", b"L"):   # pax extended header / GNU long name: they name the next member
                if size > MEMBER_SLACK:
                    raise ValueError(f"a {size}-byte extended tar header (garbled?)")
                payload = os.pread(fd, size, data_at)
                counter["bytes_read"] += len(payload)
                long_name = _pax_path(payload) if kind == b"x" else payload.rstrip(b"\0").decode(
                    "utf-8", "surrogateescape")
                continue
            if kind not in (b"0", b"\0"):   # folders, links, global pax headers: no sample data
                continue
            prefix = header[345:500].rstrip(b"\0").decode("utf-8", "surrogateescape")
            path = long_name or (prefix + "/" if prefix else "") + header[:100].rstrip(b"\0").decode(
                "utf-8", "surrogateescape")
            long_name = None
            folder, slash, name = path.rpartition("/")
            base, dot, ext = name.partition(".")
            if not base or not dot:
                continue
            key = folder + slash + base
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext.lower()] = (data_at, size)
    except Exception as e:  # noqa: BLE001 - any damage: keep the samples whose members all lie in the file
        end = os.fstat(fd).st_size
        return [smp for smp in samples if all(at + size <= end for at, size in smp[1].values())], e


class Shard:
    """An open, indexed shard: sample(k) reads the members of its k-th sample (raw bytes), or raises.

    Opened with open_shard (timeout, regular files only). A stream that cannot seek (pipe:, URLs) is spooled to a
    local temporary file once. `error` holds why the shard could not be opened or indexed to its end (None if
    it was); its `reason` attribute (ShardError), else corrupt_shard, is the skip counter it goes under.
    """

    def __init__(self, url: str, counter: Counter, max_member: int, timeout: float | None = None):
        self.url, self.counter, self.max_member, self.samples, self.f = url, counter, max_member, [], None
        try:
            stream = open_shard(url, timeout)
            raw = stream.raw
            if not isinstance(raw, _Pipe) and getattr(raw, "seekable", lambda: False)():
                self.f = raw                   # a local file: the first block is re-read by the index
            else:
                self.f = tempfile.TemporaryFile()
                self.f.write(stream.head)
                shutil.copyfileobj(raw, self.f)
                counter["bytes_read"] += self.f.tell()
                self.f.flush()  # read back through its descriptor
                stream.close()
            self.fd = self.f.fileno()
            self.samples, self.error = tar_index(self.fd, counter)
        except Exception as e:  # noqa: BLE001 - a shard that cannot be opened is skipped and counted
            self.error = e

    @property
    def skip_reason(self) -> str:
        return getattr(self.error, "reason", "corrupt_shard")

    def sample(self, k: int) -> dict:
        """{"__key__", ext: bytes}; ShardError(oversized_member) for a member over the bound, unread."""
        key, members = self.samples[k]
        if any(size > self.max_member for _, size in members.values()):
            raise ShardError(f"sample {key} has a member over {self.max_member} bytes", "oversized_member")
        out = {"__key__": key}
        for ext, (at, size) in members.items():
            out[ext] = os.pread(self.fd, size, at)  # one call per member: no seek, no buffer in between
            self.counter["bytes_read"] += len(out[ext])
            if len(out[ext]) < size:
                raise EOFError(f"sample {key} is cut short")
        return out

    def close(self):
        if self.f is not None:
            self.f.close()


def shard_samples(url: str, max_member: int, skipped: Counter, timeout: float | None = None):
    """Every readable sample of one shard, in order; what cannot be read is counted in `skipped` by reason."""
    shard = Shard(url, skipped, max_member, timeout)
    try:
        for k in range(len(shard.samples)):
            try:
                yield shard.sample(k)
            except ShardError as e:
                skipped[e.reason] += 1
            except EOFError:
                skipped["corrupt_sample"] += 1
        if shard.error is not None:
            skipped[shard.skip_reason] += 1
    finally:
        shard.close()


def bucket_member_limit(manifest: dict, bucket: str) -> int:
    """Member bound of one bucket's shards: its (w, h) when images were resized, the largest input for 'orig'."""
    if manifest.get("image_format") == "orig":  # original files: up to make_shards' --max-pixels, 4 bytes each
        return member_limit(int((manifest.get("options") or {}).get("max_pixels", DEFAULT_MAX_PIXELS)), 1)
    return member_limit(*manifest["buckets"][bucket]["size"])
