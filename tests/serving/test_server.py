"""The OpenAI-compatible server, live on loopback: the official `openai` client against the
embedded SmolLM2 (greedy outputs equal `LLM.generate` offline), 32 concurrent streams with mixed
budgets, every kind of bad request, clients that disconnect, the API key, /metrics as
Prometheus text; on tiny random models, preemption over HTTP, an engine failure that fails
only its own request, the request budget honoured, and hostile input and exposure: lone
surrogates, deep nesting, uploads cut short or too slow, non-JSON content types, loose field
types, binding beyond loopback without a key; the GPU energy counter in /metrics, absent on the
CPU and read from an energy meter when one is given.
"""
import asyncio
import copy
import json
import logging
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from anee_fast import LLM, SamplingParams
from anee_fast.cli import main as cli_main
from anee_fast.engine.energy import EnergyMeter
from anee_fast.engine.llm_engine import LLMEngine
from anee_fast.serving import server as server_module
from anee_fast.serving.server import ServerThread, _Detokenizer
from conftest import build_model, tiny_tokenizer

MAX_TOKENS = 10
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,",
           "Once upon a time", "The best way to learn Python is"]


@pytest.fixture(scope="module")
def served():
    """(llm being served, an offline LLM on the same weights with its own engine, server)."""
    llm = LLM()
    offline = copy.copy(llm)
    offline.engine = LLMEngine(llm.weights, llm.engine.runner.ops, llm.engine.config,
                               eos_token_id=llm.engine.eos_token_id)
    with ServerThread(llm) as server:
        yield llm, offline, server


def _client(server, **kwargs):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kwargs)


def _expected(offline, ids, budget, controller="budget", max_tokens=MAX_TOKENS):
    return offline.generate(ids, SamplingParams(max_tokens=max_tokens), energy_budget=budget,
                            controller=controller)[0]


def _chat_ids(llm, content):
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)
    return llm.tokenizer.encode(text, add_special_tokens=False)


