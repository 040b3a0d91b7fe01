"""Readers, bad-row accounting, built-in tasks, the seeded mixture. Run: python -m pytest -q tests/test_conversations.py"""
import json
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import conversations as cv
from configurator import UserError
from conftest import SHARED, needs_shared
from conversations import Mixture, parse_mixture, plain_prompt, read_conversations, read_records
from tasks import BUILTIN_TASKS, builtin_examples, check_answer


def msg(role, content):
    return {"role": role, "content": content}


def write_jsonl(path, rows):
    """rows: dicts (dumped) or raw strings (written as they are, for broken lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def only(path, fmt="auto"):
    convs, report = read_conversations(path, fmt)
    assert report.bad == 0, report.summary()
    return convs


# ---- every format maps to messages ----

def test_chat_format(tmp_path):
    rows = [{"messages": [msg("system", "sys"), msg("user", "u1"), msg("assistant", "a1"), msg("user", "u2"),
                          msg("assistant", "a2")], "source": "x"},
            {"messages": [msg("system", ""), msg("user", "q"), msg("assistant", "a")]}]  # empty system: dropped
    convs = only(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert convs == [rows[0]["messages"], [msg("user", "q"), msg("assistant", "a")]]
    records, report = read_records(tmp_path / "chat.jsonl")
    assert report.fmt == "chat" and records[1].meta == {"source": "chat.jsonl", "line": 2}


def test_sharegpt_format(tmp_path):
    rows = [{"id": "a", "conversations": [{"from": "human", "value": "h1"}, {"from": "gpt", "value": "g1"},
                                          {"from": "human", "value": "h2"}, {"from": "gpt", "value": "g2"}]},
            {"id": "b", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                                          {"from": "gpt", "value": "g"}, {"from": "human", "value": "unanswered"}]},
            {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}], "system": "top"}]
    convs = only(write_jsonl(tmp_path / "sg.jsonl", rows))
    assert convs[0] == [msg("user", "h1"), msg("assistant", "g1"), msg("user", "h2"), msg("assistant", "g2")]
    assert convs[1] == [msg("system", "s"), msg("user", "h"), msg("assistant", "g")]  # trailing question dropped
    assert convs[2] == [msg("system", "top"), msg("user", "h"), msg("assistant", "g")]


def test_alpaca_format(tmp_path):
    rows = [{"instruction": "Translate.", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."},
            {"instruction": "And now?", "output": "still", "system": "S", "history": [["first", "reply"]]}]
    convs = only(write_jsonl(tmp_path / "alpaca.jsonl", rows))
    assert convs[0] == [msg("user", "Translate.\n\nbonjour"), msg("assistant", "hello")]
    assert convs[1] == [msg("user", "Say hi."), msg("assistant", "hi")]
    assert convs[2][1]["content"] == "I am t4chat, made by the t4chat team."
    assert convs[3] == [msg("system", "S"), msg("user", "first"), msg("assistant", "reply"), msg("user", "And now?"),
                        msg("assistant", "still")]


def test_dolly_format_keeps_category(tmp_path):
    rows = [{"instruction": "When?", "context": "In 2000 it began.", "response": "2000", "category": "closed_qa"},
            {"instruction": "Ideas?", "context": "", "response": "Many.", "category": "brainstorming"}]
    records, report = read_records(write_jsonl(tmp_path / "dolly.jsonl", rows))
    assert report.fmt == "dolly" and len(records) == 2
    assert records[0].messages == [msg("user", "When?\n\nIn 2000 it began."), msg("assistant", "2000")]
    assert records[1].messages == [msg("user", "Ideas?"), msg("assistant", "Many.")]
    assert records[0].meta["category"] == "closed_qa" and records[1].meta["category"] == "brainstorming"
    assert records.strata == ["closed_qa", "brainstorming"]
    prompt, response = plain_prompt(records[0])
    assert "### Instruction:\nWhen?" in prompt and "### Input:\nIn 2000 it began." in prompt
    assert prompt.endswith("### Response:\n") and response == "2000"
    assert "### Input" not in plain_prompt(records[1])[0]


def test_gsm8k_format_removes_calculator_annotations(tmp_path):
    rows = [{"question": "3 boxes of 4?", "answer": "3 * 4 = <<3*4=12>>12 apples.\nPlus 30 = <<12+30=42>>42\n#### 42"}]
    records, _ = read_records(write_jsonl(tmp_path / "gsm8k.jsonl", rows))
    assert records[0].messages == [msg("user", "3 boxes of 4?"),
                                   msg("assistant", "3 * 4 = 12 apples.\nPlus 30 = 42\n#### 42")]
    assert records[0].meta["final"] == "42"


def test_prompt_response_parquet_and_chat_parquet(tmp_path):
    pq.write_table(pa.table({"prompt": ["p1", "p2", None], "response": ["r1", "r2", "r3"]}), tmp_path / "pr.parquet",
                   row_group_size=2)
    # 1 bad row of 3 is more than 10 %: an error naming the file and the row
    with pytest.raises(UserError, match=r"pr\.parquet.*first bad row: 3"):
        read_records(tmp_path / "pr.parquet")
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(20)], "response": [f"r{i}" for i in range(20)],
                             "extra": list(range(20))}), tmp_path / "pr.parquet", row_group_size=8)
    records, report = read_records(tmp_path / "pr.parquet")
    assert report.fmt == "prompt_response" and len(records) == 20
    assert records[13].messages == [msg("user", "p13"), msg("assistant", "r13")]
    assert records[13].meta == {"source": "pr.parquet", "line": 14}
    chat = [[msg("user", "q"), msg("assistant", "a")], [msg("system", "s"), msg("user", "q2"), msg("assistant", "a2")]]
    pq.write_table(pa.table({"messages": chat}), tmp_path / "chat.parquet")
    assert only(tmp_path / "chat.parquet") == chat


def test_json_array_file(tmp_path):
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(12)] + [{"instruction": "x"}]
    (tmp_path / "demo.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    records, report = read_records(tmp_path / "demo.json")
    assert report.fmt == "alpaca" and report.unit == "item" and len(records) == 12
    assert report.bad == 1 and report.first_bad_line == 13 and report.reasons == Counter({"missing field 'output'": 1})


def test_explicit_format_and_unknown_format(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    assert read_records(p, fmt="gsm8k")[1].fmt == "gsm8k"
    with pytest.raises(UserError, match="unknown conversation format"):
        read_records(p, fmt="csv")
    # forcing the wrong format makes every row bad: an error, not an empty dataset
    with pytest.raises(UserError, match="no usable conversation"):
        read_records(p, fmt="dolly")
    q = write_jsonl(tmp_path / "y.jsonl", [{"text": "just text"}])
    with pytest.raises(UserError, match=r"y\.jsonl.*cannot tell the format from the fields \['text'\]"):
        read_records(q)
    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")


# ---- bad rows ----

GOOD = {"instruction": "i", "context": "", "response": "r", "category": "open_qa"}


def test_bad_rows_are_counted_with_the_first_bad_line(tmp_path):
    rows = [GOOD] * 40
    rows[6] = '{"instruction": "broken'                                  # line 7: bad JSON
    rows[10] = {"instruction": "i", "context": ""}                       # missing response
    rows[20] = {"instruction": "i", "response": "   "}                   # empty assistant turn
    rows[30] = {"instruction": "i", "response": 42}                      # wrong type
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n\n")                                                  # blank lines are not rows
    records, report = read_records(path)
    assert (report.total, report.bad, len(records), report.first_bad_line) == (40, 4, 36, 7)
    assert report.reasons == Counter({"bad JSON": 1, "missing field 'response'": 1, "empty assistant turn": 1,
                                      "field 'response' is int, not a string": 1})
    assert "d.jsonl" in report.summary() and "line 7" in report.summary()
    assert records[6].meta["line"] == 8  # line numbers of the good rows stay those of the file


def test_non_utf8_line_and_bom(tmp_path):
    path = tmp_path / "enc.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + (good + b"\n") * 10 + b'{"instruction": "\xff"}\n')
    records, report = read_records(path)
    assert len(records) == 11 and report.reasons == Counter({"not UTF-8": 1}) and report.first_bad_line == 12
    assert records[0].messages[1]["content"] == "r"


def test_sharegpt_bad_turns(tmp_path):
    ok = {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}
    rows = [ok] * 40 + [
        {"conversations": [{"from": "gpt", "value": "g"}, {"from": "human", "value": "h"}]},
        {"conversations": [{"from": "human", "value": "h"}, {"from": "tool", "value": "t"}]},
        {"conversations": [{"from": "human", "value": "h"}]},
        {"conversations": "not a list"}]
    _, report = read_records(write_jsonl(tmp_path / "sg.jsonl", rows))
    assert report.bad == 4 and report.first_bad_line == 41
    assert report.reasons == Counter({"roles do not alternate user/assistant": 1, "unknown role 'tool'": 1,
                                      "no assistant turn": 1, "field 'conversations' is not a list": 1})


def test_more_than_ten_percent_bad_is_an_error(tmp_path):
    rows = [GOOD] * 9 + ['{"instruction": "i"}']                        # exactly 10 %: allowed
    assert read_records(write_jsonl(tmp_path / "ten.jsonl", rows))[1].bad == 1
    rows = [GOOD] * 9 + ["not json", {"instruction": "i", "category": "x"}]  # 2 of 11
    with pytest.raises(UserError, match=r"eleven\.jsonl: 2 of 11 rows are bad \(18% > 10%\).*first bad line: 10"):
        read_records(write_jsonl(tmp_path / "eleven.jsonl", rows))


def test_empty_and_all_bad_files_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty\.jsonl: no usable conversation.*the file is empty"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n \n", encoding="utf-8")
    with pytest.raises(UserError, match="no usable conversation"):
        read_records(tmp_path / "blank.jsonl")
    write_jsonl(tmp_path / "junk.jsonl", ["", "{not json", "[1, 2]"])
    with pytest.raises(UserError, match=r"junk\.jsonl.*first bad line: 2"):
        read_records(tmp_path / "junk.jsonl")
    write_jsonl(tmp_path / "late.jsonl", [{"instruction": "i"}] * 3 + [GOOD])  # detected from line 4
    with pytest.raises(UserError, match=r"late\.jsonl: 3 of 4 rows are bad.*first bad line: 1"):
        read_records(tmp_path / "late.jsonl")


def test_records_are_read_lazily_and_index_like_a_list(tmp_path):
    rows = [dict(GOOD, response=f"r{k}") for k in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    records, _ = read_records(path)
    assert [r.messages[1]["content"] for r in records] == [f"r{k}" for k in range(30)]
    assert records[-1].messages[1]["content"] == "r29" and len(records[2:5]) == 3
    with pytest.raises(IndexError):
        records[30]
    # an index over a file that changed under it fails loudly instead of serving the wrong row
    path.write_text("x" * path.stat().st_size, encoding="utf-8")
    with pytest.raises(UserError, match="changed"):
        records[3]


# ---- the real files in ../shared/data ----

@needs_shared
def test_real_dolly_head():
    records, report = read_records(SHARED / "data" / "dolly15k_head.jsonl")
    assert (report.fmt, report.total, report.bad) == ("dolly", 1653, 0)
    # the category table of ../shared/data/README.md
    assert Counter(records.strata) == {"open_qa": 398, "general_qa": 274, "classification": 238, "closed_qa": 193,
                                       "brainstorming": 182, "information_extraction": 161, "summarization": 129,
                                       "creative_writing": 78}
    first = records[0]
    assert first.messages[0]["content"].startswith("When did Virgin Australia start operating?\n\nVirgin Australia,")
    assert first.messages[1]["content"].startswith("Virgin Australia commenced services on 31 August 2000")
    assert first.meta["category"] == "closed_qa"


@needs_shared
def test_real_sharegpt_multi_turn():
    records, report = read_records(SHARED / "data" / "sharegpt_v3_subset.jsonl")
    assert (report.fmt, report.total, report.bad) == ("sharegpt", 3366, 0)
    turns = Counter(sum(m["role"] == "user" for m in records[i].messages) for i in range(0, 3366, 7))
    assert max(turns) >= 5 and sum(n for k, n in turns.items() if k >= 2) > 100  # really multi-turn
    for i in range(0, 3366, 97):
        roles = [m["role"] for m in records[i].messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)


@needs_shared
def test_real_alpaca_demos_and_identity():
    records, report = read_records(SHARED / "data" / "llamafactory_alpaca_en_demo.jsonl")
    assert (report.fmt, len(records)) == ("alpaca", 999)
    assert records[0].messages == [msg("user", "Describe a process of making crepes."),
                                   msg("assistant", records[0].messages[1]["content"])]
    assert records[0].messages[1]["content"].startswith("Making crepes is an easy and delicious process!")
    zh, report = read_records(SHARED / "data" / "zh" / "alpaca_zh_demo.jsonl")
    assert (report.fmt, len(zh)) == ("alpaca", 1000)
    assert zh[0].messages[0]["content"] == "识别并解释给定列表中的两个科学理论：细胞理论和日心说。"
    assert zh[0].messages[1]["content"].startswith("细胞理论是生物科学的一个理论")
    ident, _ = read_records(SHARED / "data" / "llamafactory_identity.jsonl")
    assert all("{{" not in m["content"] for r in ident for m in r.messages)
    assert "t4chat" in ident[2].messages[1]["content"]


@needs_shared
def test_real_gsm8k():
    records, report = read_records(SHARED / "data" / "eval" / "gsm8k_test.jsonl")
    assert (report.fmt, len(records)) == ("gsm8k", 1319)
    answers = [r.messages[1]["content"] for r in records]
    assert not any("<<" in a or ">>" in a for a in answers)
    assert all(re.search(r"\n#### -?[\d,.]+$", a) for a in answers)
    assert answers[0] == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the "
                          "farmer’s market.\n#### 18")
    assert records[0].meta["final"] == "18" and check_answer("gsm8k", records[0], "so she makes #### 18")


@needs_shared
def test_real_zh_prompt_response_parquet():
    records, report = read_records(SHARED / "data" / "zh" / "prompt_response_zh.parquet")
    assert (report.fmt, report.total, report.bad) == ("prompt_response", 6992, 0)
    assert records[0].messages[0]["content"] == "识别并解释给定列表中的两个科学理论：细胞理论和日心说。"
    table = pq.read_table(SHARED / "data" / "zh" / "prompt_response_zh.parquet")
    for i in (0, 991, 992, 5000, 6991):
        assert records[i].messages == [msg("user", table["prompt"][i].as_py()),
                                       msg("assistant", table["response"][i].as_py())]


# ---- built-in tasks ----

def test_builtin_tasks_are_deterministic_for_a_seed():
    for task in BUILTIN_TASKS:
        a = builtin_examples(task, 50, seed=3, split="train")
        assert a == builtin_examples(task, 50, seed=3, split="train")
        assert a != builtin_examples(task, 50, seed=4, split="train")
        assert builtin_examples(task, 20, seed=3, split="train") == a[:20]
        assert a != builtin_examples(task, 50, seed=3, split="val")
    with pytest.raises(UserError, match="unknown built-in task"):
        builtin_examples("poetry", 3)


def _key(task, conv):
    """What holds an item out: the word, the problem, the identity question."""
    user = conv[-2]["content"] if task != "identity" else [m for m in conv if m["role"] == "user"][0]["content"]
    if task == "spelling":
        return conv[-1]["content"].replace("-", "")
    if task == "count":
        return conv[-1]["content"].split(".")[0].replace("-", "")
    if task == "arithmetic":
        return conv[-1]["content"].split(" = ")[0]
    return user


def test_builtin_val_items_never_appear_in_training():
    for task in BUILTIN_TASKS:
        train = {_key(task, c) for seed in (0, 1) for c in builtin_examples(task, 400, seed, "train")}
        val = {_key(task, c) for c in builtin_examples(task, 100, 0, "val")}
        assert val and not train & val, task


def test_builtin_answers_are_right_and_the_checker_is_exact():
    for conv in builtin_examples("count", 200, 0, "train"):
        q, a = conv[-2]["content"], conv[-1]["content"]
        word = a.split(".")[0].replace("-", "")
        letter = re.search(r"letter '(.)'", a).group(1)
        assert word in q and letter in q and a.endswith(f": {word.count(letter)}")
        assert check_answer("count", conv, a) and check_answer("count", conv, f"It is {word.count(letter)}")
        assert not check_answer("count", conv, f"{word.count(letter) + 1}")
    for conv in builtin_examples("arithmetic", 200, 0, "train"):
        a = conv[-1]["content"]
        left, result = a.split(" = ")
        assert eval(left) == int(result) >= 0  # noqa: S307 - our own "12 * 3" strings
        assert check_answer("arithmetic", conv, a) and not check_answer("arithmetic", conv, f"{left} = {int(result) + 1}")
        assert not check_answer("arithmetic", conv, "no idea")
    for conv in builtin_examples("spelling", 100, 0, "val"):
        a = conv[-1]["content"]
        assert conv[-1]["content"].replace("-", "") in conv[-2]["content"]
        assert check_answer("spelling", conv, f"  {a}\n") and not check_answer("spelling", conv, a + "-x")
        assert not check_answer("spelling", conv, a.replace("-", ""))
    for conv in builtin_examples("identity", 50, 0, "val"):
        assert check_answer("identity", conv, conv[-1]["content"])
        assert not check_answer("identity", conv, "I am ChatGPT.")
    # multi-turn and system messages occur in the identity task, so the default data exercises them
    convs = builtin_examples("identity", 200, 0, "train")
    assert any(c[0]["role"] == "system" for c in convs) and any(len(c) >= 4 for c in convs)


# ---- mixture ----

def test_parse_mixture(tmp_path, monkeypatch):
    base = tmp_path / "base"
    (base / "data").mkdir(parents=True)
    write_jsonl(base / "data" / "d.jsonl", [GOOD])
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "local.jsonl", [GOOD])
    write_jsonl(tmp_path / "d.jsonl", [GOOD])  # shadowed: base/data wins
    srcs = parse_mixture("d.jsonl:2:3, local.jsonl:0.5, spelling, builtin:1:2", base_dir=base)
    assert [(s.name, s.weight, s.epochs) for s in srcs] == [
        ("d.jsonl", 2.0, 3), ("local.jsonl", 0.5, 1), ("spelling", 1.0, 1)] + [(t, 1.0, 2) for t in BUILTIN_TASKS]
    assert srcs[0].path == base / "data" / "d.jsonl" and srcs[1].path == tmp_path / "local.jsonl"
    assert parse_mixture(str(tmp_path / "local.jsonl") + ":3", base_dir=base)[0].weight == 3.0
    assert [s.task for s in parse_mixture("", base_dir=base)] == list(BUILTIN_TASKS)  # the embedded default
    with pytest.raises(UserError, match=r"no file at .*base/data/nope\.jsonl and .*nope\.jsonl"):
        parse_mixture("spelling,nope.jsonl", base_dir=base)
    for bad in ("d.jsonl:0", "d.jsonl:-1", "d.jsonl:1:0", "d.jsonl:1:1.5", "d.jsonl:nan"):
        with pytest.raises(UserError):
            parse_mixture(bad, base_dir=base)
    assert cv._parse_entry(r"C:\data\x.jsonl:2") == (r"C:\data\x.jsonl", 2.0, 1)  # a Windows drive stays a path


def _dolly_rows(n, categories=("a", "b", "c")):
    return [{"instruction": f"q{k}", "context": "", "response": f"r{k}", "category": categories[k % len(categories)]}
            for k in range(n)]


def _ids(examples):
    return [e.messages[0]["content"] for e in examples]


def test_mixture_weights_epochs_and_val_split(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", _dolly_rows(200))
    write_jsonl(tmp_path / "e.jsonl", [{"prompt": f"p{k}", "response": "r"} for k in range(100)])
    d, e = str(tmp_path / "d.jsonl"), str(tmp_path / "e.jsonl")
    mix = Mixture(parse_mixture(f"{d},{e}", base_dir=tmp_path), seed=0, val_fraction=0.1)
    assert len(mix.val) == 21 + 10 and len(mix.train) == 179 + 90  # d: 67/67/66 rows a category, 7 val each
    assert not set(_ids(mix.train)) & set(_ids(mix.val))
    # stratified: 10 % of each category of d.jsonl
    assert Counter(r.meta["category"] for r in mix.val if "category" in r.meta) == {"a": 7, "b": 7, "c": 7}
    # deterministic for a seed, different for another
    again = Mixture(parse_mixture(f"{d},{e}", base_dir=tmp_path), seed=0, val_fraction=0.1)
    assert _ids(again.train) == _ids(mix.train) and _ids(again.val) == _ids(mix.val)
    other = Mixture(parse_mixture(f"{d},{e}", base_dir=tmp_path), seed=1, val_fraction=0.1)
    assert _ids(other.val) != _ids(mix.val) and _ids(other.train) != _ids(mix.train)
    # the val part of d.jsonl depends on the seed only: not on weights, epochs or the other sources
    weighted = Mixture(parse_mixture(f"{d}:2:3,spelling", base_dir=tmp_path), seed=0, val_fraction=0.1)
    d_val = [x for x in _ids(mix.val) if x.startswith("q")]
    assert [x for x in _ids(weighted.val) if x.startswith("q")] == d_val
    # weight 2 x 3 epochs: every training row of d exactly 6 times
    counts = Counter(x for x in _ids(weighted.train) if x.startswith("q"))
    assert set(counts.values()) == {6} and len(counts) == 179
    # the training order interleaves sources
    firsts = ["q" if x.startswith("q") else "s" for x in _ids(weighted.train)[:200]]
    assert 50 < firsts.count("q") < 190


def test_mixture_fractional_weight(tmp_path):
    write_jsonl(tmp_path / "e.jsonl", [{"prompt": f"p{k}", "response": "r"} for k in range(100)])
    mix = Mixture(parse_mixture(f"{tmp_path / 'e.jsonl'}:0.5:2", base_dir=tmp_path), seed=0, val_fraction=0.0)
    assert len(mix.val) == 0 and len(mix.train) == 100  # two passes of a seeded half
    counts = Counter(_ids(mix.train))
    assert max(counts.values()) <= 2 and len(counts) > 50  # each pass draws its own half
    mix = Mixture(parse_mixture(f"{tmp_path / 'e.jsonl'}:1.5", base_dir=tmp_path), seed=0, val_fraction=0.0)
    assert len(mix.train) == 150 and Counter(Counter(_ids(mix.train)).values()) == {1: 50, 2: 50}


def test_mixture_default_is_the_builtin_tasks():
    mix = Mixture(parse_mixture("", base_dir="/nonexistent"), seed=0, val_fraction=0.05, builtin_size=100)
    assert len(mix.train) == 400 and len(mix.val) == 20
    assert Counter(r.meta["task"] for r in mix.train) == {t: 100 for t in BUILTIN_TASKS}
    assert {r.meta["task"] for r in mix.val} == set(BUILTIN_TASKS)
    val = [r.messages for r in mix.val if r.meta["task"] == "spelling"]
    assert val == builtin_examples("spelling", 5, 0, "val")  # the held-out items the evaluation also uses
    assert "400 training examples, 20 validation" in mix.summary()


def test_mixture_small_source_keeps_one_val_row(tmp_path):
    write_jsonl(tmp_path / "tiny.jsonl", _dolly_rows(4))
    mix = Mixture(parse_mixture(str(tmp_path / "tiny.jsonl"), base_dir=tmp_path), seed=0, val_fraction=0.05)
    assert (len(mix.train), len(mix.val)) == (3, 1)
    assert isinstance(mix.train.rows, np.ndarray)  # index lists, not copies of the records


@needs_shared
def test_real_dolly_mixture_val_is_stratified_and_stable():
    path = str(SHARED / "data" / "dolly15k_head.jsonl")
    mix = Mixture(parse_mixture(path, base_dir=SHARED), seed=0, val_fraction=0.05)
    by_cat = Counter(r.meta["category"] for r in mix.val)
    assert by_cat == {"open_qa": 20, "general_qa": 14, "classification": 12, "closed_qa": 10, "brainstorming": 9,
                      "information_extraction": 8, "summarization": 6, "creative_writing": 4}
    again = Mixture(parse_mixture(path + ":3", base_dir=SHARED), seed=0, val_fraction=0.05)
    assert [r.meta["line"] for r in again.val] == [r.meta["line"] for r in mix.val]
