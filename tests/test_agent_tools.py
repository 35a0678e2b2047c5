"""The @tool decorator, schemas, validation, the registry, and the built-in tools."""
import json

import gevent.pywsgi
import pytest

from hermes_green import metrics
from hermes_green.agent import builtin_tools
from hermes_green.agent.builtin_tools import calculate, current_time, fetch_url
from hermes_green.agent.executors import Executors
from hermes_green.agent.tools import (ToolDefinitionError, ToolRegistry, call_tool, get_spec,
                                      tool)
from hermes_green.config import ConfigError
from tests.fakes import sample_tools as sample


@pytest.fixture(scope="module")
def executors():
    ex = Executors(processes=1)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def registry():
    return ToolRegistry.from_modules(["tests.fakes.sample_tools",
                                      "hermes_green.agent.builtin_tools"])


# -- decorator and schema ------------------------------------------------------------------------

def test_decorator_keeps_the_function_callable_and_defaults_to_thread():
    @tool
    def plain(x: int) -> int:
        """Double it."""
        return 2 * x
    assert plain(2) == 4
    spec = get_spec(plain)
    assert (spec.name, spec.executor, spec.timeout_s, spec.description) == \
        ("plain", "thread", 60.0, "Double it.")


def test_schema_comes_from_type_hints_and_docstring():
    schema = get_spec(sample.typed).openai_schema()
    fn = schema["function"]
    assert schema["type"] == "function" and fn["name"] == "typed"
    assert fn["description"] == "Check argument validation and schemas."
    params = fn["parameters"]
    assert params["type"] == "object"
    assert params["required"] == ["count", "names"]
    props = params["properties"]
    assert props["count"] == {"type": "integer", "description": "how many"}
    assert props["names"] == {"type": "array", "items": {"type": "string"},
                              "description": "who is involved; may be long"}
    assert props["ratio"]["type"] == "number" and props["ratio"]["default"] == 0.5
    assert props["mode"] == {"type": "string", "default": "fast"}
    assert params.get("additionalProperties") is False


def test_schema_for_a_tool_without_parameters():
    params = get_spec(sample.whoami).parameters_schema
    assert params["type"] == "object" and params["properties"] == {}


@pytest.mark.parametrize("options, match", [
    ({"executor": "gpu"}, "executor must be one of"),
    ({"timeout_s": 0}, "timeout_s must be > 0"),
    ({"name": "has space"}, "use letters, digits"),
])
def test_bad_decorator_options_fail_at_definition(options, match):
    with pytest.raises(ToolDefinitionError, match=match):
        @tool(**options)
        def f(x: int) -> int:
            return x


def test_a_process_tool_must_be_module_level():
    with pytest.raises(ToolDefinitionError, match="module-level"):
        @tool(executor="process")
        def nested(x: int) -> int:
            return x


def test_missing_hints_and_star_args_fail_when_registered():
    @tool
    def untyped(x):
        return x

    @tool
    def star(*args: int):
        return args
    with pytest.raises(ToolDefinitionError, match="needs a type hint"):
        ToolRegistry([untyped])
    with pytest.raises(ToolDefinitionError, match=r"\*args"):
        ToolRegistry([star])


# -- registry ------------------------------------------------------------------------------------

def test_registry_finds_every_tool_in_the_listed_modules(registry):
    names = registry.names()
    assert {"whoami", "typed", "calculate", "current_time", "fetch_url"} <= set(names)
    assert len(registry.schemas()) == len(names)


def test_a_missing_tool_module_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as info:
        ToolRegistry.from_modules(["hermes_green.agent.builtin_tools", "no_such_tools_mod"])
    assert str(info.value) == \
        "agent.tools: cannot import module 'no_such_tools_mod' (ModuleNotFoundError)"


def test_two_tools_with_one_name_are_refused():
    @tool(name="whoami")
    def other() -> str:
        return ""
    reg = ToolRegistry.from_modules(["tests.fakes.sample_tools"])
    with pytest.raises(ToolDefinitionError, match="defined twice"):
        reg.add(other)


# -- one call ------------------------------------------------------------------------------------

def test_arguments_are_validated_and_coerced_before_the_call(registry, executors):
    ok = call_tool(registry, executors, "typed", json.dumps({"count": "3", "names": ["a", "b"]}))
    assert ok.ok and ok.content == "3:a,b:0.5:fast"
    for args, match in [({"names": []}, "count: Field required"),
                        ({"count": "many", "names": []}, "count: Input should be a valid integer"),
                        ({"count": 1, "names": [], "extra": 1}, "extra: Extra inputs"),
                        ("{not json", "not valid JSON"),
                        ("[1, 2]", "must be a JSON object")]:
        res = call_tool(registry, executors, "typed", args if isinstance(args, str) else json.dumps(args))
        assert not res.ok and res.content.startswith("Error: invalid arguments for typed:")
        assert match in res.content


