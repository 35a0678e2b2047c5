"""Executors: inline, thread and process; timeouts, crashes and kills never hang a caller."""
import os
import signal

import gevent
import gevent.socket
import gevent.monkey
import pytest

from hermes_green.agent import demo_tools
from hermes_green.agent.executors import (ExecutorClosed, ExecutorError, Executors,
                                          RemoteToolError, ToolTimeout, WorkerCrashed)
from tests.fakes import sample_tools as sample

_get_ident = gevent.monkey.get_original("_thread", "get_ident")


@pytest.fixture
def executors():
    ex = Executors(threads=4, processes=2)
    yield ex
    ex.close()


def run(ex, fn, *args, timeout_s=10.0, executor=None):
    return ex.run(executor or fn.__hermes_tool__.executor, fn, args, timeout_s=timeout_s)


def test_process_tool_runs_in_a_niced_unpatched_worker(executors):
    info = run(executors, sample.whoami)
    assert info["pid"] != os.getpid()
    assert info["runtime_imported"] is False and info["gevent_imported"] is False
    assert info["nice"] >= min(19, os.nice(0) + 10)
    if hasattr(os, "SCHED_IDLE"):  # Linux: a waking gateway preempts the worker at once
        assert info["policy"] == os.SCHED_IDLE
    assert run(executors, demo_tools.count_primes, 100) == 25


def test_process_workers_start_lazily_and_run_calls_in_parallel(executors):
    assert executors.processes.workers == []
    calls = [gevent.spawn(run, executors, sample.whoami) for _ in range(2)]
    gevent.joinall(calls, raise_error=True)
    assert len({g.value["pid"] for g in calls}) == 2
    assert len(executors.processes.workers) == 2


def test_hanging_process_tool_is_killed_at_its_timeout_and_the_pool_recovers(executors):
    first = run(executors, sample.whoami)["pid"]
    with pytest.raises(ToolTimeout, match="within 0.2 s"):
        run(executors, sample.hang_forever, timeout_s=0.2)
    assert executors.processes.replaced == 1
    assert len(executors.processes.workers) == 0  # the hung one is gone, not parked
    assert run(executors, sample.whoami)["pid"] != first


def start_blocking_process_tool(executors):
    """Start a process tool that reports its worker's pid over a socket, then blocks.
    Returns the call's greenlet, the worker's pid and the socket (closed when it dies)."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    call = gevent.spawn(run, executors, sample.report_pid_and_block, listener.getsockname()[1])
    with gevent.Timeout(10):
        conn, _ = listener.accept()
        pid = int(conn.makefile().readline())
    listener.close()
    return call, pid, conn


def test_worker_killed_mid_tool_gives_a_tool_error_and_the_next_call_works(executors):
    call, pid, conn = start_blocking_process_tool(executors)
    os.kill(pid, signal.SIGKILL)
    call.join(timeout=10)
    assert isinstance(call.exception, WorkerCrashed)
    assert "killed by signal 9" in str(call.exception)
    assert run(executors, sample.whoami)["pid"] != pid
    conn.close()


def test_worker_that_exits_gives_a_tool_error(executors):
    with pytest.raises(WorkerCrashed, match="exit code 3"):
        run(executors, sample.exit_now, 3)
    assert run(executors, demo_tools.count_primes, 10) == 4


def test_exception_in_worker_comes_back_with_its_type(executors):
    with pytest.raises(RemoteToolError, match="ValueError: nope") as info:
        run(executors, sample.fail_in_child, "nope")
    assert info.value.type_name == "ValueError"
    assert "fail_in_child" in info.value.remote_traceback
    assert run(executors, sample.whoami)  # a tool error does not cost the worker
    assert executors.processes.replaced == 0


def test_interrupting_a_process_call_kills_its_worker(executors):
    call, _, conn = start_blocking_process_tool(executors)
    with gevent.Timeout(10):
        call.kill()  # what the gateway does to a turn in busy mode `interrupt`
        assert conn.recv(1) == b""  # the worker died: its socket closed
    assert executors.processes.replaced == 1
    conn.close()


def test_waiting_on_a_process_tool_does_not_block_the_hub(executors):
    run(executors, sample.whoami)  # worker started
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
    run(executors, sample.sleep_in_child, 0.3)
    ticker.kill()
    assert len(ticks) >= 10


def test_thread_tool_runs_in_a_pool_thread(executors):
    assert run(executors, sample.native_thread_id) != _get_ident()


def test_thread_tool_timeout_returns_while_the_thread_runs_on(executors):
    with pytest.raises(ToolTimeout, match="runs on in the background"):
        run(executors, sample.slow_thread, 1.0, timeout_s=0.1)


def test_a_thread_tool_exception_reaches_the_caller_and_nothing_is_printed(executors, capfd):
    with pytest.raises(ValueError, match="bad zone"):
        run(executors, sample.thread_raises, "bad zone")
    assert "Traceback" not in capfd.readouterr().err


def test_an_inline_tool_offloads_its_cpu_work_to_the_process_pool(executors):
    parts = run(executors, sample.offloads)
    assert parts["here"] == os.getpid() and parts["there"] != os.getpid()
    assert executors.processes.workers  # the pool's own worker did it
    direct = sample.offloads()  # outside an Executors run: a plain call, in this process
    assert direct == {"here": os.getpid(), "there": os.getpid()}


def test_inline_tool_timeout(executors):
    with pytest.raises(ToolTimeout):
        run(executors, sample.slow_inline, 5.0, timeout_s=0.05)
    assert run(executors, sample.slow_inline, 0.0) == "finished"


def test_inline_and_thread_exceptions_propagate_unchanged(executors):
    with pytest.raises(RuntimeError, match="boom"):
        run(executors, sample.raises, "boom")


def test_a_local_function_cannot_run_in_a_process(executors):
    def local():
        return 1
    with pytest.raises(ExecutorError, match="module-level"):
        executors.run("process", local, timeout_s=1)
    with pytest.raises(ExecutorError, match="unknown executor"):
        executors.run("gpu", local, timeout_s=1)


def test_close_kills_workers_and_refuses_new_calls():
    ex = Executors(processes=1)
    pid = run(ex, sample.whoami)["pid"]
    proc = ex.processes.workers[0].proc
    ex.close()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    with pytest.raises(ExecutorClosed):
        run(ex, sample.whoami)
    ex.close()  # idempotent
    assert pid
