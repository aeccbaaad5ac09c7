//! Sorted runs: immutable files of key-ordered entries.
//!
//! `kvruns.rs` keeps the store's `kv` in runs (docs/design/put-path.md, "What the
//! store must become"). A run is written once, front to
//! back, from entries in strictly increasing key order, and never changed after;
//! newer runs shadow older ones, and a merge replaces several runs by one. An entry
//! is a record or a tombstone (the key was deleted after an older run stored it).
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! block*  entry*, then one u32 offset per entry, the entry count (u32), and the
//!         CRC32 of everything before it in the block (u32)
//!         entry: key length u32 | value length u32 (u32::MAX: a tombstone) | key | value
//! index   per block: offset u64 | length u32 | first key's length u32 | first key;
//!         then the CRC32 of the index
//! bloom   the filter's words (u64 each), then their CRC32
//! footer  MAGIC | version u32 | entries u64 | index offset u64 | index length u32 |
//!         bloom offset u64 | bloom length u32 | CRC32 of the footer before it
//! ```
//!
//! A block holds about [`BLOCK_TARGET`] bytes; an entry larger than that gets a
//! block of its own. The index and the Bloom filter (10 bits per key) stay in memory
//! while a run is open; a lookup reads one block with `pread` (no mmap: mapped pages
//! would count in the server's RSS) and checks its CRC before trusting a byte of it.
//! Every length read from the file is checked against what holds it, so a torn or
//! damaged run is refused with [`StoreError::Corrupted`], never read out of bounds.

use crate::{Result, StoreError};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"AMPHRUN\0";
const VERSION: u32 = 1;
const FOOTER_LEN: usize = 48;
/// The size a block is cut at.
pub(crate) const BLOCK_TARGET: usize = 4096;
const TOMBSTONE: u32 = u32::MAX;
/// The largest entry a run takes (keeps every length and offset in a u32).
const MAX_ENTRY: usize = 1 << 30;
const BLOOM_BITS_PER_KEY: usize = 10;
const BLOOM_PROBES: u32 = 7;

/// What a run holds for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    /// The key's record.
    Record(Vec<u8>),
    /// The key was deleted.
    Tombstone,
}

fn corrupted(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupted(format!("run {}: {what}", path.display()))
}

fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("run {}: {e}", path.display()))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// `bytes` without its trailing CRC32, if that CRC matches.
fn checked(bytes: &[u8]) -> Option<&[u8]> {
    let body = bytes.len().checked_sub(4)?;
    (crc32fast::hash(&bytes[..body]) == u32_at(bytes, body)?).then(|| &bytes[..body])
}

fn with_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// The final mix of MurmurHash3's 64-bit finalizer.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A key's 64-bit hash for the Bloom filter. Part of the file format: it must
/// never change (a filter built with another hash answers "absent" wrongly).
fn key_hash(key: &[u8]) -> u64 {
    let step = |h: u64, word: u64| {
        (h ^ word)
            .wrapping_mul(0x87c3_7b91_1142_53d5)
            .rotate_left(31)
    };
    let mut h = 0x9e37_79b9_7f4a_7c15 ^ key.len() as u64;
    let mut words = key.chunks_exact(8);
    for word in &mut words {
        h = step(h, u64::from_le_bytes(word.try_into().expect("8 bytes")));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        h = step(h, u64::from_le_bytes(last));
    }
    mix(h)
}

/// A blocked Bloom filter: each key sets [`BLOOM_PROBES`] bits of one 512-bit
/// block (one cache line), chosen from its hash. Part of the file format.
struct Bloom {
    words: Vec<u64>,
}

impl Bloom {
    fn build(hashes: &[u64]) -> Bloom {
        let blocks = (hashes.len() * BLOOM_BITS_PER_KEY).div_ceil(512).max(1);
        let mut words = vec![0; blocks * 8];
        for &h in hashes {
            for (word, bit) in Self::probes(h, blocks) {
                words[word] |= bit;
            }
        }
        Bloom { words }
    }

    /// The (word, bit) pairs of a hash in a filter of `blocks` blocks.
    fn probes(h: u64, blocks: usize) -> impl Iterator<Item = (usize, u64)> {
        let block = (((h >> 32) * blocks as u64) >> 32) as usize * 8;
        let mut bits = mix(h ^ 0x2545_f491_4f6c_dd1d);
        (0..BLOOM_PROBES).map(move |_| {
            let bit = (bits & 511) as usize;
            bits >>= 9;
            (block + bit / 64, 1u64 << (bit % 64))
        })
    }

    fn may_contain(&self, h: u64) -> bool {
        Self::probes(h, self.words.len() / 8).all(|(word, bit)| self.words[word] & bit != 0)
    }
}

/// The blocks' places and first keys as a run is written or opened, side by side
/// (a `Box` per key cost twice the memory while a large merge was written).
#[derive(Default)]
struct IndexBuilder {
    keys: Vec<u8>,
    /// Where each first key ends in `keys`.
    key_ends: Vec<u32>,
    offsets: Vec<u64>,
    lens: Vec<u32>,
}

impl IndexBuilder {
    fn push(&mut self, offset: u64, len: u32, first_key: &[u8]) {
        self.keys.extend_from_slice(first_key);
        self.key_ends.push(self.keys.len() as u32);
        self.offsets.push(offset);
        self.lens.push(len);
    }

    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 {
            0
        } else {
            self.key_ends[i - 1] as usize
        };
        &self.keys[start..self.key_ends[i] as usize]
    }

    /// The index an open run keeps: the first keys' common prefix once.
    fn build(self) -> Index {
        let n = self.offsets.len();
        let prefix: Box<[u8]> = match n {
            0 => Box::default(),
            _ => {
                let (first, last) = (self.key(0), self.key(n - 1));
                let shared = first.iter().zip(last).take_while(|(a, b)| a == b).count();
                first[..shared].into()
            }
        };
        // Sorted between the first and the last, every first key has the prefix.
        let mut rests = Vec::with_capacity(self.keys.len() - n * prefix.len());
        let mut ends = Vec::with_capacity(n);
        for i in 0..n {
            rests.extend_from_slice(&self.key(i)[prefix.len()..]);
            ends.push(rests.len() as u32);
        }
        let (mut offsets, mut lens) = (self.offsets, self.lens);
        offsets.shrink_to_fit();
        lens.shrink_to_fit();
        Index {
            prefix,
            rests,
            ends,
            offsets,
            lens,
        }
    }
}

