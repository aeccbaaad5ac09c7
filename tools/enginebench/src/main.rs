//! fjall vs redb: CPU per put / memory for the metadata-service write pattern.
//!
//! Usage:
//!   enginebench <fjall|redb|runs> <puts|load1m|verify> [--dir D] [--cache-mib N] [--memtable-mib N]
//!              [--persist buffer|none] [--workers N] [--puts N] [--preload N] [--fanout N]
//!
//! Prints human-readable lines and one final `RESULT ...` line (key=value pairs).

mod runs;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BATCH: usize = 25;
const KEY_PREFIX: &[u8] = b"kv\0bench\0data\0";

// ---------------------------------------------------------------- process stats

/// (user+system CPU seconds of the whole process, all threads)
fn cpu_secs() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix(field) {
            let rest = rest.trim_start_matches(':').trim();
            return rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    }
    0
}
fn rss_mib() -> f64 {
    status_kb("VmRSS") as f64 / 1024.0
}
fn hwm_mib() -> f64 {
    status_kb("VmHWM") as f64 / 1024.0
}
/// CPU seconds of threads other than the main thread (fjall's background workers), still alive.
fn bg_thread_cpu_secs() -> f64 {
    let me = std::process::id().to_string();
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    if let Ok(rd) = std::fs::read_dir("/proc/self/task") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy() == me {
                continue;
            }
            if let Ok(st) = std::fs::read_to_string(e.path().join("stat")) {
                let after = &st[st.rfind(')').unwrap() + 2..];
                let f: Vec<&str> = after.split_whitespace().collect();
                // fields after comm: state(0) ... utime(11) stime(12)
                total += (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tck;
            }
        }
    }
    total
}
/// /proc/self/io: (wchar = bytes passed to write syscalls, write_bytes - cancelled_write_bytes = bytes dirtied
/// for storage and not cancelled by truncate/unlink before writeback), in bytes.
fn io_written() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let f = |name: &str| {
        s.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(": "))
                    .map(|v| v.trim().parse::<u64>().unwrap())
            })
            .unwrap_or(0)
    };
    (
        f("wchar"),
        f("write_bytes").saturating_sub(f("cancelled_write_bytes")),
    )
}

fn threads() -> u64 {
    status_kb("Threads")
}
/// Reset VmHWM to current RSS (Linux >= 4.0).
fn reset_hwm() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn dir_stats(p: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0u64, 0u64);
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let md = e.metadata().unwrap();
            if md.is_dir() {
                let (f, b) = dir_stats(&e.path());
                files += f;
                bytes += b;
            } else {
                files += 1;
                bytes += md.len();
            }
        }
    }
    (files, bytes)
}

// ---------------------------------------------------------------- data generation

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn make_key(n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(KEY_PREFIX.len() + 16);
    k.extend_from_slice(KEY_PREFIX);
    k.extend_from_slice(format!("{n:016}").as_bytes());
    k
}

/// Pool of hex characters; values take slices of it (moderately compressible, like text metadata).
struct Pool(Vec<u8>);
impl Pool {
    fn new() -> Self {
        let mut r = Rng(42);
        let hex = b"0123456789abcdef";
        Pool(
            (0..(1 << 16))
                .map(|_| hex[(r.next() & 15) as usize])
                .collect(),
        )
    }
    fn slice(&self, rng: &mut Rng, len: usize) -> &[u8] {
        let off = rng.below((self.0.len() - len) as u64) as usize;
        &self.0[off..off + len]
    }
}

/// record = [rev u64 BE][prev_rev u64 BE][filler]  (total `size` bytes)
fn make_record(pool: &Pool, rng: &mut Rng, rev: u64, prev: u64, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    v.extend_from_slice(&rev.to_be_bytes());
    v.extend_from_slice(&prev.to_be_bytes());
    v.extend_from_slice(pool.slice(rng, size - 16));
    v
}

/// history event = [op][key][rev][prev][filler] (total `size` bytes)
fn make_event(pool: &Pool, rng: &mut Rng, key: &[u8], rev: u64, prev: u64, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    v.push(b'P');
    v.extend_from_slice(key);
    v.extend_from_slice(&rev.to_be_bytes());
    v.extend_from_slice(&prev.to_be_bytes());
    let rest = size.saturating_sub(v.len());
    v.extend_from_slice(pool.slice(rng, rest));
    v
}

