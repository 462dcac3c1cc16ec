//! A node's status report: the replica updates it makes, checked field by
//! field against the replicas assigned to the node.

use cloudless_proto::v1::ReportStatusRequest;
use cloudless_proto::{enums, v1};
use cloudless_state::{ReplicaUpdate, StateReader};
use tonic::Status;

use crate::error::CoordinatorError;

/// Most replicas one status report may list.
pub(crate) const MAX_STATUS_ENTRIES: usize = 512;
/// Longest replica address a report may carry.
pub(crate) const MAX_ADDRESS_LEN: usize = 64;
/// Most events one status report may carry.
pub(crate) const MAX_REPORT_EVENTS: usize = 16;
/// Longest event message recorded (longer ones are cut).
pub(crate) const MAX_EVENT_MESSAGE: usize = 512;
/// The reasons an agent may report (others are dropped: a newer agent's
/// events must not stop its statuses from being written).
pub(crate) const AGENT_EVENT_REASONS: [&str; 3] = ["Pulling", "Pulled", "PullFailed"];

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
    text
}

/// The events a node's status report records, for replicas assigned to the
/// node (others are dropped, as for statuses), each as its workload's event
/// naming the replica and the node, its message cut to
/// [`MAX_EVENT_MESSAGE`]. More than [`MAX_REPORT_EVENTS`] refuse the report;
/// a reason agents do not report is dropped.
pub(crate) fn report_events(
    reader: &StateReader,
    id: &str,
    events: Vec<v1::ReplicaEvent>,
) -> Result<Vec<cloudless_types::EventRecord>, Status> {
    if events.len() > MAX_REPORT_EVENTS {
        return Err(Status::from(CoordinatorError::InvalidArgument(format!(
            "events: {} entries; a report carries at most {MAX_REPORT_EVENTS}",
            events.len()
        ))));
    }
    let events: Vec<v1::ReplicaEvent> = events
        .into_iter()
        .filter(|e| {
            let known = AGENT_EVENT_REASONS.contains(&e.reason.as_str());
            if !known {
                let shown: String = e.reason.chars().take(32).collect();
                tracing::debug!(node_id = %id, reason = %shown, "event of a reason agents do not report; dropped");
            }
            known
        })
        .collect();
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let assigned: std::collections::HashMap<String, cloudless_types::ReplicaRecord> = reader
        .node_replicas(id)
        .map_err(CoordinatorError::from)?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let node = reader
        .node(id)
        .map_err(CoordinatorError::from)?
        .map_or_else(|| id.to_owned(), |n| n.name);
    Ok(events
        .into_iter()
        .filter_map(|e| {
            let r = assigned.get(&e.replica_id)?;
            Some(cloudless_types::EventRecord {
                at_ms: 0,
                kind: "Workload".into(),
                namespace: r.namespace.clone(),
                object: r.workload.clone(),
                reason: e.reason,
                message: format!(
                    "replica {} on {node}: {}",
                    r.id,
                    cut(e.message, MAX_EVENT_MESSAGE)
                ),
            })
        })
        .collect())
}

/// The address a report gives a replica on a node with `subnet`: an IP
/// address inside the node's subnet, or empty (unchanged). Anything else is
/// dropped with a warning, without refusing the rest of the report: a node
/// can only claim addresses of its own subnet.
fn checked_address(
    node_id: &str,
    replica: &str,
    address: String,
    subnet: Option<&ipnet::IpNet>,
) -> String {
    if address.is_empty() {
        return address;
    }
    let problem = if address.len() > MAX_ADDRESS_LEN {
        format!("longer than {MAX_ADDRESS_LEN} characters")
    } else {
        match (address.parse::<std::net::IpAddr>(), subnet) {
            (Err(_), _) => "not an IP address".to_owned(),
            (Ok(_), None) => "the node has no replica subnet".to_owned(),
            (Ok(ip), Some(net)) if !net.contains(&ip) => format!("outside the node's subnet {net}"),
            (Ok(ip), Some(_)) => return ip.to_string(),
        }
    };
    let shown: String = address.chars().take(MAX_ADDRESS_LEN).collect();
    tracing::warn!(node_id = %node_id, replica = %replica, address = %shown, "reported replica address ignored: {problem}");
    String::new()
}

/// The updates a node's status report makes: checked field by field, only
/// for replicas assigned to the node (others are dropped: a report can race
/// a removal), each replica at most once.
pub(super) fn status_updates(
    reader: &StateReader,
    id: &str,
    req: ReportStatusRequest,
) -> Result<Vec<ReplicaUpdate>, Status> {
    if req.replicas.len() > MAX_STATUS_ENTRIES {
        return Err(Status::from(CoordinatorError::InvalidArgument(format!(
            "replicas: {} entries; a report lists at most {MAX_STATUS_ENTRIES}",
            req.replicas.len()
        ))));
    }
    let assigned: std::collections::HashSet<String> = reader
        .node_replicas(id)
        .map_err(CoordinatorError::from)?
        .into_iter()
        .map(|r| r.id)
        .collect();
    let subnet: Option<ipnet::IpNet> = reader
        .node(id)
        .map_err(CoordinatorError::from)?
        .and_then(|n| n.subnet)
        .and_then(|s| s.parse().ok());
    let mut seen = std::collections::HashSet::new();
    let mut updates = Vec::new();
    for (i, r) in req.replicas.into_iter().enumerate() {
        let state = enums::required::<v1::ReplicaState>(
            r.state,
            &r.legacy_state,
            &format!("replicas[{i}].state"),
        )
        .map_err(CoordinatorError::from)?;
        if r.replica_id.is_empty() || r.replica_id.len() > 256 {
            return Err(Status::from(CoordinatorError::InvalidArgument(format!(
                "replicas[{i}].replica_id: must be 1 to 256 characters"
            ))));
        }
        if !seen.insert(r.replica_id.clone()) {
            return Err(Status::from(CoordinatorError::InvalidArgument(format!(
                "replicas[{i}].replica_id: {:?} is listed twice",
                r.replica_id
            ))));
        }
        if !assigned.contains(&r.replica_id) {
            tracing::debug!(node_id = %id, replica = %r.replica_id, "status for a replica not assigned to the node; dropped");
            continue;
        }
        let message = cut(r.message, 1024);
        let address = checked_address(id, &r.replica_id, r.address, subnet.as_ref());
        updates.push(ReplicaUpdate {
            id: r.replica_id,
            node_id: id.to_owned(),
            state,
            exit_code: r.exit_code,
            restarts: r.restarts,
            message,
            address,
        });
    }
    Ok(updates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_address_is_kept_only_inside_the_nodes_subnet() {
        let net: ipnet::IpNet = "10.244.3.0/24".parse().expect("net");
        let check = |a: &str, subnet| checked_address("n1", "r1", a.to_owned(), subnet);
        assert_eq!(check("10.244.3.7", Some(&net)), "10.244.3.7");
        assert_eq!(check("", Some(&net)), "", "empty: unchanged");
        assert_eq!(check("10.244.4.7", Some(&net)), "", "another node's subnet");
        assert_eq!(check("10.244.3.7", None), "", "a node without a subnet");
        assert_eq!(check("not-an-ip", Some(&net)), "");
        assert_eq!(check(&"1".repeat(65), Some(&net)), "");
        let v6: ipnet::IpNet = "fd00:244:0:3::/64".parse().expect("net");
        assert_eq!(
            check("fd00:244:0:3:0:0:0:9", Some(&v6)),
            "fd00:244:0:3::9",
            "stored in its canonical form"
        );
    }
}
