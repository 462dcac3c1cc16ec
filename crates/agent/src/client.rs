//! Connections to the coordinators: enrollment (any coordinator, with the
//! cluster CA to trust and no client certificate yet) and the agent API
//! (mTLS with the node certificate, following the leader hint through
//! [`cloudless_client::Cluster`]).

use std::future::Future;
use std::time::Duration;

use cloudless_client::{
    server_only_tls, BackoffPolicy, CallError, ChannelOptions, Cluster, ClusterOptions, HostPort,
    RetryPolicy,
};
use cloudless_proto::v1 as pb;
use pb::agent_service_client::AgentServiceClient;
use pb::node_service_client::NodeServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};
use zeroize::Zeroizing;

use crate::{AgentError, NodeIdentity};

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// 2 s to connect, 5 s per call, keep-alive pings every 20 s.
fn channel_options() -> ChannelOptions {
    ChannelOptions {
        connect_timeout: Duration::from_secs(2),
        call_timeout: Some(CALL_TIMEOUT),
        keep_alive: Some(Duration::from_secs(20)),
    }
}

/// The agent's calls go on to the next coordinator after these answers (an
/// unreachable or overloaded coordinator, or one that is not the leader),
/// pausing 50 ms to 1 s when no leader is named.
fn cluster_options() -> ClusterOptions {
    ClusterOptions {
        channel: channel_options(),
        retry: RetryPolicy {
            max_attempts: None,
            backoff: BackoffPolicy {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(1),
            },
            retry_on: vec![
                Code::Unavailable,
                Code::Unknown,
                Code::Cancelled,
                Code::DeadlineExceeded,
            ],
        },
    }
}

/// A channel to `address` that trusts `ca_pem` and presents no certificate.
fn anonymous_channel(address: &str, ca_pem: &str) -> Result<Channel, AgentError> {
    let hp = HostPort::parse(address)
        .map_err(|e| AgentError::Config(format!("coordinator address {e}")))?;
    cloudless_client::channel(&hp, Some(server_only_tls(ca_pem, &hp)), &channel_options())
        .map_err(|e| AgentError::Config(format!("coordinator address {address:?}: {e}")))
}

/// Enrolls this device: makes a key pair here, sends a CSR with `token` to
/// the first coordinator that answers, and returns the identity (not yet saved).
pub async fn enroll(
    coordinators: &[String],
    ca_pem: &str,
    token: &str,
    name: &str,
) -> Result<NodeIdentity, AgentError> {
    let (csr_pem, key_pem) = cloudless_pki::new_anonymous_csr()
        .map_err(|e| AgentError::Identity(format!("cannot make a key pair: {e}")))?;
    let mut last = String::from("no coordinator addresses configured");
    for address in coordinators {
        let channel = anonymous_channel(address, ca_pem)?;
        let req = pb::EnrollRequest {
            join_token: token.to_owned(),
            csr_pem: csr_pem.clone(),
            name: name.to_owned(),
        };
        match NodeServiceClient::new(channel).enroll(req).await {
            Ok(r) => {
                let r = r.into_inner();
                return NodeIdentity::new(
                    r.certificate_pem,
                    Zeroizing::new(key_pem.to_string()),
                    r.ca_certificate_pem,
                );
            }
            Err(s) if s.code() == Code::Unavailable => {
                last = format!("{address}: {}", s.message());
            }
            Err(status) => {
                return Err(AgentError::Refused {
                    what: "enrollment",
                    status,
                })
            }
        }
    }
    Err(AgentError::Unreachable(last))
}

/// Rejoins after this node's certificate expired (or TLS refuses it): a
/// fresh key and CSR, with a proof signed by the old certificate's key, sent
/// with the old certificate over TLS that trusts the cluster CA and presents
/// no client certificate. Returns the new identity (not yet saved).
pub async fn rejoin(
    coordinators: &[String],
    old: &NodeIdentity,
) -> Result<NodeIdentity, AgentError> {
    let (csr_pem, key_pem) = cloudless_pki::new_anonymous_csr()
        .map_err(|e| AgentError::Identity(format!("cannot make a key pair: {e}")))?;
    let mut last = String::from("no coordinator addresses configured");
    for address in coordinators {
        let channel = anonymous_channel(address, &old.ca_pem)?;
        // Signed per attempt: the coordinator accepts a recent signing time only.
        let signed_at = crate::agent::now_s();
        let req = pb::RejoinRequest {
            cert_pem: old.cert_pem.clone(),
            csr_pem: csr_pem.clone(),
            signed_at_s: signed_at,
            proof: old.rejoin_proof(&csr_pem, signed_at)?,
        };
        match NodeServiceClient::new(channel).rejoin(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let renewed = NodeIdentity::new(
                    r.certificate_pem,
                    Zeroizing::new(key_pem.to_string()),
                    r.ca_certificate_pem,
                )?;
                if renewed.node_id != old.node_id {
                    return Err(AgentError::Identity(format!(
                        "rejoin returned a certificate for {}, not {}",
                        renewed.node_id, old.node_id
                    )));
                }
                return Ok(renewed);
            }
            Err(s) if is_removal(&s) => return Err(AgentError::Removed(s.message().to_owned())),
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unavailable
                        | Code::Unknown
                        | Code::Cancelled
                        | Code::DeadlineExceeded
                        | Code::ResourceExhausted
                        | Code::Internal
                ) =>
            {
                last = format!("{address}: {}", s.message());
            }
            Err(s) => {
                return Err(AgentError::RejoinRefused {
                    node_id: old.node_id.clone(),
                    reason: s.message().to_owned(),
                })
            }
        }
    }
    Err(AgentError::Unreachable(last))
}

/// An open heartbeat stream to the leader.
#[derive(Debug)]
struct BeatStream {
    tx: tokio::sync::mpsc::Sender<pb::HeartbeatRequest>,
    rx: tonic::Streaming<pb::HeartbeatResponse>,
}

/// The coordinators' answer when this node's record was removed.
pub(crate) fn is_removal(s: &Status) -> bool {
    cloudless_client::reason(s) == Some(cloudless_client::Reason::NodeRemoved)
}

/// The agent's view of the coordinators: the leader-following client
/// (addresses, last known leader, one mTLS channel per address) and the
/// heartbeat stream.
#[derive(Debug)]
pub struct Coordinators {
    cluster: Cluster,
    identity: NodeIdentity,
    beats: Option<BeatStream>,
}

impl Coordinators {
    /// Coordinators at `addresses`, called with `identity`.
    pub fn new(addresses: Vec<String>, identity: NodeIdentity) -> Self {
        Self {
            cluster: Cluster::new(addresses, Some(identity.client_tls()), cluster_options()),
            identity,
            beats: None,
        }
    }

    /// The identity in use.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// Switches to a renewed identity; new connections present it.
    pub fn set_identity(&mut self, identity: NodeIdentity) {
        self.cluster.set_tls(Some(identity.client_tls()));
        self.identity = identity;
        self.beats = None;
    }

    /// The (cached) mTLS channel to the coordinator at `address`.
    pub fn channel(&mut self, address: &str) -> Result<Channel, AgentError> {
        self.cluster.channel(address).map_err(|e| call_error("", e))
    }

    /// After `address` could not serve a call: follow the leader hint in `s`
    /// (one connection is enough, so the one to `address` is dropped), or
    /// move on to the next configured address.
    fn move_on(&mut self, address: &str, s: &Status) {
        self.cluster.failed(address, s);
    }

