"""Pretraining loader: packing, rank sharding, exact resume, epochs, bad input. Run: python -m pytest -q tests/test_dataloader.py"""
import random
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import needs_shared, SHARED
import dataloader
from configurator import UserError
from dataloader import PretrainLoader, count_rows, estimate_tokens, list_shards
from tokenizer import get_tokenizer

# The byte tokenizer makes the expected stream easy to write down by hand: token = UTF-8 byte.
BYTES = get_tokenizer("bytes")
BOS = BYTES.bos_id


# ---- helpers ----

def write_shard(path, docs, row_group_size=4):
    """docs: strings (`text` layout) or (prompt, response) pairs."""
    if docs and isinstance(docs[0], tuple):
        table = pa.table({"prompt": [p for p, _ in docs], "response": [r for _, r in docs]})
    else:
        table = pa.table({"text": pa.array(docs, pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_corpus(root, n_shards=3, docs_per_shard=9, seed=0):
    """Shards of random-length documents; returns the documents of each shard (the last is validation).
    Lengths vary from 0 (a lone <bos>) to 40 bytes, so windows start mid-document, on a <bos>, across
    row groups (4 rows each) and across shards; the corpus is small enough to wrap into new epochs."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(n_shards):
        docs = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(0, 40))) for _ in range(docs_per_shard)]
        write_shard(root / f"shard_{s:05d}.parquet", docs)
        shards.append(docs)
    return shards


def stream_of(docs, epochs):
    """The token stream the design specifies: [<bos>] + bytes of each document, epoch after epoch."""
    one = [t for d in docs for t in [BOS] + list(d.encode("utf-8"))]
    return np.array(one * epochs, dtype=np.int64)


def loader(root, **kw):
    kw.setdefault("device_batch_size", 2)
    kw.setdefault("max_seq_len", 16)
    return PretrainLoader(str(root), BYTES, **kw)


def take(ld, n):
    return [ld.next_batch() for _ in range(n)]


def same(a, b):
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def call_with_timeout(fn, seconds=20):
    """Run fn in a helper thread, so a loader that hangs fails the test instead of blocking pytest."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed back to the test's thread below
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} did not return within {seconds} s (the loader hangs)"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def corpus(tmp_path):
    return tmp_path / "data", make_corpus(tmp_path / "data")


# ---- the stream ----

def test_windows_follow_the_packed_stream_across_epochs(corpus, capsys):
    root, shards = corpus
    train_docs = shards[0] + shards[1]
    # We compare against the stream written out by hand: this checks <bos> placement, the non-overlapping
    # windows of T+1, the x/y shift, shard order and the wrap into the next epoch in one go.
    with loader(root, device_batch_size=3, max_seq_len=16) as ld:
        batches = take(ld, 12)  # 12 * 3 * 17 tokens: several epochs of this small corpus
        epochs_seen = ld.epoch
    span = 17
    expected = stream_of(train_docs, epochs=30)
    for i, (x, y) in enumerate(batches):
        assert x.dtype == torch.long and x.shape == (3, 16) and y.shape == (3, 16)
        for j in range(3):
            w = expected[(i * 3 + j) * span:(i * 3 + j + 1) * span]  # consecutive, non-overlapping
            assert x[j].tolist() == w[:-1].tolist() and y[j].tolist() == w[1:].tolist()
    n_tokens = len(stream_of(train_docs, 1))
    assert epochs_seen == (12 * 3 * span) // n_tokens  # epoch of the next window's first token
    assert "epoch 2 begins" in capsys.readouterr().out


def test_val_split_is_the_last_shard_and_reset_restarts(corpus):
    root, shards = corpus
    with loader(root, split="val", device_batch_size=1) as ld:
        first = take(ld, 3)
        ld.reset()
        assert ld.state_dict()["windows"] == 0
        again = take(ld, 3)
    assert same(first, again)
    assert first[0][0][0].tolist() == stream_of(shards[2], 1)[:16].tolist()


def test_prompt_response_layout_with_chinese(tmp_path):
    pairs = [("中文问题：天为什么是蓝的？", "因为瑞利散射。"), ("second prompt", "第二个回答")]
    write_shard(tmp_path / "a.parquet", pairs, row_group_size=1)
    write_shard(tmp_path / "b.parquet", [("v", "w")])
    with loader(tmp_path, device_batch_size=1, max_seq_len=120) as ld:
        x, y = ld.next_batch()
    joined = [p + "\n" + r for p, r in pairs]
    assert x[0].tolist() == stream_of(joined, 2)[:120].tolist()
    text = bytes(t for t in x[0].tolist() if t < 256).decode("utf-8", errors="ignore")
    assert "中文问题：天为什么是蓝的？\n因为瑞利散射。" in text


def test_tiny_corpus_does_not_hang_and_reports_epochs(tmp_path, capsys):
    # The whole training corpus (3 tokens) is shorter than one window: the loader must wrap around many
    # epochs inside a single batch instead of waiting for data that never comes.
    write_shard(tmp_path / "a.parquet", ["hi"])
    write_shard(tmp_path / "b.parquet", ["val"])
    ld = loader(tmp_path, device_batch_size=2, max_seq_len=64)
    x, y = call_with_timeout(ld.next_batch)
    assert x[0].tolist() == stream_of(["hi"], 50)[:64].tolist()  # the 3-token corpus repeats
    assert ld.epoch == (2 * 65) // 3
    assert "train data exhausted" in capsys.readouterr().out
    ld.close()


# ---- world size and resume ----

@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_are_disjoint_and_cover_the_single_process_batch(corpus, world_size):
    root, _ = corpus
    # Same global batch (4 windows) split over W ranks: concatenating the ranks' batches in rank order
    # must give exactly the single-process batch, step after step (disjoint and covering at once).
    with loader(root, device_batch_size=4) as single:
        reference = take(single, 6)
    ranks = [loader(root, device_batch_size=4 // world_size, rank=r, world_size=world_size)
             for r in range(world_size)]
    per_rank = [take(ld, 6) for ld in ranks]
    for step in range(6):
        x = torch.cat([per_rank[r][step][0] for r in range(world_size)])
        y = torch.cat([per_rank[r][step][1] for r in range(world_size)])
        assert torch.equal(x, reference[step][0]) and torch.equal(y, reference[step][1])
    states = [ld.state_dict() for ld in ranks]
    assert all(s == states[0] for s in states)  # the same global position on every rank
    for ld in ranks:
        ld.close()


def test_state_round_trip_is_exact(corpus, tmp_path):
    root, _ = corpus
    with loader(root, device_batch_size=2, max_seq_len=12, prefetch=3) as ld:
        take(ld, 5)  # the thread has read ahead by now; the state must not include that
        torch.save(ld.state_dict(), tmp_path / "state.pt")
        continued = take(ld, 8)
    sd = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(sd) == set(dataloader.STATE_KEYS) and all(type(v) is int for v in sd.values())
    assert sd["windows"] == 10
    with loader(root, device_batch_size=2, max_seq_len=12) as fresh:
        fresh.load_state_dict(sd)
        assert same(take(fresh, 8), continued)


def test_state_saved_on_two_ranks_resumes_on_one_and_four(corpus):
    # A checkpoint written by a 2-GPU run is resumed on 1 GPU (accumulating twice as much) or on 4:
    # the global stream must go on from the same window either way.
    root, _ = corpus
    ranks = [loader(root, device_batch_size=2, rank=r, world_size=2) for r in range(2)]
    for ld in ranks:
        take(ld, 4)
    sd = ranks[0].state_dict()
    assert sd == ranks[1].state_dict()
    after = [take(ld, 3) for ld in ranks]
    with loader(root, device_batch_size=4) as single:
        single.load_state_dict(sd)
        got = take(single, 3)
    for step in range(3):
        assert torch.equal(got[step][0], torch.cat([after[0][step][0], after[1][step][0]]))
    four = [loader(root, device_batch_size=1, rank=r, world_size=4) for r in range(4)]
    for ld in four:
        ld.load_state_dict(sd)
    first_step = torch.cat([ld.next_batch()[0] for ld in four])
    assert torch.equal(first_step, got[0][0])
    for ld in ranks + four:
        ld.close()


def test_state_at_row_group_and_epoch_ends(tmp_path):
    # each row group is one 4-token document ([<bos>] a b c) and a window is 4 tokens, so every window
    # ends exactly where a row group ends: the state must name the next row group / epoch, not a past-the-end one
    write_shard(tmp_path / "a.parquet", ["abc", "abc"], row_group_size=1)
    write_shard(tmp_path / "b.parquet", ["val"])
    states = []
    with loader(tmp_path, device_batch_size=1, max_seq_len=3) as ld:
        for _ in range(3):
            ld.next_batch()
            states.append(tuple(ld.state_dict().values()))
    assert states == [(0, 0, 1, 0, 0, 1), (1, 0, 0, 0, 0, 2), (1, 0, 1, 0, 0, 3)]
    with loader(tmp_path, device_batch_size=1, max_seq_len=3) as fresh:
        fresh.load_state_dict(dict(zip(dataloader.STATE_KEYS, states[0])))
        assert fresh.next_batch()[0].tolist() == [[BOS, 97, 98]] and fresh.epoch == 1


def test_bad_state_is_a_user_error(corpus):
    root, _ = corpus
    with loader(root) as ld:
        with pytest.raises(UserError, match="lacks"):
            ld.load_state_dict({"step": 3})
        with pytest.raises(UserError, match="outside"):
            ld.load_state_dict({k: 0 for k in dataloader.STATE_KEYS} | {"shard": 7})
        ld.load_state_dict({k: 0 for k in dataloader.STATE_KEYS} | {"token_offset": 10_000})
        with pytest.raises(UserError, match="changed since the checkpoint"):
            call_with_timeout(ld.next_batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(corpus):
    root, _ = corpus
    with loader(root) as cpu, loader(root, device="cuda") as gpu:
        for (xc, yc), (xg, yg) in zip(take(cpu, 3), take(gpu, 3)):
            assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)


# ---- bad input: a UserError naming the file and the fix ----

def _setup_bad(kind, root):
    root.mkdir()
    good = ["some text"] * 3
    if kind == "empty_folder":
        return "no *.parquet shards", root.name, ""
    if kind == "single_shard":
        write_shard(root / "only.parquet", good)
        return "--val_files", "only.parquet", ""
    write_shard(root / "a.parquet", good)
    target = root / "b.parquet"
    if kind == "val_no_match":
        write_shard(target, good)
        return "matches no file", "nope_*.parquet", "nope_*.parquet"
    if kind == "val_all":
        write_shard(target, good)
        return "none for training", "*.parquet", "*.parquet"
    if kind == "garbage":
        target.write_bytes(b"this is not parquet at all" * 10)
    elif kind == "truncated":
        write_shard(target, good * 50)
        target.write_bytes(target.read_bytes()[:300])
    elif kind == "wrong_columns":
        pq.write_table(pa.table({"content": good}), target)
    elif kind == "not_strings":
        pq.write_table(pa.table({"text": [1, 2, 3]}), target)
    elif kind == "empty_shard":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), target)
    return {"garbage": "cannot read", "truncated": "cannot read", "wrong_columns": "`text` column",
            "not_strings": "expected strings", "empty_shard": "no rows"}[kind], "b.parquet", ""


@pytest.mark.parametrize("kind", ["empty_folder", "single_shard", "val_no_match", "val_all", "garbage",
                                  "truncated", "wrong_columns", "not_strings", "empty_shard"])
def test_bad_input_names_the_file_and_the_fix(tmp_path, kind):
    root = tmp_path / "data"
    what, name, val_files = _setup_bad(kind, root)
    # "b.parquet" is the validation shard here, so its problems must surface for the val split
    with pytest.raises(UserError) as e:
        loader(root, split="val", val_files=val_files)
    assert what in str(e.value) and name in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist.*--data_root"):
        list_shards(tmp_path / "nowhere", "train")


def test_val_files_moves_shards_out_of_train(corpus):
    root, shards = corpus
    assert [p.name for p in list_shards(root, "val", "shard_00000.parquet")] == ["shard_00000.parquet"]
    assert [p.name for p in list_shards(root, "train", "shard_00000.parquet")] == [
        "shard_00001.parquet", "shard_00002.parquet"]


def test_read_error_mid_stream_reaches_the_main_thread(corpus, monkeypatch):
    root, _ = corpus
    real = pq.ParquetFile.read_row_group

    # A data page that is bad only deep inside a file passes the footer check; the thread must hand
    # the error to the main thread, where training would otherwise wait forever for the next batch.
    def flaky(self, i, *args, **kw):
        if i == 2:
            raise OSError("simulated bad data page")
        return real(self, i, *args, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", flaky)
    ld = loader(root, device_batch_size=1, max_seq_len=8)
    with pytest.raises(UserError, match=r"shard_00000.parquet: row group 2 cannot be read"):
        for _ in range(200):
            call_with_timeout(ld.next_batch)
    assert ld._thread is None  # next_batch closed the thread before raising


def test_tokenizer_error_propagates_and_close_stops_the_thread(corpus):
    root, _ = corpus

    class Broken:
        bos_id = BOS

        def encode_batch(self, texts):
            raise ValueError("tokenizer exploded")

    ld = PretrainLoader(str(root), Broken(), device_batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="exploded"):
        call_with_timeout(ld.next_batch)
    ok = loader(root)
    ok.next_batch()
    thread = ok._thread
    assert thread.is_alive()
    ok.close()
    assert not thread.is_alive()
    ok.close()  # a second close is harmless


def test_streams_one_row_group_at_a_time(tmp_path, monkeypatch):
    # Memory must not grow with the corpus: we count what is read and forbid whole-file reads.
    for name in ("a", "b"):
        write_shard(tmp_path / f"{name}.parquet", [f"document number {i} " * 3 for i in range(400)],
                    row_group_size=8)
    rows_read = []
    real = pq.ParquetFile.read_row_group

    def counting(self, i, *args, **kw):
        table = real(self, i, *args, **kw)
        rows_read.append(table.num_rows)
        return table

    def forbidden(*args, **kw):
        raise AssertionError("the loader read a whole file")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    ld = loader(tmp_path, device_batch_size=1, max_seq_len=32, prefetch=1)
    ld.next_batch()
    ld.close()
    # 50 row groups in the file; one batch plus a one-batch prefetch needs only the first
    assert 1 <= len(rows_read) <= 3 and max(rows_read) == 8


def test_a_big_row_group_is_streamed_in_slices_with_the_same_stream_and_exact_resume(tmp_path, monkeypatch):
    # pyarrow's writer puts up to ~1 M rows in one row group by default: a 10 M-row file would be read (and
    # tokenized) a gigabyte at a time. Such a group is streamed SLICE_ROWS rows at a time instead, and the
    # stream and the resume positions are those of the same rows in small groups.
    monkeypatch.setattr(dataloader, "SLICE_ROWS", 16)
    rng = random.Random(3)
    docs = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(0, 40))) for _ in range(200)]
    big, small = tmp_path / "big", tmp_path / "small"
    for root, group in ((big, 200), (small, 4)):
        root.mkdir()
        write_shard(root / "shard_00000.parquet", docs, row_group_size=group)
        write_shard(root / "shard_00001.parquet", ["validation"], row_group_size=group)
    whole = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: whole.append(self.metadata.row_group(i).num_rows) or real(self, i, *a, **k))
    with loader(big, device_batch_size=2, max_seq_len=12) as a, loader(small, device_batch_size=2, max_seq_len=12) as b:
        first = take(a, 30)
        assert same(first, take(b, 30))
        state = a.state_dict()
        assert 0 < state["row"] < 200 and state["row_group"] == 0  # a position inside the one big group
        continued = take(a, 150)  # past the end of the file (~4,200 tokens): the next epoch starts
    assert whole and 200 not in whole  # the small groups were read whole, the 200-row group never
    assert a.epoch >= 1
    with loader(big, device_batch_size=2, max_seq_len=12) as fresh:
        fresh.load_state_dict(state)
        assert same(take(fresh, 150), continued)
    tokens, how = estimate_tokens(list_shards(big, "train"), BYTES, sample_rows=1000)
    assert how.startswith("exact") and tokens == len(stream_of(docs, 1))


