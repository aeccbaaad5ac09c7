//! `runs`: a minimal purpose-built log-structured engine for this benchmark's write pattern.
//!
//! * Memtable: a HashMap of pending kv changes + a Vec of pending history events (as the redb engine keeps them).
//!   Every `flush` (1,000 puts) the memtable is sorted and written, on the calling thread, as one immutable
//!   sorted run file; the events are appended (one write(2)) to `history.log`.
//! * Run file: data blocks of 4 KiB (4 KiB-aligned, zero-padded; an entry larger than a block gets a multi-page block),
//!   each block = entries `[klen u16][vlen u32][key][value]`, then a table of u32 entry offsets and a u32 count at
//!   the block's end (binary search inside the block). After the data: sparse index (first key of each block),
//!   Bloom filter, footer. The index and Bloom filter are also kept in memory (the run's common key prefix is
//!   stripped from in-memory index keys); nothing is mmapped, blocks are read with pread.
//! * Bloom: blocked (one 512-bit block per key, 7 probes in it), 10 bits/key, one 64-bit hash per lookup.
//! * Compaction (one background thread): tiered. Each run has a tier (0 = flushed); when `fanout` (4)
//!   consecutive runs of the same tier exist, the oldest `fanout` of them are merged into one run of tier+1
//!   (lowest tier first), dropping shadowed older versions. Runs stay ordered oldest->newest, so lookups
//!   go newest first and the first hit wins. Inputs are unlinked after the swap, unless a durable manifest may
//!   reference them: then they are unlinked after the next checkpoint.
//! * Durable checkpoint (every `durable_every` flushes, and in `drain`): fdatasync history + every live run not yet
//!   synced, write+fsync MANIFEST (live runs, history length), fsync the dir, then unlink obsolete runs.
//! * Not implemented: reopening/recovery from MANIFEST, deletes/tombstones, checksums, compression.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

pub const BLOCK: usize = 4096;
const BLOOM_BITS_PER_KEY: usize = 10;
const BLOOM_PROBES: usize = 7;
const HIST_INDEX_EVERY: u64 = 64;
const MAX_RUNS_BEFORE_STALL: usize = 40;
const COMPACT_CHUNK: u64 = 256 * 1024;
const WRITE_BUF: usize = 256 * 1024;

// ---------------------------------------------------------------- hashing / Bloom

#[inline]
fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ceb9fe1a85ec53);
    h ^= h >> 33;
    h
}

#[inline]
pub fn hash64(k: &[u8]) -> u64 {
    let mut h: u64 = 0x9E3779B97F4A7C15 ^ (k.len() as u64);
    let mut chunks = k.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap());
        h = (h ^ w).wrapping_mul(0x87c37b91114253d5).rotate_left(31);
    }
    let r = chunks.remainder();
    if !r.is_empty() {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(r);
        h = (h ^ u64::from_le_bytes(b))
            .wrapping_mul(0x87c37b91114253d5)
            .rotate_left(31);
    }
    fmix(h)
}

pub struct Bloom {
    words: Vec<u64>,
    nblocks: u64,
}

impl Bloom {
    fn build(hashes: &[u64]) -> Bloom {
        let nbits = (hashes.len() * BLOOM_BITS_PER_KEY).max(512);
        let nblocks = nbits.div_ceil(512);
        let mut words = vec![0u64; nblocks * 8];
        for &h in hashes {
            let b = Self::block(h, nblocks as u64);
            let mut h2 = fmix(h ^ 0x2545F4914F6CDD1D);
            for _ in 0..BLOOM_PROBES {
                let bit = (h2 & 511) as usize;
                words[b + bit / 64] |= 1u64 << (bit % 64);
                h2 >>= 9;
            }
        }
        Bloom {
            words,
            nblocks: nblocks as u64,
        }
    }
    #[inline]
    fn block(h: u64, nblocks: u64) -> usize {
        (((h >> 32) * nblocks) >> 32) as usize * 8
    }
    #[inline]
    fn may_contain(&self, h: u64) -> bool {
        let b = Self::block(h, self.nblocks);
        let w = &self.words[b..b + 8];
        let mut h2 = fmix(h ^ 0x2545F4914F6CDD1D);
        for _ in 0..BLOOM_PROBES {
            let bit = (h2 & 511) as usize;
            if w[bit / 64] & (1u64 << (bit % 64)) == 0 {
                return false;
            }
            h2 >>= 9;
        }
        true
    }
}

