//! How much of a node's self-reported capacity placement trusts.
//!
//! A node reports its capacity in every heartbeat, and a compromised node
//! can report anything. Two rules keep a lie from attracting workloads:
//! - **Bounds.** A report beyond [`CAPACITY_LIMITS`] for any resource is
//!   refused outright (the heartbeat fails with the resource named).
//! - **No sudden growth.** Each node has a *trusted* capacity: its first
//!   report after enrollment, or what an admin accepted with
//!   `cloudlessctl node accept-capacity`. Placement uses the report as long as
//!   no resource exceeds [`GROWTH_FACTOR`] times its trusted value; a resource
//!   that does is held at its trusted value and the node is flagged
//!   (`capacityUnverified`) until an admin accepts the new report. Shrinking
//!   is always believed at once (it can only keep work away).

use crate::Resources;

/// The most any one node may report, per resource: 1,024 cores, 16 TiB of
/// memory, 1 PiB of storage, 400 Gbit/s. Far beyond a phone or a VPS, so
/// only a lie or a bug reaches them.
pub const CAPACITY_LIMITS: Resources = Resources {
    cpu_millis: 1_024_000,
    memory_bytes: 16 << 40,
    storage_bytes: 1 << 50,
    bandwidth_bps: 400_000_000_000,
    // Not a capacity: a per-replica limit.
    pids: 0,
};

/// A resource may grow to this multiple of its trusted value without an admin.
pub const GROWTH_FACTOR: u64 = 2;

/// A reported resource above its limit in [`CAPACITY_LIMITS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("capacity.{resource}: {reported} is above the maximum of {limit}")]
pub struct CapacityOutOfBounds {
    /// The field, in wire spelling (`cpuMillis`, ...).
    pub resource: &'static str,
    /// What the node reported.
    pub reported: u64,
    /// The limit.
    pub limit: u64,
}

/// (wire name, value) of each resource, in a fixed order.
fn fields(r: &Resources) -> [(&'static str, u64); 4] {
    [
        ("cpuMillis", r.cpu_millis),
        ("memoryBytes", r.memory_bytes),
        ("storageBytes", r.storage_bytes),
        ("bandwidthBps", r.bandwidth_bps),
    ]
}

/// `Ok` when every resource of `reported` is within [`CAPACITY_LIMITS`].
pub fn check_capacity_bounds(reported: &Resources) -> Result<(), CapacityOutOfBounds> {
    for ((resource, reported), (_, limit)) in
        fields(reported).into_iter().zip(fields(&CAPACITY_LIMITS))
    {
        if reported > limit {
            return Err(CapacityOutOfBounds {
                resource,
                reported,
                limit,
            });
        }
    }
    Ok(())
}

/// What placement may use of `reported` given the `trusted` capacity, and
/// the resources held back (empty when the whole report is believed).
pub fn placement_capacity(
    reported: &Resources,
    trusted: &Resources,
) -> (Resources, Vec<&'static str>) {
    let mut held = Vec::new();
    let mut pick = |name: &'static str, reported: u64, trusted: u64| {
        if reported <= trusted.saturating_mul(GROWTH_FACTOR) {
            reported
        } else {
            held.push(name);
            trusted
        }
    };
    let capacity = Resources {
        cpu_millis: pick("cpuMillis", reported.cpu_millis, trusted.cpu_millis),
        memory_bytes: pick("memoryBytes", reported.memory_bytes, trusted.memory_bytes),
        storage_bytes: pick(
            "storageBytes",
            reported.storage_bytes,
            trusted.storage_bytes,
        ),
        bandwidth_bps: pick(
            "bandwidthBps",
            reported.bandwidth_bps,
            trusted.bandwidth_bps,
        ),
        pids: 0,
    };
    (capacity, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpu_millis: u64, memory_bytes: u64) -> Resources {
        Resources {
            cpu_millis,
            memory_bytes,
            ..Resources::default()
        }
    }

    #[test]
    fn a_report_beyond_the_limits_is_refused_with_the_resource_named() {
        let e = check_capacity_bounds(&res(1_000_000_000, 1 << 30)).expect_err("absurd cpu");
        assert_eq!(e.resource, "cpuMillis");
        assert!(
            e.to_string().contains("above the maximum of 1024000"),
            "{e}"
        );
        let e = check_capacity_bounds(&res(4000, 1 << 60)).expect_err("absurd memory");
        assert_eq!(e.resource, "memoryBytes");
        assert!(check_capacity_bounds(&res(64_000, 256 << 30)).is_ok());
    }

    #[test]
    fn growth_up_to_twice_the_trusted_capacity_is_believed() {
        let (c, held) = placement_capacity(&res(8000, 8 << 30), &res(4000, 4 << 30));
        assert_eq!(c, res(8000, 8 << 30));
        assert!(held.is_empty());
    }

    #[test]
    fn a_jump_beyond_twice_the_trusted_capacity_is_held_at_the_trusted_value() {
        let (c, held) = placement_capacity(&res(4000, 1 << 40), &res(4000, 4 << 30));
        assert_eq!(c, res(4000, 4 << 30));
        assert_eq!(held, vec!["memoryBytes"]);
    }

    #[test]
    fn shrinking_is_believed_at_once() {
        let (c, held) = placement_capacity(&res(1000, 1 << 30), &res(4000, 4 << 30));
        assert_eq!(c, res(1000, 1 << 30));
        assert!(held.is_empty());
    }

    #[test]
    fn a_resource_never_trusted_is_held_at_zero() {
        let (c, held) = placement_capacity(&res(4000, 0), &Resources::default());
        assert_eq!(c, Resources::default());
        assert_eq!(held, vec!["cpuMillis"]);
    }
}
