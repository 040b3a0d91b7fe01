"""hf.py: our models and tokenizers in Hugging Face's formats: a LlamaForCausalLM folder with its tokenizer.json.

    write_hf_folder(model, tok, folder, dtype="float16", chat=True, provenance={...})   # export_hf.py's work
    check_hf_folder(folder, model, tok)      # transformers loads it and agrees with us: logits, ids, chat template
    gpt_from_hf_folder(folder)               # our GPT from such a folder's config.json + model.safetensors
    hf_checkpoint(folder)                    # such a folder as a checkpoint dict: pretrained_checkpoint=hf:<folder>

The model is a rename: our modules carry Llama's names, RMSNorm, SwiGLU and rotate-half RoPE (model.py), so a key
gains "model." (lm_head keeps its own) and the config is a table. The tokenizer is rebuilt for the `tokenizers`
library: a byte-level BPE whose vocabulary is our tokens spelled in GPT-2's byte alphabet, whose merges are
recovered from the ranks, behind our split pattern; the chat specials are added tokens with our ids, and the chat
template is chat_format's jinja_template(). Import (an 'hf:<folder>' checkpoint spec: SmolLM2 and other Llama-family
models, tied or not, GQA, their RoPE base, sharded safetensors) reads with the same tables; its tokenizer is
tokenizer.HFTokenizer (the folder's tokenizer.json run by `tokenizers`), its chat format the folder's (ChatML).
transformers, safetensors and tokenizers are imported inside the functions that use them: training never loads them.
"""
import json
import shutil
from pathlib import Path

import torch

from configurator import UserError
from model import GPT, GPTConfig
from tokenizer import byte_level_alphabet

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FP16_MAX = 65504.0
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_FILE = "t4chat.json"
# what check_hf_folder feeds both sides: English, Chinese and emoji, a system turn and two exchanges
CHECK_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. 简洁地回答。"},
    {"role": "user", "content": "What's the capital of France? 🙂"},
    {"role": "assistant", "content": "Paris.  It has been the capital since 987.\n"},
    {"role": "user", "content": "你好！今天天气怎么样？ 👩‍👩‍👧 Ça va?"},
]


class ExportMismatch(AssertionError):
    """The export disagrees with our model or tokenizer: a bug in this module, never the user's input."""


def _expect(ok, message):
    if not ok:  # a raise, not an assert: python -O must not skip the check
        raise ExportMismatch(message)


# ---- the model: keys and config ----

def hf_key(key: str) -> str:
    """Our state_dict key -> LlamaForCausalLM's: the decoder lives under 'model.', the classifier beside it."""
    return key if key.startswith("lm_head.") else "model." + key


def our_key(key: str) -> str:
    return key.removeprefix("model.")


def llama_config(cfg: GPTConfig, *, bos_id: int, eos_ids: list, dtype: str) -> dict:
    """config.json for transformers' LlamaConfig, written out in full rather than as a diff against its defaults:
    those have changed between releases (rms_norm_eps is 1e-6 there, 1e-5 here). rope_theta and torch_dtype are
    the 4.x spellings, rope_parameters and dtype the 5.x ones; each reads its own and ignores the other's."""
    import transformers
    c = cfg.resolved()
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size,  # padded to a multiple of 64: the ids past the tokenizer's are never produced
        "hidden_size": c.n_embd, "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.depth,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.n_embd // c.n_head,
        "hidden_act": "silu", "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": c.tie_embeddings, "bos_token_id": bos_id,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else list(eos_ids), "pad_token_id": None,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
        "transformers_version": transformers.__version__,
    }


