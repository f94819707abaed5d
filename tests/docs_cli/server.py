"""A pre-warmed ``wsi-amr`` for tests/test_docs.py: each example still runs in a shell and each
``wsi-amr`` in it is its own process running ``wsi_amr.cli.main`` with its own argv, cwd,
environment and stdin/stdout/stderr; only the imports (torch alone takes seconds) are paid once.

``python server.py SOCKET`` imports the CLI, then forks one child per connection from
``client.py`` (the ``wsi-amr`` on the examples' PATH), which sends its argv, cwd, environment and
file descriptors 0-2; the child runs the command and sends back its exit status.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys


def serve(path: str) -> None:
    import torch  # noqa: F401  (the slow imports, once)
    import torch._dynamo  # noqa: F401  (imported by the first optimiser step)
    import torch.optim  # noqa: F401

    from wsi_amr.cli import main

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        if os.fork():
            conn.close()
            continue
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        server.close()
        code = 1
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            size = int.from_bytes(data[:8], "big")
            while len(data) < size + 8:
                data += conn.recv(1 << 20)
            request = json.loads(data[8:])
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = ["wsi-amr", *request["argv"]]
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                import atexit

                atexit._run_exitfuncs()  # as the interpreter would at exit (os._exit skips them)
                conn.sendall(code.to_bytes(4, "big", signed=True))
                os._exit(code)


if __name__ == "__main__":
    serve(sys.argv[1])