/// The blocks' places and first keys, as an open run keeps them: the first keys'
/// common prefix once, and the rest of each side by side (keys in one context and
/// family share most of their bytes).
struct Index {
    prefix: Box<[u8]>,
    rests: Vec<u8>,
    /// Where each first key's rest ends in `rests`.
    ends: Vec<u32>,
    offsets: Vec<u64>,
    lens: Vec<u32>,
}

impl Index {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn rest(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.rests[start..self.ends[i] as usize]
    }

    /// How many blocks have a first key not after `key`.
    fn not_after(&self, key: &[u8]) -> usize {
        let Some(rest) = key.strip_prefix(&*self.prefix) else {
            // Every first key starts with the prefix: all sort before `key`, or all
            // after it.
            return if key > &*self.prefix { self.len() } else { 0 };
        };
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let mid = (low + high) / 2;
            if self.rest(mid) <= rest {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low
    }
}

/// Writes a run. Entries must come in strictly increasing key order.
pub(crate) struct RunWriter {
    path: PathBuf,
    out: BufWriter<File>,
    written: u64,
    /// The length of the recycled file it overwrites (0 for a new file).
    reused: u64,
    block: Vec<u8>,
    offsets: Vec<u32>,
    blocks: IndexBuilder,
    hashes: Vec<u64>,
    entries: u64,
    last_key: Vec<u8>,
}

impl RunWriter {
    /// Starts a run at `path`, which must not exist. After an error the partial
    /// file is the caller's to delete.
    pub(crate) fn create(path: &Path) -> Result<RunWriter> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        Ok(RunWriter::on(path, file, 0))
    }

