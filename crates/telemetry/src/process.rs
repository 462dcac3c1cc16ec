//! The process metrics every Prometheus client exports (`process_*`, read
//! from `/proc/self` at each scrape) and `cloudless_build_info`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

/// Clock ticks per second in `/proc` (`USER_HZ`: 100 on every Linux
/// architecture, whatever the kernel's own tick rate).
const USER_HZ: f64 = 100.0;

/// Registers the process metrics and `cloudless_build_info{component,
/// version}` (always 1) in `registry`.
pub fn register_process_metrics(registry: &mut Registry, component: &str) {
    registry.register_collector(Box::new(ProcessCollector));
    let info = Family::<Vec<(String, String)>, Gauge>::default();
    info.get_or_create(&vec![
        ("component".to_owned(), component.to_owned()),
        ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
    ])
    .set(1);
    registry.register(
        "cloudless_build_info",
        "Always 1; the component and its version as labels",
        info,
    );
}

/// What `/proc/self` says of this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    start_time_seconds: f64,
    open_fds: i64,
    max_fds: i64,
}

/// Parses `/proc/self/stat`: user and system CPU ticks, start time in ticks
/// since boot, virtual size. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(f64, f64, i64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so field N is f[N - 3].
    let utime: f64 = f.get(14 - 3)?.parse().ok()?;
    let stime: f64 = f.get(15 - 3)?.parse().ok()?;
    let start: f64 = f.get(22 - 3)?.parse().ok()?;
    let vsize: i64 = f.get(23 - 3)?.parse().ok()?;
    Some(((utime + stime) / USER_HZ, start / USER_HZ, vsize))
}

/// `VmRSS` from `/proc/self/status`, in bytes.
fn parse_rss(status: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `btime` (boot time, seconds since the epoch) from `/proc/stat`.
fn parse_btime(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The soft limit of open files from `/proc/self/limits`.
fn parse_max_fds(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn read_stats() -> Option<ProcessStats> {
    let (cpu_seconds, start_ticks_s, virtual_bytes) =
        parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let btime = parse_btime(&std::fs::read_to_string("/proc/stat").ok()?).unwrap_or(0.0);
    Some(ProcessStats {
        cpu_seconds,
        resident_bytes: std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| parse_rss(&s))
            .unwrap_or(0),
        virtual_bytes,
        start_time_seconds: btime + start_ticks_s,
        open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64),
        max_fds: std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| parse_max_fds(&s))
            .unwrap_or(0),
    })
}

#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Not on Linux, or /proc not mounted: nothing to report.
        let Some(s) = read_stats() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "User and system CPU time spent",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        for (name, help, unit, value) in [
            (
                "process_resident_memory",
                "Resident memory size",
                Some(Unit::Bytes),
                s.resident_bytes as f64,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size",
                Some(Unit::Bytes),
                s.virtual_bytes as f64,
            ),
            (
                "process_start_time",
                "Start time since the Unix epoch",
                Some(Unit::Seconds),
                s.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                None,
                s.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Most file descriptors the process may open",
                None,
                s.max_fds as f64,
            ),
        ] {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A name with spaces and a parenthesis, as a process may set.
        let stat = "1234 (tokio (rt) w) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 \
                    4200 123456789 2000 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let (cpu, start, vsize) = parse_stat(stat).expect("parsed");
        assert!((cpu - 3.0).abs() < 1e-9, "{cpu}");
        assert!((start - 42.0).abs() < 1e-9, "{start}");
        assert_eq!(vsize, 123_456_789);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn rss_btime_and_fd_limit_are_read() {
        assert_eq!(
            parse_rss("Name:\tx\nVmRSS:\t   2048 kB\nVmSwap: 0 kB\n"),
            Some(2 * 1024 * 1024)
        );
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000.0)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
    }

    #[test]
    fn this_process_is_exported() {
        let mut registry = Registry::default();
        register_process_metrics(&mut registry, "test");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoded");
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
            "process_max_fds ",
            "cloudless_build_info{component=\"test\",version=\"",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .expect("a resident size");
        assert!(rss > 1024.0 * 1024.0, "resident {rss}");
    }
}
