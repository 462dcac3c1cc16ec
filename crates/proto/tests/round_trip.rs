//! Every wire message survives a round trip: a domain value converted to
//! its wire message, encoded, decoded and converted back is the same value
//! (workload specs with every closed set, replicas, cluster configurations),
//! and no field of the spec is read back differently.

use std::collections::BTreeMap;

use cloudless_proto::{enums, v1, WireEnum};
use cloudless_types::{self as t, ClosedSet};
use proptest::prelude::*;
use prost::Message;

fn one_of<T: ClosedSet + std::fmt::Debug>() -> impl Strategy<Value = T> {
    proptest::sample::select(T::NAMES.iter().map(|(_, v)| *v).collect::<Vec<_>>())
}

fn word() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,11}"
}

fn some_word() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(word())
}

fn resources() -> impl Strategy<Value = t::Resources> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(cpu_millis, memory_bytes, storage_bytes, bandwidth_bps, pids)| t::Resources {
                cpu_millis,
                memory_bytes,
                storage_bytes,
                bandwidth_bps,
                pids,
            },
        )
}

fn probe() -> impl Strategy<Value = t::ProbeSpec> {
    (
        prop_oneof![
            proptest::collection::vec(word(), 1..3).prop_map(|e| (Some(e), None, None)),
            (word(), 1u16..).prop_map(|(p, port)| (
                None,
                Some(t::HttpGet {
                    path: format!("/{p}"),
                    port
                }),
                None
            )),
            (1u16..).prop_map(|port| (None, None, Some(t::TcpSocket { port }))),
        ],
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        ),
    )
        .prop_map(
            |((exec, http_get, tcp_socket), (a, b, c, d, e))| t::ProbeSpec {
                exec,
                http_get,
                tcp_socket,
                initial_delay_seconds: a,
                period_seconds: b,
                timeout_seconds: c,
                failure_threshold: d,
                success_threshold: e,
            },
        )
}

fn volume() -> impl Strategy<Value = t::Volume> {
    (
        word(),
        prop_oneof![
            (one_of::<t::StorageMedium>(), any::<u64>()).prop_map(|(medium, size_limit_bytes)| (
                Some(t::EmptyDir {
                    medium,
                    size_limit_bytes
                }),
                None,
                None
            )),
            word().prop_map(|p| (
                None,
                Some(t::HostPath {
                    path: format!("/{p}")
                }),
                None
            )),
            (word(), proptest::collection::vec((word(), word()), 0..3)).prop_map(|(n, items)| (
                None,
                None,
                Some(t::SecretVolume {
                    secret_name: n,
                    items: items
                        .into_iter()
                        .map(|(key, path)| t::KeyToPath { key, path })
                        .collect(),
                })
            )),
        ],
    )
        .prop_map(|(name, (empty_dir, host_path, secret))| t::Volume {
            name,
            empty_dir,
            host_path,
            secret,
        })
}

fn egress() -> impl Strategy<Value = t::EgressPolicy> {
    proptest::collection::vec(
        (
            "[0-9a-f:./]{0,20}",
            proptest::collection::vec(any::<u16>(), 0..3),
        )
            .prop_map(|(cidr, ports)| t::EgressRule { cidr, ports }),
        0..3,
    )
    .prop_map(|allow| t::EgressPolicy { allow })
}

fn service() -> impl Strategy<Value = t::ServiceSpec> {
    (
        one_of::<t::LoadBalancing>(),
        proptest::collection::vec(prop_oneof![word(), Just("*".to_owned())], 0..3),
        proptest::collection::btree_map(word(), any::<u32>(), 0..3),
    )
        .prop_map(
            |(load_balancing, allow_from, zone_weights)| t::ServiceSpec {
                load_balancing,
                allow_from,
                zone_weights,
            },
        )
}

