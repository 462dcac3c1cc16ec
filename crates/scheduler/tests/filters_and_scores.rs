//! Table tests: each filter removes the nodes it should, with its reason, and
//! each scoring factor moves the choice the way it should.

mod common;

use cloudless_scheduler::{
    AntiAffinity, ClusterSnapshot, Decision, FilterReason, Filtered, MatchExpression, NodeInfo,
    NodePhase, Operator, PowerSource, PreferredTerm, Protocol, RunningReplica, Strategy, Taint,
    TaintEffect, Toleration, TolerationOperator, WorkloadRequest,
};
use cloudless_types::SchedulerWeights;
use common::{node, request, res, GIB};

fn snap(nodes: &[NodeInfo]) -> ClusterSnapshot {
    ClusterSnapshot::new(nodes, SchedulerWeights::default()).expect("valid snapshot")
}

fn placed_on(d: &Decision) -> &str {
    match d {
        Decision::Placed(p) => &p.node,
        Decision::Unplaced(u) => panic!("unplaced: {u}"),
    }
}

fn placed_count(d: &[Decision]) -> usize {
    d.iter()
        .filter(|d| matches!(d, Decision::Placed(_)))
        .count()
}

fn unplaced_reasons(d: &Decision) -> Vec<(FilterReason, u32)> {
    match d {
        Decision::Unplaced(u) => u.reasons.iter().map(|(r, n, _)| (*r, *n)).collect(),
        Decision::Placed(p) => panic!("placed on {}", p.node),
    }
}

/// One good node "ok" plus one node broken in the given way: the replica lands on "ok"
/// and, with "ok" removed, the broken node is refused for `reason`.
fn filter_case(name: &str, broken: NodeInfo, req: &WorkloadRequest, reason: FilterReason) {
    filter_case_with(name, node("ok", "z1"), broken, req, reason);
}

fn filter_case_with(
    name: &str,
    ok: NodeInfo,
    broken: NodeInfo,
    req: &WorkloadRequest,
    reason: FilterReason,
) {
    let mut s = snap(&[ok, broken.clone()]);
    let d = s.place(req, 0, false).expect("place");
    assert_eq!(placed_on(&d[0]), "ok", "{name}");
    let mut s = snap(&[broken]);
    let d = s.place(req, 0, false).expect("place");
    assert_eq!(unplaced_reasons(&d[0]), [(reason, 1)], "{name}");
}

#[test]
fn each_filter_removes_its_nodes_with_its_reason() {
    let base = request("w", 1, 100, 1);
    let with = |f: &dyn Fn(&mut NodeInfo)| {
        let mut n = node("bad", "z2");
        f(&mut n);
        n
    };
    filter_case(
        "suspect",
        with(&|n| n.phase = NodePhase::Suspect),
        &base,
        FilterReason::NotReady,
    );
    filter_case(
        "down",
        with(&|n| n.phase = NodePhase::Down),
        &base,
        FilterReason::NotReady,
    );
    filter_case(
        "cordoned",
        with(&|n| n.cordoned = true),
        &base,
        FilterReason::Cordoned,
    );
    filter_case(
        "draining",
        with(&|n| n.draining = true),
        &base,
        FilterReason::Draining,
    );
    filter_case(
        "arch",
        with(&|n| n.arch = "arm64".into()),
        &WorkloadRequest {
            arch: Some("amd64".into()),
            ..base.clone()
        },
        FilterReason::Architecture,
    );
    let gvisor = WorkloadRequest {
        runtime_class: Some("runsc".into()),
        ..base.clone()
    };
    let mut s = snap(&[
        with(&|n| n.runtime_classes = vec!["runsc".into()]),
        node("ok", "z1"),
    ]);
    assert_eq!(
        placed_on(&s.place(&gvisor, 0, false).expect("place")[0]),
        "bad",
        "runsc node offers runsc"
    );
    let mut s = snap(&[node("bad", "z2")]);
    assert_eq!(
        unplaced_reasons(&s.place(&gvisor, 0, false).expect("place")[0]),
        [(FilterReason::RuntimeClass, 1)]
    );
    filter_case(
        "region",
        with(&|n| n.region = "us".into()),
        &WorkloadRequest {
            regions: vec!["eu".into()],
            ..base.clone()
        },
        FilterReason::Region,
    );
    filter_case(
        "zone",
        node("bad", "z2"),
        &WorkloadRequest {
            zones: vec!["z1".into()],
            ..base.clone()
        },
        FilterReason::Zone,
    );
    let mut sel = base.clone();
    sel.node_selector.insert("disk".into(), "ssd".into());
    let mut ssd = node("ok", "z1");
    ssd.labels.insert("disk".into(), "ssd".into());
    filter_case_with(
        "selector",
        ssd,
        with(&|n| {
            n.labels.insert("disk".into(), "hdd".into());
        }),
        &sel,
        FilterReason::NodeSelector,
    );
    let aff = WorkloadRequest {
        required: vec![MatchExpression {
            key: "gpu".into(),
            operator: Operator::DoesNotExist,
            values: vec![],
        }],
        ..base.clone()
    };
    filter_case(
        "required affinity",
        with(&|n| {
            n.labels.insert("gpu".into(), "a100".into());
        }),
        &aff,
        FilterReason::RequiredAffinity,
    );
    let taint = |effect| Taint {
        key: "dedicated".into(),
        value: "db".into(),
        effect,
        added_at_ms: 0,
    };
    filter_case(
        "NoSchedule",
        with(&|n| n.taints.push(taint(TaintEffect::NoSchedule))),
        &base,
        FilterReason::Taint,
    );
    filter_case(
        "NoExecute",
        with(&|n| n.taints.push(taint(TaintEffect::NoExecute))),
        &base,
        FilterReason::Taint,
    );
    filter_case(
        "cpu",
        with(&|n| n.reserved = res(3950, 0)),
        &base,
        FilterReason::InsufficientCpu,
    );
    filter_case(
        "memory",
        with(&|n| n.reserved = res(0, 8)),
        &base,
        FilterReason::InsufficientMemory,
    );
    let mut storage = base.clone();
    storage.requests.storage_bytes = 10 * GIB;
    let mut with_disk = node("ok", "z1");
    with_disk.capacity.storage_bytes = 100 * GIB;
    filter_case_with(
        "storage",
        with_disk,
        node("bad", "z2"),
        &storage,
        FilterReason::InsufficientStorage,
    );
}

