"""prepare_data.py: the data every stage reads, downloaded or made, in the folders the stages look in.
out: $NANOCHAT_BASE_DIR/base_data/ (parquet shards: train_base.py's default data_root)
     $NANOCHAT_BASE_DIR/data/      (conversations, GSM8K, Dolly: what --mixture names and finetune_dolly.py reads)
Download:   python prepare_data.py                               # 8 FineWeb-Edu shards, SmolTalk, GSM8K, Dolly
            python prepare_data.py --what=base --num_shards=240  # more pretraining text (~100 MB a shard)
            HF_ENDPOINT=https://hf-mirror.com python prepare_data.py   # through a Hugging Face mirror
Convert:    python prepare_data.py --convert=books/,notes.jsonl --data_root=~/my_shards  # .txt/.jsonl/.parquet
Offline:    python prepare_data.py --builtin=True   # the built-in corpus (also the fallback with no network)

Downloads go to <file>.part and are renamed into place only after their size (and the sha256, when the server
names one) and their format check out, so a stage never reads half a file. A killed download goes on from the
bytes it has (HTTP Range); failures are retried with back-off; several files download at once. Plain HTTP +
pyarrow: no `datasets` package. With no network and no data, it says so and writes the built-in offline corpus
(generated text and Dolly-format instructions, enough to see every stage work) instead.
"""
import http.client
import json
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
from common import UserError, print0
from configurator import apply_overrides
from dataloader import iter_documents

# ---- config (module globals; override with --key=value; -h lists them) -----------------------------------------
what = "base,chat,dolly"      # what to fetch: base (FineWeb-Edu shards), chat (SmolTalk + GSM8K), dolly
num_shards = 8                # FineWeb-Edu shards (~100 MB, ~50 M GPT-2 tokens each); the last one is validation
data_root = ""                # where the pretraining shards go; "" = $NANOCHAT_BASE_DIR/base_data
data_dir = ""                 # where conversation files go; "" = $NANOCHAT_BASE_DIR/data
convert = ""                  # local .txt/.jsonl/.parquet files or folders (comma-separated) to turn into shards
rows_per_shard = 200000       # documents per converted shard (row groups of 1,024 inside)
builtin = False               # write the built-in offline corpus instead of downloading
offline_fallback = True       # no network and no data: write the built-in corpus (and say so) instead of failing
workers = 4                   # files downloaded at once
retries = 5                   # attempts per file, with back-off (1, 2, 4, ... s)
timeout = 60.0                # seconds without a byte before an attempt counts as failed
# ------------------------------------------------------------------------------------------------------------------

# Hugging Face paths (after $HF_ENDPOINT). Pretraining: nanochat's shuffled FineWeb-Edu shards. SmolTalk and GSM8K
# come from the Hub's own parquet conversion of each dataset (refs/convert/parquet), Dolly as its JSONL.
FINEWEB = "datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
FINEWEB_SHARDS = 1823
CONVERTED = "datasets/{}/resolve/refs%2Fconvert%2Fparquet/{}/{}/0000.parquet"
CHAT_FILES = {"smol-smoltalk_train.parquet": CONVERTED.format("HuggingFaceTB/smol-smoltalk", "default", "train"),
              "gsm8k_train.parquet": CONVERTED.format("openai/gsm8k", "main", "train"),
              "gsm8k_test.parquet": CONVERTED.format("openai/gsm8k", "main", "test")}
DOLLY_FILES = {"databricks-dolly-15k.jsonl":
               "datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"}
BUILTIN_DIR = "builtin_data"   # under $NANOCHAT_BASE_DIR: base/ (shards) and dolly.jsonl


