"""tools/make_shards.py on real data: Fashion-MNIST rows and wallpaper-photo crops with corrupt files mixed in."""
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from data_fixtures import BAD_FILES, FASHION, fashion_images, fashion_labels, make_photo_tree, require_data, \
    run_make_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tar_samples(path):
    """{key: {ext: bytes}} of one shard, read with plain tarfile (independent of the loader)."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def sha(path):
    return hashlib.sha1(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    src = tmp_path_factory.mktemp("photos")
    info = make_photo_tree(str(src))
    out = src.parent / "photo_shards"
    assert run_make_shards(src, out, "--resolution", 64, "--shard-size", 8, "--workers", 2) == 0
    return info, out, json.load(open(out / "manifest.json"))


def test_fashion_mnist_grey_png_shards_and_manifest(tmp_path):
    require_data()
    n = 300
    assert run_make_shards(FASHION, tmp_path, "--resolution", 32, "--format", "png", "--limit", n,
                           "--shard-size", 128, "--workers", 2) == 0
    m = json.load(open(tmp_path / "manifest.json"))
    assert m["source"]["kind"] == "idx" and m["tool_version"] and m["channels"] == 1
    assert m["class_map"]["T-shirt/top"] == 0 and m["class_map"]["Ankle boot"] == 9 and m["num_classes"] == 10
    assert m["total"] == n and m["skipped"] == {}
    assert [s["count"] for s in m["buckets"]["32x32"]["shards"]] == [128, 128, 44]
    assert all(e["count"] == 0 for b, e in m["buckets"].items() if b != "32x32")  # 28x28 is square
    labels, images = fashion_labels(n), fashion_images(n)
    assert m["class_counts"] == {str(c): int(k) for c, k in enumerate(np.bincount(labels, minlength=10))}
    seen = 0
    for shard in m["buckets"]["32x32"]["shards"]:
        for key, s in tar_samples(tmp_path / shard["url"]).items():
            meta = json.loads(s["json"])
            row = int(meta["key"].split("-")[1])
            assert int(s["cls"]) == labels[row] == meta["label"] and meta["orig_size"] == [28, 28]
            im = Image.open(io.BytesIO(s["png"]))
            assert im.mode == "L" and im.size == (32, 32)  # grey stays single-channel
            back = np.asarray(im.resize((28, 28), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
            dist = np.abs(images.reshape(n, -1).astype(np.float32) - back).mean(1)
            assert dist.argmin() == row  # the stored picture is that row (upscaled), no other
            seen += 1
    assert seen == n


def test_buckets_by_nearest_aspect_one_bucket_per_shard(photos):
    info, out, m = photos
    assert m["total"] == info["good"]
    assert m["bucket_table"][0] == [64, 64] and len(m["bucket_table"]) == 9
    found = {}
    for name, entry in m["buckets"].items():
        assert sum(s["count"] for s in entry["shards"]) == entry["count"]
        for shard in entry["shards"]:
            assert shard["url"].startswith(name + "-")
            for s in tar_samples(out / shard["url"]).values():
                meta = json.loads(s["json"])
                assert meta["bucket"] == name  # a shard holds one bucket only
                im = Image.open(io.BytesIO(s["jpg"]))
                assert im.size == tuple(entry["size"]) and im.mode == "RGB"
                w, h = meta["orig_size"]
                bw, bh = entry["size"]
                # no other bucket of the table is nearer in log aspect ratio
                d = abs(np.log(w / h) - np.log(bw / bh))
                assert all(d <= abs(np.log(w / h) - np.log(x / y)) + 1e-12 for x, y in m["bucket_table"])
                found[meta["key"]] = name
    for key, bucket in info["known"].items():
        assert found[key] == bucket, key


def test_bad_inputs_counted_and_odd_modes_converted(photos):
    info, out, m = photos
    assert m["skipped"] == BAD_FILES
    keys = {}
    for entry in m["buckets"].values():
        for shard in entry["shards"]:
            for s in tar_samples(out / shard["url"]).values():
                keys[json.loads(s["json"])["key"]] = np.asarray(Image.open(io.BytesIO(s["jpg"])), np.float32)
    for mode in ("mode_cmyk", "mode_16bit", "mode_palette", "mode_rgba", "mode_la"):
        (key,) = [k for k in keys if k.endswith(mode)]
        assert keys[key].shape == (64, 64, 3)
    ramp = keys["class_1/mode_16bit"]
    assert 100 < ramp.mean() < 155 and ramp.min() < 30  # 16-bit scaled to 8-bit, not clipped to white
    rgba = keys["class_0/mode_rgba"]
    assert rgba.mean() > 100  # half-transparent over white, not over black


def test_rerun_resumes_keeps_finished_shards(tmp_path):
    require_data()
    args = [FASHION, tmp_path, "--resolution", 32, "--format", "jpg", "--limit", 200, "--shard-size", 40,
            "--workers", 1, "--channels", 3]
    assert run_make_shards(*args) == 0
    tars = sorted(p for p in os.listdir(tmp_path) if p.endswith(".tar"))
    before = {t: (sha(tmp_path / t), os.stat(tmp_path / t).st_mtime_ns) for t in tars}
    manifest = json.load(open(tmp_path / "manifest.json"))
    # An interrupted run: no manifest, one shard gone, one without its sidecar, one stale .tmp.
    os.remove(tmp_path / "manifest.json")
    os.remove(tmp_path / tars[1])
    os.remove(tmp_path / tars[3].replace(".tar", ".json"))
    shutil.copy(tmp_path / tars[2], tmp_path / (tars[2] + ".tmp"))
    time.sleep(0.01)
    assert run_make_shards(*args) == 0
    for t in tars:
        assert sha(tmp_path / t) == before[t][0], t  # redone shards are byte-identical
        rewritten = os.stat(tmp_path / t).st_mtime_ns != before[t][1]
        assert rewritten == (t in (tars[1], tars[3])), t
    again = json.load(open(tmp_path / "manifest.json"))
    assert {k: v for k, v in again.items() if k != "created"} == {k: v for k, v in manifest.items() if k != "created"}


def test_killed_run_resumes_to_same_result(tmp_path):
    require_data()
    args = [FASHION, None, "--resolution", 32, "--format", "png", "--limit", 1200, "--shard-size", 30,
            "--workers", 1, "--no-progress"]
    full = tmp_path / "full"
    assert run_make_shards(*[full if a is None else a for a in args]) == 0
    part = tmp_path / "part"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_shards.py")] + [str(part if a is None else a) for a in args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (part.exists() and any(p.endswith(".tar") for p in os.listdir(part))):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = [p for p in os.listdir(part) if p.endswith(".tar")]
    assert 0 < len(finished_before) < 40 and not (part / "manifest.json").exists()
    assert run_make_shards(*[part if a is None else a for a in args]) == 0
    tars = sorted(p for p in os.listdir(full) if p.endswith(".tar"))
    assert tars == sorted(p for p in os.listdir(part) if p.endswith(".tar"))
    assert all(sha(full / t) == sha(part / t) for t in tars)
    assert not [p for p in os.listdir(part) if p.endswith(".tmp")]


def test_jobs_write_disjoint_shards_and_last_one_writes_manifest(tmp_path):
    require_data()
    base = [FASHION, tmp_path, "--resolution", 32, "--format", "png", "--limit", 250, "--shard-size", 50,
            "--workers", 1, "--num-jobs", 2]
    assert run_make_shards(*base, "--job-index", 0) == 0
    job0 = {p for p in os.listdir(tmp_path) if p.endswith(".tar")}
    assert job0 == {"32x32-00000.tar", "32x32-00002.tar", "32x32-00004.tar"}
    assert not (tmp_path / "manifest.json").exists()
    assert run_make_shards(*base, "--job-index", 1) == 0
    m = json.load(open(tmp_path / "manifest.json"))
    assert m["total"] == 250 and len(m["buckets"]["32x32"]["shards"]) == 5


def test_labels_file_and_nothing_usable(tmp_path):
    require_data()
    flat = tmp_path / "flat"
    flat.mkdir()
    images, labels = fashion_images(20), fashion_labels(20)
    names = ["shoe" if l in (5, 7, 9) else "other" for l in labels]
    with open(flat / "labels.csv", "w") as f:
        f.write("file,label\n")
        for i, (im, name) in enumerate(zip(images, names)):
            Image.fromarray(im).save(flat / f"img{i:02d}.png")
            f.write(f"img{i:02d}.png,{name}\n")
    assert run_make_shards(flat, tmp_path / "out", "--labels", flat / "labels.csv", "--resolution", 32,
                           "--channels", 1, "--workers", 1) == 0
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert m["class_map"] == {"other": 0, "shoe": 1} and m["source"]["kind"] == "labels"
    assert m["class_counts"] == {"0": names.count("other"), "1": names.count("shoe")}
    junk = tmp_path / "junk" / "a"
    junk.mkdir(parents=True)
    (junk / "x.jpg").write_bytes(b"")
    (junk / "y.png").write_text("nope")
    assert run_make_shards(junk.parent, tmp_path / "junk_out", "--resolution", 32, "--workers", 1) == 1


def test_resize_center_crop_any_size_to_any_bucket():
    from dimscale.data.images import crop_box, resize_center_crop
    rng = np.random.default_rng(0)
    for _ in range(3000):  # float rounding once put the box at -1e-14 and Pillow refused it
        w, h, tw, th = (int(v) for v in rng.integers(8, 2000, 4))
        left, top, right, bottom = crop_box(w, h, tw, th)
        assert 0 <= left <= right <= w and 0 <= top <= bottom <= h
        assert abs((right - left) / (bottom - top) - tw / th) < 1e-6 * tw / th + 1e-9
    im = Image.new("RGB", (301, 173), (10, 200, 30))
    assert resize_center_crop(im, 44, 92, 3).size == (44, 92)


# ------------------------------------------------------------------------------------------------
# Hostile inputs: EXIF rotation, non-UTF-8 names, formats Pillow cannot decode, stems shared by several files
# ------------------------------------------------------------------------------------------------

def shard_samples(out):
    """{json key: (meta, decoded image)} over every shard of a finished output folder."""
    m = json.load(open(out / "manifest.json"))
    got = {}
    for entry in m["buckets"].values():
        for shard in entry["shards"]:
            for s in tar_samples(out / shard["url"]).values():
                meta = json.loads(s["json"])
                got[meta["key"]] = (meta, np.asarray(Image.open(io.BytesIO(s["png"]))))
    return m, got


def test_exif_orientation_applied_before_bucketing(tmp_path):
    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    raw = np.zeros((100, 200, 3), np.uint8)  # stored landscape 200x100: left half red, right half blue
    raw[:, :100, 0], raw[:, 100:, 2] = 255, 255
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a phone held upright
    im.save(src / "phone.jpg", quality=95, exif=exif.tobytes())
    im.save(src / "plain.jpg", quality=95)
    assert run_make_shards(src.parent, tmp_path / "out", "--resolution", 64, "--format", "png", "--workers", 1) == 0
    m, got = shard_samples(tmp_path / "out")
    meta, a = got["c/phone"]
    assert meta["orig_size"] == [100, 200] and meta["bucket"] == "44x92"  # portrait, as displayed
    assert got["c/plain"][0]["bucket"] == "92x44"
    top, bottom = a[: a.shape[0] // 3].mean((0, 1)), a[-a.shape[0] // 3:].mean((0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # turned clockwise: red on top, blue below


def test_any_per_file_failure_is_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    (src / "c").mkdir(parents=True)
    Image.new("RGB", (40, 40), (10, 200, 30)).save(src / "c" / "ok.png")
    # a file name that is not UTF-8 (Latin-1 'café'), written through the bytes API
    with open(os.path.join(os.fsencode(src / "c"), b"caf\xe9.png"), "wb") as f:
        Image.new("RGB", (40, 40), (200, 10, 30)).save(f, "PNG")
    # a DDS header with a pixel format Pillow does not implement: NotImplementedError from Image.open
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + b"\0" * 44 + struct.pack("<2I", 32, 4) + \
        b"XXXX" + b"\0" * 40
    (src / "c" / "broken.dds").write_bytes(dds + b"\0" * 256)
    # three files with one stem, one key each
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(src / "c" / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(src / "c" / "anim.png", save_all=True, append_images=frames[1:])
    frames[0].save(src / "c" / "anim.webp", save_all=True, append_images=frames[1:])
    out = tmp_path / "out"
    args = [src, out, "--resolution", 32, "--format", "png", "--workers", 1]
    assert run_make_shards(*args) == 0
    m, got = shard_samples(out)
    assert m["skipped"] == {"unsupported_format": 1} and m["total"] == 5
    assert {"c/anim.gif", "c/anim.png", "c/anim.webp", "c/ok", os.fsdecode(b"c/caf\xe9")} == set(got)
    assert got[os.fsdecode(b"c/caf\xe9")][1][16, 16, 0] > 150  # the red image under the non-UTF-8 name
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    before = {p: sha(out / p) for p in os.listdir(out) if p.endswith(".tar")}
    assert run_make_shards(*args) == 0  # a rerun keeps every shard (same input hash), no crash
    assert before == {p: sha(out / p) for p in os.listdir(out) if p.endswith(".tar")}


def test_only_the_output_folder_failing_is_fatal(tmp_path):
    (tmp_path / "src" / "c").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "src" / "c" / "a.png")
    (tmp_path / "blocked").write_text("a file where the output folder should be")
    with pytest.raises(SystemExit, match="cannot create the output folder"):
        run_make_shards(tmp_path / "src", tmp_path / "blocked" / "out", "--resolution", 32, "--workers", 1)
