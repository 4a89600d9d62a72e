"""Client address and region resolution: CIDR map, MaxMind file, trusted region header, X-Forwarded-For."""
import importlib.util

import pytest

from pmdaemon.net.geo import GeoResolver, PrefixTable, TrustedProxies, parse_ip, region_from_record

GEO = {
    "10.0.0.0/8": "us-west-1",
    "10.1.0.0/16": "us-east-1",
    "10.1.2.0/24": "eu-west-1",
    "10.1.2.3": "ap-south-1",
    "2001:db8::/32": "eu-west-1",
}


def test_parse_ip():
    assert parse_ip("10.0.0.1") == (4, 0x0A000001)
    assert parse_ip("::ffff:10.0.0.1") == (4, 0x0A000001)
    assert parse_ip("2001:db8::1") == (6, 0x20010DB8 << 96 | 1)
    assert parse_ip("fe80::1%eth0") == (6, 0xFE80 << 112 | 1)
    for bad in ("", "10.0.0", "10.0.0.256", "host", "1.2.3.4:80", "a\0b"):
        assert parse_ip(bad) is None


@pytest.mark.parametrize(
    "ip, region",
    [
        ("10.9.9.9", "us-west-1"),
        ("10.1.9.9", "us-east-1"),
        ("10.1.2.9", "eu-west-1"),
        ("10.1.2.3", "ap-south-1"),
        ("::ffff:10.1.9.9", "us-east-1"),
        ("2001:db8:1::5", "eu-west-1"),
        ("192.168.0.1", None),
        ("2001:db9::1", None),
        ("not-an-ip", None),
    ],
)
def test_cidr_map_most_specific_prefix_wins(ip, region):
    assert GeoResolver(GEO, (), None).region_for(ip, None) == region


def test_mapping_order_does_not_matter():
    reordered = dict(reversed(list(GEO.items())))
    assert GeoResolver(reordered, (), None).region_for("10.1.2.9", None) == "eu-west-1"


def test_ipv4_mapped_cidr_matches_ipv4_clients():
    table = PrefixTable([("::ffff:10.0.0.0/104", "x")], "geo")
    assert table.lookup(parse_ip("10.5.5.5")) == "x"
    assert table.lookup(parse_ip("11.5.5.5")) is None


def test_invalid_cidr_names_the_setting():
    with pytest.raises(ValueError, match=r"geo: '10\.0\.0\.0/33'"):
        GeoResolver({"10.0.0.0/33": "x"}, (), None)
    with pytest.raises(ValueError, match="trusted_proxies: 'proxy'"):
        GeoResolver({}, ("proxy",), None)


def test_region_header_only_from_trusted_proxies():
    resolver = GeoResolver({}, ("127.0.0.0/8",), "X-Region")
    assert resolver.region_header == b"x-region"
    assert resolver.region_for("127.0.0.1", b" us-east-1 ") == "us-east-1"
    assert resolver.region_for("192.0.2.1", b"us-east-1") is None
    assert resolver.region_for("127.0.0.1", b"  ") is None
    assert resolver.region_for("127.0.0.1", None) is None


def test_region_header_ignored_without_trusted_proxies():
    assert GeoResolver({}, (), "X-Region").region_for("127.0.0.1", b"us-east-1") is None


def test_cidr_map_beats_the_header_and_uses_the_client_behind_the_proxy():
    resolver = GeoResolver(GEO, ("127.0.0.0/8",), "X-Region")
    assert resolver.region_for("127.0.0.1", b"ap-south-1", client_ip="10.1.9.9") == "us-east-1"
    # Client address not in the map: the trusted header decides.
    assert resolver.region_for("127.0.0.1", b"ap-south-1", client_ip="192.0.2.7") == "ap-south-1"


def test_effective_client_ip_untrusted_peer_is_the_client():
    proxies = TrustedProxies(["127.0.0.0/8"])
    assert proxies.effective_client_ip("192.0.2.1", b"10.0.0.1") == "192.0.2.1"


