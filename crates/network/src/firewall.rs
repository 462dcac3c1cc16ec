//! The node's firewall for replicas, in iptables' filter table. Forwarded
//! traffic passes the node's chain (`<prefix>-FWD`, jumped to first from
//! `FORWARD`): answers to replicas and new connections to them (published
//! ports, the node's bridge) are accepted, and what a replica sends out goes
//! through its own egress chain (`<prefix>-E-<hash>`), which accepts what
//! its policy allows and rejects the rest. Without these rules a host whose
//! `FORWARD` policy is `DROP` (Docker sets it) would drop every replica's
//! egress. Source NAT (masquerade) is the bridge plugin's.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::fastpath::FastRoute;
use crate::NetworkError;

/// Where replicas' jumps to their egress chains go in the node chain (after
/// the answers and the published ports, before the refusals).
const EGRESS_JUMPS_AT: usize = 3;

/// The longest an iptables call waits for the xtables lock, in seconds.
const LOCK_WAIT_S: &str = "10";

/// Destinations a replica may reach outside the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    /// The destination network.
    pub cidr: IpNet,
    /// TCP and UDP ports; empty: every port and protocol.
    pub ports: Vec<u16>,
}

impl EgressRule {
    /// Everything (`0.0.0.0/0`, every port).
    pub fn any() -> Self {
        Self {
            cidr: "0.0.0.0/0".parse().expect("a valid network"),
            ports: Vec::new(),
        }
    }
}

/// The replica firewall of one node.
#[derive(Debug, Clone)]
pub struct Firewall {
    /// Chain name prefix (`CLOUDLESS`).
    prefix: String,
    /// The node's replica subnet.
    subnet: IpNet,
    /// Networks inside the cluster (replicas of every node, service
    /// addresses): not egress, always allowed here.
    internal: Vec<IpNet>,
    /// Whether a replica's own traffic to another replica of the node is
    /// refused (where the bridge's frames pass these rules).
    isolate: bool,
}

