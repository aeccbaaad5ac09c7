//! redb's file, written back to the disk in small steps before each fsync.
//!
//! A durable checkpoint hands the kernel every page the B-tree changed since the last
//! one (tens of MiB under load) and fsyncs. Issued at once, those writes fill the
//! disk's queue and its write cache, and the write-ahead log's `fdatasync`, which
//! every acknowledged write waits for, queues behind them: on a virtio disk, 28 MiB of
//! random pages made the log's syncs take 20-40 ms instead of 0.3 ms. Here `sync_data`
//! first writes the file back 256 KiB at a time, waiting for each step and then
//! resting as long as it took, so the checkpoint takes at most half of the disk's
//! time and a log sync finds at most one step ahead of it; the fsync that follows has
//! almost nothing left to write (same 28 MiB: log syncs at most 3-7 ms).

use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redb::StorageBackend;
use redb::backends::FileBackend;

/// Bytes written back per step.
const STEP: u64 = 256 * 1024;

/// A step faster than this wrote nothing (the range was clean): no rest after it.
const CLEAN: Duration = Duration::from_micros(50);

/// redb's own file backend, with paced write-back before each sync.
#[derive(Debug)]
pub(crate) struct PacedFile {
    inner: FileBackend,
    /// The same open file, for the write-back calls.
    file: File,
}

impl PacedFile {
    pub(crate) fn new(file: File) -> io::Result<PacedFile> {
        let handle = file.try_clone()?;
        let inner = FileBackend::new(file).map_err(io::Error::other)?;
        Ok(PacedFile {
            inner,
            file: handle,
        })
    }

    fn write_back(&self) -> io::Result<()> {
        write_back(&self.file)
    }
}

/// Writes every dirty page of `file` to the disk, one step at a time, resting after
/// each as long as it took (see above). Sorted runs (`run.rs`) use it too: a durable
/// checkpoint fsyncs every run written since the last one, tens of MiB under load.
pub(crate) fn write_back(file: &File) -> io::Result<()> {
    static NEVER: AtomicBool = AtomicBool::new(false);
    write_back_unless(file, &NEVER)
}

/// [`write_back`], given up between two steps once `stop` is set (an
/// [`io::ErrorKind::Interrupted`] error): a merge's output, which may be the whole
/// store, is written back while the store may be closing.
#[cfg(target_os = "linux")]
pub(crate) fn write_back_unless(file: &File, stop: &AtomicBool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    let mut offset = 0;
    while offset < len {
        if stop.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the write-back was stopped",
            ));
        }
        let started = Instant::now();
        // SAFETY: `fd` belongs to `file`, open for the whole call; the call only reads
        // its arguments.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::sync_file_range(fd, offset as i64, STEP as i64, flags) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let took = started.elapsed();
        if took > CLEAN {
            std::thread::sleep(took);
        }
        offset += STEP;
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn write_back_unless(_file: &File, _stop: &AtomicBool) -> io::Result<()> {
    Ok(())
}

impl StorageBackend for PacedFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.write_back()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
