//! The node's container network: one bridge with the node's replica subnet,
//! a namespace per replica connected to it through the CNI plugins, and the
//! replica firewall. Attaching is idempotent, and a replica found attached
//! after an agent restart keeps its namespace and address.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cni::{Attached, Cache, Invocation, Plugins, CNI_VERSION};
use crate::firewall::{EgressRule, Firewall};
use crate::netns::NetnsDir;
use crate::portlock::AddressLocks;
use crate::NetworkError;

/// The interface of a replica inside its namespace.
const IFNAME: &str = "eth0";

/// Where and how the node's replica network is made.
#[derive(Debug, Clone)]
pub struct NodeNetworkConfig {
    /// The node's replica subnet (the coordinators give each node its own).
    pub subnet: Ipv4Net,
    /// Networks inside the cluster (every node's replicas, service
    /// addresses): never egress.
    pub internal: Vec<IpNet>,
    /// The bridge's name. Default `cld0`.
    pub bridge: String,
    /// Where the CNI plugins are. Default `/usr/lib/cni`.
    pub cni_bin_dir: PathBuf,
    /// Where add results (`cni/`) and address leases (`ipam/`) are kept.
    pub state_dir: PathBuf,
    /// Where replicas' namespace files are. Default `/run/cloudless/netns`.
    pub netns_dir: PathBuf,
    /// Prefix of the node's iptables chains. Default `CLOUDLESS`.
    pub chain_prefix: String,
    /// The cluster's service addresses (VIPs): replicas' connections to
    /// them go to the node's proxy. `None`: no services.
    pub service_cidr: Option<Ipv4Net>,
    /// The proxy's port on the bridge's address. Default 7681.
    pub proxy_port: u16,
    /// The resolver's port on the bridge's address. Default 53.
    pub dns_port: u16,
    /// Isolate replicas from each other on the bridge (each may talk to the
    /// bridge's own address, through which the proxy, published ports and
    /// the outside reach it, but not straight to another replica's: their
    /// services' `allowFrom` then holds on this node too). Default true.
    pub isolate_replicas: bool,
}

/// A port's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A container port published on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPort {
    /// The node's port.
    pub host_port: u16,
    /// The container's port.
    pub container_port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// Rate limits of a replica's traffic, in bits per second (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bandwidth {
    /// Into the replica.
    pub ingress_bps: u64,
    /// Out of the replica.
    pub egress_bps: u64,
}

/// What a replica's network is to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    /// The container id (names its namespace and its records).
    pub container_id: String,
    /// Ports published on the node.
    pub host_ports: Vec<HostPort>,
    /// Where it may connect outside the cluster.
    pub egress: Vec<EgressRule>,
    /// Its rate limits.
    pub bandwidth: Bandwidth,
}

/// A replica's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Its namespace file (the OCI spec's network namespace path).
    pub netns: PathBuf,
    /// Its address on the node's bridge.
    pub address: Ipv4Addr,
    /// Its gateway (the bridge).
    pub gateway: Option<Ipv4Addr>,
    /// Whether this is the network an earlier attach made (an agent
    /// restart found it intact); `false` when it was made now. A container
    /// still running from before in a network made now sits in the old,
    /// broken namespace: it must be started again.
    pub kept: bool,
}

/// The node's replica network.
#[derive(Debug, Clone)]
pub struct NodeNetwork {
    config: NodeNetworkConfig,
    plugins: Plugins,
    cache: Cache,
    netns: NetnsDir,
    firewall: Firewall,
    /// `None` where the host cannot lock bridge ports (warned at open).
    locks: Option<AddressLocks>,
    /// Whether replicas are kept apart by isolating their bridge ports
    /// (where the bridge's frames pass no iptables rules); else the node's
    /// firewall refuses replica-to-replica frames itself, which lets the
    /// kernel path bridge a translated connection between two of them.
    port_isolation: bool,
}

