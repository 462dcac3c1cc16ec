//! Connections to the coordinators: enrollment (any coordinator, with the
//! cluster CA to trust and no client certificate yet) and the agent API
//! (mTLS with the node certificate, following the leader hint).

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use cloudless_proto::v1 as pb;
use pb::agent_service_client::AgentServiceClient;
use pb::node_service_client::NodeServiceClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use zeroize::Zeroizing;

use crate::{AgentError, NodeIdentity};

/// Metadata key of the leader's address on `Unavailable` answers.
const LEADER_HINT_KEY: &str = "x-cloudless-leader";
/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn host_of(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    address.rsplit_once(':').map_or(address, |(h, _)| h)
}

fn endpoint(address: &str, tls: ClientTlsConfig) -> Result<Endpoint, AgentError> {
    Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| AgentError::Config(format!("coordinator address {address:?}: {e}")))?
        .tls_config(tls)
        .map_err(|e| AgentError::Config(format!("TLS for {address}: {e}")))
        .map(|ep| {
            ep.connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
        })
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
        let tls = ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
            .domain_name(host_of(address));
        let channel = endpoint(address, tls)?.connect_lazy();
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
        let tls = ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&old.ca_pem))
            .domain_name(host_of(address));
        let channel = endpoint(address, tls)?.connect_lazy();
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
    s.code() == Code::PermissionDenied && s.message().contains("removed")
}

/// The agent's view of the coordinators: addresses, the last known leader,
/// one mTLS channel per address, and the heartbeat stream.
#[derive(Debug)]
pub struct Coordinators {
    addresses: Vec<String>,
    identity: NodeIdentity,
    preferred: Option<String>,
    next: usize,
    channels: HashMap<String, Channel>,
    beats: Option<BeatStream>,
}

impl Coordinators {
    /// Coordinators at `addresses`, called with `identity`.
    pub fn new(addresses: Vec<String>, identity: NodeIdentity) -> Self {
        Self {
            addresses,
            identity,
            preferred: None,
            next: 0,
            channels: HashMap::new(),
            beats: None,
        }
    }

    /// The identity in use.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// Switches to a renewed identity; new connections present it.
    pub fn set_identity(&mut self, identity: NodeIdentity) {
        self.identity = identity;
        self.channels.clear();
        self.beats = None;
    }

    /// The (cached) mTLS channel to the coordinator at `address`.
    pub fn channel(&mut self, address: &str) -> Result<Channel, AgentError> {
        if let Some(c) = self.channels.get(address) {
            return Ok(c.clone());
        }
        let ch = endpoint(address, self.identity.client_tls(host_of(address)))?.connect_lazy();
        self.channels.insert(address.to_owned(), ch.clone());
        Ok(ch)
    }

    /// After `address` could not serve a call: follow the leader hint in `s`
    /// (one connection is enough, so the one to `address` is dropped), or
    /// move on to the next configured address.
    fn move_on(&mut self, address: &str, s: &Status) {
        self.channels.remove(address);
        let hint = s
            .metadata()
            .get(LEADER_HINT_KEY)
            .and_then(|v| v.to_str().ok())
            .filter(|h| *h != address)
            .map(str::to_owned);
        if hint.is_none() {
            self.next = self.next.wrapping_add(1);
        }
        self.preferred = hint;
    }

    /// Calls the leader: the last known one, else each address in turn,
    /// following `x-cloudless-leader` hints.
    pub async fn call<T, F, Fut>(&mut self, what: &'static str, mut f: F) -> Result<T, AgentError>
    where
        F: FnMut(AgentServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_on(what, |ch| f(AgentServiceClient::new(ch)))
            .await
    }

    /// Like [`Coordinators::call`], for any service on the channel.
    pub async fn call_on<T, F, Fut>(
        &mut self,
        what: &'static str,
        mut f: F,
    ) -> Result<T, AgentError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let attempts = self.addresses.len() * 2 + 2;
        let mut last = String::new();
        for _ in 0..attempts {
            let address = match &self.preferred {
                Some(a) => a.clone(),
                None => {
                    let Some(a) = self.addresses.get(self.next % self.addresses.len().max(1))
                    else {
                        return Err(AgentError::Config(
                            "no coordinator addresses configured".into(),
                        ));
                    };
                    a.clone()
                }
            };
            let channel = self.channel(&address)?;
            match f(channel).await {
                Ok(r) => {
                    self.preferred = Some(address);
                    return Ok(r.into_inner());
                }
                Err(s) if is_removal(&s) => {
                    return Err(AgentError::Removed(s.message().to_owned()));
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable
                            | Code::Unknown
                            | Code::Cancelled
                            | Code::DeadlineExceeded
                    ) =>
                {
                    last = format!("{address}: {}", s.message());
                    self.move_on(&address, &s);
                    if self.preferred.is_none() {
                        // Unreachable, or no leader yet: pause before the next one.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Err(status) => return Err(AgentError::Refused { what, status }),
            }
        }
        Err(AgentError::Unreachable(last))
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
                    let address = self.preferred.clone().unwrap_or_default();
                    self.move_on(&address, &s);
                }
                Ok(Ok(None)) | Err(_) => {
                    last = "the heartbeat stream ended".into();
                    self.beats = None;
                    let address = self.preferred.clone().unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_strips_ports_and_brackets() {
        assert_eq!(host_of("127.0.0.1:7400"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7400"), "::1");
        assert_eq!(host_of("coord-1.example:7400"), "coord-1.example");
    }
}
