"""chat.py: talk to any checkpoint, streaming tokens as they are generated.
in:  a checkpoint (default: the newest SFT one; else dolly, mid, base, with a note)      out: text on stdout
One answer:   python chat.py -p "Why is the sky blue?"            (or --prompt="...")
Interactive:  python chat.py --checkpoint=mid --temperature=0.8    (/clear starts over, /quit or Ctrl-D leaves)
Looping answers from a small model? Try --repetition_penalty=1.2 and/or --top_p=0.9.
A base checkpoint gets plain text completion (no chat template); --mode=chat|complete overrides the choice.
The answer goes to stdout; what was loaded and any notes go to stderr, so `-p` output pipes cleanly.
"""
import sys

import torch

import common
from checkpoint import load_model
from common import UserError
from configurator import apply_overrides
from engine import StreamDecoder, build_prompt, check_sampling, consume, generate_stream, pack_linears

# ---- config (module globals; override with --key=value; -h lists them) ---------------------------------------
checkpoint = ""               # a ckpt_*.pt, a run folder, or a stage name (base|mid|sft|dolly); "" = newest sft
prompt = ""                   # answer this one prompt and exit (-p "..." works too); "" = interactive
system_prompt = ""            # a system message at the start of every conversation (chat mode only)
mode = "auto"                 # auto (a base checkpoint completes text, the others chat) | chat | complete
temperature = 0.6             # 0 = greedy (deterministic); higher = more varied
top_k = 50                    # sample among the k most likely tokens; 0 = off
top_p = 1.0                   # sample among the fewest tokens whose probability reaches p; 1.0 = off
repetition_penalty = 1.0      # CTRL-style: logits of tokens already in the conversation /p (or *p if < 0); 1.0 = off
max_tokens = 256              # most tokens per answer (the model's max_seq_len caps it as well)
device = "auto"               # auto | cpu | cuda | cuda:N | mps
dtype = "auto"                # auto (bf16 on sm>=8.0, fp16 on older GPUs, fp32 on CPU) | float32 | float16 | bfloat16
seed = 42                     # sampling seed, so an answer can be reproduced; -1 = a different one each run
# ----------------------------------------------------------------------------------------------------------------

# `checkpoint = ""` tries these in order: a finetuned chat model first, then the earlier stages
DEFAULT_STAGES = ("sft", "dolly", "mid", "base")
_COMMANDS = "/clear starts a new conversation, /quit (or Ctrl-D) leaves"


# -----------------------------------------------------------------------------
# finding and loading the checkpoint


def _say(msg):
    """Notes for the person at the terminal: stderr, so stdout holds only the answer."""
    print(msg, file=sys.stderr, flush=True)


def load_for_chat(spec: str, dev: torch.device):
    """(model in eval mode on dev, tokenizer, checkpoint path, stage or None) through checkpoint.load_model, the
    one loader; a note on stderr when the default fell back past SFT."""
    model, tok, meta = load_model(spec, dev, default_stage=DEFAULT_STAGES, key="checkpoint")
    for note in meta["notes"]:
        _say(note)
    return model, tok, meta["path"], meta["stage"]


def use_chat_template(stage, mode: str) -> bool:
    """True for chat (render the conversation), False for plain completion of the prompt text.
    A base model never saw the chat tokens, so it completes text; a checkpoint without a recorded stage
    (written elsewhere) is taken to be a chat model, which --mode=complete corrects."""
    if mode == "chat":
        return True
    if mode == "complete":
        return False
    return stage != "base"


# -----------------------------------------------------------------------------
# prompts and the conversation


