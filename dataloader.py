"""dataloader.py: the pretraining token stream, from parquet shards to packed (x, y) batches.

Data: `*.parquet` shards directly under data_root, taken in name order. Each has a `text` column (one
document per row, the FineWeb-Edu layout) or `prompt` + `response` columns (joined with "\n", the layout
of the large-dataset guide). The last shard is validation, the rest train, unless val_files names them.

The stream: each document becomes [<bos>] + its tokens, documents follow in shard / row group / row order,
and the stream is cut into consecutive windows of max_seq_len + 1 tokens (x = w[:-1], y = w[1:]). Windows
do not overlap; the tokens left over go into the next window. At the end of the data a new epoch starts and
the stream goes on, so a window may span two epochs (and a tiny corpus simply repeats inside one window).

World-size invariance: call i of next_batch() covers the global windows [i*W*B, (i+1)*W*B), and rank r
keeps [i*W*B + r*B, i*W*B + (r+1)*B). One process with grad accumulation A therefore sees, per optimizer
step, exactly the windows that W processes with accumulation A/W see. state_dict() is a position in the
data, identical on every rank, so a run saved on W ranks resumes on W' ranks with the same global stream.
"""
import glob
import json
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pyarrow.types as pat
import torch

from configurator import UserError

# The state keys, all plain ints. The first five are the position of the next unconsumed window's first
# token; `windows` counts the global windows consumed since the very start (across resumes and epochs).
STATE_KEYS = ("epoch", "shard", "row_group", "row", "token_offset", "windows")
_LAYOUTS = (("text",), ("prompt", "response"))


@dataclass(frozen=True)
class _ShardInfo:
    """What we learn about a shard from its footer alone (no data pages read)."""
    path: Path
    columns: tuple          # ("text",) or ("prompt", "response")
    row_group_rows: tuple   # rows in each row group

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


# ---------------------------------------------------------------------------------------------------
# shard discovery and up-front checks
# ---------------------------------------------------------------------------------------------------

def list_shards(data_root, split, val_files="") -> list:
    """The split's shards, sorted by name. UserError on a missing folder, no shards, or an unusable split."""
    root = Path(data_root).expanduser()
    if split not in ("train", "val"):
        raise UserError(f"dataloader split must be 'train' or 'val', got {split!r}")
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UserError(f"data_root {root} {what}; pass --data_root=<folder holding the *.parquet shards> "
                        f"(e.g. --data_root=../shared/data/pretrain); shards are parquet files with a `text` column "
                        f"(FineWeb-Edu's layout) or `prompt` + `response` columns")
    # Name order is the stream order: the same on every rank and every run, whatever the file system lists.
    # Subfolders are not searched, so a backup copy in a subfolder cannot sneak into training twice.
    shards = sorted(root.glob("*.parquet"))
    if not shards:
        raise UserError(f"no *.parquet shards in {root} (subfolders are not searched); pass "
                        f"--data_root=<the folder that holds them>")
    if val_files.strip():
        # val_files may name files outside data_root (absolute or ../), which is the way out for a
        # corpus that is a single shard; any shard it names under data_root leaves the train split.
        val = _match_val_files(root, val_files, shards)
        val_set = {p.resolve() for p in val}
        train = [p for p in shards if p.resolve() not in val_set]
        if not train:
            raise UserError(f"--val_files={val_files!r} selects every shard in {root}, which leaves none "
                            f"for training; name fewer validation files")
    elif len(shards) < 2:
        # We refuse to validate on the training data: the val loss would look better than it is.
        raise UserError(f"{shards[0]} is the only shard in {root}, but we need one for training and one for "
                        f"validation; add a second shard (the last one by name is validation) or pass "
                        f"--val_files=<a held-out parquet file, relative to data_root or absolute>")
    else:
        train, val = shards[:-1], shards[-1:]
    return train if split == "train" else val


def _match_val_files(root, spec, shards) -> list:
    """Files named by val_files: comma-separated names/globs relative to data_root (or absolute);
    an entry `@list.txt` reads one name/glob per line from that file."""
    entries = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.startswith("@"):
            lines = Path(entry[1:]).expanduser().read_text(encoding="utf-8").splitlines()
            entries += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        elif entry:
            entries.append(entry)
    # A pattern that matches nothing is almost always a typo; failing beats validating on nothing.
    matched = set()
    for entry in entries:
        pattern = Path(entry).expanduser()
        pattern = pattern if pattern.is_absolute() else root / pattern
        hits = [Path(h) for h in glob.glob(str(pattern)) if Path(h).is_file()]
        if not hits:
            names = ", ".join(p.name for p in shards[:8]) + (", ..." if len(shards) > 8 else "")
            raise UserError(f"--val_files entry {entry!r} matches no file (looked for {pattern}); "
                            f"shards in {root}: {names}")
        matched.update(hits)
    return sorted(matched)


