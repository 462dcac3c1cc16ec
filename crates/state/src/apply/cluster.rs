//! The cluster record and identity: `InitCluster`, `SetClusterConfig`,
//! `InitIdentity`.

use redb::WriteTransaction;

use cloudless_types::{ClusterConfig, IdentityMaterial};

use crate::command::{ClusterInfo, Rejection, Response};
use crate::error::ApplyError;
use crate::tables::{get_json, put_json, CLUSTER, CLUSTER_KEY, IDENTITY, IDENTITY_KEY};

/// `InitCluster`: records the cluster's id and first configuration, once.
pub(super) fn init(
    txn: &WriteTransaction,
    cluster_id: &str,
    config: &ClusterConfig,
    now_ms: i64,
) -> Result<Response, ApplyError> {
    if let Some(existing) = get_json::<ClusterInfo>(txn, CLUSTER, CLUSTER_KEY)? {
        return Ok(Response::Rejected(Rejection::AlreadyInitialized {
            cluster_id: existing.cluster_id,
        }));
    }
    let info = ClusterInfo {
        cluster_id: cluster_id.to_owned(),
        created_at_ms: now_ms,
        config: config.clone(),
        revision: 1,
    };
    put_json(txn, CLUSTER, CLUSTER_KEY, &info)?;
    Ok(Response::ClusterInitialized(info))
}

/// `SetClusterConfig`: replaces the configuration if the revision is the
/// expected one.
pub(super) fn set_config(
    txn: &WriteTransaction,
    config: &ClusterConfig,
    expected_revision: Option<u64>,
) -> Result<Response, ApplyError> {
    let Some(mut info) = get_json::<ClusterInfo>(txn, CLUSTER, CLUSTER_KEY)? else {
        return Ok(Response::Rejected(Rejection::NotInitialized));
    };
    if let Some(expected) = expected_revision {
        if expected != info.revision {
            return Ok(Response::Rejected(Rejection::RevisionMismatch {
                expected,
                actual: info.revision,
            }));
        }
    }
    // Node subnets never move: the new settings must still hold each one.
    if info.config.network != config.network {
        for n in super::nodes::all(txn)? {
            if let Some(subnet) = n.subnet {
                if !config.network.holds_node_subnet(&subnet) {
                    return Ok(Response::Rejected(Rejection::SubnetInUse {
                        node: n.id,
                        subnet,
                        cluster_cidr: config.network.cluster_cidr.clone(),
                        prefix_len: config.network.node_prefix_len,
                    }));
                }
            }
        }
        // Nor do service VIPs.
        for w in super::workloads::all(txn)? {
            if let Some(vip) = w.vip {
                if !config.network.holds_service_vip(&vip) {
                    return Ok(Response::Rejected(Rejection::VipInUse {
                        workload: format!("{}/{}", w.namespace, w.name),
                        vip,
                        service_cidr: config.network.service_cidr.clone(),
                    }));
                }
            }
        }
    }
    info.config = config.clone();
    info.revision += 1;
    put_json(txn, CLUSTER, CLUSTER_KEY, &info)?;
    Ok(Response::ConfigSet(info))
}

/// `InitIdentity`: records the cluster CA and sealed keys, once.
pub(super) fn init_identity(
    txn: &WriteTransaction,
    material: &IdentityMaterial,
) -> Result<Response, ApplyError> {
    if get_json::<IdentityMaterial>(txn, IDENTITY, IDENTITY_KEY)?.is_some() {
        return Ok(Response::Rejected(Rejection::IdentityAlreadyInitialized));
    }
    put_json(txn, IDENTITY, IDENTITY_KEY, material)?;
    Ok(Response::IdentityInitialized)
}

/// The cluster configuration, or the defaults before `InitCluster`.
pub(super) fn config(txn: &WriteTransaction) -> Result<ClusterConfig, ApplyError> {
    Ok(get_json::<ClusterInfo>(txn, CLUSTER, CLUSTER_KEY)?
        .map(|c| c.config)
        .unwrap_or_default())
}
