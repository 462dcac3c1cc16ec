//! The one conversion per closed set between its wire enum and its domain
//! type, and the rules for reading one off the wire: `*_UNSPECIFIED` and
//! numbers this release does not know are refused naming the field; while a
//! field has a deprecated string twin (see `common.proto`), an unset enum
//! falls back to the twin's name.

use cloudless_types::{self as t, ClosedSet};

use crate::v1;

/// A wire enum and the domain type it stands for.
pub trait WireEnum: Copy + TryFrom<i32> + Into<i32> + 'static {
    /// The domain type.
    type Domain: ClosedSet;
    /// Every wire value but UNSPECIFIED with its domain value.
    const PAIRS: &'static [(Self, Self::Domain)];

    /// The protobuf name of the value (`RESTART_POLICY_ALWAYS`).
    fn proto_name(self) -> &'static str;

    /// The domain value (None for UNSPECIFIED).
    fn to_domain(self) -> Option<Self::Domain> {
        let n: i32 = self.into();
        Self::PAIRS
            .iter()
            .find(|(w, _)| Into::<i32>::into(*w) == n)
            .map(|(_, d)| *d)
    }

    /// The wire value.
    fn from_domain(d: Self::Domain) -> Self {
        Self::PAIRS
            .iter()
            .find(|(_, v)| *v == d)
            .map(|(w, _)| *w)
            .expect("every domain value has a wire value (checked by test)")
    }

    /// The wire value as the `i32` a message field holds.
    fn wire(d: Self::Domain) -> i32 {
        Self::from_domain(d).into()
    }
}

macro_rules! wire_enum {
    ($wire:ident => $dom:ty { $($w:ident => $d:ident),+ $(,)? }) => {
        impl WireEnum for v1::$wire {
            type Domain = $dom;
            const PAIRS: &'static [(Self, $dom)] = &[$((v1::$wire::$w, <$dom>::$d)),+];
            fn proto_name(self) -> &'static str {
                self.as_str_name()
            }
        }
    };
}

wire_enum!(ReplicaState => t::ReplicaState {
    Pending => Pending, Running => Running, Ready => Ready,
    Failed => Failed, Succeeded => Succeeded,
});
wire_enum!(NodePhase => t::NodePhase {
    Pending => Pending, Ready => Ready, Suspect => Suspect, Down => Down,
});
wire_enum!(PowerSource => t::PowerSource { Mains => Mains, Battery => Battery });
wire_enum!(NodeCondition => t::NodeCondition {
    MemoryPressure => MemoryPressure, DiskPressure => DiskPressure,
    PidPressure => PIDPressure, NetworkUnavailable => NetworkUnavailable,
});
wire_enum!(RestartPolicy => t::RestartPolicy {
    Always => Always, OnFailure => OnFailure, Never => Never,
});
wire_enum!(Protocol => t::Protocol { Tcp => TCP, Udp => UDP });
wire_enum!(SeccompProfileType => t::SeccompType {
    RuntimeDefault => RuntimeDefault, Strict => Strict,
    Localhost => Localhost, Unconfined => Unconfined,
});
wire_enum!(StorageMedium => t::StorageMedium { Disk => Disk, Memory => Memory });
wire_enum!(ReconnectPolicy => t::ReconnectPolicy {
    KeepReplacement => KeepReplacement, KeepOriginal => KeepOriginal, BestScore => BestScore,
});
wire_enum!(AntiAffinity => t::AntiAffinity { None => None, Node => Node, Zone => Zone });
wire_enum!(PlacementStrategy => t::PlacementStrategy {
    Auto => Auto, Spread => Spread, Binpack => Binpack,
});
wire_enum!(RolloutStrategy => t::RolloutStrategy {
    RollingUpdate => RollingUpdate, Recreate => Recreate, BlueGreen => BlueGreen,
});
wire_enum!(LogStream => t::LogStream { Stdout => Stdout, Stderr => Stderr, Error => Error });
wire_enum!(ObjectKind => t::ObjectKind { Workload => Workload, Node => Node });
wire_enum!(LoadBalancing => t::LoadBalancing {
    RoundRobin => RoundRobin, LeastConnections => LeastConnections,
    Locality => Locality, Weighted => Weighted,
});

