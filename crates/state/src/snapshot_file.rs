//! The snapshot file format: the state machine's tables written one row at a
//! time, so a snapshot is built, sent and installed without ever holding the
//! whole state in memory.
//!
//! ```text
//! file  = MAGIC frame* end
//! frame = 0x01 len:u32le name       (the rows that follow belong to this table)
//!       | 0x02 len:u32le key len:u32le value
//! end   = 0x00 rows:u64le           (the number of row frames, checked on read)
//! ```
//!
//! Every length is checked against [`MAX_FIELD`] before anything is
//! allocated, so a corrupt or hostile file costs at most that much memory.

use std::io::{Read, Write};

/// The first bytes of every snapshot file (format version 1).
pub const MAGIC: &[u8; 8] = b"CLDSNAP1";
/// Longest table name, key or value a reader accepts. The writer never
/// refuses a row the state holds (a failed snapshot build stops openraft),
/// and the largest row the state can hold (a workload with its revision
/// history, or an idempotency record holding one, at the largest entry
/// size) stays below this. A field is read as its bytes arrive, so a
/// corrupt length costs no more memory than the bytes actually sent.
pub const MAX_FIELD: u32 = 1 << 30;

const TAG_END: u8 = 0;
const TAG_TABLE: u8 = 1;
const TAG_ROW: u8 = 2;

/// Why a snapshot file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// Reading or writing the file failed.
    #[error("snapshot file i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The file does not start with [`MAGIC`].
    #[error("not a cloudless snapshot file (bad magic)")]
    BadMagic,
    /// A frame tag that is not table, row or end.
    #[error("unknown frame tag {tag:#04x} after {rows} rows")]
    UnknownTag {
        /// The tag byte.
        tag: u8,
        /// Rows read before it.
        rows: u64,
    },
    /// A length above [`MAX_FIELD`].
    #[error("field of {len} bytes is longer than the limit of {MAX_FIELD}")]
    FieldTooLong {
        /// The length found.
        len: u32,
    },
    /// A table name, key or value that is not UTF-8.
    #[error("a table name, key or value is not UTF-8")]
    NotUtf8,
    /// A row before any table frame.
    #[error("a row comes before any table")]
    RowOutsideTable,
    /// The end frame counts a different number of rows than were read.
    #[error("the end frame counts {expected} rows but {found} were read")]
    RowCount {
        /// What the end frame says.
        expected: u64,
        /// What was read.
        found: u64,
    },
}

/// One frame of a snapshot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The rows that follow belong to this table.
    Table(String),
    /// One row of the current table.
    Row(String, String),
}

/// Writes frames to `W` (buffer it; every frame is a few small writes).
#[derive(Debug)]
pub struct SnapshotWriter<W: Write> {
    out: W,
    rows: u64,
}

impl<W: Write> SnapshotWriter<W> {
    /// Starts a file: writes the magic.
    pub fn new(mut out: W) -> Result<Self, SnapshotFileError> {
        out.write_all(MAGIC)?;
        Ok(Self { out, rows: 0 })
    }

    fn field(&mut self, bytes: &[u8]) -> Result<(), SnapshotFileError> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| SnapshotFileError::FieldTooLong { len: u32::MAX })?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(bytes)?;
        Ok(())
    }

    /// Starts a table.
    pub fn table(&mut self, name: &str) -> Result<(), SnapshotFileError> {
        self.out.write_all(&[TAG_TABLE])?;
        self.field(name.as_bytes())
    }

    /// Writes one row of the current table.
    pub fn row(&mut self, key: &str, value: &str) -> Result<(), SnapshotFileError> {
        self.out.write_all(&[TAG_ROW])?;
        self.field(key.as_bytes())?;
        self.field(value.as_bytes())?;
        self.rows += 1;
        Ok(())
    }

    /// Writes the end frame and hands back the writer (flush and sync it).
    pub fn finish(mut self) -> Result<W, SnapshotFileError> {
        self.out.write_all(&[TAG_END])?;
        self.out.write_all(&self.rows.to_le_bytes())?;
        Ok(self.out)
    }
}