// ---------------------------------------------------------------- run files

#[derive(Clone, Copy)]
struct IdxEnt {
    key_off: u32,
    key_len: u32,
    off: u64,
}

pub struct Run {
    pub id: u64,
    pub tier: u32,
    path: PathBuf,
    file: File,
    pub n: u64,
    data_end: u64,
    pub file_len: u64,
    min_key: Box<[u8]>,
    max_key: Box<[u8]>,
    plen: usize,
    idx_keys: Vec<u8>,
    idx: Vec<IdxEnt>,
    bloom: Bloom,
    synced: AtomicBool,
    /// may be referenced by a MANIFEST on disk: must not be unlinked before the next checkpoint
    in_manifest: AtomicBool,
}

impl Run {
    #[inline]
    fn block_range(&self, i: usize) -> (u64, usize) {
        let s = self.idx[i].off;
        let e = if i + 1 < self.idx.len() {
            self.idx[i + 1].off
        } else {
            self.data_end
        };
        (s, (e - s) as usize)
    }
    pub fn mem_bytes(&self) -> usize {
        self.idx_keys.capacity()
            + self.idx.capacity() * std::mem::size_of::<IdxEnt>()
            + self.bloom.words.capacity() * 8
            + self.min_key.len()
            + self.max_key.len()
            + std::mem::size_of::<Run>()
    }
}

#[inline]
fn rd_u16(b: &[u8], p: usize) -> usize {
    u16::from_le_bytes([b[p], b[p + 1]]) as usize
}
#[inline]
fn rd_u32(b: &[u8], p: usize) -> usize {
    u32::from_le_bytes(b[p..p + 4].try_into().unwrap()) as usize
}

/// Binary search of one block.
fn block_find<'a>(b: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let n = rd_u32(b, b.len() - 4);
    let tbl = b.len() - 4 - 4 * n;
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let p = rd_u32(b, tbl + 4 * mid);
        let kl = rd_u16(b, p);
        let k = &b[p + 6..p + 6 + kl];
        match k.cmp(key) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => {
                let vl = rd_u32(b, p + 2);
                return Some(&b[p + 6 + kl..p + 6 + kl + vl]);
            }
        }
    }
    None
}

struct RunWriter {
    path: PathBuf,
    w: BufWriter<File>,
    pos: u64,
    blk: Vec<u8>,
    offs: Vec<u32>,
    first_keys: Vec<u8>,
    idx: Vec<IdxEnt>,
    hashes: Vec<u64>,
    n: u64,
    last_key: Vec<u8>,
}

