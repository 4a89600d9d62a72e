"""The server-side TLS context (net/tls.py) a listener builds from its certificate files."""
from __future__ import annotations

import ssl

import trustme

from pmdaemon.config.model import SslConfig
from pmdaemon.net.tls import MOZILLA_INTERMEDIATE_CIPHERS, server_context

from support.looprunner import TlsFiles


def test_server_context_uses_mozilla_intermediate():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        files = TlsFiles(Path(directory), trustme.KeyType.RSA)
        context = server_context(SslConfig(enabled=True, cert_file=str(files.cert_file), key_file=str(files.key_file)),
                                 ("http/1.1",))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.TLSv1_3
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and tls12 <= set(MOZILLA_INTERMEDIATE_CIPHERS.split(":"))
    assert context.options & ssl.OP_NO_RENEGOTIATION

