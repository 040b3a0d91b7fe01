"""Hugging Face import (pretrained_checkpoint=hf:<folder>, --checkpoint=hf:<folder>): a small SmolLM2-shaped Llama made
with transformers here (GQA, tied embeddings, a non-default RoPE base, a ChatML tokenizer trained with `tokenizers`,
SmolLM2's chat template) is loaded with matching logits, trained by our SFT stage with its own chat format, resumed
exactly after SIGKILL, exported back and loaded by transformers again. python -m pytest -q tests/test_hf_import.py"""
import json
import signal

import pytest
import torch

from common import UserError
from conftest import (SHARED, assert_same_run, latest_checkpoint, needs_shared, run_script, start_script,
                      wait_for_checkpoint)

pytestmark = pytest.mark.usefixtures("hf_offline")  # no hub: the tests read local folders only

# SmolLM2's template as HuggingFaceTB ships it: a system message of its own when the conversation has none
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CONVERSATION = [{"role": "user", "content": "What is the capital of France? 🙂"},
                {"role": "assistant", "content": "Paris. 你好！"}, {"role": "user", "content": "And of Japan?"}]


def corpus():
    """The built-in tasks' conversations and a little Chinese and emoji: text for a tokenizer, with no ../shared."""
    from tasks import BUILTIN_TASKS, builtin_examples
    texts = [m["content"] for t in BUILTIN_TASKS for conv in builtin_examples(t, 200, 0, "train") for m in conv]
    return texts + ["你好，世界！今天天气很好。我们学习语言模型。", "Emoji: 🙂🚀 ❤️ 🗾 — naïve café ¥120"] * 20


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """A SmolLM2-shaped folder as save_pretrained writes it: byte-level BPE (512 tokens) with the specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    folder = tmp_path_factory.mktemp("smol") / "SmolTiny"
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     additional_special_tokens=SPECIALS[1:])
    hf_tok.chat_template = SMOLLM2_TEMPLATE
    hf_tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=100000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # transformers' 0.02 init answers "\n" forever; larger weights give varied greedy text
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0, 0.25)
    model.save_pretrained(folder)
    return folder


def test_import_matches_transformers_logits_ids_and_chat_template(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from checkpoint import load_model
    model, tok, meta = load_model(f"hf:{smol}")
    hf_tok = AutoTokenizer.from_pretrained(str(smol))
    assert model.config.tie_embeddings and model.config.n_kv_head == 2 and model.config.rope_theta == 100000.0
    assert meta["stage"] == "hf" and tok.chat_format.name == "chatml"
    assert tok.chat_format.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for text in ("Hello world, 你好 🙂", "  two  spaces\n\nnew lines", "naïve café — ¥120"):
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(tok.encode(text)) == text
    # the one difference by design: our encode never parses a special out of text
    assert 1 not in tok.encode("<|im_start|>user") and tok.decode(tok.encode("<|im_start|>")) == "<|im_start|>"
    want = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert tok.chat_format.render_prompt(CONVERSATION) == list(want["input_ids"])
    theirs = AutoModelForCausalLM.from_pretrained(str(smol), dtype=torch.float32).eval()
    x = torch.tensor([tok.chat_format.render_prompt(CONVERSATION)])
    with torch.no_grad():
        assert (model(x) - theirs(x).logits[..., :model.config.vocab_size]).abs().max().item() < 1e-4
    # the loss mask: assistant content and its <|im_end|>; the newline after it and everything else untrained
    ids, mask = tok.chat_format.render(CONVERSATION[:2])
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "Paris. 你好！<|im_end|>" and ids[-1] == tok.encode("\n")[0] and mask[-1] == 0


def test_chat_answers_as_transformers_generates(smol):
    """chat.py --checkpoint=hf:<dir>: the model's own chat format, and greedy output equal to transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(smol))
    theirs = AutoModelForCausalLM.from_pretrained(str(smol), dtype=torch.float32).eval()
    prompt = hf_tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=[0, 1, 2], pad_token_id=2)
    want = out[0, prompt.size(1):].tolist()
    from checkpoint import load_model
    from engine import generate
    model, tok, _ = load_model(f"hf:{smol}")
    got, _ = generate(model, tok, prompt[0].tolist(), max_tokens=12, stop_ids=tok.chat_format.stop_ids())
    assert got == [t for t in want if t not in (0, 1, 2)] and len(set(got)) > 2
    p = run_script("chat.py", f"--checkpoint=hf:{smol}", "-p", CONVERSATION[0]["content"], "--temperature=0",
                   "--max_tokens=12", "--device=cpu")
    assert hf_tok.decode(want, skip_special_tokens=True).strip() in p.stdout


