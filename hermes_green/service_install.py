"""`hermes-green service install|uninstall [--user]`: run the gateway under the OS's service
manager, with this installation's paths filled in.

- Linux: a systemd unit, `/etc/systemd/system/hermes-green.service` (or with `--user`
  `~/.config/systemd/user/`). The process gets SIGTERM and `TimeoutStopSec` to drain; it is
  restarted on failure, with a start limit so a config error does not loop forever.
- macOS: a launchd job, `/Library/LaunchDaemons/hermes-green.plist` (or with `--user`
  `~/Library/LaunchAgents/`). `KeepAlive: {SuccessfulExit: false}` restarts it only after a
  failure (a drained SIGTERM exits 0), `ExitTimeOut` gives the drain its time before SIGKILL,
  stdout and stderr go to log files, `EnvironmentVariables` sets PATH and unbuffered output.
  launchd has no environment file: with `--env-file` the job runs `/bin/sh` to read it
  (`set -a; . FILE`) and then execs the gateway, so a changed secret needs only a restart.

The stop timeout is `gateway.drain_timeout_s` from the config plus STOP_MARGIN_S (the outbox
flush, closing connections and tool workers); the config is loaded at install time for it, so a
broken config is refused then, not at the first start. Paths: this interpreter (a venv's python
stays a venv path), `bin/hermes-green` in a checkout or `python -m hermes_green` when installed,
the config and env file made absolute, the working directory defaulting to the config's
directory (a relative `gateway.data_dir` is resolved from there).

Nothing is started: the commands that enable the service are printed. `--platform` and
`--target-dir` choose another manager or directory (tests, packaging); `uninstall` removes the
unit and, for systemd, the `*.wants/` links `systemctl enable` made.
"""
from __future__ import annotations

import getpass
import os
import plistlib
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, load_config

NAME = "hermes-green"  # the systemd unit name and the launchd label
STOP_MARGIN_S = 45  # beyond drain_timeout_s: outbox flush (<= 10 s), closing connections/workers
RESTART_DELAY_S = 5
LAUNCHD_THROTTLE_S = 10
MANAGERS = ("systemd", "launchd")


class ServiceInstallError(ConfigError):
    """The install cannot be done as asked (one line; exit 2, like a config error)."""


@dataclass(frozen=True)
class ServiceSpec:
    manager: str  # systemd | launchd
    user: bool  # a per-user service (systemd --user, LaunchAgent) instead of a system one
    program: tuple[str, ...]  # the command up to (not including) --config
    config: Path
    working_dir: Path
    stop_timeout_s: int
    env_file: Path | None = None
    log_dir: Path | None = None  # launchd only; systemd logs to the journal
    run_as: str | None = None  # system services only: the account the gateway runs as

    @property
    def command(self) -> list[str]:
        return [*self.program, "--config", str(self.config)]


# -- where things go ------------------------------------------------------------------------------

def detect_manager(platform: str = sys.platform) -> str:
    if platform.startswith("linux"):
        return "systemd"
    if platform == "darwin":
        return "launchd"
    raise ServiceInstallError(f"no service manager known for {platform} "
                              f"(use --platform {' or '.join(MANAGERS)})")


def default_target_dir(manager: str, user: bool) -> Path:
    home = Path.home()
    if manager == "systemd":
        if user:
            config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
            return config_home / "systemd" / "user"
        return Path("/etc/systemd/system")
    return home / "Library" / "LaunchAgents" if user else Path("/Library/LaunchDaemons")


def default_log_dir(user: bool) -> Path:
    return Path.home() / "Library" / "Logs" / NAME if user else Path("/Library/Logs") / NAME


def unit_path(manager: str, target_dir: Path) -> Path:
    return target_dir / (f"{NAME}.service" if manager == "systemd" else f"{NAME}.plist")


def program_args(python: str | None = None) -> tuple[str, ...]:
    """How to start hermes-green from here: the checkout's bin/ script, else the package."""
    python = os.path.abspath(python or sys.executable)  # not resolved: a venv stays a venv
    script = Path(__file__).resolve().parent.parent / "bin" / NAME
    if script.is_file():
        return (python, str(script))
    return (python, "-m", "hermes_green")


# -- rendering ------------------------------------------------------------------------------------

