"""What an idle gateway holds: a WeCom + QQ gateway, connected, has imported only what it runs
(commands, other stores, other platforms and psutil stay out: each costs start-up time and
RSS, bench/footprint.py). Checked in a real gateway process against the fakes."""
import json
import os
import signal
import subprocess
import sys

from hermes_green.testing.fleet import FakeFleet, Keepalive
from tests.support import ROOT, wait_until, write_config

# Each is imported only on a path a WeCom + QQ gateway at idle does not take.
NOT_AT_IDLE = (
    "psutil",  # the pid file and gevent's memory watch (runtime._start_monitoring_thread)
    "difflib",  # config: "did you mean" for an unknown key
    "hermes_green.service_install", "plistlib", "getpass",  # `hermes-green service`
    "hermes_green.import_hermes",  # `hermes-green import-hermes`
    "hermes_green.store_redis", "redis", "hermes_green.cluster",  # gateway.store: redis://
    "hermes_green.status", "prometheus_client",  # gateway.status, and /metrics when read
    "hermes_green.platforms.webchat", "hermes_green.webmount",
    "hermes_green.platforms.feishu", "hermes_green.platforms.telegram",
    "hermes_green.platforms.discord", "hermes_green.platforms.slack",
    "hermes_green.platforms.dingtalk",
    "cryptography",  # WeCom's media decryption, when a message carries a file
    "multiprocessing",  # nothing: the process pool is hermes_green.agent.executors' own
    "requests", "urllib3",  # fetch_url and `check` only; REST and the LLM go through rest.py
    "importlib.metadata",  # pydantic's plugin scan (runtime._without_pydantic_plugin_scan)
)


def test_a_connected_wecom_and_qq_gateway_has_not_imported_what_it_does_not_run(tmp_path):
    fleet = FakeFleet(("wecom", "qqbot"), keepalive=Keepalive(5.0, 30.0)).start()
    out = tmp_path / "modules.json"
    cfg = write_config(tmp_path / "c.yaml", {
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "agent": fleet.agent_config(tools=["hermes_green.agent.builtin_tools"]),
        "platforms": fleet.platforms_config()})
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakes" / "idle_modules.py"),
                             str(cfg), str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: fleet.connected("wecom") and fleet.connected("qqbot"), timeout=30,
                   what="both platforms connected")
        os.kill(proc.pid, signal.SIGUSR2)
        wait_until(out.exists, timeout=10, what="the gateway's module list")
        held = json.loads(out.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        fleet.stop()
    modules = set(held["modules"])
    # it is the running gateway that answered, with both platforms and the agent loaded
    assert {"hermes_green.gateway", "hermes_green.platforms.wecom", "hermes_green.platforms.qqbot",
            "hermes_green.agent.loop", "hermes_green.agent.builtin_tools"} <= modules
    assert held["monitor_thread"]  # the blocking monitor still runs without the memory watch
    loaded = sorted(m for m in modules for name in NOT_AT_IDLE
                    if m == name or m.startswith(name + "."))
    assert not loaded, loaded


def test_the_pid_files_start_time_is_psutils_even_for_an_odd_process_name():
    """/proc/<pid>/stat holds the process name in parentheses, and a name may hold spaces and
    parentheses of its own: the start time must still be the one psutil reads (the reload
    command compares the two to tell our gateway from a process that reused its pid)."""
    code = ("import ctypes, sys; sys.path.insert(0, sys.argv[1])\n"
            "ctypes.CDLL(None).prctl(15, b'a b) (c', 0, 0, 0)  # PR_SET_NAME\n"
            "import psutil\n"
            "from hermes_green.reload import own_start_time\n"
            "print(own_start_time(), psutil.Process().create_time(), psutil.Process().name())\n")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split(maxsplit=2)
    ours, theirs, name = float(out[0]), float(out[1]), out[2].strip()
    assert name == "a b) (c"
    assert ours == theirs
