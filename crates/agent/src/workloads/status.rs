//! What the agent reports of a replica: the runtime's status as one of the
//! cluster's replica states.

use cloudless_proto::v1 as pb;
use cloudless_proto::WireEnum as _;
use cloudless_runtime::ReplicaPhase;
use cloudless_types::{ClosedSet as _, ReplicaState};

/// A status report entry (with the state's string twin, which coordinators
/// of the previous release read).
pub(crate) fn status(
    replica_id: &str,
    state: ReplicaState,
    exit_code: Option<i32>,
    restarts: u32,
    message: String,
) -> pb::ReplicaStatus {
    pb::ReplicaStatus {
        replica_id: replica_id.to_owned(),
        state: pb::ReplicaState::wire(state),
        legacy_state: state.name().to_owned(),
        exit_code,
        restarts,
        message,
        address: String::new(),
    }
}

/// What the runtime's replica status means for the cluster.
pub(crate) fn wire_status(
    replica_id: &str,
    s: &cloudless_runtime::ReplicaStatus,
) -> pb::ReplicaStatus {
    let code = s
        .last_exit
        .map(|e| i32::try_from(e.code).unwrap_or(i32::MAX));
    let mut message = s.message.clone();
    if let Some(e) = s.last_exit {
        if e.oom_killed && !message.contains("OOM") {
            message = format!("last run OOM-killed; {message}");
        }
    }
    let state = match s.phase {
        ReplicaPhase::Starting => ReplicaState::Pending,
        ReplicaPhase::Running if s.ready => ReplicaState::Ready,
        ReplicaPhase::Running | ReplicaPhase::BackOff => ReplicaState::Running,
        ReplicaPhase::Exited if code == Some(0) => ReplicaState::Succeeded,
        ReplicaPhase::Exited | ReplicaPhase::Failed => ReplicaState::Failed,
    };
    status(replica_id, state, code, s.restarts, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_states_map_to_replica_states() {
        let mut s = cloudless_runtime::ReplicaStatus {
            phase: ReplicaPhase::Running,
            ready: true,
            restarts: 2,
            pid: Some(1),
            last_exit: None,
            exits: 0,
            message: String::new(),
        };
        assert_eq!(wire_status("r", &s).state(), pb::ReplicaState::Ready);
        s.ready = false;
        assert_eq!(wire_status("r", &s).state(), pb::ReplicaState::Running);
        s.phase = ReplicaPhase::Exited;
        s.last_exit = Some(cloudless_runtime::LastExit {
            code: 0,
            oom_killed: false,
            liveness_failed: false,
        });
        assert_eq!(wire_status("r", &s).state(), pb::ReplicaState::Succeeded);
        s.last_exit = Some(cloudless_runtime::LastExit {
            code: 137,
            oom_killed: true,
            liveness_failed: false,
        });
        let w = wire_status("r", &s);
        assert_eq!(
            (w.state(), w.legacy_state.as_str(), w.exit_code),
            (pb::ReplicaState::Failed, "Failed", Some(137))
        );
        assert!(w.message.contains("OOM"));
    }
}
