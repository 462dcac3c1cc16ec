//! gRPC server metrics: requests by service, method and status code, and the
//! time to the response's headers (for a unary call, its handling time; for
//! a stream, the time to open it), as a tower layer on the tonic server.
//!
//! The status is read where gRPC puts it: in the headers of a trailers-only
//! response (most errors), else in the trailers at the end of the body. A
//! body dropped before its trailers (the client went away) counts as
//! `Cancelled`. Method names come from the request path, which a client
//! chooses: a call the server does not implement is counted under
//! `unknown`, so callers cannot grow the label set.

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
}

impl GrpcMetrics {
    /// Registers `cloudless_grpc_requests_total{service,method,code}` and
    /// `cloudless_grpc_request_seconds{service,method}` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            seconds: Family::new_with_constructor(new_histogram as fn() -> Histogram),
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

    fn observe(&self, call: &Call, early: Option<tonic::Code>, seconds: f64) {
        let (service, method) = call.labels(early);
        self.seconds
            .get_or_create(&MethodLabels { service, method })
            .observe(seconds);
    }

    fn finish(&self, call: &Call, code: tonic::Code) {
        let (service, method) = call.labels(Some(code));
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
    /// The labels to record: `unknown` for a call nobody implements.
    fn labels(&self, code: Option<tonic::Code>) -> (String, String) {
        if code == Some(tonic::Code::Unimplemented) {
            ("unknown".to_owned(), "unknown".to_owned())
        } else {
            (self.service.clone(), self.method.clone())
        }
    }
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
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
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

    #[test]
    fn the_service_is_its_short_name() {
        let c = Call::from_path("/cloudless.v1.NodeService/Enroll");
        assert_eq!(
            (c.service.as_str(), c.method.as_str()),
            ("NodeService", "Enroll")
        );
        let c = Call::from_path("/");
        assert_eq!((c.service.as_str(), c.method.as_str()), ("", ""));
    }
}