#[test]
fn tolerations_match_by_key_value_effect_and_time() {
    let mut tainted = node("t", "z1");
    tainted.taints.push(Taint {
        key: "dedicated".into(),
        value: "db".into(),
        effect: TaintEffect::NoSchedule,
        added_at_ms: 0,
    });
    let tol = |key: &str, op, value: &str, effect| Toleration {
        key: key.into(),
        operator: op,
        value: value.into(),
        effect,
        toleration_seconds: None,
    };
    let cases = [
        (
            tol("dedicated", TolerationOperator::Equal, "db", None),
            true,
        ),
        (
            tol("dedicated", TolerationOperator::Equal, "web", None),
            false,
        ),
        (
            tol(
                "dedicated",
                TolerationOperator::Exists,
                "",
                Some(TaintEffect::NoSchedule),
            ),
            true,
        ),
        (
            tol(
                "dedicated",
                TolerationOperator::Exists,
                "",
                Some(TaintEffect::NoExecute),
            ),
            false,
        ),
        (tol("", TolerationOperator::Exists, "", None), true),
        (tol("other", TolerationOperator::Exists, "", None), false),
    ];
    for (t, fits) in cases {
        let mut s = snap(std::slice::from_ref(&tainted));
        let req = WorkloadRequest {
            tolerations: vec![t.clone()],
            ..request("w", 1, 100, 1)
        };
        let placed = matches!(
            s.place(&req, 0, false).expect("place")[0],
            Decision::Placed(_)
        );
        assert_eq!(placed, fits, "{t:?}");
    }
    // NoExecute with toleration_seconds: tolerated only until added_at + seconds.
    let mut evicting = node("e", "z1");
    evicting.taints.push(Taint {
        key: "unreachable".into(),
        value: String::new(),
        effect: TaintEffect::NoExecute,
        added_at_ms: 1_000,
    });
    let req = WorkloadRequest {
        tolerations: vec![Toleration {
            toleration_seconds: Some(60),
            ..tol("unreachable", TolerationOperator::Exists, "", None)
        }],
        ..request("w", 1, 100, 1)
    };
    for (now, fits) in [(30_000, true), (61_000, false)] {
        let mut s = snap(std::slice::from_ref(&evicting));
        let placed = matches!(
            s.place(&req, now, false).expect("place")[0],
            Decision::Placed(_)
        );
        assert_eq!(placed, fits, "now {now}");
    }
}