fn prev_rev(rec: Option<&[u8]>) -> u64 {
    rec.map(|r| u64::from_be_bytes(r[0..8].try_into().unwrap()))
        .unwrap_or(0)
}

// ---------------------------------------------------------------- engine abstraction

trait Engine {
    /// Apply one batch of puts atomically. Each put: point lookup of current record, then
    /// write new record under key in `kv` and event under `rev` in `log`.
    fn put_batch(&mut self, keys: &[Vec<u8>], ctx: &mut Ctx);
    /// Plain point lookups (scenario 2). Returns number found.
    fn lookup_batch(&mut self, keys: &[Vec<u8>]) -> usize;
    /// Finish deferred work (redb: final durable commit; fjall: flush memtables + wait compactions).
    fn drain(&mut self);
    fn extra(&self) -> String;
    /// Reset per-phase diagnostic counters (runs engine only).
    fn reset_stats(&mut self) {}
    /// Current kv record (verify scenario only; not measured).
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>>;
    /// History event for revision `rev` (verify scenario only; not measured).
    fn history_get(&mut self, rev: u64) -> Option<Vec<u8>>;
}

struct Ctx {
    pool: Pool,
    rng: Rng,
    rev: u64,
    kv_size: usize,
    log_size: usize,
    // commit latency stats
    max_commit: Duration,
    slow_commits: u64, // > 20 ms
    sum_found: u64,
}
impl Ctx {
    fn note_commit(&mut self, d: Duration) {
        if d > self.max_commit {
            self.max_commit = d;
        }
        if d > Duration::from_millis(20) {
            self.slow_commits += 1;
        }
    }
}

// ---------------------------------------------------------------- fjall

struct FjallEngine {
    db: fjall::Database,
    kv: fjall::Keyspace,
    log: fjall::Keyspace,
    persist: Option<fjall::PersistMode>,
}

impl FjallEngine {
    fn open(
        dir: &Path,
        cache_mib: u64,
        memtable_mib: u64,
        workers: usize,
        persist: Option<fjall::PersistMode>,
    ) -> Self {
        let mut b = fjall::Database::builder(dir)
            .cache_size(cache_mib * 1024 * 1024)
            .manual_journal_persist(true);
        if workers > 0 {
            b = b.worker_threads(workers);
        }
        let db = b.open().unwrap();
        let opts = || {
            fjall::KeyspaceCreateOptions::default()
                .max_memtable_size(memtable_mib * 1024 * 1024)
                .manual_journal_persist(true)
        };
        let kv = db.keyspace("kv", opts).unwrap();
        let log = db.keyspace("log", opts).unwrap();
        FjallEngine {
            db,
            kv,
            log,
            persist,
        }
    }
}