def test_failures_become_tool_results_and_never_raise(registry, executors):
    res = call_tool(registry, executors, "raises", '{"message": "boom"}')
    assert (res.ok, res.content) == (False, "Error: raises failed: RuntimeError: boom")
    res = call_tool(registry, executors, "slow_thread", '{"seconds": 1}')
    assert not res.ok and "did not finish within 0.2 s" in res.content
    res = call_tool(registry, executors, "fail_in_child", '{"message": "bad input"}')
    assert not res.ok and res.content == "Error: fail_in_child failed: ValueError: bad input"
    res = call_tool(registry, executors, "nope", "{}")
    assert not res.ok and "no tool named 'nope'" in res.content and "whoami" in res.content


def test_a_huge_result_is_truncated(registry, executors):
    res = call_tool(registry, executors, "huge_result", '{"size": 100000}')
    assert res.ok and res.content.startswith("x" * 16000)
    assert res.content.endswith("[truncated: the result had 100000 characters, "
                                "only the first 16000 are shown]")


def test_non_text_results_are_json(registry, executors):
    res = call_tool(registry, executors, "whoami", None)
    assert json.loads(res.content)["runtime_imported"] is False


def test_tool_duration_is_recorded_with_its_executor(registry, executors):
    labels = {"tool": "typed", "executor": "inline"}
    before = metrics.REGISTRY.get_sample_value("hermes_green_tool_seconds_count", labels) or 0
    call_tool(registry, executors, "typed", '{"count": 1, "names": []}')
    assert metrics.REGISTRY.get_sample_value("hermes_green_tool_seconds_count", labels) == before + 1


# -- built-in tools ------------------------------------------------------------------------------

@pytest.mark.parametrize("expr, expected", [
    ("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("2 ** 10", "1024"), ("7 // 2", "3"),
    ("7 % 3", "1"), ("-3 + +1", "-2"), ("1 / 4", "0.25"), ("sqrt(16) + abs(-2)", "6"),
    ("factorial(20)", "2432902008176640000"), ("round(pi, 3)", "3.142"), ("max(1, 5, 3)", "5"),
    ("2 ** 100", str(2 ** 100)),
])
def test_calculate(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr, match", [
    ("__import__('os').system('true')", "unknown function"),
    ("(1).__class__", "not allowed"), ("x + 1", "unknown name"), ("'a' * 3", "only numbers"),
    ("1 / 0", "division by zero"), ("10 ** 10 ** 10", "too large"), ("9 ** 99999", "too large"),
    ("factorial(10000)", "factorial takes"), ("[1, 2]", "not allowed"), ("1 +", "not a valid"),
    ("lambda: 1", "not allowed"), ("1" * 600, "longer than"), ("True + 1", "only numbers"),
])
def test_calculate_refuses(expr, match):
    with pytest.raises(ValueError, match=match):
        calculate(expr)


def test_current_time():
    out = current_time("Asia/Shanghai")
    assert "+08:00" in out and out.endswith(", Asia/Shanghai)")
    with pytest.raises(ValueError, match="unknown time zone"):
        current_time("Mars/Olympus")


@pytest.fixture
def web():
    pages = {
        "/page": ("200 OK", "text/html; charset=utf-8",
                  "<html><head><title>T</title><style>p{}</style></head><body><h1>Hello</h1>"
                  "<script>alert(1)</script><p>caf&eacute; &amp; more</p></body></html>"),
        "/big": ("200 OK", "text/plain", "y" * 1_000_000),
        "/moved": ("302 Found", "text/plain", ""),
        "/bin": ("200 OK", "application/octet-stream", "\x00\x01"),
        "/missing": ("404 Not Found", "text/plain", "no"),
    }

    def app(environ, start_response):
        status, ctype, body = pages[environ["PATH_INFO"]]
        headers = [("Content-Type", ctype)]
        if environ["PATH_INFO"] == "/moved":
            headers.append(("Location", "/page"))
        start_response(status, headers)
        return [body.encode()]
    server = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.stop()


def test_fetch_url_returns_text(web, monkeypatch):
    monkeypatch.setattr(builtin_tools, "ALLOW_PRIVATE_ADDRESSES", True)
    text = fetch_url(f"{web}/moved")
    assert "Hello" in text and "café & more" in text
    assert "alert" not in text and "p{}" not in text and "<" not in text
    big = fetch_url(f"{web}/big", max_chars=5000)
    assert big.startswith("y" * 5000) and big.endswith("[... cut at 5000 characters]")
    assert "not a text document" in fetch_url(f"{web}/bin")
    with pytest.raises(ValueError, match="HTTP 404"):
        fetch_url(f"{web}/missing")


def test_fetch_url_reads_at_most_the_byte_limit(web, monkeypatch):
    monkeypatch.setattr(builtin_tools, "ALLOW_PRIVATE_ADDRESSES", True)
    monkeypatch.setattr(builtin_tools, "MAX_FETCH_BYTES", 1000)
    assert len(fetch_url(f"{web}/big", max_chars=20000)) == 1000


def test_fetch_url_refuses_internal_addresses_and_other_schemes(web):
    with pytest.raises(ValueError, match="non-public address"):
        fetch_url(f"{web}/page")
    with pytest.raises(ValueError, match="non-public address"):
        fetch_url("http://169.254.169.254/latest/meta-data/")
    with pytest.raises(ValueError, match="only http"):
        fetch_url("file:///etc/passwd")