#[test]
fn reservations_are_counted_within_one_call() {
    // 13 replicas of 1 core on three 4-core nodes: 12 fit, never more than 4 per node.
    let mut s = snap(&[node("a", "z1"), node("b", "z1"), node("c", "z1")]);
    let req = WorkloadRequest {
        strategy: Strategy::Binpack,
        ..request("w", 13, 1000, 1)
    };
    let d = s.place(&req, 0, false).expect("place");
    let placed: Vec<&str> = d
        .iter()
        .filter_map(|d| match d {
            Decision::Placed(p) => Some(p.node.as_str()),
            Decision::Unplaced(_) => None,
        })
        .collect();
    assert_eq!(placed.len(), 12);
    for n in ["a", "b", "c"] {
        assert_eq!(placed.iter().filter(|p| **p == n).count(), 4, "{n}");
        assert_eq!(s.reserved(n).expect("node").cpu_millis, 4000);
    }
    assert_eq!(
        unplaced_reasons(&d[12]),
        [(FilterReason::InsufficientCpu, 3)]
    );
}

#[test]
fn unplaced_explanation_reads_like_a_sentence() {
    let mut nodes: Vec<NodeInfo> = (0..7)
        .map(|i| {
            let mut n = node(&format!("m{i}"), "eu-a");
            n.reserved = res(0, 8);
            n
        })
        .collect();
    nodes.extend((0..3).map(|i| node(&format!("z{i}"), "eu-b")));
    let mut s = snap(&nodes);
    let d = s
        .place(
            &WorkloadRequest {
                zones: vec!["eu-a".into()],
                ..request("w", 1, 100, 1)
            },
            0,
            false,
        )
        .expect("place");
    let Decision::Unplaced(u) = &d[0] else {
        panic!("placed")
    };
    assert_eq!(
        u.to_string(),
        "7 nodes: insufficient memory; 3 nodes: zone not in [eu-a]"
    );
}

#[test]
fn binpack_fills_the_fullest_node_and_spread_the_emptiest() {
    let mut full = node("full", "z1");
    full.reserved = res(3000, 4);
    let empty = node("empty", "z1");
    let mut s = snap(&[full.clone(), empty.clone()]);
    assert_eq!(
        placed_on(
            &s.place(&request("one", 1, 500, 1), 0, false)
                .expect("place")[0]
        ),
        "full",
        "binpack is the default for one replica"
    );
    let mut s = snap(&[full, empty]);
    let spread = WorkloadRequest {
        strategy: Strategy::Spread,
        ..request("one", 1, 500, 1)
    };
    assert_eq!(
        placed_on(&s.place(&spread, 0, false).expect("place")[0]),
        "empty"
    );
}

#[test]
fn more_than_one_replica_spreads_across_zones_by_default() {
    let nodes: Vec<NodeInfo> = ["a1", "a2", "b1", "c1"]
        .iter()
        .map(|id| node(id, &format!("z{}", &id[..1])))
        .collect();
    let mut s = snap(&nodes);
    let d = s
        .place(&request("web", 3, 100, 1), 0, false)
        .expect("place");
    let mut zones: Vec<char> = d
        .iter()
        .map(|d| placed_on(d).chars().next().expect("id"))
        .collect();
    zones.sort_unstable();
    assert_eq!(zones, ['a', 'b', 'c']);
}

