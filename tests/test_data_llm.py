"""LLM backends: an OpenAI-compatible endpoint served on 127.0.0.1 (malformed answers, timeouts, HTTP 429), a tiny
local GPT-2, and a fake completer with canned answers."""

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from safealign.cli import main as cli
from safealign.data.config import PromptsConfig
from safealign.data.llm import OpenAIChat, _retry_after, pair_request, parse_pairs
from safealign.data.prompts import build_prompts, make_prompts
from safealign.data.taxonomy import Concept
from safealign.errors import SafealignError


def _answer(concept: str, n: int, kind: str = "ok") -> str:
    pairs = [{"unsafe": f"a photo of a {concept}, take {i}", "safe": f"a photo of a teapot, take {i}"}
             for i in range(max(n, 3))]
    if kind == "no_safe":
        pairs[0] = {"unsafe": f"a {concept} alone"}
        pairs[1]["safe"] = ""
    if kind == "identical":
        pairs[0]["safe"] = pairs[0]["unsafe"].upper() + "."
    return "Sure! ```json\n" + json.dumps({"pairs": pairs}) + "\n```"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        srv.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        action = srv.script.pop(0) if srv.script else "ok"
        if action in ("429", "429-date", "500", "401"):
            self.send_response(int(action[:3]))
            if action == "429":
                self.send_header("Retry-After", "7")
            elif action == "429-date":
                self.send_header("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT")
            self.end_headers()
            self.wfile.write(b'{"error": "nope"}')
            return
        if action == "slow":
            time.sleep(1.0)
        user = body["messages"][-1]["content"]
        concept = re.search(r"Concept: (.+?)\.", user).group(1)
        n = int(re.search(r"Write (\d+) different", user).group(1))
        if action == "garbage":
            payload = b"<html>not json</html>"
        elif action == "no_choices":
            payload = json.dumps({"choices": []}).encode()
        else:
            content = "I cannot help with that." if action == "prose" else _answer(concept, n, action)
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out first

    def log_message(self, *a):
        pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests, srv.script = [], []
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(timeout=5)


def _client(srv, **kw):
    waits = []
    base = dict(timeout=0.4, max_retries=3, backoff=0.01, sleep=waits.append, api_key="k")
    base.update(kw)
    return OpenAIChat(srv.url, "served-model", **base), waits


def _cfg(tmp_path, **kw):
    base = dict(output=str(tmp_path / "p.parquet"), model="world", backend="openai", endpoint="http://x/v1",
                llm_model="served-model", categories=("violence",), pairs_per_concept=3, test_fraction=0.0)
    base.update(kw)
    return PromptsConfig(**base)


def test_openai_backend_end_to_end(server, tmp_path):
    chat, _ = _client(server)
    df, stats = build_prompts(_cfg(tmp_path), completer=chat)
    assert len(df) == 9 and set(df["concept"]) == {"knife", "gun", "axe"}
    assert all("teapot" in s for s in df["safe_prompt"])
    r = server.requests[0]
    assert r["path"] == "/v1/chat/completions" and r["body"]["model"] == "served-model"
    assert r["auth"] == "Bearer k" and r["body"]["messages"][0]["role"] == "system"
    assert "Concept: knife" in r["body"]["messages"][1]["content"] and "spoon" in r["body"]["messages"][1]["content"]


def test_http_429_honours_retry_after(server):
    server.script = ["429", "ok"]
    chat, waits = _client(server)
    pairs, _ = parse_pairs(chat(pair_request(Concept("knife", "violence", "spoon"), 2)))
    assert len(pairs) == 3 and waits == [7.0] and chat.stats["http_429"] == 1
    server.script = ["429", "ok"]
    chat, waits = _client(server, max_retry_wait=2.0)
    chat(pair_request(Concept("knife", "violence", "spoon"), 2))
    assert waits == [2.0]  # capped by --max-retry-wait
    server.script = ["429-date", "500", "ok"]
    chat, waits = _client(server)
    assert chat(pair_request(Concept("knife", "violence", "spoon"), 2)) is not None
    assert waits[0] == 0.0 and len(waits) == 2  # a date in the past: retry at once; 500: backoff


def test_retry_after_formats():
    assert _retry_after("3") == 3.0 and _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_timeout_is_retried(server):
    server.script = ["slow", "ok"]
    chat, waits = _client(server, timeout=0.3)
    t0 = time.perf_counter()
    assert chat(pair_request(Concept("gun", "violence", "camera"), 2)) is not None
    assert chat.stats["timeouts"] == 1 and len(waits) == 1 and time.perf_counter() - t0 < 5