impl NodeNetwork {
    /// Checks the settings against this host (the plugins are there, the
    /// subnet overlaps none of the host's networks) and installs the
    /// node's firewall chain.
    pub async fn open(config: NodeNetworkConfig) -> Result<Self, NetworkError> {
        if config.subnet.prefix_len() > 30 {
            return Err(NetworkError::Config {
                field: "subnet",
                message: format!("{}: too small for replicas (at most /30)", config.subnet),
            });
        }
        if config.bridge.is_empty()
            || config.bridge.len() > 15
            || !config
                .bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(NetworkError::Config {
                field: "bridge",
                message: format!("{:?}: 1 to 15 letters, digits, '-' or '_'", config.bridge),
            });
        }
        if let Some(route) = crate::overlapping_route(config.subnet, &config.bridge) {
            return Err(NetworkError::Config {
                field: "subnet",
                message: format!(
                    "{} overlaps the host's network {route}: give the cluster a range of its own (cluster configuration network.clusterCidr)",
                    config.subnet
                ),
            });
        }
        let plugins = Plugins::new(&config.cni_bin_dir);
        let probe = conflist(&config, &full_request());
        let mut missing = plugins.missing(&probe);
        if !config.cni_bin_dir.join("loopback").is_file() {
            missing.push("loopback".into());
        }
        if !missing.is_empty() {
            return Err(NetworkError::Config {
                field: "cni_bin_dir",
                message: format!(
                    "{} lacks the CNI plugins {} (Debian and Ubuntu: apt-get install containernetworking-plugins)",
                    config.cni_bin_dir.display(),
                    missing.join(", ")
                ),
            });
        }
        let cache = Cache::open(&config.state_dir.join("cni"))?;
        let netns = NetnsDir::open(&config.netns_dir)?;
        let gateway = gateway(config.subnet);
        ensure_bridge(&config.bridge, gateway, config.subnet.prefix_len()).await?;
        let bridge_filtered = filter_bridged(&config.bridge).await;
        let firewall = Firewall::new(
            &config.chain_prefix,
            IpNet::V4(config.subnet),
            config.internal.clone(),
        )?
        .isolating(config.isolate_replicas);
        firewall.install().await?;
        if let Some(services) = config.service_cidr {
            firewall
                .install_services(
                    IpNet::V4(services),
                    IpAddr::V4(gateway),
                    config.proxy_port,
                    config.dns_port,
                )
                .await?;
        }
        let locks = AddressLocks::install(&config.chain_prefix).await;
        let port_isolation = config.isolate_replicas && !bridge_filtered;
        Ok(Self {
            config,
            plugins,
            cache,
            netns,
            firewall,
            locks,
            port_isolation,
        })
    }

    /// The settings.
    pub fn config(&self) -> &NodeNetworkConfig {
        &self.config
    }

    /// The bridge's address: replicas' gateway, where the node's resolver
    /// and service proxy listen.
    pub fn gateway(&self) -> Ipv4Addr {
        gateway(self.config.subnet)
    }

    /// Connects a replica (idempotent): its namespace, its address on the
    /// bridge, its published ports, rate limits and egress rules. A replica
    /// attached before (this agent's earlier run) keeps its namespace and
    /// address if they are still as added; its egress rules are written
    /// anew.
    pub async fn attach(&self, req: &AttachRequest) -> Result<Attachment, NetworkError> {
        let id = &req.container_id;
        check_id(id)?;
        if let Some(kept) = self.cache.get(id) {
            let intact = self.netns.exists(id)
                && self
                    .plugins
                    .check(&kept.list, &kept.invocation, &kept.result)
                    .await
                    .inspect_err(|e| tracing::warn!(container = %id, error = %e, "its network is not as added; making it again"))
                    .is_ok();
            if intact && kept.list == conflist(&self.config, req) {
                let att = Attachment {
                    kept: true,
                    ..self.attachment_of(&kept)?
                };
                isolate(&kept.result, &self.config.bridge, self.port_isolation).await?;
                self.lock(&kept, att.address).await?;
                self.firewall
                    .set_egress(id, IpAddr::V4(att.address), &req.egress)
                    .await?;
                return Ok(att);
            }
            self.detach(id).await?;
        }
        let path = self.netns.create(id)?;
        match self.connect(req, path.clone()).await {
            Ok(att) => Ok(att),
            Err(e) => {
                if let Err(d) = self.detach(id).await {
                    tracing::warn!(container = %id, error = %d, "cleaning up after a failed attach");
                }
                Err(e)
            }
        }
    }

    async fn connect(
        &self,
        req: &AttachRequest,
        netns: PathBuf,
    ) -> Result<Attachment, NetworkError> {
        let id = &req.container_id;
        let lo = Invocation {
            container_id: id.clone(),
            netns: netns.clone(),
            ifname: "lo".into(),
            runtime_config: serde_json::Map::new(),
        };
        self.plugins.add(&loopback_list(), &lo).await?;
        let list = conflist(&self.config, req);
        let invocation = Invocation {
            container_id: id.clone(),
            netns,
            ifname: IFNAME.into(),
            runtime_config: runtime_config(req),
        };
        let result = self.plugins.add(&list, &invocation).await?;
        let kept = Attached {
            list,
            invocation,
            result,
        };
        if let Err(e) = self.cache.put(&kept) {
            // Without the record a later delete could not undo this add.
            let _ = self
                .plugins
                .del(&kept.list, &kept.invocation, Some(&kept.result))
                .await;
            return Err(e);
        }
        let att = self.attachment_of(&kept)?;
        isolate(&kept.result, &self.config.bridge, self.port_isolation).await?;
        self.lock(&kept, att.address).await?;
        self.firewall
            .set_egress(id, IpAddr::V4(att.address), &req.egress)
            .await?;
        tracing::info!(container = %id, address = %att.address, "replica network attached");
        Ok(att)
    }

    /// Locks the replica's bridge port to its MAC and address.
    async fn lock(&self, kept: &Attached, address: Ipv4Addr) -> Result<(), NetworkError> {
        let Some(locks) = &self.locks else {
            return Ok(());
        };
        let id = &kept.invocation.container_id;
        let port = host_port(&kept.result, &self.config.bridge);
        let mac = container_mac(&kept.result);
        let (Some(port), Some(mac)) = (port, mac) else {
            return Err(NetworkError::Plugin {
                plugin: "bridge".into(),
                command: "ADD",
                container: id.clone(),
                message: "its result names no host-side veth or no MAC address in the container"
                    .into(),
            });
        };
        locks.lock(id, port, mac, address).await
    }

    fn attachment_of(&self, kept: &Attached) -> Result<Attachment, NetworkError> {
        let (address, gateway) = kept.ipv4().ok_or_else(|| NetworkError::Plugin {
            plugin: "bridge".into(),
            command: "ADD",
            container: kept.invocation.container_id.clone(),
            message: "its result holds no IPv4 address in the container".into(),
        })?;
        Ok(Attachment {
            netns: kept.invocation.netns.clone(),
            address,
            gateway,
            kept: false,
        })
    }

    /// The network of replica `id` as attached, if it is.
    pub fn attachment(&self, id: &str) -> Option<Attachment> {
        let kept = self.cache.get(id)?;
        self.attachment_of(&kept).ok()
    }

    /// Disconnects a replica: its egress rules, the plugins' work (the
    /// veth, the address lease, the port mappings, the rate limits) undone
    /// with what the add returned, its namespace removed. Nothing if it is
    /// not attached. Everything is tried; the first failure is returned.
    pub async fn detach(&self, id: &str) -> Result<(), NetworkError> {
        check_id(id)?;
        let mut first = self.firewall.remove_egress(id).await.err();
        if let Some(locks) = &self.locks {
            if let Err(e) = locks.unlock(id).await {
                first.get_or_insert(e);
            }
        }
        match self.cache.get(id) {
            Some(kept) => {
                if let Some((address, _)) = kept.ipv4() {
                    drop_foreign_addresses(&kept.invocation.netns, address).await;
                }
                if let Err(e) = self
                    .plugins
                    .del(&kept.list, &kept.invocation, Some(&kept.result))
                    .await
                {
                    first.get_or_insert(e);
                }
            }
            None if self.netns.path(id).exists() => {
                // An add that did not finish (no record): delete by id.
                let inv = Invocation {
                    container_id: id.to_owned(),
                    netns: self.netns.path(id),
                    ifname: IFNAME.into(),
                    runtime_config: serde_json::Map::new(),
                };
                let list = conflist(&self.config, &full_request());
                if let Err(e) = self.plugins.del(&list, &inv, None).await {
                    first.get_or_insert(e);
                }
            }
            None => {}
        }
        if let Err(e) = crate::firewall::remove_cni_masquerade(NETWORK, id).await {
            first.get_or_insert(e);
        }
        if let Err(e) = self.netns.remove(id) {
            first.get_or_insert(e);
        }
        if first.is_none() {
            if let Err(e) = self.cache.remove(id) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Replicas with a network here (a record or a namespace).
    pub fn attached(&self) -> Result<BTreeSet<String>, NetworkError> {
        let mut ids: BTreeSet<String> = self.cache.list()?.into_iter().collect();
        ids.extend(self.netns.list()?);
        Ok(ids)
    }

    /// Detaches every replica not in `keep`; the ones detached.
    pub async fn collect(&self, keep: &BTreeSet<String>) -> Result<Vec<String>, NetworkError> {
        let mut gone = Vec::new();
        for id in self.attached()?.difference(keep) {
            match self.detach(id).await {
                Ok(()) => gone.push(id.clone()),
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "cannot remove a leftover replica network")
                }
            }
        }
        Ok(gone)
    }

    /// Removes the node's firewall chain and address locks (replicas must be
    /// detached first).
    pub async fn uninstall(&self) -> Result<(), NetworkError> {
        let locks = match &self.locks {
            Some(l) => l.uninstall().await,
            None => Ok(()),
        };
        self.firewall.uninstall().await.and(locks)
    }

    /// Makes the kernel path serve exactly `routes` (see
    /// [`crate::fastpath`]).
    pub async fn set_fast_routes(
        &self,
        routes: &[crate::fastpath::FastRoute],
    ) -> Result<(), NetworkError> {
        self.firewall.set_fast_routes(routes).await
    }

    /// Sends replicas' datagrams to each UDP service port of `routes` to
    /// the proxy's socket for it.
    pub async fn set_udp_routes(
        &self,
        routes: &[crate::firewall::UdpRoute],
    ) -> Result<(), NetworkError> {
        self.firewall.set_udp_routes(routes).await
    }

    /// Whether replicas' bridge ports are locked to their addresses.
    pub fn locks_addresses(&self) -> bool {
        self.locks.is_some()
    }
}

