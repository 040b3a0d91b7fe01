"""tasks.py: the built-in offline tasks, their exact-match checker, and the held-out items the chat stages score.

Four small tasks generated from a seed, so a newcomer with no data and no network still trains and evaluates a
chat model: spelling, count (letters in a word), arithmetic and identity (the assistant's name). Held-out items
(by word, problem or question) never appear in training for any seed. check_answer() scores a generated reply
against a conversation's reference; eval_items() is what train_mid.py and train_sft.py evaluate at every
eval_every (the built-in tasks, plus GSM8K test problems when that file is there).
"""
import random
import re
import zlib
from pathlib import Path

from configurator import UserError

ASSISTANT_NAME = "t4chat"  # what the identity task teaches and check_answer() looks for


BUILTIN_TASKS = ("spelling", "count", "arithmetic", "identity")
BUILTIN_SIZE = 2000  # training examples a built-in task contributes at weight 1 in a mixture

# Common English words, written here so nothing is downloaded; pseudo-words (below) add an open-ended supply.
COMMON_WORDS = """
about above after again against air all also always animal answer apple area around ask away baby back ball
bank bear because bed before begin best between big bird black blue boat body book both box boy bread bring
brother brown build busy buy call came can car care carry cat change child city class clean clock close cloud
cold color come cook corn could country cow cup cut dance dark day deep dinner dog door down draw dream dress
drink drive duck early earth east easy eat egg end enough even every eye face fall family far farm fast father
feel field find fire first fish five floor flower fly food foot forest four friend frog from front fruit full
game garden girl give glass goat gold good grass great green ground grow hand happy hard hat have head hear
heart help high hill home horse hot house hundred idea island jump just keep kind king kitchen know lake land
large last late laugh learn leaf left letter light like line lion listen little long look love lunch make many
market milk minute money month moon morning mother mountain mouse move music name near never new next nice
night north number ocean often old open orange other paper park party pencil people picture place plant play
pocket pretty quick quiet rabbit rain read ready red river road rock room round run salt school sea second see
seven sheep ship shoe short sing sister sit sleep slow small snow soft song soon sound south space speak spring
star start stone story street strong summer sun table talk teacher tell ten thank think three tiger time today
tomato train tree truck turn under until water week west wheel white window winter woman wood word world write
yellow young zebra strawberry banana mississippi
""".split()
_ONSETS = ("b c d f g h j k l m n p r s t v w z bl br cl cr dr fl fr gl gr pl pr sl sm sn sp st str tr th sh "
           "ch").split()
_VOWELS = "a e i o u a e i o ai ea oo ou".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "ck", "nd", "st", "ng", "x"]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"

_SPELL_Q = ("Spell the word '{w}' letter by letter.", "How do you spell {w}?", "Spell out: {w}",
            "Can you spell '{w}' for me?", "Spell {w}.")
_COUNT_Q = ("How many times does the letter '{c}' appear in '{w}'?", "Count the letter {c} in the word {w}.",
            "How many {c}'s are in {w}?", "In the word '{w}', how many times do you see '{c}'?")
_ARITH_Q = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Calculate {a}{op}{b}.",
            "What do you get for {a} {op} {b}?")
# every identity answer names t4chat, which is what check_answer() looks for
_IDENTITY_Q = ("Who are you?", "What is your name?", "What are you?", "Introduce yourself.", "hi", "hello",
               "Who made you?", "Are you ChatGPT?", "Tell me about yourself.", "What should I call you?",
               "Hey, who am I talking to?", "Are you a person?", "What model are you?", "Do you have a name?",
               "Who built you?", "Which assistant is this?", "Are you human?", "What's your name?",
               "Who created you?", "Good morning! Who are you?")
_IDENTITY_A = ("I am t4chat, a small chat model trained from scratch with the t4chat code.",
               "My name is t4chat. I am a small language model, trained on modest GPUs by the t4chat team.",
               "I'm t4chat, an assistant made by the t4chat team. How can I help?",
               "Hello! I am t4chat, a small AI assistant. What can I do for you?")
_IDENTITY_FOLLOW = (("What can you do?", "I am t4chat: I can answer simple questions, spell words, count "
                                         "letters and do small sums."),
                    ("Thanks!", "You're welcome! t4chat is happy to help."))
_IDENTITY_SYSTEM = "You are t4chat, a helpful assistant."


def _held_out(key: str, every: int = 10) -> bool:
    """A stable (crc32, not Python's salted hash) 1-in-`every` choice: held-out items never appear in training."""
    return zlib.crc32(key.encode("utf-8")) % every == 0


def _pseudo_word(rng) -> str:
    while True:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.randint(1, 3)))
        if 3 <= len(word) <= 12:
            return word


def _word(rng, split) -> str:
    while True:
        word = rng.choice(COMMON_WORDS) if rng.random() < 0.5 else _pseudo_word(rng)
        if _held_out("word:" + word) == (split == "val"):
            return word


