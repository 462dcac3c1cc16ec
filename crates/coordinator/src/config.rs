//! Coordinator configuration: a TOML file, overridden by `CLOUDLESS_*`
//! environment variables, overridden by flags. Every problem is collected and
//! reported together, before any port is bound.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudless_telemetry::LogFormat;

/// Raft timing and compaction settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftConfig {
    /// Leader heartbeat period, and the time limit openraft gives one AppendEntries. Default 100 ms.
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomised election timeout. Default 200 ms.
    pub election_timeout_min: Duration,
    /// Upper bound of the randomised election timeout (also the leader lease). Default 450 ms.
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many applied entries since the last one. Default 10000.
    pub snapshot_after_logs: u64,
    /// Entries kept after a snapshot for slow followers. Default 1000.
    pub logs_to_keep_after_snapshot: u64,
    /// Largest encoded Raft entry; a single change larger than this is
    /// refused. Default 1 MiB.
    pub max_entry_bytes: usize,
    /// Most entry bytes in one AppendEntries (at least one entry is always
    /// sent). Default 4 MiB.
    pub max_append_bytes: usize,
    /// The slowest link between coordinators to plan for, in bytes per
    /// second: an AppendEntries carrying `n` bytes may take 1 s + n / this.
    /// Default 1 MiB/s.
    pub min_link_bytes_per_s: u64,
    /// Tests only: delay every Raft message as if the link carried this many
    /// bytes per second (0, the default: off).
    pub test_link_bytes_per_s: u64,
}

/// Rates of the writes one caller can cause on the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Raft writes per second one node may cause (status reports, renewals,
    /// secret tokens and reads, refusals). Default 20.
    pub node_writes_per_s: u32,
    /// Burst of such writes. Default 100.
    pub node_write_burst: u32,
    /// Bytes per second of requests that write (status reports, renewals)
    /// one node may send: a node over it is refused before its next request
    /// body is read. Default 64 KiB/s.
    pub node_write_bytes_per_s: u32,
    /// Burst of such bytes. Default 2 MiB (two full status reports).
    pub node_write_burst_bytes: u32,
    /// Failed enrollment and rejoin attempts per second from one source
    /// address (IPv6: one /64). Default 5.
    pub enrolls_per_s: u32,
    /// Burst of failed enrollment and rejoin attempts. Default 20.
    pub enroll_burst: u32,
}

/// The whole coordinator configuration. See `config/coordinator.toml` for every key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// Raft node id; 0 means generate one on first start and keep it in the data dir.
    pub node_id: u64,
    /// Where the Raft log and state live.
    pub data_dir: PathBuf,
    /// gRPC listen address (Raft and the public API).
    pub listen_addr: SocketAddr,
    /// Address other coordinators and clients use to reach this one.
    /// Defaults to `listen_addr`, which must then not be a wildcard address.
    pub advertise_addr: String,
    /// HTTP listen address for /healthz, /readyz and /metrics.
    pub http_addr: SocketAddr,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax.
    pub log_filter: String,
    /// Cluster name recorded by `init`.
    pub cluster_name: String,
    /// File holding the base64 master key that seals the CA and token keys
    /// (mode 0600). Without it this coordinator cannot create the cluster CA,
    /// issue join tokens or enroll nodes.
    pub master_key_file: Option<PathBuf>,
    /// Extra names (IP addresses or DNS names) in this coordinator's
    /// certificate besides the advertised host, for clients and agents that
    /// reach it by another address (comma-separated `tls_sans`).
    pub tls_sans: Vec<String>,
    /// UDP address of the overlay relay (agents that cannot reach each other
    /// directly relay through coordinators); `None`: no relay. Needs mTLS.
    pub overlay_listen: Option<SocketAddr>,
    /// Raft settings.
    pub raft: RaftConfig,
    /// Per-caller rate limits.
    pub limits: LimitsConfig,
    /// Serve plaintext gRPC where every caller is an administrator, with no
    /// master key and no mTLS (`--insecure-plaintext`). Only on a loopback
    /// `listen_addr` unless [`Self::insecure_plaintext_anywhere`].
    pub insecure_plaintext: bool,
    /// Allow plaintext on a non-loopback address (`--insecure-plaintext-anywhere`).
    pub insecure_plaintext_anywhere: bool,
    /// Lifetime of this coordinator's own certificate; it is renewed, without
    /// a restart, two thirds into it. Default 30 days.
    pub coordinator_cert_lifetime: Duration,
}

