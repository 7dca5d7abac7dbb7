"""The secure sum's settings: what the server asks for (``SecureSumConfig``) and each site's own floor (``SitePolicy``).

The server's settings reach a site inside a task, so a site never takes them on trust: it compares them with the
policy its admin wrote in ``local/secure_sum.json`` and refuses the job, before it makes or sends a single key, when
the server asks for less. The server may always ask for more.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pharmafl.secure_sum.encoding import FixedPoint, choose_fixed_point
from pharmafl.secure_sum.graph import default_neighbours

AGGREGATIONS = ("mean", "fra-lora")
POLICY_FILE = "secure_sum.json"  # a site's policy, in its local/ folder beside privacy.json


class PolicyError(ValueError):
    """The server's settings are weaker than this site's policy, or the policy itself is malformed."""


def _known_fields(cls, data: Mapping, what: str, error: type[Exception]) -> dict:
    """``data`` as keyword arguments of the dataclass ``cls``; ``error`` when it is no dict or names unknown fields."""
    if not isinstance(data, Mapping):
        raise error(f"{what} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"unknown {what} {unknown}; known: {sorted(names)}")
    return dict(data)


@dataclass(frozen=True)
class SecureSumConfig:
    """Settings every party of a job must share, chosen by the server.

    Args:
        threshold: t, the sites needed to unmask a round (Shamir threshold).
        clip: update values are clipped to ``[-clip, clip]``.
        max_weight: client weights (local steps) are clipped to this.
        fraction_bits: quantization ``2^-fraction_bits``; None: as many as the modulus allows (at most 40).
        modulus_bits: 32 or 64; None: chosen (64 unless fraction_bits fits in 32).
        neighbours: None for pairwise masks between all sites, 0 for the SecAgg+ default k = 2 ceil(log2 n), or k.
        server_blind: add a group mask known to the sites only; the server sees just a masked aggregate.
        aggregation: ``mean`` (linear) or ``fra-lora`` (the server factorises the mean: not server-blind).
        require_signed: the server refuses advertisements not signed by a startup-kit key under the root CA (each
            site decides for itself by its own policy).
        rounds: rounds the key setup makes mask keys for (rounds 0 .. rounds - 1).
    """

    threshold: int
    clip: float = 8.0
    max_weight: float = 1e4
    fraction_bits: int | None = None
    modulus_bits: int | None = None
    neighbours: int | None = None
    server_blind: bool = False
    aggregation: str = "mean"
    require_signed: bool = False
    rounds: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold < 1:
            raise ValueError(f"threshold must be a positive integer, got {self.threshold!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.server_blind and self.aggregation != "mean":
            raise ValueError(
                f"server-blind secure sum supports only linear aggregation (the mean), not {self.aggregation}: "
                "the server must see the mean update to factorise it"
            )
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}")
        if self.neighbours is not None and (not isinstance(self.neighbours, int) or self.neighbours < 0):
            raise ValueError(f"neighbours must be None, 0 (automatic) or positive, got {self.neighbours!r}")

    def fixed_point(self, max_clients: int) -> FixedPoint:
        return choose_fixed_point(self.clip, self.max_weight, max_clients, self.fraction_bits, self.modulus_bits)

    def graph_degree(self, sites: int) -> int | None:
        """k of the neighbour graph for ``sites`` sites; None when every pair masks (the complete graph)."""
        if self.neighbours is None:
            return None
        degree = self.neighbours or default_neighbours(sites)
        return None if degree >= sites - 1 else degree

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> SecureSumConfig:
        """From a task's payload; an unknown field is an error, not ignored."""
        return cls(**_known_fields(cls, data, "secure-sum settings", ValueError))


