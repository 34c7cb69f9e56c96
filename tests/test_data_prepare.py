"""prepare / verify and the download machinery, against a local HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import hashlib
import io
import shutil
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from promptclip.data import DatasetSpec, Download, download_file, extract_archive, load_splits, prepare, verify
from promptclip.data.protocol import write_split
from promptclip.errors import DataError


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        data = srv.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.end_headers()
            return
        if rng and srv.honor_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.honor_range = {}, [], True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _sample_jpegs(n_per_class=10):
    s = load_splits("eurosat-sample")
    by = {}
    for r in s.test:
        by.setdefault(r.relpath.split("/")[0], []).append(r)
    return {c: rs[:n_per_class] for c, rs in list(by.items())[:2]}


def _zip_bytes(prefix="2750/"):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for rs in _sample_jpegs().values():
            for r in rs:
                zf.writestr(prefix + r.relpath, Path(r.path).read_bytes())
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------------------ download


def test_download_resumes_a_partial_file(server, tmp_path):
    srv, base = server
    data = _zip_bytes()
    srv.files["/toy.zip"] = data
    dest = tmp_path / "toy.zip"
    (tmp_path / "toy.zip.part").write_bytes(data[:1000])
    download_file(base + "/toy.zip", dest, _sha(data), progress=False)
    assert dest.read_bytes() == data and not (tmp_path / "toy.zip.part").exists()
    assert srv.requests == [("/toy.zip", "bytes=1000-")]
    # present and verified: no second request
    download_file(base + "/toy.zip", dest, _sha(data), progress=False)
    assert len(srv.requests) == 1


def test_download_server_without_range_support_restarts(server, tmp_path):
    srv, base = server
    srv.honor_range = False
    data = b"x" * 5000 + b"y" * 5000
    srv.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(b"garbage!!")
    download_file(base + "/f.bin", tmp_path / "f.bin", "md5:" + hashlib.md5(data).hexdigest(), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_download_complete_part_file_gets_416(server, tmp_path):
    srv, base = server
    data = b"abc" * 100
    srv.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data)
    download_file(base + "/f.bin", tmp_path / "f.bin", _sha(data), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_download_checksum_mismatch(server, tmp_path):
    srv, base = server
    srv.files["/f.bin"] = b"the real content"
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DataError) as e:
        download_file(base + "/f.bin", tmp_path / "f.bin", wrong, progress=False)
    msg = str(e.value)
    assert "checksum mismatch for " + base + "/f.bin" in msg and "expected sha256 " + "0" * 64 in msg
    assert hashlib.sha256(b"the real content").hexdigest() in msg
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_download_errors_keep_the_partial_file(server, tmp_path):
    srv, base = server
    (tmp_path / "gone.bin.part").write_bytes(b"12345")
    with pytest.raises(DataError, match="download of .*/gone.bin failed.*run again to resume"):
        download_file(base + "/gone.bin", tmp_path / "gone.bin", progress=False)
    assert (tmp_path / "gone.bin.part").read_bytes() == b"12345"
    with pytest.raises(DataError, match="checksum must look like"):
        download_file(base + "/x", tmp_path / "x", "crc32:1234", progress=False)


def test_extract_refuses_path_traversal(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../escape.txt", "nope")
    (tmp_path / "bad.zip").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="outside"):
        extract_archive(tmp_path / "bad.zip", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


# ------------------------------------------------------------------------------------------------------------- prepare


def _toy_spec(url: str, checksum: str | None) -> DatasetSpec:
    return DatasetSpec(
        name="toy", coop_name="Toy", title="Toy", dataset_dir="toy", image_dir="2750", template="a photo of {}.",
        num_classes=2, counts={"train": 10, "val": 4, "test": 6}, split_file="split_zhou_Toy.json",
        generator="folder", downloads=(Download(url, "toy.zip", checksum),), layout="toy/\n  2750/",
    )


def test_prepare_downloads_extracts_generates_split_and_verifies(server, tmp_path, capsys):
    srv, base = server
    data = _zip_bytes()
    srv.files["/toy.zip"] = data
    spec = _toy_spec(base + "/toy.zip", _sha(data))
    report = prepare(spec, tmp_path, progress=False)
    assert report.status == "ok", str(report)
    assert (tmp_path / "toy" / "2750").is_dir() and (tmp_path / "toy" / "split_zhou_Toy.json").is_file()
    assert not (tmp_path / "_downloads").exists()
    out = capsys.readouterr().out
    assert "prepare toy" in out and "generated split_zhou_Toy.json" in out
    v = verify(spec, tmp_path, quiet=True)
    assert v.ok, str(v)
    assert v.images_on_disk == 20 and v.counts == {"train": 10, "val": 4, "test": 6} and v.decoded == 20
    # running again does nothing new
    again = prepare(spec, tmp_path, quiet=True)
    assert "images already present" in again.actions[0] and len(srv.requests) == 1


def test_prepare_without_checksum_reports_sha256(server, tmp_path):
    srv, base = server
    data = _zip_bytes()
    srv.files["/toy.zip"] = data
    report = prepare(_toy_spec(base + "/toy.zip", None), tmp_path, progress=False, quiet=True)
    assert report.checksums == {"toy.zip": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("name", ["stanford_cars", "sun397", "ucf101", "imagenet", "imagenet_sketch"])
def test_prepare_prints_manual_steps_where_no_url_exists(tmp_path, name, capsys):
    report = prepare(name, tmp_path)
    assert report.status == "manual" and report.manual_steps
    assert "manual steps:" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------------------- verify


def test_verify_reports_counts_missing_and_undecodable(tmp_path):
    src = _sample_jpegs(5)
    img_dir = tmp_path / "eurosat" / "2750"
    records = []
    for y, (c, rs) in enumerate(sorted(src.items())):
        (img_dir / c).mkdir(parents=True)
        for r in rs:
            shutil.copy(r.path, img_dir / r.relpath)
            records.append(r.__class__(str(img_dir / r.relpath), y, c, r.relpath))
    (img_dir / records[1].relpath).write_bytes(b"broken")
    (img_dir / records[2].relpath).unlink()
    write_split(tmp_path / "eurosat" / "split_zhou_EuroSAT.json", records[:6], records[6:8], records[8:])
    report = verify("eurosat", tmp_path, quiet=True)
    assert not report.ok
    assert report.images_on_disk == 9 and report.counts == {"train": 6, "val": 2, "test": 2}
    assert [Path(p).name for p in report.missing] == [Path(records[2].path).name]
    assert [Path(p).name for p in report.undecodable] == [Path(records[1].path).name]
    text = str(report)
    assert "train has 6 images, expected 13,500" in text and "2 classes, expected 10" in text
    assert "1 image(s) listed in the splits are missing" in text and "1 image(s) do not decode" in text


def test_verify_missing_root_is_reported(tmp_path):
    report = verify("eurosat", tmp_path / "nowhere", quiet=True)
    assert not report.ok and "does not exist" in report.problems[0]


# --------------------------------------------------------------------------------------------------- load error paths


def test_missing_root_errors(tmp_path):
    with pytest.raises(DataError, match="needs a data root"):
        load_splits("eurosat")
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist"):
        load_splits("eurosat", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"dataset folder .*/eurosat not found for EuroSAT") as e:
        load_splits("eurosat", tmp_path)
    assert "2750/" in str(e.value) and "promptclip data prepare eurosat" in str(e.value)


def test_missing_split_file_without_generator(tmp_path):
    (tmp_path / "stanford_cars").mkdir()
    with pytest.raises(DataError) as e:
        load_splits("stanford_cars", tmp_path)
    msg = str(e.value)
    assert "split file " + str(tmp_path / "stanford_cars" / "split_zhou_StanfordCars.json") + " not found" in msg
    assert "cannot generate" in msg and "drive.google.com" in msg


def test_empty_class_folder_in_a_benchmark(tmp_path):
    (tmp_path / "eurosat" / "2750" / "Forest").mkdir(parents=True)
    (tmp_path / "eurosat" / "2750" / "River").mkdir()
    (tmp_path / "eurosat" / "2750" / "River" / "River_1.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"class folder .*2750/Forest contains no images"):
        load_splits("eurosat", tmp_path)
