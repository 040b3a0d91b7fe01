"""chat_format.py: how a conversation becomes token ids, the one place that knows a chat template.

Every tokenizer owns one format (`tok.chat_format`); training (the loss mask), generation (the prompt and its
stop tokens), chat.py's history trimming and the evaluations all ask it, so a second template is one more class
here, not edits in the loaders, the engine and the faces:

    fmt = tok.chat_format
    ids, mask = fmt.render(messages, max_seq_len=1024)          # training: mask 1 = trained (assistant) tokens
    ids = fmt.render_prompt(messages[:-1], max_seq_len=900)     # generation: ends where the answer starts
    fmt.stop_ids()                                              # what ends an answer
    fmt.user_turns(ids)                                         # exchanges a prompt kept

A format supplies the token pieces (header, user turn, answer); the rules are written once in ChatFormat:
a prompt is always token for token the prefix of the training rendering, the loss is on assistant content and
its end-of-turn token only, and a conversation too long for max_seq_len loses whole exchanges (later ones when
training, the oldest ones when prompting). The plain-text template (no chat tokens, for base checkpoints and
finetune_dolly's prompt_format=alpaca) lives here too: it is the same question, asked of a model that never
saw a chat token.
"""
from configurator import UserError


def split_conversation(messages) -> tuple:
    """(system or None, [(user, assistant), ...], trailing user or None). ValueError if the roles are out of order.

    Readers in conversations.py normalise files into this shape; the check is for conversations built by hand
    (chat.py's history, a test), where a wrong order would silently train on the wrong tokens.
    """
    system, pairs, user = None, [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"conversation message {i} must be a dict with a string 'content', got {m!r:.80}")
        role = m.get("role")
        expected = "user" if user is None else "assistant"
        if role == "system" and i == 0:
            system = m["content"]
        elif role == expected == "user":
            user = m["content"]
        elif role == expected == "assistant":
            pairs.append((user, m["content"]))
            user = None
        else:
            raise ValueError(f"conversation message {i} has role {role!r} where {expected!r} was expected; a "
                             f"conversation is an optional system message, then user/assistant turns alternating")
    return system, pairs, user


