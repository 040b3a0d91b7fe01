"""conversations.py: conversation data for the chat stages: file readers and the seeded mixture.

One shape everywhere. A conversation is a list of messages {'role': 'system'|'user'|'assistant', 'content': str}:
an optional system message first, then user and assistant turns alternating, starting with the user and ending
with the assistant. A Record is one conversation plus `meta`, a small dict: the source file and line, Dolly's
`category` (and its raw `instruction` / `context` for the plain prompt format), a built-in task's name.

    records, report = read_records("../shared/data/dolly15k_head.jsonl")   # format detected from the first good row
    print(report.summary()); records[0].messages, records[0].meta["category"]
    mix = Mixture(parse_mixture("dolly15k_head.jsonl:2,spelling"), seed=0, val_fraction=0.05)
    mix.train[i], mix.val[i]                                              # Records, in a fixed order for the seed

Formats (fmt=): 'chat' (`messages`: OpenAI / SmolTalk role+content), 'sharegpt' (`conversations` of from/value:
human/gpt/system), 'alpaca' (instruction/input/output, LLaMA-Factory's optional system/history), 'dolly'
(instruction/context/response/category), 'gsm8k' (question/answer; `<<...>>` calculator annotations removed, the
'#### 42' line kept), 'prompt_response' (the large-dataset guide's parquet columns). Files: JSONL, a JSON array
(.json), or parquet. A row that does not fit is skipped and counted; see ReadReport. The built-in offline tasks
a mixture may name (spelling, count, arithmetic, identity) are generated in tasks.py; the loaders that turn
examples into batches are in conversation_loader.py.

Memory. JSONL is indexed, not loaded: one pass validates every line, and we keep only the byte offset, length
and line number of each good row (24 bytes a row, so 24 MB for SmolTalk's ~1M rows instead of ~4 GB of
Python strings). A record is re-read and re-parsed when it is accessed (~10 us); the loaders touch a few
hundred per step. Parquet keeps the needed columns as an Arrow table: the text once, in compact Arrow
buffers, with no Python object per row (random access by row group would decode a row group per example).
A .json array is parsed whole by json.load, so the raw text and the parsed rows coexist for a moment: fine for
demo files; convert a big one to JSONL.
"""
import json
import re
import sys
import zlib
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from configurator import UserError
from tasks import ASSISTANT_NAME, BUILTIN_SIZE, BUILTIN_TASKS, builtin_examples

FORMATS = ("chat", "sharegpt", "alpaca", "dolly", "gsm8k", "prompt_response")
MAX_BAD_FRACTION = 0.10   # more than this share of bad rows means the file is not what we think it is
# role spellings found in the wild -> ours ('human'/'gpt' are ShareGPT's; 'model'/'bot' appear in exports)
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}
# LLaMA-Factory's identity set (../shared/data/llamafactory_identity.jsonl) leaves these for the user to fill.
# Only Alpaca-format rows are filled: ShareGPT code answers contain template braces of their own.
PLACEHOLDERS = {"{{name}}": ASSISTANT_NAME, "{{author}}": "the t4chat team"}
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K: "<<48/2=24>>" is a tool call; we have no tools


# ---------------------------------------------------------------------------------------------------
# records and the read report
# ---------------------------------------------------------------------------------------------------

@dataclass
class Record:
    messages: list          # [{'role': ..., 'content': ...}, ...], normalised as described above
    meta: dict = field(default_factory=dict)


