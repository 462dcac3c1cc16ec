//! `ListServices`: every workload with a virtual IP, with its ports,
//! settings and Ready endpoints, computed as the assignment watch computes
//! them for agents (`crate::services`).

use cloudless_proto::v1::workload_service_client::WorkloadServiceClient;
use cloudless_proto::v1::{ListServicesRequest, ListServicesResponse};
use tonic::{Request, Response, Status};

use crate::forward::admin_call;
use crate::handle::CoordinatorHandle;
use crate::services::ClusterServices;

/// `ListServices`: the services of one namespace (empty: every one), by
/// namespace and name.
pub(super) async fn list(
    handle: &CoordinatorHandle,
    req: Request<ListServicesRequest>,
) -> Result<Response<ListServicesResponse>, Status> {
    let h = handle.clone();
    admin_call(
        handle,
        req,
        |r: ListServicesRequest| async move {
            h.read_barrier(r.read.as_ref()).await?;
            let mut services = ClusterServices::read(h.reader())?.services;
            if !r.namespace.is_empty() {
                services.retain(|s| s.namespace == r.namespace);
            }
            Ok(ListServicesResponse { services })
        },
        |ch, r| async move { WorkloadServiceClient::new(ch).list_services(r).await },
    )
    .await
}