def test_a_big_row_group_is_not_read_whole_into_memory(tmp_path, monkeypatch):
    # iter_batches alone is not enough: with pyarrow's default pre-buffering it first loads the row group's whole
    # (compressed) column, so memory would still grow with the row-group size. Arrow's own allocation counter
    # shows what is held while the first slices are handed out.
    monkeypatch.setattr(dataloader, "SLICE_ROWS", 64)
    rng = np.random.default_rng(0)
    # hex text does not compress much: ~32 MB in one row group (the reader's own buffers are ~5 MB whatever the size)
    docs = [rng.bytes(1000).hex() for _ in range(16000)]
    path = write_shard(tmp_path / "shard_00000.parquet", docs, row_group_size=len(docs))
    size = path.stat().st_size
    assert size > 16e6
    info = dataloader._inspect_all([path])[0]
    pf = dataloader._open(info)
    slices = dataloader._iter_texts(pf, info, 0)
    before = pa.total_allocated_bytes()
    (first, a), (second, b) = next(slices), next(slices)
    held = pa.total_allocated_bytes() - before
    assert (first, second, a[0], b[0]) == (0, 64, docs[0], docs[64])
    assert held < size / 4, f"{held / 1e6:.1f} MB held for two 64-row slices of a {size / 1e6:.1f} MB row group"
    slices.close()
    pf.close()


