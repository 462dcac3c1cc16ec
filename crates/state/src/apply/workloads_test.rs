//! Tests of the workload commands.

use prometheus_client::metrics::histogram::Histogram;

use super::*;
use crate::apply::testing::apply;
use crate::command::Command;
use crate::StateMachine;

#[test]
fn template_changes_make_revisions_and_the_history_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sm = StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
    let put = |image: &str, replicas: u32, cause: &str, at: i64| {
        let w = Workload {
            namespace: "default".into(),
            name: "web".into(),
            spec: cloudless_types::WorkloadSpec {
                image: image.into(),
                replicas,
                ..Default::default()
            },
            generation: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            template: 0,
            revisions: Vec::new(),
            vip: None,
        };
        match apply(
            sm.db(),
            Command::PutWorkload {
                workload: w,
                cause: cause.into(),
                assign_vip: true,
            },
            at,
        ) {
            Response::WorkloadStored { workload, .. } => workload,
            other => panic!("{other:?}"),
        }
    };
    let w = put("busybox:1", 2, "apply", 10);
    assert_eq!((w.template, w.revisions.len()), (1, 1));
    // The replica count alone is not a new revision.
    let w = put("busybox:1", 5, "apply", 20);
    assert_eq!((w.template, w.revisions.len()), (1, 1));
    let w = put("busybox:2", 5, "apply", 30);
    let w2 = put("busybox:1", 5, "undo to 1", 40);
    assert_eq!(w.template, 2);
    assert_eq!(w2.template, 3, "an undo is a new revision");
    let history: Vec<(u64, &str, &str, i64)> = w2
        .revisions
        .iter()
        .map(|r| (r.template, r.spec.image.as_str(), r.cause.as_str(), r.at_ms))
        .collect();
    assert_eq!(
        history,
        [
            (1, "busybox:1", "apply", 10),
            (2, "busybox:2", "apply", 30),
            (3, "busybox:1", "undo to 1", 40)
        ]
    );
    let mut last = w2;
    for i in 0..12 {
        last = put(&format!("busybox:{}", 10 + i), 5, "apply", 50 + i);
    }
    assert_eq!(last.revisions.len(), REVISION_HISTORY);
    assert_eq!(last.revisions.last().map(|r| r.template), Some(15));
    assert_eq!(last.revisions[0].template, 6, "the oldest are dropped");
}

fn workload(namespace: &str, name: &str, ports: &[(u16, u16)]) -> Workload {
    Workload {
        namespace: namespace.into(),
        name: name.into(),
        spec: WorkloadSpec {
            image: "busybox:1".into(),
            replicas: 1,
            ports: ports
                .iter()
                .map(
                    |&(container_port, ingress_port)| cloudless_types::ContainerPort {
                        container_port,
                        ingress_port,
                        ..Default::default()
                    },
                )
                .collect(),
            ..Default::default()
        },
        generation: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
        template: 0,
        revisions: Vec::new(),
        vip: None,
    }
}

fn put_cmd(w: &Workload, assign_vip: bool) -> Command {
    Command::PutWorkload {
        workload: w.clone(),
        cause: "apply".into(),
        assign_vip,
    }
}

fn vip_of(db: &redb::Database, namespace: &str, name: &str) -> Option<String> {
    let txn = db.begin_write().expect("txn");
    get_json::<Workload>(&txn, WORKLOADS, &workload_key(namespace, name))
        .expect("read")
        .expect("present")
        .vip
}

fn init(db: &redb::Database, service_cidr: &str) {
    let mut config = cloudless_types::ClusterConfig::default();
    config.network.service_cidr = service_cidr.into();
    apply(
        db,
        Command::InitCluster {
            cluster_id: "c".into(),
            config,
        },
        0,
    );
}

#[test]
fn a_workload_with_ports_gets_the_lowest_free_vip_keeps_it_and_delete_frees_it() {
    let db = crate::apply::testing::db();
    init(&db, "10.96.0.0/16");
    let mut web = workload("default", "web", &[(8080, 0)]);
    // Whatever the proposer says is ignored.
    web.vip = Some("10.96.9.9".into());
    apply(&db, put_cmd(&web, true), 1);
    apply(
        &db,
        put_cmd(&workload("default", "db", &[(5432, 0)]), true),
        2,
    );
    apply(&db, put_cmd(&workload("default", "batch", &[]), true), 3);
    assert_eq!(vip_of(&db, "default", "web").as_deref(), Some("10.96.0.2"));
    assert_eq!(vip_of(&db, "default", "db").as_deref(), Some("10.96.0.3"));
    assert_eq!(
        vip_of(&db, "default", "batch"),
        None,
        "no ports, no service"
    );

    // A new template, and one without ports, keep it.
    web.spec.image = "busybox:2".into();
    web.vip = None;
    apply(&db, put_cmd(&web, true), 4);
    assert_eq!(vip_of(&db, "default", "web").as_deref(), Some("10.96.0.2"));
    web.spec.ports.clear();
    apply(&db, put_cmd(&web, true), 5);
    assert_eq!(vip_of(&db, "default", "web").as_deref(), Some("10.96.0.2"));
    apply(
        &db,
        Command::ScaleWorkload {
            namespace: "default".into(),
            name: "web".into(),
            replicas: 3,
        },
        6,
    );
    assert_eq!(vip_of(&db, "default", "web").as_deref(), Some("10.96.0.2"));

    apply(
        &db,
        Command::DeleteWorkload {
            namespace: "default".into(),
            name: "web".into(),
        },
        7,
    );
    apply(&db, put_cmd(&workload("prod", "api", &[(80, 0)]), true), 8);
    assert_eq!(
        vip_of(&db, "prod", "api").as_deref(),
        Some("10.96.0.2"),
        "the deleted workload's address is free again"
    );
    // A workload that gains its first port gets one then.
    apply(
        &db,
        put_cmd(&workload("default", "batch", &[(9000, 0)]), true),
        9,
    );
    assert_eq!(
        vip_of(&db, "default", "batch").as_deref(),
        Some("10.96.0.4")
    );
}