def endpoint() -> str:
    """Hugging Face or the mirror the user reaches it through (HF_ENDPOINT, as huggingface_hub reads it)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


# ---- downloading ----

class DownloadError(UserError):
    pass


class _Corrupt(Exception):
    """The bytes arrived but are not the file: wrong size, wrong sha256, or not readable as its format."""


class Progress:
    """One status line on stderr for all downloads together: bytes so far / expected, and the speed."""

    def __init__(self, n_files):
        self.n_files, self.done, self.total, self.lock, self.t0, self.last = n_files, 0, 0, threading.Lock(), \
            time.time(), 0.0

    def expect(self, n):
        with self.lock:
            self.total += n

    def add(self, n):
        with self.lock:
            self.done += n
            now = time.time()
            if now - self.last > 0.5:
                self.last = now
                rate = self.done / max(now - self.t0, 1e-6)
                total = f"{self.total / 1e6:,.1f}" if self.total else "?"
                sys.stderr.write(f"\rdownloading {self.n_files} file(s): {self.done / 1e6:,.1f}/{total} MB "
                                 f"({rate / 1e6:.1f} MB/s)   ")
                sys.stderr.flush()


def _check_format(path: Path, name: str):
    """A parquet file must have its footer, a JSONL file a first line of JSON: the two ways a file arrives wrong
    that its size cannot show (an HTML error page served with status 200, say)."""
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            pq.ParquetFile(path).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise _Corrupt(f"not a readable parquet file ({type(e).__name__}: {str(e)[:120]})") from None
    elif name.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            json.loads(first)
        except ValueError:
            raise _Corrupt(f"its first line is not JSON: {first[:80]!r}") from None


def _sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _KeepRedirectHeaders(urllib.request.HTTPRedirectHandler):
    """Hugging Face answers a file request with a redirect to its CDN; the redirect carries X-Linked-Etag (the
    file's sha256) and X-Linked-Size, which the CDN's answer does not. We keep them."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:  # every hop points back at the request we made, which collects the headers
            new.origin = origin = getattr(req, "origin", req)
            origin.linked = {**{k: headers[k] for k in ("X-Linked-Etag", "X-Linked-Size") if headers.get(k)},
                             **getattr(origin, "linked", {})}
        return new


_OPENER = urllib.request.build_opener(_KeepRedirectHeaders)


def _sha_of(etag):
    etag = (etag or "").strip().removeprefix("W/").strip('"').lower()
    return etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None


def _attempt(url, part: Path, timeout_s, progress):
    """One HTTP request, appended to `part` from the bytes it already has. Returns (expected size or None,
    expected sha256 or None)."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "t4chat-prepare-data",
                                               **({"Range": f"bytes={have}-"} if have else {})})
    with _OPENER.open(req, timeout=timeout_s) as r:
        span = r.headers.get("Content-Range", "")  # "bytes <start>-<end>/<total>"
        m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", span.strip())
        if r.status == 206 and m and int(m.group(1)) == have:  # the server resumes where we are
            total = int(m.group(2))
        else:  # a full answer (or a resume we cannot trust): start over
            if have and progress:
                progress.add(-have)
            have, length = 0, r.headers.get("Content-Length")
            total = int(length) if length and r.status == 200 else None
        linked = getattr(req, "linked", {})  # what the redirects said (see _KeepRedirectHeaders)
        sha = _sha_of(linked.get("X-Linked-Etag")) or _sha_of(r.headers.get("X-Linked-Etag")) \
            or _sha_of(r.headers.get("ETag"))
        if total is not None and progress:
            progress.expect(total - have)
        with open(part, "ab" if have else "wb") as f:
            while True:
                block = r.read(1 << 16)
                if not block:
                    break
                f.write(block)
                if progress:
                    progress.add(len(block))
    return total, sha


def download(url, dest, *, retries=5, timeout=60.0, progress=None, backoff=1.0) -> Path:
    """url -> dest, atomically: resumable through dest.part, retried with back-off, verified before the rename.
    A file already at dest is kept. Raises DownloadError naming the URL and the fix."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last = None
    for attempt in range(max(1, retries)):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            total, sha = _attempt(url, part, timeout, progress)
            size = part.stat().st_size
            if total is not None and size != total:
                last = f"the connection ended after {size:,} of {total:,} bytes"
                continue  # the next attempt asks for the rest
            if sha is not None and _sha256(part) != sha:
                raise _Corrupt(f"its sha256 is not the {sha[:12]}... the server names")
            _check_format(part, dest.name)
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            if e.code == 416:  # nothing after our bytes: complete already (a kill before the rename), or the
                m = re.fullmatch(r"bytes \*/(\d+)", (e.headers.get("Content-Range") or "").strip())  # file changed
                if m and part.exists() and part.stat().st_size == int(m.group(1)):
                    try:
                        _check_format(part, dest.name)
                        os.replace(part, dest)
                        return dest
                    except _Corrupt:
                        pass
                part.unlink(missing_ok=True)
                last = "the server refused to resume (HTTP 416)"
                continue
            if e.code in (401, 403, 404, 410):
                raise DownloadError(
                    f"{url}: HTTP {e.code} ({e.reason}). The file is not there or not public: check the URL; behind "
                    f"a mirror set HF_ENDPOINT (now {endpoint()}), e.g. HF_ENDPOINT=https://hf-mirror.com") from None
            last = f"HTTP {e.code} ({e.reason})"
        except _Corrupt as e:
            part.unlink(missing_ok=True)  # never left behind where a stage or the next attempt could read it
            last = f"the downloaded file was corrupt: {e}"
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    raise DownloadError(f"{url}: failed after {max(1, retries)} attempt(s), last: {last}. Check the network (or set "
                        f"HF_ENDPOINT to a mirror you can reach, now {endpoint()}), then run prepare_data.py again: "
                        f"a partial file resumes from where it stopped")


def download_all(jobs, *, workers=4, retries=5, timeout=60.0) -> list:
    """[(url, dest)] -> the dest paths, `workers` at a time, one progress line for all."""
    todo = [(u, Path(d)) for u, d in jobs if not Path(d).exists()]
    if not todo:
        return [Path(d) for _, d in jobs]
    progress = Progress(len(todo))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(download, u, d, retries=retries, timeout=timeout, progress=progress) for u, d in todo]
        errors = []
        for f in futures:
            try:
                f.result()
            except DownloadError as e:
                errors.append(str(e))
    sys.stderr.write("\n")
    if errors:
        raise DownloadError("\n".join(errors))
    return [Path(d) for _, d in jobs]