@dataclass
class ReadReport:
    """What one read found. `first_bad_line` is 1-based (a JSONL line, a parquet row, or a .json array item)."""
    path: str
    fmt: str = ""
    unit: str = "line"
    total: int = 0          # rows seen (blank JSONL lines are not rows)
    bad: int = 0
    first_bad_line: int | None = None
    reasons: Counter = field(default_factory=Counter)

    @property
    def good(self) -> int:
        return self.total - self.bad

    def add_bad(self, where: int, reason: str):
        self.bad += 1
        self.reasons[reason] += 1
        if self.first_bad_line is None:
            self.first_bad_line = where

    def summary(self) -> str:
        text = f"{self.path} ({self.fmt or '?'}): {self.good:,} of {self.total:,} rows used"
        if self.bad:
            why = ", ".join(f"{r} x{n}" for r, n in self.reasons.most_common(4))
            text += f", {self.bad:,} skipped (first at {self.unit} {self.first_bad_line}: {why})"
        return text

    def check(self):
        """UserError for a file with no usable row or more than 10 % bad rows."""
        where = f"; first bad {self.unit}: {self.first_bad_line}" if self.first_bad_line else ""
        why = f" ({', '.join(f'{r} x{n}' for r, n in self.reasons.most_common(4))})" if self.bad else ""
        if self.good == 0:
            raise UserError(f"{self.path}: no usable conversation in {self.total} rows{why}{where}; expected one "
                            f"of the formats {', '.join(FORMATS)} (see conversations.py)")
        if self.bad > MAX_BAD_FRACTION * self.total:
            raise UserError(f"{self.path}: {self.bad} of {self.total} rows are bad ({100 * self.bad / self.total:.0f}% "
                            f"> {100 * MAX_BAD_FRACTION:.0f}%){why}{where}; fix the file, or pass the right "
                            f"format if it was guessed wrong (detected {self.fmt!r})")


class _BadRow(Exception):
    """A row that does not fit its format; the message is the short reason that goes into ReadReport.reasons."""


# ---------------------------------------------------------------------------------------------------
# one row -> a Record, per format
# ---------------------------------------------------------------------------------------------------

def _text(row, key, required=True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise _BadRow(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise _BadRow(f"field '{key}' is {type(value).__name__}, not a string")
    return value


def _normalise(turns) -> list:
    """(role, content) pairs -> messages in our shape, or _BadRow. An empty system message is dropped, and a
    trailing user turn with no answer too (ShareGPT has them); any other defect makes the row bad."""
    messages = []
    for i, (role, content) in enumerate(turns):
        if role == "system" and i == 0:
            if content.strip():
                messages.append({"role": "system", "content": content})
            continue
        expected = "user" if not messages or messages[-1]["role"] != "user" else "assistant"
        if role != expected:
            raise _BadRow("roles do not alternate user/assistant")
        if not content.strip():
            raise _BadRow(f"empty {role} turn")
        messages.append({"role": role, "content": content})
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRow("no assistant turn")
    return messages


def _turns(items, what) -> list:
    """A `messages` / `conversations` list: items with role/content (OpenAI) or from/value (ShareGPT)."""
    if not isinstance(items, list):
        raise _BadRow(f"missing field '{what}'" if items is None else f"field '{what}' is not a list")
    turns = []
    for item in items:
        if not isinstance(item, dict):
            raise _BadRow(f"an item of '{what}' is not an object")
        role_key, content_key = ("role", "content") if "role" in item else ("from", "value")
        role = ROLES.get(str(item.get(role_key)).lower())
        if role is None:
            raise _BadRow(f"unknown role {item.get(role_key)!r}")
        turns.append((role, _text(item, content_key)))
    return turns


def _chat(row):
    return Record(_normalise(_turns(row.get("messages"), "messages")))


def _sharegpt(row):
    turns = _turns(row.get("conversations"), "conversations")
    system = _text(row, "system", required=False)  # LLaMA-Factory's ShareGPT variant has a top-level system
    return Record(_normalise(([("system", system)] if system else []) + turns))


def _fill(text):
    for key, value in PLACEHOLDERS.items():
        text = text.replace(key, value)
    return text


def _alpaca(row):
    instruction, extra, output = _text(row, "instruction"), _text(row, "input", False), _text(row, "output")
    user = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else instruction + extra
    turns = [("system", _text(row, "system", False))]
    history = row.get("history") or []  # LLaMA-Factory: earlier [question, answer] pairs
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 and all(
            isinstance(t, str) for t in h) for h in history):
        raise _BadRow("field 'history' is not a list of [question, answer] pairs")
    for q, a in history:
        turns += [("user", q), ("assistant", a)]
    turns += [("user", user), ("assistant", output)]
    return Record(_normalise([(role, _fill(text)) for role, text in turns]))


def _dolly(row):
    instruction, context = _text(row, "instruction"), _text(row, "context", False)
    response, category = _text(row, "response"), _text(row, "category", False)
    # The context passage follows the instruction in the user turn; the plain template (finetune_dolly's
    # prompt_format='alpaca') needs the two apart, hence the raw fields in meta.
    user = f"{instruction}\n\n{context}" if context.strip() else instruction
    return Record(_normalise([("user", user), ("assistant", response)]),
                  {"category": category or "unknown", "instruction": instruction, "context": context})


def _gsm8k(row):
    answer = _CALCULATOR.sub("", _text(row, "answer"))
    final = answer.rsplit("####", 1)[1].strip().replace(",", "") if "####" in answer else ""
    return Record(_normalise([("user", _text(row, "question")), ("assistant", answer)]), {"final": final})


def _prompt_response(row):
    return Record(_normalise([("user", _text(row, "prompt")), ("assistant", _text(row, "response"))]))


_CONVERT = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca, "dolly": _dolly, "gsm8k": _gsm8k,
            "prompt_response": _prompt_response}
