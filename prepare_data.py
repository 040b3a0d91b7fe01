"""prepare_data.py: the data every stage reads, downloaded or made, in the folders the stages look in.
out: $NANOCHAT_BASE_DIR/base_data/ (parquet shards: train_base.py's default data_root)
     $NANOCHAT_BASE_DIR/data/      (conversations, GSM8K, Dolly: what --mixture names and finetune_dolly.py reads)
     $NANOCHAT_BASE_DIR/eval_data/ (ARC, PIQA, Winogrande, LAMBADA, MMLU, GSM8K test, IFEval: what eval.py reads)
Download:   python prepare_data.py                               # 8 FineWeb-Edu shards, SmolTalk, GSM8K, Dolly, evals
            python prepare_data.py --what=base --num_shards=240  # more pretraining text (~100 MB a shard)
            HF_ENDPOINT=https://hf-mirror.com python prepare_data.py   # through a Hugging Face mirror
            GITHUB_RAW=https://<proxy>/https://raw.githubusercontent.com python prepare_data.py --what=eval
Convert:    python prepare_data.py --convert=books/,notes.jsonl --data_root=~/my_shards  # .txt/.jsonl/.parquet
Offline:    python prepare_data.py --builtin=True   # the built-in corpus (also the fallback with no network)

Downloads go to <file>.part and are renamed into place only after their size (and the sha256, when the server
names one) and their format check out, so a stage never reads half a file. A killed download goes on from the
bytes it has (HTTP Range); failures are retried with back-off; several files download at once. Plain HTTP +
pyarrow: no `datasets` package. With no network and no data, it says so and writes the built-in offline corpus
(generated text and Dolly-format instructions, enough to see every stage work) instead.
"""
import contextlib
import csv
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
what = "base,chat,dolly,eval" # what to fetch: base (FineWeb-Edu shards), chat (SmolTalk + GSM8K), dolly, eval
num_shards = 8                # FineWeb-Edu shards (~100 MB, ~50 M GPT-2 tokens each); the last one is validation
data_root = ""                # where the pretraining shards go; "" = $NANOCHAT_BASE_DIR/base_data
data_dir = ""                 # where conversation files go; "" = $NANOCHAT_BASE_DIR/data
eval_data_dir = ""            # where eval.py's task files go; "" = $NANOCHAT_BASE_DIR/eval_data
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

# eval.py's files, byte for byte the ones lm-evaluation-harness-style local evaluations use (llm-foundry's local
# copies, the GSM8K and IFEval originals), from GitHub at pinned commits with their sha256 (after $GITHUB_RAW).
FOUNDRY = "mosaicml/llm-foundry/8c8dd48f72168c5d51e2f7b151595892a8fba43d/scripts/eval/local_data/"
EVAL_FILES = {  # name: (path, sha256)
    "arc_easy_test.jsonl": (FOUNDRY + "world_knowledge/arc_easy.jsonl",
                            "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5"),
    "arc_challenge_test.jsonl": (FOUNDRY + "world_knowledge/arc_challenge.jsonl",
                                 "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636"),
    "piqa_val.jsonl": (FOUNDRY + "commonsense_reasoning/piqa.jsonl",
                       "d2870e73aec5154df3faf259b7700876e11608eebdf69e9d6667435673dbe4e0"),
    "winogrande_dev.jsonl": (FOUNDRY + "language_understanding/winogrande.jsonl",
                             "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7"),
    "lambada_openai.jsonl": (FOUNDRY + "language_understanding/lambada_openai.jsonl",
                             "411bfbe5b9054346b6a19299c0242670adbefb9162efd958593cbc0290b8c9dc"),
    "gsm8k_test.jsonl": ("openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data/"
                         "test.jsonl", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    "ifeval_input_data.jsonl": ("Podtech-AI/IFEval/5bdf377eb9cc20f16d377dc5c38413cee22550a6/data/input_data.jsonl",
                                "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"),
}
# MMLU: one headerless CSV per subject and split upstream; eval.py reads one file per split with a subject column
MMLU = "hendrycks/test/785eba57b455b9f9be12a0d3c1106d67274fea0e/data/{split}/{subject}_{split}.csv"
MMLU_ROWS = {"dev": 285, "val": 1542, "test": 14079}
MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence "
    "logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes "
    "moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine "
    "professional_psychology public_relations security_studies sociology us_foreign_policy virology world_religions"
).split()


