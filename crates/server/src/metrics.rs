//! Prometheus metrics: requests by endpoint and status, latency histograms, group
//! commit batch sizes and durations, the number of stored entries, the entry
//! cache's hits, misses and size, token failures and watches.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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

fn latency_histogram() -> Histogram {
    // 50 µs to about 3.3 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 17))
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    commit_batch: Histogram,
    commit_seconds: Histogram,
    entries: Gauge,
    token_failures: Counter,
    throttled: Counter,
    watchers: Gauge,
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
    latency_of: Vec<(&'static str, Histogram)>,
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
        let latency = Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
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
