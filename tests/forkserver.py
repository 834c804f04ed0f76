"""Real app processes for the tests, started without paying torch's import each time.

A process of a CLI test (``python -m supernet.train ...`` then a signal, a kill -9, an exit status) spends most of
a small run importing torch and torch._dynamo (which every optimizer pulls in): about 6 of the 9 s of a one-step
run here. ``ForkServer`` starts one interpreter that imports them once, then forks it for each command: the child
gets the command's own argv, environment, working directory and stdin/stdout/stderr, drops the app module so that
``runpy`` runs it fresh as ``__main__`` (as ``python -m`` does), and ends as the interpreter's exit would end it
(exit status, traceback, non-daemon threads joined, atexit handlers run, output flushed) but without tearing every
module down: that touches the whole heap inherited from the server, and copying those pages cost a child over 2 s.
It is a real process of its own: a pid to signal or kill, its own exit status. ``ForkedProcess`` mirrors the part
of ``subprocess.Popen`` the tests use. (test_forkserver.py checks all of this.)

The launcher's workers are forked too: torchrun starts ``$PYTHON_EXEC -u -m <app> ...`` for each (its documented
override of ``sys.executable``), and ``popen`` points ``PYTHON_EXEC`` at a small client script (``CLIENT``, a
stdlib-only interpreter started with ``-I -S``, some 20 ms) that hands its own argv, environment, working directory
and stdin/stdout/stderr to the server, then stands in for the forked worker: torchrun's signals (it signals each
worker's process group) go to the worker's process group, the client exits with the worker's status, and if the
client is killed (kill -9 of the whole job) the worker's group is killed with it. A test that wants fresh workers
passes ``PYTHON_EXEC=sys.executable`` in ``env``.

What it cannot show is what a fresh interpreter does before the app runs (what gets imported, e.g.
test_layout.py's checks) and a process that must start from its own file (exported models run without the
project): those tests start ``subprocess.Popen`` as before.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What the served interpreter imports before forking; app modules are dropped again in each child before it runs.
PRELOAD = ("torch", "torch._dynamo", "torch.distributed.run", "hydra", "supernet.train", "supernet.retrain",
           "search.evolve", "search.fidelity", "supernet.engine.launch")

# The server: imports, then forks one child per request (SOCK_SEQPACKET: one message per request, carrying the
# child's stdin, stdout and stderr as file descriptors). The parent reports each child's pid at once and its
# exit status (os.waitstatus_to_exitcode: negative for a signal, as Popen.returncode) when it ends; it exits
# when the test process that started it is gone. The child leaves the loop and runs its command at top level.
SERVER = r"""
import importlib, json, os, select, socket, sys, threading
path, parent = sys.argv[1], os.getppid()
for name in sys.argv[2:]:
    importlib.import_module(name)
assert threading.active_count() == 1, threading.enumerate()  # forking a process with threads is not safe
import gc
gc.freeze()  # the preloaded objects stay out of the children's collections (and their pages uncopied)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
srv.bind(path)
srv.listen(64)
print("ready", flush=True)
sys.stdout.flush(); sys.stderr.flush()
waiting, request = {}, None
while request is None and os.getppid() == parent:
    ready, _, _ = select.select([srv], [], [], 0.05)
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        conn = waiting.pop(pid)
        try:
            conn.send(str(os.waitstatus_to_exitcode(status)).encode())
        except OSError:  # the requester is gone (a client killed with its job)
            pass
        conn.close()
    if ready:
        conn, _ = srv.accept()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 4)
        if msg == b"reap":  # a test is over: kill what it left running (their requesters learn the exit as usual)
            for pid in waiting:
                os.kill(pid, 9)
            conn.send(str(len(waiting)).encode())
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            srv.close()
            for c in waiting.values():
                c.close()
            conn.close()
            request = json.loads(msg), fds
            break
        for fd in fds:
            os.close(fd)
        try:
            conn.send(str(pid).encode())
        except OSError:
            pass
        waiting[pid] = conn
if request is None:  # the test process is gone: so are the processes it started
    for pid in waiting:
        os.kill(pid, 9)
    sys.exit(0)
del srv, waiting, conn, ready
(req, fds) = request
for target, fd in zip((0, 1, 2), fds):
    os.dup2(fd, target)
    os.close(fd)
if len(fds) == 4:  # a launcher's worker, through CLIENT: its own process group, killed when the client dies
    os.setsid()
    def watch(fd=fds[3]):
        os.read(fd, 1)  # only the client holds the write end: EOF when it is gone
        os.killpg(0, 9)
    threading.Thread(target=watch, daemon=True).start()
    if req.get("unbuffered"):
        sys.stdout.reconfigure(line_buffering=True)
os.chdir(req["cwd"])
os.environ.clear()
os.environ.update(req["env"])
if "OMP_NUM_THREADS" in os.environ:
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
mode, target, *rest = req["argv"]
del req, fds, request, path, parent, pid, importlib, json, select, socket
code = 0
try:
    if mode == "-m":
        import runpy
        sys.modules.pop(target, None)  # as `python -m`: the module runs fresh as __main__
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
        code = e.code or 0
    else:
        print(e.code, file=sys.stderr)
        code = 1
except BaseException as e:
    sys.excepthook(type(e), e, e.__traceback__)
    code = -2 if isinstance(e, KeyboardInterrupt) else 1  # Python dies by SIGINT after an uncaught Ctrl-C