class ChatFormat:
    """A chat template over one tokenizer. Subclasses give the pieces (header, prompt_part, answer_part,
    stop_names, user_turns); render() and render_prompt() apply the same rules to any of them."""
    name = ""
    stop_names = ()  # special tokens that end an answer in chat

    def __init__(self, tok):
        self.tok = tok

    # ---- the pieces a template defines ----
    def header(self, system) -> list:
        """What starts every conversation (never trained): bos and the system turn, if any."""
        raise NotImplementedError

    def prompt_part(self, user) -> list:
        """A user turn and whatever opens the assistant's answer (never trained: the prompt supplies it)."""
        raise NotImplementedError

    def answer_part(self, assistant) -> list:
        """An answer and its end-of-turn token (trained: the model must learn to stop)."""
        raise NotImplementedError

    def after_answer(self) -> list:
        """What a template writes after the end-of-turn token, before the next turn (ChatML's newline): part of the
        rendering, never trained (the answer ended at the end-of-turn token)."""
        return []

    def user_turns(self, ids) -> int:
        """How many user turns a rendered sequence holds (user text is encoded as ordinary text, so it can
        never forge the token that starts a turn)."""
        raise NotImplementedError

    def jinja_template(self) -> str:
        """This template as Jinja, for Hugging Face's apply_chat_template (hf.py writes it into tokenizer_config.json):
        token for token the ids of render(), and with add_generation_prompt those of render_prompt(). Plain Jinja
        only: transformers' {% generation %} tags (for assistant masks) stop minijinja (TGI) and llama-cpp-python
        from loading the template at all."""
        raise NotImplementedError(f"chat format {self.name!r} has no Jinja form yet")

    def stop_ids(self, chat=True) -> set:
        """The ids that end an answer: the end of the assistant turn (and a made-up next turn) in chat; in plain
        completion a new document (bos)."""
        if not chat:
            return {self.tok.bos_id}
        return {self.tok.special_id(name) for name in self.stop_names}

    # ---- the rules, the same for every template ----
    def _parts(self, system, pairs, user=None):
        """ids, mask and the end of the header and of each exchange (the turn boundaries we may cut at)."""
        ids = self.header(system)
        mask = [0] * len(ids)
        ends = [len(ids)]  # ends[0]: the header; ends[k]: after exchange k
        tail = self.after_answer()
        for u, a in pairs:
            prompt, answer = self.prompt_part(u), self.answer_part(a)
            ids += prompt + answer + tail
            mask += [0] * len(prompt) + [1] * len(answer) + [0] * len(tail)
            ends.append(len(ids))
        if user is not None:
            prompt = self.prompt_part(user)
            ids += prompt
            mask += [0] * len(prompt)
        return ids, mask, ends

    def render(self, messages, *, max_seq_len=None, max_rounds=-1):
        """(ids, mask) for training, or None when no trained token is left (the caller counts those drops).

        max_rounds keeps the first N user/assistant exchanges (-1 = all; the 8 GB guide uses 6 to 8). With
        max_seq_len, the result has at most max_seq_len + 1 tokens (one window: x = ids[:-1], y = ids[1:]): whole
        later exchanges are dropped, and only when even the first exchange does not fit are its tokens cut
        mid-answer. A trailing user message with no answer is ignored (nothing in it is trained).
        """
        if max_rounds == 0 or max_rounds < -1:
            raise ValueError(f"max_rounds must be -1 (all) or >= 1, got {max_rounds}")
        system, pairs, _ = split_conversation(messages)
        if max_rounds > 0:
            pairs = pairs[:max_rounds]
        if max_seq_len is None:
            ids, mask, _ = self._parts(system, pairs)
        else:
            # exchange by exchange, stopping at the first that overflows: a 20k-character ShareGPT chat at
            # max_seq_len=256 then costs one exchange of encoding, not the whole conversation
            limit = max_seq_len + 1
            ids, mask, ends = self._parts(system, [])
            tail = self.after_answer()
            for u, a in pairs:
                prompt, answer = self.prompt_part(u), self.answer_part(a)
                ids, mask = ids + prompt + answer + tail, mask + [0] * len(prompt) + [1] * len(answer) + [0] * len(tail)
                ends.append(len(ids))
                if len(ids) > limit:
                    break
            if len(ids) > limit:
                fits = [e for e in ends[1:] if e <= limit]
                cut = fits[-1] if fits else limit  # a turn boundary if any exchange fits, else mid-answer
                ids, mask = ids[:cut], mask[:cut]
        if not any(mask):
            return None
        return ids, mask

    def render_prompt(self, messages, *, max_seq_len=None) -> list:
        """The prompt for generating the next assistant turn; the last message must be the user's. Token for token
        the prefix that render() gives once the answer is appended.

        With max_seq_len (the room left for the prompt), the oldest whole exchanges are dropped until it fits
        (the system message stays); if the last user message alone is too long, that is a UserError.
        """
        system, pairs, user = split_conversation(messages)
        if user is None:
            raise ValueError("render_prompt: the last message must be the user's (the one to answer)")
        ids, _, ends = self._parts(system, pairs, user)
        if max_seq_len is not None and len(ids) > max_seq_len:
            header, first_kept = ends[0], None
            for k in range(1, len(ends)):  # drop exchanges 1..k
                if len(ids) - (ends[k] - header) <= max_seq_len:
                    first_kept = ends[k]
                    break
            if first_kept is None:
                raise UserError(f"the prompt is {len(ids) - (ends[-1] - header)} tokens even without earlier turns, "
                                f"more than the {max_seq_len} that fit; shorten the message (or clear the system "
                                f"prompt)")
            ids = ids[:header] + ids[first_kept:]
        return ids

    # ---- plain text: no template (base checkpoints, finetune_dolly's prompt_format=alpaca) ----
    def render_plain(self, prompt: str, response: str, *, max_seq_len=None):
        """(ids, mask): <|bos|> prompt response <|bos|>, loss on the response and the closing bos. A base model saw
        bos between pretraining documents, so predicting it is how it learns to stop. Longer than
        max_seq_len + 1: the response is cut at the end; None when none of it is left."""
        ids = self.render_plain_prompt(prompt)
        answer = self.tok.encode(response) + [self.tok.bos_id]
        mask = [0] * len(ids) + [1] * len(answer)
        ids = ids + answer
        if max_seq_len is not None:
            ids, mask = ids[:max_seq_len + 1], mask[:max_seq_len + 1]
        return (ids, mask) if any(mask) else None

    def render_plain_prompt(self, prompt: str) -> list:
        """The generation prompt for render_plain(): the same prefix."""
        return [self.tok.bos_id] + self.tok.encode(prompt)


