"""demo-checkout: a stand-in application for the synspan compose demo.

It calls three HTTP dependencies in a loop, each on its own thread and schedule:

- inventory (a healthy server): most calls, answered in a millisecond;
- payments (its host drops SYNs): the kernel retransmits the SYN and gives up, `timed_out`;
- recommendations (nothing listens on the port): refused at once, `connection_refused`.

Each call is a client span of its own (OpenTelemetry SDK, OTLP/HTTP to the collector). Around
its outbound call the application publishes that span as the thread's context (OTEP 4947),
and its resource as process context (OTEP 4719), through the otel_context extension (see
published_context.py): in Jaeger synspan's `tcp connect` span for the attempt is a child of
the application's failed `GET`, in its trace, with the published resource. Nothing here calls
synspan; a reader of the specifications finds the context.
"""

import http.client
import logging
import os
import random
import signal
import threading
import time
import urllib.parse
import uuid

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from published_context import publish_process_context, published

log = logging.getLogger("demo-checkout")


def call(tracer: trace.Tracer, dependency: str, url: str, timeout: float) -> None:
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname, parsed.port or 80
    with tracer.start_as_current_span(
        f"GET {dependency}",
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": "GET",
            "url.full": url,
            "server.address": host,
            "server.port": port,
            "peer.service": dependency,
        },
    ) as span, published(span, {"http.request.method": "GET", "peer.service": dependency}):
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", parsed.path or "/")
            response = conn.getresponse()
            response.read()
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        except OSError as err:
            # OSError covers refused, timed out and unreachable alike; error.type keeps which.
            span.record_exception(err)
            span.set_attribute("error.type", type(err).__name__)
            span.set_status(Status(StatusCode.ERROR, str(err)))
            log.info("%s: %s", dependency, err)
        finally:
            conn.close()


def loop(stop: threading.Event, tracer: trace.Tracer, dependency: str, url: str,
         every: float, timeout: float) -> None:
    while not stop.is_set():
        started = time.monotonic()
        call(tracer, dependency, url, timeout)
        # Jitter, so the three schedules do not line up into bursts.
        pause = every * random.uniform(0.8, 1.2) - (time.monotonic() - started)
        stop.wait(max(pause, 0.0))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # docker-compose.yml sets OTEL_SERVICE_NAME; synspan reads the same variable from this
    # process's environment, so without it the connect spans would be named after the
    # executable (python3.12) while these spans took the default below.
    service = os.environ.get("OTEL_SERVICE_NAME", "demo-checkout")

    # OTLP over HTTP, to the collector's port 4318. Its connects are traced too, and land
    # under the same service as every other connect of this process.
    resource = {"service.name": service, "service.instance.id": str(uuid.uuid4())}
    provider = TracerProvider(resource=Resource.create(resource))
    # synspan's connect spans take this resource rather than what it reads from
    # /proc/<pid>/environ: the instance id exists nowhere else.
    publish_process_context(resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("demo-checkout")

    # The connect timeout is longer than the kernel's SYN retries (docker-compose.yml sets
    # net.ipv4.tcp_syn_retries=3 here: 15 to 20s), so the kernel gives up first and synspan
    # reports `timed_out` with every retransmit, not an application-side `aborted`.
    timeout = float(os.environ.get("DEMO_CONNECT_TIMEOUT", "30"))
    schedules = [
        ("inventory", os.environ["DEMO_HEALTHY_URL"], float(os.environ.get("DEMO_HEALTHY_EVERY", "0.5"))),
        ("payments", os.environ["DEMO_DROPPING_URL"], float(os.environ.get("DEMO_DROPPING_EVERY", "20"))),
        ("recommendations", os.environ["DEMO_REFUSING_URL"], float(os.environ.get("DEMO_REFUSING_EVERY", "5"))),
    ]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    workers = [
        threading.Thread(target=loop, args=(stop, tracer, dep, url, every, timeout), daemon=True)
        for dep, url, every in schedules
    ]
    for worker in workers:
        worker.start()
    log.info("calling %s", ", ".join(f"{dep} ({url})" for dep, url, _ in schedules))
    stop.wait()
    provider.shutdown()


if __name__ == "__main__":
    main()
