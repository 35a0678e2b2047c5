"""The entry point: help lists every command; `chat` talks to the configured agent through the
same journal -> session -> outbox path as the platforms, and keeps history across runs."""
from hermes_green.testing.fake_llm import FakeLLM, text
from tests.support import run_cli, write_config


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("--config", "check", "demo", "chat"):
        assert word in result.stdout


def test_no_arguments_is_usage_exit_2():
    result = run_cli()
    assert result.returncode == 2 and "usage:" in result.stderr


def test_chat_answers_each_line_through_the_session_path(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {"gateway": {"data_dir": str(tmp_path / "data")}})
    result = run_cli("chat", "--config", str(cfg), stdin="hello there\nsecond line\n")
    assert result.returncode == 0, result.stderr
    assert "bot> echo: hello there" in result.stdout
    assert result.stdout.index("echo: hello there") < result.stdout.index("echo: second line")
    assert (tmp_path / "data" / "hermes-green.sqlite3").exists()


def test_chat_with_an_llm_keeps_history_between_runs(tmp_path):
    llm = FakeLLM(api_key="sk-chat-test").start()
    try:
        llm.script(text("Nice to meet you, Ada."), text("You are Ada."))
        cfg = write_config(tmp_path / "c.yaml", {
            "gateway": {"data_dir": str(tmp_path / "data")},
            "agent": {"base_url": llm.base_url, "api_key": "sk-chat-test", "model": "fake-model",
                      "tools": []}})
        first = run_cli("chat", "--config", str(cfg), stdin="I am Ada\n")
        second = run_cli("chat", "--config", str(cfg), stdin="who am I?\n")
    finally:
        llm.stop()
    assert "bot> Nice to meet you, Ada." in first.stdout
    assert "bot> You are Ada." in second.stdout
    sent = [m["content"] for m in llm.chat_requests[-1].body["messages"] if m["role"] != "system"]
    assert sent == ["I am Ada", "Nice to meet you, Ada.", "who am I?"]
