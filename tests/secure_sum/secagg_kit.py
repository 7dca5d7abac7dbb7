"""Test kit for the secure sum: a throwaway consortium CA with certificates shaped like FLARE 2.9's (client, server,
admin, CA), and ``Federation``, honest sites and an honest server driven through key setup and rounds."""

import dataclasses
import datetime

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pharmafl.secure_sum.config import SecureSumConfig, SitePolicy
from pharmafl.secure_sum.protocol import SecureSumClient, SecureSumServer

JOB = "job-1"


def _name(common_name: str, role: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if role:
        attributes.append(x509.NameAttribute(NameOID.UNSTRUCTURED_NAME, role))
    return x509.Name(attributes)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def make_ca(name: str = "consortium-root"):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_site_kit(
    ca, site: str, kind: str = "rsa", role: str | None = None, server_hosts: list[str] | None = None
) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for ``site`` issued by ``ca`` = (key, cert), as FLARE 2.9 issues them.

    Args:
        role: the subject's UNSTRUCTURED_NAME (``nvflare provision``: an admin's role; ``nvflare cert``: the kit
            type, e.g. "client" or "server"); None for a provisioned client or server.
        server_hosts: DNS names in the SubjectAlternativeName; FLARE 2.9 gives every certificate one (a site's and
            an admin's hold their own name, the server's its host names). Default: ``[site]``.
    """
    ca_key, ca_cert = ca
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(site, role))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    names = [x509.DNSName(host) for host in (server_hosts or [site])]
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def ca_pem(ca) -> bytes:
    return ca[1].public_bytes(serialization.Encoding.PEM)


def ca_key_pem(ca) -> bytes:
    return _pem_key(ca[0])


def site_names(n: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n + 1)]


class Federation:
    """n honest clients (each with a roster of all n) and an honest server, through key setup.

    ``run_round`` plays one round: uploads, the consistency check and the unmasking, with chosen dropouts.
    """

    def __init__(self, n: int, config: SecureSumConfig, kits=None, root_ca=b"", policy: SitePolicy | None = None):
        self.sites = site_names(n)
        config = dataclasses.replace(config, rounds=max(config.rounds, 4))  # mask keys for rounds 0..3
        self.config = config
        policy = policy or SitePolicy(roster=tuple(self.sites))
        self.clients = {
            site: SecureSumClient(
                site,
                JOB,
                config,
                *(kits[site] if kits else (b"", b"")),
                root_ca_pem=root_ca,
                policy=policy,
                announced=self.sites,
            )
            for site in self.sites
        }
        self.server = SecureSumServer(JOB, config, root_ca_pem=root_ca)
        adverts = self.server.register_advertisements([c.advertise() for c in self.clients.values()])
        for site, client in self.clients.items():
            self.server.register_key_shares(site, client.share_keys(adverts))

    def masked_uploads(self, round_number, updates, weights, sites):
        participants = self.server.start_round(round_number)
        return participants, {
            site: self.clients[site].mask(
                updates[site],
                weights[site],
                round_number,
                participants,
                self.server.group_seed_ciphertexts.get(site, b""),
            )
            for site in sites
        }

    def run_round(self, round_number, updates, weights, upload=None, sign=None, respond=None):
        """upload: sites that upload (default all participants); sign: uploaders that answer the consistency check
        (default all); respond: signers that answer the unmasking (default all)."""
        participants = self.server.participants()
        upload = participants if upload is None else upload
        _, uploads = self.masked_uploads(round_number, updates, weights, upload)
        for masked in uploads.values():
            assert self.server.receive_upload(masked, sender=masked.site) is None
        uploaded = self.server.consistency_targets()
        for site in uploaded if sign is None else sign:
            assert self.server.receive_signature(site, self.clients[site].consistency(round_number, uploaded)) is None
        requests = self.server.unmask_requests()
        respond = list(requests) if respond is None else respond
        return self.server.finish({site: self.clients[site].unmask(requests[site]) for site in respond})


def plaintext_mean(updates, weights, sites):
    total = sum(weights[s] for s in sites)
    return {k: sum(weights[s] * updates[s][k].astype(np.float64) for s in sites) / total for k in updates[sites[0]]}


def random_updates(rng, sites, shapes, scale=1.0):
    return {s: {name: rng.uniform(-scale, scale, shape) for name, shape in shapes.items()} for s in sites}
