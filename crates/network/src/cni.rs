//! Runs CNI plugins per the CNI specification (1.0): a network
//! configuration list is added plugin by plugin, each given the previous
//! one's result; checked in the same order and deleted in reverse order,
//! both given the cached result of the add. What an add returned is kept
//! on disk with the configuration it used ([`Cache`]), so a delete after an
//! agent restart undoes exactly what was done.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::NetworkError;

/// The CNI version the agent speaks (Debian's plugins 1.1 support it).
pub const CNI_VERSION: &str = "1.0.0";

/// The longest a plugin may take before the call fails.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The most output read from a plugin.
const MAX_OUTPUT: usize = 1 << 20;

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Connect the container.
    Add,
    /// Check the container's network is as added.
    Check,
    /// Disconnect the container (succeeds if already gone).
    Del,
}

impl Command {
    fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Check => "CHECK",
            Self::Del => "DEL",
        }
    }
}

/// One container's attachment to a network, as the plugins see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invocation {
    /// The container id (`CNI_CONTAINERID`).
    pub container_id: String,
    /// The network namespace file (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The interface inside it (`CNI_IFNAME`).
    pub ifname: String,
    /// Values for the plugins' capabilities (`portMappings`, `bandwidth`);
    /// each plugin gets only those it declares.
    pub runtime_config: serde_json::Map<String, Value>,
}

/// Where the plugins are (`CNI_PATH`).
#[derive(Debug, Clone)]
pub struct Plugins {
    dir: PathBuf,
}

impl Plugins {
    /// Plugins in `dir` (Debian: `/usr/lib/cni`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The plugins of `list` that are not in the directory.
    pub fn missing(&self, list: &Value) -> Vec<String> {
        plugin_confs(list)
            .iter()
            .filter_map(|p| p["type"].as_str())
            .filter(|t| !self.dir.join(t).is_file())
            .map(str::to_owned)
            .collect()
    }

    /// ADD: runs every plugin of `list` in order, each given the previous
    /// result; the last result. On a failure, what was added is deleted
    /// again (best effort) and the failure returned.
    pub async fn add(&self, list: &Value, inv: &Invocation) -> Result<Value, NetworkError> {
        let mut prev: Option<Value> = None;
        for conf in plugin_confs(list) {
            match self
                .exec(Command::Add, list, conf, inv, prev.as_ref())
                .await
            {
                Ok(result) => prev = Some(result),
                Err(e) => {
                    if let Err(d) = self.del(list, inv, prev.as_ref()).await {
                        tracing::warn!(container = %inv.container_id, error = %d, "cleaning up after a failed CNI add");
                    }
                    return Err(e);
                }
            }
        }
        Ok(prev.unwrap_or_else(|| json!({ "cniVersion": CNI_VERSION })))
    }

    /// CHECK: runs every plugin of `list` in order, given the add's result.
    pub async fn check(
        &self,
        list: &Value,
        inv: &Invocation,
        result: &Value,
    ) -> Result<(), NetworkError> {
        for conf in plugin_confs(list) {
            self.exec(Command::Check, list, conf, inv, Some(result))
                .await?;
        }
        Ok(())
    }