/// Removes the addresses on the replica's interface other than `keep`,
/// the one it was given (and IPv6 link-local). A replica with `CAP_NET_ADMIN` can add
/// addresses; the bridge plugin's DEL undoes the masquerade of every
/// address it finds there and fails on one it did not add, which would
/// leave the replica's own rules behind. Best effort: a namespace already
/// gone has nothing to remove.
async fn drop_foreign_addresses(netns: &std::path::Path, keep: Ipv4Addr) {
    if !netns.exists() {
        return;
    }
    let netns = netns.to_owned();
    let done = tokio::task::spawn_blocking(move || {
        crate::netns::run_in(&netns, move || {
            // A child forked from this thread lives in the namespace too.
            let listed = std::process::Command::new("ip")
                .args(["-o", "addr", "show", "dev", IFNAME])
                .output()
                .map_err(|e| format!("ip addr show: {e}"))?;
            let text = String::from_utf8_lossy(&listed.stdout);
            for cidr in text.lines().filter_map(|l| {
                l.split_whitespace()
                    .skip_while(|w| *w != "inet" && *w != "inet6")
                    .nth(1)
            }) {
                let addr = cidr.split('/').next().and_then(|a| a.parse::<IpAddr>().ok());
                let keeps = match addr {
                    Some(IpAddr::V4(a)) => a == keep,
                    // The kernel's own link-local address stays.
                    Some(IpAddr::V6(a)) => a.segments()[0] & 0xffc0 == 0xfe80,
                    None => true,
                };
                if !keeps {
                    let _ = std::process::Command::new("ip")
                        .args(["addr", "del", cidr, "dev", IFNAME])
                        .output();
                    tracing::warn!(address = %cidr, "removed an address the replica added to its interface");
                }
            }
            Ok(())
        })
    })
    .await;
    if let Ok(Err(e)) = done {
        tracing::debug!(error = %e, "cannot look at the replica's addresses before its delete");
    }
}

