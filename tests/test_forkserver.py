"""The fork server (tests/forkserver.py) that the CLI, signal and launcher tests start their processes with: a
forked command ends as a fresh ``python -m`` would (exit status, traceback, atexit handlers, threads joined, output
flushed), and torchrun's workers forked through its client get the launcher's signals and die with the job."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from forkserver import kill_job

APP = '''
import atexit, os, signal, sys, threading, time
def say(*parts):  # one write a line: the workers share the pipe, and under `python -u` print writes piecemeal
    sys.stdout.flush()
    os.write(1, (",".join(map(str, parts)) + "\\n").encode())
if sys.argv[1:] == ["sleep"]:  # the handler is in place before the start line tells the test to signal
    signal.signal(signal.SIGTERM, lambda *a: (say("SIGTERM", os.getpid()), sys.exit(0)))
say("start", os.getpid(), os.getppid(), "torch" in sys.modules, os.environ.get("RANK"))
if sys.argv[1:] == ["sleep"]:
    time.sleep(60)
atexit.register(print, "atexit ran")
threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined"))).start()
if sys.argv[1:] == ["raise"]:
    raise KeyError("boom")
sys.exit(int(sys.argv[1]))
'''


def _app(tmp_path: Path) -> Path:
    (tmp_path / "fsapp.py").write_text(APP)
    return tmp_path


def test_a_forked_command_exits_like_a_fresh_interpreter(forkserver, tmp_path):
    cwd = _app(tmp_path)
    r = forkserver.run([sys.executable, "-m", "fsapp", "3"], cwd=cwd, timeout=60)
    assert r.returncode == 3, r.stderr
    start, *rest = r.stdout.splitlines()
    assert start.split(",")[3:] == ["True", "None"]  # torch already imported: forked, not started afresh
    assert rest == ["thread joined", "atexit ran"] and r.stderr == ""  # never flushed by the app itself
    r = forkserver.run([sys.executable, "-m", "fsapp", "raise"], cwd=cwd, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("Traceback") and r.stderr.endswith("KeyError: 'boom'\n")
    assert r.stdout.splitlines()[1:] == ["thread joined", "atexit ran"]


def _launch(forkserver, cwd: Path):
    return forkserver.popen([sys.executable, "-m", "supernet.engine.launch", "--standalone", "--nproc_per_node=2",
                             "-m", "fsapp", "sleep"], cwd=cwd)


def _started(p, n: int = 2) -> list[list[str]]:
    """The ``start`` lines of ``n`` workers, read from the output captured so far (the pipe stays open while they
    run)."""
    deadline = time.time() + 60
    while True:
        assert p.poll() is None and time.time() < deadline
        *complete, _ = b"".join(p._chunks[p._out]).decode().split("\n")  # the last piece may be half a line
        lines = [line.split(",") for line in complete if line.startswith("start,")]
        if len(lines) >= n:
            return lines
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_launcher_workers_are_forked_get_its_signals_and_die_with_the_job(forkserver, tmp_path):
    cwd = _app(tmp_path)
    p = _launch(forkserver, cwd)
    workers = _started(p)
    assert sorted(w[4] for w in workers) == ["0", "1"] and all(w[3] == "True" for w in workers)
    p.send_signal(signal.SIGTERM)  # the launcher passes it on to each worker's process group
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    assert sorted(int(line.split(",")[1]) for line in out.splitlines() if line.startswith("SIGTERM,")) == sorted(
        int(w[1]) for w in workers)

    p = _launch(forkserver, cwd)
    pids = [int(w[1]) for w in _started(p)]
    kill_job(p.pid)  # the launcher and the clients standing in for its workers: the workers go with them
    p.communicate(timeout=60)
    deadline = time.time() + 10
    while any(map(_alive, pids)):
        assert time.time() < deadline, [pid for pid in pids if _alive(pid)]
        time.sleep(0.05)


def test_reap_kills_what_a_test_left_running_launcher_workers_included(forkserver, tmp_path):
    """conftest.py reaps after every test: a hung app (here a launcher and its two workers, all asleep) is killed
    instead of loading the machine for the tests after it."""
    cwd = _app(tmp_path)
    p = _launch(forkserver, cwd)
    pids = [int(w[1]) for w in _started(p)]
    assert forkserver.reap() == 3  # the launcher and its two forked workers
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    deadline = time.time() + 10
    while any(map(_alive, pids)):
        assert time.time() < deadline, [pid for pid in pids if _alive(pid)]
        time.sleep(0.05)
    assert forkserver.reap() == 0
