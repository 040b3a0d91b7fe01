"""prepare_data.py against an HTTP server of our own on 127.0.0.1: resumed, corrupt and missing downloads, HF_ENDPOINT,
the offline fallback, and local files converted to shards. python -m pytest -q tests/test_prepare_data.py"""
import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare_data as pd
from common import UserError
from conftest import SHARED, needs_shared


def parquet_bytes(n_rows=2000, seed=0):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"document {seed}-{i}: " + "words " * (i % 50) for i in range(n_rows)]}), buf,
                   row_group_size=500)
    return buf.getvalue()


class Server:
    """Serves `files` {path: bytes} with HTTP Range and the sha256 as ETag (as Hugging Face does for LFS files).
    cut[path] = n: the first GET of that path sends only n bytes, then drops the connection. lie = {path}: the
    body is damaged but the ETag names the real file. Every request's (path, Range header) is kept in `log`."""

    def __init__(self):
        self.files, self.cut, self.lie, self.log = {}, {}, set(), []
        self.no_range, self.no_etag, self.redirect = set(), set(), {}  # paths served without Range / ETag; moved
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.end_headers()

            def do_GET(self):
                server.log.append((self.path, self.headers.get("Range")))
                if self.path in server.redirect:  # Hugging Face: a 302 to the CDN, with the sha256 on the 302
                    self.send_response(302)
                    self.send_header("Location", server.redirect[self.path])
                    body = server.files[server.redirect[self.path]]
                    self.send_header("X-Linked-Etag", f'"{hashlib.sha256(body).hexdigest()}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                etag = hashlib.sha256(body).hexdigest()
                if self.path in server.lie:
                    body = body[:100] + bytes(b ^ 0xFF for b in body[100:200]) + body[200:]
                start = int(self.headers["Range"][6:].split("-")[0]) if self.headers.get("Range") else 0
                if self.path in server.no_range:
                    start = 0
                if start >= len(body) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                if self.path not in server.no_etag and self.path not in server.redirect.values():
                    self.send_header("ETag", f'"{etag}"')
                self.end_headers()
                n = server.cut.pop(self.path, None)
                self.wfile.write(body[start:] if n is None else body[start:start + n])
                if n is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_an_interrupted_download_resumes_from_the_bytes_it_has(server, tmp_path):
    body = parquet_bytes()
    server.files["/f.parquet"] = body
    server.cut["/f.parquet"] = len(body) // 3  # the connection drops a third of the way in
    dest = pd.download(f"{server.url}/f.parquet", tmp_path / "f.parquet", retries=3, backoff=0)
    assert dest.read_bytes() == body and not (tmp_path / "f.parquet.part").exists()
    assert server.log == [("/f.parquet", None), ("/f.parquet", f"bytes={len(body) // 3}-")]  # asked for the rest
    assert pd.download(f"{server.url}/f.parquet", dest) == dest and len(server.log) == 2  # there: not fetched again


def test_a_corrupt_download_is_rejected_and_not_left_behind(server, tmp_path):
    server.files["/bad.parquet"] = parquet_bytes()
    server.lie.add("/bad.parquet")                          # bytes that do not match the sha256 the server names
    server.files["/page.parquet"] = b"<html>mirror error page</html>" * 10   # no sha256, not parquet either
    server.no_etag.add("/page.parquet")
    for name, why in (("bad.parquet", "sha256"), ("page.parquet", "not a readable parquet")):
        with pytest.raises(UserError, match=why) as e:
            pd.download(f"{server.url}/{name}", tmp_path / name, retries=2, backoff=0)
        assert f"{server.url}/{name}" in str(e.value)
        assert list(tmp_path.iterdir()) == []  # neither the file nor a .part


def test_a_404_names_the_url_and_the_fix(server, tmp_path):
    with pytest.raises(UserError) as e:
        pd.download(f"{server.url}/nope.jsonl", tmp_path / "nope.jsonl", retries=5, backoff=0)
    assert "HTTP 404" in str(e.value) and f"{server.url}/nope.jsonl" in str(e.value) and "HF_ENDPOINT" in str(e.value)
    assert len(server.log) == 1  # a missing file is not retried


def test_prepare_data_downloads_through_hf_endpoint_in_parallel(server, tmp_path, base_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")  # a mirror, trailing slash and all
    for i in (0, 1, pd.FINEWEB_SHARDS - 1):
        server.files["/" + pd.FINEWEB.format(i)] = parquet_bytes(seed=i)
    dolly = "".join(json.dumps({"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": "qa"}) + "\n"
                    for i in range(50)).encode()
    server.files["/" + pd.DOLLY_FILES["databricks-dolly-15k.jsonl"]] = dolly
    pd.main(["--what=base,dolly", "--num_shards=3", "--workers=3"])
    shards = sorted(p.name for p in (base_dir / "base_data").iterdir())
    # the last shard of the dataset is always the validation one, whatever num_shards
    assert shards == ["shard_00000.parquet", "shard_00001.parquet", f"shard_{pd.FINEWEB_SHARDS - 1:05d}.parquet"]
    assert (base_dir / "data" / "databricks-dolly-15k.jsonl").read_bytes() == dolly
    assert all(path.startswith("/datasets/") for path, _ in server.log)
    pd.main(["--what=base,dolly", "--num_shards=3"])
    assert "already there" in capsys.readouterr().out


def test_no_network_and_no_data_falls_back_to_the_built_in_data(base_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers
    pd.main(["--what=base,dolly"])
    out = capsys.readouterr().out
    assert "no network" in out and "built-in data" in out
    from dataloader import list_shards
    assert len(list_shards(base_dir / "builtin_data" / "base", "train")) == 2
    rows = [json.loads(line) for line in (base_dir / "builtin_data" / "dolly.jsonl").read_text().splitlines()]
    assert len(rows) == 400 and {"instruction", "context", "response", "category"} <= set(rows[0])
    with pytest.raises(UserError, match="no network"):
        pd.main(["--what=chat", "--offline_fallback=False"])


def test_local_files_become_shards_the_loader_reads(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "book.txt").write_text("\n\n".join(f"Paragraph {i}.\nIt goes on." for i in range(60)), encoding="utf-8")
    (src / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"问题{i}", "response": f"回答{i}"}) + "\n"
                                            for i in range(40)) + "not json\n", encoding="utf-8")
    out = tmp_path / "shards"
    n_train, n_val = pd.convert_files(str(src), out, rows_per_shard=30)
    assert (n_train, n_val) == (95, 5)  # every 20th document is held out
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"shard_{i:05d}.parquet" for i in range(4)] + ["val.parquet"]  # 30 + 30 + 30 + 5, then val
    from dataloader import PretrainLoader, list_shards
    from tokenizer import get_tokenizer
    assert len(list_shards(out, "val")) == 1
    with PretrainLoader(out, get_tokenizer("bytes"), split="train", device_batch_size=2, max_seq_len=32) as loader:
        x, y = loader.next_batch()
    assert x.shape == (2, 32)
    texts = [t for p in names for t in pq.read_table(out / p)["text"].to_pylist()]
    assert "Paragraph 0.\nIt goes on." in texts and "问题3\n回答3" in texts
    with pytest.raises(UserError, match="already holds"):
        pd.convert_files(str(src), out)
    (src / "rows.jsonl").unlink()
    (src / "book.txt").write_text("one document only", encoding="utf-8")
    with pytest.raises(UserError, match="too few"):
        pd.convert_files(str(src), tmp_path / "small")
    assert list((tmp_path / "small").iterdir()) == []  # nothing half-made left for a stage to read


