//! Sequence-numbered append logs: the shape the events and the audit log
//! share.
//!
//! A log is one table. Entries sit under their sequence number written as
//! 20 digits, so keys sort in append order; the next sequence sits under
//! [`SEQ_KEY`], which sorts after every entry. Values are JSON, the
//! sequence a JSON number. Retention is each log's own: events by count,
//! the audit log by age and count (and it counts repeats into an earlier
//! entry instead of appending).

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};
use serde::Serialize;

use crate::error::{ApplyError, RedbContext};
use crate::tables::{decode, encode};

/// Key of the next sequence: `~` sorts after every digit.
pub(crate) const SEQ_KEY: &str = "~seq";

/// The key of the entry numbered `seq`.
pub(crate) fn entry_key(seq: u64) -> String {
    format!("{seq:020}")
}

/// A log opened in a write transaction. Appends take the next sequence;
/// [`SeqLog::store_next`] records it.
pub(crate) struct SeqLog<'txn> {
    def: TableDefinition<'static, &'static str, &'static str>,
    table: Table<'txn, &'static str, &'static str>,
    next: u64,
}

impl<'txn> SeqLog<'txn> {
    /// Opens the log in `def`, reading its next sequence (0 for a new log).
    pub(crate) fn open(
        txn: &'txn WriteTransaction,
        def: TableDefinition<'static, &'static str, &'static str>,
    ) -> Result<Self, ApplyError> {
        let table = txn.open_table(def).at(def, "open")?;
        let next = match table.get(SEQ_KEY).at(def, "get")? {
            Some(v) => decode(def, SEQ_KEY, v.value())?,
            None => 0,
        };
        Ok(Self { def, table, next })
    }

    /// Appends `entry` under the next sequence; returns its key.
    pub(crate) fn append<T: Serialize>(&mut self, entry: &T) -> Result<String, ApplyError> {
        let key = entry_key(self.next);
        self.replace(&key, entry)?;
        self.next += 1;
        Ok(key)
    }

    /// Stores `entry` under `key`, the key of an earlier append.
    pub(crate) fn replace<T: Serialize>(&mut self, key: &str, entry: &T) -> Result<(), ApplyError> {
        let v = encode(self.def, key, entry)?;
        self.table.insert(key, v.as_str()).at(self.def, "insert")?;
        Ok(())
    }

    /// The entry under `key` as stored, if it is still there.
    pub(crate) fn get_raw(&self, key: &str) -> Result<Option<String>, ApplyError> {
        let v = self.table.get(key).at(self.def, "get")?;
        Ok(v.map(|v| v.value().to_owned()))
    }

    /// Records the next sequence; returns it.
    pub(crate) fn store_next(&mut self) -> Result<u64, ApplyError> {
        self.table
            .insert(SEQ_KEY, self.next.to_string().as_str())
            .at(self.def, "insert")?;
        Ok(self.next)
    }

    /// The oldest entry (key and stored value), if there is one.
    pub(crate) fn oldest(&self) -> Result<Option<(String, String)>, ApplyError> {
        let Some((k, v)) = self.table.first().at(self.def, "first")? else {
            return Ok(None);
        };
        if k.value() >= SEQ_KEY {
            return Ok(None);
        }
        Ok(Some((k.value().to_owned(), v.value().to_owned())))
    }

    /// Removes the entry under `key`.
    pub(crate) fn remove(&mut self, key: &str) -> Result<(), ApplyError> {
        self.table.remove(key).at(self.def, "remove")?;
        Ok(())
    }

    /// How many entries there are.
    pub(crate) fn len(&self) -> Result<u64, ApplyError> {
        let rows = self.table.len().at(self.def, "len")?;
        let seq_row = self.table.get(SEQ_KEY).at(self.def, "get")?.is_some();
        Ok(rows.saturating_sub(u64::from(seq_row)))
    }

    /// Removes every entry numbered below `seq`.
    pub(crate) fn drop_before(&mut self, seq: u64) -> Result<(), ApplyError> {
        let cutoff = entry_key(seq);
        self.table
            .retain_in::<&str, _>(..cutoff.as_str(), |_, _| false)
            .at(self.def, "retain")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::testing::db;

    const LOG: TableDefinition<&str, &str> = TableDefinition::new("log");

    #[test]
    fn numbering_continues_across_opens_and_the_sequence_row_is_no_entry() {
        let db = db();
        let txn = db.begin_write().expect("txn");
        {
            let mut log = SeqLog::open(&txn, LOG).expect("open");
            assert_eq!(log.oldest().expect("oldest"), None);
            assert_eq!(log.append(&"a").expect("append"), entry_key(0));
            assert_eq!(log.append(&"b").expect("append"), "00000000000000000001");
            assert_eq!(log.store_next().expect("store"), 2);
        }
        let mut log = SeqLog::open(&txn, LOG).expect("reopen");
        assert_eq!(log.append(&"c").expect("append"), entry_key(2));
        assert_eq!(log.store_next().expect("store"), 3);
        assert_eq!(log.len().expect("len"), 3);
        log.drop_before(2).expect("drop");
        assert_eq!(log.len().expect("len"), 1);
        assert_eq!(
            log.oldest().expect("oldest"),
            Some((entry_key(2), "\"c\"".to_owned()))
        );
        log.remove(&entry_key(2)).expect("remove");
        assert_eq!(
            log.oldest().expect("oldest"),
            None,
            "only the sequence row is left"
        );
        assert_eq!(log.get_raw(SEQ_KEY).expect("get"), Some("3".to_owned()));
    }
}
