"""`hermes-green`: run the gateway, check a config, play the demo, or chat from the terminal.

User errors (config, data_dir) end with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .config import ConfigError, PlatformsConfig, load_config
from .store import StoreError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("hermes_green.cli")

# Commands whose options are defined in their own module, imported only when the command line
# names the command: a gateway never needs plistlib, getpass or the hermes-agent importer (they
# cost its start-up 1.5 MB and 17 ms). Help lists them all the same.
ON_DEMAND_COMMANDS = {
    "service": ("service_install", "install or remove a systemd unit (Linux) or launchd job "
                                   "(macOS) that runs the gateway"),
    "import-hermes": ("import_hermes", "write a config (and an env file with its secrets) from "
                                       "hermes-agent's config.yaml and .env"),
}


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hermes-green",
        description="A gevent gateway that keeps an AI agent connected to WeCom, Feishu/Lark "
                    "and QQ Bot whatever the agent is doing.",
        epilog="Run `hermes-green demo` first: it needs no credentials and no network.")
    p.add_argument("--config", metavar="FILE", help="run the gateway with this config")
    p.add_argument("--role", choices=("all", "gateway", "worker"), default="all",
                   help="with gateway.store on Redis: gateway (platform connections, no turns), "
                        "worker (turns, no connections) or all (default)")
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
    pa = sub.add_parser("pairing", help="list, approve or revoke users who asked to talk to a "
                                         "bot with dm_policy: pairing (works while it runs)")
    pa.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                    help="the gateway's config (its data_dir holds the pairings)")
    pa_sub = pa.add_subparsers(dest="pairing_command", metavar="ACTION", required=True)
    ls = pa_sub.add_parser("list", help="pending codes and approved users")
    ap = pa_sub.add_parser("approve", help="let the user who was given CODE talk to the bot")
    ap.add_argument("code")
    rv = pa_sub.add_parser("revoke", help="forget USER: their next message needs a new code")
    rv.add_argument("user")
    rv.add_argument("--bot", metavar="KEY", help="only on this bot (e.g. telegram, qqbot/sales)")
    for action in (ls, ap, rv):
        action.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                            help="the gateway's config (may also come before the action)")
    rl = sub.add_parser("reload", help="make the running gateway read its config again "
                                       "(validated first; only changed bots reconnect)")
    rl.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                    help="the gateway's config file (may also come before the command)")
    for command, (module, help_text) in ON_DEMAND_COMMANDS.items():
        if command in argv:
            importlib.import_module(f".{module}", __package__).add_parser(sub, help_text)
        else:
            sub.add_parser(command, help=help_text)
    return p


def _fail(message: str) -> int:
    for handler in logging.getLogger().handlers:
        handler.flush()  # log lines are written by a thread: let them out before the verdict
    sys.stderr.write(f"hermes-green: {message}\n")
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(argv)
    args = parser.parse_args(argv)
    if args.command in ("check", "chat", "pairing", "reload") and not args.config:
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
        if args.command == "import-hermes":
            from . import import_hermes
            return import_hermes.run(args)
        if args.command == "service":
            from . import service_install
            return service_install.run(args)
        if args.command == "pairing":
            return run_pairing(load_config(args.config), args)
        if args.command == "reload":
            return run_reload(load_config(args.config))
        if args.config:
            config = load_config(args.config)
            if args.role != "all" and not config.gateway.store:
                return _fail(f"--role {args.role} needs gateway.store: redis://... (processes "
                             f"share work through Redis; without it one process does all)")
            return run_gateway(config, config_path=args.config, role=args.role)
    except (ConfigError, StoreError) as e:
        return _fail(str(e))
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _configure_logging(config, *, level: str | None = None) -> None:
    from .logs import config_secrets, setup_logging
    setup_logging(level or config.gateway.log_level, config.gateway.log_format,
                  config_secrets(config))


def run_gateway(config, config_path: str | None = None, role: str = "all") -> int:
    from . import reload as reloading
    from .gateway import Gateway
    from .runtime import HubWatch, freeze_startup_heap
    _configure_logging(config)
    hub = HubWatch(threads=config.executors.threads,
                   max_blocking_time_s=config.gateway.max_blocking_time_s)
    gateway = Gateway(config, hub_watch=hub, config_path=config_path, role=role)
    gateway.start()
    if config.gateway.status.enabled:
        from .status import StatusServer, StatusServerError
        try:
            gateway.status_server = StatusServer(gateway, config.gateway.status).start()
        except StatusServerError as e:
            gateway.shutdown()
            return _fail(f"gateway.status: {e}")
    freeze_startup_heap()
    gateway.install_signal_handlers()  # SIGHUP reloads: installed before anyone can find us
    pid_file = reloading.write_pid_file(config.gateway.data_dir)
    try:
        return gateway.serve_forever()
    finally:
        reloading.remove_pid_file(pid_file)


def _open_store(config):
    """The gateway's store (the SQLite file, or Redis with gateway.store), for the commands
    that work beside a running gateway."""
    from .store_base import make_store
    store = make_store(config.gateway)
    path = getattr(store, "path", None)
    if path is not None and not path.exists():
        raise StoreError(f"{path}: no database yet (has the gateway run with this "
                         f"config's data_dir?)")
    return store.open()


def run_pairing(config, args) -> int:
    """`pairing list | approve CODE | revoke USER`: rows in the data_dir's SQLite file, which
    the running gateway reads for each message of a user it does not know otherwise."""
    import time
    from .access import normalize_code
    store = _open_store(config)
    try:
        if args.pairing_command == "list":
            rows = store.pairing_list()
            now = time.time()
            for r in rows:
                if r["state"] == "approved":
                    print(f"approved  {r['bot']}  user={r['user_id']}")  # cli-output
                else:
                    left = (r["expires_at"] or 0) - now
                    when = f"expires in {int(left // 60)} min" if left > 0 else "expired"
                    line = f"pending   {r['bot']}  user={r['user_id']}  code={r['code']}  {when}"
                    print(line)  # cli-output
            if not rows:
                print("no pairings")  # cli-output
            return EXIT_OK
        if args.pairing_command == "approve":
            code = normalize_code(args.code)
            outcome, bot, user = store.pairing_approve(code) if code else ("unknown", None, None)
            if outcome == "approved":
                print(f"approved: {user} may now talk to {bot}")  # cli-output
                return EXIT_OK
            if outcome == "expired":
                sys.stderr.write(f"hermes-green: pairing code {code} has expired; the user gets "
                                 f"a new one with their next message\n")
                return EXIT_FAILED
            sys.stderr.write("hermes-green: no pending pairing has that code (see "
                             "`hermes-green pairing list`)\n")
            return EXIT_FAILED
        removed = store.pairing_revoke(args.user, args.bot)
        if not removed:
            sys.stderr.write(f"hermes-green: {args.user} is not paired"
                             f"{' with ' + args.bot if args.bot else ''}\n")
            return EXIT_FAILED
        bots = "1 bot" if removed == 1 else f"{removed} bots"
        print(f"revoked: {args.user} ({bots})")  # cli-output
        return EXIT_OK
    finally:
        store.close(checkpoint=False)


def run_reload(config) -> int:
    """The file was just validated (load_config); signal the gateway running on its data_dir
    and report what it did."""
    from . import reload as reloading
    store = _open_store(config)
    try:
        ok, detail = reloading.request_reload(
            config.gateway.data_dir, lambda: store.meta_get(reloading.LAST_RELOAD_KEY))
    except reloading.ReloadError as e:
        sys.stderr.write(f"hermes-green: {e}\n")
        return EXIT_FAILED
    finally:
        store.close(checkpoint=False)
    if not ok:
        sys.stderr.write(f"hermes-green: reload refused: {detail}\n")
        return EXIT_FAILED
    print(f"reloaded: {detail}")  # cli-output
    return EXIT_OK


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