/// The host end of the replica's veth (its bridge port), from the add's
/// result.
fn host_port<'a>(result: &'a Value, bridge: &str) -> Option<&'a str> {
    result["interfaces"].as_array().and_then(|l| {
        l.iter()
            .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
            .filter_map(|i| i["name"].as_str())
            .find(|n| *n != bridge)
    })
}

/// The MAC address of the replica's interface, from the add's result.
fn container_mac(result: &Value) -> Option<&str> {
    result["interfaces"].as_array().and_then(|l| {
        l.iter()
            .filter(|i| i["sandbox"].as_str().is_some_and(|s| !s.is_empty()))
            .find(|i| i["name"].as_str() == Some(IFNAME))
            .and_then(|i| i["mac"].as_str())
    })
}

/// Has the bridge's IPv4 frames pass the iptables rules (`br_netfilter`,
/// loaded if it is not; the bridge's own `nf_call_iptables`), as Docker and
/// Kubernetes hosts do; whether they now do. Then a connection translated
/// to a replica on the same bridge (the kernel path, published ports) is
/// bridged straight to it, and the node's firewall, not port isolation,
/// keeps replicas apart.
async fn filter_bridged(bridge: &str) -> bool {
    let sysctl = std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables");
    if !sysctl.exists() {
        let _ = tokio::process::Command::new("modprobe")
            .arg("br_netfilter")
            .output()
            .await;
    }
    if !sysctl.exists() {
        tracing::warn!("no br_netfilter here: replicas are kept apart by isolating their bridge ports, and services served on this node go through the proxy");
        return false;
    }
    let set = tokio::process::Command::new("ip")
        .args([
            "link",
            "set",
            "dev",
            bridge,
            "type",
            "bridge",
            "nf_call_iptables",
            "1",
        ])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    set || std::fs::read_to_string(sysctl).is_ok_and(|v| v.trim() == "1")
}