#[test]
fn factors_move_the_choice() {
    // reliability
    let mut flaky = node("flaky", "z1");
    flaky.reliability = 0.2;
    let mut s = snap(&[flaky, node("solid", "z1")]);
    assert_eq!(
        placed_on(&s.place(&request("w", 1, 100, 1), 0, false).expect("place")[0]),
        "solid"
    );
    // cost
    let mut pricey = node("pricey", "z1");
    pricey.cost_per_unit = 5.0;
    let mut s = snap(&[pricey, node("cheap", "z1")]);
    assert_eq!(
        placed_on(&s.place(&request("w", 1, 100, 1), 0, false).expect("place")[0]),
        "cheap"
    );
    // locality and network penalty: first listed region wins, far nodes lose
    let mut us = node("us1", "z1");
    us.region = "us".into();
    let mut eu_far = node("eu1", "z1");
    eu_far.rtt_ms.insert("us".into(), 150.0);
    let mut s = snap(&[us, eu_far]);
    let req = WorkloadRequest {
        regions: vec!["us".into(), "eu".into()],
        ..request("w", 1, 100, 1)
    };
    assert_eq!(
        placed_on(&s.place(&req, 0, false).expect("place")[0]),
        "us1"
    );
    // battery: long-running services avoid battery nodes, batch work does not care
    let mut phone = node("a-phone", "z1");
    phone.power = PowerSource::Battery;
    phone.battery_percent = 40;
    let mut s = snap(&[phone.clone(), node("b-server", "z1")]);
    let svc = WorkloadRequest {
        long_running: true,
        ..request("svc", 1, 100, 1)
    };
    assert_eq!(
        placed_on(&s.place(&svc, 0, false).expect("place")[0]),
        "b-server"
    );
    let mut s = snap(&[phone, node("b-server", "z1")]);
    assert_eq!(
        placed_on(
            &s.place(&request("batch", 1, 100, 1), 0, false)
                .expect("place")[0]
        ),
        "a-phone",
        "tie broken by node id"
    );
    // preferred affinity
    let mut labelled = node("z-labelled", "z1");
    labelled.labels.insert("tier".into(), "edge".into());
    let mut s = snap(&[node("a-plain", "z1"), labelled]);
    let pref = WorkloadRequest {
        preferred: vec![PreferredTerm {
            weight: 50,
            expression: MatchExpression {
                key: "tier".into(),
                operator: Operator::In,
                values: vec!["edge".into()],
            },
        }],
        ..request("w", 1, 100, 1)
    };
    assert_eq!(
        placed_on(&s.place(&pref, 0, false).expect("place")[0]),
        "z-labelled"
    );
    // PreferNoSchedule
    let mut soft = node("a-soft", "z1");
    soft.taints.push(Taint {
        key: "spot".into(),
        value: String::new(),
        effect: TaintEffect::PreferNoSchedule,
        added_at_ms: 0,
    });
    let mut s = snap(&[soft, node("b-clean", "z1")]);
    assert_eq!(
        placed_on(&s.place(&request("w", 1, 100, 1), 0, false).expect("place")[0]),
        "b-clean"
    );
}

#[test]
fn explanation_lists_top_candidates_with_factors() {
    let mut s = snap(&[node("a", "z1"), node("b", "z1"), node("c", "z1")]);
    let d = s.place(&request("w", 1, 100, 1), 0, true).expect("place");
    let Decision::Placed(p) = &d[0] else {
        panic!("unplaced")
    };
    assert_eq!(p.candidates.len(), 3);
    assert_eq!(p.candidates[0].node, p.node);
    assert!(p.candidates.windows(2).all(|w| w[0].total >= w[1].total));
    assert!(
        p.candidates[0].to_string().contains("reliability 0.90"),
        "{}",
        p.candidates[0]
    );
}

#[test]
fn anti_affinity_by_node_and_zone() {
    let nodes = [node("a1", "za"), node("a2", "za"), node("b1", "zb")];
    let mut s = snap(&nodes);
    let d = s
        .place(
            &WorkloadRequest {
                anti_affinity: AntiAffinity::Node,
                strategy: Strategy::Binpack,
                ..request("w", 4, 100, 1)
            },
            0,
            false,
        )
        .expect("place");
    assert_eq!(placed_count(&d), 3);
    assert_eq!(
        unplaced_reasons(&d[3]),
        [(FilterReason::AntiAffinityNode, 3)]
    );
    let mut s = snap(&nodes);
    let d = s
        .place(
            &WorkloadRequest {
                anti_affinity: AntiAffinity::Zone,
                ..request("w", 3, 100, 1)
            },
            0,
            false,
        )
        .expect("place");
    assert_eq!(placed_count(&d), 2);
    assert_eq!(
        unplaced_reasons(&d[2]),
        [(FilterReason::AntiAffinityZone, 3)]
    );
}

