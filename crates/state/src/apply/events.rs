//! Events: `RecordEvents`, and the append every command that reports
//! events uses.

use redb::WriteTransaction;

use cloudless_types::EventRecord;

use crate::command::Response;
use crate::error::ApplyError;
use crate::seq_log::SeqLog;
use crate::tables::EVENTS;

/// Events kept; older ones are dropped as new ones arrive.
pub const EVENT_RETENTION: u64 = 10_000;

/// `RecordEvents`: appends events.
pub(super) fn record(
    txn: &WriteTransaction,
    events: &[EventRecord],
    now_ms: i64,
) -> Result<Response, ApplyError> {
    append_events(txn, events, now_ms)?;
    Ok(Response::EventsRecorded(
        u32::try_from(events.len()).unwrap_or(u32::MAX),
    ))
}

/// Appends `events` (an `at_ms` of 0 becomes `now_ms`) and drops the oldest
/// beyond [`EVENT_RETENTION`].
pub(super) fn append_events(
    txn: &WriteTransaction,
    events: &[EventRecord],
    now_ms: i64,
) -> Result<(), ApplyError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut log = SeqLog::open(txn, EVENTS)?;
    for ev in events {
        let mut ev = ev.clone();
        if ev.at_ms == 0 {
            ev.at_ms = now_ms;
        }
        log.append(&ev)?;
    }
    let next = log.store_next()?;
    // Retention: drop the oldest beyond the limit.
    if next > EVENT_RETENTION {
        log.drop_before(next - EVENT_RETENTION)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;
    use crate::apply::testing::apply;
    use crate::command::Command;
    use crate::StateMachine;

    #[test]
    fn events_are_numbered_filtered_and_kept_up_to_the_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm =
            StateMachine::open(&dir.path().join("s.redb"), Histogram::new([1.0])).expect("open");
        let ev = |i: u64| EventRecord {
            at_ms: 0,
            kind: "Workload".into(),
            namespace: "default".into(),
            object: if i.is_multiple_of(2) { "even" } else { "odd" }.into(),
            reason: "Scheduled".into(),
            message: format!("#{i}"),
        };
        let total = EVENT_RETENTION + 5;
        let r = apply(
            sm.db(),
            Command::RecordEvents {
                events: (0..total).map(ev).collect(),
            },
            42,
        );
        assert_eq!(
            r,
            Response::EventsRecorded(u32::try_from(total).expect("fits"))
        );
        let reader = sm.reader();
        let (all, last) = reader.events(None, |_| true).expect("read");
        assert_eq!(last, Some(total - 1));
        assert_eq!(all.len() as u64, EVENT_RETENTION);
        assert_eq!(all[0].1.message, "#5");
        assert_eq!(all[0].1.at_ms, 42, "stamped with the proposer's time");
        let (last_seq, _) = all[all.len() - 10];
        let (after, cursor) = reader
            .events(Some(last_seq), |e| e.object == "odd")
            .expect("read");
        assert_eq!(after.len(), 4, "9996..=10004, odd ones");
        assert_eq!(
            cursor,
            Some(total - 1),
            "the cursor passes filtered-out events"
        );
        assert!(after
            .iter()
            .all(|(seq, e)| *seq > last_seq && e.object == "odd"));
    }
}
