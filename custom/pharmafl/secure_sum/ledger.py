"""The signed round ledger: hash-chained records of what the secure sum did, kept by the server and by every site.

The server appends one record per job (``setup``: settings, the app's hash, every site's advertisement, the initial
model's digest) and one per round (``round``: participants, the accepted uploads and their digests, the sites'
consistency signatures over the set U, who revealed shares, the digest of the resulting global model). Each record
carries the hash of the one before it, so editing any record breaks every later link. Every site keeps its own chain
of what it signed, received and sent, and checks each new server record against it; ``verify_*`` do the same offline
(``pharmafl ledger verify``).

Canonical form: a record is hashed as compact JSON with sorted keys, without its own ``hash`` field; bytes are hex.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pharmafl.secure_sum.keys import (
    Advertisement,
    advertisement_problem,
    consistency_statement,
    participants_digest,
    verify_ed25519,
)

LEDGER_FILE = "ledger.jsonl"  # the server's, in its run folder
SITE_LEDGER_FILE = "site_ledger.jsonl"  # a site's own, in its run folder
GENESIS = "0" * 64


def canonical(record: Mapping) -> bytes:
    return json.dumps({k: v for k, v in record.items() if k != "hash"}, sort_keys=True, separators=(",", ":")).encode()


def record_hash(record: Mapping) -> str:
    return hashlib.sha256(canonical(record)).hexdigest()


def model_digest(weights: Mapping[str, object] | None) -> str:
    """SHA-256 of named arrays (names, dtypes, shapes, bytes): the same on the server and at every site."""
    digest = hashlib.sha256()
    for name in sorted(weights or {}):
        array = np.ascontiguousarray(np.asarray(weights[name]))
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def advertisement_json(advert: Advertisement) -> dict:
    """An advertisement with its bytes in hex, as the setup record keeps it."""
    return {
        "site": advert.site,
        "job_id": advert.job_id,
        "mask_publics": [key.hex() for key in advert.mask_publics],
        "share_public": advert.share_public.hex(),
        "signing_public": advert.signing_public.hex(),
        "kit_signature": advert.kit_signature.hex(),
        "kit_certificate": advert.kit_certificate.decode() if advert.kit_certificate else "",
    }


def advertisement_from_json(data: Mapping) -> Advertisement:
    return Advertisement(
        site=data["site"],
        job_id=data["job_id"],
        mask_publics=[bytes.fromhex(key) for key in data["mask_publics"]],
        share_public=bytes.fromhex(data["share_public"]),
        signing_public=bytes.fromhex(data["signing_public"]),
        kit_signature=bytes.fromhex(data["kit_signature"]),
        kit_certificate=data["kit_certificate"].encode(),
    )


def advertisements_digest(adverts: Sequence[Advertisement]) -> str:
    return hashlib.sha256(
        json.dumps(sorted((advertisement_json(a) for a in adverts), key=lambda a: a["site"]), sort_keys=True).encode()
    ).hexdigest()


def setup_record(
    job_id: str, app_sha256: str, config: Mapping, sites: Sequence[str], adverts: Sequence[Advertisement], model: str
) -> dict:
    """The server's first record of a job: settings, app, sites, every advertisement, the initial model's digest."""
    return {
        "kind": "setup",
        "job_id": job_id,
        "app_sha256": app_sha256,
        "config": dict(config),
        "sites": list(sites),
        "advertisements": [advertisement_json(advert) for advert in adverts],
        "model_sha256": model,
    }


def round_record(round_number: int, model_before: str, model_after: str, outcome, reason: str = "", **extra) -> dict:
    """The server's record of a round: ``outcome`` is the ``SecureSumResult`` of an unmasked round, or the
    evidence dict ``SecureSumServer.abandon_round`` returns for a failed one (then ``reason`` says why)."""
    record = {"kind": "round", "round": round_number, "model_before": model_before, "model_after": model_after}
    if isinstance(outcome, Mapping):
        record.update(status="failed", reason=reason, revealed_by=[], **outcome)
    else:
        record.update(
            status="ok",
            participants=sorted(set(outcome.uploaded) | set(outcome.dropped)),
            accepted=outcome.upload_digests,
            dropped=outcome.dropped,
            signatures=outcome.signatures,
            statement_sha256=outcome.statement_sha256,
            revealed_by=outcome.survivors,
            total_weight=outcome.total_weight,
        )
    record.update(extra)
    return record


class Ledger:
    """An append-only hash chain of JSON records, mirrored to a JSON-lines file when ``path`` is given."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self.records: list[dict] = []

    @property
    def head(self) -> str:
        return self.records[-1]["hash"] if self.records else GENESIS

    def append(self, record: Mapping) -> dict:
        """Chain ``record`` onto the head; returns it with ``prev`` and ``hash``."""
        chained = {**{k: v for k, v in record.items() if k not in ("prev", "hash")}, "prev": self.head}
        chained["hash"] = record_hash(chained)
        self.records.append(chained)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(chained, sort_keys=True) + "\n")
        return chained