def gpt_config_from_llama(d: dict) -> GPTConfig:
    """The inverse of llama_config(); ValueError naming a field our model cannot represent. A missing field takes
    LlamaConfig's default, as transformers would."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    unsupported = {"model_type": (d.get("model_type"), "llama"), "hidden_act": (d.get("hidden_act", "silu"), "silu"),
                   "attention_bias": (d.get("attention_bias", False), False),
                   "mlp_bias": (d.get("mlp_bias", False), False),
                   **{f"{f}.rope_type": ((d.get(f) or {}).get("rope_type", (d.get(f) or {}).get("type", "default")),
                                          "default") for f in ("rope_parameters", "rope_scaling")},
                   "pretraining_tp": (d.get("pretraining_tp", 1), 1)}
    n_head = d["num_attention_heads"]
    unsupported["head_dim"] = (d.get("head_dim") or d["hidden_size"] // n_head, d["hidden_size"] // n_head)
    bad = [f"{k}={got!r} (we need {want!r})" for k, (got, want) in unsupported.items() if got != want]
    if bad:
        raise ValueError(f"not a model t4chat can run: {', '.join(bad)}")
    return GPTConfig(depth=d["num_hidden_layers"], n_embd=d["hidden_size"], n_head=n_head,
                     n_kv_head=d.get("num_key_value_heads") or n_head, mlp_hidden=d["intermediate_size"],
                     vocab_size=d["vocab_size"], max_seq_len=d.get("max_position_embeddings", 2048),
                     rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                     norm_eps=float(d.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(d.get("tie_word_embeddings")))


def hf_state_dict(model: GPT, dtype: torch.dtype) -> dict:
    """{HF key: contiguous tensor in dtype}. Tied, lm_head.weight is left out, as transformers saves it (safetensors
    refuses two names for one tensor, and tie_word_embeddings makes the loader share it again)."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue
        if not torch.isfinite(value).all():
            raise UserError(f"the checkpoint's {key} holds NaN or inf; export a checkpoint from before the run "
                            f"diverged")
        if dtype == torch.float16 and value.abs().max().item() > FP16_MAX:
            raise UserError(f"{key} has weights beyond float16's range (|w| up to {value.abs().max().item():.4g}); "
                            f"export with --dtype=bfloat16 or --dtype=float32")
        out[hf_key(key)] = value.detach().to(dtype).contiguous()
    return out


