//! The write-ahead log of the embedded engine.
//!
//! Each group commit appends one record and `fdatasync`s it before any of its writes
//! is acknowledged; the B-tree itself is committed without fsync and made durable
//! by periodic checkpoints. A sequential append and one small fsync per batch is
//! much cheaper than writing every dirtied B-tree page per batch, and it is what
//! makes an acknowledged write survive a crash.
//!
//! The log is two files, `NAME.wal` and `NAME.wal.1`, one of them active. A
//! checkpoint switches the active file when it starts and, once its commit is
//! durable, empties the other one: batches logged while the checkpoint runs go to
//! the newly active file and survive it. A file is emptied only when every record in
//! it is covered by a durable checkpoint, so a failed checkpoint leaves its file as
//! it is and the next switch appends after the old records. Reading back takes the
//! records of both files in sequence order; replay skips those the B-tree already
//! holds.
//!
//! The files are recycled, never truncated: each is written full of zeros once
//! ([`PREALLOCATE`]) and records overwrite it from the start. An append inside the
//! file changes no metadata, so its `fdatasync` flushes only the record (about half
//! the time of an append that grows the file, measured) and does not wait for a
//! file-system journal commit, which would also wait for the B-tree's checkpoint
//! writes. Emptying a file only moves its write position back to the start.
//!
//! Record: `len: u32 | crc32(body): u32 | body`, body = `seq: u64 | now_ms: u64 |
//! payload`, all big-endian. Reading a file stops at the first record that is short,
//! whose checksum fails (a torn tail: a record never acknowledged) or whose sequence
//! number is not above the one before (an older record, left from before the file
//! was emptied, that no new one has overwritten yet).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes each log file is written full of zeros to before its first use. A file
/// grows past it when a checkpoint lags (and stays that size).
pub const PREALLOCATE: u64 = 4 * 1024 * 1024;

/// One record read back.
pub struct Record {
    /// The batch sequence number.
    pub seq: u64,
    /// The batch's clock.
    pub now_ms: u64,
    /// The encoded operations.
    pub payload: Vec<u8>,
}

/// One of the two files.
struct Segment {
    file: File,
    len: u64,
    /// The highest sequence number in the file (0: none).
    max_seq: u64,
}

impl Segment {
    fn open(path: &Path, records: &mut Vec<Record>) -> io::Result<Segment> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut at = 0usize;
        let mut max_seq = 0;
        while let Some(header) = bytes.get(at..at + 8) {
            let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_be_bytes(header[4..].try_into().expect("4 bytes"));
            let Some(body) = bytes.get(at + 8..at + 8 + len) else {
                break;
            };
            if len < 16 || crc32fast::hash(body) != crc {
                break;
            }
            let seq = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
            if seq <= max_seq {
                break;
            }
            max_seq = seq;
            records.push(Record {
                seq,
                now_ms: u64::from_be_bytes(body[8..16].try_into().expect("8 bytes")),
                payload: body[16..].to_vec(),
            });
            at += 8 + len;
        }
        // Anything after the last record is a torn write or older records: the next
        // append overwrites it.
        let size = bytes.len() as u64;
        if size < PREALLOCATE {
            file.seek(SeekFrom::End(0))?;
            let zeros = vec![0u8; 1024 * 1024];
            let mut left = PREALLOCATE - size;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(at as u64))?;
        Ok(Segment {
            file,
            len: at as u64,
            max_seq,
        })
    }

    /// Makes the file empty for the next records. What it held stays until they
    /// overwrite it; a checkpoint covers all of it, so replay would skip it anyway.
    fn empty(&mut self) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        self.len = 0;
        self.max_seq = 0;
        Ok(())
    }
}

/// An open log.
pub struct Wal {
    segments: [Segment; 2],
    active: usize,
    buf: Vec<u8>,
}

