"""Remote chat (studio/remote_chat.py and `studio chat --server`) against a real `studio serve` app."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from test_server_api import Served, free_port

from studio.client import EngineClient, EngineOptions
from studio.paths import Paths
from studio.remote_chat import ENV_KEY, RemoteChat, RemoteChatError, load_key, normalise_base
from studio.server import ServerConfig, create_app
from studio.server.catalog import BUNDLED_ID

TOKEN = "remote-token-98765"


@pytest.fixture(scope="module")
def base():
    client = EngineClient(Paths.default(), EngineOptions(device="cpu"))
    client.start()
    port = free_port()
    served = Served(create_app(ServerConfig(port=port, token=TOKEN), client), port)
    yield f"http://127.0.0.1:{port}"
    served.stop()
    client.close()


def test_base_urls_are_normalised_to_v1():
    assert normalise_base("http://h:8000") == normalise_base("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(RemoteChatError):
        normalise_base("h:8000")


def test_models_are_listed_and_answers_stream(base):
    with RemoteChat(base, TOKEN) as remote:
        assert BUNDLED_ID in [m["id"] for m in remote.models()]
        pieces = list(remote.stream(BUNDLED_ID, [{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0))
        assert pieces and "".join(pieces) == remote.last.text
        assert remote.last.finish_reason in ("stop", "length")


def test_a_bad_key_says_so(base):
    with RemoteChat(base, "not-the-token") as remote, pytest.raises(RemoteChatError) as e:
        remote.models()
    assert e.value.kind == "bad_key" and "key" in str(e.value)


def test_an_unknown_model_says_so(base):
    with RemoteChat(base, TOKEN) as remote, pytest.raises(RemoteChatError) as e:
        list(remote.stream("nope", [{"role": "user", "content": "Hi"}]))
    assert e.value.kind == "not_found" and "nope" in str(e.value)


def test_a_refused_connection_says_so():
    with RemoteChat(f"http://127.0.0.1:{free_port()}") as remote, pytest.raises(RemoteChatError) as e:
        remote.models()
    assert e.value.kind == "refused" and "running" in str(e.value)


def test_a_server_that_never_answers_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    conns = []
    t = threading.Thread(target=lambda: conns.append(listener.accept()), daemon=True)
    t.start()
    try:
        with RemoteChat(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5) as remote, \
                pytest.raises(RemoteChatError) as e:
            remote.models()
        assert e.value.kind == "timeout"
    finally:
        listener.close()


def test_the_environment_key_comes_first(monkeypatch):
    monkeypatch.setenv(ENV_KEY, "from-env")
    assert load_key("http://anything:1") == "from-env"


def test_studio_chat_server_answers_from_the_served_model(base):
    env = {**os.environ, ENV_KEY: TOKEN}
    cmd = [sys.executable, "-m", "studio", "chat", "--server", base, "--model", BUNDLED_ID,
           "--max-tokens", "5", "--temperature", "0", "--json", "Hello"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["text"] and answer["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"]
    listed = subprocess.run([sys.executable, "-m", "studio", "chat", "--server", base, "--list-models"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert BUNDLED_ID in listed.stdout
    bad = subprocess.run([sys.executable, "-m", "studio", "chat", "--server", base, "--api-key", "wrong-key-1",
                          "Hi"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and "refused the API key" in bad.stderr
