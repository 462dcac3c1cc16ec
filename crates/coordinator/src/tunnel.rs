//! Requests from coordinators to agents over the agents' own `Tunnel`
//! streams (agents dial out to every coordinator; nothing dials a device).
//!
//! A request's id is random and remembered with the node it went to: an
//! answer counts only when it arrives on that node's tunnel, so one node
//! cannot feed output into another node's exec or logs session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use cloudless_proto::v1::{ExecRequest, LogsRequest, TunnelDown, TunnelUp};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One node's open tunnel.
#[derive(Debug)]
struct Open {
    generation: u64,
    /// Sender of requests to the agent.
    tx: mpsc::Sender<TunnelDown>,
    /// Cancelled when the tunnel is cut (its node was removed).
    cut: CancellationToken,
}

/// A request waiting for answers.
#[derive(Debug)]
struct Waiting {
    /// The node the request went to: the only one whose answers count.
    node: String,
    tx: mpsc::Sender<TunnelUp>,
}

/// Open tunnels on this coordinator and the requests waiting for answers.
#[derive(Debug, Default)]
pub(crate) struct Tunnels {
    /// Node id -> its tunnel.
    nodes: Mutex<HashMap<String, Open>>,
    /// Request id (random) -> who answers and where the answers go.
    pending: Mutex<HashMap<u64, Waiting>>,
    /// Tunnel generations.
    next: AtomicU64,
}

/// What became of an agent's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Handed to the waiting request.
    Accepted,
    /// No request waits under that id (done, cancelled or never sent).
    Unknown,
    /// The request went to another node: a forged answer, dropped.
    WrongNode,
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
            .and_then(|n| n.get(&self.node).map(|o| o.tx.clone()));
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

/// How long a request's reader may fall behind before its answer is cut.
const SLOW_CALLER: std::time::Duration = std::time::Duration::from_secs(10);

impl Tunnels {
    /// Records `node`'s tunnel (replacing an older one); returns its
    /// generation and a token cancelled when the tunnel is cut.
    pub(crate) fn open(
        &self,
        node: &str,
        tx: mpsc::Sender<TunnelDown>,
    ) -> (u64, CancellationToken) {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let cut = CancellationToken::new();
        if let Ok(mut n) = self.nodes.lock() {
            let open = Open {
                generation,
                tx,
                cut: cut.clone(),
            };
            n.insert(node.to_owned(), open);
        }
        (generation, cut)
    }

    /// Forgets `node`'s tunnel if it is still generation `generation`.
    pub(crate) fn close(&self, node: &str, generation: u64) {
        if let Ok(mut n) = self.nodes.lock() {
            if n.get(node).is_some_and(|o| o.generation == generation) {
                n.remove(node);
            }
        }
    }

    /// Cuts `node`'s tunnel and ends the requests waiting on it (its node
    /// was removed). Returns whether it had a tunnel.
    pub(crate) fn cut(&self, node: &str) -> bool {
        let open = self.nodes.lock().ok().and_then(|mut n| n.remove(node));
        if let Ok(mut p) = self.pending.lock() {
            p.retain(|_, w| w.node != node);
        }
        open.inspect(|o| o.cut.cancel()).is_some()
    }