impl Engine for FjallEngine {
    fn put_batch(&mut self, keys: &[Vec<u8>], ctx: &mut Ctx) {
        // intra-batch overlay so a key written twice in one batch sees its own write
        let mut local: Vec<(&[u8], u64)> = Vec::with_capacity(keys.len());
        let mut b = self.db.batch().durability(self.persist);
        for k in keys {
            let prev = if let Some((_, r)) = local.iter().rev().find(|(lk, _)| *lk == k.as_slice())
            {
                *r
            } else {
                let cur = self.kv.get(k).unwrap();
                if cur.is_some() {
                    ctx.sum_found += 1;
                }
                prev_rev(cur.as_deref())
            };
            ctx.rev += 1;
            let rev = ctx.rev;
            let rec = make_record(&ctx.pool, &mut ctx.rng, rev, prev, ctx.kv_size);
            let ev = make_event(&ctx.pool, &mut ctx.rng, k, rev, prev, ctx.log_size);
            b.insert(&self.kv, k.as_slice(), rec);
            b.insert(&self.log, rev.to_be_bytes(), ev);
            local.push((k.as_slice(), rev));
        }
        let t = Instant::now();
        b.commit().unwrap();
        ctx.note_commit(t.elapsed());
    }
    fn lookup_batch(&mut self, keys: &[Vec<u8>]) -> usize {
        keys.iter()
            .filter(|k| self.kv.get(k).unwrap().is_some())
            .count()
    }
    fn drain(&mut self) {
        if let Some(_) = self.persist {
            self.db.persist(fjall::PersistMode::Buffer).unwrap();
        }
        self.kv.rotate_memtable_and_wait().unwrap();
        self.log.rotate_memtable_and_wait().unwrap();
        // wait for flushes and compactions to go idle (stable for 200 ms)
        let mut idle = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while idle < 20 && Instant::now() < deadline {
            if self.db.outstanding_flushes() == 0 && self.db.active_compactions() == 0 {
                idle += 1;
            } else {
                idle = 0;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.kv.get(key).unwrap().map(|v| v.to_vec())
    }
    fn history_get(&mut self, rev: u64) -> Option<Vec<u8>> {
        self.log.get(rev.to_be_bytes()).unwrap().map(|v| v.to_vec())
    }
    fn extra(&self) -> String {
        format!(
            "kv_tables={} kv_l0={} log_tables={} log_l0={} compactions={} time_compacting_s={:.2} journals={} cache_used_mib={:.1}",
            self.kv.table_count(),
            self.kv.l0_table_count(),
            self.log.table_count(),
            self.log.l0_table_count(),
            self.db.compactions_completed(),
            self.db.time_compacting().as_secs_f64(),
            self.db.journal_count(),
            self.db.cache_size() as f64 / 1048576.0,
        )
    }
}

// ---------------------------------------------------------------- redb

const KV: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("kv");
const LOG: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("log");

struct RedbEngine {
    db: redb::Database,
    overlay: HashMap<Vec<u8>, Vec<u8>>,
    log_pending: Vec<([u8; 8], Vec<u8>)>,
    puts_since_flush: usize,
    flushes: u64,
    durable_commits: u64,
    flush_every_puts: usize,
    durable_every_flushes: u64,
}

impl RedbEngine {
    fn open(path: &Path, cache_mib: usize) -> Self {
        let db = redb::Database::builder()
            .set_cache_size(cache_mib * 1024 * 1024)
            .create(path)
            .unwrap();
        {
            let w = db.begin_write().unwrap();
            w.open_table(KV).unwrap();
            w.open_table(LOG).unwrap();
            w.commit().unwrap();
        }
        RedbEngine {
            db,
            overlay: HashMap::new(),
            log_pending: Vec::new(),
            puts_since_flush: 0,
            flushes: 0,
            durable_commits: 0,
            flush_every_puts: 1000,     // "20 ms worth of batches"
            durable_every_flushes: 100, // "every 2 s" = every 100th 20-ms flush
        }
    }
    fn flush(&mut self, force_durable: bool, ctx: Option<&mut Ctx>) {
        let t = Instant::now();
        self.flushes += 1;
        let durable = force_durable || self.flushes % self.durable_every_flushes == 0;
        let mut w = self.db.begin_write().unwrap();
        if durable {
            self.durable_commits += 1; // default durability = Immediate (fsync)
        } else {
            w.set_durability(redb::Durability::None).unwrap();
        }
        {
            let mut kv = w.open_table(KV).unwrap();
            for (k, v) in self.overlay.drain() {
                kv.insert(k.as_slice(), v.as_slice()).unwrap();
            }
            let mut log = w.open_table(LOG).unwrap();
            for (k, v) in self.log_pending.drain(..) {
                log.insert(k.as_slice(), v.as_slice()).unwrap();
            }
        }
        w.commit().unwrap();
        self.puts_since_flush = 0;
        if let Some(c) = ctx {
            c.note_commit(t.elapsed());
        }
    }
}

impl Engine for RedbEngine {
    fn put_batch(&mut self, keys: &[Vec<u8>], ctx: &mut Ctx) {
        use redb::ReadableDatabase;
        {
            let r = self.db.begin_read().unwrap();
            let t = r.open_table(KV).unwrap();
            for k in keys {
                let prev = if let Some(v) = self.overlay.get(k) {
                    prev_rev(Some(v))
                } else {
                    match t.get(k.as_slice()).unwrap() {
                        Some(g) => {
                            ctx.sum_found += 1;
                            prev_rev(Some(g.value()))
                        }
                        None => 0,
                    }
                };
                ctx.rev += 1;
                let rev = ctx.rev;
                let rec = make_record(&ctx.pool, &mut ctx.rng, rev, prev, ctx.kv_size);
                let ev = make_event(&ctx.pool, &mut ctx.rng, k, rev, prev, ctx.log_size);
                self.overlay.insert(k.clone(), rec);
                self.log_pending.push((rev.to_be_bytes(), ev));
            }
        }
        self.puts_since_flush += keys.len();
        if self.puts_since_flush >= self.flush_every_puts {
            self.flush(false, Some(ctx));
        }
    }
    fn lookup_batch(&mut self, keys: &[Vec<u8>]) -> usize {
        use redb::ReadableDatabase;
        let r = self.db.begin_read().unwrap();
        let t = r.open_table(KV).unwrap();
        keys.iter()
            .filter(|k| t.get(k.as_slice()).unwrap().is_some())
            .count()
    }
    fn drain(&mut self) {
        self.flush(true, None);
    }
    fn extra(&self) -> String {
        format!(
            "flush_txns={} durable_txns={}",
            self.flushes, self.durable_commits
        )
    }
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        use redb::ReadableDatabase;
        if let Some(v) = self.overlay.get(key) {
            return Some(v.clone());
        }
        let r = self.db.begin_read().unwrap();
        let t = r.open_table(KV).unwrap();
        t.get(key).unwrap().map(|g| g.value().to_vec())
    }
    fn history_get(&mut self, rev: u64) -> Option<Vec<u8>> {
        use redb::ReadableDatabase;
        if let Some((_, v)) = self
            .log_pending
            .iter()
            .find(|(k, _)| *k == rev.to_be_bytes())
        {
            return Some(v.clone());
        }
        let r = self.db.begin_read().unwrap();
        let t = r.open_table(LOG).unwrap();
        t.get(rev.to_be_bytes().as_slice())
            .unwrap()
            .map(|g| g.value().to_vec())
    }
}

// ---------------------------------------------------------------- runs (purpose-built, src/runs.rs)

struct RunsEngine {
    db: runs::RunsDb,
    puts_since_flush: usize,
    flush_every_puts: usize,
}

impl Engine for RunsEngine {
    fn put_batch(&mut self, keys: &[Vec<u8>], ctx: &mut Ctx) {
        // one snapshot of the run list per batch (like redb's one read txn per batch)
        let snap = self.db.snapshot();
        for k in keys {
            let prev = if let Some(v) = self.db.mem.get(k) {
                prev_rev(Some(v))
            } else {
                match self.db.reader.get_with(&snap, k, |v| prev_rev(Some(v))) {
                    Some(p) => {
                        ctx.sum_found += 1;
                        p
                    }
                    None => 0,
                }
            };
            ctx.rev += 1;
            let rev = ctx.rev;
            let rec = make_record(&ctx.pool, &mut ctx.rng, rev, prev, ctx.kv_size);
            let ev = make_event(&ctx.pool, &mut ctx.rng, k, rev, prev, ctx.log_size);
            self.db.mem.insert(k.clone(), rec);
            self.db.log_pending.push((rev, ev));
        }
        self.puts_since_flush += keys.len();
        if self.puts_since_flush >= self.flush_every_puts {
            let t = Instant::now();
            self.db.flush(false);
            self.puts_since_flush = 0;
            ctx.note_commit(t.elapsed());
        }
    }
    fn lookup_batch(&mut self, keys: &[Vec<u8>]) -> usize {
        let snap = self.db.snapshot();
        let mut n = 0;
        for k in keys {
            if self.db.mem.contains_key(k) || self.db.reader.get_with(&snap, k, |_| ()).is_some() {
                n += 1;
            }
        }
        n
    }
    fn drain(&mut self) {
        self.db.drain();
        self.puts_since_flush = 0;
    }
    fn extra(&self) -> String {
        self.db.stats()
    }
    fn reset_stats(&mut self) {
        self.db.reset_lookup_stats();
    }
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.db.get(key)
    }
    fn history_get(&mut self, rev: u64) -> Option<Vec<u8>> {
        self.db.history_get(rev)
    }
}