/// Everything wrong with a configuration, one problem per line.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The problems, each naming the key and its source.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Str,
    Bool,
}

/// Every key: dotted path, type, default.
const KEYS: &[(&str, Kind, &str)] = &[
    ("node_id", Kind::Int, "0"),
    ("data_dir", Kind::Str, "/var/lib/cloudless/coordinator"),
    ("listen_addr", Kind::Str, "0.0.0.0:7400"),
    ("advertise_addr", Kind::Str, ""),
    ("http_addr", Kind::Str, "127.0.0.1:7401"),
    ("log_format", Kind::Str, "text"),
    ("log_filter", Kind::Str, "info,openraft=warn"),
    ("cluster.name", Kind::Str, "cloudless"),
    ("master_key_file", Kind::Str, ""),
    ("insecure_plaintext", Kind::Bool, "false"),
    ("insecure_plaintext_anywhere", Kind::Bool, "false"),
    ("tls.coordinator_cert_lifetime_s", Kind::Int, "2592000"),
    ("tls_sans", Kind::Str, ""),
    ("overlay_listen", Kind::Str, ""),
    ("raft.heartbeat_interval_ms", Kind::Int, "100"),
    ("raft.election_timeout_min_ms", Kind::Int, "200"),
    ("raft.election_timeout_max_ms", Kind::Int, "450"),
    ("raft.snapshot_after_logs", Kind::Int, "10000"),
    ("raft.logs_to_keep_after_snapshot", Kind::Int, "1000"),
    ("raft.max_entry_bytes", Kind::Int, "1048576"),
    ("raft.max_append_bytes", Kind::Int, "4194304"),
    ("raft.min_link_bytes_per_s", Kind::Int, "1048576"),
    ("raft.test_link_bytes_per_s", Kind::Int, "0"),
    ("limits.node_writes_per_s", Kind::Int, "20"),
    ("limits.node_write_burst", Kind::Int, "100"),
    ("limits.node_write_bytes_per_s", Kind::Int, "65536"),
    ("limits.node_write_burst_bytes", Kind::Int, "2097152"),
    ("limits.enrolls_per_s", Kind::Int, "5"),
    ("limits.enroll_burst", Kind::Int, "20"),
];

/// The environment variable that overrides `key`: `raft.heartbeat_interval_ms`
/// is `CLOUDLESS_RAFT_HEARTBEAT_INTERVAL_MS`.
pub fn env_name(key: &str) -> String {
    format!("CLOUDLESS_{}", key.replace('.', "_").to_uppercase())
}

/// Where configuration values come from, lowest precedence first.
#[derive(Debug, Default, Clone)]
pub struct ConfigSources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables (all of them; only `CLOUDLESS_*` keys listed in KEYS are read).
    pub env: Vec<(String, String)>,
    /// Flag overrides as `key=value` pairs (from `--set` and the dedicated flags).
    pub flags: Vec<(String, String)>,
}

enum Value {
    Int(i64),
    Str(String),
}

impl CoordinatorConfig {
    /// Loads and validates, reporting every problem at once.
    pub fn load(src: &ConfigSources) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut values: BTreeMap<&'static str, (Value, String)> = BTreeMap::new();
        let kind_of = |k: &str| {
            KEYS.iter()
                .find(|(n, _, _)| *n == k)
                .map(|(n, kind, _)| (*n, *kind))
        };