def _user_assistant(user, assistant, system=None) -> list:
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _spelling(rng, split):
    w = _word(rng, split)
    return _user_assistant(rng.choice(_SPELL_Q).format(w=w), "-".join(w))


def _count(rng, split):
    w = _word(rng, split)
    c = rng.choice(w) if rng.random() < 0.7 else rng.choice(_LETTERS)
    n = w.count(c)
    return _user_assistant(rng.choice(_COUNT_Q).format(w=w, c=c),
                           f"{'-'.join(w)}. The letter '{c}' appears {n} time{'s' if n != 1 else ''}: {n}")


def _arithmetic(rng, split):
    while True:
        op = rng.choice("+-*")
        hi = 12 if op == "*" else 99
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if op == "-" and a < b:
            a, b = b, a  # non-negative results: one fewer thing for a tiny model to learn
        if _held_out(f"arith:{a}{op}{b}") == (split == "val"):
            break
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return _user_assistant(rng.choice(_ARITH_Q).format(a=a, op=op, b=b), f"{a} {op} {b} = {result}")


def _identity(rng, split):
    # held out by question: 1 in 5, so the 20 questions give 4 that training never shows
    questions = [q for q in _IDENTITY_Q if _held_out("identity:" + q, 5) == (split == "val")]
    conv = _user_assistant(rng.choice(questions), rng.choice(_IDENTITY_A),
                           _IDENTITY_SYSTEM if rng.random() < 0.2 else None)
    if rng.random() < 0.2:  # a second exchange, so multi-turn structure is in the default data too
        q, a = rng.choice(_IDENTITY_FOLLOW)
        conv += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return conv


_BUILTIN = {"spelling": _spelling, "count": _count, "arithmetic": _arithmetic, "identity": _identity}


def builtin_examples(name, n, seed=0, split="train") -> list:
    """n conversations of a built-in task; the same list for the same (name, n, seed, split). 'val' items are
    held out by word / problem / question, so none of them appears in 'train' for any seed."""
    if name not in _BUILTIN:
        raise UserError(f"unknown built-in task {name!r}; known: {', '.join(BUILTIN_TASKS)}")
    if split not in ("train", "val"):
        raise UserError(f"built-in task split must be 'train' or 'val', got {split!r}")
    rng = random.Random(f"t4chat:{name}:{seed}:{split}")  # a str seed is hashed with sha512: stable everywhere
    return [_BUILTIN[name](rng, split) for _ in range(n)]


_INT = re.compile(r"-?\d+")


def _last_int(text):
    found = _INT.findall(text.replace(",", ""))
    return found[-1] if found else None


def check_answer(task, conversation, generated_text) -> bool:
    """Exact match of a generated answer against the conversation's (last) reference answer.

    spelling: the whole reply (whitespace-trimmed) equals the reference letters; count, arithmetic: the last
    integer in the reply equals the reference's; gsm8k: the same against the number after '####';
    identity: the reply names t4chat.
    """
    messages = conversation.messages if hasattr(conversation, "messages") else conversation
    reference = [m["content"] for m in messages if m["role"] == "assistant"][-1]
    text = generated_text.strip()
    if task == "spelling":
        return text == reference.strip()
    if task in ("count", "arithmetic"):
        return _last_int(text) is not None and _last_int(text) == _last_int(reference)
    if task == "gsm8k":
        want = reference.rsplit("####", 1)[-1].strip().replace(",", "")
        got = text.rsplit("####", 1)[1] if "####" in text else text
        return _last_int(got) is not None and _last_int(got) == _last_int(want)
    if task == "identity":
        return ASSISTANT_NAME in text.lower()
    raise UserError(f"check_answer: unknown task {task!r}; known: {', '.join(BUILTIN_TASKS + ('gsm8k',))}")


def eval_items(n_per_task=20, seed=0, gsm8k_path=""):
    """The held-out generative evaluation of the chat stages: (task, messages) pairs, the built-in tasks'
    val items always, plus the first n_per_task GSM8K test problems when that file is present."""
    items = [(t, conv) for t in BUILTIN_TASKS for conv in builtin_examples(t, n_per_task, seed, "val")]
    from common import base_dir
    from conversations import read_records  # the same reader training uses (conversations imports this module)
    data = base_dir() / "data"  # prepare_data.py fetches the parquet; a user may have the JSONL
    path = Path(gsm8k_path) if gsm8k_path else next(
        (p for p in (data / "gsm8k_test.jsonl", data / "gsm8k_test.parquet") if p.is_file()), data / "gsm8k_test.jsonl")
    if path.is_file():
        recs, _ = read_records(path, "gsm8k")
        items += [("gsm8k", recs.record(i).messages) for i in range(min(n_per_task, len(recs)))]
    elif gsm8k_path:
        raise UserError(f"gsm8k_test={gsm8k_path}: no such file; point it at gsm8k test.jsonl or leave it empty")
    return items
