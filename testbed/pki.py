"""The testbed's certificates and kubeconfigs (Python ``cryptography``; nothing shells out).

One CA signs a serving certificate for every component and the client certificates
(admin as ``system:masters``, the controller-manager, the scheduler, kwok; the real worker
adds its own with ``issue_client_cert``); a second CA is the aggregation layer's front
proxy; an RSA pair signs service-account tokens. Kubeconfigs embed everything, so a copy
works anywhere.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from testbed.layout import HOST, PKI, PORTS, RUN_DIR, SERVICE_CIDR

_NO_KEY_USAGE = {
    "content_commitment": False,
    "key_encipherment": False,
    "data_encipherment": False,
    "key_agreement": False,
    "encipher_only": False,
    "decipher_only": False,
}


def _save_key(name: str, key: CertificateIssuerPrivateKeyTypes) -> None:
    path = PKI / f"{name}.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _save_cert(name: str, cert: x509.Certificate) -> None:
    (PKI / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _make_ca(
    file: str, cn: str, *, now: dt.datetime, expires: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(cn)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(expires + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, **_NO_KEY_USAGE
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _save_key(file, key)
    _save_cert(file, cert)
    return key, subject


def _serving_names() -> x509.SubjectAlternativeName:
    service_ip = next(ipaddress.IPv4Network(SERVICE_CIDR).hosts())
    dns = (
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
    )
    return x509.SubjectAlternativeName(
        [
            *(x509.DNSName(d) for d in dns),
            x509.IPAddress(ipaddress.ip_address(HOST)),
            x509.IPAddress(ipaddress.ip_address("::1")),
            x509.IPAddress(service_ip),
        ]
    )


def _issue(
    file: str,
    subject: x509.Name,
    *,
    server: bool,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    now: dt.datetime,
    expires: dt.datetime,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(expires)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=False, crl_sign=False, **_NO_KEY_USAGE
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(_serving_names(), critical=False)
    _save_key(file, key)
    _save_cert(file, builder.sign(ca_key, hashes.SHA256()))


def write_pki() -> None:
    """CA, one serving cert for every component, client certs, the SA signing key pair."""
    PKI.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    expires = now + dt.timedelta(days=365)
    ca = _make_ca("ca", "fednode-testbed-ca", now=now, expires=expires)
    # The aggregation layer's own CA (requestheader authentication of proxied requests).
    proxy_ca = _make_ca(
        "front-proxy-ca", "fednode-testbed-front-proxy-ca", now=now, expires=expires
    )

    def issue(
        file: str,
        subject: x509.Name,
        *,
        server: bool = False,
        by: tuple[ec.EllipticCurvePrivateKey, x509.Name] = ca,
    ) -> None:
        _issue(file, subject, server=server, ca_key=by[0], ca_name=by[1], now=now, expires=expires)

    issue("serving", _name("fednode-testbed-apiserver"), server=True)
    issue("admin", _name("fednode-testbed-admin", "system:masters"))
    for component in ("kube-controller-manager", "kube-scheduler"):
        issue(component, _name(f"system:{component}"))
    issue("kwok", _name("fednode-testbed-kwok", "system:masters"))
    issue("front-proxy-client", _name("front-proxy-client"), by=proxy_ca)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _save_key("sa", sa_key)
    (PKI / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def issue_client_cert(file: str, common_name: str, organization: str | None) -> None:
    """One more client certificate from the testbed CA (written to ``PKI/<file>.crt/.key``)."""
    ca_key = serialization.load_pem_private_key((PKI / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{PKI / 'ca.key'} is not the EC key write_pki makes")
    ca_cert = x509.load_pem_x509_certificate((PKI / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organization))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _save_key(file, key)
    _save_cert(file, cert)


def kubeconfig_text(
    user: str,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> str:
    """A kubeconfig with everything embedded (client certs or a bearer token)."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    credentials: dict[str, str] = {}
    if cert is not None and key is not None:
        credentials = {"client-certificate-data": b64(cert), "client-key-data": b64(key)}
    elif token is not None:
        credentials = {"token": token}
    context: dict[str, str] = {"cluster": "fednode-testbed", "user": user}
    if namespace:
        context["namespace"] = namespace
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fednode-testbed",
                    "cluster": {
                        "server": f"https://{HOST}:{PORTS['kube-apiserver']}",
                        "certificate-authority-data": b64(PKI / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "fednode-testbed", "context": context}],
            "current-context": "fednode-testbed",
        },
        sort_keys=False,
    )


def write_kubeconfig(who: str) -> None:
    """``RUN_DIR/<who>.kubeconfig`` with the client certificate ``PKI/<who>.crt``."""
    path = RUN_DIR / f"{who}.kubeconfig"
    path.write_text(kubeconfig_text(who, cert=PKI / f"{who}.crt", key=PKI / f"{who}.key"))
    path.chmod(0o600)


def write_kubeconfigs() -> None:
    for who in ("admin", "kube-controller-manager", "kube-scheduler", "kwok"):
        write_kubeconfig(who)