fn spec() -> impl Strategy<Value = t::WorkloadSpec> {
    let head = (
        word(),
        proptest::collection::vec(word(), 0..3),
        proptest::collection::vec(word(), 0..3),
        proptest::collection::btree_map(word(), word(), 0..3),
        any::<u32>(),
        resources(),
        resources(),
        proptest::collection::btree_map(word(), word(), 0..3),
        any::<i32>(),
    );
    let placement = (
        proptest::collection::vec(word(), 0..3),
        proptest::collection::vec(word(), 0..2),
        proptest::collection::btree_map(word(), word(), 0..2),
        one_of::<t::AntiAffinity>(),
        one_of::<t::PlacementStrategy>(),
    )
        .prop_map(
            |(zones, regions, node_selector, anti_affinity, strategy)| t::Placement {
                zones,
                regions,
                node_selector,
                anti_affinity,
                strategy,
            },
        );
    let rollout = (
        one_of::<t::RolloutStrategy>(),
        any::<u32>(),
        any::<u32>(),
        1u32..,
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |(strategy, max_surge, max_unavailable, progress_deadline_seconds, min_available)| {
                t::Rollout {
                    strategy,
                    max_surge,
                    max_unavailable,
                    progress_deadline_seconds,
                    min_available,
                }
            },
        );
    let security = (
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(word(), 0..2),
        proptest::collection::vec(word(), 0..2),
        one_of::<t::SeccompType>(),
        some_word(),
        some_word(),
        some_word(),
        any::<bool>(),
    )
        .prop_map(
            |(u, g, nr, ro, add, drop, kind, lp, aa, se, hn)| t::SecurityContextSpec {
                run_as_user: u,
                run_as_group: g,
                run_as_non_root: nr,
                read_only_root_filesystem: ro,
                capabilities: t::Capabilities { add, drop },
                seccomp_profile: t::SeccompProfileSpec {
                    kind,
                    localhost_profile: lp,
                },
                app_armor_profile: aa,
                se_linux_label: se,
                host_network: hn,
            },
        );
    let containers = (
        proptest::collection::vec(
            (
                word(),
                any::<u16>(),
                one_of::<t::Protocol>(),
                any::<u16>(),
                any::<u16>(),
            )
                .prop_map(
                    |(name, container_port, protocol, host_port, ingress_port)| t::ContainerPort {
                        name,
                        container_port,
                        protocol,
                        host_port,
                        ingress_port,
                    },
                ),
            0..3,
        ),
        proptest::collection::vec(volume(), 0..3),
        proptest::collection::vec(
            (word(), word(), any::<bool>()).prop_map(|(name, m, read_only)| t::VolumeMount {
                name,
                mount_path: format!("/{m}"),
                read_only,
            }),
            0..2,
        ),
        (
            any::<u32>(),
            any::<bool>(),
            proptest::option::of(any::<u32>()),
            one_of::<t::ReconnectPolicy>(),
        )
            .prop_map(
                |(lost_after_seconds, replace, stop_on_client_after_seconds, reconcile)| {
                    t::Disconnect {
                        lost_after_seconds,
                        replace,
                        stop_on_client_after_seconds,
                        reconcile,
                    }
                },
            ),
        proptest::collection::vec(
            (word(), word(), word()).prop_map(|(name, s, key)| t::SecretEnv {
                name,
                secret_key_ref: t::SecretKeyRef { name: s, key },
            }),
            0..2,
        ),
        proptest::collection::vec(
            (word(), any::<u16>(), any::<u16>()).prop_map(|(workload, port, local_port)| {
                t::Upstream {
                    workload,
                    port,
                    local_port,
                }
            }),
            0..2,
        ),
    );
    (
        head,
        placement,
        one_of::<t::RestartPolicy>(),
        rollout,
        proptest::option::of(probe()),
        proptest::option::of(probe()),
        security,
        containers,
        (proptest::option::of(egress()), service()),
    )
        .prop_map(
            |(
                (image, command, args, env, replicas, requests, limits, labels, priority),
                placement,
                restart_policy,
                rollout,
                readiness_probe,
                liveness_probe,
                security_context,
                (ports, volumes, volume_mounts, disconnect, secret_env, upstreams),
                (egress, service),
            )| t::WorkloadSpec {
                image,
                command,
                args,
                env,
                replicas,
                requests,
                limits,
                labels,
                priority,
                placement,
                restart_policy,
                rollout,
                readiness_probe,
                liveness_probe,
                ports,
                security_context,
                volumes,
                volume_mounts,
                disconnect,
                secret_env,
                upstreams,
                egress,
                service,
            },
        )
}

fn through_the_wire<M: Message + Default>(m: &M) -> M {
    M::decode(m.encode_to_vec().as_slice()).expect("decodes")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_workload_spec_survives_the_wire_with_every_closed_set(s in spec()) {
        let wire: v1::WorkloadSpec = s.clone().into();
        let back_wire = through_the_wire(&wire);
        prop_assert_eq!(&back_wire, &wire);
        let mut errs = t::ValidationErrors::default();
        let back = cloudless_proto::spec_from_wire(back_wire.clone(), "spec", &mut errs);
        prop_assert!(errs.0.is_empty(), "{}", errs);
        prop_assert_eq!(&back, &s);
        // A receiver of the previous release reads the string twins only:
        // they say the same.
        let mut legacy = back_wire;
        legacy.restart_policy = None;
        if let Some(p) = legacy.placement.as_mut() {
            p.anti_affinity = None;
            p.strategy = None;
        }
        if let Some(r) = legacy.rollout.as_mut() {
            r.strategy = None;
        }
        for p in &mut legacy.ports {
            p.protocol = None;
        }
        if let Some(c) = legacy.security_context.as_mut() {
            c.seccomp_type = None;
        }
        for v in &mut legacy.volumes {
            if let Some(e) = v.empty_dir.as_mut() {
                e.medium = None;
            }
        }
        if let Some(d) = legacy.disconnect.as_mut() {
            d.reconcile = None;
        }
        let from_legacy = cloudless_proto::spec_from_wire(legacy, "spec", &mut errs);
        prop_assert!(errs.0.is_empty(), "{}", errs);
        prop_assert_eq!(&from_legacy, &s);
    }

    #[test]
    fn a_replica_record_reads_back_with_its_state(
        state in one_of::<t::ReplicaState>(),
        disconnected in any::<bool>(),
        exit_code in proptest::option::of(any::<i32>()),
        restarts in any::<u32>(),
        address in "([0-9]{1,3}\\.){3}[0-9]{1,3}|",
    ) {
        let r = t::ReplicaRecord {
            id: "r1".into(),
            namespace: "prod".into(),
            workload: "web".into(),
            template: 3,
            spec: t::WorkloadSpec::default(),
            node_id: "n1".into(),
            state,
            exit_code,
            restarts,
            message: "m".into(),
            created_at_ms: 1,
            updated_at_ms: 2,
            ready_at_ms: 0,
            disconnected_at_ms: if disconnected { 5 } else { 0 },
            score: 0.0,
            address: address.clone(),
            trace: String::new(),
        };
        let wire = through_the_wire(&v1::Replica::from(r));
        prop_assert_eq!(&wire.address, &address);
        let want = if disconnected { "Unknown" } else { state.name() };
        prop_assert_eq!(wire.state_name(), want);
        prop_assert_eq!(wire.legacy_state.as_str(), want);
        prop_assert_eq!((wire.exit_code, wire.restarts), (exit_code, restarts));
        if !disconnected {
            prop_assert_eq!(enums::required::<v1::ReplicaState>(wire.state, "", "state"), Ok(state));
        }
    }

    #[test]
    fn a_cluster_configuration_survives_the_wire(
        name in word(),
        heartbeat in 100u64..60_000,
        labels in proptest::collection::btree_map(word(), word(), 0..3),
        retention in 1u32..3650,
        admin_lifetime in 3600u64..(30 * 86_400),
        grace in 0u64..(30 * 86_400),
        (second_octet, service_prefix, node_extra) in (0u8..=255, 12u8..=24, 1u8..=8),
        domain in "[a-z]{1,8}(\\.[a-z]{1,8}){0,2}",
        rules in proptest::collection::vec((any::<u8>(), proptest::collection::vec(1u16.., 0..3)), 0..3),
    ) {
        let default_egress = t::EgressPolicy {
            allow: rules
                .into_iter()
                .map(|(octet, ports)| t::EgressRule {
                    cidr: format!("{octet}.0.0.0/8"),
                    ports,
                })
                .collect(),
        };
        let network = t::NetworkConfig {
            cluster_cidr: format!("100.{second_octet}.0.0/16"),
            node_prefix_len: 16 + node_extra,
            cluster_domain: domain,
            service_cidr: format!("172.16.0.0/{service_prefix}"),
            default_egress,
        };
        let c = t::ClusterConfig {
            cluster_name: name,
            heartbeat_interval_ms: heartbeat,
            down_after_ms: heartbeat * 10,
            labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
            audit_retention_days: retention,
            admin_cert_lifetime_s: admin_lifetime,
            node_rejoin_grace_s: grace,
            network,
            ..t::ClusterConfig::default()
        };
        prop_assert_eq!(c.validate(), Ok(()));
        let wire = through_the_wire(&v1::ClusterConfig::from(c.clone()));
        prop_assert_eq!(cloudless_proto::cluster_config_from_wire(Some(wire)).expect("valid"), c);
    }

    /// Ports travel as u32: anything above 65535 is refused, naming the field.
    #[test]
    fn a_port_above_65535_on_the_wire_is_refused_by_field(port in 65_536u32..) {
        let mut wire: v1::WorkloadSpec = t::WorkloadSpec {
            image: "busybox".into(),
            ports: vec![t::ContainerPort {
                container_port: 8080,
                ..Default::default()
            }],
            egress: Some(t::EgressPolicy {
                allow: vec![t::EgressRule {
                    cidr: "0.0.0.0/0".into(),
                    ports: vec![443],
                }],
            }),
            ..Default::default()
        }
        .into();
        wire.ports[0].host_port = port;
        wire.ports[0].ingress_port = port;
        if let Some(e) = wire.egress.as_mut() {
            e.allow[0].ports.push(port);
        }
        let mut errs = t::ValidationErrors::default();
        cloudless_proto::spec_from_wire(wire, "spec", &mut errs);
        let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
        prop_assert_eq!(
            fields,
            [
                "spec.ports[0].hostPort",
                "spec.ports[0].ingressPort",
                "spec.egress.allow[0].ports[1]"
            ]
        );
    }

    /// An unset service section, or an unset policy in it, is the default;
    /// LOAD_BALANCING_UNSPECIFIED and unknown numbers are refused by field.
    #[test]
    fn a_service_policy_is_defaulted_when_unset_and_refused_when_unspecified(raw in -3i32..16) {
        let mut wire: v1::WorkloadSpec = t::WorkloadSpec {
            image: "busybox".into(),
            ..Default::default()
        }
        .into();
        wire.service = None;
        let mut errs = t::ValidationErrors::default();
        let back = cloudless_proto::spec_from_wire(wire.clone(), "spec", &mut errs);
        prop_assert!(errs.0.is_empty(), "{}", errs);
        prop_assert_eq!(back.service, t::ServiceSpec::default());
        wire.service = Some(v1::ServiceSpec {
            load_balancing: Some(raw),
            ..Default::default()
        });
        let back = cloudless_proto::spec_from_wire(wire, "spec", &mut errs);
        match v1::LoadBalancing::try_from(raw).ok().and_then(WireEnum::to_domain) {
            Some(d) => {
                prop_assert!(errs.0.is_empty(), "{}", errs);
                prop_assert_eq!(back.service.load_balancing, d);
            }
            None => {
                let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
                prop_assert_eq!(fields, ["spec.service.loadBalancing"]);
            }
        }
    }

    /// A stored workload's virtual IP travels as a string, empty for none.
    #[test]
    fn a_workload_vip_is_on_the_wire(octet in any::<u8>(), none in any::<bool>()) {
        let vip = (!none).then(|| format!("10.96.0.{octet}"));
        let w = t::Workload {
            namespace: "prod".into(),
            name: "web".into(),
            spec: t::WorkloadSpec::default(),
            generation: 1,
            created_at_ms: 1,
            updated_at_ms: 1,
            template: 1,
            revisions: Vec::new(),
            vip: vip.clone(),
        };
        let wire = through_the_wire(&v1::Workload::from(w));
        prop_assert_eq!(wire.vip, vip.unwrap_or_default());
    }

    /// Every value of every enum, on the wire as a number, reads back as
    /// itself; an unknown number is refused naming the field.
    #[test]
    fn enum_numbers_read_back_or_are_refused_by_name(raw in -5i32..64) {
        fn check<W: WireEnum>(raw: i32) -> Result<(), TestCaseError> {
            match enums::required::<W>(raw, "", "x.y") {
                Ok(d) => prop_assert_eq!(W::wire(d), raw),
                Err(e) => {
                    prop_assert_eq!(e.field.as_str(), "x.y");
                    prop_assert!(W::try_from(raw).ok().and_then(WireEnum::to_domain).is_none());
                }
            }
            Ok(())
        }
        check::<v1::ReplicaState>(raw)?;
        check::<v1::NodePhase>(raw)?;
        check::<v1::PowerSource>(raw)?;
        check::<v1::NodeCondition>(raw)?;
        check::<v1::RestartPolicy>(raw)?;
        check::<v1::Protocol>(raw)?;
        check::<v1::SeccompProfileType>(raw)?;
        check::<v1::StorageMedium>(raw)?;
        check::<v1::ReconnectPolicy>(raw)?;
        check::<v1::AntiAffinity>(raw)?;
        check::<v1::PlacementStrategy>(raw)?;
        check::<v1::RolloutStrategy>(raw)?;
        check::<v1::LogStream>(raw)?;
        check::<v1::ObjectKind>(raw)?;
        check::<v1::LoadBalancing>(raw)?;
    }
}