def _systemd_quote(arg: str) -> str:
    """One ExecStart word: `%` and `$` escaped, quoted when it has spaces or quotes."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if any(c in arg for c in ' \t"\'\\;'):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def render_systemd(spec: ServiceSpec) -> str:
    lines = [
        f"# {NAME}: written by `{NAME} service install{' --user' if spec.user else ''}`.",
        "# SIGTERM drains running turns (gateway.drain_timeout_s) and flushes the outbox;",
        "# TimeoutStopSec leaves room for that before systemd sends SIGKILL.",
        "[Unit]",
        "Description=hermes-green chat gateway",
    ]
    if not spec.user:  # a user manager cannot order itself after system targets
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        "# A config error exits 2 every time: stop retrying after 10 failures in 5 minutes.",
        "StartLimitIntervalSec=300",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={' '.join(_systemd_quote(a) for a in spec.command)}",
        f"WorkingDirectory={_systemd_quote(str(spec.working_dir))}",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if spec.env_file is not None:
        lines.append(f"EnvironmentFile={_systemd_quote(str(spec.env_file))}")
    if spec.run_as and not spec.user:
        lines.append(f"User={spec.run_as}")
    lines += [
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY_S}",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={spec.stop_timeout_s}",
        "NoNewPrivileges=yes",
        "UMask=0077",
        "LimitNOFILE=65536",
        "",
        "[Install]",
        f"WantedBy={'default.target' if spec.user else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def launchd_job(spec: ServiceSpec) -> dict:
    program = spec.command
    if spec.env_file is not None:  # launchd reads no env file: a shell does, then execs
        program = ["/bin/sh", "-c", 'set -a; . "$0"; set +a; exec "$@"', str(spec.env_file),
                   *program]
    log_dir = spec.log_dir or default_log_dir(spec.user)
    job = {
        "Label": NAME,
        "ProgramArguments": program,
        "WorkingDirectory": str(spec.working_dir),
        "EnvironmentVariables": {
            "PATH": f"{Path(spec.program[0]).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "PYTHONUNBUFFERED": "1"},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a failure, not after a drain
        "ThrottleInterval": LAUNCHD_THROTTLE_S,
        "ExitTimeOut": spec.stop_timeout_s,
        "StandardOutPath": str(log_dir / "gateway.out.log"),
        "StandardErrorPath": str(log_dir / "gateway.err.log"),
    }
    if spec.run_as and not spec.user:
        job["UserName"] = spec.run_as
    return job


def render_launchd(spec: ServiceSpec) -> bytes:
    return plistlib.dumps(launchd_job(spec), sort_keys=False)


def enable_commands(spec: ServiceSpec, path: Path) -> list[str]:
    if spec.manager == "systemd":
        ctl = "systemctl --user" if spec.user else "systemctl"
        journal = f"journalctl {'--user ' if spec.user else ''}-u {NAME} -f"
        commands = [f"{ctl} daemon-reload", f"{ctl} enable --now {NAME}.service",
                    f"{ctl} status {NAME}.service", journal]
        if spec.user:
            commands.append("loginctl enable-linger \"$USER\"   # keep it running after logout")
        return commands
    domain = "gui/$(id -u)" if spec.user else "system"
    sudo = "" if spec.user else "sudo "
    log_dir = spec.log_dir or default_log_dir(spec.user)
    return [f"{sudo}launchctl bootstrap {domain} {path}",
            f"{sudo}launchctl print {domain}/{NAME}",
            f"tail -f {log_dir / 'gateway.err.log'}"]


def disable_commands(manager: str, user: bool) -> list[str]:
    if manager == "systemd":
        ctl = "systemctl --user" if user else "systemctl"
        return [f"{ctl} stop {NAME}.service", f"{ctl} daemon-reload"]
    return [f"{'' if user else 'sudo '}launchctl bootout "
            f"{'gui/$(id -u)' if user else 'system'}/{NAME}"]


# -- install / uninstall --------------------------------------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (`export `, quotes and comments allowed), for checking the config."""
    env: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def build_spec(*, manager: str, user: bool, config: str, env_file: str | None = None,
               working_dir: str | None = None, log_dir: str | None = None,
               run_as: str | None = None, python: str | None = None) -> ServiceSpec:
    """Resolve paths and load the config (ConfigError when it cannot be used)."""
    config_path = Path(config).expanduser().resolve()
    env = dict(os.environ)
    env_path = None
    if env_file:
        env_path = Path(env_file).expanduser().resolve()
        try:
            env.update(read_env_file(env_path))
        except (OSError, UnicodeDecodeError) as e:
            raise ServiceInstallError(f"--env-file {env_path}: cannot read it "
                                      f"({type(e).__name__})") from None
    loaded = load_config(config_path, env=env)
    if not user and run_as is None:
        run_as = os.environ.get("SUDO_USER") or getpass.getuser()
    return ServiceSpec(
        manager=manager, user=user, program=program_args(python), config=config_path,
        working_dir=Path(working_dir).expanduser().resolve() if working_dir
        else config_path.parent,
        stop_timeout_s=int(loaded.gateway.drain_timeout_s + STOP_MARGIN_S + 0.999),
        env_file=env_path,
        log_dir=(Path(log_dir).expanduser().resolve() if log_dir else
                 default_log_dir(user) if manager == "launchd" else None),
        run_as=None if run_as == "root" else run_as)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")  # cli-output