# the columns each format reads (parquet reads only these)
_COLUMNS = {"chat": ("messages",), "sharegpt": ("conversations", "system"), "alpaca": (
    "instruction", "input", "output", "system", "history"), "dolly": ("instruction", "context", "response", "category"),
    "gsm8k": ("question", "answer"), "prompt_response": ("prompt", "response")}


def _detect(keys) -> str | None:
    """The format a row's keys say; checked in this order (Dolly before Alpaca: both have `instruction`)."""
    keys = set(keys)
    for fmt, needed in (("chat", {"messages"}), ("sharegpt", {"conversations"}), ("dolly", {"instruction", "response"}),
                        ("alpaca", {"instruction", "output"}), ("gsm8k", {"question", "answer"}),
                        ("prompt_response", {"prompt", "response"})):
        if needed <= keys:
            return fmt
    return None


def _convert(fmt, row) -> Record:
    if not isinstance(row, dict):
        raise _BadRow("row is not a JSON object")
    return _CONVERT[fmt](row)


# ---------------------------------------------------------------------------------------------------
# the good rows of one file, as a sequence of Records
# ---------------------------------------------------------------------------------------------------

class Records(Sequence):
    """The usable rows of one source, in file order. `strata` (Dolly's categories, else None) drives the
    stratified validation split without re-reading the file."""
    name: str
    fmt: str
    report: ReadReport
    strata: list | None = None

    def record(self, i) -> Record:
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} of {n} in {self.name}")
        return self.record(i % n)


class ListRecords(Records):
    """Records held in memory (.json arrays, built-in tasks, tests)."""

    def __init__(self, records, name="memory", fmt="", report=None, strata=None):
        self._records = list(records)
        self.name, self.fmt, self.strata = name, fmt, strata
        self.report = report or ReadReport(name, fmt, "item", len(self._records))

    def __len__(self):
        return len(self._records)

    def record(self, i):
        return self._records[i]


class _JsonlRecords(Records):
    """Good JSONL rows by byte offset; each access re-reads one line (see the module docstring)."""

    def __init__(self, path, fmt, report, offsets, lengths, lines, strata):
        self.path, self.name, self.fmt, self.report = path, path.name, fmt, report
        self._offsets, self._lengths, self._lines, self.strata = offsets, lengths, lines, strata

    def __len__(self):
        return len(self._offsets)

    def record(self, i):
        # Opened per access (~10 us): no handle to share between forked workers or threads, none left open.
        with open(self.path, "rb") as f:
            f.seek(self._offsets[i])
            raw = f.read(self._lengths[i])
        try:
            rec = _convert(self.fmt, json.loads(raw.decode("utf-8")))
        except (ValueError, _BadRow) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UserError(f"{self.path} line {self._lines[i]} no longer reads as it did when the file was "
                            f"indexed ({e}); the file changed during the run: restart it") from e
        rec.meta.update(source=self.name, line=self._lines[i])
        return rec


