//! Service VIPs for workloads stored before services existed. A workload
//! with ports gets its VIP in the log entry that creates it
//! (`Command::PutWorkload`); one stored by an earlier release has none
//! until the leader proposes `Command::AssignServiceVips` for it, which the
//! reconcile loop does on its next pass.

use cloudless_state::Command;
use cloudless_types::{NetworkConfig, Workload};

/// Most workloads one `AssignServiceVips` names (the rest go in later
/// passes).
pub(crate) const MAX_WORKLOADS_PER_COMMAND: usize = 256;

/// The command that gives the workloads with ports and no VIP one, by
/// namespace and name; `None` when every such workload has one or no VIP is
/// free (so an exhausted range costs no log entry per pass).
pub(crate) fn assign_missing(workloads: &[Workload], network: &NetworkConfig) -> Option<Command> {
    let mut missing: Vec<(String, String)> = workloads
        .iter()
        .filter(|w| w.vip.is_none() && !w.spec.ports.is_empty())
        .map(|w| (w.namespace.clone(), w.name.clone()))
        .collect();
    if missing.is_empty() {
        return None;
    }
    network.free_service_vip(workloads.iter().filter_map(|w| w.vip.as_deref()))?;
    missing.sort();
    missing.truncate(MAX_WORKLOADS_PER_COMMAND);
    Some(Command::AssignServiceVips { workloads: missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, ports: bool, vip: Option<&str>) -> Workload {
        Workload {
            namespace: "default".into(),
            name: name.into(),
            spec: cloudless_types::WorkloadSpec {
                ports: if ports {
                    vec![cloudless_types::ContainerPort {
                        container_port: 80,
                        ..Default::default()
                    }]
                } else {
                    Vec::new()
                },
                ..Default::default()
            },
            generation: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
            template: 1,
            revisions: Vec::new(),
            vip: vip.map(str::to_owned),
        }
    }

    #[test]
    fn workloads_with_ports_and_no_vip_are_named_in_order() {
        let workloads = [
            workload("web", true, None),
            workload("batch", false, None),
            workload("api", true, None),
            workload("db", true, Some("10.96.0.2")),
        ];
        assert_eq!(
            assign_missing(&workloads, &NetworkConfig::default()),
            Some(Command::AssignServiceVips {
                workloads: vec![
                    ("default".into(), "api".into()),
                    ("default".into(), "web".into())
                ]
            })
        );
    }

    #[test]
    fn nothing_is_proposed_when_every_one_has_a_vip_or_none_is_free() {
        let served = [
            workload("db", true, Some("10.96.0.2")),
            workload("batch", false, None),
        ];
        assert_eq!(assign_missing(&served, &NetworkConfig::default()), None);
        let full = NetworkConfig {
            service_cidr: "10.96.0.0/30".into(),
            ..NetworkConfig::default()
        };
        let workloads = [
            workload("db", true, Some("10.96.0.2")),
            workload("old", true, None),
        ];
        assert_eq!(assign_missing(&workloads, &full), None);
    }
}
