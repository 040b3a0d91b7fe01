"""train_tokenizer.py: a BPE trained with rustbpe loads through tiktoken, a base run trains with it and records it,
and a resume with another vocabulary is refused. python -m pytest -q tests/test_train_tokenizer.py"""
import pytest

import train_tokenizer
from conftest import SHARED, TINY, latest_checkpoint, load_checkpoint_file, run_script
from tokenizer import get_tokenizer

ZH = SHARED / "data" / "zh" / "pretrain_zh.parquet"


def test_train_save_load_compare_and_a_base_run_uses_it(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    extra = [f"--extra={ZH}"] if ZH.exists() else []
    train_tokenizer.main([f"--data_root={tiny_corpus}", "--vocab_size=1024", f"--out_dir={out}", "--max_chars=2000000",
                          "--compare_docs=200", *extra])
    printed = capsys.readouterr().out
    if extra:  # enough text for the whole vocabulary
        assert "trained a 1,024-token BPE (1,017 text tokens + 7 specials)" in printed
    else:      # the tiny corpus alone has fewer distinct pairs than merges asked for: said, not hidden
        assert "warning: the text had room for only" in printed
    assert "English (validation shard)" in printed and ("pretrain_zh.parquet" in printed) == bool(extra)
    tok = get_tokenizer(str(out))
    assert tok.vocab_size <= 1024 and tok.vocab_size % 64 == 0 and tok.name == str(out.resolve())
    for text in ("the cat sees the red ball.", "床前明月光，疑是地上霜。"):
        assert tok.decode(tok.encode(text)) == text
    # merges learned from the text it read: the extra (Chinese) file comes first, else the English shards
    sample = "床前明月光，疑是地上霜。" if extra else "the cat sees the red ball."
    assert len(tok.encode(sample)) < len(sample.encode())
    run = tmp_path / "run"
    args = [*TINY, f"--data_root={tiny_corpus}", f"--out_dir={run}", "--max_steps=2", "--total_batch_size=256",
            "--eval_every=-1", "--checkpoint_interval=1"]
    run_script("train_base.py", *args, f"--tokenizer={out}")
    ck = load_checkpoint_file(latest_checkpoint(run))
    assert ck["tokenizer"]["name"] == str(out.resolve()) and ck["tokenizer"]["vocab_size"] == tok.vocab_size
    p = run_script("train_base.py", *args, "--max_steps=3", "--tokenizer=bytes", "--auto_resume=True", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"was trained with tokenizer '{out.resolve()}'" in p.stderr, p.stderr


def test_vocab_size_must_tile(tmp_path):
    from common import UserError
    with pytest.raises(UserError, match="multiple of 64"):
        train_tokenizer.main(["--vocab_size=1000", f"--out_dir={tmp_path}"])