# What the interpreter's exit does that a program can see: non-daemon threads joined, atexit handlers run, output
# flushed. Not the teardown of every module: it touches all of the inherited heap, and copying those pages costs
# a forked child over 2 s here.
import atexit, signal
threading._shutdown()
atexit._run_exitfuncs()
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except (OSError, ValueError):
        pass
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
os._exit(code & 0xFF)
"""


# A launcher's worker command, ``CLIENT -u -m app args...``: forked from the server (the fourth descriptor is the
# read end of a pipe whose write end only this process holds), or the real interpreter for any other command line.
CLIENT = r"""#!{python} -IS
import json, os, signal, socket, sys
args = sys.argv[1:]
unbuffered = args[:1] == ["-u"]
args = args[unbuffered:]
if len(args) < 2 or args[0] not in ("-m", "-c"):
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
pending, pid = [], None
def forward(sig, frame):
    if pid is None:
        pending.append(sig)
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, forward)
alive_r, alive_w = os.pipe()
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.connect({sock!r})
request = {{"argv": args, "cwd": os.getcwd(), "env": dict(os.environ), "unbuffered": unbuffered}}
socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2, alive_r])
os.close(alive_r)
pid = int(conn.recv(64))
for sig in pending:
    forward(sig, None)
code = int(conn.recv(64))
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


RUNNING: list[ForkServer] = []  # the servers of this process, for conftest.py to reap after each test


class ForkServer:
    """One served interpreter per test process (a session fixture in conftest.py)."""

    def __init__(self, directory: Path, preload: Sequence[str] = PRELOAD) -> None:
        self.path = str(directory / "forkserver.sock")
        self.client = directory / "python"  # torchrun's PYTHON_EXEC: its workers are forked from the server too
        self.client.write_text(CLIENT.format(python=sys.executable, sock=self.path))
        self.client.chmod(0o755)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self._server = subprocess.Popen([sys.executable, "-c", SERVER, self.path, *preload], cwd=REPO, env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        line = self._server.stdout.readline()
        if line != "ready\n":
            raise RuntimeError(f"the fork server did not start (exit {self._server.wait()})")
        RUNNING.append(self)

    def popen(self, argv: Sequence[str], cwd: Path | str | None = None,
              env: dict[str, str] | None = None) -> ForkedProcess | subprocess.Popen:
        """``subprocess.Popen(argv, cwd=cwd, env=env, stdout=PIPE, stderr=PIPE, text=True)`` for
        ``argv = [sys.executable, "-m", module, ...]`` or ``[sys.executable, "-c", code, ...]``, forked from the
        server; any other command line starts a fresh interpreter."""
        argv = [str(a) for a in argv]
        if len(argv) < 3 or argv[0] != sys.executable or argv[1] not in ("-m", "-c"):
            return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        env = {"PYTHON_EXEC": str(self.client), **(os.environ if env is None else env)}
        return ForkedProcess(self.path, argv, Path(cwd or os.getcwd()), env)

    def run(self, argv: Sequence[str], cwd: Path | str | None = None, env: dict[str, str] | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """``subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``."""
        p = self.popen(argv, cwd, env)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise
        return subprocess.CompletedProcess(list(argv), p.returncode, out, err)

    def reap(self) -> int:
        """Kill every process forked for a command that still runs (launcher workers included): what a failed
        test left behind. Returns how many there were."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.connect(self.path)
            conn.send(b"reap")
            return int(conn.recv(64))

    def close(self) -> None:
        self.reap()
        self._server.terminate()
        self._server.wait()
        RUNNING.remove(self)


class ForkedProcess:
    """The ``subprocess.Popen`` surface the tests use: pid, returncode, poll, wait, communicate, send_signal,
    kill; stdout and stderr captured as text."""

    def __init__(self, path: str, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.args = argv
        self.returncode: int | None = None
        stdin = os.open(os.devnull, os.O_RDONLY)
        (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._conn.connect(path)
        request = {"argv": argv[1:], "cwd": str(cwd), "env": env}
        socket.send_fds(self._conn, [json.dumps(request).encode()], [stdin, out_w, err_w])
        for fd in (stdin, out_w, err_w):
            os.close(fd)
        self.pid = int(self._conn.recv(64))
        self._chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        self._readers = [threading.Thread(target=self._drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
        for t in self._readers:
            t.start()
        self._out, self._err = out_r, err_r

    def _drain(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                self._chunks[fd].append(chunk)

    def poll(self) -> int | None:
        if self.returncode is None:
            self._conn.setblocking(False)
            try:
                self._set(self._conn.recv(64))
            except BlockingIOError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                self._set(self._conn.recv(64))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def _set(self, msg: bytes) -> None:
        self.returncode = int(msg)
        self._conn.close()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Waits for the exit and for the end of both outputs (a child's own children may hold them open, as with
        Popen), then returns them."""
        self.wait(timeout)
        for t in self._readers:
            t.join(timeout)
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        return tuple(b"".join(self._chunks[fd]).decode() for fd in (self._out, self._err))

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# ----------------------------------------------------------------------------- helpers of the process tests
def kill_job(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it at once (torchrun starts each rank in a session of its own,
    so a process group does not reach them): a node going down."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    job, todo = [], [pid]
    while todo:
        job.append(todo.pop())
        todo += children.get(job[-1], [])
    for p in job:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(p: ForkedProcess | subprocess.Popen, path: Path, timeout: float = 240) -> None:
    """Return as soon as ``path`` exists (a checkpoint is written atomically), failing if ``p`` ends first."""
    deadline = time.time() + timeout
    while not path.exists():
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline, f"no {path.name} within {timeout:g} s"
        time.sleep(0.02)


_TORCH_WARNING = re.compile(r"W\d{4} \d\d:\d\d:\d\d")  # torch's own warnings: "W1207 07:58:04.114000 ..."


def own_lines(stderr: str) -> list[str]:
    """The lines of a launcher's stderr that are not torch's own warnings (on shutting workers down, say)."""
    return [line for line in stderr.splitlines() if not _TORCH_WARNING.match(line)]
