//! Prometheus metrics: requests by endpoint and status, latency histograms, group
//! commit batch sizes and durations, the number of stored entries, the entry
//! cache's hits, misses and size, token failures and watches.

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

/// The upper bounds of latency buckets: 50 µs doubling to about 3.3 s.
const LATENCY_BOUNDS: usize = 17;

fn latency_bounds() -> impl Iterator<Item = f64> {
    exponential_buckets(0.00005, 2.0, LATENCY_BOUNDS as u16)
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_bounds())
}

/// A request latency histogram that takes no lock. prometheus-client's `Histogram`
/// takes a write lock for each observation, which the threads answering requests
/// would all take in turn (a global lock on the read path). Here each thread adds
/// to one of a few shards, each its own cache lines of atomic counters, and a
/// scrape adds the shards up (the count is the sum of the buckets, so the two
/// always agree).
#[derive(Clone, Debug)]
pub struct LatencyHistogram(Arc<[Shard; SHARDS]>);

/// Shards of a [`LatencyHistogram`]; threads are spread over them in turn.
const SHARDS: usize = 8;

/// One shard: a count per bucket (the last one above every bound) and the sum of
/// the observations in nanoseconds.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    buckets: [AtomicU64; LATENCY_BOUNDS + 1],
    sum_nanos: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(Arc::new(Default::default()))
    }
}

impl LatencyHistogram {
    /// Records one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
        }
        let shard = &self.0[SHARD.with(|s| *s)];
        let bucket = latency_bounds()
            .position(|bound| seconds <= bound)
            .unwrap_or(LATENCY_BOUNDS);
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = (seconds * 1e9) as u64;
        shard.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The sum in seconds, the count, and each bucket's upper bound and count.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let bounds = latency_bounds().chain(std::iter::once(f64::MAX));
        let buckets: Vec<(f64, u64)> = bounds
            .enumerate()
            .map(|(i, bound)| {
                let n = self.0.iter().map(|s| s.buckets[i].load(Ordering::Relaxed));
                (bound, n.sum())
            })
            .collect();
        let nanos: u64 = self
            .0
            .iter()
            .map(|s| s.sum_nanos.load(Ordering::Relaxed))
            .sum();
        let count = buckets.iter().map(|(_, n)| n).sum();
        (nanos as f64 / 1e9, count, buckets)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<EndpointLabels, LatencyHistogram>,
    commit_batch: Histogram,
    commit_seconds: Histogram,
    entries: Gauge,
    token_failures: Counter,
    throttled: Counter,
    watchers: Gauge,
    connections: Gauge,
    connections_refused: Counter,
    watch_events: Counter,
    watch_lagged: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_entries: Gauge,
    cache_bytes: Gauge,
    /// Serializes renders: the cache counters are brought up to date in each.
    render_lock: std::sync::Mutex<()>,
    /// The latency histogram of each of [`ENDPOINTS`], found without the family's
    /// lock and hashing (a request's cost is counted in these).
    latency_of: Vec<(&'static str, LatencyHistogram)>,
    /// The request counters of [`HOT_REQUESTS`], found the same way.
    requests_of: Vec<(RequestLabels, Counter)>,
}

/// The answers most requests get (plain reads and writes), whose counters are
/// resolved at start.
const HOT_REQUESTS: &[(&str, &str, u16)] = &[
    ("kv_entry", "GET", 200),
    ("kv_entry", "GET", 404),
    ("kv_entry", "PUT", 200),
    ("kv_entry", "PUT", 201),
    ("comet_read_scope", "GET", 200),
    ("comet_write_scope", "POST", 200),
];

