"""Shared fixtures for the interoperability tests: they run Whittle's real binaries against onnxruntime, and real
coordinator servers and workers on loopback."""
import errno
import http.client
import json
import os
import pathlib
import re
import signal
import ssl
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "Tests" / "Fixtures" / "models"


def _binary(name, configs=("release",), patience=0.0):
    """The first build of `name` that exists (the release build `scripts/test` makes: the tests run what ships);
    with `patience`, waits that many seconds for one (a concurrent `swift build` may be relinking it)."""
    deadline = time.monotonic() + patience
    while True:
        for config in configs:
            path = ROOT / ".build" / config / name
            if path.exists():
                return path
        if time.monotonic() >= deadline:
            break
        time.sleep(2)
    pytest.fail(f"{name} is not built ({'/'.join(configs)}); run `swift build -c release` first")


def _runner(path):
    def run(*args, check=True):
        result = subprocess.run([str(path), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"{path.name} {' '.join(map(str, args))} failed:\n{result.stderr}")
        return result

    return run


@pytest.fixture(scope="session")
def coordinator():
    """The coordinator binary (release build), as a runner."""
    return _runner(_binary("coordinator"))


@pytest.fixture(scope="session")
def release_models():
    """The model tools (`model train|compress|…`), for tests that train or calibrate. Both executables carry the
    same model commands; these tests use the worker's."""
    return _runner(_binary("worker"))


@pytest.fixture(scope="session")
def worker():
    """The worker binary (release build), as a runner like `coordinator`."""
    return _runner(_binary("worker"))


@pytest.fixture(scope="session")
def coordinator_path():
    """The coordinator binary's path, for tests that start long-running or concurrent processes."""
    return _binary("coordinator", patience=60)


@pytest.fixture(scope="session")
def worker_path():
    """The worker binary's path, for tests that start long-running or concurrent processes."""
    return _binary("worker", patience=60)


def launch(command, patience=60, **kwargs):
    """subprocess.Popen, waiting up to `patience` seconds while the binary is missing or busy (a concurrent
    `swift build` relinking it)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return subprocess.Popen([str(c) for c in command], **kwargs)
        except OSError as error:  # ENOENT while relinked, ETXTBSY while being written
            if error.errno not in (errno.ENOENT, errno.ETXTBSY) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def execute(command, timeout=120, **kwargs):
    """subprocess.run (text, output captured) through `launch`."""
    process = launch(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"{' '.join(map(str, command))} did not finish within {timeout} s:\n{out}{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


class HTTPAnswer:
    """An HTTP response read in full: status, headers (lowercase names) and body."""

    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"HTTP {self.status} {self.headers} {self.body[:300]!r}"


class CoordinatorServer:
    """A real `coordinator serve` on loopback over a data directory made by `coordinator init`.

    `start()` waits until DIR/listening exists and /healthz answers; `stop()` sends SIGTERM and asserts a graceful
    shutdown: exit status 0 within `stop_timeout` seconds and DIR/listening removed."""

    def __init__(self, binary, directory, log):
        self.binary = pathlib.Path(binary)
        self.dir = pathlib.Path(directory)
        self.log_path = pathlib.Path(log)
        self.process = None
        self.url = None
        self.starts = 0

    # -- the data directory --------------------------------------------------------------------------------------

    def cli(self, *args, check=True, timeout=60):
        """Runs `coordinator ARGS…` (not serve) and returns the completed process."""
        result = execute([self.binary, *args], timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"coordinator {' '.join(map(str, args))} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def init(self, *extra):
        return self.cli("init", "--dir", self.dir, "--json", *extra)

    def configure(self, **settings):
        """Sets `key = value` lines of DIR/coordinator.conf (keys as in the file, e.g. enroll_burst=5)."""
        path = self.dir / "coordinator.conf"
        text = path.read_text()
        for key, value in settings.items():
            text, count = re.subn(rf"(?m)^{re.escape(key)}\s*=.*$", f"{key} = {value}", text)
            if count == 0:
                text += f"\n{key} = {value}\n"
        path.write_text(text)

    # -- the server ----------------------------------------------------------------------------------------------

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    @property
    def port(self):
        return int(self.url.rsplit(":", 1)[1])

    def start(self, listen="127.0.0.1:0", timeout=30, args=(), env=None):
        """`args`: more `serve` flags; `env`: variables added to the environment."""
        assert not self.running, "already running"
        listening = self.dir / "listening"
        listening.unlink(missing_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"---- serve #{self.starts} --listen {listen}\n".encode())
            log.flush()
            self.process = launch([self.binary, "serve", "--dir", self.dir, "--listen", listen, *args],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while not listening.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"coordinator serve exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"coordinator serve wrote no {listening} within {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        time.sleep(0.02)  # written atomically, but be gentle
        self.url = listening.read_text().strip()
        while True:
            try:
                answer = self.request("GET", "/healthz", client_certificate=False)
                if answer.status == 200:
                    return self
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url}/healthz did not answer within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self, stop_timeout=10):
        """SIGTERM, then asserts a graceful shutdown; returns the seconds it took."""
        assert self.running, f"coordinator serve is not running (exit status {self.process and self.process.returncode})"
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"coordinator serve did not exit within {stop_timeout} s of SIGTERM:\n{self.log()}")
        took = time.monotonic() - began
        assert status == 0, f"coordinator serve exited {status} after SIGTERM:\n{self.log()}"
        assert not (self.dir / "listening").exists(), "a graceful shutdown removes DIR/listening"
        return took

    def kill(self):
        if self.running:
            self.process.kill()
            self.process.wait()

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- talking to it -------------------------------------------------------------------------------------------

    def tls_context(self, certificate=None, key=None, maximum_version=None):
        """A client context trusting the coordinator's CA, with an optional client certificate (paths)."""
        context = ssl.create_default_context(cafile=str(self.dir / "ca.pem"))
        if certificate is not None:
            context.load_cert_chain(str(certificate), str(key))
        if maximum_version is not None:
            context.maximum_version = maximum_version
        return context

    def connection(self, context=None, timeout=15):
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=context or self.tls_context(), timeout=timeout)

    def request(self, method, path, body=None, headers=None, certificate=None, key=None, client_certificate=None,
                context=None, timeout=15):
        """One request on a fresh connection (closed afterwards). `certificate`/`key`: a client certificate;
        `client_certificate="admin"`: the data directory's admin certificate."""
        if client_certificate == "admin":
            certificate, key = self.dir / "admin.pem", self.dir / "admin.key"
        connection = self.connection(context or self.tls_context(certificate, key), timeout)
        try:
            all_headers = {"Connection": "close", **(headers or {})}
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            body = response.read()
            return HTTPAnswer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
        finally:
            connection.close()

    def token(self, ttl="1h", uses=1):
        """`coordinator token create --json`: {"token", "expiresAt", "uses", "caFingerprint"}."""
        return json.loads(self.cli("token", "create", "--dir", self.dir, "--ttl", ttl, "--uses", uses, "--json").stdout)

    def workers(self):
        """`coordinator workers list --json`."""
        return json.loads(self.cli("workers", "list", "--dir", self.dir, "--json").stdout)