fn wire_names<W: WireEnum>() -> String {
    W::PAIRS
        .iter()
        .map(|(w, _)| w.proto_name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A required enum field: the enum, else (while it exists) the deprecated
/// string twin by name; UNSPECIFIED with no twin, an unknown number or an
/// unknown name is refused under `field`.
pub fn required<W: WireEnum>(
    raw: i32,
    legacy: &str,
    field: &str,
) -> Result<W::Domain, t::FieldError> {
    let refuse = |problem: String| t::FieldError {
        field: field.to_owned(),
        problem,
    };
    match W::try_from(raw) {
        Ok(w) => match w.to_domain() {
            Some(d) => Ok(d),
            None if !legacy.is_empty() => W::Domain::from_name(legacy).ok_or_else(|| {
                refuse(format!(
                    "{:?} is not one of {}",
                    legacy.chars().take(32).collect::<String>(),
                    W::Domain::names()
                ))
            }),
            None => Err(refuse(format!(
                "{} is not allowed: give one of {}",
                w.proto_name(),
                wire_names::<W>()
            ))),
        },
        Err(_) => Err(refuse(format!(
            "{raw} is not a value of this release (one of {})",
            wire_names::<W>()
        ))),
    }
}

/// An optional enum field with a default: unset (and an empty twin) gives
/// `default`; set, it must be a value other than UNSPECIFIED. A refusal is
/// recorded in `errs` under `field` and gives `default`.
pub fn defaulted<W: WireEnum>(
    raw: Option<i32>,
    legacy: &str,
    field: &str,
    default: W::Domain,
    errs: &mut t::ValidationErrors,
) -> W::Domain {
    let got = match raw {
        Some(raw) => {
            let r = required::<W>(raw, "", field);
            if raw == 0 {
                // Say how to get the default.
                r.map_err(|mut e| {
                    e.problem = format!(
                        "{} (leave it unset for {})",
                        e.problem,
                        W::from_domain(default).proto_name()
                    );
                    e
                })
            } else {
                r
            }
        }
        None if legacy.is_empty() => Ok(default),
        None => required::<W>(0, legacy, field),
    };
    got.unwrap_or_else(|e| {
        errs.0.push(e);
        default
    })
}

/// A repeated enum field (its twin used when it is empty).
pub fn required_list<W: WireEnum>(
    raw: &[i32],
    legacy: &[String],
    field: &str,
) -> Result<Vec<W::Domain>, t::FieldError> {
    if raw.is_empty() {
        legacy
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if s.is_empty() {
                    Err(t::FieldError {
                        field: format!("{field}[{i}]"),
                        problem: "is empty".into(),
                    })
                } else {
                    required::<W>(0, s, &format!("{field}[{i}]"))
                }
            })
            .collect()
    } else {
        raw.iter()
            .enumerate()
            .map(|(i, r)| required::<W>(*r, "", &format!("{field}[{i}]")))
            .collect()
    }
}

/// How an enum field reads for people: its value's name (`Ready`), else
/// the string twin a server of the previous release sent, else `-`.
pub fn shown<W: WireEnum>(raw: i32, legacy: &str) -> String {
    match W::try_from(raw).ok().and_then(WireEnum::to_domain) {
        Some(d) => d.name().to_owned(),
        None if !legacy.is_empty() => legacy.to_owned(),
        None => "-".to_owned(),
    }
}

impl v1::Replica {
    /// Its state for people: `Unknown` while its node is Down, else the
    /// state's name.
    pub fn state_name(&self) -> String {
        if self.state() == v1::ReplicaState::Unknown {
            return "Unknown".to_owned();
        }
        shown::<v1::ReplicaState>(self.state, &self.legacy_state)
    }
}

impl v1::ReplicaStatus {
    /// Its state's name (`Ready`), else its string twin, else `-`.
    pub fn state_name(&self) -> String {
        shown::<v1::ReplicaState>(self.state, &self.legacy_state)
    }
}

impl v1::CoordinatorStatus {
    /// Its Raft state for people (`Leader`, `Follower`, ...).
    pub fn state_name(&self) -> String {
        match self.state() {
            v1::RaftServerState::Leader => "Leader",
            v1::RaftServerState::Follower => "Follower",
            v1::RaftServerState::Candidate => "Candidate",
            v1::RaftServerState::Learner => "Learner",
            v1::RaftServerState::Shutdown => "Shutdown",
            v1::RaftServerState::Unspecified if !self.legacy_state.is_empty() => {
                return self.legacy_state.clone()
            }
            v1::RaftServerState::Unspecified => "-",
        }
        .to_owned()
    }
}

/// The enum and its deprecated string twin, for a message being written.
pub fn both<W: WireEnum>(d: W::Domain) -> (i32, String) {
    (W::wire(d), d.name().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check<W: WireEnum + std::fmt::Debug>()
    where
        W::Domain: std::fmt::Debug,
    {
        // Every domain value has one wire value and comes back from it.
        for (_, d) in W::Domain::NAMES {
            let w = W::from_domain(*d);
            assert_eq!(w.to_domain(), Some(*d));
            assert_eq!(required::<W>(w.into(), "", "f"), Ok(*d));
            // The twin alone reads the same.
            assert_eq!(required::<W>(0, d.name(), "f"), Ok(*d));
            // The enum wins over a stale twin.
            assert_eq!(required::<W>(w.into(), "nonsense", "f"), Ok(*d));
        }
        assert_eq!(
            W::PAIRS.len(),
            W::Domain::NAMES.len(),
            "{}",
            wire_names::<W>()
        );
        // Each wire value is the domain value of the same name (a swapped
        // pair would still round-trip, so check the names).
        for (w, d) in W::PAIRS {
            assert!(
                w.proto_name()
                    .replace('_', "")
                    .ends_with(&d.name().to_uppercase()),
                "{} is paired with {}",
                w.proto_name(),
                d.name()
            );
        }
        // UNSPECIFIED is refused by field.
        let e = required::<W>(0, "", "spec.x").expect_err("refused");
        assert_eq!(e.field, "spec.x");
        assert!(
            e.problem.ends_with(&format!(
                "is not allowed: give one of {}",
                wire_names::<W>()
            )),
            "{}",
            e.problem
        );
    }

    #[test]
    fn every_closed_set_round_trips_and_unspecified_is_refused_by_field() {
        check::<v1::ReplicaState>();
        check::<v1::NodePhase>();
        check::<v1::PowerSource>();
        check::<v1::NodeCondition>();
        check::<v1::RestartPolicy>();
        check::<v1::Protocol>();
        check::<v1::SeccompProfileType>();
        check::<v1::StorageMedium>();
        check::<v1::ReconnectPolicy>();
        check::<v1::AntiAffinity>();
        check::<v1::PlacementStrategy>();
        check::<v1::RolloutStrategy>();
        check::<v1::LogStream>();
        check::<v1::ObjectKind>();
        check::<v1::LoadBalancing>();
        // UNKNOWN is what coordinators say about a Down node's replica; it
        // is no state an agent may report.
        let e =
            required::<v1::ReplicaState>(v1::ReplicaState::Unknown.into(), "", "replicas[0].state")
                .expect_err("refused");
        assert_eq!(e.field, "replicas[0].state");
    }

    #[test]
    fn fields_read_for_people_by_name_from_either_release() {
        let mut r = v1::Replica {
            state: v1::ReplicaState::Ready.into(),
            ..Default::default()
        };
        assert_eq!(r.state_name(), "Ready");
        r.state = v1::ReplicaState::Unknown.into();
        assert_eq!(r.state_name(), "Unknown");
        // A coordinator of the previous release sent the name only.
        r.state = 0;
        r.legacy_state = "Failed".into();
        assert_eq!(r.state_name(), "Failed");
        r.legacy_state.clear();
        assert_eq!(r.state_name(), "-");
        assert_eq!(
            shown::<v1::PowerSource>(v1::PowerSource::Battery.into(), ""),
            "battery"
        );
        let c = v1::CoordinatorStatus {
            state: v1::RaftServerState::Leader.into(),
            ..Default::default()
        };
        assert_eq!(c.state_name(), "Leader");
    }

    #[test]
    fn defaulted_fields_take_their_default_only_when_unset() {
        let mut errs = t::ValidationErrors::default();
        let f = |raw, legacy: &str, errs: &mut t::ValidationErrors| {
            defaulted::<v1::RestartPolicy>(
                raw,
                legacy,
                "spec.restartPolicy",
                t::RestartPolicy::Always,
                errs,
            )
        };
        assert_eq!(f(None, "", &mut errs), t::RestartPolicy::Always);
        assert_eq!(f(None, "Never", &mut errs), t::RestartPolicy::Never);
        assert_eq!(
            f(Some(v1::RestartPolicy::OnFailure.into()), "", &mut errs),
            t::RestartPolicy::OnFailure
        );
        assert!(errs.0.is_empty(), "{errs}");
        assert_eq!(f(Some(0), "", &mut errs), t::RestartPolicy::Always);
        assert_eq!(f(None, "Sometimes", &mut errs), t::RestartPolicy::Always);
        assert_eq!(f(Some(42), "", &mut errs), t::RestartPolicy::Always);
        let problems: Vec<String> = errs
            .0
            .iter()
            .map(|e| format!("{}: {}", e.field, e.problem))
            .collect();
        assert_eq!(
            problems,
            [
                "spec.restartPolicy: RESTART_POLICY_UNSPECIFIED is not allowed: give one of RESTART_POLICY_ALWAYS, RESTART_POLICY_ON_FAILURE, RESTART_POLICY_NEVER (leave it unset for RESTART_POLICY_ALWAYS)",
                "spec.restartPolicy: \"Sometimes\" is not one of Always, OnFailure, Never",
                "spec.restartPolicy: 42 is not a value of this release (one of RESTART_POLICY_ALWAYS, RESTART_POLICY_ON_FAILURE, RESTART_POLICY_NEVER)",
            ]
        );
    }

    proptest! {
        /// Any number in a field and any twin is either read as the value
        /// it names or refused by field; never a panic, never another value.
        #[test]
        fn any_wire_input_is_read_exactly_or_refused(raw in -3i32..40, legacy in "[A-Za-z]{0,12}") {
            match required::<v1::RolloutStrategy>(raw, &legacy, "spec.rollout.strategy") {
                Ok(d) => {
                    let by_enum = v1::RolloutStrategy::try_from(raw).ok().and_then(|w| w.to_domain());
                    prop_assert_eq!(Some(d), by_enum.or_else(|| t::RolloutStrategy::from_name(&legacy)));
                }
                Err(e) => prop_assert_eq!(e.field, "spec.rollout.strategy"),
            }
        }
    }
}
