"""The webhook sender against real receivers on 127.0.0.1: what it sends, where it connects,
what it does not do (follow redirects, read bodies, wait forever, leak the URL's path).

Targets are built by hand where the test needs a name that resolves nowhere: the sender
connects to the target's vetted addresses, never to its name, and these tests prove it.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imagegen.infra.settings import Settings
from imagegen.infra.webhook_targets import WebhookTarget, resolve
from imagegen.webhooks.sender import USER_AGENT, DeliveryAttempt, WebhookSender

SECRET_PATH = "/hooks/imagegen-s3cret-path"
SECRET_QUERY = "token=s3cret-token"
BODY = b'{"id": "job-1", "status": "completed"}'
HEADERS = {"webhook-id": "msg_0123", "webhook-signature": "v1,abc"}
QUICK = Settings(
    webhook_allow_private=True, webhook_connect_timeout_s=0.5, webhook_read_timeout_s=0.5
)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    port: int
    seen: list[Seen] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)


Respond = Callable[[BaseHTTPRequestHandler, Server], None]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops the SYNs of many simultaneous connects, which then
    # wait a second to retry: longer than these tests' connect timeout.
    request_queue_size = 128


def _status(code: int, **headers: str) -> Respond:
    def respond(handler: BaseHTTPRequestHandler, _: Server) -> None:
        handler.send_response(code)
        for name, value in headers.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


def _endless_body(handler: BaseHTTPRequestHandler, server: Server) -> None:
    """Claims a terabyte and sends until the client hangs up or the test ends."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(10**12))
    handler.end_headers()
    chunk = b"x" * 65_536
    try:
        while not server.released.is_set():
            handler.wfile.write(chunk)
    except OSError:
        pass