// ---------------------------------------------------------------- main

struct Args {
    engine: String,
    scenario: String,
    dir: PathBuf,
    cache_mib: u64,
    memtable_mib: u64,
    persist: String,
    workers: usize,
    puts: u64,
    preload: u64,
    fanout: usize,
}

/// runs engine: block cache size when --cache-mib is not given (0 = no block cache, every block read is a pread)
const RUNS_DEFAULT_CACHE_MIB: u64 = 0;

fn parse_args() -> Args {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 3 {
        eprintln!("usage: enginebench <fjall|redb|runs> <puts|load1m|verify> [--dir D] [--cache-mib N] [--memtable-mib N] [--persist buffer|none] [--workers N] [--puts N] [--preload N] [--fanout N]");
        std::process::exit(2);
    }
    let mut args = Args {
        engine: a[1].clone(),
        scenario: a[2].clone(),
        dir: std::env::temp_dir().join("enginebench"),
        cache_mib: 0,
        memtable_mib: 8,
        persist: "buffer".into(),
        workers: 0,
        puts: 300_000,
        preload: 100_000,
        fanout: 4,
    };
    let mut i = 3;
    while i < a.len() {
        let v = a.get(i + 1).cloned().expect("missing value");
        match a[i].as_str() {
            "--dir" => args.dir = PathBuf::from(v),
            "--cache-mib" => args.cache_mib = v.parse().unwrap(),
            "--memtable-mib" => args.memtable_mib = v.parse().unwrap(),
            "--persist" => args.persist = v,
            "--workers" => args.workers = v.parse().unwrap(),
            "--puts" => args.puts = v.parse().unwrap(),
            "--preload" => args.preload = v.parse().unwrap(),
            "--fanout" => args.fanout = v.parse().unwrap(),
            o => panic!("unknown arg {o}"),
        }
        i += 2;
    }
    if args.cache_mib == 0 {
        args.cache_mib = match args.engine.as_str() {
            "redb" => 24,
            "runs" => RUNS_DEFAULT_CACHE_MIB,
            _ => 16,
        };
    }
    args
}

