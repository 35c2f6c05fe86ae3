"""Two engine replicas on Ray Serve behind one OpenAI endpoint, on a local Ray started and
stopped here (CPU): the official `openai` client for plain, streamed, chat and mixed-budget
requests, each equal to offline `LLM.generate` (greedy and seeded sampling) whichever replica
served it; the single server's error bodies; /metrics adding up over both replicas under a
`replica` label and /health listing both; a client that closes its stream or its connection
aborts its request on its replica; a replica killed mid-load: every request completes or gets an error body in bounded
time, Ray starts a replacement, and no replica holds a KV block afterwards.
"""
import asyncio
import json
import os
import signal
import socket
import time

import httpx
import openai
import pytest
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from transformers import LlamaConfig, LlamaForCausalLM

from anee_fast import LLM, SamplingParams
from anee_fast.serving import ray_serve
from conftest import tiny_tokenizer

LLM_OPTIONS = {"min_layers": 1, "threads": 1}
PROMPTS = ["hello world", "the sky is blue", "blue sky", "hello"]
BUDGETS = [1.0, 0.5, 0.25]
LONG = 8000             # tokens of a request that must still be running when it is cut off


def _tiny_model_dir(path):
    """A 2-layer random Llama with a long context (requests that run for seconds) and the tiny
    tokenizer, saved where the replicas' processes load it."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                         intermediate_size=83, num_hidden_layers=2, vocab_size=101,
                         max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """(offline LLM on the same weights, base URL of 2 replicas behind the router)."""
    model = _tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20,
             log_to_driver=False)
    try:
        port = _free_port()
        app = ray_serve.deployment({"model": model, **LLM_OPTIONS}, {"model_name": "tiny"},
                                   replicas=2)
        ray_serve.start(app, port=port)
        yield LLM(model, **LLM_OPTIONS), f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _async_client(url):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _samples(url, name):
    """{replica: value} of an unlabelled-but-for-replica metric, summed over its other labels."""
    values = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == name:
                values[s.labels["replica"]] = values.get(s.labels["replica"], 0) + s.value
    return values


def _wait_until_idle(url, replicas=2, seconds=60.0) -> list:
    """The replicas' health once `replicas` of them are ok and none runs or holds anything."""
    deadline = time.monotonic() + seconds
    while True:
        health = httpx.get(url + "/health", timeout=30).json()
        live = health["replicas"]
        if len(live) == replicas and all(r["status"] == "ok" and r["running"] == r["waiting"]
                                         == r["kv_blocks_in_use"] == 0 for r in live):
            return live
        assert time.monotonic() < deadline, f"not idle: {health}"
        time.sleep(0.2)


def test_greedy_and_seeded_requests_equal_offline_generate(deployed):
    offline, url = deployed
    client = _client(url)
    for prompt in PROMPTS[:2]:
        ids = offline.tokenizer.encode(prompt)
        ref = offline.generate(ids, SamplingParams(max_tokens=8))[0]
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert out.choices[0].token_ids == ref.token_ids and out.choices[0].text == ref.text
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                                temperature=0, stream=True))
        assert [t for c in chunks for t in c.choices[0].token_ids] == ref.token_ids
        sampled = SamplingParams(max_tokens=8, temperature=0.9, top_k=20, seed=5)
        ref = offline.generate(ids, sampled)[0]
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                        temperature=0.9, seed=5, extra_body={"top_k": 20})
        assert out.choices[0].token_ids == ref.token_ids
    text = offline.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}],
                                                 add_generation_prompt=True, tokenize=False)
    ref = offline.generate(offline.tokenizer.encode(text, add_special_tokens=False),
                           SamplingParams(max_tokens=6))[0]
    out = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                         messages=[{"role": "user", "content": "hello"}])
    assert out.choices[0].message.content == ref.text
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_concurrent_mixed_budgets_add_up_over_both_replicas(deployed):
    offline, url = deployed
    _wait_until_idle(url)
    requests_before = sum(_samples(url, "anee_requests_total").values())
    tokens_before = sum(_samples(url, "anee_generation_tokens_total").values())
    cases = [(PROMPTS[i % len(PROMPTS)], BUDGETS[i % len(BUDGETS)]) for i in range(24)]
    refs = {case: offline.generate(offline.tokenizer.encode(case[0]),
                                   SamplingParams(max_tokens=12, ignore_eos=True),
                                   energy_budget=case[1])[0] for case in set(cases)}
    client = _async_client(url)

    async def one(prompt, budget):
        stream = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
            extra_body={"energy_budget": budget, "ignore_eos": True})
        chunks = [c async for c in stream]
        return [t for c in chunks for t in c.choices[0].token_ids], chunks[-1].anee

    async def run_all():
        try:
            return await asyncio.gather(*(one(*case) for case in cases))
        finally:
            await client.close()

    for case, (tokens, stats) in zip(cases, asyncio.run(run_all())):
        assert tokens == refs[case].token_ids, case
        assert stats["compute"] == pytest.approx(refs[case].trace.mean_compute)
    _wait_until_idle(url)
    served = _samples(url, "anee_requests_total")
    assert sum(served.values()) == requests_before + len(cases)
    assert len(served) == 2 and min(served.values()) > 0        # both replicas served
    assert sum(_samples(url, "anee_generation_tokens_total").values()) == \
        tokens_before + 12 * len(cases)
    saved = _samples(url, "anee_compute_saved_total")
    assert set(saved) == set(served) and sum(saved.values()) > 0
    assert set(_samples(url, "anee_kv_blocks_in_use")) == set(served)


