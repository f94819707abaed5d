"""``wsi-amr`` for tests/test_docs.py: hands argv, cwd, environment and stdin/stdout/stderr to the
pre-warmed server (server.py; its socket in WSI_AMR_DOCS_SOCKET), exits with the command's status."""

import json
import os
import socket
import sys

conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(os.environ["WSI_AMR_DOCS_SOCKET"])
request = json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
socket.send_fds(conn, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
status = b""
while len(status) < 4:
    chunk = conn.recv(4 - len(status))
    if not chunk:
        sys.exit(1)
    status += chunk
sys.exit(int.from_bytes(status, "big", signed=True))