fn main() {
    let args = parse_args();
    let run_dir = args.dir.join(format!(
        "{}-{}-{}",
        args.engine,
        args.scenario,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).unwrap();

    let persist = match args.persist.as_str() {
        "buffer" => Some(fjall::PersistMode::Buffer),
        "none" => None,
        o => panic!("persist {o}"),
    };
    let mut eng: Box<dyn Engine> = match args.engine.as_str() {
        "fjall" => Box::new(FjallEngine::open(
            &run_dir,
            args.cache_mib,
            args.memtable_mib,
            args.workers,
            persist,
        )),
        "redb" => Box::new(RedbEngine::open(
            &run_dir.join("db.redb"),
            args.cache_mib as usize,
        )),
        "runs" => Box::new(RunsEngine {
            db: runs::RunsDb::open(
                &run_dir,
                if args.cache_mib == 0 {
                    0
                } else {
                    args.cache_mib
                },
                args.fanout,
                100,
            ),
            puts_since_flush: 0,
            flush_every_puts: 1000,
        }),
        o => panic!("engine {o}"),
    };
    let settings = format!(
        "engine={} scenario={} cache_mib={} memtable_mib={} persist={} workers={} fanout={}",
        args.engine,
        args.scenario,
        args.cache_mib,
        args.memtable_mib,
        args.persist,
        args.workers,
        args.fanout
    );
    println!("# {settings}");

    let mut ctx = Ctx {
        pool: Pool::new(),
        rng: Rng(7),
        rev: 0,
        kv_size: 300,
        log_size: 300,
        max_commit: Duration::ZERO,
        slow_commits: 0,
        sum_found: 0,
    };
    let mut keyrng = Rng(12345);

    match args.scenario.as_str() {
        "puts" => {
            // ---- preload: keys 0..preload (every later lookup hits), same put path
            let t0 = Instant::now();
            let c0 = cpu_secs();
            let mut batch = Vec::with_capacity(BATCH);
            for i in 0..args.preload {
                batch.push(make_key(i));
                if batch.len() == BATCH {
                    eng.put_batch(&batch, &mut ctx);
                    batch.clear();
                }
            }
            if !batch.is_empty() {
                eng.put_batch(&batch, &mut ctx);
                batch.clear();
            }
            eng.drain();
            println!(
                "preload: {} keys wall={:.2}s cpu={:.2}s rss={:.1}MiB hwm={:.1}MiB",
                args.preload,
                t0.elapsed().as_secs_f64(),
                cpu_secs() - c0,
                rss_mib(),
                hwm_mib()
            );
            let preload_hwm = hwm_mib();
            reset_hwm();
            ctx.max_commit = Duration::ZERO;
            ctx.slow_commits = 0;
            ctx.sum_found = 0;
            eng.reset_stats();

            // ---- measured phase
            let t1 = Instant::now();
            let c1 = cpu_secs();
            let bg1 = bg_thread_cpu_secs();
            let io1 = io_written();
            let mut max_threads = threads();
            let nbatches = args.puts / BATCH as u64;
            for bi in 0..nbatches {
                for _ in 0..BATCH {
                    batch.push(make_key(keyrng.below(args.preload)));
                }
                eng.put_batch(&batch, &mut ctx);
                batch.clear();
                if bi % 400 == 0 {
                    max_threads = max_threads.max(threads());
                }
            }
            let wall = t1.elapsed().as_secs_f64();
            let cpu = cpu_secs() - c1;
            let rss_end = rss_mib();
            eng.drain();
            let wall_d = t1.elapsed().as_secs_f64();
            let cpu_d = cpu_secs() - c1;
            let bg_d = bg_thread_cpu_secs() - bg1;
            let io2 = io_written();
            let puts = (nbatches * BATCH as u64) as f64;
            let (files, bytes) = dir_stats(&run_dir);
            let extra = eng.extra();
            println!(
                "RESULT {settings} {extra} puts={} wall_s={:.3} cpu_s={:.3} cpu_us_per_put={:.2} wall_us_per_put={:.2} \
                 cpu_s_incl_drain={:.3} cpu_us_per_put_incl_drain={:.2} wall_s_incl_drain={:.3} \
                 bg_cpu_us_per_put_incl_drain={:.2} peak_rss_mib={:.1} rss_end_mib={:.1} preload_hwm_mib={:.1} threads_max={} max_commit_ms={:.1} slow_commits={} found={} files={} disk_mib={:.1} \
                 io_wchar_mib={:.1} io_write_mib={:.1}",
                puts,
                wall,
                cpu,
                cpu / puts * 1e6,
                wall / puts * 1e6,
                cpu_d,
                cpu_d / puts * 1e6,
                wall_d,
                bg_d / puts * 1e6,
                hwm_mib(),
                rss_end,
                preload_hwm,
                max_threads,
                ctx.max_commit.as_secs_f64() * 1e3,
                ctx.slow_commits,
                ctx.sum_found,
                files,
                bytes as f64 / 1048576.0,
                (io2.0 - io1.0) as f64 / 1048576.0,
                (io2.1 as f64 - io1.1 as f64) / 1048576.0
            );
        }
        "load1m" => {
            ctx.kv_size = 256;
            ctx.log_size = 256;
            let n: u64 = 1_000_000;
            let t0 = Instant::now();
            let c0 = cpu_secs();
            let io0 = io_written();
            let mut batch = Vec::with_capacity(BATCH);
            for i in 0..n {
                batch.push(make_key(i));
                if batch.len() == BATCH {
                    eng.put_batch(&batch, &mut ctx);
                    batch.clear();
                }
            }
            let load_wall = t0.elapsed().as_secs_f64();
            let load_cpu = cpu_secs() - c0;
            let rss_after_load = rss_mib();
            let hwm_load = hwm_mib();
            eng.drain();
            let settle_wall = t0.elapsed().as_secs_f64();
            let settle_cpu = cpu_secs() - c0;
            let io1 = io_written();
            std::thread::sleep(Duration::from_millis(500));
            let rss_after_drain = rss_mib();
            println!("extra: {}", eng.extra());
            eng.reset_stats();

            // lookups
            let lookups = 100_000u64;
            let mut found = 0usize;
            let t1 = Instant::now();
            let c1 = cpu_secs();
            for _ in 0..lookups / BATCH as u64 {
                for _ in 0..BATCH {
                    batch.push(make_key(keyrng.below(n)));
                }
                found += eng.lookup_batch(&batch);
                batch.clear();
            }
            let lw = t1.elapsed().as_secs_f64();
            let lc = cpu_secs() - c1;
            assert_eq!(found as u64, lookups, "all lookups must hit");
            let (files, bytes) = dir_stats(&run_dir);
            let extra = eng.extra();
            println!(
                "RESULT {settings} {extra} load_wall_s={:.2} load_cpu_s={:.2} load_cpu_us_per_put={:.2} settle_wall_s={:.2} settle_cpu_s={:.2} \
                 rss_after_load_mib={:.1} hwm_during_load_mib={:.1} rss_after_drain_mib={:.1} \
                 lookup_wall_us={:.2} lookup_cpu_us={:.2} rss_after_lookups_mib={:.1} peak_rss_mib={:.1} threads={} max_commit_ms={:.1} slow_commits={} files={} disk_mib={:.1} io_wchar_mib={:.1} io_write_mib={:.1}",
                load_wall,
                load_cpu,
                load_cpu / n as f64 * 1e6,
                settle_wall,
                settle_cpu,
                rss_after_load,
                hwm_load,
                rss_after_drain,
                lw / lookups as f64 * 1e6,
                lc / lookups as f64 * 1e6,
                rss_mib(),
                hwm_mib(),
                threads(),
                ctx.max_commit.as_secs_f64() * 1e3,
                ctx.slow_commits,
                files,
                bytes as f64 / 1048576.0,
                (io1.0 - io0.0) as f64 / 1048576.0,
                (io1.1 as f64 - io0.1 as f64) / 1048576.0
            );
        }
        "verify" => {
            // Correctness check (not a measurement). The generator is deterministic, so a shadow model replays it:
            // for each put the expected prev revision is the shadow's current revision of that key, and both the
            // record and the history event embed prev. Comparing every final record and every history event byte
            // for byte therefore also checks the result of every lookup the put path made (while compaction ran).
            let hashv = |v: &[u8]| {
                use std::hash::Hasher;
                let mut h = std::collections::hash_map::DefaultHasher::new();
                h.write(v);
                h.finish()
            };
            let spool = Pool::new();
            let mut srng = Rng(7);
            let mut srev = 0u64;
            let mut cur: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
            let mut evh: Vec<u64> = vec![0];
            let mut vrng = Rng(99);
            let (mut checks, mut bad) = (0u64, 0u64);
            let nkeys = args.preload;
            let nbatches = (nkeys + args.puts) / BATCH as u64;
            let t0 = Instant::now();
            for bi in 0..nbatches {
                let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
                for j in 0..BATCH as u64 {
                    let i = bi * BATCH as u64 + j;
                    if i < nkeys {
                        batch.push(make_key(i));
                    } else if j > 0 && keyrng.below(8) == 0 {
                        let d = batch[j as usize - 1].clone(); // same key twice in one batch
                        batch.push(d);
                    } else {
                        batch.push(make_key(keyrng.below(nkeys)));
                    }
                }
                eng.put_batch(&batch, &mut ctx);
                for k in &batch {
                    let prev = prev_rev(cur.get(k).map(|v| v.as_slice()));
                    srev += 1;
                    let rec = make_record(&spool, &mut srng, srev, prev, ctx.kv_size);
                    let ev = make_event(&spool, &mut srng, k, srev, prev, ctx.log_size);
                    cur.insert(k.clone(), rec);
                    evh.push(hashv(&ev));
                }
                if bi % 37 == 0 {
                    // random gets of existing and missing keys, mid-run
                    for _ in 0..20 {
                        let k = make_key(vrng.below(nkeys + nkeys / 10));
                        checks += 1;
                        if eng.get(&k) != cur.get(&k).cloned() {
                            bad += 1;
                        }
                    }
                }
            }
            assert_eq!(srev, ctx.rev);
            let full_check = |eng: &mut Box<dyn Engine>, label: &str| {
                let (mut c, mut b) = (0u64, 0u64);
                for i in 0..nkeys + 1000 {
                    let k = make_key(i);
                    c += 1;
                    if eng.get(&k) != cur.get(&k).cloned() {
                        b += 1;
                    }
                }
                for rev in 1..=srev + 10 {
                    c += 1;
                    let got = eng.history_get(rev).map(|v| hashv(&v));
                    let want = if rev <= srev {
                        Some(evh[rev as usize])
                    } else {
                        None
                    };
                    if got != want {
                        b += 1;
                    }
                }
                println!("verify {label}: {c} checks, {b} mismatches");
                (c, b)
            };
            let (c1, b1) = full_check(&mut eng, "before drain");
            eng.drain();
            let (c2, b2) = full_check(&mut eng, "after drain");
            checks += c1 + c2;
            bad += b1 + b2;
            let (files, bytes) = dir_stats(&run_dir);
            println!(
                "RESULT {settings} {} puts={} verify_checks={} verify_mismatches={} wall_s={:.2} files={} disk_mib={:.1}",
                eng.extra(),
                srev,
                checks,
                bad,
                t0.elapsed().as_secs_f64(),
                files,
                bytes as f64 / 1048576.0
            );
            assert_eq!(bad, 0, "verify failed");
        }
        o => panic!("scenario {o}"),
    }
    drop(eng);
    let _ = std::fs::remove_dir_all(&run_dir);
}
