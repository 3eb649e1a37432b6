"""A fork server for the mutation runs: imports torch, numpy, scipy and pytest once, then runs each mutant's pytest in
a forked child, so a mutant costs its tests, not an interpreter start and torch's import (seconds each on a busy
2-core machine). run.py starts it and points cosmic-ray's test command at the client below; fewstep's own modules are
never imported here, so each child imports the mutated file afresh.

    python tests/mutation/server.py SOCKET              # serve until killed
    python tests/mutation/server.py --client SOCKET -- PYTEST ARGS...   # what cosmic-ray runs (exit code: pytest's)
"""
import json
import os
import signal
import socket
import sys
import time


def client(path, args):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(json.dumps(dict(cwd=os.getcwd(), args=args, env=dict(os.environ))).encode() + b"\n")
        reply = s.makefile().readline()              # the child's exit code; empty if the server died
    sys.exit(int(reply) if reply.strip() else 3)


def child(request):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.dont_write_bytecode = True                   # a mutant's module must never be cached
    devnull = os.open(os.devnull, os.O_WRONLY)       # cosmic-ray needs the exit code only
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    import pytest
    code = pytest.main(request["args"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


def serve(path):
    import numpy  # noqa: F401 (the heavy imports, done once)
    import PIL.Image  # noqa: F401
    import pytest  # noqa: F401
    import scipy.linalg  # noqa: F401
    import torch  # noqa: F401
    import tqdm  # noqa: F401
    if os.path.exists(path):
        os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        while True:
            conn, _ = server.accept()
            with conn:
                request = json.loads(conn.makefile().readline())
                pid = os.fork()
                if pid == 0:
                    conn.close()
                    server.close()
                    child(request)
                conn.setblocking(False)
                while True:                           # wait for the child; kill it if the client goes away (timeout)
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        break
                    try:
                        if conn.recv(1) == b"":
                            os.kill(pid, signal.SIGKILL)
                    except BlockingIOError:
                        pass
                    time.sleep(0.02)
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        client(sys.argv[2], sys.argv[4:])
    else:
        serve(sys.argv[1])