impl RunWriter {
    fn create(path: PathBuf, expect: usize) -> RunWriter {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        RunWriter {
            path,
            w: BufWriter::with_capacity(WRITE_BUF, f),
            pos: 0,
            blk: Vec::with_capacity(BLOCK),
            offs: Vec::with_capacity(64),
            first_keys: Vec::new(),
            idx: Vec::new(),
            hashes: Vec::with_capacity(expect),
            n: 0,
            last_key: Vec::new(),
        }
    }
    #[inline]
    fn add(&mut self, k: &[u8], v: &[u8]) {
        debug_assert!(self.n == 0 || k > &self.last_key[..]);
        let esz = 6 + k.len() + v.len();
        if !self.offs.is_empty() && self.blk.len() + esz + 4 * (self.offs.len() + 1) + 4 > BLOCK {
            self.finish_block();
        }
        if self.offs.is_empty() {
            self.idx.push(IdxEnt {
                key_off: self.first_keys.len() as u32,
                key_len: k.len() as u32,
                off: self.pos,
            });
            self.first_keys.extend_from_slice(k);
        }
        self.offs.push(self.blk.len() as u32);
        self.blk.extend_from_slice(&(k.len() as u16).to_le_bytes());
        self.blk.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.blk.extend_from_slice(k);
        self.blk.extend_from_slice(v);
        self.hashes.push(hash64(k));
        self.n += 1;
        self.last_key.clear();
        self.last_key.extend_from_slice(k);
    }
    fn finish_block(&mut self) {
        let need = self.blk.len() + 4 * self.offs.len() + 4;
        let cap = need.div_ceil(BLOCK) * BLOCK;
        self.blk.resize(cap - 4 * self.offs.len() - 4, 0);
        for o in &self.offs {
            self.blk.extend_from_slice(&o.to_le_bytes());
        }
        self.blk
            .extend_from_slice(&(self.offs.len() as u32).to_le_bytes());
        debug_assert_eq!(self.blk.len(), cap);
        self.w.write_all(&self.blk).unwrap();
        self.pos += cap as u64;
        self.blk.clear();
        self.offs.clear();
    }
    fn finish(mut self, id: u64, tier: u32) -> Run {
        assert!(self.n > 0);
        if !self.offs.is_empty() {
            self.finish_block();
        }
        let data_end = self.pos;
        let min_key: Box<[u8]> = self.first_keys[..self.idx[0].key_len as usize].into();
        let max_key: Box<[u8]> = self.last_key[..].into();
        let plen = min_key
            .iter()
            .zip(max_key.iter())
            .take_while(|(a, b)| a == b)
            .count();
        let mut idx_keys = Vec::with_capacity(self.first_keys.len() - plen * self.idx.len());
        let mut idx = Vec::with_capacity(self.idx.len());
        let mut trailer = Vec::with_capacity(self.first_keys.len() + 10 * self.idx.len() + 64);
        for e in &self.idx {
            let k = &self.first_keys[e.key_off as usize..(e.key_off + e.key_len) as usize];
            idx.push(IdxEnt {
                key_off: idx_keys.len() as u32,
                key_len: (k.len() - plen) as u32,
                off: e.off,
            });
            idx_keys.extend_from_slice(&k[plen..]);
            trailer.extend_from_slice(&(k.len() as u16).to_le_bytes());
            trailer.extend_from_slice(k);
            trailer.extend_from_slice(&e.off.to_le_bytes());
        }
        trailer.extend_from_slice(&(max_key.len() as u16).to_le_bytes());
        trailer.extend_from_slice(&max_key);
        let bloom = Bloom::build(&self.hashes);
        let bloom_off = data_end + trailer.len() as u64;
        for w in &bloom.words {
            trailer.extend_from_slice(&w.to_le_bytes());
        }
        for x in [
            data_end,
            data_end,
            bloom_off,
            self.n,
            self.idx.len() as u64,
            bloom.nblocks,
            0x52554e5331u64,
        ] {
            trailer.extend_from_slice(&x.to_le_bytes());
        }
        self.w.write_all(&trailer).unwrap();
        let file_len = data_end + trailer.len() as u64;
        let file = self.w.into_inner().map_err(|e| e.into_error()).unwrap();
        Run {
            id,
            tier,
            path: self.path,
            file,
            n: self.n,
            data_end,
            file_len,
            min_key,
            max_key,
            plen,
            idx_keys,
            idx,
            bloom,
            synced: AtomicBool::new(false),
            in_manifest: AtomicBool::new(false),
        }
    }
}

/// Sequential reader of a run's entries (compaction input); reads COMPACT_CHUNK-sized spans of whole blocks.
struct RunIter {
    run: Arc<Run>,
    buf: Vec<u8>,
    c1: usize,
    cbase: u64,
    b: usize,
    n: usize,
    i: usize,
    pos: usize,
    kl: usize,
    vl: usize,
    done: bool,
    bytes_read: u64,
}

