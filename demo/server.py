"""The demo's dependencies: a tiny HTTP server that answers 200 on every path.

`inventory` runs it as is. `payments` runs it behind an iptables rule that drops incoming
SYNs (entrypoint-drop-syn.sh), so the port is open but no handshake ever completes, which is
what a black-holing firewall or a dead host behind a stale route looks like to a client.
"""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"ok": True, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:
        pass  # Two requests a second would drown the compose log.


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