/// Marks the replica's bridge port (the host end of its veth, from the add's
/// result) isolated or not: the bridge forwards nothing between isolated
/// ports.
async fn isolate(result: &Value, bridge: &str, on: bool) -> Result<(), NetworkError> {
    let Some(veth) = host_port(result, bridge) else {
        return Err(NetworkError::Config {
            field: "isolate_replicas",
            message: "the bridge plugin's result names no host-side veth".into(),
        });
    };
    let out = tokio::process::Command::new("bridge")
        .args([
            "link",
            "set",
            "dev",
            veth,
            "isolated",
            if on { "on" } else { "off" },
        ])
        .output()
        .await
        .map_err(|e| NetworkError::Config {
            field: "isolate_replicas",
            message: format!("cannot run bridge (iproute2): {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Config {
            field: "isolate_replicas",
            message: format!(
                "bridge link set dev {veth} isolated {}: {}",
                if on { "on" } else { "off" },
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// The CNI network's name (in the plugins' rules and address leases).
const NETWORK: &str = "cloudless";

/// The first address of `subnet` (the bridge's; host-local hands out the
/// others).
fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.hosts().next().unwrap_or(subnet.network())
}

/// Makes the node's bridge with its address (the bridge plugin would make
/// it with the first replica; the resolver and the proxy need it before).
async fn ensure_bridge(bridge: &str, gw: Ipv4Addr, prefix: u8) -> Result<(), NetworkError> {
    let ip = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("ip")
            .args(&args)
            .output()
            .await
            .map_err(|e| NetworkError::Config {
                field: "bridge",
                message: format!("cannot run ip: {e}"),
            })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NetworkError::Config {
                field: "bridge",
                message: format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            })
        }
    };
    let s = |v: &[&str]| v.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    if ip(s(&["link", "show", bridge])).await.is_err() {
        // A MAC address of its own: a bridge without one takes its lowest
        // port's, which changes as replicas come and go (and the bridge
        // plugin's CHECK compares it with the add's result).
        let h = gw.octets();
        let mac = format!("02:c1:{:02x}:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2], h[3]);
        ip(s(&[
            "link", "add", "name", bridge, "address", &mac, "type", "bridge",
        ]))
        .await?;
    }
    let addr = format!("{gw}/{prefix}");
    let shown = ip(s(&["-4", "addr", "show", "dev", bridge])).await?;
    if !shown.contains(&format!("inet {addr} ")) {
        ip(s(&["addr", "add", &addr, "dev", bridge])).await?;
    }
    ip(s(&["link", "set", bridge, "up"])).await.map(drop)
}

/// Container ids name files and namespaces: a path separator or a dot
/// name would escape the directory.
fn check_id(id: &str) -> Result<(), NetworkError> {
    if id.is_empty()
        || id.len() > 128
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(NetworkError::Namespace {
            name: id.to_owned(),
            message: "not a valid container id".into(),
        });
    }
    Ok(())
}

/// A request with every optional plugin (to list them all).
fn full_request() -> AttachRequest {
    AttachRequest {
        container_id: String::new(),
        host_ports: vec![HostPort {
            host_port: 1,
            container_port: 1,
            protocol: Protocol::Tcp,
        }],
        egress: Vec::new(),
        bandwidth: Bandwidth {
            ingress_bps: 1,
            egress_bps: 1,
        },
    }
}

/// The loopback interface (a list of its own, as containerd's CRI does).
fn loopback_list() -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "name": "cloudless-loopback",
        "plugins": [{ "type": "loopback" }],
    })
}