def _inspect_shard(path) -> _ShardInfo:
    """Read only the footer: readable, has a usable column layout, not empty."""
    path = Path(path)
    fix = "re-create it (or download it again) or move it out of the data folder"
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... depending on the damage
        raise UserError(f"cannot read {path} as parquet ({type(e).__name__}: {e}); {fix}") from None
    try:
        schema, meta = pf.schema_arrow, pf.metadata
    finally:
        pf.close()
    # `text` wins when a file has both layouts: it is the documented pretraining column.
    names = schema.names
    columns = next((layout for layout in _LAYOUTS if all(c in names for c in layout)), None)
    if columns is None:
        raise UserError(f"{path} has columns {names}, but the pretraining loader needs a `text` column (one "
                        f"document per row) or `prompt` + `response` columns; rename the column that holds "
                        f"the text, e.g. table.rename_columns(...) and pq.write_table(...)")
    for name in columns:
        kind = schema.field(name).type
        # Numbers or binary would fail deep inside the tokenizer; say it here, in terms of the file.
        if not (pat.is_string(kind) or pat.is_large_string(kind) or str(kind) == "string_view"):
            raise UserError(f"{path}: column `{name}` has type {kind}, expected strings; "
                            f"write the documents as text (pa.string()) or {fix}")
    # An empty shard adds nothing and usually means a failed export, so we ask the user to look at it.
    if meta.num_rows == 0:
        raise UserError(f"{path} has no rows; delete it or move it out of the data folder")
    # Row counts per row group let us check and normalise resume positions without reading data.
    rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return _ShardInfo(path, columns, rows)


def _inspect_all(paths) -> list:
    """Check every shard before streaming, so a bad one fails in seconds rather than hours into a run.
    We report all bad shards at once: fixing them one run at a time would be tedious."""
    infos, errors = [], []
    for path in paths:
        try:
            infos.append(_inspect_shard(path))
        except UserError as e:
            errors.append(str(e))
    if errors:
        raise UserError("\n".join(errors))
    return infos


def count_rows(paths) -> int:
    """Documents in these shards, from the parquet footers (no data read)."""
    return sum(info.num_rows for info in _inspect_all(paths))


# Rows decoded and tokenized at a time. A row group is read whole when it is no bigger; a bigger one (pyarrow's
# writer puts up to ~1 M rows in one by default) is streamed in slices of this many rows, so memory depends on
# neither the corpus nor how its files were written.
SLICE_ROWS = 1024


def _texts(table, info) -> list:
    """The documents of an Arrow table or record batch as Python strings."""
    # A null cell counts as an empty document (it still gets its <bos>), so row numbers stay aligned.
    cols = [pc.fill_null(table.column(name), "") for name in info.columns]
    # The prompt/response join runs inside Arrow (C++), so it costs nothing next to tokenizing.
    joined = cols[0] if len(cols) == 1 else pc.binary_join_element_wise(cols[0], cols[1], "\n")
    return joined.to_pylist()


def _iter_texts(pf, info, row_group, first_row=0, slice_rows=None):
    """(first row, documents) for the rows of one row group from `first_row` on, at most slice_rows (default
    SLICE_ROWS) at a time. Only the columns we need are decoded."""
    slice_rows = slice_rows or SLICE_ROWS
    try:
        if info.row_group_rows[row_group] <= slice_rows:
            # slice() is zero-copy; a resume in the middle of a row group simply starts at its row
            yield first_row, _texts(pf.read_row_group(row_group, columns=list(info.columns)).slice(first_row), info)
            return
        seen = 0
        for batch in pf.iter_batches(batch_size=slice_rows, row_groups=[row_group], columns=list(info.columns),
                                     use_threads=False):
            n = batch.num_rows
            if seen + n > first_row:  # a resume decodes (but does not tokenize) the slices before its row
                lo = max(0, first_row - seen)
                yield seen + lo, _texts(batch.slice(lo), info)
            seen += n
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{info.path}: row group {row_group} cannot be read ({type(e).__name__}: {e}); the "
                        f"file is damaged: re-create it or move it out of the data folder") from e