class T4ChatFormat(ChatFormat):
    """t4chat's own template (nanochat's special tokens), one layout for training and generation:

        <|bos|> [<|system_start|> system <|system_end|>]
        { <|user_start|> user <|user_end|> <|assistant_start|> assistant <|assistant_end|> } per exchange

    The mask is 1 on assistant content and its <|assistant_end|>, 0 elsewhere: bos, the system turn, user turns
    and every other special token, including <|assistant_start|>, which the prompt supplies at generation time.
    """
    name = "t4chat"
    # end of turn; a new document; a made-up user turn
    stop_names = ("<|assistant_end|>", "<|bos|>", "<|user_start|>")

    def header(self, system):
        ids = [self.tok.bos_id]
        if system is not None:
            sp = self.tok.special_id
            ids += [sp("<|system_start|>")] + self.tok.encode(system) + [sp("<|system_end|>")]
        return ids

    def prompt_part(self, user):
        sp = self.tok.special_id
        return [sp("<|user_start|>")] + self.tok.encode(user) + [sp("<|user_end|>"), sp("<|assistant_start|>")]

    def answer_part(self, assistant):
        return self.tok.encode(assistant) + [self.tok.special_id("<|assistant_end|>")]

    def user_turns(self, ids):
        return list(ids).count(self.tok.special_id("<|user_start|>"))

    def jinja_template(self):
        # <|assistant_start|> opens the assistant's message here, where prompt_part() puts it after the user turn:
        # the same ids, in the layout Hugging Face expects (add_generation_prompt appends the assistant header).
        # bos by variable: GPT-2 names it <|endoftext|>. k counts turns after the system message, so the order
        # split_conversation() demands is enforced here too. One line, no whitespace outside the tags' output.
        return (
            "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
            "{{- bos_token -}}"
            "{%- for message in messages -%}"
            "{%- set k = loop.index0 - offset -%}"
            "{%- if message['role'] == 'system' and loop.first -%}"
            "<|system_start|>{{ message['content'] }}<|system_end|>"
            "{%- elif message['role'] == 'user' and k % 2 == 0 -%}"
            "<|user_start|>{{ message['content'] }}<|user_end|>"
            "{%- elif message['role'] == 'assistant' and k % 2 == 1 -%}"
            "<|assistant_start|>{{ message['content'] }}<|assistant_end|>"
            "{%- else -%}"
            "{{- raise_exception('message ' ~ loop.index0 ~ ' has role ' ~ message['role'] ~ '; a conversation is "
            "an optional system message, then user/assistant turns alternating') -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
        )


class ChatMLFormat(ChatFormat):
    """ChatML, the template of SmolLM2, Qwen and many Hugging Face models:

        [<|im_start|>system\n system <|im_end|>\n]
        { <|im_start|>user\n user <|im_end|>\n <|im_start|>assistant\n assistant <|im_end|>\n } per exchange

    Trained: the assistant's content and its <|im_end|>, as in t4chat's template; the newline after it is the
    template's, not the answer's. No bos: ChatML models start with <|im_start|>. Some models' templates add a
    system message of their own when the conversation has none (SmolLM2: "You are a helpful AI assistant named
    SmolLM, trained by Hugging Face"): default_system, read from the model's template by the tokenizer."""
    name = "chatml"
    stop_names = ("<|im_end|>", "<|bos|>", "<|im_start|>")  # end of turn; a new document; a made-up next turn

    def __init__(self, tok, default_system=None, template=None):
        super().__init__(tok)
        self.default_system, self.template = default_system, template

    def _turn_start(self, role, text):
        return [self.tok.special_id("<|im_start|>")] + self.tok.encode(f"{role}\n{text}")

    def header(self, system):
        system = system if system is not None else self.default_system
        if system is None:
            return []
        return self._turn_start("system", system) + [self.tok.special_id("<|im_end|>")] + self.after_answer()

    def prompt_part(self, user):
        return (self._turn_start("user", user) + [self.tok.special_id("<|im_end|>")] + self.after_answer()
                + self._turn_start("assistant", ""))

    def answer_part(self, assistant):
        return self.tok.encode(assistant) + [self.tok.special_id("<|im_end|>")]

    def after_answer(self):
        return self.tok.encode("\n")

    def user_turns(self, ids):
        ids, start, user = list(ids), self.tok.special_id("<|im_start|>"), self.tok.encode("user\n")
        return sum(1 for i, t in enumerate(ids) if t == start and ids[i + 1:i + 1 + len(user)] == user)

    def jinja_template(self):
        if self.template:  # the model's own: an export gives back the folder it came from
            return self.template
        return ("{%- for message in messages -%}"
                "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
                "{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


class NoChatFormat(ChatFormat):
    """A vocabulary with no chat template we can follow: plain-text prompts work, chat is refused by name."""
    name = "none"

    def __init__(self, tok, why):
        super().__init__(tok)
        self.why = why

    def _refuse(self, *_):
        raise UserError(f"this model has no chat format t4chat can follow: {self.why}. Plain-text completion "
                        f"works; for chat, start from a model with a ChatML or t4chat template")

    header = prompt_part = answer_part = user_turns = _refuse

    def stop_ids(self, chat=True):
        return self._refuse() if chat else super().stop_ids(chat=False)


def render_jinja(template: str, messages, *, add_generation_prompt=False, **special_tokens) -> str:
    """A Hugging Face chat template rendered as transformers renders it (a sandboxed Jinja environment with
    trim_blocks and lstrip_blocks, raise_exception), without importing transformers."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **special_tokens)
