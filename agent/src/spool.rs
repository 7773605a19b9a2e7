//! The result buffer on disk: results the coordinator has not taken yet,
//! kept in append-only segment files so they survive an agent restart, and
//! handed back oldest first.
//!
//! A segment is `<data-dir>/spool/<20-digit sequence>.seg`, a run of records
//! `[payload length: u32 LE][CRC-32 of payload: u32 LE][payload: JSON of one
//! CheckResult]`. Writes only ever append; a record torn by a crash fails its
//! length or checksum and is cut off when the spool is opened again. The
//! position of the first undelivered record (`cursor`) is replaced
//! atomically after each delivery, so a crash between a delivery and the
//! cursor update sends a batch twice, never loses one; the coordinator
//! stores results once by id.
//!
//! Bounds: results older than the maximum age are dropped when read, and
//! whole segments last written before it are deleted; past the size cap
//! the oldest segments go. Every drop is counted for the metrics.
//!
//! The spool is synchronous file I/O: callers on the async runtime run it
//! on a blocking thread. A lock file held while it is open keeps a second
//! agent from using the same data directory.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use muster_common::monitor::CheckResult;

/// Largest record accepted: a check result is a few hundred bytes; anything
/// far beyond this is a corrupt length.
const MAX_RECORD: u32 = 1 << 20;
/// Segments are closed at this size (or a quarter of the size cap, when
/// smaller), so that the oldest can be dropped a piece at a time.
const SEGMENT_BYTES: u64 = 4 << 20;
const HEADER: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is in use by another muster-agent (each agent needs its own --data-dir)")]
    Locked(PathBuf),
    #[error("could not encode a result: {0}")]
    Encode(#[from] serde_json::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One segment file: its sequence number, its length in bytes and how many
/// records it holds.
#[derive(Debug, Clone)]
struct Segment {
    seq: u64,
    len: u64,
    records: u64,
}

/// Where the first undelivered record is: a segment, a byte offset in it,
/// and the index of that record in the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    seq: u64,
    offset: u64,
    index: u64,
}

/// Results read from the spool, and where the spool stands once they are
/// delivered.
#[derive(Debug)]
pub struct Batch {
    pub results: Vec<CheckResult>,
    /// Records passed over because they were older than the maximum age.
    pub expired: u64,
    end: Position,
}