def state_dict_from_hf(tensors: dict, cfg: GPTConfig) -> dict:
    """The inverse of hf_state_dict(): our keys; tied, lm_head.weight is the embedding (load_state_dict wants both)."""
    # rotary_emb.inv_freq: a buffer older transformers saved with the weights; ours is rebuilt from the config
    sd = {our_key(k): v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        sd.setdefault("lm_head.weight", sd["embed_tokens.weight"])
    return sd


def gpt_from_hf_folder(folder) -> GPT:
    """Our GPT (float32, eval mode) from a folder's config.json and its safetensors weights."""
    folder = Path(folder)
    cfg = read_hf_config(folder)
    model = GPT(cfg)
    model.load_state_dict(state_dict_from_hf(read_hf_weights(folder), model.config))
    return model.float().eval()


def read_hf_config(folder: Path) -> GPTConfig:
    """Our config from config.json; UserError naming the field we cannot run (another architecture, rope scaling,
    biases, a head_dim of its own)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not a Hugging Face model folder: no config.json")
    d = json.loads(path.read_text(encoding="utf-8"))
    archs = d.get("architectures") or ["LlamaForCausalLM"]
    if d.get("model_type") != "llama" or archs != ["LlamaForCausalLM"]:
        raise UserError(f"{path}: model_type={d.get('model_type')!r}, architectures={archs}; t4chat runs Llama-family "
                        f"models with a byte-level BPE tokenizer (model_type 'llama': SmolLM2, Llama 3 without rope "
                        f"scaling)")
    try:
        return gpt_config_from_llama(d)
    except (ValueError, KeyError) as e:
        raise UserError(f"{path}: {e}") from None


def read_hf_weights(folder: Path) -> dict:
    """{HF key: tensor} from model.safetensors, or from the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file
    folder = Path(folder)
    index = folder / (WEIGHTS_FILE + ".index.json")
    if (folder / WEIGHTS_FILE).is_file():
        return load_file(str(folder / WEIGHTS_FILE))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    raise UserError(f"{folder} has no {WEIGHTS_FILE} (nor {index.name}); t4chat reads safetensors weights only "
                    f"(a pytorch_model.bin is pickled code: convert it with transformers' save_pretrained)")


def hf_checkpoint(folder) -> dict:
    """A Hugging Face Llama folder as a t4chat checkpoint (what checkpoint.load_checkpoint returns): the weights
    under our keys, the architecture, the tokenizer record (hf:<folder>, so every later checkpoint of a run that
    starts here finds it), stage 'hf', step 0. Refuses, naming the field, what we cannot run."""
    from tokenizer import get_tokenizer
    folder = Path(folder).expanduser().resolve()
    cfg = read_hf_config(folder).resolved()
    tok = get_tokenizer(f"hf:{folder}")
    if tok.n_tokens > cfg.vocab_size:
        raise UserError(f"{folder}: tokenizer.json has {tok.n_tokens} tokens, config.json's vocab_size is "
                        f"{cfg.vocab_size}: they are not one model's")
    tensors = read_hf_weights(folder)
    with torch.device("meta"):  # the key names without the memory
        expected = {hf_key(k) for k in GPT(cfg).state_dict()}
    missing = sorted(expected - set(tensors) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing:
        raise UserError(f"{folder}: the weights lack {', '.join(missing)}; not a complete LlamaForCausalLM")
    extra = sorted(k for k in set(tensors) - expected if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise UserError(f"{folder}: weights t4chat's Llama has no place for: {', '.join(extra[:5])}"
                        f"{' ...' if len(extra) > 5 else ''} (biases or another architecture's layers)")
    provenance = {}
    if (folder / PROVENANCE_FILE).is_file():  # exported from here: its stage says what it is
        provenance = json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))
    return {"model": state_dict_from_hf(tensors, cfg), "arch": cfg.arch_dict(), "tokenizer": tok.describe(),
            "stage": "hf", "step": 0, "config": {}, "hf": {"folder": str(folder), "provenance": provenance}}


# ---- the tokenizer ----

def bpe_merges(token_values: list) -> list:
    """(left, right) byte pairs in merge order, from a rank-ordered vocabulary.

    tiktoken merges any adjacent pair whose concatenation is a token, the lowest rank first; a merge list allows only
    the pairs it names. So every split of a token into two tokens becomes a merge, ranked by the token it makes
    (transformers' TikTokenConverter does the same); together with ignore_merges (a whole pre-token that is a token
    is taken as is, as tiktoken does) this gives tiktoken's ids, checked on GPT-2 and on a BPE we trained.
    """
    ranks = {v: i for i, v in enumerate(token_values)}
    merges = []
    for token in token_values:  # rank order
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        merges += sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    return merges


def hf_tokenizer(tok):
    """A tokenizers.Tokenizer that encodes text to our ids. One difference is by design: text that spells a special
    ("<|user_start|>") becomes that special there, as in every Hugging Face chat tokenizer (a chat template renders
    to a string, so the specials must be parsed back out of it), while our encode() never parses specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    values, specials = tok.vocabulary()
    # latin-1 maps byte b to chr(b); translate() then spells it in the alphabet, in C (GPT-2: 100k merges)
    table = str.maketrans({chr(b): c for b, c in byte_level_alphabet().items()})
    spelled = {v: v.decode("latin-1").translate(table) for v in values}
    bpe = models.BPE(vocab={spelled[v]: i for i, v in enumerate(values)},
                     merges=[(spelled[a], spelled[b]) for a, b in bpe_merges(values)], ignore_merges=True)
    out = Tokenizer(bpe)
    # our pattern splits the text (tiktoken's regex); then ByteLevel only maps bytes to the alphabet: its own regex
    # (use_regex) is GPT-2's, which would split a second time and break our pattern's pieces
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if tok.pattern:  # the bytes tokenizer has none: one piece, no merges
        steps.insert(0, pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated", invert=False))
    out.pre_tokenizer = pre_tokenizers.Sequence(steps)
    out.decoder = decoders.ByteLevel()
    # added tokens take the next free ids, in order: ours follow the text vocabulary without gaps
    for i, name in sorted(specials.items()):
        out.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        _expect(out.token_to_id(name) == i, f"special {name!r} got id {out.token_to_id(name)} in tokenizer.json, "
                                            f"ours is {i}")
    return out


def eos_ids(tok, chat: bool) -> list:
    """What ends generation: a chat model's stop tokens (end of turn first: it is the eos_token), a base model's bos."""
    return list(dict.fromkeys(tok.special_id(n) for n in tok.chat_format.stop_names)) if chat else [tok.bos_id]


def hf_tokenizer_config(tok, *, chat: bool, max_len: int) -> dict:
    """tokenizer_config.json. The generic fast class: a model-specific one (LlamaTokenizer, GPT2Tokenizer) would be
    rebuilt by transformers 5 from its own pieces instead of our tokenizer.json."""
    _, specials = tok.vocabulary()
    bos, eos = specials[tok.bos_id], specials[eos_ids(tok, chat)[0]]
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
            # the rest of the chat specials: all_special_ids lists them, which is what servers (vLLM) skip when
            # detokenizing; 4.x and 5.x both read this key (5.x's extra_special_tokens breaks 4.x)
            "additional_special_tokens": [n for n in specials.values() if n not in (bos, eos)],
            "model_max_length": max_len,
            "add_bos_token": False, "add_eos_token": False,  # our encode() adds nothing; templates add bos
            "clean_up_tokenization_spaces": False, "chat_template": tok.chat_format.jinja_template()}


# ---- the folder ----

def write_hf_folder(model: GPT, tok, folder, *, dtype="float16", chat=True, provenance=None) -> list:
    """Write the export into `folder` (created; the caller makes it atomic). Returns the files written.
    chat: a chat model (mid, SFT, Dolly) stops at the end of its turn; a base model at bos."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    eos = eos_ids(tok, chat)
    cfg = llama_config(model.config, bos_id=tok.bos_id, eos_ids=eos, dtype=dtype)
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": eos[0],  # only pads a batch's finished rows; saves transformers' warning
           # the embedding's padding rows (ids past the tokenizer's) are never text: engine.py never samples them
           "suppress_tokens": list(range(tok.n_tokens, model.config.vocab_size)),
           "transformers_version": cfg["transformers_version"]}
    files = {"config.json": cfg, "generation_config.json": gen, PROVENANCE_FILE: provenance or {}}
    for name, data in files.items():
        _write_json(folder / name, data)
    tokenizer_files = write_hf_tokenizer(tok, folder, chat=chat, max_len=model.config.max_seq_len)
    save_file(hf_state_dict(model, DTYPES[dtype]), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    shutil.copymode(folder / "config.json", folder / WEIGHTS_FILE)  # safetensors creates it 0600; readable as the rest
    return sorted([*files, *tokenizer_files, WEIGHTS_FILE])


def write_hf_tokenizer(tok, folder, *, chat=True, max_len=1024) -> list:
    """tokenizer.json and tokenizer_config.json: what AutoTokenizer.from_pretrained(folder) reads. A tokenizer that
    came from a Hugging Face folder (tokenizer.HFTokenizer) goes back as its own files: the same ids, specials and
    chat template as the model it was imported from."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = getattr(tok, "folder", None)
    if source is not None:
        names = [n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "chat_template.jinja") if (source / n).is_file()]
        for name in names:
            shutil.copyfile(source / name, folder / name)
        return names
    hf_tokenizer(tok).save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", hf_tokenizer_config(tok, chat=chat, max_len=max_len))
    return ["tokenizer.json", "tokenizer_config.json"]


def write_provenance(folder, info: dict):
    """t4chat.json again, once more is known (check_hf_folder's figures)."""
    _write_json(Path(folder) / PROVENANCE_FILE, info)


def _write_json(path: Path, data):
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_hf_folder(folder, model: GPT, tok, conversation=CHECK_CONVERSATION) -> dict:
    """Load the folder with transformers (offline: a local folder) and compare it with ours; ExportMismatch on any
    difference. Both sides run in float32 on the exported (rounded) weights, which our inverse mapping must read
    back as exactly the model's weights in the export dtype. Returns the figures."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = Path(folder)
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    fmt = tok.chat_format
    texts = [m["content"] for m in conversation]
    for text in texts:
        got = hf_tok(text, add_special_tokens=False)["input_ids"]
        _expect(got == tok.encode(text), f"tokenizer.json encodes {text!r} as {got}, ours as {tok.encode(text)}")
    ids = fmt.render_prompt(conversation)
    got = list(hf_tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"])
    _expect(got == ids, f"the chat template gives {got}, render_prompt gives {ids}")

    ours = gpt_from_hf_folder(folder)
    dtype = DTYPES[json.loads((folder / "config.json").read_text(encoding="utf-8"))["torch_dtype"]]
    mine = model.state_dict()
    for key, value in ours.state_dict().items():
        _expect(torch.equal(value, mine[key].to(dtype).float()), f"{key} does not read back as written")
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    x = torch.tensor([ids[:model.config.max_seq_len]])
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits.float()
    diff = (a - b).abs().max().item()
    # float32 on both sides, the same math in another order: ~1e-6 of the logits' scale
    limit = 1e-4 * max(1.0, a.abs().max().item())
    _expect(diff <= limit, f"transformers' logits differ from ours by up to {diff:.3g} (allowed {limit:.3g})")
    return {"tokens": x.size(1), "max_abs_logit_diff": diff, "max_abs_logit": a.abs().max().item()}