class _ArrowRecords(Records):
    """Good parquet rows: the needed columns stay in an Arrow table; a row becomes Python objects on access."""

    def __init__(self, path, fmt, report, table, rows, strata):
        self.path, self.name, self.fmt, self.report = path, path.name, fmt, report
        self._table, self._rows, self.strata = table, rows, strata

    def __len__(self):
        return len(self._rows)

    def record(self, i):
        row = self._rows[i]
        rec = _convert(self.fmt, self._table.slice(row, 1).to_pylist()[0])
        rec.meta.update(source=self.name, line=row + 1)
        return rec


def _strata(fmt):
    return [] if fmt == "dolly" else None


def _read_jsonl(path, fmt) -> Records:
    report = ReadReport(str(path), unit="line")
    if fmt == "auto":
        fmt = _detect_jsonl(path)
    report.fmt = fmt
    offsets, lengths, lines, strata = array("q"), array("q"), array("q"), _strata(fmt)
    # Binary mode: byte offsets for seek(), and the UTF-8 decoding is ours (explicit, whatever the locale).
    with open(path, "rb") as f:
        offset = 0
        for line_no, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM from a Windows editor
                raw, start = raw[3:], start + 3
            if not raw.strip():
                continue
            report.total += 1
            try:
                rec = _convert(fmt, json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError:
                report.add_bad(line_no, "not UTF-8")
                continue
            except ValueError:
                report.add_bad(line_no, "bad JSON")
                continue
            except _BadRow as e:
                report.add_bad(line_no, str(e))
                continue
            offsets.append(start)
            lengths.append(len(raw))
            lines.append(line_no)
            if strata is not None:
                strata.append(sys.intern(rec.meta["category"]))  # 8 categories: one string each, shared
    return _JsonlRecords(path, fmt, report, offsets, lengths, lines, strata)


def _detect_jsonl(path) -> str:
    """The format of the first line that parses as an object with known keys (earlier lines become bad rows)."""
    seen, first_bad = None, None
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig"))
            except ValueError:
                row = None
            fmt = _detect(row) if isinstance(row, dict) else None
            if fmt:
                return fmt
            first_bad = first_bad or line_no
            if isinstance(row, dict):
                seen = seen or sorted(row)
    raise _unknown_format(path, seen, first_bad)


def _unknown_format(path, keys, first_bad=None):
    where = f" (first bad line: {first_bad})" if first_bad else " (the file is empty)"
    if keys is None:
        return UserError(f"{path}: no usable conversation: no row is a JSON object{where}; expected JSONL in one "
                         f"of the formats {', '.join(FORMATS)}")
    return UserError(f"{path}: no usable conversation: cannot tell the format from the fields {keys}{where}; "
                     f"expected `messages` (chat), `conversations` (sharegpt), instruction/output (alpaca), "
                     f"instruction/response (dolly), question/answer (gsm8k) or prompt/response")


def _read_json_array(path, fmt) -> Records:
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON array ({e}); a .json file must hold one [...] of rows "
                        f"(or use JSONL, one object per line)") from e
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]  # {"data": [...]}, a common export shape
    if not isinstance(rows, list):
        raise UserError(f"{path}: the JSON holds a {type(rows).__name__}, not an array of rows")
    if fmt == "auto":
        first = next((r for r in rows if isinstance(r, dict) and _detect(r)), None)
        if first is None:
            keys = next((sorted(r) for r in rows if isinstance(r, dict)), None)
            raise _unknown_format(path, keys, 1 if rows else None)
        fmt = _detect(first)
    report, records, strata = ReadReport(str(path), fmt, "item"), [], _strata(fmt)
    for i, row in enumerate(rows, 1):
        report.total += 1
        try:
            rec = _convert(fmt, row)
        except _BadRow as e:
            report.add_bad(i, str(e))
            continue
        rec.meta.update(source=Path(path).name, line=i)
        records.append(rec)
        if strata is not None:
            strata.append(sys.intern(rec.meta["category"]))
    return ListRecords(records, Path(path).name, fmt, report, strata)