def test_redirects_ranges_the_server_ignores_and_a_complete_partial_file(server, tmp_path):
    body = parquet_bytes(seed=3)
    server.files["/cdn/x.parquet"] = body
    server.redirect["/x.parquet"] = "/cdn/x.parquet"   # the sha256 comes only with the redirect
    server.lie.add("/cdn/x.parquet")
    with pytest.raises(UserError, match="sha256"):      # so a damaged body is caught through it
        pd.download(f"{server.url}/x.parquet", tmp_path / "x.parquet", retries=1, backoff=0)
    server.lie.clear()
    assert pd.download(f"{server.url}/x.parquet", tmp_path / "x.parquet", backoff=0).read_bytes() == body
    # a server that ignores Range answers 200 with the whole file: the partial bytes are replaced, not appended to
    server.files["/y.parquet"] = body
    server.no_range.add("/y.parquet")
    (tmp_path / "y.parquet.part").write_bytes(body[:1000])
    assert pd.download(f"{server.url}/y.parquet", tmp_path / "y.parquet", backoff=0).read_bytes() == body
    # killed after the last byte but before the rename: the server has nothing more (416) and the file is kept
    server.files["/z.parquet"] = body
    (tmp_path / "z.parquet.part").write_bytes(body)
    assert pd.download(f"{server.url}/z.parquet", tmp_path / "z.parquet", backoff=0).read_bytes() == body