def online(timeout_s=5.0) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint(), method="HEAD",
                                                      headers={"User-Agent": "t4chat-prepare-data"}),
                               timeout=timeout_s).close()
        return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


# ---- local files -> shards ----

def _inputs(spec) -> list:
    paths = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        p = Path(item).expanduser()
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl", ".parquet"))
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"convert: no file or folder at {p}")
    if not paths:
        raise UserError(f"convert={spec!r}: no .txt, .jsonl or .parquet file found")
    return paths


class ShardWriter:
    """Streams documents into shard_00000.parquet, shard_00001.parquet, ... of `rows_per_shard` rows (row groups
    of 1,024), every 20th document into val.parquet, so memory holds one row group."""

    def __init__(self, out_dir, rows_per_shard):
        self.out, self.rows_per_shard = Path(out_dir), rows_per_shard
        self.out.mkdir(parents=True, exist_ok=True)
        self.train = self.val = None
        self.n_train = self.n_val = self.shards = 0
        self.buf = {"train": [], "val": []}

    def _writer(self, split):
        import pyarrow as pa
        import pyarrow.parquet as pq
        if split == "val":
            if self.val is None:
                self.val = pq.ParquetWriter(self.out / "val.parquet.tmp", pa.schema([("text", pa.string())]))
            return self.val
        if self.train is None:
            self.train = pq.ParquetWriter(self.out / f"shard_{self.shards:05d}.parquet.tmp",
                                          pa.schema([("text", pa.string())]))
        return self.train

    def _flush(self, split):
        import pyarrow as pa
        if self.buf[split]:
            self._writer(split).write_table(pa.table({"text": self.buf[split]}))
            self.buf[split] = []

    def add(self, text):
        split = "val" if (self.n_train + self.n_val) % 20 == 19 else "train"
        self.buf[split].append(text)
        if split == "val":
            self.n_val += 1
        else:
            self.n_train += 1
        if len(self.buf[split]) >= 1024:
            self._flush(split)
        if split == "train" and self.n_train % self.rows_per_shard == 0:
            self._close_train()

    def _close_train(self):
        self._flush("train")
        if self.train is not None:
            self.train.close()
            self.train, self.shards = None, self.shards + 1

    def close(self) -> tuple:
        """Renames every shard into place at once, so a failed conversion leaves no shard a stage could read.
        val.parquet sorts after every shard_*.parquet: the loader's 'last shard is validation' rule holds."""
        self._close_train()
        self._flush("val")
        if self.val is not None:
            self.val.close()
        tmps = sorted(self.out.glob("*.parquet.tmp"))
        if self.n_val == 0:
            for t in tmps:
                t.unlink()
            return self.n_train, self.n_val
        for t in tmps:
            os.replace(t, t.with_suffix(""))
        return self.n_train, self.n_val


def convert_files(spec, out_dir, rows_per_shard=200000) -> tuple:
    """Local files -> the shard layout train_base.py reads. Returns (training documents, validation documents)."""
    out = Path(out_dir).expanduser()
    if any(out.glob("*.parquet")):
        raise UserError(f"convert: {out} already holds parquet shards; pick an empty --data_root")
    writer = ShardWriter(out, rows_per_shard)
    for path in _inputs(spec):
        for text in iter_documents(path):
            writer.add(text)
    n_train, n_val = writer.close()
    if n_val == 0:
        raise UserError(f"convert: {n_train} document(s) is too few for a validation shard (every 20th document "
                        f"goes there); give more text")
    return n_train, n_val


# ---- the built-in offline corpus ----

