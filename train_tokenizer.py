"""train_tokenizer.py: a byte-level BPE of our own, trained with rustbpe on the local corpus, saved so tiktoken loads it.
in:  the pretraining shards (data_root) and any extra text files (--extra=, e.g. Chinese)
out: $NANOCHAT_BASE_DIR/tokenizer/ (tokenizer.tiktoken + bpe_config.json); then in any stage --tokenizer=<that folder>
     python train_tokenizer.py --extra=../shared/data/zh/pretrain_zh.parquet,../shared/data/zh/prompt_response_zh.parquet
     python train_base.py --tokenizer=$HOME/.cache/nanochat/tokenizer
It prints bytes per token next to GPT-2's on the English validation shard and on each extra file: a tokenizer
trained on your text packs more of it into max_seq_len (GPT-2 gets 1.3-1.4 bytes per token on Chinese, 4.4 on
English). Checkpoints record the folder's absolute path and refuse another vocabulary on resume.
"""
import sys
import time
from pathlib import Path

import common
from common import UserError, print0
from configurator import apply_overrides

# ---- config (module globals; override with --key=value; -h lists them) -----------------------------------------
vocab_size = 32768            # tokens in all, the 7 chat specials included; a multiple of 64 (the embedding's tiling)
data_root = ""                # pretraining shards; "" = $NANOCHAT_BASE_DIR/base_data, else the built-in data
extra = ""                    # more training text, comma-separated .txt/.jsonl/.parquet files (Chinese, say)
max_chars = 2_000_000_000     # characters read at most, over all files
doc_cap = 10_000              # characters taken from one document (nanochat's cap: a few huge documents skew merges)
out_dir = ""                  # "" = $NANOCHAT_BASE_DIR/tokenizer
compare_docs = 2000           # documents of each text the bytes-per-token comparison reads
# ------------------------------------------------------------------------------------------------------------------


def training_files(root: Path, extras) -> list:
    """The extra files first: max_chars may run out inside the shards, and the extras (Chinese, say) are the text a
    user added on purpose."""
    from dataloader import list_shards
    return extras + list_shards(root, "train")


def texts(files, max_chars, doc_cap):
    """Documents of every file in turn, each cut at doc_cap characters, until max_chars."""
    from dataloader import iter_documents
    left = max_chars
    for path in files:
        for text in iter_documents(path):
            text = text[:doc_cap]
            yield text
            left -= len(text)
            if left <= 0:
                return


def bytes_per_token(tok, path, n_docs) -> float:
    """UTF-8 bytes / tokens over the first n_docs documents of a file (ordinary text; no bos)."""
    from dataloader import iter_documents
    docs = []
    for text in iter_documents(path):
        docs.append(text)
        if len(docs) >= n_docs:
            break
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
    return n_bytes / max(1, n_tokens)


def main(argv=None):
    apply_overrides(globals(), sys.argv[1:] if argv is None else argv)
    import rustbpe  # lazily: only this script needs it (requirements.txt)
    from dataloader import list_shards
    from tokenizer import SPECIAL_TOKENS, get_tokenizer, save_bpe
    if vocab_size % 64 or vocab_size < 256 + 64:
        raise UserError(f"vocab_size={vocab_size} must be a multiple of 64 and at least 320 (256 bytes + specials)")
    base = common.base_dir()
    root = Path(data_root).expanduser() if data_root else base / "base_data"
    if not data_root and not any(root.glob("*.parquet")):
        root = base / "builtin_data" / "base"
        print0(f"no shards in {base / 'base_data'}: training on the built-in data ({root}); run prepare_data.py first "
               f"for real text")
    extras = [Path(p.strip()).expanduser() for p in extra.split(",") if p.strip()]
    for p in extras:
        if not p.is_file():
            raise UserError(f"extra: no file at {p}")
    files = training_files(root, extras)
    out = Path(out_dir).expanduser() if out_dir else base / "tokenizer"

    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    # our 7 chat specials come after the text vocabulary, so the total is vocab_size exactly
    bpe.train_from_iterator(texts(files, max_chars, doc_cap), vocab_size - len(SPECIAL_TOKENS))
    ranks = dict(bpe.get_mergeable_ranks())
    if len(ranks) < vocab_size - len(SPECIAL_TOKENS):
        print0(f"warning: the text had room for only {len(ranks):,} tokens, not {vocab_size - len(SPECIAL_TOKENS):,}: "
               f"too little of it (the built-in data?). Train again on real text: prepare_data.py, then delete {out}")
    save_bpe(out, ranks, bpe.get_pattern())
    tok = get_tokenizer(str(out))
    print0(f"trained a {tok.vocab_size:,}-token BPE ({len(ranks):,} text tokens + {len(SPECIAL_TOKENS)} specials) on "
           f"{len(files)} file(s) in {time.time() - t0:.0f} s -> {out}  (use: --tokenizer={out})")

    gpt2 = get_tokenizer("gpt2")
    rows = [("English (validation shard)", p) for p in list_shards(root, "val")] + [(p.name, p) for p in extras]
    print0(f"{'bytes per token':<40}{'ours':>8}{'GPT-2':>8}")
    for name, path in rows:
        print0(f"{name[:39]:<40}{bytes_per_token(tok, path, compare_docs):>8.2f}"
               f"{bytes_per_token(gpt2, path, compare_docs):>8.2f}")


if __name__ == "__main__":
    common.run(main)