#[test]
fn preemption_evicts_lowest_priority_fewest_victims() {
    let mut a = node("a", "z1");
    let low = |id: &str, prio, cpu| RunningReplica {
        id: id.into(),
        workload: "batch".into(),
        priority: prio,
        requests: res(cpu, 1),
        host_ports: Vec::new(),
    };
    a.replicas = vec![
        low("a-big", 0, 3000),
        low("a-small1", 0, 500),
        low("a-small2", 0, 500),
    ];
    let mut b = node("b", "z1");
    b.replicas = vec![low("b1", 5, 2000), low("b2", 5, 2000)];
    let mut c = node("c", "z1");
    c.replicas = vec![low("c-vip", 95, 4000)];
    let mut s = snap(&[a, b, c]);
    let d = s
        .place(
            &WorkloadRequest {
                priority: 100,
                ..request("urgent", 1, 2500, 1)
            },
            0,
            false,
        )
        .expect("place");
    let Decision::Placed(p) = &d[0] else {
        panic!("not placed: {d:?}")
    };
    assert_eq!(
        p.node, "a",
        "one victim on a beats two on b; c's replica is within 10 of 100"
    );
    assert_eq!(p.preempted, ["a-big"]);
    assert_eq!(s.reserved("a").expect("a").cpu_millis, 500 + 500 + 2500);
    // Equal priority cannot preempt.
    let mut s = snap(&[{
        let mut n = node("n", "z1");
        n.replicas = vec![low("peer", 95, 4000)];
        n
    }]);
    let d = s
        .place(
            &WorkloadRequest {
                priority: 100,
                ..request("urgent", 1, 1000, 1)
            },
            0,
            false,
        )
        .expect("place");
    assert_eq!(
        unplaced_reasons(&d[0]),
        [(FilterReason::InsufficientCpu, 1)]
    );
}

#[test]
fn bad_input_is_refused_with_the_field() {
    let mut n = node("a", "z1");
    n.reliability = 1.5;
    let err = ClusterSnapshot::new(&[n], SchedulerWeights::default()).expect_err("bad reliability");
    assert!(
        err.to_string()
            .contains("(a).reliability: 1.5 is outside 0..=1"),
        "{err}"
    );
    let err = ClusterSnapshot::new(
        &[node("a", "z1"), node("a", "z2")],
        SchedulerWeights::default(),
    )
    .expect_err("dup");
    assert!(
        err.to_string().contains("\"a\" appears more than once"),
        "{err}"
    );
    let w = SchedulerWeights {
        cost: 0.5,
        ..SchedulerWeights::default()
    };
    assert!(ClusterSnapshot::new(&[], w).is_err());
    let mut s = snap(&[node("a", "z1")]);
    let bad = WorkloadRequest {
        preferred: vec![PreferredTerm {
            weight: 0,
            expression: MatchExpression {
                key: "k".into(),
                operator: Operator::Exists,
                values: vec![],
            },
        }],
        ..request("w", 1, 1, 0)
    };
    let err = s.place(&bad, 0, false).expect_err("weight 0");
    assert!(
        err.to_string()
            .contains("preferred.weight: 0 is outside 1..=100"),
        "{err}"
    );
}

/// A replica of `workload` holding `ports` on its node.
fn holder(id: &str, workload: &str, priority: i32, ports: &[(u16, Protocol)]) -> RunningReplica {
    RunningReplica {
        id: id.into(),
        workload: workload.into(),
        priority,
        requests: res(100, 0),
        host_ports: ports.to_vec(),
    }
}

fn with_host_ports(mut r: WorkloadRequest, ports: &[(u16, Protocol)]) -> WorkloadRequest {
    r.host_ports = ports.to_vec();
    r
}

#[test]
fn a_node_where_the_host_port_is_taken_is_filtered_with_the_holder_named() {
    let tcp = (8080, Protocol::TCP);
    let mut a = node("a", "z1");
    a.replicas.push(holder("web-1", "default/web", 0, &[tcp]));
    let req = with_host_ports(request("default/api", 1, 100, 1), &[tcp]);
    let mut s = snap(&[a.clone(), node("b", "z1")]);
    assert_eq!(placed_on(&s.place(&req, 0, false).expect("place")[0]), "b");

    let mut s = snap(std::slice::from_ref(&a));
    let d = s.place(&req, 0, false).expect("place");
    assert_eq!(unplaced_reasons(&d[0]), [(FilterReason::HostPort, 1)]);
    let Decision::Unplaced(u) = &d[0] else {
        panic!("placed")
    };
    assert_eq!(
        u.to_string(),
        "1 node: host port taken: 8080/TCP (by default/web)"
    );
    let verdicts = snap(&[a]).evaluate(&req, 0).expect("evaluate");
    assert_eq!(
        verdicts[0].1,
        Err(Filtered {
            reason: FilterReason::HostPort,
            detail: "host port 8080/TCP is taken by default/web".into()
        })
    );
    assert_eq!(
        verdicts[0]
            .1
            .as_ref()
            .map(|_| ())
            .map_err(ToString::to_string),
        Err("host port 8080/TCP is taken by default/web".to_owned())
    );
}