impl RunIter {
    fn new(run: Arc<Run>) -> RunIter {
        let mut it = RunIter {
            run,
            buf: Vec::new(),
            c1: 0,
            cbase: 0,
            b: 0,
            n: 0,
            i: 0,
            pos: 0,
            kl: 0,
            vl: 0,
            done: false,
            bytes_read: 0,
        };
        it.enter_block();
        it
    }
    fn enter_block(&mut self) {
        let nb = self.run.idx.len();
        if self.b >= nb {
            self.done = true;
            return;
        }
        if self.b >= self.c1 {
            let start = self.run.idx[self.b].off;
            let mut c1 = self.b + 1;
            while c1 < nb && self.run.idx[c1].off - start < COMPACT_CHUNK {
                c1 += 1;
            }
            let end = if c1 < nb {
                self.run.idx[c1].off
            } else {
                self.run.data_end
            };
            self.buf.resize((end - start) as usize, 0);
            self.run.file.read_exact_at(&mut self.buf, start).unwrap();
            self.bytes_read += end - start;
            self.c1 = c1;
            self.cbase = start;
        }
        let (off, len) = self.run.block_range(self.b);
        let bs = (off - self.cbase) as usize;
        self.n = rd_u32(&self.buf, bs + len - 4);
        self.i = 0;
        self.pos = bs;
        self.decode();
    }
    #[inline]
    fn decode(&mut self) {
        self.kl = rd_u16(&self.buf, self.pos);
        self.vl = rd_u32(&self.buf, self.pos + 2);
    }
    #[inline]
    fn key(&self) -> Option<&[u8]> {
        if self.done {
            None
        } else {
            Some(&self.buf[self.pos + 6..self.pos + 6 + self.kl])
        }
    }
    #[inline]
    fn val(&self) -> &[u8] {
        let s = self.pos + 6 + self.kl;
        &self.buf[s..s + self.vl]
    }
    #[inline]
    fn advance(&mut self) {
        self.i += 1;
        if self.i < self.n {
            self.pos += 6 + self.kl + self.vl;
            self.decode();
        } else {
            self.b += 1;
            self.enter_block();
        }
    }
}

// ---------------------------------------------------------------- block cache (main thread only)

struct BlockCache {
    map: HashMap<u64, u32>,
    keys: Vec<u64>,
    refb: Vec<bool>,
    data: Vec<u8>,
    cap: usize,
    hand: usize,
}

impl BlockCache {
    fn new(bytes: usize) -> BlockCache {
        let cap = (bytes / BLOCK).max(1);
        BlockCache {
            map: HashMap::with_capacity(cap),
            keys: Vec::with_capacity(cap),
            refb: Vec::with_capacity(cap),
            data: vec![0u8; cap * BLOCK], // calloc: pages count in RSS only once touched
            cap,
            hand: 0,
        }
    }
    /// CLOCK eviction. Returns (block, hit).
    fn get_or_load(&mut self, key: u64, load: impl FnOnce(&mut [u8])) -> (&[u8], bool) {
        if let Some(&s) = self.map.get(&key) {
            let s = s as usize;
            self.refb[s] = true;
            return (&self.data[s * BLOCK..(s + 1) * BLOCK], true);
        }
        let s = if self.keys.len() < self.cap {
            self.keys.push(key);
            self.refb.push(false);
            self.keys.len() - 1
        } else {
            loop {
                let h = self.hand;
                self.hand = (h + 1) % self.cap;
                if self.refb[h] {
                    self.refb[h] = false;
                } else {
                    self.map.remove(&self.keys[h]);
                    self.keys[h] = key;
                    break h;
                }
            }
        };
        load(&mut self.data[s * BLOCK..(s + 1) * BLOCK]);
        self.map.insert(key, s as u32);
        (&self.data[s * BLOCK..(s + 1) * BLOCK], false)
    }
}

// ---------------------------------------------------------------- lookups

#[derive(Default, Clone, Debug)]
pub struct LookupStats {
    /// lookups that went past the memtable
    pub lookups: u64,
    pub runs_in_snapshot: u64,
    /// runs whose [min,max] key range contained the key (=> Bloom probed)
    pub bloom_probes: u64,
    /// Bloom said maybe => block read
    pub block_reads: u64,
    pub bloom_false_pos: u64,
    pub found: u64,
    pub cache_hits: u64,
}

pub struct Reader {
    buf: Vec<u8>,
    cache: Option<BlockCache>,
    pub st: LookupStats,
}

