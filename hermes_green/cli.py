"""`hermes-green`: run the gateway, check a config, play the demo, or chat from the terminal.

User errors (config, data_dir) end with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import ConfigError, PlatformsConfig, load_config
from .store import StoreError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("hermes_green.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hermes-green",
        description="A gevent gateway that keeps an AI agent connected to WeCom, Feishu/Lark "
                    "and QQ Bot whatever the agent is doing.",
        epilog="Run `hermes-green demo` first: it needs no credentials and no network.")
    p.add_argument("--config", metavar="FILE", help="run the gateway with this config")
    p.add_argument("--version", action="version", version=f"hermes-green {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("check", help="validate the config, try each platform's auth, the LLM "
                                     "and the tool modules; exit non-zero on any failure")
    c.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="the config to check (may also come before the command)")
    c.add_argument("--full", action="store_true",
                   help="also open each connection and establish its session (for WeCom this "
                        "takes the bot over from a running gateway: use it before going live)")
    d = sub.add_parser("demo", help="start fake platforms and a fake LLM on loopback and run a "
                                    "real gateway against them (no credentials needed)")
    d.add_argument("--seconds", type=float, default=30.0, help="how long to run (default 30)")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    ch = sub.add_parser("chat", help="talk to the configured agent from the terminal, through "
                                     "the same session path as the platforms")
    ch.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                    help="the config to use (may also come before the command)")
    from .service_install import add_parser as add_service_parser
    add_service_parser(sub)
    return p


def _fail(message: str) -> int:
    for handler in logging.getLogger().handlers:
        handler.flush()  # log lines are written by a thread: let them out before the verdict
    sys.stderr.write(f"hermes-green: {message}\n")
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in ("check", "chat") and not args.config:
        parser.error(f"{args.command} needs --config FILE")
    try:
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(seconds=args.seconds, as_json=args.json)
        if args.command == "check":
            from .check import run_check
            return run_check(load_config(args.config), full=args.full)
        if args.command == "chat":
            return run_chat(load_config(args.config))
        if args.command == "service":
            from . import service_install
            return service_install.run(args)
        if args.config:
            return run_gateway(load_config(args.config))
    except (ConfigError, StoreError) as e:
        return _fail(str(e))
    _parser().print_help(sys.stderr)
    return EXIT_USAGE


def _configure_logging(config, *, level: str | None = None) -> None:
    from .logs import config_secrets, setup_logging
    setup_logging(level or config.gateway.log_level, config.gateway.log_format,
                  config_secrets(config))


def run_gateway(config) -> int:
    from .gateway import Gateway
    from .runtime import HubWatch, freeze_startup_heap
    _configure_logging(config)
    hub = HubWatch(threads=config.executors.threads,
                   max_blocking_time_s=config.gateway.max_blocking_time_s)
    gateway = Gateway(config, hub_watch=hub)
    gateway.start()
    if config.gateway.status.enabled:
        from .status import StatusServer, StatusServerError
        try:
            gateway.status_server = StatusServer(gateway, config.gateway.status).start()
        except StatusServerError as e:
            gateway.shutdown()
            return _fail(f"gateway.status: {e}")
    freeze_startup_heap()
    return gateway.serve_forever()


def run_chat(config) -> int:
    from .gateway import Gateway
    from .platforms.console import ConsoleAdapter
    _configure_logging(config, level="warning")  # the terminal is for the conversation
    console_cfg = config.model_copy(update={"platforms": PlatformsConfig()})
    import gevent.event
    made = gevent.event.AsyncResult()

    def make_console(cfg, on_message, **kw):
        made.set(ConsoleAdapter(cfg, on_message, **kw))
        return made.value

    gateway = Gateway(console_cfg, adapter_factories={"console": make_console})
    gateway.start()
    gateway.install_signal_handlers()
    made.get().eof.wait()
    gateway.wait_idle()
    gateway.shutdown()  # waits for the last turn and flushes its reply first
    return EXIT_OK
