"""`studio serve` driven by the official openai client: one uvicorn server and one engine per module."""

from __future__ import annotations

import array
import base64
import io
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import openai
import pytest
import uvicorn

from studio.client import EngineClient, EngineOptions
from studio.paths import Paths
from studio.server import ServerConfig, create_app
from studio.server.catalog import BUNDLED_ID
from studio.server.openai_api import Plan, chat_body, check_json
from studio.server.tool_calls import parse_tool_calls

TOKEN = "test-token-123456"
MAX_BODY = 256 << 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, app, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from sd_fixtures import tiny_sd1

    from studio.library.detect import detect
    from studio.library.library import Library

    tmp = tmp_path_factory.mktemp("serve")
    ckpt = tiny_sd1(tmp / "tiny.safetensors")
    with Library() as lib:
        if lib.get("tiny-sd") is None:  # toy shapes: tell detection what it is, as the image tab test does
            lib.add(ckpt, name="tiny-sd", detection=replace(detect(ckpt), family="sd1", role="checkpoint"))
    client = EngineClient(Paths.default(), EngineOptions(device="cpu", settings={"outputs": str(tmp / "out")}))
    client.start()
    cancelled: list[str] = []
    client.add_listener(lambda m: cancelled.append(m["job_id"]) if m.type == "cancelled" else None)
    port = free_port()
    config = ServerConfig(port=port, token=TOKEN, max_body_bytes=MAX_BODY, max_tokens=1024)
    app = create_app(config, client)
    served = Served(app, port)
    base = f"http://127.0.0.1:{port}"
    yield {"base": base, "client": client, "cancelled": cancelled, "app": app, "port": port}
    served.stop()
    client.close()


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


def chat(oai, content: str, **kw):
    return oai.chat.completions.create(model=BUNDLED_ID, messages=[{"role": "user", "content": content}],
                                       temperature=0, **kw)


def test_models_lists_the_bundled_chat_model_and_the_installed_image_model(oai):
    models = {m.id: m for m in oai.models.list().data}
    assert models[BUNDLED_ID].kind == "chat"
    assert models["tiny-sd"].kind == "image"


