//! The Cloudless wire API, generated from `proto/cloudless/v1`.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// Version 1 of the API.
pub mod v1 {
    tonic::include_proto!("cloudless.v1");
}

mod convert;
pub mod enums;
pub use convert::{cluster_config_from_wire, egress_from_wire, spec_from_wire, workload_from_wire};
pub use enums::WireEnum;