        if let Some(path) = &src.file {
            match std::fs::read_to_string(path) {
                Err(e) => problems.push(format!("cannot read config file {}: {e}", path.display())),
                Ok(text) => match text.parse::<toml::Table>() {
                    Err(e) => {
                        problems.push(format!("{}: {}", path.display(), e.to_string().trim()))
                    }
                    Ok(table) => {
                        let mut flat = Vec::new();
                        flatten("", &table, &mut flat);
                        for (key, v) in flat {
                            let origin = format!("{} key `{key}`", path.display());
                            match kind_of(&key) {
                                None => problems.push(format!("{origin}: unknown key")),
                                Some((k, Kind::Int)) => match v.as_integer() {
                                    Some(i) => {
                                        values.insert(k, (Value::Int(i), origin));
                                    }
                                    None => problems
                                        .push(format!("{origin}: expected an integer, found {v}")),
                                },
                                Some((k, Kind::Str)) => match v.as_str() {
                                    Some(s) => {
                                        values.insert(k, (Value::Str(s.to_owned()), origin));
                                    }
                                    None => problems
                                        .push(format!("{origin}: expected a string, found {v}")),
                                },
                                Some((k, Kind::Bool)) => match v.as_bool() {
                                    Some(b) => {
                                        values.insert(k, (Value::Str(b.to_string()), origin));
                                    }
                                    None => problems.push(format!(
                                        "{origin}: expected true or false, found {v}"
                                    )),
                                },
                            }
                        }
                    }
                },
            }
        }
        let mut overlay =
            |key: &str, raw: &str, origin: String, problems: &mut Vec<String>| match kind_of(key) {
                None => problems.push(format!("{origin}: unknown key `{key}`")),
                Some((k, Kind::Int)) => match raw.trim().parse::<i64>() {
                    Ok(i) => {
                        values.insert(k, (Value::Int(i), origin));
                    }
                    Err(_) => {
                        problems.push(format!("{origin}: expected an integer, found {raw:?}"))
                    }
                },
                Some((k, Kind::Str | Kind::Bool)) => {
                    values.insert(k, (Value::Str(raw.to_owned()), origin));
                }
            };
        for (key, _, _) in KEYS {
            let name = env_name(key);
            if let Some((_, v)) = src.env.iter().find(|(n, _)| *n == name) {
                overlay(
                    key,
                    v,
                    format!("environment variable {name}"),
                    &mut problems,
                );
            }
        }
        for (key, v) in &src.flags {
            overlay(key, v, format!("flag `{key}`"), &mut problems);
        }

        let get_str = |k: &str| -> (String, String) {
            match values.get(k) {
                Some((Value::Str(s), o)) => (s.clone(), o.clone()),
                Some((Value::Int(i), o)) => (i.to_string(), o.clone()),
                None => (default_of(k).to_owned(), format!("default of `{k}`")),
            }
        };
        let get_int = |k: &str, min: i64, max: i64, problems: &mut Vec<String>| -> i64 {
            let (v, origin) = match values.get(k) {
                Some((Value::Int(i), o)) => (*i, o.clone()),
                _ => (
                    default_of(k).parse().unwrap_or(0),
                    format!("default of `{k}`"),
                ),
            };
            if v < min || v > max {
                problems.push(format!("{origin}: {v} is outside {min}..={max}"));
            }
            v.clamp(min, max)
        };
        let get_addr = |k: &str, problems: &mut Vec<String>| -> SocketAddr {
            let (v, origin) = get_str(k);
            v.parse().unwrap_or_else(|e| {
                problems.push(format!("{origin}: {v:?} is not an ip:port address ({e})"));
                SocketAddr::from(([0, 0, 0, 0], 0))
            })
        };