impl Firewall {
    /// The firewall for replicas in `subnet`. `prefix` names the chains (at
    /// most 12 characters: iptables chain names are short).
    pub fn new(prefix: &str, subnet: IpNet, internal: Vec<IpNet>) -> Result<Self, NetworkError> {
        if prefix.is_empty()
            || prefix.len() > 12
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(NetworkError::Config {
                field: "chain_prefix",
                message: format!("{prefix:?}: 1 to 12 letters, digits or '-'"),
            });
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            subnet,
            internal,
            isolate: false,
        })
    }

    /// Whether replicas' own connections to each other are refused (those
    /// the node translated, to a service or a published port, pass).
    #[must_use]
    pub fn isolating(self, isolate: bool) -> Self {
        Self { isolate, ..self }
    }

    /// The node chain's name.
    pub fn node_chain(&self) -> String {
        format!("{}-FWD", self.prefix)
    }

    /// The egress chain of container `id`.
    pub fn egress_chain(&self, id: &str) -> String {
        format!("{}-E-{:012x}", self.prefix, fnv1a(id) & 0xffff_ffff_ffff)
    }

    /// The node chain's fixed rules: answers either way; new connections
    /// into replicas only when the node's firewall translated them
    /// (published ports); each replica's own traffic goes to its egress
    /// chain (jumps inserted between these, at [`EGRESS_JUMPS_AT`]);
    /// anything else into or out of the subnet is refused (the host's
    /// neighbours cannot route to replicas, and a packet from an address
    /// no replica holds leaves through no egress policy).
    fn base_rules(&self) -> Vec<Vec<String>> {
        let subnet = self.subnet.to_string();
        let rule = |r: &[&str]| r.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        vec![
            rule(&[
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ]),
            rule(&[
                "-d",
                &subnet,
                "-m",
                "conntrack",
                "--ctstate",
                "DNAT",
                "-j",
                "ACCEPT",
            ]),
            rule(&[
                "-d",
                &subnet,
                "-j",
                "REJECT",
                "--reject-with",
                "icmp-admin-prohibited",
            ]),
            rule(&[
                "-s",
                &subnet,
                "-j",
                "REJECT",
                "--reject-with",
                "icmp-admin-prohibited",
            ]),
        ]
    }

    /// Makes the node chain (idempotent: a chain of this layout is kept with
    /// the replicas' jumps; another is written anew) and puts the jump to it
    /// first in `FORWARD`.
    pub async fn install(&self) -> Result<(), NetworkError> {
        let chain = self.node_chain();
        ensure_chain(&chain).await?;
        let base = self.base_rules();
        let listed = iptables(&["-S", &chain]).await?;
        let prefix = format!("-A {chain} ");
        let rules: Vec<&str> = listed
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .collect();
        let (head, tail) = (&base[..EGRESS_JUMPS_AT - 1], &base[EGRESS_JUMPS_AT - 1..]);
        let same = |have: &[&str], want: &[Vec<String>]| {
            have.len() == want.len()
                && have.iter().zip(want).all(|(h, w)| {
                    // iptables -S spells some matches out (`-m conntrack`
                    // stays, REJECT keeps its option): compare the words.
                    h.split_whitespace().collect::<Vec<_>>()
                        == w.iter().map(String::as_str).collect::<Vec<_>>()
                })
        };
        let laid_out = rules.len() >= base.len()
            && same(&rules[..head.len()], head)
            && same(&rules[rules.len() - tail.len()..], tail);
        if !laid_out {
            iptables(&["-F", &chain]).await?;
            for r in &base {
                let mut args = vec!["-A", chain.as_str()];
                args.extend(r.iter().map(String::as_str));
                iptables(&args).await?;
            }
        }
        ensure_rule("FORWARD", &["-j", &chain], true).await
    }

    /// Sends replicas' TCP connections to service addresses (`services`)
    /// to the node's proxy at `gateway:proxy_port`, and lets replicas reach
    /// the proxy and the resolver (`dns_port`, UDP and TCP) on the gateway
    /// even where the host's `INPUT` policy drops.
    pub async fn install_services(
        &self,
        services: IpNet,
        gateway: IpAddr,
        proxy_port: u16,
        dns_port: u16,
    ) -> Result<(), NetworkError> {
        let (subnet, services) = (self.subnet.to_string(), services.to_string());
        let nat = self.services_chain();
        ensure_chain_in("nat", &nat).await?;
        iptables(&["-t", "nat", "-F", &nat]).await?;
        // The kernel path first (its rules are kept across a restart);
        // what it does not take goes to the proxy.
        let fast = self.fast_chain();
        ensure_chain_in("nat", &fast).await?;
        iptables(&["-t", "nat", "-A", &nat, "-j", &fast]).await?;
        // Then each UDP service port to the proxy's socket for it (see
        // `set_udp_routes`).
        // Emptied: the redirects of an earlier agent's life point at
        // sockets that are gone (the agent writes them anew).
        let udp = self.udp_chain();
        ensure_chain_in("nat", &udp).await?;
        iptables(&["-t", "nat", "-F", &udp]).await?;
        iptables(&["-t", "nat", "-A", &nat, "-j", &udp]).await?;
        // Replicas reach replicas of this bridge through the kernel path
        // from the bridge's address (their ports cannot reach each other).
        let post = self.hairpin_chain();
        ensure_chain_in("nat", &post).await?;
        iptables(&["-t", "nat", "-F", &post]).await?;
        iptables(&[
            "-t",
            "nat",
            "-A",
            &post,
            "-s",
            &subnet,
            "-d",
            &subnet,
            "-m",
            "conntrack",
            "--ctstate",
            "DNAT",
            "-j",
            "MASQUERADE",
        ])
        .await?;
        ensure_rule_in("nat", "POSTROUTING", &["-j", &post], true).await?;
        let to = format!("{gateway}:{proxy_port}");
        iptables(&[
            "-t",
            "nat",
            "-A",
            &nat,
            "-s",
            &subnet,
            "-d",
            &services,
            "-p",
            "tcp",
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ])
        .await?;
        ensure_rule_in("nat", "PREROUTING", &["-j", &nat], true).await?;
        let input = self.input_chain();
        ensure_chain(&input).await?;
        iptables(&["-F", &input]).await?;
        let gw = gateway.to_string();
        for (proto, port) in [("tcp", proxy_port), ("tcp", dns_port), ("udp", dns_port)] {
            let port = port.to_string();
            iptables(&[
                "-A", &input, "-s", &subnet, "-d", &gw, "-p", proto, "--dport", &port, "-j",
                "ACCEPT",
            ])
            .await?;
        }
        // Datagrams to a UDP service port, redirected to the proxy's socket
        // for it (only redirected ones: the proxy's other ports stay shut).
        iptables(&[
            "-A",
            &input,
            "-s",
            &subnet,
            "-d",
            &gw,
            "-p",
            "udp",
            "-m",
            "conntrack",
            "--ctstate",
            "DNAT",
            "-j",
            "ACCEPT",
        ])
        .await?;
        ensure_rule("INPUT", &["-j", &input], true).await
    }

    /// The nat chain of service addresses.
    fn services_chain(&self) -> String {
        format!("{}-SVC", self.prefix)
    }

    /// The nat chain of the kernel path (see [`crate::fastpath`]).
    fn fast_chain(&self) -> String {
        format!("{}-FAST", self.prefix)
    }

    /// The nat chain of UDP service ports.
    fn udp_chain(&self) -> String {
        format!("{}-UDP", self.prefix)
    }

    /// Sends replicas' datagrams to each UDP service port of `routes` to
    /// the proxy's socket for it, and nothing else (in one transaction).
    pub async fn set_udp_routes(&self, routes: &[UdpRoute]) -> Result<(), NetworkError> {
        let script = udp_script(&self.udp_chain(), &self.subnet.to_string(), routes);
        crate::fastpath::restore(&script).await
    }

    /// The nat chain of the kernel path's hairpin masquerade.
    fn hairpin_chain(&self) -> String {
        format!("{}-HAIR", self.prefix)
    }

    /// The nat chain spreading one kernel-path route over its endpoints
    /// (a TCP route's name is what it was before UDP routes existed).
    fn route_chain(&self, r: &FastRoute) -> String {
        let udp = if r.udp { "/udp" } else { "" };
        format!(
            "{}-K-{:012x}",
            self.prefix,
            fnv1a(&format!("{}:{}{udp}", r.vip, r.port)) & 0xffff_ffff_ffff
        )
    }

    /// Makes the kernel path hold exactly `routes` (in one transaction),
    /// then removes route chains no longer used.
    pub async fn set_fast_routes(&self, routes: &[FastRoute]) -> Result<(), NetworkError> {
        let fast = self.fast_chain();
        let script = crate::fastpath::restore_script(&fast, routes, |r| self.route_chain(r));
        crate::fastpath::restore(&script).await?;
        let wanted: std::collections::BTreeSet<String> =
            routes.iter().map(|r| self.route_chain(r)).collect();
        let ours = format!("{}-K-", self.prefix);
        let listed = iptables(&["-t", "nat", "-S"]).await?;
        for chain in listed.lines().filter_map(|l| l.strip_prefix("-N ")) {
            if chain.starts_with(&ours) && !wanted.contains(chain) {
                iptables(&["-t", "nat", "-F", chain]).await?;
                iptables(&["-t", "nat", "-X", chain]).await?;
            }
        }
        Ok(())
    }

    /// The input chain of the proxy and resolver.
    fn input_chain(&self) -> String {
        format!("{}-IN", self.prefix)
    }

    /// Removes the node chain and the jump to it (with every replica's rules).
    pub async fn uninstall(&self) -> Result<(), NetworkError> {
        let nat = self.services_chain();
        while iptables(&["-t", "nat", "-C", "PREROUTING", "-j", &nat])
            .await
            .is_ok()
        {
            iptables(&["-t", "nat", "-D", "PREROUTING", "-j", &nat]).await?;
        }
        if iptables(&["-t", "nat", "-S", &nat]).await.is_ok() {
            iptables(&["-t", "nat", "-F", &nat]).await?;
            iptables(&["-t", "nat", "-X", &nat]).await?;
        }
        let post = self.hairpin_chain();
        while iptables(&["-t", "nat", "-C", "POSTROUTING", "-j", &post])
            .await
            .is_ok()
        {
            iptables(&["-t", "nat", "-D", "POSTROUTING", "-j", &post]).await?;
        }
        let fast = self.fast_chain();
        let udp = self.udp_chain();
        let ours = format!("{}-K-", self.prefix);
        let listed = iptables(&["-t", "nat", "-S"]).await?;
        let mut chains: Vec<&str> = listed
            .lines()
            .filter_map(|l| l.strip_prefix("-N "))
            .filter(|c| c.starts_with(&ours))
            .collect();
        // The jumps to the route chains go first.
        chains.insert(0, &fast);
        chains.push(&udp);
        chains.push(&post);
        for chain in chains {
            if iptables(&["-t", "nat", "-S", chain]).await.is_ok() {
                iptables(&["-t", "nat", "-F", chain]).await?;
            }
        }
        for chain in listed
            .lines()
            .filter_map(|l| l.strip_prefix("-N "))
            .filter(|c| c.starts_with(&ours) || *c == fast || *c == udp || *c == post)
        {
            iptables(&["-t", "nat", "-X", chain]).await?;
        }
        let input = self.input_chain();
        while iptables(&["-C", "INPUT", "-j", &input]).await.is_ok() {
            iptables(&["-D", "INPUT", "-j", &input]).await?;
        }
        delete_chain(&input).await?;
        let chain = self.node_chain();
        for id in self.chains_in_use().await? {
            delete_chain(&id).await?;
        }
        while iptables(&["-C", "FORWARD", "-j", &chain]).await.is_ok() {
            iptables(&["-D", "FORWARD", "-j", &chain]).await?;
        }
        delete_chain(&chain).await
    }

    /// Sets what replica `id` at `addr` may reach: its egress chain holds
    /// exactly `rules` (written anew), and the node chain sends its traffic
    /// there.
    pub async fn set_egress(
        &self,
        id: &str,
        addr: IpAddr,
        rules: &[EgressRule],
    ) -> Result<(), NetworkError> {
        let chain = self.egress_chain(id);
        ensure_chain(&chain).await?;
        iptables(&["-F", &chain]).await?;
        // The node's own replicas (unless they are kept apart: then only
        // through a service or a published port, translated before this);
        // never the rest of the cluster's ranges (other nodes' replicas and
        // services are reached through the proxy, so a packet headed there
        // directly is not let out).
        let subnet = self.subnet.to_string();
        if self.isolate {
            iptables(&[
                "-A",
                &chain,
                "-d",
                &subnet,
                "-j",
                "REJECT",
                "--reject-with",
                "icmp-admin-prohibited",
            ])
            .await?;
        } else {
            iptables(&["-A", &chain, "-d", &subnet, "-j", "ACCEPT"]).await?;
        }
        for net in &self.internal {
            iptables(&[
                "-A",
                &chain,
                "-d",
                &net.to_string(),
                "-j",
                "REJECT",
                "--reject-with",
                "icmp-admin-prohibited",
            ])
            .await?;
        }
        // Replicas have IPv4 addresses only: IPv6 rules cannot match.
        for r in rules.iter().filter(|r| matches!(r.cidr, IpNet::V4(_))) {
            let cidr = r.cidr.to_string();
            if r.ports.is_empty() {
                iptables(&["-A", &chain, "-d", &cidr, "-j", "ACCEPT"]).await?;
                continue;
            }
            for port in &r.ports {
                let port = port.to_string();
                for proto in ["tcp", "udp"] {
                    iptables(&[
                        "-A", &chain, "-d", &cidr, "-p", proto, "--dport", &port, "-j", "ACCEPT",
                    ])
                    .await?;
                }
            }
        }
        iptables(&[
            "-A",
            &chain,
            "-j",
            "REJECT",
            "--reject-with",
            "icmp-admin-prohibited",
        ])
        .await?;
        let src = format!("{addr}/32");
        let node = self.node_chain();
        // One jump per address: one left by a replica whose detach failed
        // must not hand its policy to the next holder of the address.
        self.drop_rules(|words| {
            words.windows(2).any(|w| w == ["-s", src.as_str()]) && !words.contains(&chain.as_str())
        })
        .await?;
        let mut check = vec!["-C", node.as_str(), "-s", &src, "-j", &chain];
        if iptables(&check).await.is_err() {
            let at = EGRESS_JUMPS_AT.to_string();
            check = vec!["-I", node.as_str(), &at, "-s", &src, "-j", &chain];
            iptables(&check).await?;
        }
        Ok(())
    }

    /// Removes replica `id`'s egress chain and the jump to it.
    pub async fn remove_egress(&self, id: &str) -> Result<(), NetworkError> {
        let chain = self.egress_chain(id);
        self.drop_jumps_to(&chain).await?;
        delete_chain(&chain).await
    }

    /// Every rule of the node chain that jumps to `chain` goes.
    async fn drop_jumps_to(&self, chain: &str) -> Result<(), NetworkError> {
        self.drop_rules(|words| words.windows(2).any(|w| w == ["-j", chain]))
            .await
    }

    /// Every rule of the node chain whose words `pick` goes.
    async fn drop_rules(&self, pick: impl Fn(&[&str]) -> bool) -> Result<(), NetworkError> {
        let node = self.node_chain();
        let Ok(listed) = iptables(&["-S", &node]).await else {
            return Ok(());
        };
        for line in listed.lines() {
            let Some(rule) = line.strip_prefix(&format!("-A {node} ")) else {
                continue;
            };
            let words: Vec<&str> = rule.split_whitespace().collect();
            if pick(&words) {
                let mut args = vec!["-D", node.as_str()];
                args.extend(words);
                iptables(&args).await?;
            }
        }
        Ok(())
    }

    /// The egress chains of this firewall that exist.
    async fn chains_in_use(&self) -> Result<Vec<String>, NetworkError> {
        let prefix = format!("-N {}-E-", self.prefix);
        let listed = iptables(&["-S"]).await?;
        Ok(listed
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.strip_prefix("-N "))
            .map(str::to_owned)
            .collect())
    }
}

