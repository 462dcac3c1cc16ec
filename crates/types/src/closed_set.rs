//! Closed sets: enums whose every value has one name, the one manifests,
//! the CLI and the deprecated string fields of the wire use.
//!
//! The wire carries them as protobuf enums (`cloudless-proto` holds the one
//! conversion per enum); these names are for people and for the previous
//! release's string fields.

use serde::{Deserialize, Serialize};

/// An enum with a fixed set of named values.
pub trait ClosedSet: Copy + Eq + 'static {
    /// Every value with its name, in declaration order.
    const NAMES: &'static [(&'static str, Self)];

    /// The value's name.
    fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, v)| *v == self)
            .map_or("", |(n, _)| n)
    }

    /// The value with this exact name.
    fn from_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    /// The names, comma-separated, for error messages.
    fn names() -> String {
        Self::NAMES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Implements [`ClosedSet`] for an enum with its values' names.
#[macro_export]
macro_rules! closed_set {
    ($ty:ty { $($variant:ident = $name:literal),+ $(,)? }) => {
        impl $crate::ClosedSet for $ty {
            const NAMES: &'static [(&'static str, Self)] = &[$(($name, <$ty>::$variant)),+];
        }
    };
}

/// What powers a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PowerSource {
    /// Mains power (also what a device without a battery reports).
    #[default]
    Mains,
    /// A battery.
    Battery,
}

/// A condition a device reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NodeCondition {
    /// Little memory left.
    MemoryPressure,
    /// Little disk left.
    DiskPressure,
    /// Few process ids left.
    PIDPressure,
    /// No usable network.
    NetworkUnavailable,
}

/// Which output stream of a container a log line came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LogStream {
    /// Standard output.
    #[default]
    Stdout,
    /// Standard error.
    Stderr,
    /// Not container output: why a replica's logs cannot be read.
    Error,
}

/// The kind of object an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ObjectKind {
    /// A workload (its replicas' events too).
    Workload,
    /// A node.
    Node,
}

closed_set!(PowerSource { Mains = "mains", Battery = "battery" });
closed_set!(NodeCondition {
    MemoryPressure = "MemoryPressure",
    DiskPressure = "DiskPressure",
    PIDPressure = "PIDPressure",
    NetworkUnavailable = "NetworkUnavailable",
});
closed_set!(LogStream {
    Stdout = "stdout",
    Stderr = "stderr",
    Error = "error",
});
closed_set!(ObjectKind { Workload = "Workload", Node = "Node" });
closed_set!(crate::ReplicaState {
    Pending = "Pending",
    Running = "Running",
    Ready = "Ready",
    Failed = "Failed",
    Succeeded = "Succeeded",
});
closed_set!(crate::NodePhase {
    Pending = "Pending",
    Ready = "Ready",
    Suspect = "Suspect",
    Down = "Down",
});
closed_set!(crate::RestartPolicy {
    Always = "Always",
    OnFailure = "OnFailure",
    Never = "Never",
});
closed_set!(crate::Protocol { TCP = "TCP", UDP = "UDP" });
closed_set!(crate::SeccompType {
    RuntimeDefault = "RuntimeDefault",
    Strict = "Strict",
    Localhost = "Localhost",
    Unconfined = "Unconfined",
});
closed_set!(crate::StorageMedium { Disk = "Disk", Memory = "Memory" });
closed_set!(crate::ReconnectPolicy {
    KeepReplacement = "KeepReplacement",
    KeepOriginal = "KeepOriginal",
    BestScore = "BestScore",
});
closed_set!(crate::AntiAffinity { None = "None", Node = "Node", Zone = "Zone" });
closed_set!(crate::PlacementStrategy {
    Auto = "Auto",
    Spread = "Spread",
    Binpack = "Binpack",
});
closed_set!(crate::RolloutStrategy {
    RollingUpdate = "RollingUpdate",
    Recreate = "Recreate",
    BlueGreen = "BlueGreen",
});
closed_set!(crate::LoadBalancing {
    RoundRobin = "RoundRobin",
    LeastConnections = "LeastConnections",
    Locality = "Locality",
    Weighted = "Weighted",
});

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: ClosedSet + std::fmt::Debug + Serialize>() {
        let mut seen = std::collections::BTreeSet::new();
        for (name, v) in T::NAMES {
            assert!(seen.insert(*name), "{name} named twice");
            assert_eq!(v.name(), *name);
            assert_eq!(T::from_name(name), Some(*v));
        }
        assert_eq!(T::from_name("nonsense"), None);
    }

    /// Every value has exactly one name and the manifest (serde) name of
    /// the specs' enums is that name, so the CLI, manifests and the legacy
    /// wire strings agree.
    #[test]
    fn every_value_has_one_name_and_manifests_use_it() {
        round_trip::<PowerSource>();
        round_trip::<NodeCondition>();
        round_trip::<LogStream>();
        round_trip::<ObjectKind>();
        round_trip::<crate::ReplicaState>();
        round_trip::<crate::NodePhase>();
        fn serde_named<T: ClosedSet + Serialize>() {
            for (name, v) in T::NAMES {
                assert_eq!(
                    serde_json::to_value(v).expect("json"),
                    serde_json::Value::String((*name).to_owned())
                );
            }
        }
        round_trip::<crate::RestartPolicy>();
        serde_named::<crate::RestartPolicy>();
        round_trip::<crate::Protocol>();
        serde_named::<crate::Protocol>();
        round_trip::<crate::SeccompType>();
        serde_named::<crate::SeccompType>();
        round_trip::<crate::StorageMedium>();
        serde_named::<crate::StorageMedium>();
        round_trip::<crate::ReconnectPolicy>();
        serde_named::<crate::ReconnectPolicy>();
        round_trip::<crate::AntiAffinity>();
        serde_named::<crate::AntiAffinity>();
        round_trip::<crate::PlacementStrategy>();
        serde_named::<crate::PlacementStrategy>();
        round_trip::<crate::RolloutStrategy>();
        serde_named::<crate::RolloutStrategy>();
        round_trip::<crate::LoadBalancing>();
        serde_named::<crate::LoadBalancing>();
    }
}