/// The second file's path: `NAME.wal.1` beside `NAME.wal`.
fn second(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl Wal {
    /// Opens (or creates) the log and reads every intact record in it, in sequence
    /// order.
    pub fn open(path: &Path) -> io::Result<(Wal, Vec<Record>)> {
        let mut records = Vec::new();
        let first = Segment::open(path, &mut records)?;
        let other = Segment::open(&second(path), &mut records)?;
        // Both files must be on disk before an acknowledged record depends on them.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        records.sort_by_key(|r| r.seq);
        // Sequence numbers are never reused (a failed append stops the writes), so
        // two records with one number mean the log cannot be trusted to replay.
        if let Some(pair) = records.windows(2).find(|w| w[0].seq == w[1].seq) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "two write-ahead log records have sequence number {}",
                    pair[0].seq
                ),
            ));
        }
        // Append where the newest record is, so records stay in order within a file.
        let active = usize::from(other.max_seq > first.max_seq);
        Ok((
            Wal {
                segments: [first, other],
                active,
                buf: Vec::new(),
            },
            records,
        ))
    }

    /// Appends one record to the active file and makes it durable.
    pub fn append(&mut self, seq: u64, now_ms: u64, payload: &[u8]) -> io::Result<()> {
        let body_len = 16 + payload.len();
        self.buf.clear();
        self.buf.extend_from_slice(&(body_len as u32).to_be_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&seq.to_be_bytes());
        self.buf.extend_from_slice(&now_ms.to_be_bytes());
        self.buf.extend_from_slice(payload);
        let crc = crc32fast::hash(&self.buf[8..]);
        self.buf[4..8].copy_from_slice(&crc.to_be_bytes());
        let segment = &mut self.segments[self.active];
        if let Err(e) = segment
            .file
            .write_all(&self.buf)
            .and_then(|_| segment.file.sync_data())
        {
            // The record may be whole in the file (a failed `fdatasync` leaves it in
            // the page cache, perhaps on the disk), so a restart may replay it: the
            // writer logs nothing more and refuses writes until then (see
            // `Writer::apply`). A record after it could be read back behind it.
            let _ = segment.file.seek(SeekFrom::Start(segment.len));
            return Err(e);
        }
        segment.len += self.buf.len() as u64;
        segment.max_seq = segment.max_seq.max(seq);
        Ok(())
    }

    /// Bytes in the active file.
    pub fn len(&self) -> u64 {
        self.segments[self.active].len
    }

    /// Makes the other file the active one (a checkpoint starts).
    pub fn switch(&mut self) {
        self.active = 1 - self.active;
    }

    /// Empties each file whose records a durable checkpoint of batch `seq` holds.
    pub fn release(&mut self, seq: u64) -> io::Result<()> {
        for segment in &mut self.segments {
            if segment.len > 0 && segment.max_seq <= seq {
                segment.empty()?;
            }
        }
        Ok(())
    }
}

enum Job {
    Append(u64, u64, Vec<u8>),
    Switch,
    /// Empties what a checkpoint covers; answers through `done` when asked to.
    Release(u64, bool),
}

/// The log on a thread of its own, so that an append and its fsync can run while
/// the writer applies the same batch to the B-tree.
pub struct Appender {
    jobs: std::sync::mpsc::Sender<Job>,
    done: std::sync::mpsc::Receiver<io::Result<()>>,
    len: Arc<AtomicU64>,
    in_flight: bool,
}