    /// Starts a run at `path` in the file `spare`, renamed to `path` (which must not
    /// exist) and overwritten from the start; `finish` cuts off what is left of
    /// the old contents. Cheaper than a new file: no inode is allocated or freed,
    /// and blocks the new run overwrites need no allocation. Nobody may read
    /// `spare` any more.
    pub(crate) fn reuse(spare: &Path, path: &Path) -> Result<RunWriter> {
        std::fs::rename(spare, path).map_err(|e| io_error(spare, e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        let reused = file.metadata().map_err(|e| io_error(path, e))?.len();
        Ok(RunWriter::on(path, file, reused))
    }

    fn on(path: &Path, file: File, reused: u64) -> RunWriter {
        RunWriter {
            path: path.to_owned(),
            out: BufWriter::with_capacity(256 * 1024, file),
            written: 0,
            reused,
            block: Vec::with_capacity(BLOCK_TARGET),
            offsets: Vec::new(),
            blocks: IndexBuilder::default(),
            hashes: Vec::new(),
            entries: 0,
            last_key: Vec::new(),
        }
    }

    /// Appends an entry; its key must sort after the previous one's.
    pub(crate) fn add(&mut self, key: &[u8], entry: &Entry) -> Result<()> {
        let record = match entry {
            Entry::Record(v) => Some(v.as_slice()),
            Entry::Tombstone => None,
        };
        self.add_record(key, record)
    }

    /// [`RunWriter::add`] of a record, or of a tombstone for `None`.
    pub(crate) fn add_record(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        if self.entries > 0 && key <= self.last_key.as_slice() {
            return Err(corrupted(&self.path, "keys added out of order"));
        }
        let size = 8 + key.len() + value.map_or(0, <[u8]>::len);
        if size > MAX_ENTRY {
            return Err(corrupted(&self.path, "an entry of 1 GiB or more"));
        }
        // Both fit: the entry is smaller than 1 GiB.
        let key_len = key.len() as u32;
        let value_len = value.map_or(TOMBSTONE, |v| v.len() as u32);
        // The block's table grows by 4 bytes per entry; 8 more for count and CRC.
        let full = self.block.len() + size + 4 * (self.offsets.len() + 1) + 8 > BLOCK_TARGET;
        if !self.offsets.is_empty() && full {
            self.end_block()?;
        }
        if self.offsets.is_empty() {
            self.blocks.push(self.written, 0, key);
        }
        self.offsets.push(self.block.len() as u32);
        self.block.extend_from_slice(&key_len.to_le_bytes());
        self.block.extend_from_slice(&value_len.to_le_bytes());
        self.block.extend_from_slice(key);
        self.block.extend_from_slice(value.unwrap_or_default());
        self.hashes.push(key_hash(key));
        self.entries += 1;
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        Ok(())
    }

    fn end_block(&mut self) -> Result<()> {
        for offset in &self.offsets {
            self.block.extend_from_slice(&offset.to_le_bytes());
        }
        self.block
            .extend_from_slice(&(self.offsets.len() as u32).to_le_bytes());
        let block = with_crc(std::mem::take(&mut self.block));
        self.write(&block)?;
        if let Some(last) = self.blocks.lens.last_mut() {
            *last = block.len() as u32;
        }
        self.offsets.clear();
        self.block = block;
        self.block.clear();
        Ok(())
    }

    /// [`RunWriter::write`], feeding `crc` too.
    fn write_summed(&mut self, crc: &mut crc32fast::Hasher, bytes: &[u8]) -> Result<()> {
        crc.update(bytes);
        self.write(bytes)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| io_error(&self.path, e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Writes the index, the filter and the footer; with `sync`, makes the file
    /// durable (its directory entry is the caller's business). Answers the run,
    /// open for reading.
    pub(crate) fn finish(mut self, sync: bool) -> Result<Run> {
        if !self.offsets.is_empty() {
            self.end_block()?;
        }
        // The index and the filter go straight to the file, not through a copy each.
        let blocks = std::mem::take(&mut self.blocks);
        let index_offset = self.written;
        let mut crc = crc32fast::Hasher::new();
        for i in 0..blocks.offsets.len() {
            let key = blocks.key(i);
            self.write_summed(&mut crc, &blocks.offsets[i].to_le_bytes())?;
            self.write_summed(&mut crc, &blocks.lens[i].to_le_bytes())?;
            self.write_summed(&mut crc, &(key.len() as u32).to_le_bytes())?;
            self.write_summed(&mut crc, key)?;
        }
        self.write(&crc.finalize().to_le_bytes())?;
        let bloom = Bloom::build(&std::mem::take(&mut self.hashes));
        let bloom_offset = self.written;
        let mut crc = crc32fast::Hasher::new();
        for word in &bloom.words {
            self.write_summed(&mut crc, &word.to_le_bytes())?;
        }
        self.write(&crc.finalize().to_le_bytes())?;
        let mut footer = Vec::with_capacity(FOOTER_LEN);
        footer.extend_from_slice(MAGIC);
        footer.extend_from_slice(&VERSION.to_le_bytes());
        footer.extend_from_slice(&self.entries.to_le_bytes());
        footer.extend_from_slice(&index_offset.to_le_bytes());
        // The footer holds the index's and the filter's lengths in 4 bytes each
        // (over 3 billion keys in one run): a larger run is refused, not cut short.
        let fit = |len: u64| {
            u32::try_from(len).map_err(|_| {
                io_error(
                    &self.path,
                    std::io::Error::other("a run's index or filter over 4 GiB"),
                )
            })
        };
        let (index_len, bloom_len) = (
            fit(bloom_offset - index_offset)?,
            fit(self.written - bloom_offset)?,
        );
        footer.extend_from_slice(&index_len.to_le_bytes());
        footer.extend_from_slice(&bloom_offset.to_le_bytes());
        footer.extend_from_slice(&bloom_len.to_le_bytes());
        self.write(&with_crc(footer))?;
        let path = self.path;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_error(&path, e.into_error()))?;
        if self.reused > self.written {
            file.set_len(self.written).map_err(|e| io_error(&path, e))?;
        }
        if sync {
            file.sync_data().map_err(|e| io_error(&path, e))?;
        }
        Ok(Run {
            path,
            file,
            entries: self.entries,
            index: blocks.build(),
            bloom,
            last_key: self.last_key.into(),
        })
    }
}

/// An open run: its index and Bloom filter in memory, its blocks on disk.
pub(crate) struct Run {
    path: PathBuf,
    file: File,
    /// Records and tombstones (the merge policy weighs runs by them).
    entries: u64,
    index: Index,
    bloom: Bloom,
    /// The run's last key (empty for an empty run): lookups and scans past it
    /// read nothing.
    last_key: Box<[u8]>,
}

impl Run {
    /// Opens the run at `path`, checking its footer, index and filter.
    pub(crate) fn open(path: &Path) -> Result<Run> {
        let file = File::open(path).map_err(|e| io_error(path, e))?;
        let len = file.metadata().map_err(|e| io_error(path, e))?.len();
        let read = |offset: u64, len: usize| -> Result<Vec<u8>> {
            let mut bytes = vec![0; len];
            file.read_exact_at(&mut bytes, offset)
                .map_err(|e| io_error(path, e))?;
            Ok(bytes)
        };
        let footer_at = len
            .checked_sub(FOOTER_LEN as u64)
            .ok_or_else(|| corrupted(path, "shorter than its footer"))?;
        let raw = read(footer_at, FOOTER_LEN)?;
        let footer = checked(&raw).ok_or_else(|| corrupted(path, "footer checksum"))?;
        if &footer[..8] != MAGIC {
            return Err(corrupted(path, "not a run file"));
        }
        let field = |at| u64_at(footer, at).expect("inside the footer");
        let version = u32_at(footer, 8).expect("inside the footer");
        if version != VERSION {
            return Err(corrupted(path, format!("format version {version}")));
        }
        let entries = field(12);
        let (index_at, index_len) = (field(20), u64::from(u32_at(footer, 28).expect("inside")));
        let (bloom_at, bloom_len) = (field(32), u64::from(u32_at(footer, 40).expect("inside")));
        if index_at.checked_add(index_len) != Some(bloom_at)
            || bloom_at.checked_add(bloom_len) != Some(footer_at)
        {
            return Err(corrupted(path, "footer offsets"));
        }
        let raw_index = read(index_at, index_len as usize)?;
        let index = checked(&raw_index).ok_or_else(|| corrupted(path, "index checksum"))?;
        let mut blocks = IndexBuilder::default();
        let mut at = 0;
        let mut end_of_data = 0;
        while at < index.len() {
            let (Some(offset), Some(len), Some(key_len)) = (
                u64_at(index, at),
                u32_at(index, at + 8),
                u32_at(index, at + 12),
            ) else {
                return Err(corrupted(path, "index entry"));
            };
            let key = index
                .get(at + 16..at + 16 + key_len as usize)
                .ok_or_else(|| corrupted(path, "index entry"))?;
            if offset != end_of_data {
                return Err(corrupted(path, "index does not cover the data"));
            }
            end_of_data = offset + u64::from(len);
            // `build` and lookups rely on the first keys' order.
            let n = blocks.offsets.len();
            if n > 0 && blocks.key(n - 1) >= key {
                return Err(corrupted(path, "index keys out of order"));
            }
            blocks.push(offset, len, key);
            at += 16 + key_len as usize;
        }
        if end_of_data != index_at {
            return Err(corrupted(path, "index does not cover the data"));
        }
        let raw_bloom = read(bloom_at, bloom_len as usize)?;
        let bloom = checked(&raw_bloom).ok_or_else(|| corrupted(path, "filter checksum"))?;
        if bloom.is_empty() || bloom.len() % 64 != 0 {
            return Err(corrupted(path, "filter size"));
        }
        let words = bloom
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        let mut run = Run {
            path: path.to_owned(),
            file,
            entries,
            index: blocks.build(),
            bloom: Bloom { words },
            last_key: Box::default(),
        };
        if let Some(last) = run.index.len().checked_sub(1) {
            let block = run.read_block(last)?;
            let key: Box<[u8]> = match block.count.checked_sub(1) {
                Some(j) => block.entry(j)?.0.into(),
                None => return Err(corrupted(path, "an empty block")),
            };
            run.last_key = key;
        }
        Ok(run)
    }

    /// Whether the run may hold a key from `start` on that starts with `prefix`
    /// (without reading it: from its first and last keys).
    fn may_hold(&self, start: &[u8], prefix: &[u8]) -> bool {
        if self.index.len() == 0 || start > &*self.last_key {
            return false;
        }
        // Past every key with the prefix: its first key is after the prefix and
        // does not start with it.
        let first = [&*self.index.prefix, self.index.rest(0)].concat();
        first.starts_with(prefix) || first.as_slice() < prefix
    }

    /// How many entries (records and tombstones) the run holds.
    pub(crate) fn entries(&self) -> u64 {
        self.entries
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length in bytes.
    pub(crate) fn file_len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| io_error(&self.path, e))
    }

    /// Makes the file durable (its directory entry is the caller's business),
    /// written back in paced steps first (`paced.rs`): a durable checkpoint syncs
    /// every run written since the last one, and the log's fsyncs must not queue
    /// behind them all.
    pub(crate) fn sync(&self) -> Result<()> {
        crate::paced::write_back(&self.file)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| io_error(&self.path, e))
    }

    /// [`Run::sync`] for a merge's output: given up, with
    /// [`StoreError::Unavailable`], once `stop` is set (the store is closing and the
    /// output will not be named).
    pub(crate) fn sync_unless(&self, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
        match crate::paced::write_back_unless(&self.file, stop) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                Err(StoreError::Unavailable("the merge was stopped".into()))
            }
            written => written
                .and_then(|()| self.file.sync_data())
                .map_err(|e| io_error(&self.path, e)),
        }
    }

    /// The run's entry for `key`, if it has one.
    #[cfg(test)]
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        self.get_hashed(key, key_hash(key))
    }

    /// [`Run::get`] with the key's hash already computed.
    fn get_hashed(&self, key: &[u8], hash: u64) -> Result<Option<Entry>> {
        if key > &*self.last_key || !self.bloom.may_contain(hash) {
            return Ok(None);
        }
        // The last block whose first key is not after `key`.
        let Some(i) = self.index.not_after(key).checked_sub(1) else {
            return Ok(None);
        };
        let block = self.read_block(i)?;
        let (mut low, mut high) = (0, block.count);
        while low < high {
            let mid = (low + high) / 2;
            let (found, entry) = block.entry(mid)?;
            match found.cmp(key) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Ok(Some(entry.owned())),
            }
        }
        Ok(None)
    }

    /// The entries from the first key not before `start`, in key order.
    pub(crate) fn iter_from(&self, start: &[u8]) -> RunIter<'_> {
        let block = self.index.not_after(start).saturating_sub(1);
        RunIter {
            run: self,
            next_block: block,
            current: None,
            position: 0,
            skip_before: Some(start.to_vec()),
            failed: false,
        }
    }

    fn read_block(&self, i: usize) -> Result<Block<'_>> {
        let mut bytes = vec![0; self.index.lens[i] as usize];
        self.file
            .read_exact_at(&mut bytes, self.index.offsets[i])
            .map_err(|e| io_error(&self.path, e))?;
        let body_len = checked(&bytes)
            .ok_or_else(|| corrupted(&self.path, format!("block {i} checksum")))?
            .len();
        bytes.truncate(body_len);
        let count = body_len
            .checked_sub(4)
            .and_then(|at| u32_at(&bytes, at))
            .map(|c| c as usize)
            .ok_or_else(|| corrupted(&self.path, format!("block {i} size")))?;
        let table = (body_len - 4)
            .checked_sub(count.saturating_mul(4))
            .ok_or_else(|| corrupted(&self.path, format!("block {i} entry count")))?;
        Ok(Block {
            run: self,
            bytes,
            count,
            table,
        })
    }
}

