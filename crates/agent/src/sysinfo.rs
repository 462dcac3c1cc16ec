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
        }
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
        pb::HeartbeatRequest {
            capacity: Some(pb::Resources {
                cpu_millis: cpus * 1000,
                memory_bytes: mem_total,
                ..Default::default()
            }),
            usage: Some(pb::Resources {
                cpu_millis: cpu_used,
                memory_bytes: mem_total.saturating_sub(mem_available),
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
    fn a_machine_without_batteries_is_on_mains() {
        let mut probe = DeviceProbe::default();
        let hb = probe.heartbeat();
        assert!(hb.capacity.expect("capacity").cpu_millis >= 1000);
        assert_eq!(hb.power_source(), pb::PowerSource::Mains);
    }
}
