"""Helpers of the security tests: a one-model repository, channels that open a new connection,
and the status code of a call."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from tests.certs import Issued
from tests.conftest import MODELS

# A channel of its own connection: grpcio otherwise shares subchannels between channels with
# the same target and credentials, and a test of a new handshake would reuse an old one.
FRESH = [("grpc.use_local_subchannel_pool", 1)]


def one_model_repo(folder: Path) -> Path:
    """A repository holding only diabetes_linear (loads in well under a second)."""
    shutil.copytree(MODELS / "diabetes_linear", folder / "diabetes_linear")
    return folder


def tls_channel(port: int, ca: bytes, client: Issued | None = None) -> grpc.Channel:
    """A TLS channel to 127.0.0.1:port trusting `ca`, presenting `client` if given."""
    creds = grpc.ssl_channel_credentials(ca, client.key if client else None,
                                         client.cert if client else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=FRESH)


def code_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.StatusCode:
    """The status code the call ends with (OK when it returns)."""
    try:
        fn(*args, timeout=10, **kwargs)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK
