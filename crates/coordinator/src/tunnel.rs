//! Requests from coordinators to agents over the agents' own `Tunnel`
//! streams (agents dial out to every coordinator; nothing dials a device).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use cloudless_proto::v1::{ExecRequest, LogsRequest, TunnelDown, TunnelUp};
use tokio::sync::mpsc;

/// Open tunnels on this coordinator and the requests waiting for answers.
#[derive(Debug, Default)]
pub(crate) struct Tunnels {
    /// Node id -> (tunnel generation, sender of requests).
    nodes: Mutex<HashMap<String, (u64, mpsc::Sender<TunnelDown>)>>,
    /// Request id -> where its answers go.
    pending: Mutex<HashMap<u64, mpsc::Sender<TunnelUp>>>,
    next: AtomicU64,
}

/// Removes a pending request when the caller drops its stream, and tells
/// the agent to stop.
#[derive(Debug)]
pub(crate) struct Pending {
    tunnels: std::sync::Arc<Tunnels>,
    id: u64,
    node: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut p) = self.tunnels.pending.lock() {
            p.remove(&self.id);
        }
        let tx = self
            .tunnels
            .nodes
            .lock()
            .ok()
            .and_then(|n| n.get(&self.node).map(|(_, tx)| tx.clone()));
        if let Some(tx) = tx {
            let _ = tx.try_send(TunnelDown {
                request_id: self.id,
                logs: None,
                cancel: true,
                exec: None,
            });
        }
    }
}

impl Tunnels {
    /// Records `node`'s tunnel (replacing an older one); returns its generation.
    pub(crate) fn open(&self, node: &str, tx: mpsc::Sender<TunnelDown>) -> u64 {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut n) = self.nodes.lock() {
            n.insert(node.to_owned(), (generation, tx));
        }
        generation
    }

    /// Forgets `node`'s tunnel if it is still generation `generation`.
    pub(crate) fn close(&self, node: &str, generation: u64) {
        if let Ok(mut n) = self.nodes.lock() {
            if n.get(node).is_some_and(|(g, _)| *g == generation) {
                n.remove(node);
            }
        }
    }

    /// Hands an agent's answer to the request waiting for it.
    pub(crate) fn deliver(&self, up: TunnelUp) {
        let tx = self
            .pending
            .lock()
            .ok()
            .and_then(|p| p.get(&up.request_id).cloned());
        if let Some(tx) = tx {
            let end = up.end;
            let id = up.request_id;
            if tx.try_send(up).is_err() || end {
                // A caller too slow to keep up loses the rest, not the tunnel.
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&id);
                }
            }
        }
    }

    /// Asks `node` for logs; answers arrive on the receiver until `end`.
    pub(crate) async fn logs(
        self: &std::sync::Arc<Self>,
        node: &str,
        req: LogsRequest,
    ) -> Option<(Pending, mpsc::Receiver<TunnelUp>)> {
        self.request(node, Some(req), None).await
    }

    /// Asks `node` to run a command in a replica; output arrives on the
    /// receiver until `end`.
    pub(crate) async fn exec(
        self: &std::sync::Arc<Self>,
        node: &str,
        req: ExecRequest,
    ) -> Option<(Pending, mpsc::Receiver<TunnelUp>)> {
        self.request(node, None, Some(req)).await
    }

    async fn request(
        self: &std::sync::Arc<Self>,
        node: &str,
        logs: Option<LogsRequest>,
        exec: Option<ExecRequest>,
    ) -> Option<(Pending, mpsc::Receiver<TunnelUp>)> {
        let down = self
            .nodes
            .lock()
            .ok()
            .and_then(|n| n.get(node).map(|(_, tx)| tx.clone()))?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(256);
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        let guard = Pending {
            tunnels: self.clone(),
            id,
            node: node.to_owned(),
        };
        down.send(TunnelDown {
            request_id: id,
            logs,
            cancel: false,
            exec,
        })
        .await
        .ok()?;
        Some((guard, rx))
    }
}
