//! Health probes: exec inside the container, or TCP and HTTP from inside the
//! container's network namespace (containers have no address the host can
//! reach before the overlay exists).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::{ContainerRuntime, RuntimeError};

/// How to check a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// Run a command in the container; exit status 0 is success.
    Exec(Vec<String>),
    /// Open a TCP connection to this port on the container's loopback.
    Tcp(u16),
    /// GET this path on this port; a 2xx or 3xx status is success.
    Http {
        /// Port.
        port: u16,
        /// Path, e.g. `/healthz`.
        path: String,
    },
}

/// A probe with Kubernetes timing semantics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// What to check.
    pub action: ProbeAction,
    /// Wait this long after start before the first check.
    pub initial_delay: Duration,
    /// Between checks.
    pub period: Duration,
    /// One check's time limit.
    pub timeout: Duration,
    /// Consecutive successes to count as healthy again.
    pub success_threshold: u32,
    /// Consecutive failures to count as unhealthy.
    pub failure_threshold: u32,
}

/// Runs one check of `action` against container `id` whose init process is `pid`.
pub async fn check<R: ContainerRuntime>(
    rt: &R,
    id: &str,
    pid: u32,
    action: &ProbeAction,
    timeout: Duration,
) -> Result<(), String> {
    match action {
        ProbeAction::Exec(argv) => match rt.exec(id, argv, timeout).await {
            Ok((0, _)) => Ok(()),
            Ok((code, out)) => Err(format!(
                "exec {argv:?} exited {code}: {}",
                out.chars().take(200).collect::<String>()
            )),
            Err(RuntimeError::Timeout(m)) => Err(m),
            Err(e) => Err(e.to_string()),
        },
        ProbeAction::Tcp(port) => {
            let port = *port;
            in_netns(pid, move || {
                TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout)
                    .map(drop)
                    .map_err(|e| format!("tcp {port}: {e}"))
            })
            .await
        }
        ProbeAction::Http { port, path } => {
            let (port, path) = (*port, path.clone());
            in_netns(pid, move || http_get(port, &path, timeout)).await
        }
    }
}

fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("http {port}: {e}"))?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: cloudless-probe\r\n\r\n"
    )
    .map_err(|e| format!("http {port}: {e}"))?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| format!("http {port}: {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("http {port}{path}: not an HTTP answer"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("http {port}{path}: status {code}"))
    }
}

/// Runs `f` on a fresh thread that has joined the network namespace of `pid`
/// (sockets it creates stay in that namespace after the thread ends).
pub async fn in_netns<T, F>(pid: u32, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, String> + Send + 'static,
{
    let task = tokio::task::spawn_blocking(move || {
        // A new OS thread: setns changes only the calling thread, and this
        // one ends with the check.
        std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
                .map_err(|e| format!("network namespace of pid {pid}: {e}"))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering the network namespace of pid {pid}: {e}"))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err("network namespace thread panicked".into()))
    });
    task.await
        .unwrap_or_else(|e| Err(format!("network namespace task: {e}")))
}
