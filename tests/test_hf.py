"""Hugging Face export (hf.py, export_hf.py): transformers loads the folder offline and agrees with us exactly, for
every tokenizer kind; tied embeddings. python -m pytest -q tests/test_hf.py"""
import json
import os
import subprocess
import sys

import pytest
import torch

import export_hf
import hf
from checkpoint import CheckpointManager, build_from_checkpoint, check_arch, load_checkpoint
from common import UserError
from conftest import REPO, SHARED, needs_shared
from engine import generate
from model import GPT, GPTConfig
from tokenizer import get_tokenizer, save_bpe

pytestmark = pytest.mark.usefixtures("hf_offline")  # no hub: the tests read local folders only

TEXT = ("The quick brown fox jumps over the lazy dog. It's 2024; prices rose 3.5% (¥120 → ¥124).\n\n"
        "  Indented line\twith a tab, naïve café, Ünïcödé.\n"
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。今天我们学习分词：大型语言模型。\n"
        "Emoji: 🙂🚀 👩‍👩‍👧 ❤️ 🇫🇷 — and a trailing space ")
SAMPLES = ["Hello world", "你好，世界！", "🙂👩‍👩‍👧 emoji ❤️", "  spaces\t\ttabs\r\nnewlines\n\n", "'s 'll 'VE don't",
           "", " ", TEXT]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi 🙂"}],
    [{"role": "system", "content": "简洁地回答。"}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris.\n"}, {"role": "user", "content": "你好！ And of Japan? 🗾"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}, {"role": "user", "content": ""},
     {"role": "assistant", "content": "再见 👋"}, {"role": "user", "content": "  last  "}],
]


@pytest.fixture(autouse=True)
def export_defaults(monkeypatch):
    """main() writes its flags into export_hf's globals (nanoGPT's configurator): each test starts from the defaults."""
    for key in ("checkpoint", "out", "dtype", "overwrite", "verify"):
        monkeypatch.setattr(export_hf, key, getattr(export_hf, key))