def test_effective_client_ip_rightmost_untrusted():
    proxies = TrustedProxies(["127.0.0.0/8", "10.0.0.0/8"])
    assert proxies.effective_client_ip("127.0.0.1", b"203.0.113.9") == "203.0.113.9"
    # The client put a fake entry first; the rightmost untrusted address is the real client.
    assert proxies.effective_client_ip("127.0.0.1", b"1.1.1.1, 203.0.113.9, 10.0.0.5") == "203.0.113.9"
    # All trusted: the leftmost.
    assert proxies.effective_client_ip("127.0.0.1", b"10.0.0.9,10.0.0.5") == "10.0.0.9"


def test_effective_client_ip_stops_at_garbage():
    proxies = TrustedProxies(["127.0.0.0/8", "10.0.0.0/8"])
    assert proxies.effective_client_ip("127.0.0.1", b"203.0.113.9, unknown, 10.0.0.5") == "10.0.0.5"
    assert proxies.effective_client_ip("127.0.0.1", b"garbage") == "127.0.0.1"
    assert proxies.effective_client_ip("127.0.0.1", b"") == "127.0.0.1"
    assert proxies.effective_client_ip("127.0.0.1", None) == "127.0.0.1"


def test_no_trusted_proxies_means_the_peer():
    proxies = TrustedProxies([])
    assert not proxies
    assert proxies.effective_client_ip("127.0.0.1", b"203.0.113.9") == "127.0.0.1"
    assert "127.0.0.1" not in proxies


def test_region_from_record():
    assert region_from_record("us-east-1") == "us-east-1"
    assert region_from_record({"region": "us-east-1", "country": {"iso_code": "US"}}) == "us-east-1"
    assert region_from_record({"country": {"iso_code": "DE"}, "continent": {"code": "EU"}}) == "DE"
    assert region_from_record({"registered_country": {"iso_code": "FR"}}) == "FR"
    assert region_from_record({"continent": {"code": "EU"}}) == "EU"
    assert region_from_record({"country": "oops"}) is None
    assert region_from_record(None) is None


@pytest.mark.skipif(importlib.util.find_spec("maxminddb") is not None, reason="maxminddb is installed")
def test_database_without_the_package_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="maxminddb"):
        GeoResolver({}, (), None, database_path=str(tmp_path / "GeoLite2-Country.mmdb"))


def test_unreadable_database_is_a_clear_error(tmp_path):
    pytest.importorskip("maxminddb")
    with pytest.raises(RuntimeError, match="cannot be read"):
        GeoResolver({}, (), None, database_path=str(tmp_path / "missing.mmdb"))


def test_database_is_consulted_after_the_cidr_map(tmp_path):
    pytest.importorskip("maxminddb")
    mmdb_writer = pytest.importorskip("mmdb_writer")
    from netaddr import IPSet

    writer = mmdb_writer.MMDBWriter(ip_version=6, ipv4_compatible=True)
    writer.insert_network(IPSet(["192.0.2.0/24"]), {"region": "us-east-1"})
    writer.insert_network(IPSet(["198.51.100.0/24"]), {"country": {"iso_code": "DE"}})
    writer.insert_network(IPSet(["10.0.0.0/8"]), {"region": "from-database"})
    path = tmp_path / "regions.mmdb"
    writer.to_db_file(str(path))

    resolver = GeoResolver({"10.0.0.0/8": "from-map"}, ("127.0.0.0/8",), "X-Region", database_path=str(path))
    assert resolver.region_for("192.0.2.10", None) == "us-east-1"
    assert resolver.region_for("198.51.100.1", None) == "DE"
    assert resolver.region_for("10.1.1.1", None) == "from-map"
    assert resolver.region_for("127.0.0.1", b"eu-west-1", client_ip="203.0.113.1") == "eu-west-1"