def _metrics(server):
    text = httpx.get(server.url + "/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if not s.labels}


def _wait_until_idle(llm, seconds=20.0):
    deadline = time.monotonic() + seconds
    while llm.engine.has_unfinished() or llm.engine.block_manager.num_used:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("budget, controller", [(1.0, "budget"), (0.5, "budget"),
                                                (1.0, "heuristic")])
def test_completions_equal_offline_generate(served, budget, controller):
    llm, offline, server = served
    client = _client(server)
    prompt = PROMPTS[0]
    ref = _expected(offline, llm.tokenizer.encode(prompt), budget, controller)
    extra = {"energy_budget": budget, "controller": controller}
    out = client.completions.create(model=llm.name, prompt=prompt, max_tokens=MAX_TOKENS,
                                    temperature=0, extra_body=extra)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.anee["compute"] == pytest.approx(ref.trace.mean_compute)
    assert out.anee["energy_budget"] == budget and out.anee["ttft_s"] > 0
    chunks = list(client.completions.create(model=llm.name, prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True, extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert sum(len(c.choices[0].token_ids) for c in chunks) == len(ref.token_ids) > 1
    assert len(chunks) > 2                          # tokens arrive as they are produced
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert chunks[-1].anee["compute"] == pytest.approx(ref.trace.mean_compute)


@pytest.mark.slow
def test_chat_equals_offline_generate_streaming_or_not(served):
    llm, offline, server = served
    client = _client(server)
    question = "What is the capital of France?"
    ref = _expected(offline, _chat_ids(llm, question), 1.0)
    messages = [{"role": "user", "content": question}]
    out = client.chat.completions.create(model=llm.name, messages=messages, max_tokens=MAX_TOKENS,
                                         temperature=0, extra_body={"energy_budget": 1.0})
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    stream = client.chat.completions.create(model=llm.name, messages=messages,
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert [m.id for m in client.models.list().data] == [llm.name]


@pytest.mark.slow
def test_32_concurrent_streams_with_mixed_budgets(served):
    llm, offline, server = served
    budgets = [1.0, 0.9, 0.75, 0.5]
    requests = [(PROMPTS[i % len(PROMPTS)], budgets[i % len(budgets)]) for i in range(32)]
    unique = sorted(set(requests))
    outs = offline.generate([llm.tokenizer.encode(p) for p, _ in unique],
                            SamplingParams(max_tokens=8), energy_budget=[b for _, b in unique])
    refs = dict(zip(unique, outs))
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

    async def one(prompt, budget):
        stream = await client.completions.create(model=llm.name, prompt=prompt, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 extra_body={"energy_budget": budget})
        text, last = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            last = chunk
        return text, last

    async def run_all():
        try:
            return await asyncio.gather(*(one(p, b) for p, b in requests))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    for (prompt, budget), (text, last) in zip(requests, results):
        ref = refs[(prompt, budget)]
        assert text == ref.text and last.choices[0].finish_reason == ref.finish_reason
        assert last.anee["compute"] == pytest.approx(ref.trace.mean_compute)
    _wait_until_idle(llm)
    assert llm.engine.block_manager.num_used == 0
    assert _metrics(server)["anee_kv_blocks_in_use"] == 0


@pytest.mark.slow
def test_streamed_text_pieces_add_up_to_the_decoded_text(served):
    tokenizer = served[0].tokenizer
    ids = tokenizer.encode("Café au lait, naïve 東京 🚀 fin.  Two  spaces\nnew line")
    detok = _Detokenizer(tokenizer)
    pieces = [detok.push([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > 10              # text came piece by piece


def _post(server, body, path="/v1/completions", **headers):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content,
                      headers={"content-type": "application/json", **headers}, timeout=30)


def _bad_requests(name, max_positions):
    ok = {"model": name, "prompt": "Hello", "max_tokens": 4}
    return [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        ({**ok, "model": "gpt-4"}, 404),
        ({**ok, "energy_budget": 1.5}, 400),
        ({**ok, "energy_budget": -0.1}, 400),
        ({**ok, "energy_budget": "half"}, 400),
        ({**ok, "prompt_budget": 1.5}, 400),
        ({**ok, "prompt_budget": "full"}, 400),
        ({**ok, "prompt": [1] * max_positions}, 400),
        ({**ok, "prompt": [1] * (max_positions - 2), "max_tokens": 3}, 400),
        ({**ok, "max_tokens": -1}, 400),
        ({**ok, "max_tokens": 10 ** 9}, 400),
        ({**ok, "controller": "no-such-controller"}, 400),
        ({**ok, "controller": "/etc/passwd"}, 400),
        ({**ok, "controller": "controller.json"}, 400),          # files only via serve --controller
        ({**ok, "controller": [0, 1]}, 400),                     # not one action per layer
        ({**ok, "controller": [7] * 30}, 400),                   # not an action code
        ({**ok, "n": 2}, 400),
        ({**ok, "stop": ["\n"]}, 400),
        ({**ok, "unknown_field": 1}, 400),
        ({**ok, "prompt": [10 ** 7]}, 400),
        ({**ok, "prompt": ""}, 400),
        ({"model": name, "prompt": "x" * (2 << 20)}, 413),
    ]


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_change_nothing(served):
    llm, _, server = served
    _wait_until_idle(llm)
    before = _metrics(server)
    cases = _bad_requests(llm.name, llm.spec.max_positions)
    for body, status in cases:
        r = _post(server, body)
        assert r.status_code == status, (str(body)[:200], r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
    chat = {"model": llm.name, "messages": [{"role": "wizard", "content": "hi"}]}
    assert _post(server, chat, "/v1/chat/completions").status_code == 400
    assert _post(server, {**chat, "messages": []}, "/v1/chat/completions").status_code == 400
    assert httpx.get(server.url + "/v1/nothing-here").json()["error"]["message"]
    after = _metrics(server)
    assert after["anee_kv_blocks_in_use"] == 0 and after["anee_queue_depth"] == 0
    assert after["anee_generation_tokens_total"] == before["anee_generation_tokens_total"]
    # The openai client sees the error as its exception, and the server keeps serving.
    client = _client(server)
    with pytest.raises(openai.BadRequestError, match="energy_budget"):
        client.completions.create(model=llm.name, prompt="Hi", max_tokens=2,
                                  extra_body={"energy_budget": 2})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    out = client.completions.create(model=llm.name, prompt="Hi", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


@pytest.mark.slow
def test_metrics_parse_as_prometheus_text(served):
    llm, _, server = served
    _client(server).completions.create(model=llm.name, prompt="Hi", max_tokens=3, temperature=0,
                                       extra_body={"energy_budget": 0.5})
    _wait_until_idle(llm)
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("anee_requests", "anee_generation_tokens", "anee_compute_saved",
                 "anee_queue_depth", "anee_kv_blocks_in_use", "anee_compute_saved_ratio"):
        assert name in families, name
    finished = {s.labels["finish_reason"]: s.value for s in families["anee_requests"].samples}
    assert finished["length"] >= 1
    values = _metrics(server)
    assert values["anee_generation_tokens_total"] >= 3
    assert 0 < values["anee_compute_saved_ratio"] < 1     # a budget-0.5 request saved compute
    assert values["anee_kv_blocks_total"] == llm.engine.block_manager.num_blocks


def _disconnect_mid_stream(llm, url, body):
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
            assert llm.engine.block_manager.num_used > 0


def _give_up_on_a_plain_request(llm, url, body):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("give_up", [_disconnect_mid_stream, _give_up_on_a_plain_request])
def test_a_client_that_gives_up_frees_its_blocks(served, give_up):
    llm, _, server = served
    _wait_until_idle(llm)
    aborted = _metrics_labelled(server, "anee_requests_total", "abort")
    body = {"model": llm.name, "prompt": "Tell me a long story.", "max_tokens": 400,
            "ignore_eos": True, "temperature": 0}
    give_up(llm, server.url + "/v1/completions", body)
    _wait_until_idle(llm)
    assert llm.engine.block_manager.num_used == 0
    assert _metrics_labelled(server, "anee_requests_total", "abort") == aborted + 1


def _metrics_labelled(server, sample_name, finish_reason):
    text = httpx.get(server.url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == sample_name and s.labels.get("finish_reason") == finish_reason)


def test_api_key_is_enforced_when_configured():
    llm = LLM(build_model("llama_gqa", 2), min_layers=1)
    with ServerThread(llm, api_key="s3cret", model_name="tiny") as server:
        body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2}
        assert _post(server, body).status_code == 401
        assert _post(server, body, authorization="Bearer wrong").status_code == 401
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        r = _post(server, body, authorization="Bearer s3cret")
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 2
        # A model without a tokenizer takes token ids but no text and no chat.
        text_prompt = {**body, "prompt": "text"}
        assert _post(server, text_prompt, authorization="Bearer s3cret").status_code == 400
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        assert _post(server, chat, "/v1/chat/completions",
                     authorization="Bearer s3cret").status_code == 400


def test_a_tiny_kv_pool_preempts_and_every_http_request_completes():
    model = build_model("llama_gqa", 2)
    prompts = [[3 + i, 5, 7 + i, 11, 13][: 2 + i % 4] for i in range(8)]
    refs = [LLM(model, min_layers=1).generate(p, SamplingParams(max_tokens=12, ignore_eos=True))[0]
            for p in prompts]
    llm = LLM(model, min_layers=1, block_size=2, num_kv_blocks=20)
    with ServerThread(llm, model_name="tiny") as server:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        async def one(prompt):
            out = await client.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                                  temperature=0, extra_body={"ignore_eos": True})
            return out.choices[0].token_ids

        async def run_all():
            try:
                return await asyncio.gather(*(one(p) for p in prompts))
            finally:
                await client.close()

        assert asyncio.run(run_all()) == [r.token_ids for r in refs]
        values = _metrics(server)
        assert values["anee_preemptions_total"] > 0 and values["anee_kv_blocks_in_use"] == 0


def test_an_engine_failure_fails_only_its_request():
    llm = LLM(build_model("llama_gqa", 2), min_layers=1)
    run = llm.engine.runner.run
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return run(*args, **kwargs)

    llm.engine.runner.run = failing_once
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}
    with ServerThread(llm, model_name="tiny") as server:
        r = _post(server, body)
        assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        r = _post(server, body)
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 3
        assert httpx.get(server.url + "/health").status_code == 200
        assert llm.engine.block_manager.num_used == 0
        service = server.app.state.service
        service.prompt_ids = lambda prompt: {}["a bug"]
        r = _post(server, body)
        assert r.status_code == 500 and "KeyError" in r.json()["error"]["message"]
        del service.prompt_ids
        assert _post(server, body).status_code == 200


def test_serve_command_checks_its_arguments(capsys):
    assert cli_main(["serve", "--budget", "1.5"]) == 1
    assert "--budget" in capsys.readouterr().err
    assert cli_main(["serve", "--controller", "nope"]) == 1
    assert cli_main(["serve", "--port", "70000"]) == 1


@pytest.mark.parametrize("argv, says", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--min-replicas", "2"], "both --min-replicas and --max-replicas"),
    (["--min-replicas", "3", "--max-replicas", "2"], "1 <= --min-replicas <= --max-replicas"),
    (["--replicas", "5", "--min-replicas", "1", "--max-replicas", "2"], "outside"),
    (["--target-ongoing-requests", "4"], "needs --min-replicas"),
    (["--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "0"], "> 0"),
    (["--num-gpus-per-replica", "1"], "need Ray"),
    (["--replicas", "2", "--num-cpus-per-replica", "-1"], "must be >= 0"),
    (["--replicas", "2", "--host", "0.0.0.0"], "no API key is set"),
])
def test_serve_command_checks_its_scaling_arguments(capsys, argv, says):
    assert cli_main(["serve", *argv]) == 1
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1


def test_serving_replicas_without_ray_says_how_to_install_it(monkeypatch, capsys):
    import anee_fast.serving
    monkeypatch.setitem(sys.modules, "ray", None)           # as if ray were not installed
    monkeypatch.setitem(sys.modules, "anee_fast.serving.ray_serve", None)
    monkeypatch.delattr(anee_fast.serving, "ray_serve", raising=False)
    assert cli_main(["serve", "--replicas", "2"]) == 1
    assert "pip install 'anee_fast[ray]'" in capsys.readouterr().err


def test_a_single_process_server_does_not_import_ray():
    code = ("import sys, anee_fast, anee_fast.cli, anee_fast.serving.server\n"
            "print([m for m in sys.modules if m == 'ray' or m.startswith('ray.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- hostile input and exposure, on a tiny model with a tiny tokenizer ---------------------------

@pytest.fixture(scope="module")
def tiny():
    """(llm, server): 4 layers, a tokenizer, request bodies that must arrive within 1 s."""
    llm = LLM(build_model("llama_gqa", 4), min_layers=1, tokenizer=tiny_tokenizer())
    with ServerThread(llm, model_name="tiny", body_timeout_s=1.0) as server:
        yield llm, server


TINY_OK = {"model": "tiny", "prompt": "hello world", "max_tokens": 2}


def _rejected(server, status):
    text = httpx.get(server.url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "anee_requests_rejected_total" and s.labels["status"] == str(status))


def _error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error["message"]


def _open_upload(server, length: int, first_bytes: bytes):
    """A raw connection that announced a `length`-byte body and sent only `first_bytes`."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {length}\r\n\r\n".encode() + first_bytes)
    return sock


def test_a_lone_surrogate_is_a_400_not_a_tokenizer_crash(tiny):
    llm, server = tiny
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello \ud800"}]}
    for body, path in [({**TINY_OK, "prompt": "hello \ud800"}, "/v1/completions"),
                       (chat, "/v1/chat/completions"),
                       ({**TINY_OK, "\udfff": 1}, "/v1/completions")]:
        # json.dumps sends each lone surrogate as its JSON escape (\ud800)
        assert "not valid Unicode" in _error(_post(server, body, path), 400)
    chat["messages"][0]["content"] = "hello \U0001F680"     # a pair, escaped as two surrogates
    assert _post(server, chat, "/v1/chat/completions").status_code == 200


def test_deeply_nested_json_is_a_400(tiny):
    llm, server = tiny
    assert "64 deep" in _error(_post(server, b"[" * 200_000), 400)
    nested = lambda depth: "[" * depth + "]" * depth   # noqa: E731
    too_deep = f'{{"model": "tiny", "prompt": "hi", "stop": {nested(64)}}}'.encode()
    assert "64 deep" in _error(_post(server, too_deep), 400)
    deep_enough = f'{{"model": "tiny", "prompt": "hi", "stop": {nested(63)}}}'.encode()
    assert "stop strings are not supported" in _error(_post(server, deep_enough), 400, "stop")


def test_an_upload_cut_short_is_a_client_disconnect_not_a_server_error(tiny, caplog):
    llm, server = tiny
    before = _rejected(server, 499), _rejected(server, 500)
    with caplog.at_level(logging.ERROR):
        _open_upload(server, 1000, b'{"model": "tiny", "prompt": ').close()
        deadline = time.monotonic() + 10
        while _rejected(server, 499) == before[0]:
            assert time.monotonic() < deadline, "the disconnect was not counted as status 499"
            time.sleep(0.05)
    assert _rejected(server, 500) == before[1]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(tiny):
    llm, server = tiny
    start = time.monotonic()
    with _open_upload(server, 100, b'{"model": ') as sock:
        response = b""
        while chunk := sock.recv(4096):     # until the server closes the connection
            response += chunk
    assert response.startswith(b"HTTP/1.1 408") and b"connection: close" in response.lower()
    assert b"did not arrive within 1 s" in response
    assert time.monotonic() - start < 5


def test_post_bodies_must_be_sent_as_json(tiny):
    llm, server = tiny
    before = _metrics(server)["anee_generation_tokens_total"]
    content = json.dumps(TINY_OK).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {} if content_type is None else {"content-type": content_type}
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = httpx.post(server.url + path, content=content, headers=headers)
            assert "application/json" in _error(r, 415)
    assert _metrics(server)["anee_generation_tokens_total"] == before     # nothing generated
    r = _post(server, TINY_OK, **{"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200


def test_seed_and_stream_take_their_json_types_only(tiny):
    llm, server = tiny
    sampled = {**TINY_OK, "temperature": 1.0}
    for seed in (2 ** 70, 2 ** 63, -1, "abc", "5", True, 1.5):
        _error(_post(server, {**sampled, "seed": seed}), 400, "seed")
    for seed in (0, 2 ** 63 - 1):
        assert _post(server, {**sampled, "seed": seed}).status_code == 200
    for stream in ("yes", "true", 1):
        _error(_post(server, {**TINY_OK, "stream": stream}), 400, "stream")
    _error(_post(server, {**TINY_OK, "max_tokens": True}), 400, "max_tokens")
    _error(_post(server, {**TINY_OK, "prompt": [1, True]}), 400, "prompt")


def test_controller_and_token_id_errors_name_their_field(tiny):
    llm, server = tiny
    message = _error(_post(server, {**TINY_OK, "controller": [0.5, 0.2]}), 400, "controller")
    assert "controller name" in message and "action codes" in message and ".str" not in message
    for controller in ([0, 1], [7] * 4, "no-such-controller", "/etc/passwd", {"a": 1}):
        _error(_post(server, {**TINY_OK, "controller": controller}), 400, "controller")
    assert _post(server, {**TINY_OK, "controller": [0, 1, 1, 2]}).status_code == 200
    for prompt in ([10 ** 7], [-1], [[1, 10 ** 7]]):
        assert "token ids" in _error(_post(server, {**TINY_OK, "prompt": prompt}), 400, "prompt")
    message = _error(_post(server, {**TINY_OK, "prompt": 5}), 400, "prompt")
    assert "token ids" in message and ".str" not in message


def test_the_server_honours_the_request_energy_budget(tiny):
    llm, server = tiny
    body = {**TINY_OK, "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    compute = {b: _post(server, {**body, "energy_budget": b}).json()["anee"]["compute"]
               for b in (0.5, 1.0)}
    assert compute[1.0] == pytest.approx(1.0)
    assert compute[0.5] <= llm.depth.effective_budget(0.5) + 1e-6 < 1.0


def test_a_request_prompt_budget_reads_its_prompt_at_that_budget(tiny):
    """prompt_budget 1.0: the prompt at full depth, the completion within energy_budget; the
    `anee` stats say both, and a bad value is a 400 naming the field."""
    llm, server = tiny
    body = {**TINY_OK, "max_tokens": 6, "ignore_eos": True, "temperature": 0,
            "energy_budget": 0.5}
    plain = _post(server, body).json()["anee"]
    full_prompt = _post(server, {**body, "prompt_budget": 1.0}).json()["anee"]
    assert plain["prompt_budget"] == 0.5 and full_prompt["prompt_budget"] == 1.0
    cap = llm.depth.effective_budget(0.5) + 1e-6
    assert plain["completion_compute"] <= cap and full_prompt["completion_compute"] <= cap
    n, traced = full_prompt["prompt_tokens"], full_prompt["tokens_run"]
    assert full_prompt["compute"] == pytest.approx(
        (n + full_prompt["completion_compute"] * (traced - n)) / traced, rel=1e-5)
    assert plain["compute"] < full_prompt["compute"]
    message = _error(_post(server, {**body, "prompt_budget": 2}), 400, "prompt_budget")
    assert "prompt_budget must be a number in [0, 1]" in message


def test_serving_beyond_loopback_needs_a_key_or_an_explicit_flag(tiny, monkeypatch, capsys):
    llm, _ = tiny
    is_loopback = server_module.is_loopback
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "192.168.1.7", "example.com"]))
    monkeypatch.setattr("anee_fast.cli._load_llm", lambda *a, **k: pytest.fail("model loaded"))
    for host in ("0.0.0.0", "::", "192.168.1.7"):
        assert cli_main(["serve", "--host", host]) == 1
        assert "--allow-unauthenticated" in capsys.readouterr().err
    assert cli_main(["serve", "--body-timeout", "0"]) == 1
    assert "--body-timeout" in capsys.readouterr().err
    runs = []
    monkeypatch.setattr(server_module.uvicorn, "run", lambda app, **kw: runs.append(kw["host"]))
    with pytest.raises(ValueError, match="no API key"):
        server_module.serve(llm, host="0.0.0.0")
    server_module.serve(llm, host="0.0.0.0", api_key="k")
    assert "WARNING" not in capsys.readouterr().err
    server_module.serve(llm, host="0.0.0.0", allow_unauthenticated=True)
    assert capsys.readouterr().err.count("WARNING: serving 0.0.0.0:8000 without an API key") == 1
    assert runs == ["0.0.0.0", "0.0.0.0"]


def test_metrics_have_no_energy_counter_on_the_cpu(tiny):
    llm, server = tiny
    if llm.weights.device.type != "cpu":
        pytest.skip("the model is on a GPU here")
    text = httpx.get(server.url + "/metrics").text
    assert "# anee_energy_joules_total unavailable: no CUDA GPU (the device is cpu)" in text
    assert "anee_energy_joules_total" not in _metrics(server)
    assert "anee_energy_joules" not in {f.name for f in text_string_to_metric_families(text)}


class _Counter:
    """An energy counter that has gone up by 250 mJ each time it is read."""
    update_period_s = 0.1

    def __init__(self):
        self.mj = 10_000_000

    def millijoules(self):
        self.mj += 250
        return self.mj


def test_metrics_export_the_energy_meters_joules_since_the_server_started():
    llm = LLM(build_model("llama_gqa", 2), min_layers=1)
    with ServerThread(llm, model_name="tiny", energy_meter=EnergyMeter(_Counter())) as server:
        text = httpx.get(server.url + "/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["anee_energy_joules"].type == "counter"
        assert "unavailable" not in text
        # Read once when the server started, then at each scrape: 250 mJ more each time.
        assert _metrics(server)["anee_energy_joules_total"] == pytest.approx(0.5)
        assert _metrics(server)["anee_energy_joules_total"] == pytest.approx(0.75)