def _read_parquet(path, fmt) -> Records:
    import pyarrow.parquet as pq
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({e})") from e
    if fmt == "auto":
        fmt = _detect(names)
        if fmt is None:
            raise _unknown_format(path, sorted(names), 1)
    table = pq.read_table(path, columns=[c for c in _COLUMNS[fmt] if c in names])
    report, rows, strata = ReadReport(str(path), fmt, "row"), array("q"), _strata(fmt)
    row = 0
    for batch in table.to_batches(max_chunksize=4096):  # Python objects for 4096 rows at a time, then freed
        for values in batch.to_pylist():
            row += 1
            report.total += 1
            try:
                rec = _convert(fmt, values)
            except _BadRow as e:
                report.add_bad(row, str(e))
                continue
            rows.append(row - 1)
            if strata is not None:
                strata.append(sys.intern(rec.meta["category"]))
    return _ArrowRecords(Path(path), fmt, report, table, rows, strata)


def read_records(path, fmt="auto") -> tuple:
    """(Records, ReadReport) for a JSONL, .json array or parquet file; see the module docstring for formats.
    Bad rows are skipped and counted; no usable row, or more than 10 % bad, is a UserError naming the file and
    its first bad line."""
    path = Path(path).expanduser()
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown conversation format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise UserError(f"conversation file {path} " + ("is a folder" if path.is_dir() else "does not exist"))
    if path.suffix == ".parquet":
        records = _read_parquet(path, fmt)
    elif path.suffix == ".json" and _first_char(path) == "[":
        records = _read_json_array(path, fmt)
    else:  # .jsonl, or a .json that is really JSONL (one object per line)
        records = _read_jsonl(path, fmt)
    records.report.check()
    return records, records.report


