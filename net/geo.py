"""Who and where the client is: trusted proxies, X-Forwarded-For and the client's region.

`geographic` (decisions.md section 4) takes the client's region from, in order:
1. the listener's `geo` map (CIDR -> region; the most specific matching prefix wins),
2. `geo_database`, a MaxMind file, when the `maxminddb` package is installed (read lazily: without
   the package a configured database is a clear error at construction, never a silent fallback),
3. the `region_header` request header, honoured only when the peer is one of `trusted_proxies`.

`trusted_proxies` (CIDRs) also decides which X-Forwarded-For entries are believed: the client is the
rightmost address not in a trusted network (nginx's `real_ip_recursive`).

Addresses are matched by integer: for each prefix length in use, a dict from the address's top bits
to the value, tried longest first, so a lookup costs one parse and a few dict probes.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:  # maxminddb is optional: imported when a geo_database is configured
    from maxminddb import Reader

V = TypeVar("V")


def parse_ip(text: str) -> tuple[int, int] | None:
    """(version, address as int) for a textual IPv4/IPv6 address; IPv4-mapped IPv6 counts as IPv4."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):  # ValueError: embedded NUL
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, text.split("%", 1)[0])
    except (OSError, ValueError):  # ValueError: embedded NUL
        return None
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return 4, int.from_bytes(packed[12:], "big")
    return 6, int.from_bytes(packed, "big")


class PrefixTable(Generic[V]):
    """Longest-prefix match of addresses against CIDRs."""

    def __init__(self, entries: Iterable[tuple[str, V]], what: str) -> None:
        by_length: dict[tuple[int, int], dict[int, V]] = {}
        for cidr, value in entries:
            try:
                network = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{what}: {cidr!r} is not an IP address or CIDR network") from None
            mapped = network.network_address.ipv4_mapped if network.version == 6 else None
            if mapped is not None and network.prefixlen >= 96:
                network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
            prefix_value = int(network.network_address) >> (network.max_prefixlen - network.prefixlen)
            by_length.setdefault((network.version, network.prefixlen), {})[prefix_value] = value
        self._tables = {
            version: [
                (total - bits, table)
                for (v, bits), table in sorted(by_length.items(), key=lambda item: -item[0][1])
                if v == version
            ]
            for version, total in ((4, 32), (6, 128))
        }

    def __bool__(self) -> bool:
        return any(self._tables.values())

    def lookup(self, address: tuple[int, int] | None) -> V | None:
        if address is None:
            return None
        version, value = address
        for shift, table in self._tables[version]:
            found = table.get(value >> shift)
            if found is not None:
                return found
        return None


class TrustedProxies:
    def __init__(self, cidrs: Iterable[str]) -> None:
        self._table: PrefixTable[bool] = PrefixTable(((c, True) for c in cidrs), "trusted_proxies")

    def __bool__(self) -> bool:
        return bool(self._table)

    def __contains__(self, ip: str) -> bool:
        return self._table.lookup(parse_ip(ip)) is not None

    def effective_client_ip(self, peer_ip: str, xff_header: bytes | None) -> str:
        """The client's address: the peer, unless the peer is a trusted proxy; then the rightmost
        X-Forwarded-For entry that is not a trusted proxy (the leftmost if all are). An entry that is
        not an address stops the walk: nothing left of it can be believed."""
        if not xff_header or not self._table or peer_ip not in self:
            return peer_ip
        client = peer_ip
        for entry in reversed(xff_header.split(b",")):
            text = entry.strip().decode("latin-1")
            address = parse_ip(text)
            if address is None:
                break
            client = text
            if self._table.lookup(address) is None:
                break
        return client


class GeoResolver:
    """Client -> region name, for the `geographic` strategy."""

    def __init__(
        self,
        cidr_map: Mapping[str, str],
        trusted_proxies: Iterable[str],
        region_header: str | None,
        database_path: str | None = None,
    ) -> None:
        self._cidr_map: PrefixTable[str] = PrefixTable(cidr_map.items(), "geo")
        self.trusted = TrustedProxies(trusted_proxies)
        # Lower-case, as RequestView.header() takes it.
        self.region_header = region_header.lower().encode("latin-1") if region_header else None
        self._database = _open_database(database_path) if database_path else None

    def region_for(self, peer_ip: str, header_value: bytes | None, client_ip: str | None = None) -> str | None:
        """The region of the client, or None when unknown. `client_ip` is the client behind trusted
        proxies (default: the peer itself); the region header is believed only from a trusted peer."""
        ip = client_ip or peer_ip
        if self._cidr_map:
            region = self._cidr_map.lookup(parse_ip(ip))
            if region is not None:
                return region
        database = self._database
        if database is not None:
            region = _database_region(database, ip)
            if region is not None:
                return region
        if header_value and self.trusted and peer_ip in self.trusted:
            region = header_value.strip().decode("latin-1")
            return region or None
        return None


def _database_region(database: Reader, ip: str) -> str | None:
    try:
        record = database.get(ip)
    except ValueError:  # not an address
        return None
    return region_from_record(record)


def region_from_record(record: object) -> str | None:
    """A region from a MaxMind record: a custom database's `region` (a string, or the record itself
    when it is one), else the country ISO code of GeoIP2/GeoLite2 Country and City, else the
    continent code; so `geo` regions can be named "us-east-1" with a custom file or "US"/"EU" with
    MaxMind's own."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    region = record.get("region")
    if isinstance(region, str):
        return region
    for section, field in (("country", "iso_code"), ("registered_country", "iso_code"), ("continent", "code")):
        names = record.get(section)
        code = names.get(field) if isinstance(names, dict) else None
        if isinstance(code, str):
            return code
    return None


def _open_database(path: str) -> Reader:
    try:
        import maxminddb
    except ImportError:
        raise RuntimeError(
            f"geo_database {path!r} needs the 'maxminddb' package: pip install maxminddb"
        ) from None
    try:
        return maxminddb.open_database(path)
    except (OSError, ValueError) as error:
        raise RuntimeError(f"geo_database {path!r} cannot be read: {error}") from None
