"""The Chat tab on an OpenAI-compatible server: a real `studio serve` app in front of the bundled model,
added through the model list's "Add server…", streamed answers, Stop, history/search/export, clear errors."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import dataclasses  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
from PySide6.QtCore import QObject, QTimer, Signal  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402
from test_server_api import Served, free_port  # noqa: E402

from studio.client import EngineClient, EngineOptions  # noqa: E402
from studio.paths import Paths  # noqa: E402
from studio.server import ServerConfig, create_app  # noqa: E402
from studio.server.catalog import BUNDLED_ID  # noqa: E402
from studio.settings import Settings  # noqa: E402
from studio.ui.chat.servers import ADD_SERVER, AddServerDialog, split_server_model  # noqa: E402

TOKEN = "chat-servers-token-1234"


class NoEngine(QObject):
    """The tab's local engine; these tests use only servers, so a job reaching it is a bug."""

    message = Signal(object)

    def submit(self, job, job_id=None):
        raise AssertionError(f"a server chat went to the local engine: {job}")

    def cancel(self, job_id):
        raise AssertionError("cancel went to the local engine")


@pytest.fixture(scope="module")
def served():
    client = EngineClient(Paths.default(), EngineOptions(device="cpu"))
    client.start()
    cancelled: list[str] = []
    client.add_listener(lambda m: cancelled.append(m["job_id"]) if m.type == "cancelled" else None)
    port = free_port()
    server = Served(create_app(ServerConfig(port=port, token=TOKEN), client), port)
    yield {"base": f"http://127.0.0.1:{port}", "cancelled": cancelled}
    server.stop()
    client.close()


@pytest.fixture
def tab(qtbot, tmp_path, monkeypatch):
    from studio.ui.chat.chat_tab import ChatTab

    monkeypatch.delenv("STUDIO_API_KEY", raising=False)
    paths = dataclasses.replace(Paths.default(), data=tmp_path / "data", config=tmp_path / "config").ensure()
    t = ChatTab(NoEngine(), paths, Settings())
    qtbot.addWidget(t)
    t.resize(1000, 700)
    t.show()
    yield t
    t.shutdown()


def add_server_from_the_model_list(qtbot, tab, url: str, key: str) -> AddServerDialog:
    """Choose "Add server…" in the model list and fill the dialog as a user would."""
    seen: list[AddServerDialog] = []

    def fill() -> None:
        dialog = QApplication.activeModalWidget()
        assert isinstance(dialog, AddServerDialog)
        seen.append(dialog)
        dialog.url.setText(url)
        dialog.key.setText(key)
        dialog.buttons.accepted.emit()  # OK

    QTimer.singleShot(50, fill)
    index = tab.model_combo.findData(ADD_SERVER)
    assert index >= 0, "the model list offers Add server…"
    tab.model_combo.setCurrentIndex(index)
    tab.model_combo.activated.emit(index)  # runs the dialog until it closes
    return seen[0]


def ask(qtbot, tab, text: str, max_tokens: int, temperature: float = 0.0) -> None:
    tab.settings_panel.fields["temperature"].setValue(temperature)
    tab.settings_panel.fields["max_tokens"].setValue(max_tokens)
    tab.settings_panel.flush()
    tab.input.setPlainText(text)
    tab.send()


def test_a_server_added_in_the_chat_tab_streams_answers_into_the_same_history(qtbot, tab, served, tmp_path):
    base = served["base"]
    dialog = add_server_from_the_model_list(qtbot, tab, base, TOKEN)
    assert dialog.ids and BUNDLED_ID in dialog.ids
    model = tab.model_combo.currentData()
    assert split_server_model(model) == (f"{base}/v1", BUNDLED_ID)
    assert tab.settings.chat_servers == [f"{base}/v1"]
    assert Settings.load(tab.paths).chat_servers == [f"{base}/v1"]  # saved; the key is not
    assert TOKEN not in (tab.paths.config / "settings.json").read_text()

    tab.new_chat()
    assert tab.store.thread(tab.thread_id).model == model
    with qtbot.waitSignal(tab.answer_finished, timeout=120000) as done:
        ask(qtbot, tab, "What is the capital of France?", max_tokens=12)
        qtbot.waitUntil(lambda: tab.ui_updates > 0, timeout=60000)  # streamed in, not at the end
    msg_id, status = done.args
    assert status == "done"
    answer = tab.store.message(msg_id)
    assert "Paris" in answer.content
    assert answer.stats["model"] == BUNDLED_ID and answer.stats["completion_tokens"] > 0
    assert tab.view.bubbles[msg_id].msg.content == answer.content
    # the same history, search and export as local chats
    assert {h.thread_id for h in tab.search("capital France")} == {tab.thread_id}
    exported = tab.export_thread(tab.thread_id, tmp_path / "chat.json", "json")
    data = json.loads(exported.read_text())
    assert "Paris" in json.dumps(data) and BUNDLED_ID in json.dumps(data)