/// 64-bit FNV-1a (stable chain names across agent restarts and releases).
pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Runs `iptables -w <args>` on the filter table; its stdout.
pub(crate) async fn iptables(args: &[&str]) -> Result<String, NetworkError> {
    let out = tokio::process::Command::new("iptables")
        .arg("-w")
        .arg(LOCK_WAIT_S)
        .args(args)
        .output()
        .await
        .map_err(|e| NetworkError::Firewall {
            args: args.join(" "),
            message: format!("cannot run iptables: {e}"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetworkError::Firewall {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

async fn ensure_chain_in(table: &str, chain: &str) -> Result<(), NetworkError> {
    if iptables(&["-t", table, "-S", chain]).await.is_err() {
        iptables(&["-t", table, "-N", chain]).await?;
    }
    Ok(())
}

async fn ensure_rule_in(
    table: &str,
    chain: &str,
    rule: &[&str],
    first: bool,
) -> Result<(), NetworkError> {
    let mut check = vec!["-t", table, "-C", chain];
    check.extend_from_slice(rule);
    if iptables(&check).await.is_ok() {
        return Ok(());
    }
    let mut add = if first {
        vec!["-t", table, "-I", chain, "1"]
    } else {
        vec!["-t", table, "-A", chain]
    };
    add.extend_from_slice(rule);
    iptables(&add).await.map(drop)
}

async fn ensure_chain(chain: &str) -> Result<(), NetworkError> {
    if iptables(&["-S", chain]).await.is_err() {
        iptables(&["-N", chain]).await?;
    }
    Ok(())
}

async fn ensure_rule(chain: &str, rule: &[&str], first: bool) -> Result<(), NetworkError> {
    let mut check = vec!["-C", chain];
    check.extend_from_slice(rule);
    if iptables(&check).await.is_ok() {
        return Ok(());
    }
    let mut add = if first {
        vec!["-I", chain, "1"]
    } else {
        vec!["-A", chain]
    };
    add.extend_from_slice(rule);
    iptables(&add).await.map(drop)
}

async fn delete_chain(chain: &str) -> Result<(), NetworkError> {
    if iptables(&["-S", chain]).await.is_err() {
        return Ok(());
    }
    iptables(&["-F", chain]).await?;
    iptables(&["-X", chain]).await.map(drop)
}

/// Removes the bridge plugin's masquerade for container `id` if its DEL
/// left it: the plugin undoes the masquerade of the addresses it finds on
/// the container's interface, so when that interface is gone (its veth
/// deleted while the agent was down) the rule in the nat `POSTROUTING`
/// and its `CNI-<hash>` chain stay. Both are found by the comment the
/// plugin gives them (`name: "<network>" id: "<id>"`).
pub(crate) async fn remove_cni_masquerade(network: &str, id: &str) -> Result<(), NetworkError> {
    // By the rule's text, not its position: other replicas' rules come and
    // go meanwhile.
    let listed = iptables(&["-t", "nat", "-S", "POSTROUTING"]).await?;
    let comment = format!("name: \"{network}\" id: \"{id}\"");
    let quoted = format!("name: \\\"{network}\\\" id: \\\"{id}\\\"");
    for rule in listed.lines().filter(|l| l.contains(&quoted)) {
        let words: Vec<&str> = rule.split_whitespace().collect();
        let after = |flag: &str| {
            words
                .iter()
                .rposition(|w| *w == flag)
                .and_then(|i| words.get(i + 1))
                .copied()
        };
        let (Some(source), Some(chain)) = (after("-s"), after("-j")) else {
            continue;
        };
        iptables(&[
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-s",
            source,
            "-m",
            "comment",
            "--comment",
            &comment,
            "-j",
            chain,
        ])
        .await?;
        if chain.starts_with("CNI-") {
            let _ = iptables(&["-t", "nat", "-F", chain]).await;
            let _ = iptables(&["-t", "nat", "-X", chain]).await;
        }
        tracing::info!(container = %id, chain = %chain, "removed a masquerade the CNI delete left behind");
    }
    Ok(())
}

/// Runs `program args` with `script` on its standard input (one
/// transaction for `nft -f -` and `iptables-restore`); what it said on
/// failure names the command and the script's first line.
pub(crate) async fn run_script(
    program: &str,
    args: &[&str],
    script: &str,
) -> Result<(), NetworkError> {
    use tokio::io::AsyncWriteExt as _;
    let command = format!("{program} {}", args.join(" "));
    let fail = |message: String| NetworkError::Firewall {
        args: format!("{command} ({})", script.lines().next().unwrap_or_default()),
        message,
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes()).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// A UDP service port served by the proxy: datagrams replicas send to
/// `vip:port` go to the proxy's socket at `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UdpRoute {
    /// The service's address.
    pub vip: std::net::Ipv4Addr,
    /// Its UDP port.
    pub port: u16,
    /// The proxy's socket for it (on the bridge's address).
    pub to: std::net::SocketAddrV4,
}

/// The iptables-restore input that makes `chain` hold exactly `routes`, for
/// datagrams from `subnet`.
fn udp_script(chain: &str, subnet: &str, routes: &[UdpRoute]) -> String {
    let mut s = format!("*nat\n:{chain} - [0:0]\n");
    for r in routes {
        s.push_str(&format!(
            "-A {chain} -s {subnet} -d {}/32 -p udp -m udp --dport {} -j DNAT --to-destination {}\n",
            r.vip, r.port, r.to
        ));
    }
    s.push_str("COMMIT\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_fit_iptables_and_are_stable() {
        let fw = Firewall::new("CLOUDLESS", "10.0.0.0/24".parse().expect("net"), vec![])
            .expect("firewall");
        let c = fw.egress_chain("default-web-0123456789abcdef");
        assert!(c.len() <= 28, "{c}");
        assert_eq!(c, fw.egress_chain("default-web-0123456789abcdef"));
        assert_ne!(c, fw.egress_chain("default-web-0123456789abcdeg"));
        assert!(Firewall::new(
            "A-VERY-LONG-PREFIX",
            "10.0.0.0/24".parse().expect("net"),
            vec![]
        )
        .is_err());
    }
}