def _first_char(path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                return line.strip()[0]
    return ""


def read_conversations(path, fmt="auto") -> tuple:
    """([conversation, ...], ReadReport): read_records() with the messages only, all in memory."""
    records, report = read_records(path, fmt)
    return [r.messages for r in records], report


def plain_prompt(record) -> tuple:
    """(prompt, response) in the Stanford Alpaca template, for base checkpoints (tokenizer.render_plain).
    Dolly records use their raw instruction/context; any other single-exchange record its user turn."""
    messages = record.messages if hasattr(record, "messages") else record
    meta = getattr(record, "meta", {})
    instruction, context = meta.get("instruction"), meta.get("context", "")
    if instruction is None:
        instruction = next(m["content"] for m in messages if m["role"] == "user")
    response = next(m["content"] for m in messages if m["role"] == "assistant")
    head = "Below is an instruction that describes a task"
    if context.strip():
        prompt = (f"{head}, paired with an input that provides further context. Write a response that "
                  f"appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n"
                  f"{context}\n\n### Response:\n")
    else:
        prompt = (f"{head}. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  f"{instruction}\n\n### Response:\n")
    return prompt, response


# ---------------------------------------------------------------------------------------------------
# the mixture: "path[:weight[:epochs]],...", a seeded order and a held-out validation part
# ---------------------------------------------------------------------------------------------------

@dataclass
class Source:
    spec: str               # the entry as written, for messages
    path: Path | None       # a file, or None for a built-in task
    task: str | None        # built-in task name, or None for a file
    weight: float = 1.0     # 2 = every example twice per pass; 0.5 = a seeded half (built-ins: n x weight)
    epochs: int = 1         # passes over the source

    @property
    def name(self) -> str:
        return self.task if self.task else self.path.name


def _default_base_dir() -> Path:
    from common import base_dir  # lazily: common imports torch, which reading data does not need
    return base_dir()


def _parse_entry(entry):
    """'path[:weight[:epochs]]' -> (path, weight, epochs); trailing numbers only, so C:\\x.jsonl stays a path."""
    parts, numbers = entry.split(":"), []
    while len(parts) > 1 and len(numbers) < 2 and re.fullmatch(r"\s*[0-9.eE+-]+\s*", parts[-1]):
        numbers.insert(0, parts.pop().strip())
    path, weight, epochs = ":".join(parts).strip(), 1.0, 1
    try:
        if numbers:
            weight = float(numbers[0])
        if len(numbers) > 1:
            epochs = int(numbers[1])
    except ValueError:
        raise UserError(f"mixture entry {entry!r}: expected path[:weight[:epochs]] with a number weight and an "
                        f"integer epochs, e.g. data.jsonl:2:1") from None
    if not (weight > 0 and np.isfinite(weight)) or epochs < 1:
        raise UserError(f"mixture entry {entry!r}: weight must be > 0 and epochs >= 1 (got weight={weight}, "
                        f"epochs={epochs}); leave a source out to not use it")
    return path, weight, epochs


def parse_mixture(spec, base_dir=None) -> list:
    """Sources of a mixture spec. A path is a built-in task name ('builtin' = all four), an absolute path, or
    a path relative to <base_dir>/data/ (default $NANOCHAT_BASE_DIR/data/), then to the current folder.
    An empty spec is the embedded default: the built-in tasks."""
    if not spec or not spec.strip():
        return [Source(name, None, name) for name in BUILTIN_TASKS]
    data_dir = Path(base_dir if base_dir is not None else _default_base_dir()).expanduser() / "data"
    sources = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        path, weight, epochs = _parse_entry(entry)
        if path in BUILTIN_TASKS or path == "builtin":
            tasks = BUILTIN_TASKS if path == "builtin" else (path,)
            sources += [Source(entry, None, t, weight, epochs) for t in tasks]
            continue
        p = Path(path).expanduser()
        candidates = [p] if p.is_absolute() else [data_dir / p, Path.cwd() / p]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            looked = " and ".join(str(c) for c in candidates)
            raise UserError(f"mixture entry {entry!r}: no file at {looked}; give an existing file (absolute, under "
                            f"{data_dir}, or relative to the current folder) or a built-in task: "
                            f"{', '.join(BUILTIN_TASKS)}, builtin")
        sources.append(Source(entry, found, None, weight, epochs))
    if not sources:
        raise UserError(f"mixture {spec!r} names no source")
    return sources


def _rng(seed, *keys):
    """numpy Generator for (seed, keys): keys are hashed with crc32, so 'val' of dolly.jsonl is the same
    draw in every run and process, whatever the other sources or the world size."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(k).encode("utf-8")) for k in keys])


class Examples(Sequence):
    """A list of examples as two index arrays (source, row) into a mixture's Records: 12 bytes an entry."""

    def __init__(self, records, source_ids, rows):
        self._records, self.source_ids, self.rows = records, source_ids, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._records[self.source_ids[i]][self.rows[i]]


class Mixture:
    """Sources read (or generated) once, split into .train and .val, both Examples in a fixed order.

    Validation: per file source, round(n * val_fraction) rows drawn with a generator seeded by (seed, file
    name), stratified by category when the rows have one (Dolly), at least one when the source has >= 2
    rows. It depends on nothing else: not on weights, epochs, other sources or the world size. Built-in tasks
    draw their val part from their held-out items. .val keeps source order and file order.
    Training: the remaining rows of each source, `epochs` passes of `weight` each (whole copies plus a seeded
    subset for the fraction, a different subset each pass), then all sources shuffled together with `seed`.
    """

    def __init__(self, sources, seed=0, val_fraction=0.05, *, builtin_size=BUILTIN_SIZE, log=None):
        """log: a print-like callable for one line per source and the totals (the stages pass print0, so the
        lines reach train.log too); None = silent."""
        if isinstance(sources, str):
            sources = parse_mixture(sources)
        if not 0 <= val_fraction < 1:
            raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.sources, self.seed, self.val_fraction = list(sources), seed, val_fraction
        self.records, self.reports = [], []
        train, val = [], []  # (source id, np rows) parts
        for sid, src in enumerate(self.sources):
            if src.task:
                n_val = max(1, round(builtin_size * val_fraction)) if val_fraction > 0 else 0
                tr = builtin_examples(src.task, max(1, round(builtin_size * src.weight)), seed, "train")
                va = builtin_examples(src.task, n_val, seed, "val")
                recs = ListRecords([Record(m, {"source": src.task, "task": src.task}) for m in tr + va],
                                   src.task, "builtin")
                rows_train, rows_val = np.arange(len(tr)), np.arange(len(tr), len(tr) + len(va))
                train += [(sid, rows_train)] * src.epochs
            else:
                recs, _ = read_records(src.path)
                rows_val = self._val_rows(src, recs)
                rows_train = np.setdiff1d(np.arange(len(recs)), rows_val)
                train += [(sid, self._weighted(src, rows_train, e)) for e in range(src.epochs)]
            val.append((sid, rows_val))
            self.records.append(recs)
            self.reports.append(recs.report)
            if log is not None:
                log(f"mixture: {recs.report.summary()}; train {len(rows_train):,} x weight {src.weight} x "
                    f"{src.epochs} epochs, val {len(rows_val):,}")
        order = _rng(seed, "mixture-order").permutation(sum(len(r) for _, r in train)) if train else []
        self.train = self._examples(train, order)
        self.val = self._examples(val, None)
        if log is not None:
            log(self.summary().rsplit("\n", 1)[-1])  # the totals

    def _val_rows(self, src, recs) -> np.ndarray:
        n, f = len(recs), self.val_fraction
        if f == 0 or n < 2:
            return np.zeros(0, dtype=np.int64)
        labels = np.array(recs.strata) if recs.strata is not None else np.zeros(n, dtype=np.int8)
        picked = []
        for label in sorted(set(labels.tolist())):  # sorted: the draw order does not depend on set order
            rows = np.flatnonzero(labels == label)
            k = round(len(rows) * f)
            picked.append(_rng(self.seed, src.name, "val", label).permutation(rows)[:k])
        rows = np.sort(np.concatenate(picked))
        if len(rows) == 0:  # every stratum rounded to 0: still hold out one row so validation is possible
            rows = _rng(self.seed, src.name, "val").permutation(n)[:1]
        return rows.astype(np.int64)

    def _weighted(self, src, rows, epoch) -> np.ndarray:
        whole, frac = int(src.weight), src.weight - int(src.weight)
        k = round(len(rows) * frac)
        part = np.sort(_rng(self.seed, src.name, "weight", epoch).permutation(rows)[:k]) if k else rows[:0]
        return np.concatenate([rows] * whole + [part])

    def _examples(self, parts, order) -> Examples:
        if not parts:
            return Examples(self.records, np.zeros(0, np.int32), np.zeros(0, np.int64))
        sids = np.concatenate([np.full(len(rows), sid, dtype=np.int32) for sid, rows in parts])
        rows = np.concatenate([np.asarray(r, dtype=np.int64) for _, r in parts])
        if order is not None:
            sids, rows = sids[order], rows[order]
        return Examples(self.records, sids, rows)

    def summary(self) -> str:
        lines = [r.summary() for r in self.reports]
        lines.append(f"mixture: {len(self.train):,} training examples, {len(self.val):,} validation, seed {self.seed}")
        return "\n".join(lines)