def test_stop_ends_a_server_answer_and_the_server_cancels_its_job(qtbot, tab, served):
    add_server_from_the_model_list(qtbot, tab, served["base"], TOKEN)
    tab.new_chat()
    before = len(served["cancelled"])
    with qtbot.waitSignal(tab.answer_finished, timeout=120000) as done:
        ask(qtbot, tab, "Write a long story about a dragon who learns to bake bread.", max_tokens=800,
            temperature=0.8)
        qtbot.waitUntil(lambda: tab.ui_updates >= 3, timeout=60000)
        assert tab.busy and tab.send_button.text() == "Stop"
        tab.stop()
    msg_id, status = done.args
    assert status == "stopped" and not tab.busy
    assert tab.store.message(msg_id).content  # what came is kept
    qtbot.waitUntil(lambda: len(served["cancelled"]) > before, timeout=30000)  # the connection drop reached it


def test_a_refused_connection_says_so(qtbot, tab):
    dead = f"http://127.0.0.1:{free_port()}"
    dialog = AddServerDialog(tab.servers, tab)
    qtbot.addWidget(dialog)
    dialog.url.setText(dead)
    dialog.check()
    qtbot.waitUntil(lambda: dialog.buttons.isEnabled(), timeout=20000)
    assert "Could not connect" in dialog.status.text() and "Is the server running" in dialog.status.text()
    assert not tab.settings.chat_servers  # nothing added
    dialog.url.setText("ftp://nope")
    dialog.check()
    assert "not an http(s) URL" in dialog.status.text()

    # a thread whose server went away: the answer fails with the same clear words, the tab stays usable
    tab.new_chat()
    tab.store.update_thread(tab.thread_id, model=f"{dead}/v1 · {BUNDLED_ID}")
    tab.open_thread(tab.thread_id)
    assert "(not connected)" in tab.model_combo.currentText()
    with qtbot.waitSignal(tab.answer_finished, timeout=30000) as done:
        ask(qtbot, tab, "Hello?", max_tokens=8)
    msg_id, status = done.args
    assert status == "error"
    error = tab.store.message(msg_id).error
    assert error["kind"] == "refused" and "Could not connect" in error["message"]
    assert not tab.busy and tab.send_button.text() == "Send"


def test_a_wrong_key_says_so(qtbot, tab, served):
    dialog = AddServerDialog(tab.servers, tab)
    qtbot.addWidget(dialog)
    dialog.url.setText(served["base"])
    dialog.key.setText("wrong-key-000000")
    dialog.check()
    qtbot.waitUntil(lambda: dialog.buttons.isEnabled(), timeout=20000)
    assert "refused the API key" in dialog.status.text()
    assert not tab.settings.chat_servers


# -- the window's own API (Settings > Serve API) -------------------------------------------------------

def test_serve_api_toggle_serves_the_windows_engine(qtbot, tmp_path, monkeypatch):
    import httpx

    from studio.ui.main_window import MainWindow
    from studio.ui.settings_dialog import SettingsDialog

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    paths = Paths.default().ensure()
    settings = Settings.load(paths)
    settings.device = "cpu"
    win = MainWindow(paths, settings)
    qtbot.addWidget(win)
    assert not win.api.running and not win.api_status.isVisibleTo(win)
    port = free_port()

    def toggle(on: bool):
        def exec_(dialog) -> int:  # the user ticks the box (and sets the port) and presses Save
            dialog.api_serve.setChecked(on)
            dialog.api_port.setValue(port)
            return SettingsDialog.DialogCode.Accepted

        monkeypatch.setattr(SettingsDialog, "exec", exec_)
        win.open_settings()

    try:
        toggle(True)
        assert win.api.running and win.api.address == f"http://127.0.0.1:{port}"
        assert win.api_status.isVisibleTo(win)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["status"] == "ok"
        assert Settings.load(paths).api_serve is True  # kept for the next start
        # a request through the window's engine is counted in the status line
        win.engine.start()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                       json={"model": BUNDLED_ID, "max_tokens": 4,
                             "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        win.api_status.refresh()
        text = win.api_status.label.text()
        assert f"http://127.0.0.1:{port}/v1" in text and "1 request served" in text
        win.api_status.copy_example()
        example = QApplication.clipboard().text()
        assert example.startswith(f"curl http://127.0.0.1:{port}/v1/chat/completions") and BUNDLED_ID in example

        toggle(False)
        assert not win.api.running and not win.api_status.isVisibleTo(win)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        win.close()


def test_a_port_in_use_is_reported(qtbot):
    import socket

    from studio.ui.api_status import ApiServer, ApiStatus

    class Client:
        state = "stopped"

        def add_listener(self, fn):
            pass

        def remove_listener(self, fn):
            pass

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        api = ApiServer(Client())
        status = ApiStatus(api, BUNDLED_ID)
        qtbot.addWidget(status)
        assert api.start(port) is False
        assert f"127.0.0.1:{port}" in api.error and "Choose another port" in api.error
        assert "API off" in status.label.text()