    /// Calls the leader: the last known one, else each address in turn,
    /// following leader hints.
    pub async fn call<T, F, Fut>(&mut self, what: &'static str, mut f: F) -> Result<T, AgentError>
    where
        F: FnMut(AgentServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_on(what, |ch| f(AgentServiceClient::new(ch)))
            .await
    }

    /// Like [`Coordinators::call`], for any service on the channel.
    pub async fn call_on<T, F, Fut>(&mut self, what: &'static str, f: F) -> Result<T, AgentError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.cluster.call(f).await.map_err(|e| call_error(what, e))
    }

    /// One heartbeat, on the long-lived heartbeat stream to the leader
    /// (opened, or reopened after a leader change, as needed).
    pub async fn heartbeat(
        &mut self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, AgentError> {
        let mut last = String::new();
        for _ in 0..3 {
            if self.beats.is_none() {
                let opened = self
                    .call("heartbeat", |mut c| async move {
                        let (tx, rx) = tokio::sync::mpsc::channel(4);
                        let resp = c
                            .heartbeat_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                            .await?;
                        Ok(resp.map(|rx| BeatStream { tx, rx }))
                    })
                    .await?;
                self.beats = Some(opened);
            }
            let Some(stream) = self.beats.as_mut() else {
                continue;
            };
            if stream.tx.send(req.clone()).await.is_err() {
                self.beats = None;
                continue;
            }
            match tokio::time::timeout(CALL_TIMEOUT, stream.rx.message()).await {
                Ok(Ok(Some(answer))) => return Ok(answer),
                Ok(Err(s)) if is_removal(&s) => {
                    self.beats = None;
                    return Err(AgentError::Removed(s.message().to_owned()));
                }
                Ok(Err(s)) => {
                    last = s.message().to_owned();
                    self.beats = None;
                    let address = self.cluster.preferred().unwrap_or_default();
                    self.move_on(&address, &s);
                }
                Ok(Ok(None)) | Err(_) => {
                    last = "the heartbeat stream ended".into();
                    self.beats = None;
                    let address = self.cluster.preferred().unwrap_or_default();
                    self.move_on(&address, &Status::unavailable(last.clone()));
                }
            }
        }
        Err(AgentError::Unreachable(last))
    }

    /// Renews the node certificate with a fresh key; returns the new identity
    /// (the caller saves it, then calls [`Coordinators::set_identity`]).
    pub async fn renew(&mut self) -> Result<NodeIdentity, AgentError> {
        let (csr_pem, key_pem) = cloudless_pki::new_anonymous_csr()
            .map_err(|e| AgentError::Identity(format!("cannot make a key pair: {e}")))?;
        let r = self
            .call("certificate renewal", |mut c| {
                let r = pb::RenewRequest {
                    csr_pem: csr_pem.clone(),
                };
                async move { c.renew(r).await }
            })
            .await?;
        let renewed = NodeIdentity::new(
            r.certificate_pem,
            Zeroizing::new(key_pem.to_string()),
            r.ca_certificate_pem,
        )?;
        if renewed.node_id != self.identity.node_id {
            return Err(AgentError::Identity(format!(
                "renewal returned a certificate for {}, not {}",
                renewed.node_id, self.identity.node_id
            )));
        }
        Ok(renewed)
    }
}

/// The agent's error for a call through the cluster client: removal,
/// refusal, no coordinator reachable, or bad configuration.
fn call_error(what: &'static str, e: CallError) -> AgentError {
    match e {
        CallError::Refused { status, .. } if is_removal(&status) => {
            AgentError::Removed(status.message().to_owned())
        }
        CallError::Refused { status, .. } => AgentError::Refused { what, status },
        CallError::Exhausted {
            address, status, ..
        } => AgentError::Unreachable(format!("{address}: {}", status.message())),
        CallError::NoServers => AgentError::Config("no coordinator addresses configured".into()),
        CallError::Address(e) => AgentError::Config(format!("coordinator address {e}")),
        CallError::Endpoint(e) => AgentError::Config(format!("coordinator connection: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_refusal_and_exhaustion_map_to_the_agent_errors() {
        let removed = call_error(
            "heartbeat",
            CallError::Refused {
                address: "a:1".into(),
                status: cloudless_client::errors::refusal(
                    Code::PermissionDenied,
                    "node n1 was removed",
                    cloudless_client::Reason::NodeRemoved,
                    [],
                ),
            },
        );
        assert!(matches!(removed, AgentError::Removed(_)), "{removed:?}");
        // The word alone, without the typed reason, is not a removal.
        let worded = call_error(
            "heartbeat",
            CallError::Refused {
                address: "a:1".into(),
                status: Status::permission_denied("node n1 was removed"),
            },
        );
        assert!(!matches!(worded, AgentError::Removed(_)), "{worded:?}");
        let refused = call_error(
            "heartbeat",
            CallError::Refused {
                address: "a:1".into(),
                status: Status::invalid_argument("bad"),
            },
        );
        assert!(
            matches!(
                refused,
                AgentError::Refused {
                    what: "heartbeat",
                    ..
                }
            ),
            "{refused:?}"
        );
        let gone = call_error(
            "heartbeat",
            CallError::Exhausted {
                address: "a:1".into(),
                attempts: 4,
                status: Status::unavailable("connection refused"),
            },
        );
        assert_eq!(
            gone.to_string(),
            "no coordinator reachable (a:1: connection refused)"
        );
        let bad = call_error(
            "heartbeat",
            CallError::Address(HostPort::parse("::1:7400").expect_err("bare v6")),
        );
        assert!(bad.to_string().contains("brackets"), "{bad}");
    }
}
