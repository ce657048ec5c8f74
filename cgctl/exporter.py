"""The exporter's HTTP endpoint: /metrics rendered at each request from the cgroups.

Served with the standard library's threading HTTP server; renders are serialised (the
collector keeps small caches between scrapes), and the exporter's own process metrics come
from prometheus_client's ProcessCollector (not in the daemon, whose collector renders its own
process and its keeper's as cgctl_process_*).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from cgctl.metrics import ContainerCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format ContainerCollector writes


def make_server(
    host: str, port: int, collector: ContainerCollector, own_process: bool = True
) -> ThreadingHTTPServer:
    """A server for /metrics (call serve_forever), with cgctl_exporter_process_* if own_process;
    binding errors raise OSError."""
    process = CollectorRegistry(auto_describe=False)
    if own_process:
        ProcessCollector(namespace="cgctl_exporter", registry=process)
    render_lock = threading.Lock()

    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics is served here")
                return
            with render_lock:
                body = collector.render().encode() + generate_latest(process)  # one copy of a large text
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds is not news

    server = ThreadingHTTPServer((host, port), MetricsHandler)
    server.daemon_threads = True
    return server
