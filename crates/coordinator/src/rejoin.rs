//! Rejoin: a node whose certificate expired while it was offline (a phone
//! in a drawer for a week) gets a new certificate for the same node id
//! without a join token, by proving it still holds its old key
//! (`cloudless_pki::verify_rejoin_proof`), within the cluster's
//! `node_rejoin_grace_s`, unless it was removed or has been issued a newer
//! certificate since.

use cloudless_pki::{verify_rejoin_proof, Identity, RejoinProof};
use cloudless_proto::v1::{RejoinRequest, RejoinResponse};
use cloudless_state::{Command, Rejection, Response as SmResponse};

use crate::clock::now_ms;
use crate::error::{CoordinatorError, RejoinRefusal};
use crate::handle::CoordinatorHandle;

/// Serves one rejoin on the leader (a follower's state may lag behind a
/// removal or a renewal).
pub(crate) async fn rejoin(
    h: &CoordinatorHandle,
    r: RejoinRequest,
) -> Result<RejoinResponse, CoordinatorError> {
    h.ensure_leader()?;
    let config = h.cluster()?.config;
    if config.node_rejoin_grace_s == 0 {
        return Err(RejoinRefusal::Disabled.into());
    }
    let keys = h.identity_keys()?;
    let now = now_ms();
    let grant = verify_rejoin_proof(
        keys.ca.cert_pem(),
        &RejoinProof {
            cert_pem: &r.cert_pem,
            csr_pem: &r.csr_pem,
            signed_at: r.signed_at_s,
            signature: &r.proof,
        },
        now / 1000,
        config.node_rejoin_grace_s,
    )?;
    // The node id comes from the verified certificate, never from the request.
    let node_id = grant.node_id;
    let removed = || RejoinRefusal::Removed {
        node_id: node_id.clone(),
    };
    let node = h.reader().node(&node_id)?.ok_or_else(removed)?;
    let presented_ms = grant.not_after.saturating_mul(1000);
    if presented_ms < node.cert_not_after_ms {
        return Err(RejoinRefusal::Superseded {
            node_id,
            presented_ms,
            latest_ms: node.cert_not_after_ms,
        }
        .into());
    }
    // Before the signature: a flood of rejoins costs the leader nothing.
    h.admit_node_write(&node_id)?;
    let issued = keys.ca.sign_csr(
        &r.csr_pem,
        &Identity::Node(node_id.clone()),
        config.node_cert_lifetime_s,
        now / 1000,
    )?;
    let not_after_ms = issued.not_after.saturating_mul(1000);
    // The state machine refuses a node removed since the read above.
    let resp = match h
        .write_for_node(Command::RenewNodeCert {
            node_id: node_id.clone(),
            cert_not_after_ms: not_after_ms,
        })
        .await
    {
        Ok((resp, _)) => resp,
        Err(CoordinatorError::Rejected(Rejection::NodeNotFound { .. })) => {
            return Err(removed().into())
        }
        Err(e) => return Err(e),
    };
    if !matches!(resp, SmResponse::Node(_)) {
        return Err(CoordinatorError::Fatal(format!(
            "unexpected state machine answer {resp:?}"
        )));
    }
    tracing::info!(
        node_id = %node_id,
        expired_at_s = grant.not_after,
        not_after_ms,
        "node rejoined, proving it holds its expired certificate's key"
    );
    Ok(RejoinResponse {
        node_id,
        certificate_pem: issued.cert_pem,
        ca_certificate_pem: keys.ca.cert_pem().to_owned(),
        not_after_ms,
    })
}