@pytest.fixture
def spawn_any():
    """Starts a process (`launch`'s arguments) that is killed at teardown if a failed test left it running."""
    started = []

    def start(*command, **kwargs):
        process = launch(command, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def coordinator_server(tmp_path, coordinator_path):
    """A factory of coordinators: `coordinator_server(name="coord", start=True, **settings)` runs `coordinator init`
    in tmp_path/name, writes `settings` into coordinator.conf and (by default) starts `serve` on a free loopback
    port. Every server still running at teardown is stopped with SIGTERM and must shut down gracefully."""
    servers = []

    def make(name="coord", start=True, **settings):
        server = CoordinatorServer(coordinator_path, tmp_path / name, tmp_path / f"{name}.log")
        server.init()
        if settings:
            server.configure(**settings)
        servers.append(server)
        return server.start() if start else server

    yield make
    failures = []
    for server in servers:
        if server.running:
            try:
                server.stop()
            except AssertionError as error:
                failures.append(str(error))
            finally:
                server.kill()
    if failures:
        pytest.fail("\n".join(failures))


class PostgresCluster:
    """A throwaway PostgreSQL cluster (scripts/postgres-cluster: initdb in a temporary directory, TLS on, loopback
    only); `database()` makes an empty database and returns its URL for `database_url`."""

    def __init__(self, directory):
        self.dir = pathlib.Path(directory)
        result = subprocess.run(["bash", str(ROOT / "scripts" / "postgres-cluster"), "start", str(self.dir)],
                                capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            pytest.fail(f"the test PostgreSQL cluster did not start:\n{result.stderr}")
        fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        self.port = int(fields["port"])
        self.socket = fields["socket"]
        self.ca = fields["ca"]
        self.count = 0

    def psql(self, sql, database="postgres"):
        """Runs `sql` as the trusted role; returns its rows as tuples of strings."""
        result = subprocess.run(["psql", "-h", self.socket, "-p", str(self.port), "-U", "whittle", "-d", database, "-v",
                                 "ON_ERROR_STOP=1", "-qAt", "-F", "\t", "-c", sql], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"psql failed: {result.stderr}")
        return [tuple(line.split("\t")) for line in result.stdout.splitlines()]

    def database(self, tls=True):
        self.count += 1
        name = f"w{os.getpid()}_{self.count}"
        self.psql(f"CREATE DATABASE {name}")
        self.last = name
        if tls:
            return f"postgresql://whittle@localhost:{self.port}/{name}?sslmode=verify-full&sslrootcert={self.ca}"
        return f"postgresql://whittle@127.0.0.1:{self.port}/{name}?sslmode=disable"

    def stop(self):
        subprocess.run(["bash", str(ROOT / "scripts" / "postgres-cluster"), "stop", str(self.dir)], timeout=60)


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL cluster, stopped and removed at the end. It lives in a directory of its own under the
    system's temporary directory: run as root, the server runs as the postgres user, who cannot enter pytest's
    owner-only directories."""
    import shutil
    import tempfile
    directory = tempfile.mkdtemp(prefix="whittle-postgres-")
    os.chmod(directory, 0o755)
    try:
        cluster = PostgresCluster(pathlib.Path(directory) / "cluster")
    except BaseException:
        subprocess.run(["bash", str(ROOT / "scripts" / "postgres-cluster"), "stop", str(pathlib.Path(directory) / "cluster")],
                       timeout=60)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    yield cluster
    cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)