impl Reader {
    #[inline]
    pub fn get_with<R>(
        &mut self,
        runs: &[Arc<Run>],
        key: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Option<R> {
        let Reader { buf, cache, st } = self;
        st.lookups += 1;
        st.runs_in_snapshot += runs.len() as u64;
        let h = hash64(key);
        for run in runs.iter().rev() {
            if key < &run.min_key[..] || key > &run.max_key[..] {
                continue;
            }
            st.bloom_probes += 1;
            if !run.bloom.may_contain(h) {
                continue;
            }
            st.block_reads += 1;
            let suffix = &key[run.plen..];
            let ik = &run.idx_keys;
            let i = run.idx.partition_point(|e| {
                &ik[e.key_off as usize..(e.key_off + e.key_len) as usize] <= suffix
            });
            if i == 0 {
                st.bloom_false_pos += 1;
                continue;
            }
            let bi = i - 1;
            let (off, len) = run.block_range(bi);
            let blk: &[u8] = match cache {
                Some(c) if len == BLOCK => {
                    let (b, hit) = c.get_or_load((run.id << 24) | bi as u64, |dst| {
                        run.file.read_exact_at(dst, off).unwrap()
                    });
                    if hit {
                        st.cache_hits += 1;
                    }
                    b
                }
                _ => {
                    if buf.len() < len {
                        buf.resize(len, 0);
                    }
                    run.file.read_exact_at(&mut buf[..len], off).unwrap();
                    &buf[..len]
                }
            };
            if let Some(v) = block_find(blk, key) {
                st.found += 1;
                return Some(f(v));
            }
            st.bloom_false_pos += 1;
        }
        None
    }
}

// ---------------------------------------------------------------- shared state / compaction thread

struct State {
    /// oldest -> newest
    runs: Vec<Arc<Run>>,
    snap: Arc<Vec<Arc<Run>>>,
    pending_delete: Vec<PathBuf>,
    busy: bool,
    shutdown: bool,
}

#[derive(Default)]
pub struct CompStats {
    pub compactions: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub entries_in: AtomicU64,
    pub entries_out: AtomicU64,
    pub cpu_ns: AtomicU64,
    pub wall_ns: AtomicU64,
    pub max_tier: AtomicU64,
}

struct Shared {
    st: Mutex<State>,
    cv_work: Condvar,
    cv_done: Condvar,
    dir: PathBuf,
    fanout: usize,
    next_id: AtomicU64,
    cs: CompStats,
}

fn pick(runs: &[Arc<Run>], fanout: usize) -> Option<usize> {
    let mut best: Option<(u32, usize)> = None;
    let mut i = 0;
    while i < runs.len() {
        let t = runs[i].tier;
        let mut j = i;
        while j < runs.len() && runs[j].tier == t {
            j += 1;
        }
        if j - i >= fanout && best.map_or(true, |(bt, _)| t < bt) {
            best = Some((t, i));
        }
        i = j;
    }
    best.map(|(_, s)| s)
}

fn thread_cpu_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn merge(sh: &Shared, inputs: &[Arc<Run>], tier: u32) -> Run {
    let id = sh.next_id.fetch_add(1, Relaxed);
    let path = sh.dir.join(format!("{id:08}.run"));
    let expect: u64 = inputs.iter().map(|r| r.n).sum();
    let mut w = RunWriter::create(path, expect as usize);
    // inputs are oldest..newest: on equal keys the highest index wins
    let mut its: Vec<RunIter> = inputs.iter().map(|r| RunIter::new(r.clone())).collect();
    let mut cur: Vec<u8> = Vec::with_capacity(64);
    loop {
        let mut best: Option<usize> = None;
        for j in 0..its.len() {
            if let Some(k) = its[j].key() {
                best = match best {
                    None => Some(j),
                    Some(b) if k <= its[b].key().unwrap() => Some(j),
                    Some(b) => Some(b),
                };
            }
        }
        let Some(b) = best else { break };
        cur.clear();
        cur.extend_from_slice(its[b].key().unwrap());
        w.add(&cur, its[b].val());
        for it in its.iter_mut() {
            if it.key() == Some(&cur[..]) {
                it.advance();
            }
        }
    }
    let out = w.finish(id, tier);
    sh.cs.entries_in.fetch_add(expect, Relaxed);
    sh.cs.entries_out.fetch_add(out.n, Relaxed);
    sh.cs.bytes_written.fetch_add(out.file_len, Relaxed);
    sh.cs
        .bytes_read
        .fetch_add(its.iter().map(|i| i.bytes_read).sum(), Relaxed);
    out
}

fn compactor(sh: Arc<Shared>) {
    loop {
        let (inputs, tier) = {
            let mut st = sh.st.lock().unwrap();
            loop {
                if st.shutdown {
                    st.busy = false;
                    sh.cv_done.notify_all();
                    return;
                }
                if let Some(s) = pick(&st.runs, sh.fanout) {
                    st.busy = true;
                    break (st.runs[s..s + sh.fanout].to_vec(), st.runs[s].tier + 1);
                }
                st.busy = false;
                sh.cv_done.notify_all();
                st = sh.cv_work.wait(st).unwrap();
            }
        };
        let t0 = Instant::now();
        let c0 = thread_cpu_ns();
        let out = Arc::new(merge(&sh, &inputs, tier));
        let mut unlink = Vec::new();
        {
            let mut st = sh.st.lock().unwrap();
            let s = st.runs.iter().position(|r| r.id == inputs[0].id).unwrap();
            for (j, r) in inputs.iter().enumerate() {
                assert_eq!(
                    st.runs[s + j].id,
                    r.id,
                    "compaction inputs must still be contiguous"
                );
            }
            st.runs.splice(s..s + inputs.len(), [out]);
            st.snap = Arc::new(st.runs.clone());
            for r in &inputs {
                if r.in_manifest.load(Relaxed) {
                    st.pending_delete.push(r.path.clone());
                } else {
                    unlink.push(r.path.clone());
                }
            }
            sh.cv_done.notify_all();
        }
        drop(inputs); // fds close once no reader snapshot holds them
        for p in unlink {
            std::fs::remove_file(p).unwrap();
        }
        sh.cs.compactions.fetch_add(1, Relaxed);
        sh.cs.max_tier.fetch_max(tier as u64, Relaxed);
        sh.cs.cpu_ns.fetch_add(thread_cpu_ns() - c0, Relaxed);
        sh.cs
            .wall_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
    }
}

// ---------------------------------------------------------------- the engine

pub struct RunsDb {
    sh: Arc<Shared>,
    handle: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
    /// pending kv changes (checked first on lookups)
    pub mem: HashMap<Vec<u8>, Vec<u8>>,
    /// pending history events (rev, event)
    pub log_pending: Vec<(u64, Vec<u8>)>,
    pub reader: Reader,
    hist: File,
    hist_len: u64,
    hist_count: u64,
    hist_index: Vec<(u64, u64)>,
    hist_buf: Vec<u8>,
    pub flushes: u64,
    pub checkpoints: u64,
    durable_every: u64,
    pub stall_ns: u64,
    pub flushed_bytes: u64,
    pub hist_bytes: u64,
}

impl RunsDb {
    pub fn open(dir: &Path, cache_mib: u64, fanout: usize, durable_every: u64) -> RunsDb {
        std::fs::create_dir_all(dir).unwrap();
        let sh = Arc::new(Shared {
            st: Mutex::new(State {
                runs: Vec::new(),
                snap: Arc::new(Vec::new()),
                pending_delete: Vec::new(),
                busy: false,
                shutdown: false,
            }),
            cv_work: Condvar::new(),
            cv_done: Condvar::new(),
            dir: dir.to_path_buf(),
            fanout,
            next_id: AtomicU64::new(1),
            cs: CompStats::default(),
        });
        let sh2 = sh.clone();
        let handle = std::thread::Builder::new()
            .name("runs-compact".into())
            .spawn(move || compactor(sh2))
            .unwrap();
        let hist = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(dir.join("history.log"))
            .unwrap();
        RunsDb {
            sh,
            handle: Some(handle),
            dir: dir.to_path_buf(),
            mem: HashMap::new(),
            log_pending: Vec::new(),
            reader: Reader {
                buf: vec![0u8; BLOCK],
                cache: if cache_mib > 0 {
                    Some(BlockCache::new((cache_mib * 1024 * 1024) as usize))
                } else {
                    None
                },
                st: LookupStats::default(),
            },
            hist,
            hist_len: 0,
            hist_count: 0,
            hist_index: Vec::new(),
            hist_buf: Vec::new(),
            flushes: 0,
            checkpoints: 0,
            durable_every,
            stall_ns: 0,
            flushed_bytes: 0,
            hist_bytes: 0,
        }
    }

