//! Replica subnets for nodes enrolled before subnets existed. Enrollment
//! gives every new node its subnet in the same log entry
//! (`Command::EnrollNode`); a node enrolled by an earlier release has none
//! until the leader proposes `Command::AssignNodeSubnets` for it, which the
//! reconcile loop does on its next pass.

use cloudless_state::Command;
use cloudless_types::{NetworkConfig, NodeRecord};

/// Most nodes one `AssignNodeSubnets` names (the rest go in later passes).
pub(crate) const MAX_NODES_PER_COMMAND: usize = 256;

/// The command that gives the nodes without a subnet one, in node id
/// order; `None` when every node has one or no subnet is free (so an
/// exhausted range costs no log entry per pass).
pub(crate) fn assign_missing(nodes: &[NodeRecord], network: &NetworkConfig) -> Option<Command> {
    let mut missing: Vec<String> = nodes
        .iter()
        .filter(|n| n.subnet.is_none())
        .map(|n| n.id.clone())
        .collect();
    if missing.is_empty() {
        return None;
    }
    network.free_node_subnet(nodes.iter().filter_map(|n| n.subnet.as_deref()))?;
    missing.sort();
    missing.truncate(MAX_NODES_PER_COMMAND);
    Some(Command::AssignNodeSubnets { node_ids: missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, subnet: Option<&str>) -> NodeRecord {
        let mut n = NodeRecord::new(id.into(), id.into(), "t".into(), 0);
        n.subnet = subnet.map(str::to_owned);
        n
    }

    #[test]
    fn nodes_without_a_subnet_are_named_in_id_order() {
        let nodes = [
            node("n3", None),
            node("n1", Some("10.244.0.0/24")),
            node("n2", None),
        ];
        assert_eq!(
            assign_missing(&nodes, &NetworkConfig::default()),
            Some(Command::AssignNodeSubnets {
                node_ids: vec!["n2".into(), "n3".into()]
            })
        );
    }

    #[test]
    fn nothing_is_proposed_when_every_node_has_one_or_none_is_free() {
        let served = [node("n1", Some("10.244.0.0/24"))];
        assert_eq!(assign_missing(&served, &NetworkConfig::default()), None);
        let full = NetworkConfig {
            cluster_cidr: "10.244.0.0/24".into(),
            node_prefix_len: 25,
            ..NetworkConfig::default()
        };
        let nodes = [
            node("n1", Some("10.244.0.0/25")),
            node("n2", Some("10.244.0.128/25")),
            node("old", None),
        ];
        assert_eq!(assign_missing(&nodes, &full), None);
    }
}