/// Every endpoint label requests are counted under: the routes, never the names in
/// them, so that the label set stays bounded.
pub const ENDPOINTS: &[&str] = &[
    "comet_write_scope",
    "comet_read_scope",
    "comet_enumerate_scope",
    "comet_delete_scope",
    "comet_get_version",
    "healthz",
    "readyz",
    "metrics",
    "admin_contexts",
    "admin_stats",
    "admin_context",
    "watch_context",
    "watch_family",
    "kv_context",
    "kv_family",
    "kv_entry",
    "kv_history",
    "kv_keepalive",
    "other",
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("amphora");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by endpoint, method and status",
            requests.clone(),
        );
        let latency = Family::<EndpointLabels, LatencyHistogram>::default();
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by endpoint",
            latency.clone(),
        );
        let commit_batch = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "store_commit_batch_size",
            "Operations carried by one group commit",
            commit_batch.clone(),
        );
        let commit_seconds = latency_histogram();
        registry.register(
            "store_commit_duration_seconds",
            "Duration of one group commit, fsync included",
            commit_seconds.clone(),
        );
        let entries = Gauge::default();
        registry.register(
            "store_entries",
            "Entries stored (expired ones not yet swept included)",
            entries.clone(),
        );
        let token_failures = Counter::default();
        registry.register(
            "token_failures",
            "Requests whose tokens did not match the entry",
            token_failures.clone(),
        );
        let throttled = Counter::default();
        registry.register(
            "throttled_requests",
            "Requests refused after repeated token failures",
            throttled.clone(),
        );
        let watchers = Gauge::default();
        registry.register("watchers", "Watch streams open", watchers.clone());
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Client connections open",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        let watch_events = Counter::default();
        registry.register(
            "watch_events",
            "Changes sent to watchers (one per watcher that received it)",
            watch_events.clone(),
        );
        let watch_lagged = Counter::default();
        registry.register(
            "watch_lagged",
            "Watch streams ended because their client fell too far behind",
            watch_lagged.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "entry_cache_hits",
            "Reads answered by the entry cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "entry_cache_misses",
            "Reads the entry cache could not answer",
            cache_misses.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "entry_cache_entries",
            "Entries in the entry cache",
            cache_entries.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register(
            "entry_cache_bytes",
            "Bytes the entry cache holds, counted against --entry-cache-bytes",
            cache_bytes.clone(),
        );
        // Created at start, so every endpoint's series is exported from the first
        // scrape on.
        let latency_of = ENDPOINTS
            .iter()
            .map(|&endpoint| {
                let h = latency.get_or_create(&EndpointLabels { endpoint }).clone();
                (endpoint, h)
            })
            .collect();
        let requests_of = HOT_REQUESTS
            .iter()
            .map(|&(endpoint, method, status)| {
                let labels = RequestLabels {
                    endpoint,
                    method,
                    status,
                };
                let counter = requests.get_or_create(&labels).clone();
                (labels, counter)
            })
            .collect();
        Metrics {
            latency_of,
            requests_of,
            cache_hits,
            cache_misses,
            cache_entries,
            cache_bytes,
            render_lock: std::sync::Mutex::new(()),
            watchers,
            connections,
            connections_refused,
            watch_events,
            watch_lagged,
            token_failures,
            throttled,
            registry,
            requests,
            latency,
            commit_batch,
            commit_seconds,
            entries,
        }
    }

    /// Counts one request.
    pub fn observe_request(
        &self,
        endpoint: &'static str,
        method: &'static str,
        status: u16,
        seconds: f64,
    ) {
        let labels = RequestLabels {
            endpoint,
            method,
            status,
        };
        match self.requests_of.iter().find(|(l, _)| *l == labels) {
            Some((_, c)) => c.inc(),
            None => self.requests.get_or_create(&labels).inc(),
        };
        match self.latency_of.iter().find(|(e, _)| *e == endpoint) {
            Some((_, h)) => h.observe(seconds),
            None => self
                .latency
                .get_or_create(&EndpointLabels { endpoint })
                .observe(seconds),
        }
    }

    /// Counts one token failure.
    pub fn token_failure(&self) {
        self.token_failures.inc();
    }

    /// Counts one request refused by the brute-force protection.
    pub fn throttled(&self) {
        self.throttled.inc();
    }

    /// One more (or, with a negative `delta`, fewer) open client connections.
    pub fn connections(&self, delta: i64) {
        self.connections.inc_by(delta);
    }

    /// Counts one connection refused for the connection limit.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// One more (or, with a negative `delta`, fewer) open watch streams.
    pub fn watchers(&self, delta: i64) {
        self.watchers.inc_by(delta);
    }

    /// Counts changes queued for watchers.
    pub fn watch_events(&self, n: u64) {
        self.watch_events.inc_by(n);
    }

    /// Counts a watch stream ended for lagging.
    pub fn watch_lagged(&self) {
        self.watch_lagged.inc();
    }

    /// Records one group commit.
    pub fn observe_commit(&self, info: amphora_store::CommitInfo) {
        self.commit_batch.observe(info.batch_size as f64);
        self.commit_seconds.observe(info.duration.as_secs_f64());
    }

    /// Renders the text exposition format, with the entry count and the entry
    /// cache's figures given.
    pub fn render(&self, entries: u64, cache: amphora_store::CacheStats) -> String {
        let _serial = self.render_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.entries.set(entries as i64);
        self.cache_hits
            .inc_by(cache.hits.saturating_sub(self.cache_hits.get()));
        self.cache_misses
            .inc_by(cache.misses.saturating_sub(self.cache_misses.get()));
        self.cache_entries.set(cache.entries as i64);
        self.cache_bytes.set(cache.bytes as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(name: &str, metric: impl prometheus_client::registry::Metric) -> Vec<String> {
        let mut registry = Registry::default();
        registry.register(name, "h", metric);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out.lines().map(str::to_owned).collect()
    }

    /// Observed from several threads, the lock-free histogram exports what
    /// prometheus-client's own does for the same observations.
    #[test]
    fn latency_histograms_export_what_prometheus_histograms_do() {
        let ours = LatencyHistogram::default();
        let theirs = latency_histogram();
        let values = [
            0.000_01, 0.000_05, 0.000_07, 0.001, 0.002_5, 0.5, 3.0, 10.0, 0.000_2,
        ];
        std::thread::scope(|s| {
            for chunk in values.chunks(2) {
                let ours = &ours;
                s.spawn(move || chunk.iter().for_each(|v| ours.observe(*v)));
            }
        });
        values.iter().for_each(|v| theirs.observe(*v));
        let (ours, theirs) = (text("d", ours), text("d", theirs));
        assert_eq!(ours.len(), theirs.len(), "{ours:#?}\n{theirs:#?}");
        for (a, b) in ours.iter().zip(&theirs) {
            if a.starts_with("d_sum") {
                let value = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
                assert!((value(a) - value(b)).abs() < 1e-6, "{a} vs {b}");
            } else {
                assert_eq!(a, b);
            }
        }
        assert!(ours.iter().any(|l| l == "d_count 9"), "{ours:#?}");
    }
}