    /// Current list of runs (oldest -> newest); one Arc clone under the mutex.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Run>>> {
        self.sh.st.lock().unwrap().snap.clone()
    }

    /// Memtable -> new run file; pending events -> history.log. Every `durable_every`-th call (or forced): checkpoint.
    pub fn flush(&mut self, force_durable: bool) {
        self.flushes += 1;
        if !self.mem.is_empty() {
            let mut ents: Vec<(&Vec<u8>, &Vec<u8>)> = self.mem.iter().collect();
            ents.sort_unstable_by(|a, b| a.0.cmp(b.0));
            let id = self.sh.next_id.fetch_add(1, Relaxed);
            let mut w = RunWriter::create(self.dir.join(format!("{id:08}.run")), ents.len());
            for (k, v) in ents {
                w.add(k, v);
            }
            let run = Arc::new(w.finish(id, 0));
            self.flushed_bytes += run.file_len;
            self.mem.clear();
            let mut st = self.sh.st.lock().unwrap();
            if st.runs.len() >= MAX_RUNS_BEFORE_STALL {
                let t = Instant::now();
                while st.runs.len() >= MAX_RUNS_BEFORE_STALL {
                    st = self.sh.cv_done.wait(st).unwrap();
                }
                self.stall_ns += t.elapsed().as_nanos() as u64;
            }
            st.runs.push(run);
            st.snap = Arc::new(st.runs.clone());
            self.sh.cv_work.notify_one();
        }
        if !self.log_pending.is_empty() {
            self.hist_buf.clear();
            for (rev, ev) in self.log_pending.drain(..) {
                if self.hist_count % HIST_INDEX_EVERY == 0 {
                    self.hist_index
                        .push((rev, self.hist_len + self.hist_buf.len() as u64));
                }
                self.hist_count += 1;
                self.hist_buf.extend_from_slice(&rev.to_be_bytes());
                self.hist_buf
                    .extend_from_slice(&(ev.len() as u32).to_le_bytes());
                self.hist_buf.extend_from_slice(&ev);
            }
            self.hist.write_all(&self.hist_buf).unwrap();
            self.hist_len += self.hist_buf.len() as u64;
            self.hist_bytes += self.hist_buf.len() as u64;
        }
        if force_durable || self.flushes % self.durable_every == 0 {
            self.checkpoint();
        }
    }

