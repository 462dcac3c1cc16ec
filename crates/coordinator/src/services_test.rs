//! Tests of the cluster's services as agents are told them.

use cloudless_types::{ContainerPort, LoadBalancing, Protocol, ServiceSpec, WorkloadSpec};

use super::*;

fn node(id: &str, phase: NodePhase, labels: &[(&str, &str)]) -> NodeRecord {
    let mut n = NodeRecord::new(id.into(), format!("{id}-name"), "t".into(), 0);
    n.phase = phase;
    n.labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    n.status.overlay_addresses = vec![format!("192.0.2.1:{}", 7000 + id.len())];
    n
}

fn workload(name: &str, vip: Option<&str>, ports: Vec<ContainerPort>) -> Workload {
    Workload {
        namespace: "prod".into(),
        name: name.into(),
        spec: WorkloadSpec {
            image: "busybox:1".into(),
            ports,
            ..WorkloadSpec::default()
        },
        generation: 1,
        created_at_ms: 0,
        updated_at_ms: 0,
        template: 1,
        revisions: Vec::new(),
        vip: vip.map(str::to_owned),
    }
}

fn replica(
    id: &str,
    workload: &str,
    node: &str,
    state: ReplicaState,
    address: &str,
) -> ReplicaRecord {
    ReplicaRecord {
        id: id.into(),
        namespace: "prod".into(),
        workload: workload.into(),
        template: 1,
        spec: WorkloadSpec::default(),
        node_id: node.into(),
        state,
        exit_code: None,
        restarts: 0,
        message: String::new(),
        created_at_ms: 0,
        updated_at_ms: 0,
        ready_at_ms: 0,
        disconnected_at_ms: 0,
        score: 0.0,
        address: address.into(),
        trace: String::new(),
    }
}

fn http() -> Vec<ContainerPort> {
    vec![ContainerPort {
        name: "http".into(),
        container_port: 8080,
        ingress_port: 80,
        ..ContainerPort::default()
    }]
}

#[test]
fn endpoints_are_ready_replicas_with_an_address_on_ready_nodes_that_are_not_draining() {
    let mut draining = node("drain", NodePhase::Ready, &[]);
    draining.draining = true;
    let nodes = [
        node(
            "a",
            NodePhase::Ready,
            &[("zone", "z1"), ("topology.cloudless.dev/region", "eu")],
        ),
        node(
            "b",
            NodePhase::Ready,
            &[("topology.kubernetes.io/zone", "z2")],
        ),
        node("sus", NodePhase::Suspect, &[]),
        node("down", NodePhase::Down, &[]),
        draining,
    ];
    let mut unknown = replica("r-unknown", "web", "a", ReplicaState::Ready, "10.244.0.9");
    unknown.disconnected_at_ms = 5;
    let replicas = [
        replica("r1", "web", "a", ReplicaState::Ready, "10.244.0.5"),
        replica("r0", "web", "b", ReplicaState::Ready, "10.244.1.5"),
        replica("r-running", "web", "a", ReplicaState::Running, "10.244.0.6"),
        replica("r-no-address", "web", "a", ReplicaState::Ready, ""),
        replica("r-suspect", "web", "sus", ReplicaState::Ready, "10.244.2.5"),
        replica("r-down", "web", "down", ReplicaState::Ready, "10.244.3.5"),
        replica("r-drain", "web", "drain", ReplicaState::Ready, "10.244.4.5"),
        replica(
            "r-removed",
            "web",
            "gone",
            ReplicaState::Ready,
            "10.244.5.5",
        ),
        unknown,
    ];
    let s = cluster_services(
        &[workload("web", Some("10.96.0.2"), http())],
        &replicas,
        &nodes,
    );
    let endpoints: Vec<(&str, &str, &str, &str, &str)> = s.services[0]
        .endpoints
        .iter()
        .map(|e| {
            (
                e.replica_id.as_str(),
                e.node_id.as_str(),
                e.address.as_str(),
                e.zone.as_str(),
                e.region.as_str(),
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        [
            ("r0", "b", "10.244.1.5", "z2", ""),
            ("r1", "a", "10.244.0.5", "z1", "eu"),
        ]
    );
    assert_eq!(
        s.services[0].endpoints[1].overlay_addresses,
        ["192.0.2.1:7001"]
    );
}

#[test]
fn every_workload_with_a_vip_is_a_service_with_its_ports_and_settings() {
    let mut web = workload("web", Some("10.96.0.3"), http());
    web.spec.ports.push(ContainerPort {
        container_port: 53,
        protocol: Protocol::UDP,
        ..ContainerPort::default()
    });
    web.spec.service = ServiceSpec {
        load_balancing: LoadBalancing::Weighted,
        allow_from: vec!["dev".into()],
        zone_weights: [("z1".to_owned(), 3)].into(),
    };
    let api = workload("api", Some("10.96.0.2"), http());
    let old = workload("old", None, http());
    let s = cluster_services(&[web, old, api], &[], &[]);
    let names: Vec<(&str, &str)> = s
        .services
        .iter()
        .map(|s| (s.workload.as_str(), s.vip.as_str()))
        .collect();
    assert_eq!(names, [("api", "10.96.0.2"), ("web", "10.96.0.3")]);
    let web = &s.services[1];
    assert_eq!(
        web.ports,
        [
            v1::ServicePort {
                name: "http".into(),
                port: 8080,
                protocol: v1::Protocol::Tcp.into(),
                ingress_port: 80,
            },
            v1::ServicePort {
                name: String::new(),
                port: 53,
                protocol: v1::Protocol::Udp.into(),
                ingress_port: 0,
            },
        ]
    );
    assert_eq!(web.load_balancing(), v1::LoadBalancing::Weighted);
    assert_eq!(web.allow_from, ["dev"]);
    assert_eq!(web.zone_weights.get("z1"), Some(&3));
    assert_eq!(
        s.services[0].load_balancing(),
        v1::LoadBalancing::RoundRobin
    );
    assert!(s.services.iter().all(|s| s.endpoints.is_empty()));
}

#[test]
fn runs_name_the_nodes_of_replicas_that_have_not_ended_and_ingress_nodes_are_labelled() {
    let nodes = [
        node("a", NodePhase::Ready, &[("ingress", "true")]),
        node("b", NodePhase::Suspect, &[("ingress", "true")]),
        node("c", NodePhase::Ready, &[("ingress", "false")]),
    ];
    let replicas = [
        replica("r1", "web", "a", ReplicaState::Pending, ""),
        replica("r2", "web", "b", ReplicaState::Running, ""),
        replica("r3", "web", "c", ReplicaState::Failed, ""),
        replica("r4", "job", "c", ReplicaState::Succeeded, ""),
        replica("r5", "api", "c", ReplicaState::Ready, "10.244.0.2"),
    ];
    let s = cluster_services(&[], &replicas, &nodes);
    let runs: Vec<(&str, Vec<&str>)> = s
        .runs
        .iter()
        .map(|r| {
            (
                r.workload.as_str(),
                r.node_ids.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(runs, [("api", vec!["c"]), ("web", vec!["a", "b"])]);
    assert_eq!(s.ingress_node_ids, ["a"], "Ready ones only");
    assert_eq!(
        s.ingress_labelled,
        BTreeSet::from(["a".to_owned(), "b".to_owned()])
    );
}