    /// Nodes with an open tunnel.
    pub(crate) fn nodes(&self) -> Vec<String> {
        self.nodes
            .lock()
            .map(|n| n.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Hands an answer that arrived on `from`'s tunnel to the request
    /// waiting for it, if that request went to `from`.
    ///
    /// A caller that reads slowly slows the node's tunnel down (the agent
    /// sends within its flow-control window), so output is never dropped
    /// while it keeps up within [`SLOW_CALLER`]; one that stops reading
    /// loses the rest of its answer, not the tunnel.
    pub(crate) async fn deliver(&self, from: &str, up: TunnelUp) -> Delivery {
        let tx = match self.pending.lock().ok().and_then(|p| {
            p.get(&up.request_id)
                .map(|w| (w.node == from).then(|| w.tx.clone()))
        }) {
            None => return Delivery::Unknown,
            Some(None) => {
                tracing::debug!(node_id = %from, "dropped a tunnel answer to a request sent to another node");
                return Delivery::WrongNode;
            }
            Some(Some(tx)) => tx,
        };
        let end = up.end;
        let id = up.request_id;
        let sent = matches!(
            tokio::time::timeout(SLOW_CALLER, tx.send(up)).await,
            Ok(Ok(()))
        );
        if !sent || end {
            if let Ok(mut p) = self.pending.lock() {
                p.remove(&id);
            }
        }
        Delivery::Accepted
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
            .and_then(|n| n.get(node).map(|o| o.tx.clone()))?;
        let (tx, rx) = mpsc::channel(256);
        let id = {
            let mut p = self.pending.lock().ok()?;
            // Random, so another node cannot guess a live id; unique here.
            let mut id = rand::random::<u64>();
            while p.contains_key(&id) {
                id = rand::random::<u64>();
            }
            p.insert(
                id,
                Waiting {
                    node: node.to_owned(),
                    tx,
                },
            );
            id
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use cloudless_proto::v1::ExecOutput;

    fn answer(request_id: u64, stdout: &str) -> TunnelUp {
        TunnelUp {
            request_id,
            exec_output: Some(ExecOutput {
                stdout: stdout.as_bytes().to_vec(),
                exit_code: Some(0),
                ..Default::default()
            }),
            end: true,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_answer_from_another_nodes_tunnel_is_dropped() {
        let tunnels = std::sync::Arc::new(Tunnels::default());
        let (to_b, mut at_b) = mpsc::channel(4);
        let (to_evil, _at_evil) = mpsc::channel(4);
        tunnels.open("b", to_b);
        tunnels.open("evil", to_evil);
        let (_guard, mut answers) = tunnels
            .exec("b", ExecRequest::default())
            .await
            .expect("b has a tunnel");
        let sent = at_b.recv().await.expect("the request reached b");

        // Another node sends an answer under the id b was given: dropped.
        assert_eq!(
            tunnels
                .deliver("evil", answer(sent.request_id, "forged"))
                .await,
            Delivery::WrongNode
        );
        assert!(answers.try_recv().is_err(), "a forged answer got through");
        // b's own answer arrives, and ends the request.
        assert_eq!(
            tunnels.deliver("b", answer(sent.request_id, "real")).await,
            Delivery::Accepted
        );
        let got = answers.recv().await.expect("b's answer");
        assert_eq!(got.exec_output.expect("output").stdout, b"real");
        assert_eq!(
            tunnels.deliver("b", answer(sent.request_id, "late")).await,
            Delivery::Unknown
        );
    }

    #[tokio::test]
    async fn request_ids_are_unpredictable_and_cutting_a_node_ends_its_requests() {
        let tunnels = std::sync::Arc::new(Tunnels::default());
        let (to_b, mut at_b) = mpsc::channel(8);
        let (_gen, cut) = tunnels.open("b", to_b);
        let (_g1, _) = tunnels
            .logs("b", LogsRequest::default())
            .await
            .expect("logs");
        let (_g2, mut answers) = tunnels
            .exec("b", ExecRequest::default())
            .await
            .expect("exec");
        let first = at_b.recv().await.expect("first").request_id;
        let second = at_b.recv().await.expect("second").request_id;
        assert!(
            second.abs_diff(first) > 1_000,
            "consecutive ids {first} and {second} are guessable"
        );

        assert!(tunnels.cut("b"));
        assert!(cut.is_cancelled(), "the tunnel's stream is not told to end");
        assert!(tunnels.nodes().is_empty());
        assert_eq!(
            tunnels.deliver("b", answer(second, "x")).await,
            Delivery::Unknown
        );
        assert!(
            answers.recv().await.is_none(),
            "the waiting exec did not end"
        );
        assert!(tunnels.exec("b", ExecRequest::default()).await.is_none());
    }
}