        let node_id = get_int("node_id", 0, i64::MAX, &mut problems) as u64;
        let (data_dir, dd_origin) = get_str("data_dir");
        if data_dir.trim().is_empty() {
            problems.push(format!("{dd_origin}: must not be empty"));
        }
        let listen_addr = get_addr("listen_addr", &mut problems);
        let http_addr = get_addr("http_addr", &mut problems);
        let (mut advertise_addr, adv_origin) = get_str("advertise_addr");
        if advertise_addr.is_empty() {
            if listen_addr.ip().is_unspecified() {
                problems.push(format!(
                    "advertise_addr: must be set when listen_addr ({listen_addr}) is a wildcard address, so other coordinators can reach this one"
                ));
            }
            advertise_addr = listen_addr.to_string();
        } else if let Err(e) = cloudless_client::HostPort::parse(&advertise_addr) {
            problems.push(format!("{adv_origin}: {e}"));
        }
        let (fmt_raw, fmt_origin) = get_str("log_format");
        let log_format = match fmt_raw.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                problems.push(format!(
                    "{fmt_origin}: {other:?} is not \"text\" or \"json\""
                ));
                LogFormat::Text
            }
        };
        let (log_filter, _) = get_str("log_filter");
        let (cluster_name, cn_origin) = get_str("cluster.name");
        if cluster_name.trim().is_empty() || cluster_name.len() > 128 {
            problems.push(format!("{cn_origin}: must be 1-128 characters"));
        }
        let (sans_raw, sans_origin) = get_str("tls_sans");
        let tls_sans: Vec<String> = sans_raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        for san in &tls_sans {
            let dns_like = san.len() <= 253
                && san.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if san.parse::<std::net::IpAddr>().is_err() && !dns_like {
                problems.push(format!(
                    "{sans_origin}: {san:?} is neither an IP address nor a DNS name"
                ));
            }
        }
        let (ol_raw, ol_origin) = get_str("overlay_listen");
        let overlay_listen = match ol_raw.trim() {
            // The API's address and port, over UDP.
            "" => Some(listen_addr),
            "off" => None,
            other => match other.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    problems.push(format!(
                        "{ol_origin}: {other:?} is neither an ip:port address nor \"off\" ({e})"
                    ));
                    None
                }
            },
        };
        let (mk, mk_origin) = get_str("master_key_file");
        let master_key_file = (!mk.trim().is_empty()).then(|| PathBuf::from(mk.trim()));
        let get_bool = |k: &str, problems: &mut Vec<String>| -> bool {
            let (v, origin) = get_str(k);
            match v.trim() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" | "" => false,
                other => {
                    problems.push(format!("{origin}: {other:?} is not true or false"));
                    false
                }
            }
        };
        let insecure_plaintext = get_bool("insecure_plaintext", &mut problems);
        let insecure_plaintext_anywhere = get_bool("insecure_plaintext_anywhere", &mut problems);
        if insecure_plaintext && master_key_file.is_some() {
            problems.push(format!(
                "{mk_origin}: a master key and insecure_plaintext exclude each other (with a master key the coordinator serves mTLS)"
            ));
        }
        if insecure_plaintext && !insecure_plaintext_anywhere && !listen_addr.ip().is_loopback() {
            problems.push(format!(
                "insecure_plaintext: listen_addr {listen_addr} is not a loopback address; plaintext gRPC makes every caller an administrator \
                 and lets anyone on the network rewrite the Raft log. Serve mTLS (drop --insecure-plaintext), listen on 127.0.0.1, \
                 or add --insecure-plaintext-anywhere if this network is truly trusted"
            ));
        }
        if insecure_plaintext_anywhere && !insecure_plaintext {
            problems.push(
                "insecure_plaintext_anywhere: has no effect without insecure_plaintext".to_owned(),
            );
        }
        let coordinator_cert_lifetime = Duration::from_secs(get_int(
            "tls.coordinator_cert_lifetime_s",
            10,
            365 * 24 * 3600,
            &mut problems,
        ) as u64);
        let hb = get_int("raft.heartbeat_interval_ms", 10, 10_000, &mut problems) as u64;
        let emin = get_int("raft.election_timeout_min_ms", 50, 60_000, &mut problems) as u64;
        let emax = get_int("raft.election_timeout_max_ms", 50, 60_000, &mut problems) as u64;
        if emin <= hb {
            problems.push(format!(
                "raft.election_timeout_min_ms ({emin}) must be greater than raft.heartbeat_interval_ms ({hb})"
            ));
        }
        if emax <= emin {
            problems.push(format!(
                "raft.election_timeout_max_ms ({emax}) must be greater than raft.election_timeout_min_ms ({emin})"
            ));
        }
        let snapshot_after_logs =
            get_int("raft.snapshot_after_logs", 1, i64::MAX, &mut problems) as u64;
        let logs_to_keep = get_int(
            "raft.logs_to_keep_after_snapshot",
            0,
            i64::MAX,
            &mut problems,
        ) as u64;
        let max_entry_bytes =
            get_int("raft.max_entry_bytes", 64 << 10, 32 << 20, &mut problems) as usize;
        let max_append_bytes =
            get_int("raft.max_append_bytes", 64 << 10, 48 << 20, &mut problems) as usize;
        if max_append_bytes < max_entry_bytes {
            problems.push(format!(
                "raft.max_append_bytes ({max_append_bytes}) must be at least raft.max_entry_bytes ({max_entry_bytes})"
            ));
        }
        let min_link_bytes_per_s = get_int(
            "raft.min_link_bytes_per_s",
            16 << 10,
            i64::from(u32::MAX),
            &mut problems,
        ) as u64;
        let test_link_bytes_per_s = get_int(
            "raft.test_link_bytes_per_s",
            0,
            i64::from(u32::MAX),
            &mut problems,
        ) as u64;
        let node_write_bytes_per_s = get_int(
            "limits.node_write_bytes_per_s",
            1024,
            1 << 30,
            &mut problems,
        ) as u32;
        let node_write_burst_bytes = get_int(
            "limits.node_write_burst_bytes",
            64 << 10,
            1 << 30,
            &mut problems,
        ) as u32;
        let mut rate = |k: &str| get_int(k, 1, 1_000_000, &mut problems) as u32;
        let limits = LimitsConfig {
            node_writes_per_s: rate("limits.node_writes_per_s"),
            node_write_burst: rate("limits.node_write_burst"),
            node_write_bytes_per_s,
            node_write_burst_bytes,
            enrolls_per_s: rate("limits.enrolls_per_s"),
            enroll_burst: rate("limits.enroll_burst"),
        };

        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Self {
            node_id,
            data_dir: PathBuf::from(data_dir),
            listen_addr,
            advertise_addr,
            http_addr,
            log_format,
            log_filter,
            cluster_name,
            master_key_file,
            tls_sans,
            overlay_listen,
            raft: RaftConfig {
                heartbeat_interval: Duration::from_millis(hb),
                election_timeout_min: Duration::from_millis(emin),
                election_timeout_max: Duration::from_millis(emax),
                snapshot_after_logs,
                logs_to_keep_after_snapshot: logs_to_keep,
                max_entry_bytes,
                max_append_bytes,
                min_link_bytes_per_s,
                test_link_bytes_per_s,
            },
            limits,
            insecure_plaintext,
            insecure_plaintext_anywhere,
            coordinator_cert_lifetime,
        })
    }

    /// The defaults with a data dir and loopback addresses: for tests and tools.
    pub fn local(data_dir: &Path, listen_addr: SocketAddr, http_addr: SocketAddr) -> Self {
        let src = ConfigSources {
            flags: vec![
                ("data_dir".into(), data_dir.display().to_string()),
                ("listen_addr".into(), listen_addr.to_string()),
                ("http_addr".into(), http_addr.to_string()),
                // Plaintext unless the caller sets `master_key_file` (which
                // wins) or clears this.
                ("insecure_plaintext".into(), "true".into()),
            ],
            ..ConfigSources::default()
        };
        Self::load(&src).expect("loopback defaults are valid")
    }
}