def test_persistent_failure_is_one_line_error(server):
    server.script = ["500"] * 10
    chat, waits = _client(server, max_retries=2)
    with pytest.raises(SafealignError, match="after 3 tries .HTTP 500"):
        chat(pair_request(Concept("gun", "violence", "camera"), 2))
    server.script = ["401"]
    chat, _ = _client(server)
    with pytest.raises(SafealignError, match="HTTP 401"):
        chat(pair_request(Concept("gun", "violence", "camera"), 2))


def test_malformed_answers_are_dropped_and_counted(server, tmp_path):
    server.script = ["garbage", "no_choices", "prose", "no_safe", "identical"]
    chat, _ = _client(server)
    df, stats = build_prompts(_cfg(tmp_path, categories=("violence",)), completer=chat)
    assert len(df) == 9  # later calls make up for the dropped pairs
    d = stats["dropped"]
    assert d["malformed_answer"] == 3 and d["no_safe"] == 2 and d["identical"] == 1 and "malformed_pair" not in d
    assert stats["endpoint"]["malformed_responses"] == 2
    assert not df["unsafe_prompt"].duplicated().any()


def test_parse_pairs_validation():
    good, d = parse_pairs('{"pairs": [{"unsafe": "a knife", "safe": "a spoon"}, {"unsafe": "x"}, 3, '
                          '{"unsafe": "A knife!", "safe": "a knife"}, {"unsafe": "k", "safe": "' + "s" * 500 + '"}]}')
    assert good == [("a knife", "a spoon")]
    assert d == {"no_safe": 1, "malformed_pair": 1, "identical": 1, "too_long": 1}
    assert parse_pairs('[{"unsafe_prompt": "a gun", "safe_prompt": "a camera"}]')[0] == [("a gun", "a camera")]
    assert parse_pairs(None)[1] == {"malformed_answer": 1}


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_endpoint_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "p.parquet"
    rc = cli(["data", "prompts", "--backend", "openai", "--endpoint", f"http://127.0.0.1:{_closed_port()}/v1",
              "--llm-model", "m", "--max-retries", "0", "--output", str(out), "--categories", "violence"])
    err = capsys.readouterr().err
    assert rc == 2 and "unreachable" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_rate_limit_spaces_requests(server):
    chat, waits = _client(server, requests_per_minute=600)  # >= 0.1 s apart
    for _ in range(3):
        chat(pair_request(Concept("gun", "violence", "camera"), 1))
    assert len(waits) >= 2 and all(0 < w <= 0.1 for w in waits)


def test_fake_completer_with_canned_text(tmp_path):
    calls = []

    def fake(messages):
        calls.append(messages)
        concept = re.search(r"Concept: (.+?)\.", messages[-1]["content"]).group(1)
        return {1: "nothing useful", 3: _answer("knife", 3)}.get(len(calls), _answer(concept, 3))
    path, stats = make_prompts(_cfg(tmp_path, backend="transformers", llm_model="unused"), completer=fake)
    assert stats["pairs"] == 9 and len(calls) == 5
    assert stats["dropped"] == {"malformed_answer": 1, "duplicate": 3}  # gun's first answer repeated knife's
    assert "batch 2" in calls[1][-1]["content"]  # a retry for the same concept asks for new prompts


def _tiny_gpt2(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    words = ['{"pairs":', '[{"unsafe":', '"a', 'knife"', ',', '"safe":', 'spoon"}]}', "the", "a", "of"]
    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>"] + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<eos>", pad_token="<eos>")
    import torch
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                       eos_token_id=1, bos_token_id=1, pad_token_id=1))
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def test_transformers_backend_with_tiny_gpt2(tmp_path):
    from safealign.data.llm import LocalLM
    path = _tiny_gpt2(tmp_path / "gpt2")
    lm = LocalLM(str(path), max_new_tokens=12, seed=0)
    text = lm(pair_request(Concept("knife", "violence", "spoon"), 2))
    assert isinstance(text, str)
    # a random LM writes no valid pair: every answer is dropped and counted, and the step says so in one line
    cfg = _cfg(tmp_path, backend="transformers", llm_model=str(path), max_new_tokens=12, max_calls_per_concept=1)
    with pytest.raises(SafealignError, match="no valid prompt pair.*malformed_answer 3"):
        build_prompts(cfg, completer=lm)
    with pytest.raises(SafealignError, match="not a folder"):
        LocalLM(str(tmp_path / "missing"))