/// What a size or age bound cost: records dropped undelivered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub expired: u64,
    pub over_size: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_age: Duration,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    /// The segment being appended to (the last of `segments`), once opened.
    writer: Option<BufWriter<File>>,
    cursor: Position,
    /// Held while the spool is open; the lock goes with it.
    _lock: nix::fcntl::Flock<File>,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, cutting off a record a crash
    /// left half written.
    pub fn open(dir: &Path, max_age: Duration, max_bytes: u64) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| SpoolError::Locked(dir.to_owned()))?;

        let mut seqs = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            seqs.push(seq);
        }
        seqs.sort_unstable();
        let mut segments = VecDeque::new();
        for seq in seqs {
            let path = segment_path(dir, seq);
            let (len, records) = scan(&path)?;
            let on_disk = std::fs::metadata(&path).map_err(io(&path))?.len();
            if on_disk != len {
                tracing::warn!(
                    segment = %path.display(),
                    kept = len,
                    cut = on_disk - len,
                    "cutting off a torn or corrupt end of a result buffer segment"
                );
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io(&path))?;
                file.set_len(len).map_err(io(&path))?;
                file.sync_all().map_err(io(&path))?;
            }
            segments.push_back(Segment { seq, len, records });
        }

        let mut spool = Spool {
            dir: dir.to_owned(),
            max_age,
            max_bytes,
            segment_bytes: SEGMENT_BYTES.min(max_bytes / 4).max(64 * 1024),
            segments,
            writer: None,
            cursor: Position {
                seq: 0,
                offset: 0,
                index: 0,
            },
            _lock: lock,
        };
        spool.cursor = spool.read_cursor();
        // Appends after a restart go to a new segment: the old last one
        // may have had its end cut off, and its length is now settled.
        Ok(spool)
    }

    /// Results waiting to be delivered.
    pub fn pending(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| {
                if s.seq < self.cursor.seq {
                    0
                } else if s.seq == self.cursor.seq {
                    s.records.saturating_sub(self.cursor.index)
                } else {
                    s.records
                }
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pending() == 0
    }

    /// Bytes the segment files take.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Appends `results` after everything already kept, and makes them
    /// durable. Returns what the size cap then cost.
    pub fn append(&mut self, results: &[CheckResult]) -> Result<Dropped, SpoolError> {
        if results.is_empty() {
            return Ok(Dropped::default());
        }
        let mut payload = Vec::with_capacity(512);
        for result in results {
            payload.clear();
            serde_json::to_writer(&mut payload, result)?;
            if payload.len() as u64 > u64::from(MAX_RECORD) {
                tracing::warn!(endpoint_id = %result.endpoint_id, bytes = payload.len(), "a result too large to buffer was dropped");
                continue;
            }
            let full = self
                .segments
                .back()
                .is_none_or(|s| s.len >= self.segment_bytes);
            if self.writer.is_none() || full {
                self.start_segment()?;
            }
            let segment = self
                .segments
                .back_mut()
                .expect("a segment was just started");
            let path = segment_path(&self.dir, segment.seq);
            let writer = self.writer.as_mut().expect("a writer was just opened");
            let mut header = [0u8; HEADER as usize];
            header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            header[4..].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            writer.write_all(&header).map_err(io(&path))?;
            writer.write_all(&payload).map_err(io(&path))?;
            segment.len += HEADER + payload.len() as u64;
            segment.records += 1;
        }
        if let (Some(writer), Some(segment)) = (self.writer.as_mut(), self.segments.back()) {
            let path = segment_path(&self.dir, segment.seq);
            writer.flush().map_err(io(&path))?;
            writer.get_ref().sync_data().map_err(io(&path))?;
        }
        let mut dropped = self.enforce_size()?;
        dropped.expired += self.drop_old_segments(SystemTime::now())?;
        Ok(dropped)
    }

    /// Up to `max` of the oldest undelivered results, in the order they were
    /// appended. Nothing is removed until [`Spool::commit`].
    pub fn peek(&mut self, max: usize) -> Result<Batch, SpoolError> {
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(self.max_age).unwrap_or(chrono::Duration::MAX);
        let mut results = Vec::new();
        let mut expired = 0;
        let mut at = self.cursor;
        let segments: Vec<Segment> = self
            .segments
            .iter()
            .filter(|s| s.seq >= self.cursor.seq)
            .cloned()
            .collect();
        // Buffered appends must be on disk before they are read back.
        if let (Some(writer), Some(last)) = (self.writer.as_mut(), self.segments.back()) {
            writer
                .flush()
                .map_err(io(&segment_path(&self.dir, last.seq)))?;
        }
        'segments: for segment in segments {
            if segment.seq > at.seq {
                at = Position {
                    seq: segment.seq,
                    offset: 0,
                    index: 0,
                };
            }
            if at.index >= segment.records {
                continue;
            }
            let path = segment_path(&self.dir, segment.seq);
            let mut file = File::open(&path).map_err(io(&path))?;
            file.seek(SeekFrom::Start(at.offset)).map_err(io(&path))?;
            let mut reader = BufReader::new(file.take(segment.len - at.offset));
            while at.index < segment.records {
                if results.len() >= max {
                    break 'segments;
                }
                let Some(payload) = read_record(&mut reader).map_err(io(&path))? else {
                    // Shorter than counted: the file changed under us. What is
                    // left of this segment cannot be read.
                    tracing::warn!(segment = %path.display(), "a result buffer segment ended early; skipping its rest");
                    at.index = segment.records;
                    at.offset = segment.len;
                    break;
                };
                at.offset += HEADER + payload.len() as u64;
                at.index += 1;
                match serde_json::from_slice::<CheckResult>(&payload) {
                    Ok(result) if result.checked_at < cutoff => expired += 1,
                    Ok(result) => results.push(result),
                    Err(error) => {
                        tracing::warn!(segment = %path.display(), %error, "skipping a buffered result that does not decode");
                        expired += 1;
                    }
                }
            }
        }
        Ok(Batch {
            results,
            expired,
            end: at,
        })
    }

    /// Forgets the results of `batch`: the coordinator has taken them.
    pub fn commit(&mut self, batch: &Batch) -> Result<(), SpoolError> {
        self.cursor = batch.end;
        // Segments wholly before the cursor are delivered.
        while let Some(first) = self.segments.front() {
            let delivered = first.seq < self.cursor.seq
                || (first.seq == self.cursor.seq
                    && self.cursor.index >= first.records
                    && self.segments.len() > 1);
            if !delivered {
                break;
            }
            let first = self.segments.pop_front().expect("checked above");
            self.remove_segment(first.seq)?;
        }
        if self.pending() == 0 {
            // Everything is delivered: start afresh, with no file left.
            for segment in std::mem::take(&mut self.segments) {
                self.remove_segment(segment.seq)?;
            }
            self.writer = None;
        }
        self.write_cursor()
    }

    fn start_segment(&mut self) -> Result<(), SpoolError> {
        if let (Some(mut writer), Some(last)) = (self.writer.take(), self.segments.back()) {
            let path = segment_path(&self.dir, last.seq);
            writer.flush().map_err(io(&path))?;
        }
        // Sequence numbers only grow, so a cursor left on disk never names
        // a newer segment that took an old one's number.
        let seq = self
            .segments
            .back()
            .map_or(self.cursor.seq + 1, |s| s.seq + 1);
        if self.segments.is_empty() {
            self.cursor = Position {
                seq,
                offset: 0,
                index: 0,
            };
            self.write_cursor()?;
        }
        let path = segment_path(&self.dir, seq);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        self.segments.push_back(Segment {
            seq,
            len: 0,
            records: 0,
        });
        self.writer = Some(BufWriter::with_capacity(64 * 1024, file));
        Ok(())
    }

    /// Drops the oldest segments while the spool is over its size cap,
    /// keeping the one being written.
    fn enforce_size(&mut self) -> Result<Dropped, SpoolError> {
        let mut dropped = Dropped::default();
        while self.bytes() > self.max_bytes && self.segments.len() > 1 {
            dropped.over_size += self.drop_first_segment()?;
        }
        Ok(dropped)
    }

    /// Deletes segments last written before the maximum age: every record in
    /// them is older.
    fn drop_old_segments(&mut self, now: SystemTime) -> Result<u64, SpoolError> {
        let mut expired = 0;
        while let Some(first) = self.segments.front() {
            if self.segments.len() == 1 && self.writer.is_some() {
                break;
            }
            let path = segment_path(&self.dir, first.seq);
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(io(&path))?;
            let age = now.duration_since(modified).unwrap_or_default();
            if age <= self.max_age {
                break;
            }
            expired += self.drop_first_segment()?;
            if self.segments.is_empty() {
                self.writer = None;
            }
        }
        Ok(expired)
    }

    /// Removes the oldest segment; returns how many undelivered records it held.
    fn drop_first_segment(&mut self) -> Result<u64, SpoolError> {
        let first = self.segments.pop_front().expect("callers check");
        let lost = if first.seq < self.cursor.seq {
            0
        } else if first.seq == self.cursor.seq {
            first.records.saturating_sub(self.cursor.index)
        } else {
            first.records
        };
        self.remove_segment(first.seq)?;
        if let Some(next) = self.segments.front() {
            if next.seq > self.cursor.seq {
                self.cursor = Position {
                    seq: next.seq,
                    offset: 0,
                    index: 0,
                };
                self.write_cursor()?;
            }
        }
        Ok(lost)
    }

    /// Checks the age bound without appending: called while waiting for the
    /// coordinator, so old segments go even when nothing new arrives.
    pub fn expire(&mut self) -> Result<u64, SpoolError> {
        self.drop_old_segments(SystemTime::now())
    }

    fn remove_segment(&self, seq: u64) -> Result<(), SpoolError> {
        let path = segment_path(&self.dir, seq);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The stored cursor, when it names a position in a segment that still
    /// exists; else the start of the first segment.
    fn read_cursor(&self) -> Position {
        let start = self.segments.front().map_or(
            Position {
                seq: 0,
                offset: 0,
                index: 0,
            },
            |s| Position {
                seq: s.seq,
                offset: 0,
                index: 0,
            },
        );
        let Ok(text) = std::fs::read_to_string(self.dir.join("cursor")) else {
            return start;
        };
        let numbers: Vec<u64> = text
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        let &[seq, offset, index] = numbers.as_slice() else {
            tracing::warn!(
                "the result buffer's cursor file is unreadable; replaying from the oldest result"
            );
            return start;
        };
        match self.segments.iter().find(|s| s.seq == seq) {
            Some(s) if offset <= s.len && index <= s.records => Position { seq, offset, index },
            // Its segment was delivered and deleted: start at the next one.
            None if self.segments.iter().all(|s| s.seq > seq) => start,
            _ => {
                tracing::warn!("the result buffer's cursor points past its segment; replaying from the oldest result");
                start
            }
        }
    }

    fn write_cursor(&self) -> Result<(), SpoolError> {
        let path = self.dir.join("cursor");
        let text = format!(
            "{} {} {}\n",
            self.cursor.seq, self.cursor.offset, self.cursor.index
        );
        muster_common::secret::write_private_file(&path, text.as_bytes()).map_err(io(&path))
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.seg"))
}

/// The length of the valid prefix of a segment and how many records it
/// holds: reading stops at the first record whose length or checksum is bad.
fn scan(path: &Path) -> Result<(u64, u64), SpoolError> {
    let file = File::open(path).map_err(io(path))?;
    let mut reader = BufReader::new(file);
    let (mut len, mut records) = (0u64, 0u64);
    loop {
        match read_record(&mut reader) {
            Ok(Some(payload)) => {
                len += HEADER + payload.len() as u64;
                records += 1;
            }
            Ok(None) => return Ok((len, records)),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Ok((len, records)),
            Err(e) => return Err(io(path)(e)),
        }
    }
}

/// The next record's payload; `None` at a clean or torn end. A bad length
/// or checksum is `InvalidData`.
fn read_record(reader: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; HEADER as usize];
    if !read_full(reader, &mut header)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_RECORD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad record length",
        ));
    }
    let mut payload = vec![0u8; len as usize];
    if !read_full(reader, &mut payload)? {
        return Ok(None);
    }
    if crc32fast::hash(&payload) != crc {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad record checksum",
        ));
    }
    Ok(Some(payload))
}

/// Fills `buf`; `false` when the input ends first.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