/// One block read from a run, its checksum verified.
struct Block<'r> {
    run: &'r Run,
    bytes: Vec<u8>,
    count: usize,
    /// Where the table of entry offsets starts.
    table: usize,
}

/// An entry as it lies in a block.
enum Borrowed<'b> {
    Record(&'b [u8]),
    Tombstone,
}

impl Borrowed<'_> {
    fn owned(&self) -> Entry {
        match self {
            Borrowed::Record(v) => Entry::Record(v.to_vec()),
            Borrowed::Tombstone => Entry::Tombstone,
        }
    }
}

impl Block<'_> {
    /// The `j`th entry's key and value.
    fn entry(&self, j: usize) -> Result<(&[u8], Borrowed<'_>)> {
        let bad = || corrupted(&self.run.path, "entry out of its block's bounds");
        let at = u32_at(&self.bytes, self.table + 4 * j).ok_or_else(bad)? as usize;
        let (Some(key_len), Some(value_len)) =
            (u32_at(&self.bytes, at), u32_at(&self.bytes, at + 4))
        else {
            return Err(bad());
        };
        let key_end = (at + 8)
            .checked_add(key_len as usize)
            .filter(|&end| end <= self.table)
            .ok_or_else(bad)?;
        let key = &self.bytes[at + 8..key_end];
        if value_len == TOMBSTONE {
            return Ok((key, Borrowed::Tombstone));
        }
        let value_end = key_end
            .checked_add(value_len as usize)
            .filter(|&end| end <= self.table)
            .ok_or_else(bad)?;
        Ok((key, Borrowed::Record(&self.bytes[key_end..value_end])))
    }
}

/// A run's entries in key order (see [`Run::iter_from`]). After an error it ends.
pub(crate) struct RunIter<'r> {
    run: &'r Run,
    next_block: usize,
    current: Option<Block<'r>>,
    position: usize,
    /// Entries before this key are skipped (only in the first block read).
    skip_before: Option<Vec<u8>>,
    failed: bool,
}

impl Iterator for RunIter<'_> {
    type Item = Result<(Vec<u8>, Entry)>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.failed {
            if let Some(block) = &self.current
                && self.position < block.count
            {
                let j = self.position;
                self.position += 1;
                let (key, entry) = match block.entry(j) {
                    Ok(found) => found,
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                };
                if self.skip_before.as_deref().is_some_and(|start| key < start) {
                    continue;
                }
                self.skip_before = None;
                return Some(Ok((key.to_vec(), entry.owned())));
            }
            if self.next_block >= self.run.index.len() {
                return None;
            }
            match self.run.read_block(self.next_block) {
                Ok(block) => self.current = Some(block),
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
            self.next_block += 1;
            self.position = 0;
        }
        None
    }
}

/// Several runs' entries as one key-ordered sequence, `sources` newest first: a
/// key's entry from the newest run that has one wins. With `drop_tombstones` (a
/// merge whose output is the oldest data, so nothing older is left to shadow) the
/// deleted keys are left out. After an error it ends.
pub(crate) struct Merge<'r> {
    sources: Vec<RunIter<'r>>,
    /// Each source's next entry; filled at the first call of `next`.
    heads: Vec<Option<(Vec<u8>, Entry)>>,
    primed: bool,
    drop_tombstones: bool,
    failed: bool,
}