    fn checkpoint(&mut self) {
        self.checkpoints += 1;
        self.hist.sync_data().unwrap();
        let (snap, del) = {
            let mut st = self.sh.st.lock().unwrap();
            for r in st.runs.iter() {
                r.in_manifest.store(true, Relaxed);
            }
            (st.snap.clone(), std::mem::take(&mut st.pending_delete))
        };
        let mut m = format!("history {} {}\n", self.hist_len, self.hist_count);
        for r in snap.iter() {
            if !r.synced.load(Relaxed) {
                r.file.sync_data().unwrap();
                r.synced.store(true, Relaxed);
            }
            m.push_str(&format!(
                "run {:08}.run tier {} entries {}\n",
                r.id, r.tier, r.n
            ));
        }
        let tmp = self.dir.join("MANIFEST.tmp");
        {
            let mut f = File::create(&tmp).unwrap();
            f.write_all(m.as_bytes()).unwrap();
            f.sync_data().unwrap();
        }
        std::fs::rename(&tmp, self.dir.join("MANIFEST")).unwrap();
        File::open(&self.dir).unwrap().sync_all().unwrap();
        for p in del {
            std::fs::remove_file(p).unwrap();
        }
    }

    /// Final flush + checkpoint, wait until compaction is idle, checkpoint again (syncs compaction outputs,
    /// unlinks obsolete inputs).
    pub fn drain(&mut self) {
        self.flush(true);
        {
            let mut st = self.sh.st.lock().unwrap();
            while st.busy || pick(&st.runs, self.sh.fanout).is_some() {
                st = self.sh.cv_done.wait(st).unwrap();
            }
        }
        self.checkpoint();
    }