/// Reads frames from `R` one at a time (buffer it).
#[derive(Debug)]
pub struct SnapshotReader<R: Read> {
    input: R,
    rows: u64,
    in_table: bool,
    done: bool,
}

impl<R: Read> SnapshotReader<R> {
    /// Checks the magic.
    pub fn new(mut input: R) -> Result<Self, SnapshotFileError> {
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(SnapshotFileError::BadMagic);
        }
        Ok(Self {
            input,
            rows: 0,
            in_table: false,
            done: false,
        })
    }

    fn field(&mut self) -> Result<String, SnapshotFileError> {
        let mut len = [0u8; 4];
        self.input.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len > MAX_FIELD {
            return Err(SnapshotFileError::FieldTooLong { len });
        }
        let mut buf = Vec::new();
        (&mut self.input)
            .take(u64::from(len))
            .read_to_end(&mut buf)?;
        if buf.len() != len as usize {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        String::from_utf8(buf).map_err(|_| SnapshotFileError::NotUtf8)
    }

    /// The next frame, or `None` after a valid end frame.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, SnapshotFileError> {
        if self.done {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        self.input.read_exact(&mut tag)?;
        match tag[0] {
            TAG_TABLE => {
                self.in_table = true;
                Ok(Some(Frame::Table(self.field()?)))
            }
            TAG_ROW => {
                if !self.in_table {
                    return Err(SnapshotFileError::RowOutsideTable);
                }
                let key = self.field()?;
                let value = self.field()?;
                self.rows += 1;
                Ok(Some(Frame::Row(key, value)))
            }
            TAG_END => {
                let mut n = [0u8; 8];
                self.input.read_exact(&mut n)?;
                let expected = u64::from_le_bytes(n);
                if expected != self.rows {
                    return Err(SnapshotFileError::RowCount {
                        expected,
                        found: self.rows,
                    });
                }
                self.done = true;
                Ok(None)
            }
            tag => Err(SnapshotFileError::UnknownTag {
                tag,
                rows: self.rows,
            }),
        }
    }
}

/// Reads a whole snapshot file, checking every frame; for fuzzing and tests.
pub fn check_snapshot_bytes(bytes: &[u8]) -> Result<u64, SnapshotFileError> {
    let mut r = SnapshotReader::new(bytes)?;
    let mut rows = 0;
    while let Some(f) = r.next_frame()? {
        if matches!(f, Frame::Row(..)) {
            rows += 1;
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new()).expect("magic");
        w.table("nodes").expect("table");
        w.row("n1", "{}").expect("row");
        w.row("n2", "{\"a\":1}").expect("row");
        w.table("empty").expect("table");
        w.finish().expect("end")
    }

    #[test]
    fn frames_read_back_as_written() {
        let bytes = sample();
        let mut r = SnapshotReader::new(bytes.as_slice()).expect("magic");
        let mut frames = Vec::new();
        while let Some(f) = r.next_frame().expect("frame") {
            frames.push(f);
        }
        assert_eq!(
            frames,
            vec![
                Frame::Table("nodes".into()),
                Frame::Row("n1".into(), "{}".into()),
                Frame::Row("n2".into(), "{\"a\":1}".into()),
                Frame::Table("empty".into()),
            ]
        );
    }

    #[test]
    fn a_truncated_file_is_an_error() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(
                check_snapshot_bytes(&bytes[..cut]).is_err(),
                "cut at {cut} read as complete"
            );
        }
        assert_eq!(check_snapshot_bytes(&bytes).expect("whole"), 2);
    }

    #[test]
    fn a_huge_length_is_refused_before_allocating() {
        let mut bytes = MAGIC.to_vec();
        bytes.push(TAG_TABLE);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            check_snapshot_bytes(&bytes),
            Err(SnapshotFileError::FieldTooLong { len: u32::MAX })
        ));
    }
}
