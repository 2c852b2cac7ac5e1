"""A fault-injecting HTTP forwarder for tests: sits in front of an S3-API server (moto) and
answers 503 ServiceUnavailable to the first N requests that match a method and a path
fragment; every other request is passed through unchanged. Test code only."""

from __future__ import annotations

import http.client
import http.server
import threading
from urllib.parse import urlsplit

# Hop-by-hop headers and those the forwarder sets itself.
_DROP_REQUEST = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "content-length",
                 "expect"}  # the forwarder answers 100-continue itself
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
_UNAVAILABLE = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
                b"<Message>fault injected by the test proxy</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str):
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.rule: tuple[str, str] | None = None
        self.remaining = 0
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status answered)
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                if proxy.take_fault(self.command, self.path):
                    self.send_response(503, "Service Unavailable")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_UNAVAILABLE)))
                    self.end_headers()
                    self.wfile.write(_UNAVAILABLE)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROP_REQUEST}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _DROP_RESPONSE:
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    proxy.log(self.command, self.path, resp.status)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, method: str, path_contains: str, times: int) -> None:
        """Answer 503 to the next `times` requests with this method whose path contains the fragment."""
        with self.lock:
            self.rule, self.remaining = (method, path_contains), times

    def take_fault(self, method: str, path: str) -> bool:
        with self.lock:
            hit = (self.rule is not None and self.remaining > 0 and method == self.rule[0]
                   and self.rule[1] in path)
            if hit:
                self.remaining -= 1
                self.requests.append((method, path, 503))
            return hit

    def log(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.requests.append((method, path, status))

    def answered(self, method: str, path_contains: str) -> list[int]:
        """Statuses answered, in order, to requests with this method and path fragment."""
        with self.lock:
            return [s for m, p, s in self.requests if m == method and path_contains in p]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