@needs_shared
def test_sft_from_smollm2_shape_trains_resumes_exactly_and_exports_back(smol, tmp_path):
    """10 SFT steps on ShareGPT with max_rounds=6, fp16 autocast + GradScaler and gradient checkpointing on the CPU,
    AdamW at the guide's rate by default; SIGKILL + auto_resume ends bitwise-identical; the export loads in
    transformers with matching logits and the same chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    args = [f"--pretrained_checkpoint=hf:{smol}", f"--mixture={SHARED / 'data' / 'sharegpt_v3_subset.jsonl'}",
            "--max_rounds=6", "--dtype=float16", "--gradient_checkpointing=True", "--max_seq_len=128",
            "--device_batch_size=2", "--target_examples_per_step=4", "--max_steps=10", "--checkpoint_interval=2",
            "--eval_every=-1", "--eval_examples_per_task=0", "--device=cpu", "--compile=False"]
    env = {"NANOCHAT_BASE_DIR": str(tmp_path / "nc")}
    full = run_script("train_sft.py", *args, f"--out_dir={tmp_path / 'full'}", env=env)
    assert "optimizer=adamw" in full.stdout and "max_lr=4e-05" in full.stdout
    proc = start_script("train_sft.py", *args, f"--out_dir={tmp_path / 'killed'}", env=env)
    wait_for_checkpoint(proc, tmp_path / "killed", 4)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run_script("train_sft.py", *args, f"--out_dir={tmp_path / 'killed'}", "--auto_resume=True", env=env)
    assert_same_run(tmp_path / "full", tmp_path / "killed", 10)

    out = tmp_path / "export"
    run_script("export_hf.py", f"--checkpoint={latest_checkpoint(tmp_path / 'full')}", f"--out={out}",
               "--dtype=float32", env=env)
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.chat_template == SMOLLM2_TEMPLATE  # the model's own format, back as it came
    from checkpoint import load_model
    model, tok, _ = load_model(str(latest_checkpoint(tmp_path / "full")))
    ids = tok.chat_format.render_prompt(CONVERSATION)
    assert list(hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]) == ids
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (model(x) - theirs(x).logits).abs().max().item() < 1e-4


def test_what_we_cannot_run_is_refused_by_name(smol, tmp_path):
    import shutil
    from checkpoint import load_model
    bad = tmp_path / "bad"
    shutil.copytree(smol, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(UserError, match="rope_type"):
        load_model(f"hf:{bad}")
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(UserError, match="model_type"):
        load_model(f"hf:{bad}")
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json"):
        load_model(f"hf:{bad}")
    with pytest.raises(UserError, match="hf:"):  # a model folder given without hf: says how to name it
        load_model(str(smol))
    p = run_script("train_sft.py", f"--pretrained_checkpoint=hf:{tmp_path / 'nowhere'}", check=False)
    assert p.returncode != 0 and "not a Hugging Face model folder" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr


def test_imported_weights_keep_adamw_down_the_pipeline_and_muon_is_warned_about(smol, tmp_path):
    """SFT from hf: defaults to AdamW at 4e-5; a later stage started from that run (its tokenizer is the folder's)
    does too; asking for Muon on such weights gets a warning."""
    common = ["--max_steps=1", "--eval_every=-1", "--max_seq_len=64", "--device=cpu", "--compile=False"]
    env = {"NANOCHAT_BASE_DIR": str(tmp_path)}
    sft = run_script("train_sft.py", f"--pretrained_checkpoint=hf:{smol}", "--eval_examples_per_task=0", *common,
                     f"--out_dir={tmp_path / 'sft'}", env=env)
    assert "optimizer=adamw" in sft.stdout and "max_lr=4e-05" in sft.stdout
    mid = run_script("train_mid.py", f"--pretrained_checkpoint={tmp_path / 'sft'}", "--eval_examples_per_task=0",
                     "--total_batch_size=256", "--device_batch_size=4", *common, f"--out_dir={tmp_path / 'mid'}",
                     env=env)
    assert "starting from Hugging Face weights: optimizer=adamw" in mid.stdout
    muon = run_script("train_sft.py", f"--pretrained_checkpoint=hf:{smol}", "--optimizer=muon",
                      "--eval_examples_per_task=0", *common, f"--out_dir={tmp_path / 'muon'}", env=env)
    assert "warning: optimizer=muon on pretrained Hugging Face weights" in muon.stdout