def endpoint() -> str:
    """Hugging Face or the mirror the user reaches it through (HF_ENDPOINT, as huggingface_hub reads it)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def github_raw() -> str:
    """GitHub's raw files, or a proxy in front of them (GITHUB_RAW: where raw.githubusercontent.com is blocked,
    a prefix proxy such as https://<proxy>/https://raw.githubusercontent.com)."""
    return (os.environ.get("GITHUB_RAW") or "https://raw.githubusercontent.com").rstrip("/")


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


def download(url, dest, *, retries=5, timeout=60.0, progress=None, backoff=1.0, sha256=None) -> Path:
    """url -> dest, atomically: resumable through dest.part, retried with back-off, verified before the rename
    (against `sha256` when given, else the one the server names). A file already at dest is kept. Raises
    DownloadError naming the URL and the fix."""
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
            sha = sha256 or sha
            size = part.stat().st_size
            if total is not None and size != total:
                last = f"the connection ended after {size:,} of {total:,} bytes"
                continue  # the next attempt asks for the rest
            if sha is not None and _sha256(part) != sha:
                raise _Corrupt(f"its sha256 is not the {sha[:12]}... {'expected' if sha256 else 'the server names'}")
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
                    f"a mirror set {_mirror_hint(url)}") from None
            last = f"HTTP {e.code} ({e.reason})"
        except _Corrupt as e:
            part.unlink(missing_ok=True)  # never left behind where a stage or the next attempt could read it
            last = f"the downloaded file was corrupt: {e}"
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    raise DownloadError(f"{url}: failed after {max(1, retries)} attempt(s), last: {last}. Check the network (or set "
                        f"{_mirror_hint(url)}), then run prepare_data.py again: a partial file resumes from where it "
                        f"stopped")


def _mirror_hint(url) -> str:
    if url.startswith(github_raw()):
        return f"GITHUB_RAW to a proxy you can reach (now {github_raw()})"
    return f"HF_ENDPOINT to a mirror you can reach (now {endpoint()}), e.g. HF_ENDPOINT=https://hf-mirror.com"


def download_all(jobs, *, workers=4, retries=5, timeout=60.0) -> list:
    """[(url, dest)] or [(url, dest, sha256)] -> the dest paths, `workers` at a time, one progress line for all."""
    todo = [(j[0], Path(j[1]), (j[2:] or (None,))[0]) for j in jobs if not Path(j[1]).exists()]
    if not todo:
        return [Path(j[1]) for j in jobs]
    progress = Progress(len(todo))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(download, u, d, retries=retries, timeout=timeout, progress=progress, sha256=sha)
                   for u, d, sha in todo]
        errors = []
        for f in futures:
            try:
                f.result()
            except DownloadError as e:
                errors.append(str(e))
    sys.stderr.write("\n")
    if errors:
        raise DownloadError("\n".join(errors))
    return [Path(j[1]) for j in jobs]


def online(url=None, timeout_s=5.0) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url or endpoint(), method="HEAD",
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


def eval_jobs(folder: Path) -> list:
    """[(url, dest, sha256)] of eval.py's files not there yet; MMLU's per-subject files go to .mmlu_parts/ and
    become one file per split (assemble_mmlu)."""
    jobs = [(f"{github_raw()}/{path}", folder / name, sha) for name, (path, sha) in EVAL_FILES.items()]
    for split in MMLU_ROWS:
        if not (folder / f"mmlu_{split}.csv").exists():
            jobs += [(f"{github_raw()}/{MMLU.format(split=split, subject=s)}",
                      folder / ".mmlu_parts" / split / f"{s}.csv", None) for s in MMLU_SUBJECTS]
    return [j for j in jobs if not j[1].exists()]


