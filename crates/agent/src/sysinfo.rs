//! What the device has and uses, from /proc and /sys (Linux).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cloudless_proto::v1 as pb;
use cloudless_proto::WireEnum as _;
use cloudless_types::{ClosedSet as _, NodeCondition, PowerSource};

/// Below this share of available memory the node reports `MemoryPressure`.
const MEMORY_PRESSURE_AVAILABLE: f64 = 0.05;

/// Reads device capacity, usage, power and conditions. Keeps the previous
/// CPU counters to turn them into a rate.
#[derive(Debug)]
pub struct DeviceProbe {
    proc_root: PathBuf,
    power_root: PathBuf,
    last_cpu: Option<(u64, u64)>,
    labels: BTreeMap<String, String>,
    overlay_addresses: Vec<String>,
    /// Where replicas' volumes go: its file system's size is the node's
    /// storage capacity.
    storage_dir: Option<PathBuf>,
    /// The node's bandwidth in bits per second, when set by the operator;
    /// else the default route's link speed.
    bandwidth_bps: Option<u64>,
    /// Where network interfaces are listed (`/sys/class/net`).
    net_root: PathBuf,
}

/// CPU architecture in OCI spelling.
pub(crate) fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl Default for DeviceProbe {
    fn default() -> Self {
        Self::new(Path::new("/proc"), Path::new("/sys/class/power_supply"))
    }
}

