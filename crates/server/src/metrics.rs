//! Prometheus metrics: requests by endpoint and status, latency histograms, group
//! commit batch sizes and durations, and the number of stored entries.

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
}

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
        Metrics {
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
        self.requests
            .get_or_create(&RequestLabels {
                endpoint,
                method,
                status,
            })
            .inc();
        self.latency
            .get_or_create(&EndpointLabels { endpoint })
            .observe(seconds);
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

    /// Renders the text exposition format, with the entry count given.
    pub fn render(&self, entries: u64) -> String {
        self.entries.set(entries as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