    /// DEL: runs every plugin of `list` in reverse order, given the add's
    /// result when known. Every plugin is run; the first failure is
    /// returned.
    pub async fn del(
        &self,
        list: &Value,
        inv: &Invocation,
        result: Option<&Value>,
    ) -> Result<(), NetworkError> {
        let mut first = None;
        for conf in plugin_confs(list).iter().rev() {
            if let Err(e) = self.exec(Command::Del, list, conf, inv, result).await {
                tracing::warn!(container = %inv.container_id, error = %e, "CNI delete");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Runs one plugin with its configuration on stdin; its result (ADD), or
    /// `null`.
    async fn exec(
        &self,
        command: Command,
        list: &Value,
        conf: &Value,
        inv: &Invocation,
        prev: Option<&Value>,
    ) -> Result<Value, NetworkError> {
        let plugin = conf["type"].as_str().unwrap_or_default().to_owned();
        let fail = |message: String| NetworkError::Plugin {
            plugin: plugin.clone(),
            command: command.as_str(),
            container: inv.container_id.clone(),
            message,
        };
        if plugin.is_empty() || plugin.contains('/') {
            return Err(fail(
                "the plugin configuration has no valid \"type\"".into(),
            ));
        }
        let stdin = plugin_stdin(list, conf, inv, prev);
        let mut child = tokio::process::Command::new(self.dir.join(&plugin))
            .env("CNI_COMMAND", command.as_str())
            .env("CNI_CONTAINERID", &inv.container_id)
            .env("CNI_NETNS", &inv.netns)
            .env("CNI_IFNAME", &inv.ifname)
            .env("CNI_PATH", &self.dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                fail(format!(
                    "cannot run {}: {e}",
                    self.dir.join(&plugin).display()
                ))
            })?;
        if let Some(mut input) = child.stdin.take() {
            use tokio::io::AsyncWriteExt as _;
            let bytes = serde_json::to_vec(&stdin).expect("JSON values encode");
            input
                .write_all(&bytes)
                .await
                .map_err(|e| fail(format!("writing its configuration: {e}")))?;
        }
        let out = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| fail(format!("no answer within {PLUGIN_TIMEOUT:?}")))?
            .map_err(|e| fail(format!("waiting for it: {e}")))?;
        let stdout = &out.stdout[..out.stdout.len().min(MAX_OUTPUT)];
        if !out.status.success() {
            return Err(fail(plugin_error(stdout, &out.stderr, out.status)));
        }
        if command != Command::Add {
            return Ok(Value::Null);
        }
        serde_json::from_slice(stdout).map_err(|e| fail(format!("its result is not JSON: {e}")))
    }
}

/// The plugin configurations of a list.
fn plugin_confs(list: &Value) -> &[Value] {
    list["plugins"].as_array().map_or(&[], Vec::as_slice)
}

/// What a plugin reads on stdin: its own configuration with the list's
/// name and version, the previous result, and the runtime values of the
/// capabilities it declares.
fn plugin_stdin(list: &Value, conf: &Value, inv: &Invocation, prev: Option<&Value>) -> Value {
    let mut stdin = conf.clone();
    let Some(obj) = stdin.as_object_mut() else {
        return stdin;
    };
    obj.insert("name".into(), list["name"].clone());
    obj.insert("cniVersion".into(), list["cniVersion"].clone());
    if let Some(p) = prev {
        obj.insert("prevResult".into(), p.clone());
    }
    let declared: serde_json::Map<String, Value> = conf["capabilities"]
        .as_object()
        .map(|caps| {
            inv.runtime_config
                .iter()
                .filter(|(k, _)| caps.get(*k).and_then(Value::as_bool) == Some(true))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    if !declared.is_empty() {
        obj.insert("runtimeConfig".into(), Value::Object(declared));
    }
    stdin
}

/// A failed plugin's error: its JSON error (`msg`: `details`), else its
/// stderr, else its exit status.
fn plugin_error(stdout: &[u8], stderr: &[u8], status: std::process::ExitStatus) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(stdout) {
        if let Some(msg) = v["msg"].as_str() {
            let code = v["code"].as_u64().unwrap_or_default();
            return match v["details"].as_str().filter(|d| !d.is_empty()) {
                Some(d) => format!("{msg}: {d} (code {code})"),
                None => format!("{msg} (code {code})"),
            };
        }
    }
    let err = String::from_utf8_lossy(&stderr[..stderr.len().min(4096)]);
    let err = err.trim();
    if err.is_empty() {
        format!("it ended with {status}")
    } else {
        err.to_owned()
    }
}

/// What an add did, kept until the delete: the configuration list it used,
/// the call, and the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attached {
    /// The configuration list.
    pub list: Value,
    /// The call.
    pub invocation: Invocation,
    /// The last plugin's result.
    pub result: Value,
}

impl Attached {
    /// The first IPv4 address of the result on the container's interface,
    /// with the gateway.
    pub fn ipv4(&self) -> Option<(std::net::Ipv4Addr, Option<std::net::Ipv4Addr>)> {
        let ifaces = self.result["interfaces"].as_array();
        let in_container = |idx: Option<u64>| {
            let Some(i) = idx else { return true };
            ifaces
                .and_then(|l| usize::try_from(i).ok().and_then(|i| l.get(i)))
                .is_none_or(|iface| iface["sandbox"].as_str().is_some_and(|s| !s.is_empty()))
        };
        self.result["ips"].as_array()?.iter().find_map(|ip| {
            let net: ipnet::IpNet = ip["address"].as_str()?.parse().ok()?;
            let std::net::IpAddr::V4(addr) = net.addr() else {
                return None;
            };
            if !in_container(ip["interface"].as_u64()) {
                return None;
            }
            let gw = ip["gateway"].as_str().and_then(|g| g.parse().ok());
            Some((addr, gw))
        })
    }
}

/// The add results on disk: `<dir>/<container id>.json`.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Results in `dir` (made if missing, readable by root only).
    pub fn open(dir: &Path) -> Result<Self, NetworkError> {
        std::fs::create_dir_all(dir).map_err(|e| NetworkError::io(dir, e))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, container_id: &str) -> PathBuf {
        self.dir.join(format!("{container_id}.json"))
    }

