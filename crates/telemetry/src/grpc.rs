//! gRPC server metrics: requests by service, method and status code, and the
//! time to the response's headers (for a unary call, its handling time; for
//! a stream, the time to open it), as a tower layer on the tonic server.
//!
//! The status is read where gRPC puts it: in the headers of a trailers-only
//! response (most errors), else in the trailers at the end of the body. A
//! body dropped before its trailers (the client went away) counts as
//! `Cancelled`. Method names come from the request path, which a client
//! chooses: a call the server does not implement (or a path that is not
//! `/<package>.<Service>/<Method>`) is counted under `unknown`, and at most
//! [`MAX_METHODS`] service and method pairs are ever labelled (the rest
//! count as `other`), so callers cannot grow the label set. A call dropped
//! before its response (its deadline passed, the client reset it) counts as
//! `DeadlineExceeded` or `Cancelled` with the time it had taken.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Most distinct (service, method) labels; the API has about 60 methods.
pub const MAX_METHODS: usize = 256;

/// Labels of `cloudless_grpc_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    method: String,
    code: String,
}

/// Labels of `cloudless_grpc_request_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: String,
    method: String,
}

type Histograms = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn new_histogram() -> Histogram {
    // 0.5 ms to about 8 s.
    Histogram::new(exponential_buckets(0.000_5, 2.0, 15))
}

/// The gRPC server metrics; [`GrpcMetrics::layer`] for the server.
#[derive(Clone, Debug)]
pub struct GrpcMetrics {
    requests: Family<CallLabels, Counter>,
    seconds: Histograms,
    /// The (service, method) pairs labelled so far.
    seen: Arc<std::sync::Mutex<std::collections::HashSet<(String, String)>>>,
}

impl GrpcMetrics {
    /// Registers `cloudless_grpc_requests_total{service,method,code}` and
    /// `cloudless_grpc_request_seconds{service,method}` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            seconds: Family::new_with_constructor(new_histogram as fn() -> Histogram),
            seen: Arc::default(),
        };
        let r = registry.sub_registry_with_prefix("cloudless_grpc");
        r.register(
            "requests",
            "gRPC calls served, by service, method and status code",
            m.requests.clone(),
        );
        r.register_with_unit(
            "request",
            "Time from a call's arrival to its response headers",
            Unit::Seconds,
            m.seconds.clone(),
        );
        m
    }

    /// The layer that counts every call of the server it wraps.
    pub fn layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer(Arc::new(self.clone()))
    }

    /// The labels to record for `call` ending with `code` (if known).
    fn labels(&self, call: &Call, code: Option<tonic::Code>) -> (String, String) {
        if code == Some(tonic::Code::Unimplemented) || !call.well_formed() {
            return ("unknown".to_owned(), "unknown".to_owned());
        }
        let key = (call.service.clone(), call.method.clone());
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(&key) || seen.len() < MAX_METHODS && seen.insert(key.clone()) {
            key
        } else {
            ("other".to_owned(), "other".to_owned())
        }
    }

    fn observe(&self, call: &Call, early: Option<tonic::Code>, seconds: f64) {
        let (service, method) = self.labels(call, early);
        self.seconds
            .get_or_create(&MethodLabels { service, method })
            .observe(seconds);
    }

    fn finish(&self, call: &Call, code: tonic::Code) {
        let (service, method) = self.labels(call, Some(code));
        self.requests
            .get_or_create(&CallLabels {
                service,
                method,
                code: format!("{code:?}"),
            })
            .inc();
    }
}

/// A call's service (its short name: `cloudless.v1.NodeService` is
/// `NodeService`) and method, from the path `/<package>.<Service>/<Method>`.
#[derive(Debug, Clone)]
struct Call {
    service: String,
    method: String,
}

impl Call {
    fn from_path(path: &str) -> Self {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let service = parts.next().unwrap_or_default();
        let service = service.rsplit('.').next().unwrap_or(service);
        let method = parts.next().unwrap_or_default();
        // Paths are bounded by the HTTP/2 header limits; the label of a
        // call nobody implements is replaced before it is recorded.
        Self {
            service: service.to_owned(),
            method: method.to_owned(),
        }
    }
}

