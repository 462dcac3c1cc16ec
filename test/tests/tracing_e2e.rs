//! OpenTelemetry traces over OTLP: three coordinator processes export spans
//! to a collector in this test (an OTLP/gRPC trace service). A write sent to
//! a follower is forwarded to the leader; both coordinators' spans of that
//! call arrive, with the service name, in one trace, the leader's span a
//! child of the follower's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudless_proto::v1 as pb;
use cloudless_test::{channel, start_process_cluster, wait_all_healthy, workload};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use pb::workload_service_client::WorkloadServiceClient;

/// One received span: service name, span name, trace id, span id, parent.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: Vec<u8>,
    span: Vec<u8>,
    parent: Vec<u8>,
}

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Got>>>);

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
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        name: s.name,
                        trace: s.trace_id,
                        span: s.span_id,
                        parent: s.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_is_one_trace_across_coordinators() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let otlp = listener.local_addr().expect("addr");
    let server = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    // The coordinator processes inherit these (this test binary runs alone).
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"));
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");

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
            .0
            .lock()
            .expect("spans")
            .iter()
            .filter(|g| g.name == name)
            .cloned()
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
            collector.0.lock().expect("spans")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(outer.service.contains("cloudless-coordinator"), "{outer:?}");
    assert!(inner.service.contains("cloudless-coordinator"), "{inner:?}");
    assert_eq!(outer.trace, inner.trace);
    assert_ne!(outer.span, inner.span);
    // Raft's own RPCs are not traced.
    assert!(!collector
        .0
        .lock()
        .expect("spans")
        .iter()
        .any(|g| g.name.contains("RaftService")));
    drop(nodes);
}