def test_errors_keep_the_single_servers_bodies(deployed):
    _, url = deployed
    ok = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    for body, status, param in [({**ok, "model": "gpt-4"}, 404, "model"),
                                ({**ok, "energy_budget": 1.5}, 400, "energy_budget"),
                                ({**ok, "controller": "nope"}, 400, "controller"),
                                ({**ok, "prompt": "x" * (2 << 20)}, 413, None)]:
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == status, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert r.json()["error"]["param"] == param
    r = httpx.post(url + "/v1/completions", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["message"]
    assert httpx.get(url + "/v1/nothing-here").json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="energy_budget"):
        _client(url).completions.create(model="tiny", prompt="hello", max_tokens=2,
                                        extra_body={"energy_budget": 2})
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and len(health["replicas"]) == 2
    rejected = {s.labels["status"]: s.value for f in text_string_to_metric_families(
        httpx.get(url + "/metrics").text) for s in f.samples
        if s.name == "anee_requests_rejected_total" and s.labels["replica"] == "router"}
    assert rejected["413"] >= 1                 # refused by the router, before any replica


def _disconnect_mid_stream(url, body):
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())


def _give_up_on_a_plain_request(url, body):
    """Sends the request on a socket and closes it once a replica runs the request."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (host.encode(), len(payload), payload))
        deadline = time.monotonic() + 30
        while not any(r["running"] for r in httpx.get(url + "/health").json()["replicas"]):
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.05)


@pytest.mark.parametrize("give_up", [_disconnect_mid_stream, _give_up_on_a_plain_request])
def test_a_client_that_gives_up_aborts_on_its_replica(deployed, give_up):
    _, url = deployed
    _wait_until_idle(url)
    aborted = sum(_aborted(url).values())
    body = {"model": "tiny", "prompt": "hello", "max_tokens": LONG, "ignore_eos": True,
            "temperature": 0}
    give_up(url, body)
    _wait_until_idle(url, seconds=20)
    assert sum(_aborted(url).values()) == aborted + 1        # not run to its end


def _aborted(url):
    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.labels["replica"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "anee_requests_total"
            and s.labels.get("finish_reason") == "abort"}


def test_a_replica_killed_mid_load_loses_no_request(deployed):
    _, url = deployed
    before = {r["replica"] for r in _wait_until_idle(url)}
    client = _async_client(url)
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 300, "temperature": 0,
            "extra_body": {"ignore_eos": True}}

    async def one(i):
        """'ok', or the error an OpenAI error body (or stream error event) became."""
        try:
            if i % 2:
                stream = await client.completions.create(**body, stream=True)
                tokens = [t async for c in stream for t in c.choices[0].token_ids]
            else:
                tokens = (await client.completions.create(**body)).choices[0].token_ids
            assert len(tokens) == 300
            return "ok"
        except openai.APIStatusError as e:      # a non-2xx answer with its error body
            assert e.status_code >= 500 and "replica" in e.message and e.body, e
            return "error body"
        except openai.APIError as e:            # an error event ending a started stream
            assert not isinstance(e, openai.APIConnectionError), e
            assert "replica" in e.message, e
            return "error event"

    async def kill_a_busy_replica():
        while True:
            async with httpx.AsyncClient() as http:
                health = (await http.get(url + "/health", timeout=30)).json()
            busy = [r for r in health["replicas"] if r.get("running")]
            if busy:
                os.kill(busy[0]["pid"], signal.SIGKILL)
                return busy[0]["replica"]
            await asyncio.sleep(0.05)

    async def run_all():
        try:
            work = asyncio.gather(*(one(i) for i in range(32)))
            killed = await asyncio.wait_for(kill_a_busy_replica(), 60)
            return killed, await asyncio.wait_for(work, 180)       # no request hangs
        finally:
            await client.close()

    killed, outcomes = asyncio.run(run_all())
    assert outcomes.count("ok") > 0 and outcomes.count("ok") < len(outcomes), outcomes
    after = {r["replica"] for r in _wait_until_idle(url, seconds=120)}    # blocks 0 everywhere
    assert killed in before and killed not in after and len(after - before) == 1
    out = _client(url).completions.create(model="tiny", prompt="hello", max_tokens=3)
    assert len(out.choices[0].token_ids) == 3


def test_autoscaling_bounds_and_reservations_reach_the_engine_deployment():
    """--min/--max-replicas and --target-ongoing-requests become the engine deployment's
    autoscaling config (the router stays one replica); without bounds the count is fixed."""
    app = ray_serve.deployment({"model": "m", "max_num_seqs": 8}, {}, replicas=2, min_replicas=1,
                               max_replicas=3, num_cpus=0.5, num_gpus=0.25)
    engine = app._bound_deployment.init_args[0]._bound_deployment
    scaling = engine._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (1, 2, 3)
    assert scaling.target_ongoing_requests == 4                  # half of max_num_seqs
    assert engine.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert engine.max_ongoing_requests == 16
    fixed = ray_serve.deployment({"model": "m"}, {}, replicas=5, target_ongoing_requests=7)
    engine = fixed._bound_deployment.init_args[0]._bound_deployment
    assert engine.num_replicas == 5 and engine._deployment_config.autoscaling_config is None