impl Call {
    /// `/<package>.<Service>/<Method>`: names of letters, digits and `_`.
    fn well_formed(&self) -> bool {
        let name = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        name(&self.service) && name(&self.method)
    }
}

/// Records a call whose future was dropped before its response: the
/// deadline passed (tonic's timeout wraps this layer) or the client went.
struct Unanswered {
    pending: Option<(Arc<GrpcMetrics>, Call, Instant, Option<std::time::Duration>)>,
}

impl Unanswered {
    /// The call was answered: nothing to record on drop.
    fn answered(&mut self) {
        self.pending = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some((m, call, started, timeout)) = self.pending.take() {
            let took = started.elapsed();
            let code = if timeout.is_some_and(|t| took >= t) {
                tonic::Code::DeadlineExceeded
            } else {
                tonic::Code::Cancelled
            };
            m.observe(&call, Some(code), took.as_secs_f64());
            m.finish(&call, code);
        }
    }
}

/// The `grpc-timeout` header's duration (`<digits><unit>`).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    })
}

/// See [`GrpcMetrics::layer`].
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer(Arc<GrpcMetrics>);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] makes.
#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let call = Call::from_path(req.uri().path());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let timeout = grpc_timeout(req.headers());
        let response = self.inner.call(req);
        let mut unanswered = Unanswered {
            pending: Some((metrics.clone(), call.clone(), started, timeout)),
        };
        Box::pin(async move {
            let result = response.await;
            unanswered.answered();
            let elapsed = started.elapsed().as_secs_f64();
            let response = match result {
                Ok(r) => r,
                Err(e) => {
                    metrics.observe(&call, None, elapsed);
                    metrics.finish(&call, tonic::Code::Internal);
                    return Err(e);
                }
            };
            // A trailers-only response carries its status in the headers
            // (so does the router's answer to a path nobody serves).
            let early = response
                .headers()
                .get("grpc-status")
                .map(|v| tonic::Code::from_bytes(v.as_bytes()));
            metrics.observe(&call, early, elapsed);
            let mut pending = Some((metrics, call));
            if let Some(code) = early {
                if let Some((m, c)) = pending.take() {
                    m.finish(&c, code);
                }
            }
            Ok(response.map(|body| MeteredBody {
                inner: body,
                pending,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call's status when its trailers
    /// pass (or, dropped first, records `Cancelled`).
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        pending: Option<(Arc<GrpcMetrics>, Call)>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some((m, c)) = this.project().pending.take() {
                m.finish(&c, tonic::Code::Cancelled);
            }
        }
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(trailers) = f.trailers_ref() {
                    let code = trailers
                        .get("grpc-status")
                        .map_or(tonic::Code::Unknown, |v| {
                            tonic::Code::from_bytes(v.as_bytes())
                        });
                    if let Some((m, c)) = this.pending.take() {
                        m.finish(&c, code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some((m, c)) = this.pending.take() {
                    m.finish(&c, tonic::Code::Internal);
                }
            }
            // The end without trailers: not a complete gRPC response.
            Poll::Ready(None) => {
                if let Some((m, c)) = this.pending.take() {
                    m.finish(&c, tonic::Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer as _, Service as _};

    /// A body of one data frame, then `trailers` (if any).
    struct TestBody {
        frames: Vec<Frame<bytes::Bytes>>,
    }

    impl Body for TestBody {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(if self.frames.is_empty() {
                None
            } else {
                Some(Ok(self.frames.remove(0)))
            })
        }
    }

    /// Answers every call as `answer` says: `Some(code)` in the headers
    /// (trailers-only), `None` with data and `grpc-status: 0` trailers; a
    /// path ending in `/Hang` never answers.
    #[derive(Clone)]
    struct Inner {
        answer: Option<u8>,
    }

    impl tower::Service<http::Request<()>> for Inner {
        type Response = http::Response<TestBody>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let answer = self.answer;
            let hang = req.uri().path().ends_with("/Hang");
            Box::pin(async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                let mut r = http::Response::builder();
                let frames = match answer {
                    Some(code) => {
                        r = r.header("grpc-status", code.to_string());
                        vec![]
                    }
                    None => {
                        let mut t = http::HeaderMap::new();
                        t.insert("grpc-status", http::HeaderValue::from_static("0"));
                        vec![
                            Frame::data(bytes::Bytes::from_static(b"x")),
                            Frame::trailers(t),
                        ]
                    }
                };
                Ok(r.body(TestBody { frames }).expect("response"))
            })
        }
    }

    fn registry() -> (Registry, GrpcMetrics) {
        let mut r = Registry::default();
        let m = GrpcMetrics::register(&mut r);
        (r, m)
    }

    fn count(r: &Registry, labels: &str) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, r).expect("encoded");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("cloudless_grpc_requests_total{{{labels}}} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    async fn call(m: &GrpcMetrics, answer: Option<u8>, path: &str) {
        let mut svc = m.layer().layer(Inner { answer });
        let req = http::Request::builder()
            .uri(path)
            .body(())
            .expect("request");
        let resp = svc.call(req).await.expect("response");
        let mut body = std::pin::pin!(resp.into_body());
        while std::future::poll_fn(|cx| body.as_mut().poll_frame(cx))
            .await
            .is_some()
        {}
    }

    #[tokio::test]
    async fn status_is_read_from_trailers_or_trailers_only_headers() {
        let (r, m) = registry();
        call(&m, None, "/cloudless.v1.NodeService/Enroll").await;
        call(&m, Some(5), "/cloudless.v1.NodeService/Get").await;
        assert_eq!(
            count(&r, "service=\"NodeService\",method=\"Enroll\",code=\"Ok\""),
            1
        );
        assert_eq!(
            count(
                &r,
                "service=\"NodeService\",method=\"Get\",code=\"NotFound\""
            ),
            1
        );
    }

    #[tokio::test]
    async fn callers_cannot_grow_the_labels() {
        let (r, m) = registry();
        // Unimplemented, a path of more segments, names that are no names.
        call(&m, Some(12), "/cloudless.v1.NodeService/Nope").await;
        call(&m, Some(14), "/cloudless.v1.AgentService/random/Heartbeat").await;
        call(&m, Some(14), "/cloudless.v1.AgentService/%00%ff").await;
        let unknown = "service=\"unknown\",method=\"unknown\"";
        assert_eq!(count(&r, &format!("{unknown},code=\"Unimplemented\"")), 1);
        assert_eq!(count(&r, &format!("{unknown},code=\"Unavailable\"")), 2);
        // Well-formed names beyond the cap are `other`.
        for i in 0..MAX_METHODS + 10 {
            call(&m, Some(14), &format!("/p.S/M{i}")).await;
        }
        assert_eq!(
            count(
                &r,
                "service=\"other\",method=\"other\",code=\"Unavailable\""
            ),
            10,
            "the calls beyond the cap"
        );
    }

    #[tokio::test]
    async fn a_call_dropped_before_its_answer_counts_as_cancelled_or_past_its_deadline() {
        let (r, m) = registry();
        let mut svc = m.layer().layer(Inner { answer: None });
        let req = http::Request::builder()
            .uri("/cloudless.v1.RaftService/Hang")
            .body(())
            .expect("request");
        drop(svc.call(req));
        let req = http::Request::builder()
            .uri("/cloudless.v1.RaftService/Hang")
            .header("grpc-timeout", "1m")
            .body(())
            .expect("request");
        let pending = svc.call(req);
        let _ = tokio::time::timeout(std::time::Duration::from_millis(20), pending).await;
        let hang = "service=\"RaftService\",method=\"Hang\"";
        assert_eq!(count(&r, &format!("{hang},code=\"Cancelled\"")), 1);
        assert_eq!(count(&r, &format!("{hang},code=\"DeadlineExceeded\"")), 1);
    }

    #[test]
    fn the_service_is_its_short_name() {
        let c = Call::from_path("/cloudless.v1.NodeService/Enroll");
        assert_eq!(
            (c.service.as_str(), c.method.as_str()),
            ("NodeService", "Enroll")
        );
        assert!(c.well_formed());
        assert!(!Call::from_path("/").well_formed());
        assert!(!Call::from_path("/a.B/c/d").well_formed());
    }
}