def install(args) -> int:
    manager = args.platform or detect_manager()
    spec = build_spec(manager=manager, user=args.user, config=args.config,
                      env_file=args.env_file, working_dir=args.working_dir,
                      log_dir=args.log_dir, run_as=args.run_as)
    target = Path(args.target_dir).expanduser() if args.target_dir else \
        default_target_dir(manager, args.user)
    path = unit_path(manager, target)
    data = render_systemd(spec).encode() if manager == "systemd" else render_launchd(spec)
    existed = path.exists()
    try:
        if spec.log_dir is not None:
            spec.log_dir.mkdir(parents=True, exist_ok=True)  # launchd creates no directories
        _write(path, data)
    except OSError as e:
        hint = " (run it with sudo, or pass --user)" if not args.user else ""
        raise ServiceInstallError(f"cannot write {path}: {e.strerror or type(e).__name__}"
                                  f"{hint}") from None
    _out(f"{'updated' if existed else 'wrote'} {path}")
    _out(f"  runs: {' '.join(spec.command)}")
    _out(f"  in:   {spec.working_dir}   stop timeout: {spec.stop_timeout_s} s")
    if not args.user and spec.run_as is None:
        _out("  note: it runs as root; pass --run-as USER to run it as an unprivileged account")
    _out("enable and start it with:")
    for command in enable_commands(spec, path):
        _out(f"  {command}")
    return 0


def uninstall(args) -> int:
    manager = args.platform or detect_manager()
    target = Path(args.target_dir).expanduser() if args.target_dir else \
        default_target_dir(manager, args.user)
    path = unit_path(manager, target)
    removed = []
    try:
        if manager == "systemd":  # what `systemctl disable` would remove
            for link in target.glob(f"*.wants/{path.name}"):
                if link.is_symlink():
                    link.unlink()
                    removed.append(link)
        if path.exists():
            path.unlink()
            removed.append(path)
    except OSError as e:
        raise ServiceInstallError(f"cannot remove {path}: {e.strerror or type(e).__name__}"
                                  f"{'' if args.user else ' (run it with sudo)'}") from None
    if not removed:
        _out(f"nothing to remove: {path} does not exist")
        return 0
    for p in removed:
        _out(f"removed {p}")
    _out("stop the running service with:")
    for command in disable_commands(manager, args.user):
        _out(f"  {command}")
    return 0


def add_parser(sub, help_text: str) -> None:
    """The `service` command for cli.py's subparsers (its one-line help is cli.py's)."""
    sv = sub.add_parser("service", help=help_text)
    actions = sv.add_subparsers(dest="service_action", metavar="ACTION", required=True)
    inst = actions.add_parser("install", help="write the unit with this installation's paths "
                                              "and print the commands that enable it")
    inst.add_argument("--config", metavar="FILE", required=True)
    inst.add_argument("--env-file", metavar="FILE",
                      help="VAR=value lines for the config's ${VAR} (secrets); read at each start")
    inst.add_argument("--working-dir", metavar="DIR", help="default: the config's directory")
    inst.add_argument("--run-as", metavar="USER",
                      help="system services: the account to run as (default: the sudo user)")
    inst.add_argument("--log-dir", metavar="DIR", help="launchd: where stdout/stderr go")
    rm = actions.add_parser("uninstall", help="remove the unit (and systemd's enable links)")
    for p in (inst, rm):
        p.add_argument("--user", action="store_true",
                       help="a per-user service (systemd --user / LaunchAgent), no root needed")
        p.add_argument("--platform", choices=MANAGERS,
                       help="the service manager (default: systemd on Linux, launchd on macOS)")
        p.add_argument("--target-dir", metavar="DIR", help="write the unit here instead")


def run(args) -> int:
    return install(args) if args.service_action == "install" else uninstall(args)
