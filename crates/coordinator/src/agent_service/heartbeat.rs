//! A heartbeat's device status, checked field by field before the leader
//! records it.

use std::collections::BTreeMap;

use cloudless_proto::v1::HeartbeatRequest;
use cloudless_proto::{enums, v1};
use cloudless_types::{ClosedSet as _, NodeStatus, PowerSource, Resources};

use crate::error::CoordinatorError;

/// Most labels one heartbeat may report.
const MAX_LABELS: usize = 64;
/// Most conditions one heartbeat may report.
const MAX_CONDITIONS: usize = 16;
/// Overlay addresses a heartbeat may report.
const MAX_OVERLAY_ADDRESSES: usize = 8;

/// The device status in a heartbeat, checked field by field.
pub(super) fn status_from_wire(
    r: HeartbeatRequest,
) -> Result<(NodeStatus, Resources), CoordinatorError> {
    let bad = |field: &str, problem: String| {
        Err(CoordinatorError::InvalidArgument(format!(
            "{field}: {problem}"
        )))
    };
    if r.labels.len() > MAX_LABELS {
        return bad(
            "labels",
            format!(
                "{} labels, at most {MAX_LABELS} are allowed",
                r.labels.len()
            ),
        );
    }
    let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
    let mut errs = cloudless_types::ValidationErrors::default();
    cloudless_types::check_labels(&mut errs, "labels", &labels);
    errs.into_result()?;
    if r.conditions.len() > MAX_CONDITIONS {
        return bad(
            "conditions",
            format!(
                "{} conditions, at most {MAX_CONDITIONS} are allowed",
                r.conditions.len()
            ),
        );
    }
    let mut conditions = enums::required_list::<v1::NodeCondition>(
        &r.conditions,
        &r.legacy_conditions,
        "conditions",
    )
    .map_err(CoordinatorError::from)?;
    // Agents of the release before the enum sent "" for mains.
    let power_source = if r.power_source == 0 && r.legacy_power_source.is_empty() {
        PowerSource::Mains
    } else {
        enums::required::<v1::PowerSource>(r.power_source, &r.legacy_power_source, "power_source")
            .map_err(CoordinatorError::from)?
    };
    let Ok(battery_percent) = u8::try_from(r.battery_percent) else {
        return bad(
            "battery_percent",
            format!("{} is above 100", r.battery_percent),
        );
    };
    if battery_percent > 100 {
        return bad("battery_percent", format!("{battery_percent} is above 100"));
    }
    if r.overlay_addresses.len() > MAX_OVERLAY_ADDRESSES {
        return bad(
            "overlay_addresses",
            format!(
                "{} addresses, at most {MAX_OVERLAY_ADDRESSES} are allowed",
                r.overlay_addresses.len()
            ),
        );
    }
    for (i, a) in r.overlay_addresses.iter().enumerate() {
        match a.parse::<std::net::SocketAddr>() {
            Ok(sa) if sa.port() != 0 && !sa.ip().is_unspecified() => {}
            _ => {
                return bad(
                    &format!("overlay_addresses[{i}]"),
                    format!("{a:?} is not a reachable ip:port"),
                )
            }
        }
    }
    let capacity: Resources = r.capacity.map(Into::into).unwrap_or_default();
    cloudless_types::check_capacity_bounds(&capacity)
        .map_err(|e| CoordinatorError::InvalidArgument(e.to_string()))?;
    conditions.sort();
    conditions.dedup();
    let status = NodeStatus {
        overlay_addresses: r.overlay_addresses,
        capacity,
        reported_labels: labels,
        // Stored by name (the log format keeps strings here).
        conditions: conditions.iter().map(|c| c.name().to_owned()).collect(),
        power_source: power_source.name().to_owned(),
        battery_percent: if power_source == PowerSource::Battery {
            battery_percent
        } else {
            0
        },
    };
    Ok((status, r.usage.map(Into::into).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_fields_are_checked_by_name() {
        let ok = HeartbeatRequest {
            power_source: v1::PowerSource::Battery.into(),
            battery_percent: 40,
            conditions: vec![
                v1::NodeCondition::DiskPressure.into(),
                v1::NodeCondition::DiskPressure.into(),
            ],
            overlay_addresses: vec!["192.0.2.7:7600".into(), "[2001:db8::1]:7600".into()],
            ..Default::default()
        };
        let (status, _) = status_from_wire(ok).expect("valid");
        assert_eq!(status.battery_percent, 40);
        assert_eq!(status.overlay_addresses.len(), 2);
        assert_eq!(status.conditions, vec!["DiskPressure".to_owned()]);
        // An agent of the previous release sends the string twins only.
        let legacy = HeartbeatRequest {
            legacy_power_source: "battery".into(),
            battery_percent: 40,
            legacy_conditions: vec!["MemoryPressure".into()],
            ..Default::default()
        };
        let (status, _) = status_from_wire(legacy).expect("valid");
        assert_eq!(
            (status.power_source.as_str(), status.conditions),
            ("battery", vec!["MemoryPressure".to_owned()])
        );
        for (req, field) in [
            (
                HeartbeatRequest {
                    battery_percent: 101,
                    power_source: v1::PowerSource::Battery.into(),
                    ..Default::default()
                },
                "battery_percent",
            ),
            (
                HeartbeatRequest {
                    legacy_power_source: "solar".into(),
                    ..Default::default()
                },
                "power_source",
            ),
            (
                HeartbeatRequest {
                    power_source: 17,
                    ..Default::default()
                },
                "power_source",
            ),
            (
                HeartbeatRequest {
                    capacity: Some(cloudless_proto::v1::Resources {
                        cpu_millis: 1_000_000_000,
                        memory_bytes: 1 << 50,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                "capacity.cpuMillis",
            ),
            (
                HeartbeatRequest {
                    conditions: vec![v1::NodeCondition::Unspecified.into()],
                    ..Default::default()
                },
                "conditions[0]",
            ),
            (
                HeartbeatRequest {
                    labels: [("Bad Key!".to_owned(), "v".to_owned())].into(),
                    ..Default::default()
                },
                "labels",
            ),
            (
                HeartbeatRequest {
                    overlay_addresses: vec!["192.0.2.7:7600".into(), "0.0.0.0:7600".into()],
                    ..Default::default()
                },
                "overlay_addresses[1]",
            ),
            (
                HeartbeatRequest {
                    overlay_addresses: vec!["example.org:7600".into()],
                    ..Default::default()
                },
                "overlay_addresses[0]",
            ),
            (
                HeartbeatRequest {
                    overlay_addresses: vec!["192.0.2.7:7600".into(); 9],
                    ..Default::default()
                },
                "overlay_addresses",
            ),
        ] {
            let err = status_from_wire(req).expect_err("invalid heartbeat accepted");
            assert!(err.to_string().contains(field), "{err} should name {field}");
        }
    }
}
