//! The write-ahead log of the embedded engine.
//!
//! Each group commit appends one record and `fdatasync`s it before any of its writes
//! is acknowledged; the B-tree itself is committed without fsync and made durable
//! by periodic checkpoints, after which the log starts over. A sequential append and
//! one small fsync per batch is much cheaper than writing every dirtied B-tree page
//! per batch, and it is what makes an acknowledged write survive a crash.
//!
//! Record: `len: u32 | crc32(body): u32 | body`, body = `seq: u64 | now_ms: u64 |
//! payload`, all big-endian. Reading stops at the first record that is short or whose
//! checksum fails: a torn tail is a record that was never acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// One record read back.
pub struct Record {
    /// The batch sequence number.
    pub seq: u64,
    /// The batch's clock.
    pub now_ms: u64,
    /// The encoded operations.
    pub payload: Vec<u8>,
}

/// An open log.
pub struct Wal {
    file: File,
    len: u64,
    buf: Vec<u8>,
}

impl Wal {
    /// Opens (or creates) the log and reads every intact record in it.
    pub fn open(path: &Path) -> io::Result<(Wal, Vec<Record>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut records = Vec::new();
        let mut at = 0usize;
        while let Some(header) = bytes.get(at..at + 8) {
            let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_be_bytes(header[4..].try_into().expect("4 bytes"));
            let Some(body) = bytes.get(at + 8..at + 8 + len) else {
                break;
            };
            if len < 16 || crc32fast::hash(body) != crc {
                break;
            }
            records.push(Record {
                seq: u64::from_be_bytes(body[..8].try_into().expect("8 bytes")),
                now_ms: u64::from_be_bytes(body[8..16].try_into().expect("8 bytes")),
                payload: body[16..].to_vec(),
            });
            at += 8 + len;
        }
        // Anything after the last intact record is a torn write: cut it off.
        file.set_len(at as u64)?;
        file.seek(SeekFrom::Start(at as u64))?;
        Ok((
            Wal {
                file,
                len: at as u64,
                buf: Vec::new(),
            },
            records,
        ))
    }

    /// Appends one record and makes it durable.
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
        if let Err(e) = self
            .file
            .write_all(&self.buf)
            .and_then(|_| self.file.sync_data())
        {
            // Leave no partial record behind for the next append to follow.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(e);
        }
        self.len += self.buf.len() as u64;
        Ok(())
    }

    /// Bytes in the log.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Empties the log, once everything in it is durable elsewhere.
    pub fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.sync_data()?;
        self.len = 0;
        Ok(())
    }
}

enum Job {
    Append(u64, u64, Vec<u8>),
    Reset,
}

/// The log on a thread of its own, so that an append and its fsync can run while
/// the writer applies the same batch to the B-tree.
pub struct Appender {
    jobs: std::sync::mpsc::Sender<Job>,
    done: std::sync::mpsc::Receiver<io::Result<u64>>,
    len: u64,
    in_flight: bool,
}

impl Appender {
    /// Moves the log to its thread.
    pub fn spawn(mut wal: Wal) -> io::Result<Appender> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let len = wal.len();
        std::thread::Builder::new()
            .name("amphora-wal".into())
            .spawn(move || {
                for job in job_rx {
                    let result = match job {
                        Job::Append(seq, now_ms, payload) => wal.append(seq, now_ms, &payload),
                        Job::Reset => wal.reset(),
                    };
                    if done_tx.send(result.map(|()| wal.len())).is_err() {
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

    /// Starts appending a record; [`Appender::finish`] waits for it to be durable.
    pub fn start(&mut self, seq: u64, now_ms: u64, payload: Vec<u8>) {
        debug_assert!(!self.in_flight, "one append at a time");
        self.in_flight = self.jobs.send(Job::Append(seq, now_ms, payload)).is_ok();
    }

    /// Waits for the append started last.
    pub fn finish(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.in_flight) {
            return Err(io::Error::other("the log thread is gone"));
        }
        self.wait()
    }

    fn wait(&mut self) -> io::Result<()> {
        let len = self
            .done
            .recv()
            .map_err(|_| io::Error::other("the log thread is gone"))??;
        self.len = len;
        Ok(())
    }

    /// Bytes in the log.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Empties the log.
    pub fn reset(&mut self) -> io::Result<()> {
        self.jobs
            .send(Job::Reset)
            .map_err(|_| io::Error::other("the log thread is gone"))?;
        self.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_intact_records_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let (mut w, recs) = Wal::open(&path).unwrap();
        assert!(recs.is_empty());
        w.append(1, 10, b"one").unwrap();
        w.append(2, 20, b"two").unwrap();
        drop(w);
        // A torn third record: the header and half a body.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 40, 1, 2, 3, 4, 9, 9]).unwrap();
        drop(f);
        let (mut w, recs) = Wal::open(&path).unwrap();
        let got: Vec<(u64, u64, Vec<u8>)> = recs
            .into_iter()
            .map(|r| (r.seq, r.now_ms, r.payload))
            .collect();
        assert_eq!(got, [(1, 10, b"one".to_vec()), (2, 20, b"two".to_vec())]);
        w.append(3, 30, b"three").unwrap();
        drop(w);
        let (mut w, recs) = Wal::open(&path).unwrap();
        assert_eq!(recs.last().map(|r| r.seq), Some(3));
        // A flipped bit ends the log at that record.
        w.reset().unwrap();
        w.append(4, 40, b"four").unwrap();
        drop(w);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let (_, recs) = Wal::open(&path).unwrap();
        assert!(recs.is_empty());
    }
}