#[test]
fn another_port_or_protocol_does_not_conflict() {
    let mut a = node("a", "z1");
    a.replicas
        .push(holder("web-1", "default/web", 0, &[(8080, Protocol::TCP)]));
    for ports in [[(8080, Protocol::UDP)], [(8081, Protocol::TCP)]] {
        let req = with_host_ports(request("default/api", 1, 100, 1), &ports);
        let mut s = snap(std::slice::from_ref(&a));
        assert_eq!(
            placed_on(&s.place(&req, 0, false).expect("place")[0]),
            "a",
            "{ports:?}"
        );
    }
}

#[test]
fn replicas_publishing_a_host_port_never_share_a_node() {
    let req = WorkloadRequest {
        strategy: Strategy::Binpack,
        ..with_host_ports(request("default/web", 3, 100, 1), &[(80, Protocol::TCP)])
    };
    let mut s = snap(&[node("a", "z1"), node("b", "z1")]);
    let d = s.place(&req, 0, false).expect("place");
    assert_eq!(placed_count(&d), 2);
    assert_ne!(placed_on(&d[0]), placed_on(&d[1]));
    assert_eq!(unplaced_reasons(&d[2]), [(FilterReason::HostPort, 2)]);
    // Its own replicas already running count too.
    let mut a = node("a", "z1");
    a.replicas
        .push(holder("web-0", "default/web", 0, &[(80, Protocol::TCP)]));
    let mut s = snap(&[a, node("b", "z1")]);
    let one = WorkloadRequest { replicas: 1, ..req };
    assert_eq!(placed_on(&s.place(&one, 0, false).expect("place")[0]), "b");
}

#[test]
fn preemption_does_not_free_a_host_port() {
    let mut a = node("a", "z1");
    a.replicas.push(holder(
        "batch-1",
        "default/batch",
        0,
        &[(80, Protocol::TCP)],
    ));
    let req = WorkloadRequest {
        priority: 100,
        ..with_host_ports(request("default/web", 1, 100, 1), &[(80, Protocol::TCP)])
    };
    let mut s = snap(&[a]);
    let d = s.place(&req, 0, false).expect("place");
    assert_eq!(unplaced_reasons(&d[0]), [(FilterReason::HostPort, 1)]);
}

#[test]
fn bandwidth_is_placed_against_capacity_and_a_node_reporting_none_refuses_only_requests_for_it() {
    const MBPS: u64 = 1_000_000;
    // The node reports no bandwidth (as agents did before they measured it).
    let silent = node("silent", "z1");
    assert_eq!(silent.capacity.bandwidth_bps, 0);
    let none = request("default/web", 1, 100, 1);
    let mut s = snap(std::slice::from_ref(&silent));
    assert_eq!(
        placed_on(&s.place(&none, 0, false).expect("place")[0]),
        "silent"
    );
    let mut wants = request("default/stream", 2, 100, 1);
    wants.requests.bandwidth_bps = 600 * MBPS;
    let mut s = snap(std::slice::from_ref(&silent));
    let d = s.place(&wants, 0, false).expect("place");
    assert_eq!(
        unplaced_reasons(&d[0]),
        [(FilterReason::InsufficientBandwidth, 1)]
    );
    // A node reporting 1 Gbit/s takes one 600 Mbit/s replica, not two.
    let mut gigabit = node("gigabit", "z1");
    gigabit.capacity.bandwidth_bps = 1000 * MBPS;
    let mut s = snap(&[silent, gigabit]);
    let d = s.place(&wants, 0, false).expect("place");
    assert_eq!(placed_on(&d[0]), "gigabit");
    assert_eq!(
        unplaced_reasons(&d[1]),
        [(FilterReason::InsufficientBandwidth, 2)]
    );
    assert_eq!(
        s.reserved("gigabit").expect("node").bandwidth_bps,
        600 * MBPS
    );
}

#[test]
fn storage_is_placed_against_capacity_like_cpu_and_memory() {
    let mut wants = request("default/db", 2, 100, 1);
    wants.requests.storage_bytes = 60 * GIB;
    let mut disk = node("disk", "z1");
    disk.capacity.storage_bytes = 100 * GIB;
    let mut s = snap(&[disk, node("diskless", "z1")]);
    let d = s.place(&wants, 0, false).expect("place");
    assert_eq!(placed_on(&d[0]), "disk");
    assert_eq!(
        unplaced_reasons(&d[1]),
        [(FilterReason::InsufficientStorage, 2)]
    );
}
