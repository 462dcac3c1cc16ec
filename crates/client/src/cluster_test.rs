//! Leader following and retries against small in-process gRPC servers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cloudless_proto::v1::raft_service_client::RaftServiceClient;
use cloudless_proto::v1::raft_service_server::{RaftService, RaftServiceServer};
use cloudless_proto::v1::RaftPayload;
use tonic::{Code, Request, Response, Status};

use super::*;
use crate::LEADER_HINT_KEY;

/// How a fake coordinator answers.
#[derive(Clone, Debug)]
enum Answer {
    /// Serves the call, answering with its name.
    Serve(&'static str),
    /// Unavailable, naming the leader.
    Hint(String),
    /// Unavailable, no leader known.
    NoLeader,
    /// A status that is not retried.
    Refuse,
}

#[derive(Clone, Debug)]
struct Fake {
    answer: Answer,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl RaftService for Fake {
    async fn append_entries(
        &self,
        _req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match &self.answer {
            Answer::Serve(name) => Ok(Response::new(RaftPayload {
                data: name.as_bytes().to_vec(),
                log_format: 0,
            })),
            Answer::Hint(leader) => {
                let mut s = Status::unavailable("not the leader");
                s.metadata_mut()
                    .insert(LEADER_HINT_KEY, leader.parse().expect("ascii"));
                Err(s)
            }
            Answer::NoLeader => Err(Status::unavailable("no leader yet")),
            Answer::Refuse => Err(Status::not_found("no such thing")),
        }
    }

    async fn vote(&self, _req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        Err(Status::unimplemented("vote"))
    }

    async fn install_snapshot(
        &self,
        _req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        Err(Status::unimplemented("install_snapshot"))
    }
}

/// A fake coordinator on a loopback port; returns its address and call count.
async fn serve(answer: Answer) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let calls = Arc::new(AtomicUsize::new(0));
    let fake = Fake {
        answer,
        calls: calls.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftServiceServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (address, calls)
}

/// An address nothing listens on.
fn closed_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn quick() -> ClusterOptions {
    ClusterOptions {
        channel: ChannelOptions {
            connect_timeout: Duration::from_secs(1),
            call_timeout: Some(Duration::from_secs(5)),
            keep_alive: None,
        },
        retry: RetryPolicy {
            backoff: BackoffPolicy {
                base: Duration::from_millis(2),
                cap: Duration::from_millis(10),
            },
            ..RetryPolicy::default()
        },
    }
}

async fn append(cluster: &Cluster) -> Result<String, CallError> {
    cluster
        .call(|ch| async move {
            RaftServiceClient::new(ch)
                .append_entries(RaftPayload::default())
                .await
        })
        .await
        .map(|p| String::from_utf8(p.data).expect("utf8"))
}

#[tokio::test]
async fn a_leader_hint_is_followed_and_the_leader_called_directly_afterwards() {
    let (leader, leader_calls) = serve(Answer::Serve("leader")).await;
    let (follower, follower_calls) = serve(Answer::Hint(leader.clone())).await;
    // The leader is not among the configured addresses: only the hint names it.
    let cluster = Cluster::new(vec![follower], None, quick());
    assert_eq!(append(&cluster).await.expect("served"), "leader");
    assert_eq!(cluster.preferred(), Some(leader));
    assert_eq!(append(&cluster).await.expect("served"), "leader");
    assert_eq!(follower_calls.load(Ordering::SeqCst), 1);
    assert_eq!(leader_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_unreachable_coordinator_is_skipped() {
    let (leader, leader_calls) = serve(Answer::Serve("leader")).await;
    let cluster = Cluster::new(vec![closed_address(), leader], None, quick());
    assert_eq!(append(&cluster).await.expect("served"), "leader");
    assert_eq!(leader_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unavailable_everywhere_is_retried_up_to_the_bound() {
    let (a, a_calls) = serve(Answer::NoLeader).await;
    let (b, b_calls) = serve(Answer::NoLeader).await;
    let cluster = Cluster::new(vec![a, b.clone()], None, quick());
    let e = append(&cluster).await.expect_err("no leader");
    let CallError::Exhausted {
        address,
        attempts,
        status,
    } = &e
    else {
        panic!("{e:?}");
    };
    // Two addresses: 2 * 2 + 2 attempts, alternating.
    assert_eq!(*attempts, 6);
    assert_eq!(address, &b);
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(a_calls.load(Ordering::SeqCst), 3);
    assert_eq!(b_calls.load(Ordering::SeqCst), 3);

    let bounded = Cluster::new(
        vec![closed_address()],
        None,
        ClusterOptions {
            retry: RetryPolicy {
                max_attempts: Some(2),
                ..quick().retry
            },
            ..quick()
        },
    );
    let e = append(&bounded).await.expect_err("nothing listens");
    assert!(
        matches!(e, CallError::Exhausted { attempts: 2, .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn other_answers_are_returned_at_once() {
    let (refuser, calls) = serve(Answer::Refuse).await;
    let (leader, leader_calls) = serve(Answer::Serve("leader")).await;
    let cluster = Cluster::new(vec![refuser.clone(), leader], None, quick());
    let e = append(&cluster).await.expect_err("refused");
    let CallError::Refused { address, status } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(address, &refuser);
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(leader_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_malformed_hint_or_address_is_reported() {
    let (follower, _) = serve(Answer::Hint("::1:7400".into())).await;
    let cluster = Cluster::new(vec![follower], None, quick());
    let e = append(&cluster).await.expect_err("bad hint");
    assert!(
        matches!(e, CallError::Address(HostPortError::BareIpv6 { .. })),
        "{e:?}"
    );
    let none = Cluster::new(Vec::new(), None, quick());
    assert!(matches!(
        append(&none).await.expect_err("no servers"),
        CallError::NoServers
    ));
}