    pub fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        if let Some(v) = self.mem.get(key) {
            return Some(v.clone());
        }
        let snap = self.snapshot();
        self.reader.get_with(&snap, key, |v| v.to_vec())
    }

    /// History event of revision `rev` (pending events first, then history.log via the sparse index).
    pub fn history_get(&mut self, rev: u64) -> Option<Vec<u8>> {
        if let Some((_, ev)) = self.log_pending.iter().find(|(r, _)| *r == rev) {
            return Some(ev.clone());
        }
        let i = self.hist_index.partition_point(|(r, _)| *r <= rev);
        if i == 0 {
            return None;
        }
        let mut off = self.hist_index[i - 1].1;
        let mut hdr = [0u8; 12];
        while off < self.hist_len {
            self.hist.read_exact_at(&mut hdr, off).unwrap();
            let r = u64::from_be_bytes(hdr[..8].try_into().unwrap());
            let len = u32::from_le_bytes(hdr[8..].try_into().unwrap()) as usize;
            if r == rev {
                let mut v = vec![0u8; len];
                self.hist.read_exact_at(&mut v, off + 12).unwrap();
                return Some(v);
            }
            if r > rev {
                return None;
            }
            off += 12 + len as u64;
        }
        None
    }

    pub fn stats(&self) -> String {
        let snap = self.snapshot();
        let tiers: Vec<String> = snap.iter().map(|r| r.tier.to_string()).collect();
        let mem: usize =
            snap.iter().map(|r| r.mem_bytes()).sum::<usize>() + self.hist_index.capacity() * 16;
        let cs = &self.sh.cs;
        let l = &self.reader.st;
        let lk = l.lookups.max(1) as f64;
        format!(
            "runs={} run_tiers={} run_meta_mib={:.2} flushes={} checkpoints={} compactions={} comp_cpu_s={:.3} comp_wall_s={:.3} \
             comp_read_mib={:.1} comp_written_mib={:.1} comp_entries_in={} comp_entries_out={} flushed_mib={:.1} history_mib={:.1} \
             stall_ms={:.1} lk_disk={} lk_runs_in_snap={:.2} lk_bloom_probes={:.2} lk_block_reads={:.3} lk_bloom_fp={:.4} lk_cache_hit={:.3}",
            snap.len(),
            tiers.join(","),
            mem as f64 / 1048576.0,
            self.flushes,
            self.checkpoints,
            cs.compactions.load(Relaxed),
            cs.cpu_ns.load(Relaxed) as f64 / 1e9,
            cs.wall_ns.load(Relaxed) as f64 / 1e9,
            cs.bytes_read.load(Relaxed) as f64 / 1048576.0,
            cs.bytes_written.load(Relaxed) as f64 / 1048576.0,
            cs.entries_in.load(Relaxed),
            cs.entries_out.load(Relaxed),
            self.flushed_bytes as f64 / 1048576.0,
            self.hist_bytes as f64 / 1048576.0,
            self.stall_ns as f64 / 1e6,
            l.lookups,
            l.runs_in_snapshot as f64 / lk,
            l.bloom_probes as f64 / lk,
            l.block_reads as f64 / lk,
            l.bloom_false_pos as f64 / lk,
            l.cache_hits as f64 / (l.block_reads.max(1) as f64),
        )
    }

    pub fn reset_lookup_stats(&mut self) {
        self.reader.st = LookupStats::default();
    }
}

impl Drop for RunsDb {
    fn drop(&mut self) {
        self.sh.st.lock().unwrap().shutdown = true;
        self.sh.cv_work.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