#[test]
fn an_exhausted_service_range_refuses_the_workload_naming_the_range() {
    let db = crate::apply::testing::db();
    // A /30: the network, first and broadcast addresses leave one VIP.
    init(&db, "10.96.0.0/30");
    apply(
        &db,
        put_cmd(&workload("default", "web", &[(80, 0)]), true),
        1,
    );
    assert_eq!(vip_of(&db, "default", "web").as_deref(), Some("10.96.0.2"));
    let r = apply(
        &db,
        put_cmd(&workload("default", "api", &[(80, 0)]), true),
        2,
    );
    let Response::Rejected(rejection) = r else {
        panic!("stored without a VIP: {r:?}");
    };
    assert_eq!(
        rejection,
        Rejection::VipsExhausted {
            namespace: "default".into(),
            name: "api".into(),
            service_cidr: "10.96.0.0/30".into(),
        }
    );
    assert!(
        rejection.to_string().contains("10.96.0.0/30"),
        "{rejection}"
    );
    let txn = db.begin_write().expect("txn");
    assert!(
        get_json::<Workload>(&txn, WORKLOADS, "default/api")
            .expect("read")
            .is_none(),
        "nothing stored"
    );
    drop(txn);
    // Without ports it needs none.
    assert!(matches!(
        apply(&db, put_cmd(&workload("default", "api", &[]), true), 3),
        Response::WorkloadStored { .. }
    ));
}

#[test]
fn workloads_stored_before_services_get_vips_only_when_the_leader_asks() {
    let db = crate::apply::testing::db();
    init(&db, "10.96.0.0/16");
    // Entries of earlier log formats read with assign_vip false.
    for (name, ports) in [
        ("web", vec![(80, 0)]),
        ("batch", vec![]),
        ("db", vec![(5432, 0)]),
    ] {
        apply(&db, put_cmd(&workload("default", name, &ports), false), 1);
        assert_eq!(vip_of(&db, "default", name), None, "{name}");
    }
    // A later update under this format gives the one it names a VIP.
    apply(
        &db,
        put_cmd(&workload("default", "db", &[(5432, 0)]), true),
        2,
    );
    assert_eq!(vip_of(&db, "default", "db").as_deref(), Some("10.96.0.2"));
    let r = apply(
        &db,
        Command::AssignServiceVips {
            workloads: vec![
                ("default".into(), "web".into()),
                ("default".into(), "batch".into()),
                ("default".into(), "gone".into()),
                ("default".into(), "db".into()),
            ],
        },
        3,
    );
    assert_eq!(r, Response::VipsAssigned(1));
    assert_eq!(vip_of(&db, "default", "web").as_deref(), Some("10.96.0.3"));
    assert_eq!(vip_of(&db, "default", "batch"), None);
    assert_eq!(vip_of(&db, "default", "db").as_deref(), Some("10.96.0.2"));
}

#[test]
fn an_ingress_port_another_workload_holds_is_refused_naming_field_and_holder() {
    let db = crate::apply::testing::db();
    init(&db, "10.96.0.0/16");
    let web = workload("default", "web", &[(8080, 80), (8443, 443)]);
    apply(&db, put_cmd(&web, true), 1);
    // Its own update keeps its ports.
    let mut again = web.clone();
    again.spec.image = "busybox:2".into();
    assert!(matches!(
        apply(&db, put_cmd(&again, true), 2),
        Response::WorkloadStored { .. }
    ));
    let r = apply(
        &db,
        put_cmd(
            &workload("prod", "shop", &[(9000, 8080), (9443, 443)]),
            true,
        ),
        3,
    );
    let Response::Rejected(rejection) = r else {
        panic!("a taken ingress port was accepted: {r:?}");
    };
    assert_eq!(
        rejection.to_string(),
        "spec.ports[1].ingressPort: 443 is taken by default/web"
    );
    // Once web lets go of it, it is free.
    let mut web = web;
    web.spec.ports[1].ingress_port = 0;
    apply(&db, put_cmd(&web, true), 4);
    assert!(matches!(
        apply(
            &db,
            put_cmd(
                &workload("prod", "shop", &[(9000, 8080), (9443, 443)]),
                true
            ),
            5
        ),
        Response::WorkloadStored { .. }
    ));
}

#[test]
fn the_service_range_may_not_move_away_from_a_vip_in_use() {
    let db = crate::apply::testing::db();
    init(&db, "10.96.0.0/16");
    apply(
        &db,
        put_cmd(&workload("default", "web", &[(80, 0)]), true),
        1,
    );
    let set = |cidr: &str| {
        let mut config = cloudless_types::ClusterConfig::default();
        config.network.service_cidr = cidr.into();
        apply(
            &db,
            Command::SetClusterConfig {
                config,
                expected_revision: None,
            },
            2,
        )
    };
    let r = set("10.97.0.0/16");
    assert!(
        matches!(&r, Response::Rejected(Rejection::VipInUse { workload, vip, .. })
            if workload == "default/web" && vip == "10.96.0.2"),
        "{r:?}"
    );
    assert!(
        matches!(set("10.96.0.0/12"), Response::ConfigSet(_)),
        "wider"
    );
}
