"""Issue 17: the self-signed certificate is a server leaf, not a CA."""

import socket
import ssl
import threading

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from appliance.net.tls import make_self_signed

HOST = "mail.example.test"


def test_self_signed_certificate_is_a_leaf_for_the_hostname():
    """092f303 made it CA:TRUE with keyCertSign: whoever got the key could
    issue certificates for any name to a client told to trust ours."""
    cert = x509.load_pem_x509_certificate(make_self_signed(HOST)[0])
    ext = cert.extensions
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.value.ca is False and basic.critical
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]


def test_a_client_that_trusts_the_leaf_verifies_it(tmp_path):
    """The reason it was a CA: clients given it as their CA file. They take
    a self-signed leaf as its own anchor (name checked, no partial chains)."""
    cert_pem, key_pem = make_self_signed(HOST)
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(cert_path), str(key_path))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                server.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = ssl.create_default_context(cafile=str(cert_path))
    client.verify_flags &= ~getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client.wrap_socket(raw, server_hostname=HOST) as tls:
                assert tls.getpeercert()["subject"] == ((("commonName", HOST),),)
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            try:
                client.wrap_socket(raw, server_hostname="other.example.test").close()
                raise AssertionError("a wrong name was accepted")
            except ssl.SSLCertVerificationError:
                pass
    finally:
        thread.join(10)
        listener.close()
