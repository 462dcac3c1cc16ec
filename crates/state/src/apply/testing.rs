//! Helpers for tests that apply commands directly.

use redb::Database;

use crate::command::{Command, Response};

/// An empty state database in memory.
pub(crate) fn db() -> Database {
    Database::builder()
        .create_with_backend(redb::backends::InMemoryBackend::new())
        .expect("in-memory db")
}

/// Applies `cmd` at `now` in its own committed transaction.
pub(crate) fn apply(db: &Database, cmd: Command, now: i64) -> Response {
    let txn = db.begin_write().expect("txn");
    let r = super::apply_command(&txn, &cmd, now).expect("apply");
    txn.commit().expect("commit");
    r
}