def test_chat_answers_with_usage_and_the_same_text_when_streamed(oai):
    full = chat(oai, "Name a fruit.", max_tokens=6)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 6 and full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(chat(oai, "Name a fruit.", max_tokens=6, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same answer, token for token
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_completions_continue_a_raw_prompt(oai):
    r = oai.completions.create(model=BUNDLED_ID, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens <= 4
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=BUNDLED_ID, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_unknown_model_is_a_404_in_openai_shape(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and BUNDLED_ID in e.value.body["message"]


def test_wrong_or_missing_token_is_401(stack):
    bad = openai.OpenAI(base_url=stack["base"] + "/v1", api_key="wrong-token-0000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.get(stack["base"] + "/v1/models")
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(stack["base"] + "/health").json()["status"] == "ok"  # health needs no token


def test_too_large_body_is_413(oai, stack):
    with pytest.raises(openai.APIStatusError) as e:
        chat(oai, "x" * (MAX_BODY + 10), max_tokens=1)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    # chunked (no Content-Length): counted while reading
    body = iter([b'{"model": "' + BUNDLED_ID.encode() + b'", "messages": "', b"x" * MAX_BODY, b'"}'])
    r = httpx.post(stack["base"] + "/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 413


def test_n_above_one_and_max_tokens_above_the_limit_are_refused(oai):
    with pytest.raises(openai.BadRequestError) as e:
        chat(oai, "hi", n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        chat(oai, "hi", max_tokens=100000)
    assert e.value.body["code"] == "max_tokens_exceeded"


def test_embeddings_are_normalised_and_equal_for_equal_texts(oai):
    r = oai.embeddings.create(model=BUNDLED_ID, input=["a red apple", "quantum field theory", "a red apple"])
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and len(vecs[0]) == 576  # SmolLM2-135M's hidden size
    dot = [sum(a * b for a, b in zip(vecs[0], v, strict=True)) for v in vecs]
    assert abs(dot[0] - 1) < 1e-4 and abs(dot[2] - 1) < 1e-4 and dot[1] < 0.999
    assert r.usage.prompt_tokens > 6
    b64 = oai.embeddings.create(model=BUNDLED_ID, input="a red apple", encoding_format="base64")
    decoded = array.array("f", base64.b64decode(b64.data[0].embedding))  # little-endian float32, as OpenAI's
    assert list(decoded) == pytest.approx(vecs[0], abs=1e-6)


def test_client_disconnect_mid_stream_cancels_the_engine_job(stack):
    client, cancelled = stack["client"], stack["cancelled"]
    before = len(cancelled)
    body = {"model": BUNDLED_ID, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 1000, "stream": True, "temperature": 0.8}
    with httpx.stream("POST", stack["base"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break  # leave mid-answer: closing the connection is all a client does
    deadline = time.monotonic() + 30
    while len(cancelled) == before:
        assert time.monotonic() < deadline, "the engine job was not cancelled after the client left"
        time.sleep(0.1)
    client.request_status()
    time.sleep(0.5)
    assert client.last_status["running"] is None and client.last_status["queue"] == []
    assert stack["app"].state.api.bridge.active() == 0


def test_image_generation_returns_pngs_as_b64(oai):
    from PIL import Image

    r = oai.images.generate(model="tiny-sd", prompt="a fox", size="64x64", n=2, response_format="b64_json",
                            extra_body={"steps": 2, "seed": 3})
    assert len(r.data) == 2
    for d in r.data:
        img = Image.open(io.BytesIO(base64.b64decode(d.b64_json)))
        assert img.size == (64, 64) and img.format == "PNG"
    with pytest.raises(openai.BadRequestError):  # a chat model cannot draw
        oai.images.generate(model=BUNDLED_ID, prompt="a fox", size="64x64")


def test_json_mode_answers_json_or_says_it_could_not(oai):
    try:
        r = chat(oai, "Give a JSON object with a key 'fruit'.", max_tokens=24,
                 response_format={"type": "json_object"})
    except openai.InternalServerError as e:  # a 135M model may not manage: then it must say so
        assert e.body["code"] == "invalid_json_output"
    else:
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_check_json_accepts_objects_and_reports_the_rest():
    assert check_json('{"a": 1}') is None and check_json('```json\n{"a": 1}\n```') is None
    assert check_json("Sure! {\"a\": 1}").code == "invalid_json_output"
    assert check_json("[1, 2]").code == "invalid_json_output"


# -- tool calls ---------------------------------------------------------------------------------

def test_hermes_tool_calls_are_parsed_and_removed_from_the_text():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    rest, calls = parse_tool_calls(text, {"get_weather"})
    assert rest == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"})]
    _, two = parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>'
                              '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>', {"a", "b"})
    assert [c.name for c in two] == ["a", "b"] and two[0].id != two[1].id


def test_llama3_json_tool_calls_are_parsed():
    _, calls = parse_tool_calls('<|python_tag|>{"name": "search", "parameters": {"q": "a;b"}}; '
                                '{"name": "search", "parameters": {"q": "c"}}', {"search"})
    assert [json.loads(c.arguments)["q"] for c in calls] == ["a;b", "c"]


def test_undeclared_functions_and_broken_json_stay_text():
    for text in ('{"name": "rm_rf", "parameters": {}}', '<tool_call>{"name": "get_weather", </tool_call>',
                 "The weather is fine."):
        rest, calls = parse_tool_calls(text, {"get_weather"})
        assert calls == [] and rest == text


def test_a_crafted_tool_call_becomes_openai_tool_calls():
    plan = Plan("chatcmpl-x", "m", tool_names={"get_weather"})
    result = {"text": '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
              "finish_reason": "stop", "prompt_tokens": 10, "completion_tokens": 12, "seed": 1}
    choice = chat_body(result, plan)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tools_are_rendered_by_the_models_own_template():
    from studio.engine.pipelines.complete import render
    from studio.protocol import CompletionJob

    class Model:  # the attributes render() reads of a loaded ChatModel
        chat_template, bos_token, eos_token = TOOL_TEMPLATE, "", ""

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    text, notes = render(Model(), CompletionJob(messages=messages, tools=[tool]))
    assert '# Tools\n{"type": "function"' in text and notes == []
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text
    assert "<|im_start|>tool\nsunny" in text
    Model.chat_template = None  # no tool section: the tools go into the system prompt instead
    text, notes = render(Model(), CompletionJob(messages=messages[:1], tools=[tool]))
    assert "get_weather" in text and "<tool_call>" in text and notes


def test_a_tool_conversation_runs_end_to_end_on_the_bundled_model(oai):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny, 20 C"}]
    r = oai.chat.completions.create(model=BUNDLED_ID, messages=messages, tools=tools, max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


# -- load ---------------------------------------------------------------------------------------

LOAD_REQUESTS = 50
PROMPTS = ["Say hi.", "Count to three.", "Name a colour.", "Name an animal.", "Say bye."]


def test_fifty_concurrent_streams_all_complete_unmixed(stack, oai):
    """Greedy answers: every stream of the same prompt must be identical, so a token that went to the
    wrong request shows. The figures go to docs/PERFORMANCE.md."""

    def one(i: int) -> tuple[int, str, float, float, str]:
        t0 = time.perf_counter()
        first, parts, finish = None, [], None
        for c in chat(oai, PROMPTS[i % len(PROMPTS)], max_tokens=4, stream=True):
            if c.choices and c.choices[0].delta.content:
                first = first or time.perf_counter()
                parts.append(c.choices[0].delta.content)
            if c.choices and c.choices[0].finish_reason:
                finish = c.choices[0].finish_reason
        assert finish in ("stop", "length")
        end = time.perf_counter()
        return i, "".join(parts), (first or end) - t0, end - t0, c.id

    t0 = time.perf_counter()
    with ThreadPoolExecutor(LOAD_REQUESTS) as pool:
        results = list(pool.map(one, range(LOAD_REQUESTS)))
    wall = time.perf_counter() - t0
    assert len(results) == LOAD_REQUESTS and len({r[4] for r in results}) == LOAD_REQUESTS
    by_prompt: dict[int, set] = {}
    for i, text, *_ in results:
        by_prompt.setdefault(i % len(PROMPTS), set()).add(text)
    assert all(len(texts) == 1 for texts in by_prompt.values()), by_prompt
    assert len({next(iter(t)) for t in by_prompt.values()}) > 1
    lat = sorted(r[3] for r in results)
    ttft = sorted(r[2] for r in results)
    print(f"\nLOAD {LOAD_REQUESTS} streams: wall {wall:.1f} s, {LOAD_REQUESTS / wall:.2f} req/s, "
          f"latency p50 {statistics.median(lat):.1f} s p95 {lat[int(0.95 * len(lat)) - 1]:.1f} s, "
          f"first token p50 {statistics.median(ttft):.1f} s")
    assert httpx.get(stack["base"] + "/health").json()["active"] == 0