def _open(info):
    """ParquetFile for streaming; the footer was already checked, so a failure here is a change on disk."""
    try:
        # pre_buffer off and a small read buffer: otherwise iter_batches loads a row group's whole compressed
        # column chunk (gigabytes for a 1 M-row group) before it yields the first slice of rows
        return pq.ParquetFile(info.path, pre_buffer=False, buffer_size=1 << 20)
    except Exception as e:  # the file was fine at start-up, so something changed it under us
        raise UserError(f"cannot open {info.path} ({type(e).__name__}: {e}); was it moved or rewritten "
                        f"during the run? restore it or restart") from e


def estimate_tokens(paths, tokenizer, sample_rows=2000):
    """(tokens, how): the stream's length in tokens (one <bos> per row included), exact when the shards hold
    at most `sample_rows` rows, else rows * mean tokens per row of a sample spread over the row groups."""
    infos = _inspect_all(paths)
    total_rows = sum(info.num_rows for info in infos)
    groups = [(info, g) for info in infos for g in range(len(info.row_group_rows))]
    if total_rows <= sample_rows:
        picks, per_group = groups, None
    else:
        # Rows are usually shuffled within a shard, but spreading the sample over the files protects
        # us from shards that differ (e.g. a Chinese shard after English ones).
        n_picks = min(len(groups), max(1, -(-sample_rows // 128)))
        picks = [groups[i] for i in np.unique(np.linspace(0, len(groups) - 1, n_picks).round().astype(int))]
        per_group = -(-sample_rows // len(picks))
    # We count tokens exactly as the stream does (one <bos> per row), so epochs derived from this
    # match where the loader actually wraps around (up to the sampling error).
    rows = tokens = 0
    for info, g in picks:
        pf = _open(info)
        try:
            if per_group is None:  # exact: every row
                texts = [t for _, part in _iter_texts(pf, info, g) for t in part]
            else:  # the first per_group rows of the group, without decoding the rest of a big one
                texts = next(_iter_texts(pf, info, g, 0, per_group))[1][:per_group]
        finally:
            pf.close()
        rows += len(texts)
        tokens += sum(map(len, tokenizer.encode_batch(texts))) + len(texts)
    if per_group is None:
        return tokens, f"exact: {tokens:,} tokens in {rows:,} rows (one <bos> per row included)"
    mean = tokens / rows
    how = (f"estimated: {total_rows:,} rows x {mean:.1f} tokens/row (mean of {rows:,} rows sampled from "
           f"{len(picks)} row groups, one <bos> per row included)")
    return round(mean * total_rows), how


# ---------------------------------------------------------------------------------------------------
# the stream (runs in the background thread; knows nothing about threads or the loader object)
# ---------------------------------------------------------------------------------------------------

def _pack(token_lists, bos):
    """[<bos>] + tokens for each document, concatenated. Returns (int32 tokens, int64 start of each doc).
    numpy does the copying: a Python loop over tokens would cost more than tiktoken's encoding itself."""
    # int32 holds any vocabulary we use (GPT-2: 50k; a custom BPE may pass 65k, so not uint16) at half
    # the memory of int64; the cast to int64 happens once per batch in to_tensors().
    lengths = np.fromiter(map(len, token_lists), np.int64, len(token_lists)) + 1
    doc_starts = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=doc_starts[1:])
    tokens = np.empty(int(lengths.sum()), np.int32)
    body = np.ones(len(tokens), bool)
    body[doc_starts] = False
    # Fill the document bodies through a mask, then drop the <bos> ids into their slots.
    tokens[body] = np.fromiter(itertools.chain.from_iterable(token_lists), np.int32, len(tokens) - len(lengths))
    tokens[doc_starts] = bos
    return tokens, doc_starts


@dataclass
class _Chunk:
    """The tokens of one row group (from first_row on), placed at `start` in the thread's stream."""
    start: int              # stream index of tokens[0]; the stream counts from the thread's start position
    tokens: np.ndarray      # int32
    doc_starts: np.ndarray  # int64, where each row's <bos> is in `tokens` (negative for a row cut by a resume)
    epoch: int
    shard: int
    row_group: int
    first_row: int

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def _put(q, stop, item) -> bool:
    """Blocking put that gives up when asked to stop, so close() never waits on a full queue."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


class _Failure:
    """An exception from the background thread, carried through the queue to next_batch().
    We re-raise the original object (a UserError stays a UserError), with the thread's traceback."""

    def __init__(self, error):
        self.error = error


class _Stream:
    """Reads, tokenizes and packs; yields this rank's batches with the global state after each.

    Every rank reads and tokenizes the whole stream and keeps only its share. That costs W times the
    tokenizing work, but tiktoken encodes ~1.8M tok/s per core while a T4 trains ~25k tok/s, so it is
    idle time; in return the stream needs no coordination and the state is the same on every rank."""

    def __init__(self, shards, tokenizer, batch_size, seq_len, rank, world_size, pin):
        self.shards, self.tokenizer, self.bos = shards, tokenizer, int(tokenizer.bos_id)
        self.batch_size, self.seq_len, self.rank, self.world_size, self.pin = (
            batch_size, seq_len, rank, world_size, pin)

    def canonical(self, epoch, shard, row_group, row):
        """Normalise a position that points past the end of a row group / shard / epoch."""
        while True:
            if shard >= len(self.shards):
                epoch, shard, row_group, row = epoch + 1, 0, 0, 0
            elif row_group >= len(self.shards[shard].row_group_rows):
                shard, row_group, row = shard + 1, 0, 0
            elif row >= self.shards[shard].row_group_rows[row_group]:
                row_group, row = row_group + 1, 0
            else:
                return epoch, shard, row_group, row

    def _row_groups(self, epoch, shard, row_group, row):
        """(epoch, shard, row_group, first_row) from a start position on, epoch after epoch, forever."""
        while True:
            for s in range(shard, len(self.shards)):
                for g in range(row_group if s == shard else 0, len(self.shards[s].row_group_rows)):
                    yield epoch, s, g, (row if (s, g) == (shard, row_group) else 0)
            epoch, shard, row_group, row = epoch + 1, 0, 0, 0

    def chunks(self, start, stop):
        """Tokenized row groups from the start position on. Exactly one row group is held at a time,
        so memory does not grow with the corpus."""
        skip, pos, pf, pf_shard = start["token_offset"], 0, None, None
        try:
            for epoch, s, g, row in self._row_groups(*(start[k] for k in STATE_KEYS[:4])):
                if stop.is_set():
                    return
                if s != pf_shard:
                    if pf is not None:
                        pf.close()
                    pf, pf_shard = _open(self.shards[s]), s
                for first, texts in _iter_texts(pf, self.shards[s], g, row):
                    if stop.is_set():
                        return
                    tokens, doc_starts = _pack(self.tokenizer.encode_batch(texts), self.bos)
                    if skip:
                        tokens, doc_starts, skip = self._skip(tokens, doc_starts, skip, s, g, first)
                    yield _Chunk(pos, tokens, doc_starts, epoch, s, g, first)
                    pos += len(tokens)
        finally:
            if pf is not None:
                pf.close()

    def _skip(self, tokens, doc_starts, skip, shard, row_group, row):
        """Drop the first `skip` tokens of the resume row (its part that earlier windows consumed)."""
        row_len = doc_starts[1] if len(doc_starts) > 1 else len(tokens)
        # A correct state always points inside a row (every row has at least its <bos>); anything else
        # means the rows or their tokenization differ from the run that wrote the state.
        if skip >= row_len:
            raise UserError(f"the loader state points at token {skip} of row {row} in row group {row_group} of "
                            f"{self.shards[shard].path}, but that row has {row_len} tokens: the data or the "
                            f"tokenizer changed since the checkpoint; resume with the same data_root and "
                            f"tokenizer, or start a fresh run")
        return tokens[skip:], doc_starts - skip, 0

    def locate(self, chunks, index, windows) -> dict:
        """The state for stream index `index` (a window start). `chunks` holds the chunks read so far
        that may still contain it; chunks wholly before `index` are dropped."""
        # Window starts only move forward, so chunks that end before `index` are never needed again.
        # We keep the last one, though: it is what tells us where the data goes on after it.
        while len(chunks) > 1 and chunks[0].end <= index:
            chunks.popleft()
        c = chunks[0]
        if index >= c.end:  # the window starts right after everything read: the row after the chunk's last
            epoch, shard, row_group, row = self.canonical(c.epoch, c.shard, c.row_group,
                                                          c.first_row + len(c.doc_starts))
            offset = 0
        else:
            # The row is the last one whose <bos> is at or before `index`; the offset counts that <bos>.
            rel = index - c.start
            k = int(np.searchsorted(c.doc_starts, rel, side="right")) - 1
            epoch, shard, row_group, row = c.epoch, c.shard, c.row_group, c.first_row + k
            offset = rel - int(c.doc_starts[k])
        return dict(zip(STATE_KEYS, (epoch, shard, row_group, row, int(offset), windows)))

    def to_tensors(self, windows):
        """(B, T+1) int32 windows -> x, y int64 (pinned for an asynchronous copy when the device is CUDA)."""
        # We allocate x and y directly (pinned when needed) and copy once: pinning an existing tensor would
        # be a second copy. Each batch gets fresh tensors, so an in-flight non_blocking copy is never
        # overwritten by the next batch.
        t = torch.from_numpy(windows)
        x = torch.empty((len(windows), self.seq_len), dtype=torch.long, pin_memory=self.pin)
        y = torch.empty((len(windows), self.seq_len), dtype=torch.long, pin_memory=self.pin)
        x.copy_(t[:, :-1])
        y.copy_(t[:, 1:])
        return x, y

    def produce(self, start, stop, q):
        """Cut windows from the token stream; put (x, y, state) for every group of W*B global windows."""
        span, group = self.seq_len + 1, self.world_size * self.batch_size
        mine = (self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        pending = np.empty(0, np.int32)  # tokens read but not yet in a window (< span of them)
        chunks, own, g = deque(), [], 0  # g = windows cut since `start`
        for chunk in self.chunks(start, stop):
            chunks.append(chunk)
            # A rolling buffer: leftover tokens + this row group, cut into as many whole windows as fit.
            pending = np.concatenate((pending, chunk.tokens))
            n = len(pending) // span
            wins, pending = pending[: n * span].reshape(n, span), pending[n * span:]
            i = 0
            while i < n:  # one pass per group boundary, not per window
                # p = place of the next window within its group of W*B; this rank owns [r*B, (r+1)*B)
                p = g % group
                take = min(n - i, group - p)
                lo, hi = max(p, mine[0]), min(p + take, mine[1])
                if hi > lo:
                    own.append(wins[i + lo - p: i + hi - p])
                i, g = i + take, g + take
                # A finished group is one next_batch() on every rank: its end is the state that call
                # returns, so the state never includes windows that were only read ahead.
                if g % group == 0:
                    state = self.locate(chunks, g * span, start["windows"] + g)
                    if not _put(q, stop, (self.to_tensors(np.concatenate(own)), state)):
                        return
                    own = []

    def run(self, start, stop, q):
        """Thread body. Every failure goes to the main thread, so next_batch() raises instead of waiting."""
        try:
            self.produce(start, stop, q)
        except BaseException as e:
            _put(q, stop, _Failure(e))


# ---------------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------------

class PretrainLoader:
    """Packed pretraining batches for one rank; see the module docstring for the stream and its state."""

    def __init__(self, data_root, tokenizer, *, split="train", device_batch_size, max_seq_len,
                 rank=0, world_size=1, val_files="", device="cpu", prefetch=2):
        for name, value in (("device_batch_size", device_batch_size), ("max_seq_len", max_seq_len),
                            ("world_size", world_size), ("prefetch", prefetch)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"dataloader: {name} must be a positive int, got {value!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise UserError(f"dataloader: rank must be in [0, {world_size}), got {rank!r}")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            # Pinning would fail later inside the thread with a less helpful message.
            raise UserError(f"dataloader: device={device!r} but CUDA is not available; pass --device=cpu")
        # Every shard's footer is checked now, before the model is built, so bad data fails in seconds.
        self.shards = _inspect_all(list_shards(data_root, split, val_files))
        self._stream = _Stream(self.shards, tokenizer, device_batch_size, max_seq_len, rank, world_size,
                               pin=self.device.type == "cuda")
        # Memory bound: `prefetch` finished batches in the queue, plus one row group in the thread.
        # The thread starts lazily at the first next_batch(), so a load_state_dict() right after
        # construction does not waste a read of the start of the data.
        self._prefetch = prefetch
        self._thread = self._queue = self._stop = None
        self.reset()

    def state_dict(self) -> dict:
        """Position of the next window that no rank has been given yet; plain ints, the same on all ranks."""
        return dict(self._state)

    def load_state_dict(self, sd: dict):
        missing = [k for k in STATE_KEYS if k not in sd]
        if missing:
            raise UserError(f"dataloader state lacks {missing} (has {sorted(sd)}); it was not written by "
                            f"PretrainLoader.state_dict(): resume from a pretraining checkpoint or start fresh")
        # int() accepts ints that came back as numpy/torch scalars; the canonical check rejects positions
        # past the end of a row group / shard, which our own state_dict() never produces.
        state = {k: int(sd[k]) for k in STATE_KEYS}
        position = tuple(state[k] for k in STATE_KEYS[:4])
        if min(state.values()) < 0 or self._stream.canonical(*position) != position:
            raise UserError(f"dataloader state {state} points outside the {self.split} data "
                            f"({len(self.shards)} shards under {self.shards[0].path.parent}); the data changed "
                            f"since the checkpoint: resume with the same data_root/val_files or start fresh")
        self.close()  # batches the thread read ahead belong to the old position
        self._state, self.epoch = state, state["epoch"]

    def reset(self):
        """Back to the start of the data (the val loader does this before every evaluation)."""
        self.load_state_dict(dict.fromkeys(STATE_KEYS, 0))

    def next_batch(self):
        """(x, y) LongTensors of shape (device_batch_size, max_seq_len) on the loader's device."""
        if self._thread is None:
            self._start()
        item = self._get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        (x, y), state = item
        # One line per batch that crosses into a new epoch, from rank 0 only (all ranks cross together).
        if state["epoch"] > self.epoch and self.rank == 0:
            print(f"dataloader: {self.split} data exhausted after {state['windows']:,} windows; "
                  f"epoch {state['epoch'] + 1} begins (loader.epoch={state['epoch']})", flush=True)
        self._state, self.epoch = state, state["epoch"]
        # From pinned memory the copy overlaps with compute on the GPU's copy engine.
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        return x, y

    def _start(self):
        # The thread gets the stream, its own queue and stop event, never `self`: so a loader that goes
        # out of scope is collected, and __del__ can stop its thread.
        self._queue, self._stop = queue.Queue(maxsize=self._prefetch), threading.Event()
        self._thread = threading.Thread(target=self._stream.run, args=(dict(self._state), self._stop, self._queue),
                                        name=f"dataloader-{self.split}-rank{self.rank}", daemon=True)
        self._thread.start()

    def _get(self):
        """Next queue item. We poll so that a thread that died without a word cannot make us wait forever."""
        while True:
            try:
                return self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:
                        return self._queue.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("dataloader thread ended without a batch or an error") from None

    def close(self):
        """Stop the background thread. Safe to call twice; next_batch() afterwards starts a new one."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        deadline = time.monotonic() + 60  # the thread checks `stop` between row groups (< 1 s apart)
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                while True:  # emptying the queue frees the thread if it is blocked in put()
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.1)
        if thread.is_alive():
            print(f"dataloader: warning: thread {thread.name} did not stop within 60 s; leaving it (daemon)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass


# ---------------------------------------------------------------------------------------------------
# documents of any text file (for conversion to shards and tokenizer training)
# ---------------------------------------------------------------------------------------------------

def iter_documents(path):
    """The documents of one file, streamed: a .txt's blank-line-separated blocks, a .jsonl's or .parquet's `text`
    (or `prompt` + `response`, joined as the stream joins them). prepare_data.py's --convert and
    train_tokenizer.py read files through this."""
    path = Path(path)
    if path.suffix == ".txt":
        block = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).strip()
                    block = []
        if block:
            yield "".join(block).strip()
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                text = row.get("text") if isinstance(row, dict) else None
                if text is None and isinstance(row, dict) and "prompt" in row and "response" in row:
                    text = f"{row['prompt']}\n{row['response']}"
                if isinstance(text, str) and text.strip():
                    yield text
    elif path.suffix == ".parquet":
        pf = pq.ParquetFile(path)
        cols = ["text"] if "text" in pf.schema_arrow.names else ["prompt", "response"]
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            for row in batch.to_pylist():
                text = row["text"] if cols == ["text"] else f"{row['prompt']}\n{row['response']}"
                if text and text.strip():
                    yield text
    else:
        raise UserError(f"{path} is not .txt, .jsonl or .parquet: the text files we read")
