//! The host's IPv4 routes (`/proc/net/route`): a node's replica subnet must
//! not overlap a network the host already reaches another way, or replicas
//! and that network would shadow each other.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// A route of the host that overlaps `subnet` on an interface other than
/// `bridge` (`interface network`), if any. Default routes do not count.
pub fn overlapping_route(subnet: Ipv4Net, bridge: &str) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    overlapping_in(&table, subnet, bridge)
}

fn overlapping_in(table: &str, subnet: Ipv4Net, bridge: &str) -> Option<String> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (iface, dest, mask) = (f.first()?, f.get(1)?, f.get(7)?);
        // Little-endian hex, as the kernel prints them.
        let dest = Ipv4Addr::from(u32::from_be(u32::from_str_radix(dest, 16).ok()?));
        let mask = u32::from_be(u32::from_str_radix(mask, 16).ok()?);
        let net = Ipv4Net::new(dest, u8::try_from(mask.count_ones()).ok()?).ok()?;
        let overlaps = net.prefix_len() > 0
            && (net.contains(&subnet.network()) || subnet.contains(&net.network()));
        (overlaps && *iface != bridge).then(|| format!("{iface} {net}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
cld0\t0003F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn a_subnet_inside_or_around_a_host_network_overlaps_it() {
        let net = |s: &str| s.parse::<Ipv4Net>().expect("net");
        assert_eq!(
            overlapping_in(TABLE, net("172.17.5.0/24"), "cld0").as_deref(),
            Some("docker0 172.17.0.0/16")
        );
        assert_eq!(
            overlapping_in(TABLE, net("192.168.0.0/16"), "cld0").as_deref(),
            Some("eth0 192.168.2.0/24")
        );
        // The default route and the node's own bridge do not count.
        assert_eq!(overlapping_in(TABLE, net("10.244.3.0/24"), "cld0"), None);
        assert_eq!(
            overlapping_in(TABLE, net("10.244.3.0/24"), "other").as_deref(),
            Some("cld0 10.244.3.0/24")
        );
    }
}