def builtin_corpus(root, n_shards=3, docs_per_shard=300, rows_per_group=100, seed=0) -> Path:
    """Parquet shards of synthetic English-ish text with structure a tiny model learns in a few steps: what the
    quick test and the test suite train on when there is no network and no data."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the teacher", "our robot", "the bird"]
    verbs = ["sees", "likes", "finds", "brings", "paints", "counts"]
    objects = ["the red ball", "a small box", "three apples", "the old map", "a blue cup", "seven stones"]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        docs = [" ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                         for _ in range(rng.randint(2, 8))) for _ in range(docs_per_shard)]
        pq.write_table(pa.table({"text": docs}), root / f"shard_{s:05d}.parquet", row_group_size=rows_per_group)
    return root


def builtin_dolly(path, n=400, seed=0) -> Path:
    """Dolly-format rows (instruction, context, response, category) made from the built-in tasks, so the Dolly
    stage runs with no download. Not Dolly: a smoke test of the stage, nothing to measure a model by."""
    from tasks import BUILTIN_TASKS, builtin_examples
    rows = []
    for task in BUILTIN_TASKS:
        for conv in builtin_examples(task, n // len(BUILTIN_TASKS), seed):
            user, answer = conv[-2]["content"], conv[-1]["content"]
            rows.append({"instruction": user, "context": "", "response": answer, "category": task})
    random.Random(seed).shuffle(rows)
    from checkpoint import atomic_write_text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_builtin(base) -> Path:
    """The built-in corpus under <base>/builtin_data/: base/ (shards) and dolly.jsonl."""
    out = Path(base) / BUILTIN_DIR
    if not any((out / "base").glob("*.parquet")):
        builtin_corpus(out / "base")
    if not (out / "dolly.jsonl").exists():
        builtin_dolly(out / "dolly.jsonl")
    return out


# ---- main ----

def jobs_for(parts, root: Path, conv_dir: Path, n_shards) -> list:
    """[(url, dest)] of the parts asked for. The pretraining shards are the first n_shards - 1 plus the very
    last one of the dataset, so the validation shard (the last in name order) is the same for any n_shards."""
    if n_shards < 2:
        raise UserError(f"num_shards={n_shards}: at least 2 (one to train on, the last one for validation)")
    jobs = []
    if "base" in parts:
        picks = [*range(min(n_shards, FINEWEB_SHARDS) - 1), FINEWEB_SHARDS - 1]
        jobs += [(f"{endpoint()}/{FINEWEB.format(i)}", root / f"shard_{i:05d}.parquet") for i in picks]
    if "chat" in parts:
        jobs += [(f"{endpoint()}/{p}", conv_dir / name) for name, p in CHAT_FILES.items()]
    if "dolly" in parts:
        jobs += [(f"{endpoint()}/{p}", conv_dir / name) for name, p in DOLLY_FILES.items()]
    return jobs


def main(argv=None):
    apply_overrides(globals(), sys.argv[1:] if argv is None else argv)
    base = common.base_dir()
    root = Path(data_root).expanduser() if data_root else base / "base_data"
    conv_dir = Path(data_dir).expanduser() if data_dir else base / "data"
    if convert:
        n_train, n_val = convert_files(convert, root, rows_per_shard)
        print0(f"converted {convert}: {n_train:,} training and {n_val:,} validation documents -> {root} "
               f"(train_base.py --data_root={root})")
        return
    if builtin:
        out = write_builtin(base)
        print0(f"built-in data: {out / 'base'} (pretraining shards) and {out / 'dolly.jsonl'} (Dolly-format rows)")
        return
    parts = {p.strip() for p in what.split(",") if p.strip()}
    unknown = parts - {"base", "chat", "dolly"}
    if unknown:
        raise UserError(f"what={what!r}: unknown part(s) {', '.join(sorted(unknown))}; use base, chat, dolly")
    jobs = jobs_for(parts, root, conv_dir, num_shards)
    missing = [(u, d) for u, d in jobs if not d.exists()]
    if not missing:
        print0(f"all {len(jobs)} file(s) already there: {root}, {conv_dir}")
        return
    if not online():
        if not offline_fallback:
            raise DownloadError(f"no network: {endpoint()} does not answer and {len(missing)} file(s) are missing. "
                                f"Set HF_ENDPOINT to a mirror you can reach, or copy the files in by hand")
        out = write_builtin(base)
        print0(f"no network ({endpoint()} does not answer) and no data: using the built-in data instead: "
               f"{out / 'base'} (pretraining shards) and {out / 'dolly.jsonl'} (Dolly-format rows). They show every "
               f"stage working; train on real data with a network, HF_ENDPOINT, or --convert=<your files>")
        return
    print0(f"downloading {len(missing)} file(s) from {endpoint()} ({workers} at a time) into {root} and {conv_dir}")
    download_all(missing, workers=workers, retries=retries, timeout=timeout)
    print0(f"done: {root} (pretraining), {conv_dir} (conversations)")


if __name__ == "__main__":
    common.run(main)
