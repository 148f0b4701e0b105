"""A private certificate authority and a server certificate for 127.0.0.1, made with `openssl`.

For tests of TLS connections: nothing here is trusted by the system, so a client verifies the server
only when it is given `ca` (the CA's certificate) explicitly.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA's certificate (PEM): what a client trusts
    cert: Path  # the server's certificate, signed by the CA, for 127.0.0.1 and localhost
    key: Path  # the server's private key


def make_certificates(directory: Path, name: str = "changeflow-test") -> TlsFiles:
    """A new CA (key + self-signed certificate) and a server certificate it signed, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(ca_key),
             "-out", str(ca), "-subj", f"/CN={name} CA")  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=127.0.0.1")  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-days", "2", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return TlsFiles(ca=ca, cert=cert, key=key)


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')[-500:]}")