@needs_shared
def test_eval_files_arrive_byte_for_byte_and_mmlu_is_assembled_per_split(server, tmp_path, monkeypatch):
    """eval.py's files from GitHub (GITHUB_RAW: a proxy, here our server) with their pinned sha256; MMLU's 57
    headerless per-subject files per split become one CSV with a subject column, as ../shared/data/eval has it."""
    import csv
    shared = SHARED / "data" / "eval"
    monkeypatch.setenv("GITHUB_RAW", server.url)
    for name, (path, _) in pd.EVAL_FILES.items():
        server.files["/" + path] = (shared / name).read_bytes()
    for split in pd.MMLU_ROWS:
        per_subject = {}
        with open(shared / f"mmlu_{split}.csv", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                per_subject.setdefault(row["subject"], []).append([row[k] for k in ("question", "A", "B", "C", "D",
                                                                                     "answer")])
        for subject, rows in per_subject.items():
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            server.files["/" + pd.MMLU.format(split=split, subject=subject)] = buf.getvalue().encode()
    out = tmp_path / "eval_data"
    server.cut["/" + pd.EVAL_FILES["gsm8k_test.jsonl"][0]] = 1000  # one file drops mid-way: resumed
    pd.main(["--what=eval", f"--eval_data_dir={out}", "--workers=8"])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*pd.EVAL_FILES, "mmlu_dev.csv", "mmlu_val.csv", "mmlu_test.csv"])  # no parts left
    for name in names:
        assert (out / name).read_bytes() == (shared / name).read_bytes(), name
    # a file that is not the pinned one is refused, not kept
    (out / "piqa_val.jsonl").unlink()
    server.files["/" + pd.EVAL_FILES["piqa_val.jsonl"][0]] = b'{"query": "changed"}\n'
    with pytest.raises(UserError, match="sha256"):
        pd.main(["--what=eval", f"--eval_data_dir={out}", "--retries=1"])
    assert not (out / "piqa_val.jsonl").exists() and not (out / "piqa_val.jsonl.part").exists()


def test_eval_files_without_a_network_fail_only_when_they_are_all_that_was_asked(base_dir, monkeypatch, capsys):
    monkeypatch.setenv("GITHUB_RAW", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    folder = f"--eval_data_dir={base_dir / 'eval_data'}"
    with pytest.raises(UserError, match="GITHUB_RAW"):
        pd.main(["--what=eval", folder])
    pd.main(["--what=dolly,eval", folder, "--offline_fallback=True"])  # training data asked too: a warning, and the run goes on (built-in data here)
    out = capsys.readouterr().out
    assert "evaluation files were not fetched" in out and "built-in data" in out
