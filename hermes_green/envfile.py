"""`.env` files: reading hermes-agent's, writing ours.

Reading follows python-dotenv, which hermes-agent loads its `~/.hermes/.env` with
(NousResearch/hermes-agent hermes_cli/config.py `get_env_path`; .env.example shows the shapes):
`KEY=value` lines, `export KEY=value`, blank lines and `#` comments; an unquoted value ends at
` #` (an inline comment); 'single quotes' are literal; "double quotes" take \\n, \\t, \\" and
\\\\ escapes; unquoted and double-quoted values expand `${NAME}` and `${NAME:-default}` from the
lines above (dotenv also looks at the process environment; an import must not depend on the
shell it runs in, so a name not defined above is reported instead). What dotenv would accept
but this reader cannot read with certainty (a quoted value spanning lines, text after a closing
quote) is a problem, reported by line number and key, never by value.

Writing: `KEY='value'` lines that systemd's EnvironmentFile=, a POSIX shell (`set -a; . FILE`)
and service_install.read_env_file all read the same way; a value with a single quote, a line
break or a NUL cannot be written so and is refused. The file is created with mode 0600.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

MAX_BYTES = 1 << 20
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")
_EXPAND = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


class EnvFileError(Exception):
    """The file cannot be read or written as asked. `problems` holds one line each (no values);
    next step: fix those lines (or move those values by hand)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse(text: str, *, source: str = ".env") -> dict[str, str]:
    """KEY -> value, later lines winning (as in dotenv); EnvFileError lists every bad line."""
    values: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _LINE.match(raw)
        if m is None:
            problems.append(f"{source} line {number}: not KEY=value")
            continue
        key, rest = m.group(1), m.group(2).strip()
        try:
            values[key] = _value(rest, values)
        except ValueError as e:
            problems.append(f"{source} line {number}: {key}: {e}")
    if problems:
        raise EnvFileError(problems)
    return values


def _value(rest: str, known: dict[str, str]) -> str:
    if rest[:1] == "'":
        end = rest.find("'", 1)
        if end < 0:
            raise ValueError("the quoted value does not end on its line")
        _after_quote(rest[end + 1:])
        return rest[1:end]
    if rest[:1] == '"':
        out, i = [], 1
        while i < len(rest):
            c = rest[i]
            if c == "\\" and i + 1 < len(rest):
                out.append(_ESCAPES.get(rest[i + 1], "\\" + rest[i + 1]))
                i += 2
                continue
            if c == '"':
                _after_quote(rest[i + 1:])
                return _expand("".join(out), known)
            out.append(c)
            i += 1
        raise ValueError("the quoted value does not end on its line")
    value = re.split(r"\s#", rest, maxsplit=1)[0].strip()
    return _expand(value, known)


def _after_quote(tail: str) -> None:
    tail = tail.strip()
    if tail and not tail.startswith("#"):
        raise ValueError("unexpected text after the closing quote")


def _expand(value: str, known: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in known:
            return known[name]
        if default is not None:
            return default
        raise ValueError(f"refers to ${{{name}}}, which is not defined above it")
    return _EXPAND.sub(repl, value)


def read(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise EnvFileError([f"{path}: not found"]) from None
    except OSError as e:
        raise EnvFileError([f"{path}: cannot read it ({e.strerror or type(e).__name__})"]) \
            from None
    if len(data) > MAX_BYTES:
        raise EnvFileError([f"{path}: larger than {MAX_BYTES // 1024} KiB; not an env file"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise EnvFileError([f"{path}: not UTF-8 text"]) from None
    return parse(text, source=str(path))


def render(values: dict[str, str], header: str = "") -> str:
    """The file's text; EnvFileError names each value that cannot be written safely."""
    problems = [f"{key}: the value holds a single quote, a line break or a NUL; move it by hand"
                for key, value in values.items()
                if any(c in value for c in "'\n\r\0")]
    problems += [f"{key}: not a variable name" for key in values if not NAME.match(key)]
    if problems:
        raise EnvFileError(problems)
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [f"{key}='{value}'" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte (a temporary file in the same
    directory, renamed over the target)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