fn default_of(key: &str) -> &'static str {
    KEYS.iter()
        .find(|(n, _, _)| *n == key)
        .map_or("", |(_, _, d)| d)
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            other => out.push((key, other.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).expect("write");
        (dir, p)
    }

    #[test]
    fn shipped_example_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/coordinator.toml");
        let cfg = CoordinatorConfig::load(&ConfigSources {
            file: Some(p),
            ..ConfigSources::default()
        })
        .expect("config/coordinator.toml must load");
        assert_eq!(cfg.raft.heartbeat_interval, Duration::from_millis(100));
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let (_d, p) =
            write("listen_addr = \"127.0.0.1:7000\"\n[raft]\nheartbeat_interval_ms = 50\n");
        let cfg = CoordinatorConfig::load(&ConfigSources {
            file: Some(p),
            env: vec![
                ("CLOUDLESS_RAFT_HEARTBEAT_INTERVAL_MS".into(), "60".into()),
                ("CLOUDLESS_HTTP_ADDR".into(), "127.0.0.1:9000".into()),
            ],
            flags: vec![("http_addr".into(), "127.0.0.1:9001".into())],
        })
        .expect("valid");
        assert_eq!(cfg.raft.heartbeat_interval, Duration::from_millis(60));
        assert_eq!(cfg.http_addr.port(), 9001);
        assert_eq!(cfg.advertise_addr, "127.0.0.1:7000");
    }

    #[test]
    fn every_problem_is_reported_with_its_source() {
        let (_d, p) = write(
            "listen_adr = \"x\"\nhttp_addr = \"nope\"\nlog_format = \"xml\"\n[raft]\nheartbeat_interval_ms = \"fast\"\nelection_timeout_min_ms = 900\n",
        );
        let err = CoordinatorConfig::load(&ConfigSources {
            file: Some(p),
            env: vec![("CLOUDLESS_NODE_ID".into(), "abc".into())],
            flags: vec![],
        })
        .expect_err("bad config accepted");
        let text = err.to_string();
        for needle in [
            "key `listen_adr`: unknown key",
            "key `http_addr`: \"nope\" is not an ip:port",
            "\"xml\" is not \"text\" or \"json\"",
            "key `raft.heartbeat_interval_ms`: expected an integer",
            "CLOUDLESS_NODE_ID: expected an integer",
            "election_timeout_max_ms (450) must be greater than raft.election_timeout_min_ms (900)",
            "advertise_addr: must be set when listen_addr (0.0.0.0:7400) is a wildcard",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn malformed_toml_names_the_file_and_line() {
        let (_d, p) = write("node_id = \n");
        let err = CoordinatorConfig::load(&ConfigSources {
            file: Some(p.clone()),
            ..ConfigSources::default()
        })
        .expect_err("malformed accepted");
        let text = err.to_string();
        assert!(
            text.contains(&p.display().to_string()) && text.contains("line 1"),
            "{text}"
        );
    }
}
