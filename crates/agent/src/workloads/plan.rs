//! The pure core of the runner: what to stop and what to start so that the
//! replicas a node runs match an assignment set.

use std::collections::{HashMap, HashSet};

use cloudless_proto::v1 as pb;

/// What makes the replicas a node runs match an assignment set.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Diff<'a> {
    /// Replicas to stop: no longer assigned here, or assigned with another
    /// template (they are started again with the new one). Also those
    /// stopped for lack of a coordinator and no longer assigned here: their
    /// state is forgotten.
    pub(crate) stop: Vec<String>,
    /// Assignments to start, in the set's order.
    pub(crate) start: Vec<&'a pb::Assignment>,
}

/// The pure core of [`Runner::apply`](super::Runner::apply): `running`
/// maps each replica being run to its template; `parked` are those stopped
/// for lack of a coordinator (not running; started again if still
/// assigned).
pub(crate) fn diff<'a>(
    running: &HashMap<&str, u64>,
    parked: &HashSet<String>,
    assignments: &'a [pb::Assignment],
) -> Diff<'a> {
    let wanted: HashMap<&str, &pb::Assignment> = assignments
        .iter()
        .map(|a| (a.replica_id.as_str(), a))
        .collect();
    let mut stop: Vec<String> = running
        .iter()
        .filter(|(id, template)| wanted.get(*id).is_none_or(|a| a.generation != **template))
        .map(|(id, _)| (*id).to_owned())
        .chain(
            parked
                .iter()
                .filter(|id| {
                    !wanted.contains_key(id.as_str()) && !running.contains_key(id.as_str())
                })
                .cloned(),
        )
        .collect();
    stop.sort_unstable();
    let mut seen = std::collections::HashSet::new();
    let start = assignments
        .iter()
        .filter(|a| {
            let kept = running
                .get(a.replica_id.as_str())
                .is_some_and(|t| *t == a.generation);
            // A replica listed twice is started once.
            !kept && seen.insert(a.replica_id.as_str())
        })
        .collect();
    Diff { stop, start }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(id: &str, template: u64) -> pb::Assignment {
        pb::Assignment {
            replica_id: id.into(),
            generation: template,
            ..Default::default()
        }
    }

    fn ids(start: &[&pb::Assignment]) -> Vec<String> {
        start.iter().map(|a| a.replica_id.clone()).collect()
    }

    #[test]
    fn the_diff_starts_the_new_stops_the_gone_and_restarts_a_new_template() {
        let running: HashMap<&str, u64> = [("keep", 1), ("gone", 1), ("update", 1)].into();
        let set = [
            assignment("keep", 1),
            assignment("update", 2),
            assignment("new", 1),
            assignment("new", 1),
        ];
        let none = HashSet::new();
        let d = diff(&running, &none, &set);
        assert_eq!(d.stop, ["gone", "update"]);
        assert_eq!(ids(&d.start), ["update", "new"], "a duplicate starts once");

        // The same set again once applied: nothing to do.
        let running: HashMap<&str, u64> = [("keep", 1), ("update", 2), ("new", 1)].into();
        assert_eq!(diff(&running, &none, &set), Diff::default());

        // An empty set (every replica moved away): stop all, start none.
        let d = diff(&running, &none, &[]);
        assert_eq!(d.stop, ["keep", "new", "update"]);
        assert!(d.start.is_empty());
    }

    #[test]
    fn replicas_stopped_while_cut_off_start_again_if_still_assigned_and_are_forgotten_if_not() {
        let running: HashMap<&str, u64> = [("ran-on", 1)].into();
        let parked: HashSet<String> = ["back".to_owned(), "moved".to_owned()].into();
        let set = [assignment("ran-on", 1), assignment("back", 1)];
        let d = diff(&running, &parked, &set);
        assert_eq!(ids(&d.start), ["back"]);
        assert_eq!(d.stop, ["moved"]);
    }
}