def bpe_of_our_own(folder):
    """A small BPE trained with rustbpe (its GPT-4-style pattern, as train_tokenizer.py saves it)."""
    import rustbpe
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter([TEXT] * 4 + SAMPLES + [c["content"] for conv in CONVERSATIONS for c in conv]), 400)
    return get_tokenizer(str(save_bpe(folder, dict(bpe.get_mergeable_ranks()), bpe.get_pattern())))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{kind: (our tokenizer, transformers' AutoTokenizer over our export of it)}."""
    from transformers import AutoTokenizer
    out = {}
    for kind in ("bytes", "gpt2", "bpe"):
        tok = bpe_of_our_own(tmp_path_factory.mktemp("bpe") / "tok") if kind == "bpe" else get_tokenizer(kind)
        folder = tmp_path_factory.mktemp(f"tok_{kind}")
        hf.write_hf_tokenizer(tok, folder)
        out[kind] = tok, AutoTokenizer.from_pretrained(str(folder))
    return out


def train_checkpoint(run_dir, tok, stage="sft", steps=8, **arch):
    """A tiny model trained for a few steps on real text, saved as the stages save. AdamW: Muon's small matmuls stall
    for ~0.1 s each when another process keeps the second core busy."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=2, n_embd=64, vocab_size=tok.vocab_size, max_seq_len=64, **arch))
    ids = torch.tensor([tok.bos_id] + tok.encode(TEXT * 4))
    x, y = ids[:4 * 64].view(4, 64), ids[1:4 * 64 + 1].view(4, 64)
    opt = model.configure_optimizers("adamw", max_lr=0.01)
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    state = {"model": model.state_dict(), "arch": model.config.arch_dict(), "tokenizer": tok.describe(),
             "stage": stage, "step": steps, "config": {}}
    CheckpointManager(run_dir).save(steps, state, {})
    return model.eval(), x


def export(ckpt, out, *flags):
    export_hf.main([f"--checkpoint={ckpt}", f"--out={out}", "--dtype=float32", "--overwrite=False",
                    "--verify=True", *flags])


# ---- the model ----

# GPT-2: bos is <|endoftext|> and the vocabulary is padded (50263 -> 50304); bytes: 263 -> 320, and cheap to tie
@pytest.mark.parametrize("kind,tied", [("gpt2", False), ("bytes", True)])
def test_export_loads_offline_and_logits_ids_and_chat_template_match(tmp_path, kind, tied, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = get_tokenizer(kind)
    # GQA, and a small rope_theta and eps other than the defaults: each must reach config.json
    model, x = train_checkpoint(tmp_path / "run", tok, n_head=4, n_kv_head=2, rope_theta=500.0, norm_eps=1e-6,
                                tie_embeddings=tied)
    export(tmp_path / "run", tmp_path / "hf")
    assert "verified with transformers" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]) == (2, 16, 1e-6)
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"] == 500.0 and cfg["tie_word_embeddings"] == tied
    assert cfg["vocab_size"] == tok.vocab_size and cfg["torch_dtype"] == "float32" and cfg["bos_token_id"] == tok.bos_id
    assert cfg["eos_token_id"] == [tok.special_id("<|assistant_end|>"), tok.bos_id, tok.special_id("<|user_start|>")]
    prov = json.loads((tmp_path / "hf" / "t4chat.json").read_text())
    assert prov["step"] == 8 and prov["stage"] == "sft" and prov["checkpoint"].endswith("ckpt_000008.pt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left

    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert (theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():
        diff = (model(x) - theirs(x).logits).abs().max().item()
    assert diff < 1e-4, diff

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok(TEXT)["input_ids"] == tok.encode(TEXT) and hf_tok.decode(tok.encode(TEXT)) == TEXT
    prompt = tok.chat_format.render_prompt(CONVERSATIONS[0])  # short: a bytes prompt + 12 tokens fits 64 positions
    assert list(hf_tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, return_dict=True)
                ["input_ids"]) == prompt
    # greedy answers agree too: transformers' KV cache, its stop tokens and suppressed padding ids against engine.py
    ours, reason = generate(model, tok, prompt, max_tokens=12, stop_ids=tok.chat_format.stop_ids())
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert out[:len(ours)] == ours and (reason == "length" or out[len(ours)] in cfg["eos_token_id"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_written_and_loaded_as_asked_and_a_base_model_stops_at_bos(tmp_path, dtype):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    tok = get_tokenizer("bytes")
    model, _ = train_checkpoint(tmp_path / "run", tok, stage="base", steps=2)
    export(tmp_path / "run", tmp_path / "hf", f"--dtype={dtype}")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == dtype and cfg["eos_token_id"] == tok.bos_id
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["eos_token"] == "<|bos|>"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {hf.DTYPES[dtype]}
        assert torch.equal(f.get_tensor("lm_head.weight"), model.lm_head.weight.to(hf.DTYPES[dtype]))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="auto")
    assert loaded.dtype == hf.DTYPES[dtype]
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode == (tmp_path / "hf" / "config.json").stat().st_mode


def test_bad_input_is_refused_and_no_half_export_is_left(tmp_path, monkeypatch):
    tok = get_tokenizer("bytes")
    model, _ = train_checkpoint(tmp_path / "run", tok, steps=2)
    with pytest.raises(UserError, match="--out="):
        export_hf.main([f"--checkpoint={tmp_path / 'run'}", "--out="])
    with pytest.raises(UserError, match="fp8.*is not one of float32, float16, bfloat16"):
        export(tmp_path / "run", tmp_path / "hf", "--dtype=fp8")
    # a folder of something else: kept without --overwrite, and with it too (not an export: a typo, a run folder)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite=True"):
        export(tmp_path / "run", tmp_path / "mine")
    with pytest.raises(UserError, match="not a Hugging Face export"):
        export(tmp_path / "run", tmp_path / "mine", "--overwrite=True")
    export(tmp_path / "run", tmp_path / "hf", "--verify=False")
    first = (tmp_path / "hf" / "t4chat.json").read_text()
    # a verification that fails (a bug of ours) leaves the earlier export as it was, and no partial folder
    monkeypatch.setattr(hf, "check_hf_folder", lambda *a: (_ for _ in ()).throw(hf.ExportMismatch("logits differ")))
    with pytest.raises(hf.ExportMismatch):
        export(tmp_path / "run", tmp_path / "hf", "--overwrite=True")
    assert (tmp_path / "hf" / "t4chat.json").read_text() == first
    monkeypatch.undo()
    export(tmp_path / "run", tmp_path / "hf", "--overwrite=True")
    assert "verified" in json.loads((tmp_path / "hf" / "t4chat.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mine", "run"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # float16 cannot hold a weight past 65504: refused, with the dtypes that can
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1e5
    with pytest.raises(UserError, match="bfloat16"):
        hf.hf_state_dict(model, torch.float16)


# ---- the tokenizer, every kind ----

@pytest.mark.parametrize("kind", ["bytes", "gpt2", "bpe"])
def test_ids_and_chat_template_match_ours(tokenizers, kind):
    tok, hf_tok = tokenizers[kind]
    for text in SAMPLES:
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids, text  # no bos or eos added: our encode() adds none
        assert hf_tok.decode(ids) == text
    fmt = tok.chat_format
    for conv in CONVERSATIONS:
        prompt = hf_tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert list(prompt) == fmt.render_prompt(conv), conv
        full = conv + [{"role": "assistant", "content": "好的 🙂 OK."}]  # a whole conversation, as SFT renders it
        assert list(hf_tok.apply_chat_template(full, return_dict=True)["input_ids"]) == fmt.render(full)[0], conv
    for bad in ([{"role": "assistant", "content": "x"}], [{"role": "user", "content": "x"}] * 2,
                [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]):
        with pytest.raises(ValueError):
            fmt.render_prompt(bad)
        with pytest.raises(Exception, match="has role"):
            hf_tok.apply_chat_template(bad, add_generation_prompt=True)
    _, specials = tok.vocabulary()
    assert hf_tok.bos_token == specials[tok.bos_id] and hf_tok.eos_token == "<|assistant_end|>"
    assert sorted(hf_tok.all_special_ids) == sorted(specials)  # what servers skip when they detokenize
    assert hf_tok.decode(fmt.render_prompt(CONVERSATIONS[2]), skip_special_tokens=True) == \
        "Be brief.Capital of France?Paris.\n你好！ And of Japan? 🗾"


@needs_shared
def test_ids_match_ours_on_real_corpora(tokenizers):
    import pyarrow.parquet as pq
    docs = pq.read_table(SHARED / "data" / "pretrain" / "shard_00004.parquet").column("text").to_pylist()[:300]
    zh = pq.read_table(SHARED / "data" / "zh" / "pretrain_zh.parquet")
    docs += [str(v) for c in zh.column_names if str(zh.schema.field(c).type) == "string"
             for v in zh.column(c).to_pylist()[:300]]
    for kind in ("gpt2", "bpe"):
        tok, hf_tok = tokenizers[kind]
        assert hf_tok(docs)["input_ids"] == tok.encode_batch(docs), kind


# ---- tied embeddings in our model ----

def test_tied_embeddings_share_one_matrix_in_optimizer_and_checkpoint(tmp_path):
    tied = GPT(GPTConfig(depth=2, n_embd=64, vocab_size=320, max_seq_len=32, tie_embeddings=True))
    untied = GPT(GPTConfig(depth=2, n_embd=64, vocab_size=320, max_seq_len=32))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.num_params() == untied.num_params() - 320 * 64
    assert tied.estimate_flops_per_token() == untied.estimate_flops_per_token()  # lm_head's matmul still counts
    assert set(tied.state_dict()) == set(untied.state_dict())  # HF's key layout either way
    assert tied.lm_head.weight.std().item() < 0.01  # lm_head's small init: the initial loss stays ~ln(vocab)
    for kind in ("muon", "adamw"):
        params = [p for g in tied.configure_optimizers(kind).param_groups for p in g["params"]]
        assert len(params) == len({id(p) for p in params}) == len(list(tied.parameters()))
    # saved and loaded as the stages do: still one matrix, and the weights survive
    tok = get_tokenizer("bytes")
    CheckpointManager(tmp_path).save(1, {"model": tied.state_dict(), "arch": tied.config.arch_dict(),
                                         "tokenizer": tok.describe()}, {})
    path = tmp_path / "ckpt_000001.pt"
    loaded, _ = build_from_checkpoint(load_checkpoint(path), path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, tied.lm_head.weight)
    assert loaded.half().lm_head.weight is loaded.embed_tokens.weight  # a dtype move keeps the tie


def test_a_checkpoint_from_before_tie_embeddings_loads_untied(tmp_path):
    model = GPT(GPTConfig(depth=1, n_embd=64, vocab_size=320, max_seq_len=32))
    old_arch = {k: v for k, v in model.config.arch_dict().items() if k != "tie_embeddings"}
    path = tmp_path / "ckpt_000001.pt"
    torch.save({"model": model.state_dict(), "arch": old_arch, "tokenizer": get_tokenizer("bytes").describe()}, path)
    loaded, _ = build_from_checkpoint(load_checkpoint(path), path)
    assert not loaded.config.tie_embeddings and loaded.lm_head.weight is not loaded.embed_tokens.weight
    check_arch(old_arch, loaded.config.arch_dict(), path, "")  # a resume compares it with the config: no difference
    with pytest.raises(UserError, match="tie_embeddings=False"):
        check_arch(old_arch, {**loaded.config.arch_dict(), "tie_embeddings": True}, path, "")


def test_training_never_imports_the_hugging_face_libraries():
    """Every module of the repo imported, and hf.py too: transformers, safetensors and tokenizers stay unloaded."""
    names = sorted(p.stem for p in REPO.glob("*.py"))
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
            f"for n in {names!r}: __import__(n)\n"
            "hf = ('transformers', 'safetensors', 'tokenizers', 'huggingface_hub')\n"
            "print(sorted(m for m in hf if m in sys.modules))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"
