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
    for attempt in range(300):                       # the server may still be starting: retry for a minute
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            break
        except OSError:
            s.close()
            time.sleep(0.2)
    else:
        sys.exit(f"mutation: no server at {path}")
    with s:
        s.sendall(json.dumps(dict(cwd=os.getcwd(), args=args, env=dict(os.environ))).encode() + b"\n")
        reply = s.makefile().readline()              # {"code": the child's exit code, "output": what it printed}
    if not reply.strip():
        sys.exit("mutation: the server closed the connection without an answer")
    reply = json.loads(reply)
    print(reply["output"])
    sys.exit(reply["code"])


def child(request):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.dont_write_bytecode = True                   # a mutant's module must never be cached
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)   # what the client reports to cosmic-ray
    os.dup2(log, 1)
    os.dup2(log, 2)
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
                try:
                    request = json.loads(conn.makefile().readline())
                except (OSError, ValueError):             # a client that went away before asking
                    continue
                request["log"] = f"{path}.child.log"
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
                    except OSError:                   # the client is gone (cosmic-ray's timeout)
                        os.kill(pid, signal.SIGKILL)
                    time.sleep(0.02)
                with open(request["log"], errors="replace") as f:
                    output = f.read()[-20_000:]
                try:
                    conn.setblocking(True)
                    conn.sendall(json.dumps(dict(code=os.waitstatus_to_exitcode(status), output=output)).encode() + b"\n")
                except OSError:
                    pass


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        client(sys.argv[2], sys.argv[4:])
    else:
        serve(sys.argv[1])
