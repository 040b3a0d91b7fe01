"""serve.py: the OpenAI-compatible API, batched decoding, limits and the chat page. python -m pytest -q tests/test_serve.py
Two servers run for the whole module, on the tiny pipeline's SFT checkpoint: `main` (8 slots) and `guarded` (an API
key, one slot, a queue of one)."""
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import engine
from conftest import REPO, run_script
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

KEY = "test-key-123"
TOK = get_tokenizer("bytes")


class ServerProcess:
    """serve.py in the background on a free port (it prints the address it got)."""

    def __init__(self, *args, env):
        e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--port=0", "--device=cpu", *args],
                                     cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines, self.url = [], None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):  # keeps the pipe drained (uvicorn logs every request) and finds the address
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("serving on "):
                self.url = line.split()[2]
                self.ready.set()
        self.ready.set()

    def wait(self, timeout=120):
        assert self.ready.wait(timeout) and self.url, "serve.py did not start:\n" + "".join(self.lines)
        return self

    def health(self):
        return httpx.get(self.url + "/health", timeout=10).json()

    def idle(self, timeout=30):
        """Wait until nothing runs or waits (the previous test's requests are gone)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            h = self.health()
            if h["running"] == 0 and h["queued"] == 0:
                return h
            time.sleep(0.02)
        raise AssertionError(f"server still busy: {self.health()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def servers(tiny_pipeline):
    sft = str(tiny_pipeline.runs["sft"])
    main = ServerProcess(f"--checkpoint={sft}", "--max_batch=8", "--max_messages=8", "--max_message_chars=2000",
                         env=tiny_pipeline.env)
    guarded = ServerProcess(f"--checkpoint={sft}", "--max_batch=1", "--max_queue=1",
                            env={**tiny_pipeline.env, "T4CHAT_API_KEY": KEY})
    try:
        yield {"main": main.wait(), "guarded": guarded.wait(), "sft": sft, "env": tiny_pipeline.env}
    finally:
        main.stop()
        guarded.stop()


def client(server, key="-"):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def user(text):
    return [{"role": "user", "content": text}]


def streamed(server, messages, **kw):
    """(text, finish reason, the content pieces) of a streamed completion."""
    pieces, finish = [], None
    for ch in client(server).chat.completions.create(model="t4chat", messages=messages, stream=True, **kw):
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    return "".join(pieces), finish, pieces


def completed(server, messages, **kw):
    r = client(server).chat.completions.create(model="t4chat", messages=messages, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason, r


# ---- answers: the same as chat.py's, alone or in a batch ----------------------------------------------------------

def test_streamed_and_plain_completions_equal_chat_py_greedy(servers):
    s = servers["main"]
    question = "Spell the word cat."
    p = run_script("chat.py", f"--checkpoint={servers['sft']}", "-p", question, "--temperature=0", "--max_tokens=60",
                   "--device=cpu", env=servers["env"])
    want = p.stdout[:-1]  # chat.py ends the answer with a newline
    text, finish, r = completed(s, user(question), temperature=0, max_tokens=60)
    assert text == want and text.strip()
    assert finish in ("stop", "length") and r.usage.completion_tokens > 0 and r.model == "t4chat-sft"
    assert r.usage.prompt_tokens == len(TOK.chat_format.render_prompt(user(question)))
    text, finish2, pieces = streamed(s, user(question), temperature=0, max_tokens=60)
    assert text == want and finish2 == finish and len(pieces) > 1


def test_eight_streaming_clients_finish_and_match_their_answers_alone(servers):
    """Greedy output of a request decoded alone equals its output in a batch with seven others of different
    lengths, bit for bit (engine.BatchedGenerator's docstring says why it can be exact)."""
    s = servers["main"]
    questions = [user("hi"), user("Count the letters in banana."), user("What is 12 plus 30?"),
                 user("Who are you? " * 3), user("Spell the word elephant backwards, please."),
                 [{"role": "system", "content": "be brief"}] + user("x"),
                 user("hello") + [{"role": "assistant", "content": "hello!"}] + user("and then?"),
                 user("What is 7 times 8? Answer with a number only.")]
    kw = dict(temperature=0, max_tokens=50, extra_body={"ignore_eos": True})  # answers of their full length
    alone = [completed(s, q, **kw)[0] for q in questions]
    s.idle()
    results, errors = [None] * 8, []
    gate = threading.Barrier(8)

    def run(i):
        try:
            gate.wait()
            results[i] = streamed(s, questions[i], **kw)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(r is not None and r[1] in ("length", "stop") for r in results)
    assert [r[0] for r in results] == alone
    assert len({len(TOK.chat_format.render_prompt(q)) for q in questions}) == 8  # eight prompt lengths
    assert s.health()["requests"]["peak_running"] >= 6  # they really were decoded together


def test_batched_logits_equal_alone_bit_for_bit():
    """The engine itself, in this process: every logit a sequence sees is the same alone and in batches of 2 to 8
    (packed CPU linears, a padding row for one sequence, attention row by row)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=2, n_embd=64, vocab_size=TOK.vocab_size, max_seq_len=128)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, 0.05)
    assert engine.pack_linears(model)
    prompts = [[TOK.bos_id] + TOK.encode("ab" * (1 + 5 * i)) for i in range(8)]

    def logits_seen(batch_prompts):
        gen = engine.BatchedGenerator(model, TOK)
        seqs = [gen.add(p, max_tokens=12) for p in batch_prompts]
        seen = {id(s): [] for s in seqs}
        real = gen._logits

        def spy(feed, cache):  # record each row's logits under its sequence
            out = real(feed, cache)
            for i, c in enumerate(cache if isinstance(cache, list) else [cache]):
                for s in seqs:
                    if s.cache is c:
                        seen[id(s)].append(out[i].clone())
            return out

        gen._logits = spy
        while gen.running:
            gen.step()
        return [seen[id(s)] for s in seqs]

    alone = [logits_seen([p])[0] for p in prompts]
    for k in (2, 3, 8):
        for got, want in zip(logits_seen(prompts[:k]), alone):
            assert len(got) == len(want) == 12
            assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---- bad input, keys, a full queue, disconnects, stop strings ----------------------------------------------------

BAD = [
    (b'{"messages": [{"role": "user", "content": "hi"}', "not valid JSON", None),
    (b"", "not valid JSON", None),
    (b"[1, 2]", "must be a JSON object", None),
    ({"messages": "hi"}, "messages: Input should be a valid array", "messages"),
    ({"messages": []}, "at least 1 item", "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role: Input should be 'system'", "messages.0.role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content: Input should be a valid string",
     "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content: Field required", "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "role 'assistant' where 'user' was expected", "messages"),
    ({"messages": user("hi") * 9}, "9 messages; this server takes at most 8", "messages"),
    ({"messages": user("x" * 2001)}, "2,001 characters; this server takes at most 2,000", "messages.0.content"),
    ({"messages": user("y" * 300)}, "the prompt is 304 tokens; this server takes at most 128", "messages"),
    ({"messages": user("hi"), "temperature": "0.5"}, "temperature: Input should be a valid number", "temperature"),
    ({"messages": user("hi"), "temperature": 2.5}, "temperature: Input should be less than or equal to 2",
     "temperature"),
    ({"messages": user("hi"), "top_p": 0}, "top_p: Input should be greater than 0", "top_p"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1", "max_tokens"),
    ({"messages": user("hi"), "max_tokens": 129}, "max_tokens=129 is more than this server allows", "max_tokens"),
    ({"messages": user("hi"), "max_tokens": True}, "max_tokens: Input should be a valid integer", "max_tokens"),
    ({"messages": user("hi"), "frequency_penalty": 3}, "frequency_penalty: Input should be less than or equal to 2",
     "frequency_penalty"),
    ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop: up to 4 strings", "stop"),
    ({"messages": user("hi"), "stream": "yes"}, "stream: Input should be a valid boolean", "stream"),
    ({"messages": user("hi"), "n": 2}, "n=2: this server returns one choice", "n"),
]


def test_each_bad_input_gets_400_naming_the_problem(servers):
    s = servers["main"]
    for body, message, param in BAD:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(s.url + "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert message in err["message"] and err["param"] == param, (body, err)
        assert err["type"] == "invalid_request_error"
    r = httpx.get(s.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    # a prompt too long is served when asked to drop its oldest turns, and the answer says how many went
    long = {"messages": user("z" * 120) + [{"role": "assistant", "content": "ok"}] + user("hi"), "max_tokens": 8}
    assert httpx.post(s.url + "/v1/chat/completions", json=long).status_code == 400
    r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={**long, "truncate": True})
    assert r.status_code == 200 and r.json()["dropped_messages"] == 2, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(TOK.chat_format.render_prompt(user("hi")))
    assert s.proc.poll() is None and s.idle()  # nothing hung, nothing crashed
    # a body larger than any request within the limits can be is refused before it is parsed (413)
    huge = b'{"messages": [{"role": "user", "content": "' + b"x" * 13_000_000 + b'"}]}'
    r = httpx.post(s.url + "/v1/chat/completions", content=huge, timeout=60)
    assert r.status_code == 413 and "--max_message_chars" in r.json()["error"]["message"]
    # a vanishing temperature is greedy, not inf/nan in the sampler (one such request once failed the whole batch)
    r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={**long, "messages": user("hi"),
                                                                     "temperature": 1e-40})
    assert r.status_code == 200 and s.proc.poll() is None


def test_api_key_guards_all_but_health(servers):
    from openai import AuthenticationError
    s = servers["guarded"]
    assert httpx.get(s.url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(s.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    # before the body is even read: a bad key with bad JSON is still a 401
    assert httpx.post(s.url + "/v1/chat/completions", content=b"{").status_code == 401
    with pytest.raises(AuthenticationError):
        client(s, "wrong").models.list()
    assert client(s, KEY).models.list().data[0].id == "t4chat-sft"


def start_long_stream(server, **kw):
    """A streamed request that runs to max_tokens; returns (response, its line iterator) once it produced text."""
    body = {"messages": user("Tell me a long story."), "stream": True, "max_tokens": 120, "ignore_eos": True, **kw}
    req = httpx.Client(timeout=60)
    resp = req.send(req.build_request("POST", server.url + "/v1/chat/completions", json=body,
                                      headers={"Authorization": f"Bearer {KEY}"}), stream=True)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    for line in lines:
        if '"content":"' in line and '"content":""' not in line:
            return req, resp, lines
    raise AssertionError("no text came")


def test_full_queue_gets_503_with_retry_after(servers):
    s = servers["guarded"]  # one slot, one place in the queue
    s.idle()
    req, resp, _ = start_long_stream(s)
    statuses = []

    def ask():
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                       json={"messages": user("hi"), "max_tokens": 2})
        statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    resp.close()
    req.close()
    refused = [x for x in statuses if x[0] == 503]
    assert refused and all(x[1] and "busy" in x[2]["error"]["message"] for x in refused), statuses
    assert all(x[0] in (200, 503) for x in statuses) and any(x[0] == 200 for x in statuses), statuses


def test_a_client_that_disconnects_frees_its_slot(servers):
    s = servers["guarded"]
    before = s.idle()["requests"].get("disconnected", 0)
    req, resp, _ = start_long_stream(s)
    resp.close()  # mid-answer: about 120 tokens were still to come
    req.close()
    t0 = time.time()
    r = httpx.post(s.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": user("hi"), "max_tokens": 2})
    assert r.status_code == 200 and time.time() - t0 < 10
    assert s.idle()["requests"].get("disconnected", 0) == before + 1  # stopped, not run to its end


def test_a_stop_string_never_appears_in_the_stream(servers):
    s = servers["main"]
    kw = dict(temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    full, _, _ = completed(s, user("Spell the word dog."), **kw)
    stop = full[6:9]  # three characters: three byte tokens, so the stop string arrives piece by piece
    assert len(stop) == 3
    text, finish, pieces = streamed(s, user("Spell the word dog."), stop=[stop, "never seen"], **kw)
    assert text == full[:full.index(stop)] and finish == "stop"
    assert stop not in text and not any(stop in p for p in pieces)
    text, finish, _ = completed(s, user("Spell the word dog."), stop=stop, **kw)
    assert text == full[:full.index(stop)] and finish == "stop"


def test_a_seed_makes_a_sampled_answer_reproducible(servers):
    s = servers["main"]
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=24, extra_body={"ignore_eos": True, "top_k": 100})
    a = completed(s, user("hi"), seed=7, **kw)[0]
    assert completed(s, user("hi"), seed=7, **kw)[0] == a
    assert {completed(s, user("hi"), seed=k, **kw)[0] for k in (8, 9, 10)} != {a}


def test_stop_strings_hold_back_only_what_may_start_one():
    f = engine.StopStrings(["END", "xyz"])
    # "E" and "EN" may begin END, "x" may begin xyz: each waits until the next piece settles it
    assert [f.feed(p) for p in ("ab", "cE", "N", "x", "D!", "..xy")] == ["ab", "c", "", "EN", "xD!", ".."]
    assert not f.stopped
    assert f.feed("z and more") == "" and f.stopped and f.feed("later") == ""
    f = engine.StopStrings(["END"])
    assert [f.feed(p) for p in ("aEN", "Dzz")] == ["a", ""] and f.stopped  # across pieces
    f = engine.StopStrings(["END"])
    assert f.feed("xEN") == "x" and f.flush() == "EN"  # the answer ended: what waited was no stop after all


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = engine.apply_penalties(logits, counts, 0.5, 0.25)
    assert torch.equal(out, torch.tensor([[0.0, -0.75, -1.75, 0.0]]))
    with pytest.raises(ValueError, match="presence_penalty"):
        engine.check_sampling(max_tokens=1, temperature=0, top_k=0, top_p=1, repetition_penalty=1,
                              presence_penalty=2.5)
    with pytest.raises(ValueError, match="repetition_penalty"):  # a tiny one overflows the logits it divides
        engine.check_sampling(max_tokens=1, temperature=0, top_k=0, top_p=1, repetition_penalty=1e-300)
    logits = torch.tensor([[1.0, 3.0, 2.0, float("-inf")]])
    assert engine.sample_token(logits, temperature=1e-40).item() == 1  # no inf - inf: the maximum, always


def test_a_request_past_its_timeout_is_cancelled():
    import serve

    async def late():
        job = serve.Job([1], {}, [], asyncio.get_running_loop(), timeout=0.01)
        await asyncio.sleep(0.02)
        with pytest.raises(serve.APIError) as e:
            async for _ in serve.job_items(job):
                pass
        return job, e.value

    job, err = asyncio.run(late())
    assert err.status == 504 and "--request_timeout" in err.message and job.cancelled == "timed out"


def test_listening_beyond_localhost_warns_and_a_missing_checkpoint_is_one_message(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "serve.py"), "--host=0.0.0.0", "--port=0",
                        f"--checkpoint={tmp_path / 'none'}"], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "warning: --host=0.0.0.0" in p.stderr and "no API key" in p.stderr and str(tmp_path / "none") in p.stderr


# ---- the chat page in a real browser ------------------------------------------------------------------------------

def chromium():
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(chromium() is None, reason="no chromium binary: apt-get install chromium (.ci/run does this)")
def test_chat_page_streams_answers_keeps_history_and_stops(servers, tmp_path):
    from playwright.sync_api import sync_playwright
    s = servers["main"]
    s.idle()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(s.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 't4chat-sft'")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "30")
            # count the text updates of the answers: a streamed answer grows in several of them
            page.evaluate("""window.updates = 0; new MutationObserver(() => window.updates++)
                .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true})""")
            answers = []
            for turn, text in enumerate(["Spell the word cat.", "And dog?"]):
                page.fill("#input", text)
                page.press("#input", "Enter")
                page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {turn + 1} && "
                                       "!document.querySelector('.msg.assistant.streaming')")
                answers.append(page.locator(".msg.assistant .text").nth(turn).inner_text())
            assert page.evaluate("window.updates") > 6
            # the page sent the whole conversation: its second answer is the API's for those three messages
            convo = user("Spell the word cat.") + [{"role": "assistant", "content": answers[0]}] + user("And dog?")
            want = [completed(s, convo[:1], temperature=0, max_tokens=30)[0],
                    completed(s, convo, temperature=0, max_tokens=30)[0]]
            assert [a.strip() for a in answers] == [w.strip() for w in want] and all(answers)
            # stop: a slow network keeps the third answer streaming long enough to press the button
            cdp = page.context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 400,
                                                          "uploadThroughput": -1})
            page.fill("#input", "Tell me more.")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant .text')[2]?.textContent.length > 0")
            assert page.is_enabled("#stop")
            page.click("#stop")
            page.wait_for_function("!document.querySelector('.msg.assistant.streaming')")
            assert "[stopped]" in page.locator(".msg.assistant").nth(2).inner_text()
            assert page.is_enabled("#send") and page.is_disabled("#stop")
            page.screenshot(path=str(tmp_path / "chat_page.png"))
            assert (tmp_path / "chat_page.png").stat().st_size > 10_000
        finally:
            browser.close()
