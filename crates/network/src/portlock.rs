//! Address locks on the node's bridge: each replica's bridge port passes
//! only frames from the replica's own MAC address carrying its own IPv4
//! address (IP packets and ARP), and nothing else (no IPv6, no VLAN tags).
//! Without them a replica granted `CAP_NET_RAW` could answer ARP for a
//! neighbour's address, or send from it, and be taken for that neighbour's
//! workload by the service proxy, which tells callers apart by address.
//!
//! The rules live in an nftables table of the `bridge` family, one per node
//! network (named after its chain prefix): a base chain on the bridge's
//! prerouting hook looks the incoming port up in a verdict map and jumps to
//! the replica's own chain. A frame from a port with no entry (the bridge's
//! own port, uplinks) passes untouched.

use std::net::Ipv4Addr;

use serde_json::Value;

use crate::firewall::fnv1a;
use crate::NetworkError;

/// The address locks of one node network.
#[derive(Debug, Clone)]
pub struct AddressLocks {
    table: String,
}

impl AddressLocks {
    /// The locks in the table named after `prefix`, installed (an existing
    /// table keeps its replicas' locks). `None`, with a warning, where this
    /// host has no `nft` or its kernel no bridge family in nftables.
    pub async fn install(prefix: &str) -> Option<Self> {
        let me = Self {
            table: prefix.replace('-', "_"),
        };
        let t = &me.table;
        let script = format!(
            "add table bridge {t}\n\
             add map bridge {t} ports {{ type ifname : verdict ; }}\n\
             add chain bridge {t} prerouting {{ type filter hook prerouting priority -200 ; policy accept ; }}\n\
             flush chain bridge {t} prerouting\n\
             add rule bridge {t} prerouting iifname vmap @ports\n"
        );
        match nft_script(&script).await {
            Ok(()) => Some(me),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "no address locks on the bridge (needs nftables with the bridge family: apt-get install nftables): a replica with CAP_NET_RAW could claim a neighbour's address"
                );
                None
            }
        }
    }

    /// The chain of replica `id`.
    fn chain(id: &str) -> String {
        format!("p_{:012x}", fnv1a(id) & 0xffff_ffff_ffff)
    }

    /// Locks the bridge port `port` (the host end of replica `id`'s veth)
    /// to `mac` and `ip`, replacing any lock the port or the replica had.
    pub async fn lock(
        &self,
        id: &str,
        port: &str,
        mac: &str,
        ip: Ipv4Addr,
    ) -> Result<(), NetworkError> {
        if !valid_ifname(port) || !valid_mac(mac) {
            return Err(NetworkError::Config {
                field: "interfaces",
                message: format!("the bridge plugin's result names port {port:?} with MAC {mac:?}"),
            });
        }
        self.unlock(id).await?;
        let (t, c) = (&self.table, Self::chain(id));
        // A port name a replica held before (names are reused) may still
        // map to an old chain.
        let _ = nft_script(&format!(
            "delete element bridge {t} ports {{ \"{port}\" }}\n"
        ))
        .await;
        let script = format!(
            "add chain bridge {t} {c}\n\
             flush chain bridge {t} {c}\n\
             add rule bridge {t} {c} ether saddr != {mac} drop\n\
             add rule bridge {t} {c} ether type arp arp saddr ether != {mac} drop\n\
             add rule bridge {t} {c} ether type arp arp saddr ip != {ip} drop\n\
             add rule bridge {t} {c} ether type ip ip saddr != {ip} drop\n\
             add rule bridge {t} {c} ether type != {{ ip, arp }} drop\n\
             add element bridge {t} ports {{ \"{port}\" : jump {c} }}\n"
        );
        nft_script(&script).await
    }

    /// Removes replica `id`'s lock (nothing if it has none).
    pub async fn unlock(&self, id: &str) -> Result<(), NetworkError> {
        let (t, c) = (&self.table, Self::chain(id));
        let listed = match nft(&["-j", "list", "map", "bridge", t, "ports"]).await {
            Ok(l) => l,
            // No map (someone deleted the table): no lock left to remove.
            Err(NetworkError::Firewall { message, .. })
                if message.contains("No such file or directory") =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let ports = ports_jumping_to(&listed, &c);
        let mut script = String::new();
        for p in &ports {
            script.push_str(&format!("delete element bridge {t} ports {{ \"{p}\" }}\n"));
        }
        if nft(&["list", "chain", "bridge", t, &c]).await.is_ok() {
            script.push_str(&format!("delete chain bridge {t} {c}\n"));
        }
        if script.is_empty() {
            return Ok(());
        }
        nft_script(&script).await
    }

    /// Removes the table with every lock.
    pub async fn uninstall(&self) -> Result<(), NetworkError> {
        nft(&["delete", "table", "bridge", &self.table])
            .await
            .map(drop)
    }
}

/// The ports whose map entry jumps to `chain`, from `nft -j list map`.
fn ports_jumping_to(listed: &str, chain: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<Value>(listed) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for e in item["map"]["elem"].as_array().into_iter().flatten() {
            // Each element is [key, {"jump": {"target": chain}}].
            if e[1]["jump"]["target"].as_str() == Some(chain) {
                if let Some(k) = e[0].as_str() {
                    out.push(k.to_owned());
                }
            }
        }
    }
    out
}

/// Interface names as the kernel allows them and nft can quote.
fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Runs `nft <args>`; its stdout.
async fn nft(args: &[&str]) -> Result<String, NetworkError> {
    let out = tokio::process::Command::new("nft")
        .args(args)
        .output()
        .await
        .map_err(|e| NetworkError::Firewall {
            args: format!("nft {}", args.join(" ")),
            message: format!("cannot run nft: {e}"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetworkError::Firewall {
            args: format!("nft {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Runs an nft script as one transaction (all of it or nothing).
async fn nft_script(script: &str) -> Result<(), NetworkError> {
    crate::firewall::run_script("nft", &["-f", "-"], script).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_ports_of_a_chain_in_nft_json() {
        let listed = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"map": {"family": "bridge", "name": "ports", "table": "T", "type": "ifname", "map": "verdict",
             "elem": [["veth1", {"jump": {"target": "p_1"}}], ["veth2", {"jump": {"target": "p_2"}}]]}}]}"#;
        assert_eq!(ports_jumping_to(listed, "p_2"), vec!["veth2".to_owned()]);
        assert!(ports_jumping_to(listed, "p_3").is_empty());
        assert!(ports_jumping_to("not json", "p_1").is_empty());
    }

    #[test]
    fn refuses_what_nft_could_not_quote() {
        assert!(valid_ifname("veth1a2b3c4d"));
        assert!(!valid_ifname("a\"; flush ruleset"));
        assert!(valid_mac("02:c1:aa:bb:cc:dd"));
        assert!(!valid_mac("02:c1:aa:bb:cc"));
        assert!(!valid_mac("02:c1:aa:bb:cc:dd; drop"));
    }
}
