"""Shared pytest fixtures. Add new fixtures below; keep each one cleaning up after itself."""
from __future__ import annotations

import pytest

from infra.local.s3_store import LocalS3Store

_AWS_VARS_TO_CLEAR = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def s3_store():
    """One SeaweedFS S3 endpoint on 127.0.0.1 for the whole session, bucket 'satloc'.

    It is started only when a test asks for it, and stopped (by PID) and removed at the
    end. Tests that share it write under their own prefix (e.g. the test's name).
    """
    with LocalS3Store(bucket="satloc") as store:
        yield store


@pytest.fixture
def s3_env(s3_store, monkeypatch):
    """Point the AWS_* variables at the session store for one test; yields the store."""
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_store.env().items():
        monkeypatch.setenv(name, value)
    yield s3_store


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, saying why, where torch sees no CUDA GPU (CI, laptops);
    ``pytest -m cuda`` runs them on a GPU machine."""
    cuda_tests = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="cuda: needs a CUDA GPU, none on this machine (torch.cuda.is_available() is False)")
    for item in cuda_tests:
        item.add_marker(skip)


@pytest.fixture
def no_s3_credentials(monkeypatch):
    """``no_s3_credentials(endpoint)``: S3 at ``endpoint`` but no credentials anywhere boto3
    looks (variables, files, instance metadata), for one test."""
    import os

    def apply(endpoint: str) -> None:
        for name in [n for n in os.environ if n.startswith("AWS_") and n != "AWS_CA_BUNDLE"]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    return apply


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