/// The network configuration list for `req`: the bridge with addresses
/// from the node's subnet (masqueraded beyond it), then `portmap` if it
/// publishes ports and `bandwidth` if it is rate-limited.
fn conflist(config: &NodeNetworkConfig, req: &AttachRequest) -> Value {
    let mut plugins = vec![json!({
        "type": "bridge",
        "bridge": config.bridge,
        "isGateway": true,
        "ipMasq": true,
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": config.subnet.to_string() }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
            "dataDir": config.state_dir.join("ipam"),
        },
    })];
    if !req.host_ports.is_empty() {
        plugins.push(json!({
            "type": "portmap",
            "capabilities": { "portMappings": true },
            "snat": true,
        }));
    }
    if req.bandwidth != Bandwidth::default() {
        plugins.push(json!({ "type": "bandwidth", "capabilities": { "bandwidth": true } }));
    }
    json!({ "cniVersion": CNI_VERSION, "name": NETWORK, "plugins": plugins })
}

/// The capability values of `req`.
fn runtime_config(req: &AttachRequest) -> serde_json::Map<String, Value> {
    let mut rc = serde_json::Map::new();
    if !req.host_ports.is_empty() {
        let mappings: Vec<Value> = req
            .host_ports
            .iter()
            .map(|p| {
                json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": p.protocol,
                })
            })
            .collect();
        rc.insert("portMappings".into(), Value::Array(mappings));
    }
    let b = req.bandwidth;
    if b != Bandwidth::default() {
        let mut bw = serde_json::Map::new();
        for (dir, rate) in [("ingress", b.ingress_bps), ("egress", b.egress_bps)] {
            if rate > 0 {
                bw.insert(format!("{dir}Rate"), json!(rate));
                bw.insert(format!("{dir}Burst"), json!(burst_bits(rate)));
            }
        }
        rc.insert("bandwidth".into(), Value::Object(bw));
    }
    rc
}

/// The bucket of a rate limit: a tenth of a second of traffic, at least
/// 64 KiB (a burst below one packet train stalls TCP).
fn burst_bits(rate_bps: u64) -> u64 {
    (rate_bps / 10).max(64 * 1024 * 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeNetworkConfig {
        NodeNetworkConfig {
            subnet: "10.244.3.0/24".parse().expect("net"),
            internal: vec![],
            bridge: "cld0".into(),
            cni_bin_dir: "/usr/lib/cni".into(),
            state_dir: "/var/lib/cloudless/network".into(),
            netns_dir: "/run/cloudless/netns".into(),
            chain_prefix: "CLOUDLESS".into(),
            service_cidr: None,
            proxy_port: 7681,
            dns_port: 53,
            isolate_replicas: true,
        }
    }

    #[test]
    fn a_plain_replica_gets_the_bridge_only_and_published_or_limited_ones_more() {
        let mut req = AttachRequest {
            container_id: "c".into(),
            host_ports: vec![],
            egress: vec![],
            bandwidth: Bandwidth::default(),
        };
        let types = |v: &Value| -> Vec<String> {
            v["plugins"]
                .as_array()
                .expect("plugins")
                .iter()
                .map(|p| p["type"].as_str().expect("type").to_owned())
                .collect()
        };
        let plain = conflist(&config(), &req);
        assert_eq!(types(&plain), ["bridge"]);
        assert_eq!(
            plain["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.3.0/24"
        );
        assert!(runtime_config(&req).is_empty());
        req.host_ports.push(HostPort {
            host_port: 8080,
            container_port: 80,
            protocol: Protocol::Udp,
        });
        req.bandwidth.egress_bps = 8_000_000;
        assert_eq!(
            types(&conflist(&config(), &req)),
            ["bridge", "portmap", "bandwidth"]
        );
        let rc = Value::Object(runtime_config(&req));
        assert_eq!(
            rc["portMappings"],
            json!([{ "hostPort": 8080, "containerPort": 80, "protocol": "udp" }])
        );
        assert_eq!(rc["bandwidth"]["egressRate"], 8_000_000);
        assert!(rc["bandwidth"].get("ingressRate").is_none());
    }

    #[test]
    fn container_ids_cannot_escape_the_directories() {
        for bad in ["", "..", "../x", "a/b", ".hidden", "ü"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
        check_id("default-web-0a1b.2").expect("valid");
    }
}