# ---- sizes for the trainer ----

def test_count_rows_and_estimate_tokens(corpus):
    root, shards = corpus
    paths = list_shards(root, "train")
    assert count_rows(paths) == len(shards[0]) + len(shards[1])
    exact = len(stream_of(shards[0] + shards[1], 1))
    tokens, how = estimate_tokens(paths, BYTES, sample_rows=1000)
    assert tokens == exact and how.startswith("exact")
    # A sample of 4 rows out of 18 only estimates; the documents differ a lot in length, hence the wide band.
    tokens, how = estimate_tokens(paths, BYTES, sample_rows=4)
    assert how.startswith("estimated") and 0.3 * exact < tokens < 3 * exact


# ---- the real data (skipped where ../shared is absent) ----

@needs_shared
def test_shared_pretrain_streams_with_gpt2():
    root = SHARED / "data" / "pretrain"
    tok = get_tokenizer("gpt2")
    assert [p.name for p in list_shards(root, "val")] == ["shard_00004.parquet"]
    assert count_rows(list_shards(root, "train")) == 5436 + 5555 + 5426 + 5437
    with PretrainLoader(str(root), tok, device_batch_size=2, max_seq_len=256) as ld:
        batches = take(ld, 3)
        assert ld.state_dict()["windows"] == 6 and ld.epoch == 0
    x, y = batches[0]
    assert x.shape == (2, 256) and x[0, 0].item() == tok.bos_id
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert max(int(b[0].max()) for b in batches) < 50257
    # The first window is <bos> + the first document of the first shard, in the GPT-2 tokenization.
    first_doc = pq.ParquetFile(root / "shard_00000.parquet").read_row_group(0, columns=["text"])["text"][0].as_py()
    assert tok.decode(x[0, 1:60].tolist()) == tok.decode(tok.encode(first_doc)[:59])


@needs_shared
def test_shared_chinese_prompt_response_with_gpt2():
    root = SHARED / "data" / "zh"  # pretrain_zh.parquet (text) + prompt_response_zh.parquet (last: val)
    tok = get_tokenizer("gpt2")
    row = pq.ParquetFile(root / "prompt_response_zh.parquet").read_row_group(0).slice(0, 1).to_pylist()[0]
    with PretrainLoader(str(root), tok, split="val", device_batch_size=1, max_seq_len=512) as ld:
        x, _ = ld.next_batch()
    # The val split of this folder is its last file by name, the Chinese prompt/response one.
    expected = [tok.bos_id] + tok.encode(row["prompt"] + "\n" + row["response"])
    n = min(len(expected), 512)
    assert x[0, :n].tolist() == expected[:n]
