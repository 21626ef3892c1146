"""Which addresses the controller may call runtimes at (pure). Link-local addresses — where
cloud metadata services live — are refused always; with an allow-list (`--runtime-networks
CIDR,...`) only addresses inside it are allowed, so that a workspace cannot point the
controller at internal services. Without one, loopback and private addresses stay allowed
(pods live on private networks, local runs on loopback)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ALWAYS_REFUSED: tuple[Network, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
)


@dataclass(frozen=True)
class RuntimeNetworks:
    allowed: tuple[Network, ...] = ()  # empty: everything but ALWAYS_REFUSED

    @classmethod
    def parse(cls, text: str) -> RuntimeNetworks:
        """From `10.0.0.0/8,fd00::/8`; raises ValueError naming the bad entry."""
        allowed = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                allowed.append(ipaddress.ip_network(item, strict=False))
            except ValueError as error:
                raise ValueError(f"{item!r} is not a network (CIDR): {error}") from error
        return cls(tuple(allowed))

    def refusal(self, address: str) -> str | None:
        """Why the controller must not call `address` (an IP literal), or None."""
        ip = ipaddress.ip_address(address.strip("[]").split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in ALWAYS_REFUSED):
            return f"{ip} is link-local (where cloud metadata services live): never allowed"
        if self.allowed and not any(ip in network for network in self.allowed):
            return f"{ip} is outside the allowed runtime networks ({self.describe()})"
        return None

    def host_refusal(self, host: str) -> str | None:
        """Like refusal() for a URL's host when it is an IP literal; None for a name (names
        are checked when they are resolved, at every call)."""
        try:
            return self.refusal(host)
        except ValueError:
            return None

    def describe(self) -> str:
        return ",".join(str(network) for network in self.allowed) or "any but link-local"
