//! OpenTelemetry traces over OTLP, from the real binaries, to a collector
//! in this test (an OTLP/gRPC trace service every process of both tests
//! exports to).
//!
//! - A write sent to a follower is forwarded to the leader; both
//!   coordinators' spans of that call arrive, with the service name, in one
//!   trace, the leader's span a child of the follower's.
//! - A replica's start and stop on an agent (containerd, a registry) join
//!   the trace of the leader's span that placed it: the agent's Assignment
//!   span is a child of the leader's Place span, its steps (pull, start)
//!   children of the Assignment, and its Stop in the same trace.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_test::{channel, start_process_cluster, wait_all_healthy, workload};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use pb::workload_service_client::WorkloadServiceClient;

/// One received span: service name, span name, trace id, span id, parent,
/// string attributes.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: Vec<u8>,
    span: Vec<u8>,
    parent: Vec<u8>,
    attributes: BTreeMap<String, String>,
}

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Got>>>);

impl Collector {
    fn spans(&self) -> Vec<Got> {
        self.0.lock().expect("spans").clone()
    }
}

fn text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().expect("spans");
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        name: s.name,
                        trace: s.trace_id,
                        span: s.span_id,
                        parent: s.parent_span_id,
                        attributes: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The collector every process of this test binary exports to (the
/// processes inherit the endpoint from this process's environment, the
/// same for both tests), on a runtime of its own.
fn collector() -> &'static Collector {
    static COLLECTOR: OnceLock<Collector> = OnceLock::new();
    COLLECTOR.get_or_init(|| {
        let collector = Collector::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let otlp = listener.local_addr().expect("addr");
        let server = collector.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(server))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                    .await
            })
        });
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"));
        std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
        collector
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_is_one_trace_across_coordinators() {
    let collector = collector();
    let dir = tempfile::tempdir().expect("tempdir");
    let (nodes, _) = start_process_cluster(dir.path(), true)
        .await
        .expect("cluster");
    let leader = wait_all_healthy(&nodes).await.expect("healthy");
    let follower = (leader + 1) % nodes.len();
    WorkloadServiceClient::new(channel(&nodes[follower].grpc))
        .apply(pb::ApplyWorkloadRequest {
            write: None,
            workload: Some(workload("traced", 1)),
        })
        .await
        .expect("apply through a follower");

    let name = "cloudless.v1.WorkloadService/Apply";
    let deadline = Instant::now() + Duration::from_secs(20);
    let (outer, inner) = loop {
        let spans: Vec<Got> = collector
            .spans()
            .into_iter()
            .filter(|g| g.name == name)
            .collect();
        // By trace: the follower's span (no parent) and the leader's (its child).
        let mut by_trace: HashMap<Vec<u8>, Vec<Got>> = HashMap::new();
        for s in spans {
            by_trace.entry(s.trace.clone()).or_default().push(s);
        }
        let pair = by_trace.values().find_map(|v| {
            let outer = v.iter().find(|s| s.parent.is_empty())?;
            let inner = v.iter().find(|s| s.parent == outer.span)?;
            Some((outer.clone(), inner.clone()))
        });
        if let Some(p) = pair {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no forwarded trace of {name}; spans: {:#?}",
            collector.spans()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(outer.service.contains("cloudless-coordinator"), "{outer:?}");
    assert!(inner.service.contains("cloudless-coordinator"), "{inner:?}");
    assert_eq!(outer.trace, inner.trace);
    assert_ne!(outer.span, inner.span);
    // Raft's own RPCs are not traced.
    assert!(!collector
        .spans()
        .iter()
        .any(|g| g.name.contains("RaftService")));
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_start_and_stop_on_its_agent_join_the_trace_that_placed_it() {
    if let Some(why) = cloudless_test::e2e::missing() {
        cloudless_test::skip_test(format!("agent traces end to end: {why}"));
        return;
    }
    let collector = collector();
    let c = cloudless_test::e2e::Cluster::start().await;
    let manifest = c.manifest("traced-run", "1", 2, "hi");
    c.ctl_ok(&["apply", "-f", &manifest.display().to_string()]);
    let replicas = c
        .wait_ready("traced-run", 2, Duration::from_secs(60), |_| true)
        .await;
    let ids: Vec<String> = replicas.iter().map(|r| r.id.clone()).collect();
    c.ctl_ok(&["delete", "workload", "traced-run"]);

    // The leader's placement, and for each replica the agent's start under
    // it and its stop in the same trace.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (place, starts, stops) = loop {
        let spans = collector.spans();
        let place: Vec<&Got> = spans
            .iter()
            .filter(|g| {
                g.name == "cloudless.reconciler/Place"
                    && g.attributes.get("workload").map(String::as_str)
                        == Some("default/traced-run")
            })
            .collect();
        let of = |name: &str, id: &str| -> Option<Got> {
            spans
                .iter()
                .find(|g| {
                    g.name == name && g.attributes.get("replica").map(String::as_str) == Some(id)
                })
                .cloned()
        };
        let starts: Vec<Option<Got>> = ids
            .iter()
            .map(|id| of("cloudless.agent/Assignment", id))
            .collect();
        let stops: Vec<Option<Got>> = ids
            .iter()
            .map(|id| of("cloudless.agent/Stop", id))
            .collect();
        if place.len() == 1 && starts.iter().chain(&stops).all(Option::is_some) {
            break (
                place[0].clone(),
                starts.into_iter().flatten().collect::<Vec<_>>(),
                stops.into_iter().flatten().collect::<Vec<_>>(),
            );
        }
        assert!(
            Instant::now() < deadline,
            "no placement trace with both replicas' start and stop ({ids:?}); spans: {:#?}\n{}",
            spans
                .iter()
                .map(|g| format!("{} {} {:?}", g.service, g.name, g.attributes))
                .collect::<Vec<_>>(),
            c.agent_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(place.service, "cloudless-coordinator", "{place:?}");
    assert_eq!(
        place.attributes.get("replicas").map(String::as_str),
        Some("2")
    );
    let spans = collector.spans();
    let mut pulled = 0;
    for (start, stop) in starts.iter().zip(&stops) {
        assert_eq!(start.service, "cloudless-agent", "{start:?}");
        assert_eq!(
            start.trace, place.trace,
            "the start joins the placement's trace"
        );
        assert_eq!(
            start.parent, place.span,
            "the start is the placement's child"
        );
        assert_eq!(stop.service, "cloudless-agent", "{stop:?}");
        assert_eq!(
            stop.trace, place.trace,
            "the stop joins the placement's trace"
        );
        let steps: Vec<&str> = spans
            .iter()
            .filter(|g| g.trace == place.trace && g.parent == start.span)
            .map(|g| g.name.as_str())
            .collect();
        assert!(
            steps.contains(&"cloudless.agent/Start"),
            "{} steps: {steps:?}",
            start.attributes["replica"]
        );
        pulled += usize::from(steps.contains(&"cloudless.agent/Pull"));
    }
    // Each agent pulled the image once (both replicas may share a node).
    assert!(pulled >= 1, "no pull traced");
}