    /// Keeps what the add of `a.invocation.container_id` did (written to a
    /// temporary file, synced and renamed: never half a record).
    pub fn put(&self, a: &Attached) -> Result<(), NetworkError> {
        use std::io::Write as _;
        let path = self.path(&a.invocation.container_id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(a).expect("JSON values encode");
        let mut f = std::fs::File::create(&tmp).map_err(|e| NetworkError::io(&tmp, e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| NetworkError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| NetworkError::io(&path, e))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// What the add of `container_id` did; `None` if nothing is kept (or
    /// the record cannot be read: it is then logged and treated as gone).
    pub fn get(&self, container_id: &str) -> Option<Attached> {
        let path = self.path(container_id);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable CNI result; ignoring it");
                None
            }
        }
    }

    /// Forgets `container_id`.
    pub fn remove(&self, container_id: &str) -> Result<(), NetworkError> {
        let path = self.path(container_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(NetworkError::io(&path, e)),
            _ => Ok(()),
        }
    }

    /// The container ids with a kept result.
    pub fn list(&self) -> Result<Vec<String>, NetworkError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| NetworkError::io(&self.dir, e))?;
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".json").map(str::to_owned))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv() -> Invocation {
        let mut rc = serde_json::Map::new();
        rc.insert("portMappings".into(), json!([{ "hostPort": 8080 }]));
        rc.insert("bandwidth".into(), json!({ "ingressRate": 1000 }));
        Invocation {
            container_id: "c1".into(),
            netns: "/run/x/c1".into(),
            ifname: "eth0".into(),
            runtime_config: rc,
        }
    }

    #[test]
    fn a_plugin_gets_the_list_name_version_previous_result_and_only_its_capabilities() {
        let list = json!({ "cniVersion": "1.0.0", "name": "n", "plugins": [] });
        let conf = json!({ "type": "portmap", "capabilities": { "portMappings": true } });
        let prev = json!({ "ips": [] });
        let s = plugin_stdin(&list, &conf, &inv(), Some(&prev));
        assert_eq!(s["name"], "n");
        assert_eq!(s["cniVersion"], "1.0.0");
        assert_eq!(s["prevResult"], prev);
        assert_eq!(s["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert!(s["runtimeConfig"].get("bandwidth").is_none());
        let bridge = json!({ "type": "bridge" });
        assert!(plugin_stdin(&list, &bridge, &inv(), None)
            .get("runtimeConfig")
            .is_none());
    }

    #[test]
    fn a_plugin_error_is_its_message_and_details() {
        let status = std::process::Command::new("false")
            .status()
            .expect("false runs");
        let out = br#"{"code":7,"msg":"failed to allocate","details":"range full"}"#;
        assert_eq!(
            plugin_error(out, b"", status),
            "failed to allocate: range full (code 7)"
        );
        assert_eq!(plugin_error(b"junk", b" oops\n", status), "oops");
        assert!(plugin_error(b"", b"", status).contains("exit status"));
    }

    #[test]
    fn the_container_address_is_the_one_on_the_sandbox_interface() {
        let a = Attached {
            list: json!({}),
            invocation: inv(),
            result: json!({
                "interfaces": [
                    { "name": "cld0", "mac": "x" },
                    { "name": "veth1", "mac": "y" },
                    { "name": "eth0", "mac": "z", "sandbox": "/run/x/c1" }
                ],
                "ips": [
                    { "address": "10.1.0.1/24", "interface": 0 },
                    { "address": "10.1.0.7/24", "gateway": "10.1.0.1", "interface": 2 }
                ]
            }),
        };
        assert_eq!(
            a.ipv4(),
            Some((
                "10.1.0.7".parse().expect("ip"),
                Some("10.1.0.1".parse().expect("ip"))
            ))
        );
    }

    #[test]
    fn the_cache_keeps_a_result_until_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let a = Attached {
            list: json!({ "name": "n" }),
            invocation: inv(),
            result: json!({ "ips": [] }),
        };
        cache.put(&a).expect("put");
        assert_eq!(cache.get("c1"), Some(a));
        assert_eq!(cache.list().expect("list"), vec!["c1".to_owned()]);
        std::fs::write(dir.path().join("c2.json"), b"{broken").expect("write");
        assert_eq!(cache.get("c2"), None);
        cache.remove("c1").expect("remove");
        cache.remove("c1").expect("removing twice is fine");
        assert_eq!(cache.get("c1"), None);
    }
}