class ChatSession:
    """A conversation with one model: the history, the sampling settings and the prompt rendering.
    chat=False is plain completion: each prompt is bos + its text, and there is no history."""

    def __init__(self, model, tok, *, chat=True, system_prompt="", max_tokens=256, temperature=0.6, top_k=50,
                 top_p=1.0, repetition_penalty=1.0, generator=None, autocast=None):
        self.model, self.tok, self.chat, self.system_prompt = model, tok, chat, system_prompt
        self.sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty)
        check_sampling(**self.sampling)
        self.generator, self.autocast = generator, autocast
        self.stop_ids = tok.chat_format.stop_ids(chat)
        self.history = []            # [{'role': 'user'|'assistant', 'content': str}, ...]
        self.last_prompt_ids = None  # what the model saw last, for tests and curious users
        self.last_dropped = 0        # exchanges the last answer had to leave out to fit max_seq_len

    @property
    def max_seq_len(self):
        return self.model.config.max_seq_len

    def clear(self):
        self.history = []

    def prompt_ids(self, user_text):
        """(ids, how many history messages had to go to fit them into max_seq_len)."""
        if not self.chat:
            # the prefix finetune_dolly's plain template trains on
            ids = self.tok.chat_format.render_plain_prompt(user_text)
            if len(ids) > self.max_seq_len:
                raise UserError(f"the prompt is {len(ids)} tokens, more than the model's max_seq_len="
                                f"{self.max_seq_len}; shorten it")
            return ids, 0
        # keep room for an answer, but never more than half the context: a huge max_tokens must not
        # cost the user the whole conversation
        reserve = min(self.sampling["max_tokens"], self.max_seq_len // 2)
        return build_prompt(self.tok, self.history, user_text, system_prompt=self.system_prompt,
                            max_seq_len=self.max_seq_len, reserve=reserve)

    def respond(self, user_text, write=lambda piece: None):
        """Answer user_text, passing each decoded piece to write() as it is generated.
        Returns (answer text, finish reason: 'stop' | 'length' | 'context'). Raises UserError when the
        message alone does not fit the model's context. A KeyboardInterrupt ends the answer early; what
        was said so far stays in the history, then the interrupt goes on to the caller."""
        ids, dropped = self.prompt_ids(user_text)
        # what no longer fits now never will (the conversation only grows), so it leaves the history
        self.history = self.history[dropped:]
        self.last_prompt_ids, self.last_dropped = ids, dropped // 2
        decoder, pieces = StreamDecoder(self.tok), []

        def emit(t):
            piece = decoder.feed(t)
            if piece:
                pieces.append(piece)
                write(piece)

        stream = generate_stream(self.model, self.tok, ids, stop_ids=self.stop_ids, generator=self.generator,
                                 autocast=self.autocast, **self.sampling)
        try:
            reason = consume(stream, emit)
        finally:
            tail = decoder.flush()
            if tail:
                pieces.append(tail)
                write(tail)
            if self.chat:
                self.history += [{"role": "user", "content": user_text},
                                 {"role": "assistant", "content": "".join(pieces)}]
        return "".join(pieces), reason


def finish_note(reason, session) -> str:
    """One line for the end of an answer, or "" when it ended normally."""
    dropped = (f"[left out the {session.last_dropped} oldest exchange(s) to fit max_seq_len={session.max_seq_len}]"
               if session.last_dropped else "")
    return "\n".join(filter(None, [dropped, _finish_reason_note(reason, session)]))


def _finish_reason_note(reason, session) -> str:
    if reason == "length":
        return f"[stopped at max_tokens={session.sampling['max_tokens']}]"
    if reason == "context":
        return (f"[the context is full: the model holds max_seq_len={session.max_seq_len} tokens"
                + ("; older turns are dropped from now on, /clear starts over]" if session.chat else "]"))
    return ""


# -----------------------------------------------------------------------------
# the two faces: one answer, or a conversation


def _writer(stream):
    def write(piece):
        stream.write(piece)
        stream.flush()  # stream token by token, also when stdout is a pipe
    return write


def answer_once(session, text, out=None):
    out = out or sys.stdout  # looked up now, not at import: tests and callers may have replaced it
    _, reason = session.respond(text, _writer(out))  # a prompt too long for the model is a UserError
    out.write("\n")
    out.flush()
    if finish_note(reason, session):
        _say(finish_note(reason, session))


def interactive(session, read=input, out=None):
    """Read messages until /quit or end of input. `read` is input() by default: line editing at a terminal,
    and it works the same on a pipe (the test drives it that way)."""
    write = _writer(out or sys.stdout)
    label = "User: " if session.chat else "Prompt: "
    while True:
        try:
            line = read(label)
        except EOFError:
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/clear":
            session.clear()
            write("[history cleared]\n")
            continue
        if text in ("/help", "/?"):
            write(f"[{_COMMANDS}]\n")
            continue
        started = []

        def write_answer(piece):
            if not started:  # the label comes with the first piece, so an error is not printed as an answer
                started.append(True)
                write("Assistant: " if session.chat else "")
            write(piece)

        try:
            # completion keeps the line's own spaces ("The capital of France is "); chat trims them
            _, reason = session.respond(text if session.chat else line.rstrip("\r\n"), write_answer)
        except UserError as e:  # a message too long for the model: say so and go on
            write(f"[{e}]\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            write(" [interrupted]\n")
            continue
        write_answer("")  # the label even for an empty answer
        write("\n")
        note = finish_note(reason, session)
        if note:
            write(note + "\n")


# -----------------------------------------------------------------------------
# main


def _short_prompt_flag(argv):
    """`-p "text"` / `-p=text` -> `--prompt=text`; the configurator only knows --key=value."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-p":
            if i + 1 >= len(argv):
                raise UserError('-p needs the prompt after it, e.g. -p "Why is the sky blue?"')
            arg, i = "--prompt=" + argv[i + 1], i + 1
        elif arg.startswith("-p="):
            arg = "--prompt=" + arg[3:]
        out.append(arg)
        i += 1
    return out


def main(argv=None):
    g = globals()
    argv = _short_prompt_flag(sys.argv[1:] if argv is None else list(argv))
    apply_overrides(g, argv)
    if mode not in ("auto", "chat", "complete"):
        raise UserError(f"--mode={mode!r} is not one of auto, chat, complete")
    if any(a == "--prompt" or a.startswith("--prompt=") for a in argv) and not prompt.strip():
        raise UserError("the prompt is empty; give some text, or leave out -p for an interactive session")
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty)
    try:
        check_sampling(**sampling)
    except ValueError as e:
        raise UserError(f"--{e}") from None
    for stream in (sys.stdout, sys.stdin):
        # a console or pipe in a legacy code page must not crash on a character it cannot show or read
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")

    dev = common.resolve_device(device)
    ptdtype, dtype_reason = common.pick_dtype(dev, dtype)
    autocast, _ = common.make_autocast_and_scaler(dev, ptdtype)
    model, tok, path, stage = load_for_chat(checkpoint, dev)
    pack_linears(model, ptdtype)  # the CPU matmuls serve.py uses too, so both give the same greedy answers
    chat = use_chat_template(stage, mode)
    generator = torch.Generator(device=dev)
    if seed >= 0:
        generator.manual_seed(seed)
    else:
        generator.seed()  # fresh entropy: a different answer each run
    how = "chat" if chat else ("plain completion (--mode=complete)" if mode == "complete" else
                               "plain completion: a base model knows no chat template (--mode=chat to try it)")
    _say(f"loaded {path} (stage {stage or 'unknown'}, {model.num_params():,} parameters, max_seq_len "
         f"{model.config.max_seq_len}, tokenizer {tok.name}) on {dev}, {ptdtype} ({dtype_reason}); {how}")
    if system_prompt and not chat:
        _say("note: --system_prompt is ignored in plain completion")
    session = ChatSession(model, tok, chat=chat, system_prompt=system_prompt if chat else "",
                          generator=generator, autocast=autocast, **sampling)
    if prompt:
        answer_once(session, prompt)
        return
    _say(f"[{_COMMANDS}]")
    interactive(session)


if __name__ == "__main__":
    try:
        common.run(main)
    except KeyboardInterrupt:  # Ctrl-C while loading or during a -p answer: no traceback
        print(file=sys.stderr)
        sys.exit(130)