impl<'r> Merge<'r> {
    pub(crate) fn new(sources: Vec<RunIter<'r>>, drop_tombstones: bool) -> Merge<'r> {
        Merge {
            heads: sources.iter().map(|_| None).collect(),
            sources,
            primed: false,
            drop_tombstones,
            failed: false,
        }
    }

    fn refill(&mut self, i: usize) -> Result<()> {
        self.heads[i] = self.sources[i].next().transpose()?;
        Ok(())
    }

    fn step(&mut self) -> Result<Option<(Vec<u8>, Entry)>> {
        if !self.primed {
            self.primed = true;
            for i in 0..self.sources.len() {
                self.refill(i)?;
            }
        }
        loop {
            // The smallest key; among equal keys the newest source's (first found).
            let mut winner: Option<usize> = None;
            for (i, head) in self.heads.iter().enumerate() {
                if let Some((key, _)) = head
                    && winner.is_none_or(|w| {
                        key < &self.heads[w].as_ref().expect("a winner has a head").0
                    })
                {
                    winner = Some(i);
                }
            }
            let Some(w) = winner else {
                return Ok(None);
            };
            let (key, entry) = self.heads[w].take().expect("the winner has a head");
            self.refill(w)?;
            // Older sources' entries for the same key are shadowed.
            for i in w + 1..self.sources.len() {
                if self.heads[i].as_ref().is_some_and(|(k, _)| *k == key) {
                    self.refill(i)?;
                }
            }
            if self.drop_tombstones && entry == Entry::Tombstone {
                continue;
            }
            return Ok(Some((key, entry)));
        }
    }
}

impl Iterator for Merge<'_> {
    type Item = Result<(Vec<u8>, Entry)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let next = self.step().transpose();
        self.failed = matches!(next, Some(Err(_)));
        next
    }
}

/// How many times the entries of the oldest run those of the runs newer than it may
/// reach before [`RunSet::next_merge`] merges them all: the runs then hold at most
/// about `SPACE_FACTOR + 1` times the entries of a store written over and over.
pub(crate) const SPACE_FACTOR: u64 = 2;

/// Past this many runs, [`RunSet::next_merge`] asks for merges of one tier before a
/// merge of everything.
pub(crate) const PILE_UP: usize = 16;

/// How many entries a merge writes between two looks at its stop flag.
const STOP_CHECK: usize = 4096;

/// A run in a [`RunSet`], with what the merge policy needs to know of it.
pub(crate) struct Member {
    /// Orders the runs of a set: a higher id holds newer entries. A merge's output
    /// takes its newest input's id.
    pub(crate) id: u64,
    /// 0 for a run a checkpoint wrote; a merge of runs of tier `t` writes one of
    /// tier `t + 1`.
    pub(crate) tier: u32,
    /// The number its file is named by.
    pub(crate) file: u64,
    pub(crate) run: Run,
}

/// A store's runs as readers see them, newest first. Immutable: a checkpoint
/// ([`RunSet::with`]) or a merge ([`RunSet::replace`]) makes a new set, and a
/// reader keeps the one it started with (a merged run's file stays readable while
/// an old set holds it open, even once it is deleted).
#[derive(Clone, Default)]
pub(crate) struct RunSet {
    members: Vec<Arc<Member>>,
}

impl RunSet {
    /// A set of these runs, in any order.
    pub(crate) fn new(members: impl IntoIterator<Item = Member>) -> RunSet {
        let mut members: Vec<_> = members.into_iter().map(Arc::new).collect();
        members.sort_by_key(|m| std::cmp::Reverse(m.id));
        RunSet { members }
    }

    /// The runs, newest first.
    pub(crate) fn members(&self) -> &[Arc<Member>] {
        &self.members
    }