impl Appender {
    /// Moves the log to its thread.
    pub fn spawn(mut wal: Wal) -> io::Result<Appender> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let len = Arc::new(AtomicU64::new(wal.len()));
        let shared_len = len.clone();
        std::thread::Builder::new()
            .name("amphora-wal".into())
            .spawn(move || {
                for job in job_rx {
                    let answer = match job {
                        Job::Append(seq, now_ms, payload) => {
                            Some(wal.append(seq, now_ms, &payload))
                        }
                        Job::Switch => {
                            wal.switch();
                            None
                        }
                        Job::Release(seq, answer) => {
                            let result = wal.release(seq);
                            if let Err(e) = &result {
                                // The records stay; replay skips what the B-tree holds.
                                tracing::warn!(error = %e, "emptying a write-ahead log file failed");
                            }
                            answer.then_some(result)
                        }
                    };
                    shared_len.store(wal.len(), Ordering::Release);
                    if let Some(result) = answer
                        && done_tx.send(result).is_err()
                    {
                        break;
                    }
                }
            })?;
        Ok(Appender {
            jobs,
            done,
            len,
            in_flight: false,
        })
    }

    fn send(&self, job: Job) -> io::Result<()> {
        self.jobs
            .send(job)
            .map_err(|_| io::Error::other("the log thread is gone"))
    }

    /// Starts appending a record; [`Appender::finish`] waits for it to be durable.
    pub fn start(&mut self, seq: u64, now_ms: u64, payload: Vec<u8>) {
        debug_assert!(!self.in_flight, "one append at a time");
        self.in_flight = self.send(Job::Append(seq, now_ms, payload)).is_ok();
    }

    /// Waits for the append started last.
    pub fn finish(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.in_flight) {
            return Err(io::Error::other("the log thread is gone"));
        }
        self.wait()
    }

    fn wait(&mut self) -> io::Result<()> {
        self.done
            .recv()
            .map_err(|_| io::Error::other("the log thread is gone"))?
    }

    /// Bytes in the active file (as of the last job the thread finished).
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Makes the other file active: appends from now on go there.
    pub fn switch(&mut self) -> io::Result<()> {
        self.send(Job::Switch)
    }

    /// Empties, in the background, the files a durable checkpoint of batch `seq`
    /// covers.
    pub fn release(&mut self, seq: u64) -> io::Result<()> {
        self.send(Job::Release(seq, false))
    }

    /// [`Appender::release`], waiting for it.
    pub fn release_now(&mut self, seq: u64) -> io::Result<()> {
        debug_assert!(!self.in_flight, "no append in flight");
        self.send(Job::Release(seq, true))?;
        self.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn reads_back_intact_records_and_overwrites_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let (mut w, recs) = Wal::open(&path).unwrap();
        assert!(recs.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOCATE);
        w.append(1, 10, b"one").unwrap();
        w.append(2, 20, b"two").unwrap();
        let end = w.len();
        drop(w);
        // A torn third record: the header and half a body.
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(end)).unwrap();
        f.write_all(&[0, 0, 0, 40, 1, 2, 3, 4, 9, 9]).unwrap();
        drop(f);
        let (mut w, recs) = Wal::open(&path).unwrap();
        let got: Vec<(u64, u64, Vec<u8>)> = recs
            .into_iter()
            .map(|r| (r.seq, r.now_ms, r.payload))
            .collect();
        assert_eq!(got, [(1, 10, b"one".to_vec()), (2, 20, b"two".to_vec())]);
        assert_eq!(w.len(), end);
        w.append(3, 30, b"three").unwrap();
        drop(w);
        let (mut w, recs) = Wal::open(&path).unwrap();
        assert_eq!(seqs(&recs), [1, 2, 3]);
        // Emptied, the file keeps its size and its old records, which the next
        // record overwrites from the start.
        w.release(3).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOCATE);
        w.append(4, 40, b"four").unwrap();
        drop(w);
        let (_, recs) = Wal::open(&path).unwrap();
        assert_eq!(
            seqs(&recs),
            [4],
            "records older than the first stop the reading"
        );
        // A flipped bit ends the log at that record.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let (_, recs) = Wal::open(&path).unwrap();
        assert!(recs.is_empty());
    }

    #[test]
    fn two_records_with_one_sequence_number_refuse_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let (mut w, _) = Wal::open(&path).unwrap();
        w.append(1, 10, b"a").unwrap();
        w.switch();
        w.append(2, 20, b"b").unwrap();
        w.append(3, 30, b"c").unwrap();
        // A second record 2 in the first file, as a reused number would leave.
        w.switch();
        w.append(2, 40, b"d").unwrap();
        drop(w);
        let err = Wal::open(&path).err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("sequence number 2"), "{err}");
    }

    #[test]
    fn a_switch_keeps_later_records_and_release_drops_only_covered_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let (mut w, _) = Wal::open(&path).unwrap();
        w.append(1, 10, b"a").unwrap();
        w.append(2, 20, b"b").unwrap();
        // A checkpoint of batch 2 starts; batches 3 and 4 come in while it runs.
        w.switch();
        w.append(3, 30, b"c").unwrap();
        w.append(4, 40, b"d").unwrap();
        let (_, recs) = Wal::open(&path).unwrap();
        assert_eq!(seqs(&recs), [1, 2, 3, 4]);
        // It is durable: only the first file is emptied (its records stay on disk,
        // covered by the checkpoint, until overwritten).
        w.release(2).unwrap();
        assert_eq!(w.segments[0].len, 0);
        assert_eq!(w.segments[1].len, w.len());
        // The next checkpoint (of batch 4) fails: nothing is released, and the
        // switch back writes 5 over the start of the first file.
        w.switch();
        w.append(5, 50, b"e").unwrap();
        // A later checkpoint of batch 5 switches again: the second file, with 3 and
        // 4, goes on receiving; it can't be released until a checkpoint covers 6.
        w.switch();
        w.append(6, 60, b"f").unwrap();
        w.release(5).unwrap();
        assert_eq!(w.segments[0].len, 0);
        let (mut reopened, recs) = Wal::open(&path).unwrap();
        // 5 was released but stays readable until overwritten; replay skips it.
        assert_eq!(seqs(&recs), [3, 4, 5, 6]);
        // Reopened, it appends to the file with the newest record.
        assert_eq!(reopened.active, 1);
        reopened.append(7, 70, b"g").unwrap();
        reopened.release(7).unwrap();
        assert_eq!(reopened.segments.iter().map(|s| s.len).sum::<u64>(), 0);
    }
}