def read_ledger(path: str | os.PathLike) -> list[dict]:
    """The records of a ledger file; ValueError naming the line that is not JSON."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not JSON ({err.msg})") from err
    return records


def chain_problem(records: Sequence[Mapping]) -> str | None:
    """The first record whose hash or link is wrong (by its position, 1-based), None when the chain holds."""
    previous = GENESIS
    for number, record in enumerate(records, start=1):
        if record.get("prev") != previous:
            return f"record {number} ({_label(record)}) does not link to the record before it"
        if record.get("hash") != record_hash(record):
            return f"record {number} ({_label(record)}) was altered: its content does not match its hash"
        previous = record["hash"]
    return None


def round_record_problem(record: Mapping, setup: Mapping) -> str | None:
    """Why a server round record is not what an honest round produces (signatures, U, participants), else None."""
    if record.get("kind") != "round":
        return f"expected a round record, got {record.get('kind')!r}"
    if record.get("status") not in ("ok", "failed"):
        return f"round {record.get('round')} has status {record.get('status')!r}"
    uploaded = sorted(record.get("accepted", {}))
    participants = sorted(record.get("participants", []))
    if not set(uploaded) <= set(participants):
        strangers = sorted(set(uploaded) - set(participants))
        return f"round {record['round']}: accepted uploads from non-participants {strangers}"
    signatures = record.get("signatures", {})
    if record["status"] == "failed" and not signatures:
        return None
    threshold = int(setup["config"]["threshold"])
    if len(uploaded) < threshold:
        return f"round {record['round']}: U has {len(uploaded)} sites, below the threshold {threshold}"
    keys = {a["site"]: bytes.fromhex(a["signing_public"]) for a in setup["advertisements"]}
    round_number = int(record["round"])
    statement = consistency_statement(setup["job_id"], round_number, uploaded, participants_digest(participants))
    if record.get("statement_sha256") != hashlib.sha256(statement).hexdigest():
        return f"round {record['round']}: the consistency statement does not match U and the participants"
    valid = [
        site
        for site, signature in signatures.items()
        if site in uploaded and site in keys and verify_ed25519(keys[site], bytes.fromhex(signature), statement)
    ]
    if len(valid) != len(signatures):
        return f"round {record['round']}: signatures that do not verify: {sorted(set(signatures) - set(valid))}"
    if record["status"] == "ok" and len(valid) < threshold:
        return f"round {record['round']}: only {len(valid)} consistency signatures, the threshold is {threshold}"
    revealed = set(record.get("revealed_by", []))
    if not revealed <= set(valid):
        return f"round {record['round']}: shares revealed by sites that did not sign U: {sorted(revealed - set(valid))}"
    return None


def verify_server_ledger(records: Sequence[Mapping], root_ca_pem: bytes = b"") -> str | None:
    """The first problem of a server ledger (chain, setup, every round record), None when it verifies."""
    if not records:
        return "the ledger is empty"
    problem = chain_problem(records)
    if problem:
        return problem
    setup = records[0]
    if setup.get("kind") != "setup":
        return "record 1 is not the setup record"
    if root_ca_pem:
        for data in setup["advertisements"]:
            advert_problem = advertisement_problem(advertisement_from_json(data), root_ca_pem)
            if advert_problem:
                return f"record 1 (setup): {advert_problem}"
    for number, record in enumerate(records[1:], start=2):
        problem = round_record_problem(record, setup)
        if problem:
            return f"record {number} ({_label(record)}): {problem}"
    return None


def record_model_digest(record: Mapping) -> str:
    """The global model's digest after a record: the setup's initial model, a round's resulting model."""
    return record.get("model_after", record.get("model_sha256", ""))