    /// The record under `key`: the newest run's entry for it decides.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let hash = key_hash(key);
        for member in &self.members {
            match member.run.get_hashed(key, hash)? {
                Some(Entry::Record(record)) => return Ok(Some(record)),
                Some(Entry::Tombstone) => return Ok(None),
                None => {}
            }
        }
        Ok(None)
    }

    /// The records from the first key not before `start`, in key order; only
    /// runs that may hold keys with `prefix` from there are read (the caller stops
    /// at the first key without it).
    pub(crate) fn iter_from<'s>(
        &'s self,
        start: &[u8],
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + use<'s> {
        let sources = self
            .members
            .iter()
            .filter(|m| m.run.may_hold(start, prefix))
            .map(|m| m.run.iter_from(start))
            .collect();
        Merge::new(sources, true).map(|item| {
            item.map(|(key, entry)| match entry {
                Entry::Record(record) => (key, record),
                Entry::Tombstone => unreachable!("the merge drops tombstones"),
            })
        })
    }

    /// This set and a newer run.
    pub(crate) fn with(&self, member: Member) -> RunSet {
        debug_assert!(self.members.first().is_none_or(|m| m.id < member.id));
        let mut members = Vec::with_capacity(self.members.len() + 1);
        members.push(Arc::new(member));
        members.extend(self.members.iter().cloned());
        RunSet { members }
    }

    /// The merge the policy asks for next, as a range of [`RunSet::members`]:
    ///
    /// - every run, once the runs newer than the oldest hold [`SPACE_FACTOR`] times
    ///   its entries. Tiers alone would keep a copy of each often-written key in
    ///   every tier, one more tier for each fourfold of writes: 100,000 keys written
    ///   over and over took 11 times their size on disk after 5 million puts, and
    ///   each copy costs its Bloom filter and index in memory. Each such merge
    ///   writes the whole store out once; the next one waits until twice as many
    ///   entries have come in, so for a store that grows, the merges' writes stay
    ///   a fraction of its writes.
    /// - else `fanout` adjacent runs of one tier, from the lowest tier that has that
    ///   many side by side, the oldest of them; these first while more than
    ///   [`PILE_UP`] runs wait (merges fell behind, and a merge of everything would
    ///   take longest while still more pile up).
    pub(crate) fn next_merge(&self, fanout: usize) -> Option<std::ops::Range<usize>> {
        let tiered = self.tier_merge(fanout);
        if tiered.is_some() && self.members.len() > PILE_UP {
            return tiered;
        }
        if let Some((oldest, newer)) = self.members.split_last()
            && !newer.is_empty()
        {
            let newer: u64 = newer.iter().map(|m| m.run.entries()).sum();
            if newer >= SPACE_FACTOR * oldest.run.entries().max(1) {
                return Some(0..self.members.len());
            }
        }
        tiered
    }

    /// The merge of one tier [`RunSet::next_merge`] may ask for.
    fn tier_merge(&self, fanout: usize) -> Option<std::ops::Range<usize>> {
        let fanout = fanout.max(2);
        let mut best: Option<(u32, std::ops::Range<usize>)> = None;
        let mut end = self.members.len();
        // Groups of adjacent runs of one tier, oldest group first.
        while end > 0 {
            let tier = self.members[end - 1].tier;
            let mut start = end - 1;
            while start > 0 && self.members[start - 1].tier == tier {
                start -= 1;
            }
            if end - start >= fanout && best.as_ref().is_none_or(|(t, _)| tier < *t) {
                best = Some((tier, end - fanout..end));
            }
            end = start;
        }
        best.map(|(_, range)| range)
    }

    /// Writes the merge of `inputs` (adjacent members of this set, newest first) to
    /// a new run at `path`: a key's newest entry wins, and tombstones are dropped
    /// when the oldest input is the oldest run of the set (nothing older is left for
    /// them to hide). Once `stop` is set, it ends within [`STOP_CHECK`] entries
    /// with an error, the partial file left to the caller.
    pub(crate) fn merge(
        &self,
        inputs: &[Arc<Member>],
        file: u64,
        path: &Path,
        sync: bool,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Member> {
        let (Some(newest), Some(oldest)) = (inputs.first(), inputs.last()) else {
            return Err(StoreError::Unavailable("a merge of no runs".into()));
        };
        let drop_tombstones = self.members.last().is_some_and(|m| m.id == oldest.id);
        let sources = inputs.iter().map(|m| m.run.iter_from(b"")).collect();
        let mut writer = RunWriter::create(path)?;
        for (n, item) in Merge::new(sources, drop_tombstones).enumerate() {
            if n % STOP_CHECK == 0 && stop.load(std::sync::atomic::Ordering::Acquire) {
                return Err(StoreError::Unavailable("the merge was stopped".into()));
            }
            let (key, entry) = item?;
            writer.add(&key, &entry)?;
        }
        Ok(Member {
            id: newest.id,
            tier: inputs.iter().map(|m| m.tier).max().unwrap_or(0) + 1,
            file,
            run: writer.finish(sync)?,
        })
    }

    /// This set with the runs `inputs` names (by id) replaced by their merge.
    /// Runs added since the merge started stay; the inputs must still be here.
    pub(crate) fn replace(&self, inputs: &[u64], output: Member) -> Result<RunSet> {
        let Some(first) = self.members.iter().position(|m| inputs.contains(&m.id)) else {
            return Err(StoreError::Unavailable("a merge's inputs are gone".into()));
        };
        let last = first + inputs.len();
        if last > self.members.len()
            || !self.members[first..last]
                .iter()
                .all(|m| inputs.contains(&m.id))
        {
            return Err(StoreError::Unavailable(
                "a merge's inputs are not adjacent".into(),
            ));
        }
        let mut members = self.members.clone();
        members.splice(first..last, [Arc::new(output)]);
        Ok(RunSet { members })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;

    fn key(n: u32) -> Vec<u8> {
        format!("kv\0ctx\0fam\0{n:016}").into_bytes()
    }

    fn write(path: &Path, entries: &BTreeMap<Vec<u8>, Entry>) -> Run {
        let mut writer = RunWriter::create(path).unwrap();
        for (k, e) in entries {
            writer.add(k, e).unwrap();
        }
        writer.finish(true).unwrap()
    }

    fn entries() -> impl Strategy<Value = Entry> {
        prop_oneof![
            1 => Just(Entry::Tombstone),
            4 => vec(any::<u8>(), 0..600).prop_map(Entry::Record),
        ]
    }

    fn all(iter: impl Iterator<Item = Result<(Vec<u8>, Entry)>>) -> Vec<(Vec<u8>, Entry)> {
        iter.map(Result::unwrap).collect()
    }

    fn is_corrupted<T>(r: Result<T>) -> bool {
        matches!(r, Err(StoreError::Corrupted(_)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn a_run_reads_back_what_was_written(
            written in btree_map(0u32..5_000, entries(), 0..800),
            probes in vec(0u32..5_200, 40),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let model: BTreeMap<_, _> = written.into_iter().map(|(n, e)| (key(n), e)).collect();
            let path = dir.path().join("run");
            let fresh = write(&path, &model);
            let reopened = Run::open(&path).unwrap();
            for run in [&fresh, &reopened] {
                prop_assert_eq!(run.entries(), model.len() as u64);
                for (k, e) in &model {
                    let got = run.get(k).unwrap();
                    prop_assert_eq!(got.as_ref(), Some(e));
                }
                // Keys from the same family, and keys sorting before and after it.
                let outside = [&b""[..], b"a", b"kv", b"kv\0ctx\0fam\0", b"kv\x01", b"zz"];
                let probes = probes.iter().map(|&n| key(n)).chain(outside.iter().map(|k| k.to_vec()));
                for k in probes {
                    prop_assert_eq!(run.get(&k).unwrap(), model.get(&k).cloned());
                    let want: Vec<_> =
                        model.range(k.clone()..).map(|(k, e)| (k.clone(), e.clone())).collect();
                    prop_assert_eq!(all(run.iter_from(&k)), want);
                }
            }
        }

        #[test]
        fn a_merge_keeps_each_keys_newest_entry(
            runs in vec(btree_map(0u32..300, entries(), 0..200), 1..5),
            drop_tombstones in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            // `runs[0]` is the newest.
            let runs: Vec<BTreeMap<_, _>> = runs
                .into_iter()
                .map(|r| r.into_iter().map(|(n, e)| (key(n), e)).collect())
                .collect();
            let mut model = BTreeMap::new();
            for run in runs.iter().rev() {
                model.extend(run.clone());
            }
            if drop_tombstones {
                model.retain(|_, e| *e != Entry::Tombstone);
            }
            let opened: Vec<Run> = runs
                .iter()
                .enumerate()
                .map(|(i, r)| write(&dir.path().join(format!("run{i}")), r))
                .collect();
            let merged = all(Merge::new(opened.iter().map(|r| r.iter_from(b"")).collect(), drop_tombstones));
            prop_assert_eq!(&merged, &model.into_iter().collect::<Vec<_>>());
            // Written out as one run, the merge reads back the same.
            let mut writer = RunWriter::create(&dir.path().join("merged")).unwrap();
            for (k, e) in &merged {
                writer.add(k, e).unwrap();
            }
            let out = writer.finish(false).unwrap();
            prop_assert_eq!(all(out.iter_from(b"")), merged);
        }
    }

    #[derive(Debug, Clone)]
    enum SetOp {
        /// A checkpoint writes these changes (key number -> entry) as a run.
        Checkpoint(BTreeMap<u32, Entry>),
        /// The policy's next merge, if it asks for one, with this fanout.
        Merge(usize),
    }

    fn set_ops() -> impl Strategy<Value = SetOp> {
        prop_oneof![
            3 => btree_map(0u32..200, entries(), 0..60).prop_map(SetOp::Checkpoint),
            2 => (2usize..4).prop_map(SetOp::Merge),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn a_run_set_reads_as_the_changes_applied_in_order(ops in vec(set_ops(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut set = RunSet::default();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut next_id = 1;
            let mut files = 0;
            let mut path = || {
                files += 1;
                dir.path().join(format!("{files}.run"))
            };
            for op in ops {
                match op {
                    SetOp::Checkpoint(changes) => {
                        let changes: BTreeMap<_, _> =
                            changes.into_iter().map(|(n, e)| (key(n), e)).collect();
                        for (k, e) in &changes {
                            match e {
                                Entry::Record(r) => model.insert(k.clone(), r.clone()),
                                Entry::Tombstone => model.remove(k),
                            };
                        }
                        let run = write(&path(), &changes);
                        set = set.with(Member { id: next_id, tier: 0, file: next_id, run });
                        next_id += 1;
                    }
                    SetOp::Merge(fanout) => {
                        let Some(range) = set.next_merge(fanout) else { continue };
                        let inputs = set.members()[range].to_vec();
                        if inputs.len() < set.members().len() {
                            // Not all of them: a merge of one tier.
                            prop_assert_eq!(inputs.len(), fanout);
                            prop_assert!(inputs.iter().all(|m| m.tier == inputs[0].tier));
                        }
                        let output = set.merge(&inputs, 0, &path(), false, &AtomicBool::new(false)).unwrap();
                        // A checkpoint between the merge's start and its end stays.
                        let late = write(&path(), &BTreeMap::new());
                        set = set.with(Member { id: next_id, tier: 0, file: next_id, run: late });
                        next_id += 1;
                        let ids: Vec<u64> = inputs.iter().map(|m| m.id).collect();
                        set = set.replace(&ids, output).unwrap();
                    }
                }
                let got: Vec<_> = set.iter_from(b"", b"").map(Result::unwrap).collect();
                prop_assert_eq!(&got, &model.clone().into_iter().collect::<Vec<_>>());
                for n in (0..200).step_by(7) {
                    prop_assert_eq!(set.get(&key(n)).unwrap(), model.get(&key(n)).cloned());
                }
                // A scan of one prefix (keys 100-199) reads only the runs that may
                // hold it, and misses nothing.
                let prefix = &key(100)[..key(100).len() - 2];
                for start in [prefix.to_vec(), key(150), key(199), key(250)] {
                    let got: Vec<_> = set
                        .iter_from(&start, prefix)
                        .map(Result::unwrap)
                        .take_while(|(k, _)| k.starts_with(prefix))
                        .collect();
                    let want: Vec<_> = model
                        .range(start.clone()..)
                        .take_while(|(k, _)| k.starts_with(prefix))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    prop_assert_eq!(got, want);
                }
                // Newest first, by id.
                prop_assert!(set.members().windows(2).all(|w| w[0].id > w[1].id));
            }
        }
    }

    #[test]
    fn the_policy_merges_the_oldest_runs_of_the_lowest_tier() {
        let dir = tempfile::tempdir().unwrap();
        let member = |id: u64, tier: u32| Member {
            id,
            tier,
            file: id,
            run: write(&dir.path().join(format!("{id}")), &BTreeMap::new()),
        };
        // Newest first: tiers 0 0 1 1 1 0 0 0 (ids 8..1).
        let tiers = [0, 0, 0, 1, 1, 1, 0, 0];
        let set = RunSet::new((1..=8).map(|id| member(id, tiers[id as usize - 1])));
        let ids = |range: std::ops::Range<usize>| -> Vec<u64> {
            set.members()[range].iter().map(|m| m.id).collect()
        };
        assert_eq!(
            ids(set.next_merge(3).unwrap()),
            [3, 2, 1],
            "tier 0, the oldest group"
        );
        assert_eq!(
            ids(set.next_merge(2).unwrap()),
            [2, 1],
            "the oldest two of it"
        );
        assert_eq!(set.next_merge(4), None, "no four side by side");
        let set = RunSet::new((1..=3).map(|id| member(id + 10, 1)));
        assert_eq!(set.next_merge(3).map(|r| r.len()), Some(3));
    }

    #[test]
    fn keys_written_over_and_over_take_a_bounded_room() {
        // 100 keys, 40 of them written at each checkpoint; one merge at most after
        // each checkpoint (the merge thread may do more, which only helps).
        let dir = tempfile::tempdir().unwrap();
        let mut set = RunSet::default();
        let mut most = (0, 0);
        for checkpoint in 1..=400u64 {
            let changes: BTreeMap<_, _> = (0..40u32)
                .map(|i| {
                    let n = (i * 7 + checkpoint as u32 * 13) % 100;
                    (key(n), Entry::Record(checkpoint.to_be_bytes().to_vec()))
                })
                .collect();
            let path = dir.path().join(format!("{checkpoint}.run"));
            let run = write(&path, &changes);
            set = set.with(Member {
                id: checkpoint,
                tier: 0,
                file: checkpoint,
                run,
            });
            if let Some(range) = set.next_merge(4) {
                let inputs = set.members()[range].to_vec();
                let path = dir.path().join(format!("{checkpoint}.merged"));
                let output = set
                    .merge(&inputs, checkpoint, &path, false, &AtomicBool::new(false))
                    .unwrap();
                let ids: Vec<u64> = inputs.iter().map(|m| m.id).collect();
                set = set.replace(&ids, output).unwrap();
            }
            let entries: u64 = set.members().iter().map(|m| m.run.entries()).sum();
            most = (most.0.max(entries), most.1.max(set.members().len()));
        }
        assert!(
            most.0 <= (SPACE_FACTOR + 1) * 100,
            "at most {} entries for 100 keys, not {}",
            (SPACE_FACTOR + 1) * 100,
            most.0
        );
        assert!(most.1 <= 12, "{} runs", most.1);
        // And the newest write of every key wins.
        for n in 0..100 {
            assert!(set.get(&key(n)).unwrap().is_some());
        }
    }

    #[test]
    fn runs_that_pile_up_are_merged_by_tier_first() {
        let dir = tempfile::tempdir().unwrap();
        let set_of = |runs: u64| {
            RunSet::new((1..=runs).map(|id| {
                let changes: BTreeMap<_, _> = (0..10u32)
                    .map(|n| (key(n), Entry::Record(vec![id as u8])))
                    .collect();
                let path = dir.path().join(format!("{runs}-{id}"));
                Member {
                    id,
                    tier: 0,
                    file: id,
                    run: write(&path, &changes),
                }
            }))
        };
        // The newer runs hold far more than twice the oldest's entries either way.
        let few = set_of(PILE_UP as u64);
        assert_eq!(few.next_merge(4), Some(0..PILE_UP), "everything");
        let many = set_of(PILE_UP as u64 + 4);
        assert_eq!(
            many.next_merge(4),
            Some(PILE_UP..PILE_UP + 4),
            "the oldest four of tier 0"
        );
    }

    #[test]
    fn a_stopped_merge_ends_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = RunSet::default();
        for id in 1..=2u64 {
            let changes: BTreeMap<_, _> = (0..10_000u32)
                .map(|n| (key(n), Entry::Record(id.to_be_bytes().to_vec())))
                .collect();
            let run = write(&dir.path().join(format!("{id}")), &changes);
            set = set.with(Member {
                id,
                tier: 0,
                file: id,
                run,
            });
        }
        let inputs = set.members().to_vec();
        let path = dir.path().join("merged");
        let stopped = set.merge(&inputs, 3, &path, false, &AtomicBool::new(true));
        assert!(matches!(stopped, Err(StoreError::Unavailable(_))));
        std::fs::remove_file(&path).unwrap();
        let merged = set
            .merge(&inputs, 3, &path, false, &AtomicBool::new(false))
            .unwrap();
        assert_eq!(merged.run.entries(), 10_000);
        // Its write-back is given up too once the store closes.
        assert!(matches!(
            merged.run.sync_unless(&AtomicBool::new(true)),
            Err(StoreError::Unavailable(_))
        ));
        merged.run.sync_unless(&AtomicBool::new(false)).unwrap();
    }

    #[test]
    fn replacing_inputs_that_are_gone_or_apart_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = std::cell::Cell::new(0);
        let member = |id: u64| {
            files.set(files.get() + 1);
            let path = dir.path().join(files.get().to_string());
            Member {
                id,
                tier: 0,
                file: id,
                run: write(&path, &BTreeMap::new()),
            }
        };
        let set = RunSet::new((1..=4).map(member));
        assert!(set.replace(&[9], member(9)).is_err());
        assert!(set.replace(&[4, 2], member(4)).is_err());
        let merged = set.replace(&[3, 2], member(30)).unwrap();
        let ids: Vec<u64> = merged.members().iter().map(|m| m.id).collect();
        assert_eq!(ids, [4, 30, 1]);
    }

    #[test]
    fn large_entries_empty_runs_and_empty_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = BTreeMap::new();
        model.insert(Vec::new(), Entry::Record(b"empty key".to_vec()));
        model.insert(key(1), Entry::Record(vec![7; 3 * BLOCK_TARGET]));
        model.insert(key(2), Entry::Tombstone);
        model.insert(key(3), Entry::Record(Vec::new()));
        let path = dir.path().join("big");
        write(&path, &model);
        let run = Run::open(&path).unwrap();
        assert_eq!(
            all(run.iter_from(b"")),
            model.into_iter().collect::<Vec<_>>()
        );
        assert_eq!(run.index.len(), 3, "the large entry has a block of its own");

        let path = dir.path().join("empty");
        write(&path, &BTreeMap::new());
        let run = Run::open(&path).unwrap();
        assert_eq!(run.entries(), 0);
        assert_eq!(run.get(b"anything").unwrap(), None);
        assert!(all(run.iter_from(b"")).is_empty());
    }

    #[test]
    fn keys_out_of_order_and_existing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run");
        let mut writer = RunWriter::create(&path).unwrap();
        writer.add(b"b", &Entry::Tombstone).unwrap();
        assert!(is_corrupted(writer.add(b"a", &Entry::Tombstone)));
        assert!(is_corrupted(writer.add(b"b", &Entry::Tombstone)));
        writer.add(b"c", &Entry::Tombstone).unwrap();
        writer.finish(false).unwrap();
        assert!(matches!(RunWriter::create(&path), Err(StoreError::Io(_))));
    }

    #[test]
    fn damaged_runs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run");
        let model: BTreeMap<_, _> = (0..2_000)
            .map(|n| (key(n), Entry::Record(vec![n as u8; 200])))
            .collect();
        write(&path, &model);
        let good = std::fs::read(&path).unwrap();
        let damaged = |name: &str, change: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            change(&mut bytes);
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        // A flipped bit in the first block: opening works (the block is read only
        // when asked for), reading it is refused, by lookups and by iteration.
        let p = damaged("block", &|b| b[100] ^= 1);
        let run = Run::open(&p).unwrap();
        assert!(is_corrupted(run.get(&key(0))));
        let mut iter = run.iter_from(b"");
        assert!(is_corrupted(iter.next().unwrap()));
        assert!(iter.next().is_none(), "an iterator ends after its error");
        assert_eq!(
            run.get(&key(1_999)).unwrap(),
            model.get(&key(1_999)).cloned()
        );
        // Torn at the end, a damaged index or filter, another kind of file.
        let len = good.len();
        let index_at = u64_at(&good, len - FOOTER_LEN + 20).unwrap() as usize;
        let bloom_at = u64_at(&good, len - FOOTER_LEN + 32).unwrap() as usize;
        for p in [
            damaged("torn", &|b| b.truncate(len - 1)),
            damaged("index", &|b| b[index_at + 3] ^= 0x10),
            damaged("filter", &|b| b[bloom_at + 5] ^= 0x10),
            damaged("footer", &|b| b[len - 10] ^= 1),
            damaged("short", &|b| b.truncate(20)),
            damaged("other", &|b| b.iter_mut().for_each(|x| *x = b'x')),
            // The first block's first key after the second's, under a good checksum.
            damaged("order", &|b| {
                let key_len = u32_at(b, index_at + 12).unwrap() as usize;
                b[index_at + 16 + key_len - 16] = 0xff;
                let crc = crc32fast::hash(&b[index_at..bloom_at - 4]);
                b[bloom_at - 4..bloom_at].copy_from_slice(&crc.to_le_bytes());
            }),
        ] {
            assert!(is_corrupted(Run::open(&p)), "{}", p.display());
        }
    }

    #[test]
    fn the_filter_answers_absent_for_most_absent_keys() {
        let hashes: Vec<u64> = (0..10_000).map(|n| key_hash(&key(n))).collect();
        let bloom = Bloom::build(&hashes);
        assert!(hashes.iter().all(|&h| bloom.may_contain(h)));
        let false_positives = (10_000..20_000)
            .filter(|&n| bloom.may_contain(key_hash(&key(n))))
            .count();
        // About 1 % at 10 bits per key; a broken hash or probe sequence gives far more.
        assert!(false_positives < 300, "{false_positives} of 10,000");
    }
}