@dataclass(frozen=True)
class SitePolicy:
    """A site's own floor for the secure sum (``local/secure_sum.json``); the server's settings may only be stricter.

    Args:
        roster: the consortium's client sites. Advertisements from anyone else are refused. None: no roster (the
            FLARE simulator without a policy file): the site takes the server's list of sites, and says so.
        min_threshold: lowest t this site accepts; None: the smallest t with 2t > n + colluding_sites (n the
            roster's size), i.e. a majority of the roster when no site colludes.
        colluding_sites: how many other sites this site assumes may collude with the server. The consistency check
            keeps every single update hidden only while 2t > n + colluding_sites.
        require_signed: every peer's advertisement must be signed by its startup-kit key under the consortium root
            CA; None: required whenever this site runs from a startup kit.
        require_server_blind: refuse a job whose server would see the aggregate.
        min_neighbours: lowest SecAgg+ neighbour degree k; None: SecAgg+'s 2 ceil(log2 n) for the roster size (the
            complete graph when that reaches n - 1).
        pinned_certificates: ``{site: SHA-256 of its certificate (DER, hex)}``: that site's advertisement must carry
            exactly this certificate, so even whoever holds the root CA's key cannot mint a stand-in for it later
            (``pharmafl provision`` and ``poc up`` pin every site's kit certificate).
    """

    roster: tuple[str, ...] | None = None
    min_threshold: int | None = None
    colluding_sites: int = 0
    require_signed: bool | None = None
    require_server_blind: bool = False
    min_neighbours: int | None = None
    pinned_certificates: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.roster is not None:
            roster = tuple(self.roster)
            if not roster or not all(isinstance(name, str) and name for name in roster):
                raise PolicyError(f"the roster must be a non-empty list of site names, got {self.roster!r}")
            if len(set(roster)) != len(roster):
                raise PolicyError(f"the roster names a site twice: {sorted(roster)}")
            object.__setattr__(self, "roster", roster)
        for name in ("min_threshold", "min_neighbours"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PolicyError(f"{name} must be a positive integer or null, got {value!r}")
        if isinstance(self.colluding_sites, bool) or not isinstance(self.colluding_sites, int):
            raise PolicyError(f"colluding_sites must be a non-negative integer, got {self.colluding_sites!r}")
        if self.colluding_sites < 0:
            raise PolicyError(f"colluding_sites must be a non-negative integer, got {self.colluding_sites!r}")
        if self.pinned_certificates is not None:
            pins = self.pinned_certificates
            if not isinstance(pins, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in pins.items()
            ):
                raise PolicyError("pinned_certificates must map site names to SHA-256 hex digests")
            if self.roster is not None and set(pins) - set(self.roster):
                raise PolicyError(
                    f"pinned_certificates names sites outside the roster: {sorted(set(pins) - set(self.roster))}"
                )
            object.__setattr__(self, "pinned_certificates", dict(pins))
        for name in ("require_signed", "require_server_blind"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise PolicyError(f"{name} must be true, false{' or null' if name == 'require_signed' else ''}")

    # -- derived floors
    def members(self, announced: Sequence[str]) -> tuple[str, ...]:
        """The consortium as this site knows it: its roster, else the sites the server announced."""
        return self.roster if self.roster is not None else tuple(sorted(announced))

    def threshold_floor(self, announced: Sequence[str]) -> int:
        """The lowest t this site accepts: 2t > n + colluding_sites, at least 2, at least ``min_threshold``."""
        n = len(self.members(announced))
        return max(2, (n + self.colluding_sites) // 2 + 1, self.min_threshold or 0)

    def neighbour_floor(self, announced: Sequence[str]) -> int:
        n = len(self.members(announced))
        return self.min_neighbours or default_neighbours(n)

    def signatures_required(self, has_startup_kit: bool) -> bool:
        return has_startup_kit if self.require_signed is None else self.require_signed

    def config_problem(self, config: SecureSumConfig, announced: Sequence[str]) -> str | None:
        """Why this site refuses the server's ``config`` for the sites it ``announced`` (None: acceptable)."""
        members = self.members(announced)
        strangers = sorted(set(announced) - set(members))
        if strangers:
            return f"the server names sites outside this site's roster: {strangers} (roster {sorted(members)})"
        floor = self.threshold_floor(announced)
        if config.threshold < floor:
            return (
                f"the server asks for threshold {config.threshold}, below this site's floor {floor} "
                f"(roster of {len(members)}, colluding_sites {self.colluding_sites}: 2t must exceed "
                f"{len(members) + self.colluding_sites})"
            )
        if self.require_server_blind and not config.server_blind:
            return "this site requires the server-blind mode and the server's settings switch it off"
        degree = config.graph_degree(len(announced))
        floor_k = self.neighbour_floor(announced)
        if degree is not None and degree < floor_k:
            return f"the server asks for {degree} masking neighbours per site, below this site's floor {floor_k}"
        return None

    # -- the file
    def to_dict(self) -> dict:
        data = asdict(self)
        data["roster"] = list(self.roster) if self.roster is not None else None
        data["pinned_certificates"] = dict(self.pinned_certificates) if self.pinned_certificates else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> SitePolicy:
        values = _known_fields(cls, data, "secure-sum policy settings", PolicyError)
        if values.get("roster") is not None:
            if not isinstance(values["roster"], list):
                raise PolicyError(f"the roster must be a list of site names, got {values['roster']!r}")
            values["roster"] = tuple(values["roster"])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> SitePolicy:
        """The policy in ``path``; PolicyError (one sentence) when it is unreadable or malformed."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise PolicyError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno})") from err
        except PolicyError as err:
            raise PolicyError(f"'{path}': {err}") from err
        except OSError as err:
            raise PolicyError(f"cannot read the secure-sum policy '{path}': {err.strerror}") from err

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