def assemble_mmlu(folder: Path):
    """mmlu_<split>.csv (header subject,question,A,B,C,D,answer; the subjects in name order) from the downloaded
    per-subject files, written atomically and checked against MMLU's row counts; the parts are then removed."""
    import shutil
    for split, n_rows in MMLU_ROWS.items():
        parts = folder / ".mmlu_parts" / split
        dest = folder / f"mmlu_{split}.csv"
        if dest.exists() or not parts.is_dir():
            continue
        tmp = dest.with_name(dest.name + ".tmp")
        n = 0
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            w = csv.writer(out)  # the csv module's default dialect (CRLF rows), quoting only where needed
            w.writerow(["subject", "question", "A", "B", "C", "D", "answer"])
            for subject in MMLU_SUBJECTS:
                with open(parts / f"{subject}.csv", encoding="utf-8", newline="") as f:
                    for row in csv.reader(f):
                        if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                            tmp.unlink()
                            raise DownloadError(f"MMLU {subject}_{split}.csv: a row is not question,A,B,C,D,answer: "
                                                f"{row[:2]!r}... Delete {parts} and run prepare_data.py --what=eval "
                                                f"again")
                        w.writerow([subject, *row])
                        n += 1
        if n != n_rows:
            tmp.unlink()
            raise DownloadError(f"MMLU {split}: {n:,} questions, MMLU has {n_rows:,}. Delete {parts} and run "
                                f"prepare_data.py --what=eval again")
        os.replace(tmp, dest)
        shutil.rmtree(parts)
    with contextlib.suppress(OSError):  # empty once every split is assembled
        (folder / ".mmlu_parts").rmdir()


def fetch_eval(folder: Path, required: bool):
    """eval.py's files into `folder`. Only fatal when they are all that was asked for: a training run does not
    need them (eval.py then runs the built-in tasks and says which files are missing)."""
    jobs = eval_jobs(folder)
    if not jobs:
        assemble_mmlu(folder)  # parts complete from a run killed before it assembled them
        return
    try:
        if not online(github_raw()):
            raise DownloadError(f"no network: {github_raw()} does not answer. Set GITHUB_RAW to a proxy you can "
                                f"reach, or copy the files (../shared/data/eval has them) into {folder}")
        print0(f"downloading {len(jobs)} evaluation file(s) from {github_raw()} into {folder}")
        download_all(jobs, workers=workers, retries=retries, timeout=timeout)
        assemble_mmlu(folder)
        print0(f"done: {folder} (eval.py's tasks)")
    except DownloadError as e:
        if required:
            raise
        print0(f"warning: the evaluation files were not fetched ({str(e).splitlines()[0]}); eval.py will run the "
               f"built-in tasks only. Fetch them later: python prepare_data.py --what=eval")


def main(argv=None):
    apply_overrides(globals(), sys.argv[1:] if argv is None else argv)
    base = common.base_dir()
    root = Path(data_root).expanduser() if data_root else base / "base_data"
    conv_dir = Path(data_dir).expanduser() if data_dir else base / "data"
    eval_dir = Path(eval_data_dir).expanduser() if eval_data_dir else base / "eval_data"
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
    unknown = parts - {"base", "chat", "dolly", "eval"}
    if unknown:
        raise UserError(f"what={what!r}: unknown part(s) {', '.join(sorted(unknown))}; use base, chat, dolly, eval")
    jobs = jobs_for(parts, root, conv_dir, num_shards)
    missing = [(u, d) for u, d in jobs if not d.exists()]
    if "eval" in parts:
        fetch_eval(eval_dir, required=parts == {"eval"})
    if not jobs:
        return
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