def cross_check(server_records: Sequence[Mapping], site_records: Sequence[Mapping], site: str) -> str | None:
    """The first contradiction between a site's own chain and the server's ledger, None when they agree.

    The server's setup record must hold the job, settings, advertisements and app the site saw; for every round the
    site masked in, the server's record must carry the participants the site masked for and, if it accepted the
    site's upload, the digest the site sent; where the site signed U, the record's U must be the one it signed; every
    model the site received must be the one the ledger says the round produced.
    """
    problem = chain_problem(site_records)
    if problem:
        return f"{site}'s own ledger: {problem}"
    if not server_records:
        return "the server's ledger is empty"
    by_round = {int(r["round"]): r for r in server_records if r.get("kind") == "round"}
    by_hash = {r["hash"]: r for r in server_records}
    setup = server_records[0]
    for number, entry in enumerate(site_records, start=1):
        kind, where = entry.get("kind"), f"{site}'s record {number} ({entry.get('kind')})"
        problem = None
        if kind == "setup":
            problem = _setup_difference(setup, entry)
        elif kind in ("masked", "signed"):
            record = by_round.get(int(entry["round"]))
            if record is None:
                problem = f"the server's ledger has no record of round {entry['round']}"
            elif kind == "masked":
                problem = _masked_difference(record, entry, site)
            elif sorted(record.get("accepted", {})) != sorted(entry["uploaded"]):
                problem = f"round {entry['round']}: the server's U differs from the U {site} signed"
        elif kind == "received":
            record = by_hash.get(entry.get("ledger_head"))
            if record is None:
                problem = f"the ledger head {entry.get('ledger_head')} {site} checked is not in the server's ledger"
            elif record_model_digest(record) != entry.get("model_sha256"):
                problem = f"{site} received a global model other than the ledger's after {_label(record)}"
        if problem:
            return f"{where}: {problem}"
    return None


def _setup_difference(setup: Mapping, entry: Mapping) -> str | None:
    if setup.get("kind") != "setup":
        return "the server's ledger does not start with a setup record"
    if setup.get("job_id") != entry.get("job_id") or setup.get("config") != entry.get("config"):
        return "the server's setup record names another job or other settings than the site was given"
    adverts = [advertisement_from_json(a) for a in setup.get("advertisements", [])]
    if entry.get("advertisements_sha256") != advertisements_digest(adverts):
        return "the server's setup record holds other advertisements than the site received"
    if entry.get("app_sha256") != setup.get("app_sha256"):
        return f"the server ran app {setup.get('app_sha256')}, the site ran {entry.get('app_sha256')}"
    return None


def _masked_difference(record: Mapping, entry: Mapping, site: str) -> str | None:
    if sorted(record["participants"]) != sorted(entry["participants"]):
        return f"round {entry['round']} participants differ from those {site} masked for"
    sent = record.get("accepted", {}).get(site)
    if sent is not None and sent != entry["upload_sha256"]:
        return f"the server recorded another upload of {site} in round {entry['round']}"
    return None


def expected_model_digest(server_records: Sequence[Mapping]) -> str:
    """The digest of the global model the next task must carry: the latest record's."""
    return record_model_digest(server_records[-1]) if server_records else ""


def verify_run(
    server_dir: str | os.PathLike, site_dirs: Sequence[str | os.PathLike] = (), root_ca_pem: bytes = b""
) -> list[str]:
    """Check a finished run offline: the server's ledger, then each site's own chain against it.

    Returns one line per ledger checked, ``OK ...`` or ``BAD ...`` naming the first bad record; raises
    FileNotFoundError when a folder holds no ledger.

    Args:
        server_dir: the server's run folder (holding ``ledger.jsonl``), or a folder above it.
        site_dirs: site run folders (holding ``site_ledger.jsonl``), or folders above them.
        root_ca_pem: the consortium root CA; when given, every advertisement in the setup record must verify.
    """
    server_path = _find(server_dir, LEDGER_FILE)
    server = read_ledger(server_path)
    problem = verify_server_ledger(server, root_ca_pem)
    lines = [f"BAD {server_path}: {problem}" if problem else f"OK {server_path}: {len(server)} records"]
    for site_dir in site_dirs:
        site_path = _find(site_dir, SITE_LEDGER_FILE)
        own = read_ledger(site_path)
        site = next((entry.get("site") for entry in own if entry.get("kind") == "setup"), None) or "?"
        problem = cross_check(server, own, site)
        lines.append(f"BAD {site_path}: {problem}" if problem else f"OK {site_path}: {site}, {len(own)} records agree")
    return lines


def _find(folder: str | os.PathLike, name: str) -> Path:
    root = Path(folder)
    if root.is_file():
        return root
    found = sorted(root.rglob(name)) if root.is_dir() else []
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise FileNotFoundError(f"'{root}' holds {what} {name}; give the run folder of one job")
    return found[0]


def _label(record: Mapping) -> str:
    if record.get("kind") == "round":
        return f"round {record.get('round')}"
    return str(record.get("kind"))