@contextmanager
def receiver(respond: Respond, tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    """An HTTP(S) server on 127.0.0.1 that records each POST and answers with `respond`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {name.lower(): value for name, value in self.headers.items()}
            state.seen.append(Seen(self.path, headers, body))
            respond(self, state)

        def log_message(self, *_: object) -> None:
            pass

    httpd = _HTTPServer(("127.0.0.1", 0), Handler)
    state = Server(httpd.server_address[1])
    if tls is not None:
        tls.sni_callback = lambda _sock, name, _ctx: state.server_names.append(name)
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.released.set()
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def silent_receiver() -> Iterator[int]:
    """Accepts connections and never reads from or answers them."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


def target(
    port: int,
    host: str = "127.0.0.1",
    scheme: str = "http",
    addresses: tuple[str, ...] = ("127.0.0.1",),
) -> WebhookTarget:
    path_and_query = f"{SECRET_PATH}?{SECRET_QUERY}"
    return WebhookTarget(
        url=f"{scheme}://{host}:{port}{path_and_query}",
        scheme=scheme,
        host=host,
        port=port,
        path_and_query=path_and_query,
        addresses=addresses,
    )


@pytest.fixture
def sender() -> Iterator[WebhookSender]:
    sending = WebhookSender(QUICK)
    yield sending
    sending.close()


def assert_no_secrets(attempt: DeliveryAttempt) -> None:
    assert attempt.error is not None
    for secret in ("s3cret", SECRET_PATH, SECRET_QUERY, "imagegen-s3cret"):
        assert secret not in attempt.error, attempt.error


def test_a_2xx_delivers_the_exact_body_and_headers(sender: WebhookSender) -> None:
    with receiver(_status(200)) as server:
        attempt = sender.send(target(server.port), BODY, HEADERS)
    assert attempt == DeliveryAttempt(True, 200, None, False, attempt.elapsed_s)
    (seen,) = server.seen
    assert seen.body == BODY
    assert seen.path == f"{SECRET_PATH}?{SECRET_QUERY}"
    assert seen.headers["host"] == f"127.0.0.1:{server.port}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["user-agent"] == USER_AGENT
    assert USER_AGENT.startswith("imagegen-webhooks/")
    assert {name: seen.headers[name] for name in HEADERS} == HEADERS


def test_it_connects_to_the_vetted_address_with_the_real_name_as_host(
    sender: WebhookSender,
) -> None:
    # The name resolves nowhere: only the pinned address can have reached the receiver.
    with receiver(_status(204)) as server:
        attempt = sender.send(target(server.port, host="hooks.example.invalid"), BODY, HEADERS)
    assert attempt.delivered and attempt.status_code == 204
    assert server.seen[0].headers["host"] == f"hooks.example.invalid:{server.port}"


def test_a_callers_host_header_cannot_move_the_host(sender: WebhookSender) -> None:
    with receiver(_status(200)) as server:
        attempt = sender.send(target(server.port), BODY, {"host": "evil.example", **HEADERS})
    assert attempt.delivered
    assert server.seen[0].headers["host"] == f"127.0.0.1:{server.port}"


def test_a_resolved_localhost_target_is_delivered(sender: WebhookSender) -> None:
    # localhost may resolve to ::1 first, where nothing listens: the next address is tried.
    with receiver(_status(200)) as server:
        resolved = resolve(f"http://localhost:{server.port}{SECRET_PATH}", True)
        attempt = sender.send(resolved, BODY, HEADERS)
    assert attempt.delivered, attempt.error
    assert server.seen[0].headers["host"] == f"localhost:{server.port}"


def test_a_refused_connection_moves_on_to_the_next_address(sender: WebhookSender) -> None:
    # The receiver listens on 127.0.0.1 only: 127.0.0.2 refuses the connection.
    with receiver(_status(200)) as server:
        attempt = sender.send(
            target(server.port, addresses=("127.0.0.2", "127.0.0.1")), BODY, HEADERS
        )
    assert attempt.delivered, attempt.error
    assert len(server.seen) == 1


def test_no_listener_is_a_retryable_connect_error(sender: WebhookSender) -> None:
    with receiver(_status(200)) as server:
        port = server.port
    attempt = sender.send(target(port, addresses=("127.0.0.2", "127.0.0.1")), BODY, HEADERS)
    assert not attempt.delivered and attempt.retryable and attempt.status_code is None
    assert attempt.error is not None and attempt.error.startswith("ConnectError")
    assert f"http://127.0.0.1:{port}" in attempt.error and "tried 2 addresses" in attempt.error
    assert_no_secrets(attempt)


def test_a_500_is_not_delivered_and_retryable(sender: WebhookSender) -> None:
    with receiver(_status(500)) as server:
        attempt = sender.send(target(server.port), BODY, HEADERS)
    assert (attempt.delivered, attempt.status_code, attempt.retryable) == (False, 500, True)
    assert attempt.error == f"HTTP 500 from http://127.0.0.1:{server.port}"
    assert_no_secrets(attempt)


def test_a_hanging_receiver_times_out_after_the_read_timeout(sender: WebhookSender) -> None:
    with silent_receiver() as port:
        started = time.monotonic()
        attempt = sender.send(target(port), BODY, HEADERS)
        took = time.monotonic() - started
    assert 0.4 < took < 2.0, took
    assert not attempt.delivered and attempt.retryable and attempt.status_code is None
    assert attempt.error is not None and attempt.error.startswith("ReadTimeout")
    assert "0.5 s" in attempt.error
    assert_no_secrets(attempt)


def test_a_redirect_is_not_followed(sender: WebhookSender) -> None:
    with receiver(_status(200)) as elsewhere:
        location = f"http://127.0.0.1:{elsewhere.port}/stolen"
        with receiver(_status(302, Location=location)) as server:
            attempt = sender.send(target(server.port), BODY, HEADERS)
        assert elsewhere.seen == []
    assert (attempt.delivered, attempt.status_code, attempt.retryable) == (False, 302, True)
    assert attempt.error is not None and "redirect (302) not followed" in attempt.error
    assert "stolen" not in attempt.error
    assert_no_secrets(attempt)


def test_a_huge_body_is_not_read() -> None:
    # A read timeout far longer than the test allows: only not reading ends the send.
    patient = WebhookSender(QUICK.model_copy(update={"webhook_read_timeout_s": 30.0}))
    try:
        with receiver(_endless_body) as server:
            started = time.monotonic()
            attempt = patient.send(target(server.port), BODY, HEADERS)
            took = time.monotonic() - started
    finally:
        patient.close()
    assert attempt.delivered and attempt.status_code == 200
    assert took < 2.0, took


def test_proxy_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    direct = WebhookSender(QUICK)
    try:
        with receiver(_status(200)) as server:
            attempt = direct.send(target(server.port, host="hooks.example.invalid"), BODY, {})
    finally:
        direct.close()
    assert attempt.delivered, attempt.error


def test_sends_from_many_threads_at_once(sender: WebhookSender) -> None:
    with receiver(_status(200)) as server, ThreadPoolExecutor(16) as pool:
        bodies = [b'{"n": %d}' % n for n in range(64)]
        attempts = list(pool.map(lambda b: sender.send(target(server.port), b, HEADERS), bodies))
    assert all(attempt.delivered for attempt in attempts)
    assert sorted(seen.body for seen in server.seen) == sorted(bodies)


# HTTPS: a private CA and a certificate for a made-up name, served on 127.0.0.1.

HTTPS_NAME = "hooks.example.test"


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    server: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            ).add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(HTTPS_NAME)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("imagegen test CA", ca_key, "imagegen test CA", ca_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = certificate(HTTPS_NAME, leaf_key, "imagegen test CA", ca_key, ca=False)

    folder = tmp_path_factory.mktemp("pki")
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (folder / "leaf.key").write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(folder / "leaf.pem", folder / "leaf.key")
    return Pki(ca.public_bytes(serialization.Encoding.PEM), server)


def _trusting(pki: Pki) -> WebhookSender:
    return WebhookSender(QUICK, ssl_context=ssl.create_default_context(cadata=pki.ca_pem.decode()))


def test_https_uses_the_real_name_for_sni_and_verification(pki: Pki) -> None:
    sending = _trusting(pki)
    try:
        with receiver(_status(200), tls=pki.server) as server:
            attempt = sending.send(
                target(server.port, host=HTTPS_NAME, scheme="https"), BODY, HEADERS
            )
    finally:
        sending.close()
    # The certificate names only HTTPS_NAME, not 127.0.0.1: verification used the name.
    assert attempt.delivered, attempt.error
    assert server.server_names == [HTTPS_NAME]
    (seen,) = server.seen
    assert seen.headers["host"] == f"{HTTPS_NAME}:{server.port}" and seen.body == BODY


def test_https_to_a_name_the_certificate_does_not_cover_is_refused(pki: Pki) -> None:
    sending = _trusting(pki)
    try:
        with receiver(_status(200), tls=pki.server) as server:
            attempt = sending.send(
                target(server.port, host="other.example.test", scheme="https"), BODY, HEADERS
            )
    finally:
        sending.close()
    assert not attempt.delivered and attempt.retryable and server.seen == []
    assert attempt.error is not None and "certificate verify failed" in attempt.error.lower()
    assert f"https://other.example.test:{server.port}" in attempt.error
    assert_no_secrets(attempt)


def test_https_with_an_untrusted_certificate_is_not_delivered(
    pki: Pki, sender: WebhookSender
) -> None:
    with receiver(_status(200), tls=pki.server) as server:
        attempt = sender.send(target(server.port, host=HTTPS_NAME, scheme="https"), BODY, HEADERS)
    assert not attempt.delivered and server.seen == []
    assert attempt.error is not None and "certificate verify failed" in attempt.error.lower()
