"""Generated TLS certificates for tests (a throw-away CA and a server certificate)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.components import require


def make_certificate(folder: str, name: str = "gw.example.test") -> tuple[str, str]:
    """A self-signed certificate and key for ``name`` in ``folder``: (cert path, key path)."""
    openssl = require("openssl")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> tuple[str, str]:
    return make_certificate(str(tmp_path_factory.mktemp("tls")))
