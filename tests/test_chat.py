"""chat.py: KV-cache streaming, sampling filters, UTF-8 streaming, history, the CLI. python -m pytest -q tests/test_chat.py"""
import io
import os
import subprocess
import sys

import pytest
import torch

import chat
import engine
from checkpoint import STAGE_DIRS, CheckpointManager
from common import UserError
from conftest import REPO
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

TOK = get_tokenizer("bytes")
END = TOK.special_id("<|assistant_end|>")


def tiny_model(max_seq_len=128, seed=0):
    """depth 2, width 64, byte tokenizer. The default init zeroes o_proj/down_proj and makes the logits ~0,
    so every token would be nearly as likely as any other; random weights of a useful size give greedy
    decoding clear winners (a cache-vs-no-cache comparison must not hinge on float noise)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(depth=2, n_embd=64, vocab_size=TOK.vocab_size, max_seq_len=max_seq_len))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, 0.05)
        model.lm_head.weight.normal_(0, 0.3)
        # ids >= 256 are the specials and padding: they score 0 while the best byte scores well above,
        # so answers have text and no stop token comes early
        model.lm_head.weight[256:] = 0
    return model.eval()


def save_checkpoint(model, base_dir, stage="sft", run="tiny"):
    """A checkpoint laid out as the stage scripts write it (see train_base.py's save())."""
    run_dir = base_dir / STAGE_DIRS[stage] / run
    state = {"model": model.state_dict(), "arch": model.config.arch_dict(), "tokenizer": TOK.describe(),
             "stage": stage, "step": 1, "config": {}, "world_size": 1}
    CheckpointManager(run_dir).save(1, state, {"stage": stage, "loss": 1.0})
    return run_dir


def run_chat(*args, stdin=None, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, str(REPO / "chat.py"), *map(str, args)], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=timeout, cwd=REPO)


def greedy_reference(model, ids, n):
    """No cache: the whole sequence through model() every step, argmax over the real vocabulary."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            t = int(logits[:TOK.n_tokens].argmax())
            out.append(t)
            ids.append(t)
    return out


def stream(model, ids, **kw):
    kw = {"max_tokens": 20, "temperature": 0.0, "stop_ids": (), **kw}
    out = []
    reason = engine.consume(engine.generate_stream(model, TOK, ids, **kw), out.append)
    return out, reason


# ---- generation -------------------------------------------------------------------------------------------

def test_stream_with_kv_cache_equals_no_cache_greedy():
    model = tiny_model()
    ids = TOK.chat_format.render_prompt([{"role": "user", "content": "hello there"}])
    out, reason = stream(model, ids, max_tokens=24)
    assert reason == "length"
    assert out == greedy_reference(model, ids, 24)
    assert len(set(out)) > 1  # a real sequence, not one token repeated


def test_stream_stops_at_stop_token_and_at_the_end_of_the_context():
    model = tiny_model(max_seq_len=32)
    ids = [TOK.bos_id] + TOK.encode("x" * 28)  # 29 positions used: room to feed 3 more, so 4 answer tokens
    out, reason = stream(model, ids, max_tokens=50)
    assert reason == "context" and len(out) == 4
    assert out == greedy_reference(model, ids, 3) + out[3:]
    out, reason = stream(model, [TOK.bos_id] + TOK.encode("x" * 31), max_tokens=50)  # a full context: one token
    assert reason == "context" and len(out) == 1
    with pytest.raises(ValueError, match="max_seq_len=32"):
        stream(model, [TOK.bos_id] + TOK.encode("x" * 32))
    with torch.no_grad():
        model.lm_head.weight[END] = model.lm_head.weight[:256].sum(0) * 10  # make <|assistant_end|> win
    assert stream(model, ids, max_tokens=5)[0][0] == END
    out, reason = stream(model, ids, max_tokens=5, stop_ids={END})
    assert out == [] and reason == "stop"  # the stop token ends the answer and is not yielded


def test_repetition_penalty_lowers_the_probability_of_repeated_tokens():
    logits = torch.tensor([[2.0, -1.0, 1.0, 0.5]])
    seen = torch.tensor([True, True, False, False])
    before = logits.softmax(-1)[0]
    after = engine.apply_repetition_penalty(logits, seen, 1.5).softmax(-1)[0]
    assert after[0] < before[0] and after[1] < before[1]   # positive and negative logits both lose
    assert after[2] > before[2] and after[3] > before[3]
    assert torch.equal(engine.apply_repetition_penalty(logits, seen, 1.0), logits)
    # in generation: a strong penalty never picks the same token twice while unseen ones score higher
    model = tiny_model()
    ids = [TOK.bos_id] + TOK.encode("ab")
    plain, _ = stream(model, ids, max_tokens=30)
    penalised, _ = stream(model, ids, max_tokens=30, repetition_penalty=1e4)
    assert len(set(penalised)) > len(set(plain))
    assert not set(penalised[:5]) & set(ids)


def test_repetition_penalty_spares_the_stop_token():
    """Earlier turns end with <|assistant_end|>; penalising it would make every later answer run on."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[END] = model.lm_head.weight[:256].sum(0)
    ids = TOK.chat_format.render_prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                      {"role": "user", "content": "hi"}])
    assert END in ids
    assert stream(model, ids, stop_ids={END})[1] == "stop"  # sanity: it stops without the penalty
    out, reason = stream(model, ids, stop_ids={END}, repetition_penalty=100.0)
    assert reason == "stop" and out == []


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def kept(p):
        return set(torch.isfinite(engine.top_p_filter(logits, p))[0].nonzero().flatten().tolist())

    assert kept(0.4) == {1}              # the top token alone reaches 0.4
    assert kept(0.75) == {1, 3}          # 0.5 + 0.3
    assert kept(0.85) == {1, 3, 2}       # 0.95 >= 0.85; 0.8 was not enough
    assert kept(0.99) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    gen = torch.Generator().manual_seed(0)
    draws = {engine.sample_token(logits, temperature=1.0, top_p=0.75, generator=gen).item() for _ in range(200)}
    assert draws == {1, 3}


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = tiny_model()
    ids = [TOK.bos_id] + TOK.encode("hi")
    kw = dict(max_tokens=16, temperature=1.0, top_k=20, top_p=0.9)
    a, _ = stream(model, ids, generator=torch.Generator().manual_seed(3), **kw)
    b, _ = stream(model, ids, generator=torch.Generator().manual_seed(3), **kw)
    assert a == b
    with pytest.raises(ValueError, match="top_p"):
        stream(model, ids, top_p=0.0)


def test_incremental_decoding_of_a_chinese_string_split_into_single_bytes():
    text = "中国的首都是北京。"
    ids = TOK.encode(text)  # byte tokenizer: every byte its own token, so each character spans 3 tokens
    assert "\ufffd" in TOK.decode(ids[:1])  # what naive per-token decoding would show
    dec = engine.StreamDecoder(TOK)
    pieces = [dec.feed(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) == len(text)  # each character appears as soon as its last byte does


# ---- the conversation ---------------------------------------------------------------------------------------

def test_interactive_session_keeps_the_history_and_clear_resets_it():
    model = tiny_model(max_seq_len=256)
    session = chat.ChatSession(model, TOK, max_tokens=6, temperature=0.0)
    prompts, out = [], io.StringIO()
    respond = session.respond

    def recording_respond(text, write):
        result = respond(text, write)
        prompts.append(session.last_prompt_ids)  # the ids the model was really given
        return result

    session.respond = recording_respond
    lines = iter(["hello", "and then?", "/clear", "fresh start", "/quit", "never read"])
    chat.interactive(session, read=lambda _label: next(lines), out=out)
    assert len(prompts) == 3
    msgs_1 = [{"role": "user", "content": "hello"}]
    assert prompts[0] == TOK.chat_format.render_prompt(msgs_1)
    answer_1 = out.getvalue().split("Assistant: ")[1].split("\n")[0]
    msgs_2 = msgs_1 + [{"role": "assistant", "content": answer_1}, {"role": "user", "content": "and then?"}]
    assert prompts[1] == TOK.chat_format.render_prompt(msgs_2)   # the second prompt carries the first exchange
    assert prompts[1][:len(prompts[0])] == prompts[0]
    assert prompts[2] == TOK.chat_format.render_prompt([{"role": "user", "content": "fresh start"}])  # after /clear
    assert "[history cleared]" in out.getvalue()
    assert [m["content"] for m in session.history][0] == "fresh start"


def test_oldest_exchanges_are_dropped_to_fit_max_seq_len():
    model = tiny_model(max_seq_len=96)
    session = chat.ChatSession(model, TOK, max_tokens=8, temperature=0.0, system_prompt="be brief")
    dropped = []
    for text in ("first message " * 2, "second message " * 2, "third message " * 2):
        _, reason = session.respond(text)
        assert len(session.last_prompt_ids) + 8 <= 96
        dropped.append(session.last_dropped)
    users = [m["content"] for m in session.history if m["role"] == "user"]
    assert users[-1] == "third message " * 2 and "first message " * 2 not in users
    assert session.last_prompt_ids[1] == TOK.special_id("<|system_start|>")  # the system prompt stays
    assert dropped == [0, 1, 1]  # each new exchange pushes the oldest one out
    assert "left out the 1 oldest exchange" in chat.finish_note(reason, session)
    with pytest.raises(UserError, match="96"):  # the new message alone does not fit: one clear error
        session.respond("x" * 200)
    assert session.history[-2]["content"] == "third message " * 2  # and the conversation is intact


def test_a_base_checkpoint_gets_plain_completion(base_dir, capsys):
    save_checkpoint(tiny_model(), base_dir, stage="base")
    model, tok, path, stage = chat.load_for_chat("", torch.device("cpu"))  # no sft/dolly/mid: falls back
    assert stage == "base" and path.parent.parent.name == STAGE_DIRS["base"]
    assert "no SFT checkpoint" in capsys.readouterr().err
    assert not chat.use_chat_template(stage, "auto") and chat.use_chat_template(stage, "chat")
    session = chat.ChatSession(model, tok, chat=chat.use_chat_template(stage, "auto"), max_tokens=4, temperature=0)
    session.respond("Once upon")
    assert session.last_prompt_ids == [TOK.bos_id] + TOK.encode("Once upon")
    assert session.history == [] and session.stop_ids == {TOK.bos_id}


def test_no_checkpoint_and_an_unreadable_one_are_clear_errors(base_dir, tmp_path):
    with pytest.raises(UserError) as e:
        chat.load_for_chat("", torch.device("cpu"))
    assert str(base_dir / STAGE_DIRS["sft"]) in str(e.value) and str(base_dir / STAGE_DIRS["base"]) in str(e.value)
    bad = tmp_path / "ckpt_000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=str(bad)):
        chat.load_for_chat(str(bad), torch.device("cpu"))
    torch.save({"model": {}}, bad)  # a torch file without our entries
    with pytest.raises(UserError, match=str(bad)):
        chat.load_for_chat(str(bad), torch.device("cpu"))


# ---- the command line ----------------------------------------------------------------------------------------

def test_cli_one_prompt_streams_an_answer(base_dir):
    run_dir = save_checkpoint(tiny_model(), base_dir)
    p = run_chat("-p", "hi", f"--checkpoint={run_dir}", "--max_tokens=8", "--temperature=0")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() and str(run_dir) in p.stderr and "max_tokens=8" in p.stderr
    session = chat.ChatSession(tiny_model(), TOK, max_tokens=8, temperature=0)
    assert p.stdout == session.respond("hi")[0] + "\n"  # the same answer as in-process


def test_cli_interactive_through_stdin(base_dir):
    save_checkpoint(tiny_model(), base_dir)  # found as the newest sft checkpoint, no --checkpoint needed
    p = run_chat("--max_tokens=6", "--temperature=0", stdin="hello\nand then?\n/clear\nagain\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Assistant: ") == 3 and "[history cleared]" in p.stdout
    session = chat.ChatSession(tiny_model(), TOK, max_tokens=6, temperature=0)
    answers = [session.respond(t)[0] for t in ("hello", "and then?")]
    session.clear()
    answers.append(session.respond("again")[0])
    for a in answers:
        assert f"Assistant: {a}\n" in p.stdout  # the second answer was generated with the first exchange


def test_cli_missing_checkpoint_exits_2_naming_the_path(base_dir, tmp_path):
    missing = tmp_path / "no_such_run"
    p = run_chat("-p", "hi", f"--checkpoint={missing}")
    assert p.returncode == 2 and str(missing) in p.stderr and "--checkpoint" in p.stderr
    assert "Traceback" not in p.stderr