impl DeviceProbe {
    /// A probe reading the given roots (tests point them at fixtures).
    pub fn new(proc_root: &Path, power_root: &Path) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert("arch".to_owned(), arch().to_owned());
        labels.insert("os".to_owned(), std::env::consts::OS.to_owned());
        Self {
            proc_root: proc_root.to_owned(),
            power_root: power_root.to_owned(),
            last_cpu: None,
            labels,
            overlay_addresses: Vec::new(),
            storage_dir: None,
            bandwidth_bps: None,
            net_root: PathBuf::from("/sys/class/net"),
        }
    }

    /// Reports the size of `dir`'s file system as the storage capacity.
    pub fn with_storage_dir(mut self, dir: &Path) -> Self {
        self.storage_dir = Some(dir.to_owned());
        self
    }

    /// Reports `bps` as the bandwidth capacity (else the default route's
    /// link speed, where the kernel knows it).
    pub fn with_bandwidth(mut self, bps: Option<u64>) -> Self {
        self.bandwidth_bps = bps;
        self
    }

    /// Reads interfaces under `root` instead of `/sys/class/net` (tests).
    pub fn with_net_root(mut self, root: &Path) -> Self {
        self.net_root = root.to_owned();
        self
    }

    /// (total, used) bytes of the storage directory's file system.
    fn storage(&self) -> (u64, u64) {
        let Some(dir) = &self.storage_dir else {
            return (0, 0);
        };
        match nix::sys::statvfs::statvfs(dir) {
            Ok(v) => {
                let frag = v.fragment_size();
                let total = v.blocks().saturating_mul(frag);
                let free = v.blocks_available().saturating_mul(frag);
                (total, total.saturating_sub(free))
            }
            Err(_) => (0, 0),
        }
    }

    /// The node's bandwidth in bits per second: the operator's figure, else
    /// the link speed of the default route's interface (0: unknown, as for
    /// most virtual interfaces).
    fn bandwidth(&self) -> u64 {
        if let Some(b) = self.bandwidth_bps {
            return b;
        }
        let routes = std::fs::read_to_string(self.proc_root.join("net/route")).unwrap_or_default();
        let Some(iface) = routes.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"00000000")).then(|| f.first().map(|s| (*s).to_owned()))?
        }) else {
            return 0;
        };
        std::fs::read_to_string(self.net_root.join(iface).join("speed"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .and_then(|mbps| u64::try_from(mbps).ok())
            .map_or(0, |mbps| mbps.saturating_mul(1_000_000))
    }

    /// Adds labels the agent reports besides `arch` and `os`.
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> Self {
        self.labels.extend(labels);
        self
    }

    /// Reports these overlay addresses in every heartbeat.
    pub fn with_overlay_addresses(mut self, addresses: Vec<String>) -> Self {
        self.overlay_addresses = addresses;
        self
    }

    fn meminfo(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(self.proc_root.join("meminfo")).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024)
        };
        (field("MemTotal:"), field("MemAvailable:"))
    }

    /// (busy, total) jiffies over all CPUs.
    fn cpu_counters(&self) -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(self.proc_root.join("stat")).ok()?;
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Some((total.saturating_sub(idle), total))
    }

    fn power(&self) -> (PowerSource, u32) {
        let Ok(entries) = std::fs::read_dir(&self.power_root) else {
            return (PowerSource::Mains, 0);
        };
        for e in entries.flatten() {
            let p = e.path();
            let read = |f: &str| {
                std::fs::read_to_string(p.join(f))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default()
            };
            if read("type") == "Battery" && read("status") == "Discharging" {
                let pct = read("capacity").parse::<u32>().unwrap_or(0).min(100);
                return (PowerSource::Battery, pct);
            }
        }
        (PowerSource::Mains, 0)
    }

    /// A heartbeat describing the device now.
    pub fn heartbeat(&mut self) -> pb::HeartbeatRequest {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64;
        let (mem_total, mem_available) = self.meminfo();
        let cpu_used = match (self.last_cpu, self.cpu_counters()) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                (b1.saturating_sub(b0)) * cpus * 1000 / (t1 - t0)
            }
            _ => 0,
        };
        self.last_cpu = self.cpu_counters();
        let mut conditions = Vec::new();
        if mem_total > 0 && (mem_available as f64) < mem_total as f64 * MEMORY_PRESSURE_AVAILABLE {
            conditions.push(NodeCondition::MemoryPressure);
        }
        let (power_source, battery_percent) = self.power();
        let (storage_total, storage_used) = self.storage();
        pb::HeartbeatRequest {
            capacity: Some(pb::Resources {
                cpu_millis: cpus * 1000,
                memory_bytes: mem_total,
                storage_bytes: storage_total,
                bandwidth_bps: self.bandwidth(),
                ..Default::default()
            }),
            usage: Some(pb::Resources {
                cpu_millis: cpu_used,
                memory_bytes: mem_total.saturating_sub(mem_available),
                storage_bytes: storage_used,
                ..Default::default()
            }),
            labels: self.labels.clone().into_iter().collect(),
            legacy_conditions: conditions.iter().map(|c| c.name().to_owned()).collect(),
            conditions: conditions
                .into_iter()
                .map(pb::NodeCondition::wire)
                .collect(),
            legacy_power_source: power_source.name().to_owned(),
            power_source: pb::PowerSource::wire(power_source),
            battery_percent,
            overlay_addresses: self.overlay_addresses.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memory_pressure_and_battery_from_fixtures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc_root = dir.path().join("proc");
        let power = dir.path().join("power");
        std::fs::create_dir_all(&proc_root).expect("mkdir");
        std::fs::create_dir_all(power.join("BAT0")).expect("mkdir");
        std::fs::write(
            proc_root.join("meminfo"),
            "MemTotal:       1000000 kB\nMemFree:  10 kB\nMemAvailable:     20000 kB\n",
        )
        .expect("write");
        std::fs::write(power.join("BAT0/type"), "Battery\n").expect("write");
        std::fs::write(power.join("BAT0/status"), "Discharging\n").expect("write");
        std::fs::write(power.join("BAT0/capacity"), "42\n").expect("write");
        let hb = DeviceProbe::new(&proc_root, &power).heartbeat();
        assert_eq!(
            hb.capacity.expect("capacity").memory_bytes,
            1_000_000 * 1024
        );
        assert_eq!(hb.usage.expect("usage").memory_bytes, 980_000 * 1024);
        assert_eq!(
            hb.conditions().collect::<Vec<_>>(),
            [pb::NodeCondition::MemoryPressure]
        );
        assert_eq!(
            (hb.power_source(), hb.battery_percent),
            (pb::PowerSource::Battery, 42)
        );
        // The twins, for coordinators of the previous release.
        assert_eq!(
            (hb.legacy_power_source.as_str(), hb.legacy_conditions),
            ("battery", vec!["MemoryPressure".to_owned()])
        );
        assert_eq!(hb.labels.get("arch").map(String::as_str), Some(arch()));
    }

    #[test]
    fn storage_and_bandwidth_capacity_come_from_the_volume_disk_and_the_default_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc_root = dir.path().join("proc");
        let net = dir.path().join("net");
        std::fs::create_dir_all(proc_root.join("net")).expect("mkdir");
        std::fs::create_dir_all(net.join("eth0")).expect("mkdir");
        std::fs::write(
            proc_root.join("net/route"),
            "Iface\tDestination\tGateway\tFlags\nlo\t0000007F\t00000000\t0001\neth0\t00000000\t0102A8C0\t0003\n",
        )
        .expect("write");
        std::fs::write(net.join("eth0/speed"), "1000\n").expect("write");
        let probe = DeviceProbe::new(&proc_root, &dir.path().join("power"))
            .with_net_root(&net)
            .with_storage_dir(dir.path());
        let cap = probe.clone_heartbeat().capacity.expect("capacity");
        assert_eq!(cap.bandwidth_bps, 1_000_000_000);
        assert!(
            cap.storage_bytes > 0,
            "the temp dir's file system has a size"
        );
        // A virtual link without a speed: unknown, unless the operator says.
        std::fs::write(net.join("eth0/speed"), "-1\n").expect("write");
        assert_eq!(
            probe
                .clone_heartbeat()
                .capacity
                .expect("capacity")
                .bandwidth_bps,
            0
        );
        let declared = DeviceProbe::new(&proc_root, &dir.path().join("power"))
            .with_net_root(&net)
            .with_bandwidth(Some(50_000_000));
        assert_eq!(
            declared
                .clone_heartbeat()
                .capacity
                .expect("capacity")
                .bandwidth_bps,
            50_000_000
        );
    }

    impl DeviceProbe {
        /// A heartbeat from a copy (the probe keeps CPU counters).
        fn clone_heartbeat(&self) -> pb::HeartbeatRequest {
            let mut p = DeviceProbe::new(&self.proc_root, &self.power_root)
                .with_net_root(&self.net_root)
                .with_bandwidth(self.bandwidth_bps);
            p.storage_dir.clone_from(&self.storage_dir);
            p.heartbeat()
        }
    }

    #[test]
    fn a_machine_without_batteries_is_on_mains() {
        let mut probe = DeviceProbe::default();
        let hb = probe.heartbeat();
        assert!(hb.capacity.expect("capacity").cpu_millis >= 1000);
        assert_eq!(hb.power_source(), pb::PowerSource::Mains);
    }
}
