//! The metadata service: every operation both APIs offer, with its access checks.
//!
//! The HTTP handlers parse a request into names, tokens and options, call one method
//! here, and render the answer in their own dialect. Everything that decides who may
//! do what, and every interaction with the store, lives here, written once.

use crate::audit::{self, Audit};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::throttle::{Throttle, ThrottleSettings, Verdict};
use amphora_model::{
    ENTRY_NAMESPACE, EntryKey, Limits, ModelError, NameKind, Record, TokenHash, TokenHasher,
    TokenRole, check_token_strength, context_prefix, family_prefix, validate_name,
};
use amphora_store::{
    Condition, EventKind, KeyValue, Lease, LeaseChoice, LeaseId, Put, Revision, Store, StoreError,
    ValueGuard, now_ms,
};
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// How many times an update is retried when another writer changed the entry
/// between our read and our compare-and-set.
const MAX_RETRIES: usize = 16;

/// Runtime settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Name and value limits.
    pub limits: Limits,
    /// Refuse weak tokens (COMET's rule).
    pub check_token_strength: bool,
    /// COMET's idle expiry `E`: an entry not accessed for `2 × E` is removed.
    /// Zero switches it off.
    pub idle_expiry: Duration,
    /// The most entries one COMET enumerateScope answers.
    pub max_enumerate: usize,
    /// Creating and deleting need a client certificate that chains to the client CA.
    pub require_client_cert: bool,
    /// Brute-force protection.
    pub throttle: ThrottleSettings,
    /// SHA-256 of the admin token, if one is configured.
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Certificate subjects with admin rights (the certificate must be trusted too).
    pub admin_subjects: Vec<String>,
}

/// Who is asking: the client's address and what its certificate proved.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The client's address (from a trusted proxy's `X-Forwarded-For` if configured).
    pub addr: IpAddr,
    /// The subject of the certificate it presented, if any.
    pub subject: Option<String>,
    /// True when that certificate chains to the client CA and is valid now.
    pub trusted_cert: bool,
    /// Which API it came through (`native`, `comet`, `admin`), for the audit log.
    pub api: &'static str,
}

/// The names an audited operation is about.
#[derive(Debug, Clone, Copy, Default)]
struct Names<'a> {
    context: Option<&'a str>,
    family: Option<&'a str>,
    key: Option<&'a str>,
}

impl<'a> Names<'a> {
    fn entry(k: &'a EntryKey) -> Self {
        Names {
            context: Some(&k.context),
            family: Some(&k.family),
            key: Some(&k.key),
        }
    }
}

/// What a read found.
enum Lookup {
    Found(Found),
    Absent,
    WrongToken,
}

/// An entry read, without its names (the reader has them).
struct Found {
    value: String,
    revision: Revision,
    created_at_ms: u64,
    updated_at_ms: u64,
    expires_at_ms: Option<u64>,
}

impl Found {
    fn named(self, key: EntryKey) -> Entry {
        Entry {
            key,
            value: self.value,
            revision: self.revision,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// Server statistics for administrators.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    /// The store's revision.
    pub revision: Revision,
    /// Stored entries.
    pub entries: u64,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// COMET idle expiry E, in seconds (0: off).
    pub idle_expiry_seconds: f64,
    /// Whether creating and deleting need a trusted client certificate.
    pub require_client_cert: bool,
}

/// An entry as the APIs show it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its names.
    pub key: EntryKey,
    /// The value as JSON text.
    pub value: String,
    /// The revision of its last change.
    pub revision: Revision,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Last write, ms since the Unix epoch.
    pub updated_at_ms: u64,
    /// Lease expiry, ms since the Unix epoch.
    pub expires_at_ms: Option<u64>,
}

/// Options of a write.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Compare-and-set: the entry's current revision must be this.
    pub if_match: Option<Revision>,
    /// Create only: refuse when the entry exists.
    pub create_only: bool,
    /// Attach the entry to a new lease of this duration.
    pub ttl: Option<Duration>,
    /// The caller has checked the value's size against the limit in the form its
    /// API takes values (COMET's raw text, which is stored as a JSON string that
    /// escaping makes longer), so the stored form is not checked again.
    pub size_checked: bool,
}

/// The result of a write.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// The revision of the change.
    pub revision: Revision,
    /// True when the write created the entry.
    pub created: bool,
}

/// One item of an entry's history.
#[derive(Debug, Clone)]
pub struct HistoryItem {
    /// Revision of the change.
    pub revision: Revision,
    /// Put or delete.
    pub kind: EventKind,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// The value written (JSON text), for a put.
    pub value: Option<String>,
}

/// A page of a listing.
#[derive(Debug, Default)]
pub struct Listing {
    /// Visible entries, in order.
    pub entries: Vec<Entry>,
    /// Store key to continue after, when more may follow.
    pub next: Option<Vec<u8>>,
    /// Entries read to answer (visible or not).
    pub examined: usize,
}

/// Tracks the last access of each entry for COMET's idle expiry.
///
/// Accesses are kept in memory (a sharded map, no global lock): writing an access
/// time to disk on every read would turn reads into writes. After a restart every
/// entry counts as accessed at start-up, so a restart never makes an entry expire
/// early.
struct IdleTracker {
    window_ms: u64,
    started_ms: u64,
    last_access: DashMap<Vec<u8>, u64>,
}

impl IdleTracker {
    fn last(&self, key: &[u8], updated_ms: u64) -> u64 {
        let seen = self.last_access.get(key).map(|v| *v).unwrap_or(0);
        seen.max(updated_ms).max(self.started_ms)
    }

    fn expired(&self, key: &[u8], updated_ms: u64, now: u64) -> bool {
        now.saturating_sub(self.last(key, updated_ms)) >= self.window_ms
    }

    fn touch(&self, key: &[u8], now: u64) {
        self.last_access.insert(key.to_vec(), now);
    }
}

/// The service shared by every request.
pub struct Service {
    store: Arc<dyn Store>,
    hasher: TokenHasher,
    settings: ServiceSettings,
    idle: Option<IdleTracker>,
    throttle: Throttle,
    metrics: Arc<Metrics>,
    audit: Audit,
    started_ms: u64,
}

fn corrupted(e: ModelError) -> ApiError {
    ApiError::Internal(e.to_string())
}

impl Service {
    /// A service over `store`, hashing tokens with `server_key`.
    pub fn new(
        store: Arc<dyn Store>,
        server_key: &[u8; 32],
        settings: ServiceSettings,
        metrics: Arc<Metrics>,
        audit: Audit,
    ) -> Self {
        let idle = (!settings.idle_expiry.is_zero()).then(|| IdleTracker {
            window_ms: (settings.idle_expiry.as_millis() as u64).saturating_mul(2),
            started_ms: now_ms(),
            last_access: DashMap::new(),
        });
        Service {
            store,
            hasher: TokenHasher::new(server_key),
            throttle: Throttle::new(settings.throttle),
            settings,
            idle,
            metrics,
            audit,
            started_ms: now_ms(),
        }
    }

    /// The audit log.
    pub fn audit_log(&self) -> &Audit {
        &self.audit
    }

    /// Refuses or slows a caller with too many recent token failures on `context`.
    async fn admit(&self, caller: &Caller, context: &str) -> Result<(), ApiError> {
        // Most of the time no client has failed lately: no clock to read then.
        if self.throttle.quiet() {
            return Ok(());
        }
        match self.throttle.check(caller.addr, context, now_ms()) {
            Verdict::Pass => Ok(()),
            Verdict::Slow(pause) => {
                tokio::time::sleep(pause).await;
                Ok(())
            }
            Verdict::Refuse(seconds) => {
                self.metrics.throttled();
                Err(ApiError::TooManyFailures(seconds))
            }
        }
    }

    fn token_failure(&self, caller: &Caller, context: &str) {
        self.metrics.token_failure();
        if self.throttle.fail(caller.addr, context, now_ms()) {
            tracing::warn!(client = %caller.addr, context, "client blocked after repeated token failures");
        }
    }

    async fn audit(&self, caller: &Caller, operation: &str, names: Names<'_>, outcome: &str) {
        if !self.audit.enabled() {
            return;
        }
        self.audit
            .record(&audit::Record {
                time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                client: caller.addr.to_string(),
                subject: caller.subject.as_deref(),
                trusted_cert: caller.trusted_cert,
                api: caller.api,
                operation,
                context: names.context,
                family: names.family,
                key: names.key,
                outcome,
            })
            .await;
    }

    /// Audits an operation's result, counting a token failure for the throttle.
    async fn finish<T>(
        &self,
        caller: &Caller,
        operation: &str,
        names: Names<'_>,
        result: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.status_and_code().1,
        };
        if let (Err(ApiError::Forbidden), Some(context)) = (&result, names.context) {
            self.token_failure(caller, context);
        }
        self.audit(caller, operation, names, outcome).await;
        result
    }

    /// Runs one operation the way every operation runs: the throttle first, then the
    /// work, then the audit record (and the token-failure count) of its result.
    async fn guarded<T>(
        &self,
        caller: &Caller,
        names: Names<'_>,
        operation: impl FnOnce(&Result<T, ApiError>) -> &'static str,
        work: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let result = match self.admit(caller, names.context.unwrap_or_default()).await {
            Ok(()) => work.await,
            Err(e) => Err(e),
        };
        let operation = operation(&result);
        self.finish(caller, operation, names, result).await
    }

    fn require_cert(&self, caller: &Caller, what: &'static str) -> Result<(), ApiError> {
        if !self.cert_allows(caller) {
            return Err(ApiError::ClientCertRequired(what));
        }
        Ok(())
    }

    /// Whether the policy lets `caller` do what needs a trusted client certificate.
    fn cert_allows(&self, caller: &Caller) -> bool {
        !self.settings.require_client_cert || caller.trusted_cert
    }

    /// The store, for health checks and metrics.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The settings in force.
    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }

    /// Validates the three names of an entry.
    pub fn entry_key(&self, context: &str, family: &str, key: &str) -> Result<EntryKey, ApiError> {
        let l = &self.settings.limits;
        validate_name(NameKind::Context, context, l).map_err(ApiError::InvalidName)?;
        validate_name(NameKind::Family, family, l).map_err(ApiError::InvalidName)?;
        validate_name(NameKind::Key, key, l).map_err(ApiError::InvalidName)?;
        Ok(EntryKey::new(context, family, key))
    }

    /// Validates a context name.
    pub fn context_name(&self, context: &str) -> Result<(), ApiError> {
        validate_name(NameKind::Context, context, &self.settings.limits)
            .map_err(ApiError::InvalidName)
    }

    /// Validates a family name.
    pub fn family_name(&self, family: &str) -> Result<(), ApiError> {
        validate_name(NameKind::Family, family, &self.settings.limits)
            .map_err(ApiError::InvalidName)
    }

    /// Checks a value's size against the limit.
    pub fn check_value(&self, len: usize) -> Result<(), ApiError> {
        self.settings
            .limits
            .check_value_len(len)
            .map_err(ApiError::ValueTooLarge)
    }

    fn token(&self, role: TokenRole, token: &str) -> Result<TokenHash, ApiError> {
        if self.settings.check_token_strength {
            check_token_strength(role, token).map_err(ApiError::InvalidToken)?;
        }
        Ok(self.hasher.hash(token))
    }

    fn token_pair(&self, read: &str, write: &str) -> Result<(TokenHash, TokenHash), ApiError> {
        if read == write {
            return Err(ApiError::InvalidToken(ModelError::EqualTokens));
        }
        Ok((
            self.token(TokenRole::Read, read)?,
            self.token(TokenRole::Write, write)?,
        ))
    }

    /// Decodes a stored entry; `None` when idle expiry has already claimed it.
    fn live(&self, kv: &KeyValue, now: u64) -> Result<Option<Record>, ApiError> {
        let record = Record::decode(&kv.value).map_err(corrupted)?;
        Ok(self.is_live(kv, &record, now).then_some(record))
    }

    /// False when the idle policy has expired the entry.
    fn is_live(&self, kv: &KeyValue, record: &Record, now: u64) -> bool {
        !self
            .idle
            .as_ref()
            .is_some_and(|idle| idle.expired(&kv.key, record.updated_at_ms, now))
    }

    fn touch(&self, key: &[u8], now: u64) {
        if let Some(idle) = &self.idle {
            idle.touch(key, now);
        }
    }

    async fn found(&self, kv: &KeyValue, record: Record) -> Result<Found, ApiError> {
        let expires_at_ms = match (kv.lease, kv.lease_expires_at_ms) {
            (None, _) => None,
            (Some(_), Some(at)) => Some(at),
            (Some(id), None) => self.store.lease(id).await?.map(|l| l.expires_at_ms),
        };
        Ok(Found {
            value: record.value,
            revision: kv.mod_revision,
            created_at_ms: record.created_at_ms,
            updated_at_ms: record.updated_at_ms,
            expires_at_ms,
        })
    }

    /// Revokes a lease no entry is attached to, without making the request wait: a
    /// revoke is a barrier the store may hold back until its running checkpoint is
    /// done, and if it fails the lease expires by itself, holding nothing.
    fn revoke_unused(&self, id: LeaseId) {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store.revoke_lease(id).await {
                tracing::debug!(lease = id, error = %e, "an unused lease was left to expire");
            }
        });
    }

    /// Reads an entry; `None` when it does not exist or the read token is not its own.
    /// The entry found takes `key` for its names.
    pub async fn read(
        &self,
        caller: &Caller,
        key: EntryKey,
        read: &str,
    ) -> Result<Option<Entry>, ApiError> {
        let result = match self.admit(caller, &key.context).await {
            Ok(()) => self.lookup(&key, read).await,
            Err(e) => Err(e),
        };
        let (result, outcome) = match result {
            Ok(Lookup::Found(e)) => (Ok(Some(e)), "ok"),
            Ok(Lookup::Absent) => (Ok(None), "not_found"),
            Ok(Lookup::WrongToken) => {
                self.token_failure(caller, &key.context);
                (Ok(None), "forbidden")
            }
            Err(e) => {
                let code = e.status_and_code().1;
                (Err(e), code)
            }
        };
        self.audit(caller, "read", Names::entry(&key), outcome)
            .await;
        result.map(|found| found.map(|f| f.named(key)))
    }

    async fn lookup(&self, key: &EntryKey, read: &str) -> Result<Lookup, ApiError> {
        let read = self.token(TokenRole::Read, read)?;
        let encoded = key.encode();
        // Only the idle policy needs the time.
        let now = if self.idle.is_some() { now_ms() } else { 0 };
        let Some(mut kv) = self.store.get(&encoded).await? else {
            return Ok(Lookup::Absent);
        };
        // The value moves into the record (a read copies it once less).
        let record = Record::decode_owned(std::mem::take(&mut kv.value)).map_err(corrupted)?;
        if !self.is_live(&kv, &record, now) {
            return Ok(Lookup::Absent);
        }
        if !record.readable_with(&read) {
            return Ok(Lookup::WrongToken);
        }
        self.touch(&encoded, now);
        self.found(&kv, record).await.map(Lookup::Found)
    }

    /// Creates or modifies an entry. Creating needs both tokens (and a trusted client
    /// certificate when the policy asks for one); modifying needs the entry's own tokens.
    pub async fn write(
        &self,
        caller: &Caller,
        key: &EntryKey,
        value: String,
        read: &str,
        write: &str,
        options: &WriteOptions,
    ) -> Result<Written, ApiError> {
        let operation = |r: &Result<Written, ApiError>| match r {
            Ok(w) if w.created => "create",
            Ok(_) => "modify",
            Err(_) => "write",
        };
        let work = self.write_inner(caller, key, value, read, write, options);
        self.guarded(caller, Names::entry(key), operation, work)
            .await
    }

    async fn write_inner(
        &self,
        caller: &Caller,
        key: &EntryKey,
        value: String,
        read: &str,
        write: &str,
        options: &WriteOptions,
    ) -> Result<Written, ApiError> {
        if !options.size_checked {
            self.check_value(value.len())?;
        }
        let (read, write) = self.token_pair(read, write)?;
        let encoded = key.encode();
        if let Some(written) = self
            .write_in_place(caller, &encoded, &value, &read, &write, options)
            .await?
        {
            return Ok(written);
        }
        for _ in 0..MAX_RETRIES {
            let now = now_ms();
            let current = self.store.get(&encoded).await?;
            let live = match &current {
                Some(kv) => self.live(kv, now)?.map(|r| (kv, r)),
                None => None,
            };
            let (record, condition, created, old_lease) = match live {
                None => {
                    if options.if_match.is_some() {
                        return Err(ApiError::PreconditionFailed(
                            "If-Match given but the entry does not exist".into(),
                        ));
                    }
                    self.require_cert(caller, "creating an entry")?;
                    let record = Record {
                        created_at_ms: now,
                        updated_at_ms: now,
                        read_hash: read,
                        write_hash: write,
                        value: value.clone(),
                    };
                    // An idle-expired entry still stored is replaced by revision.
                    let condition = current
                        .as_ref()
                        .map(|kv| Condition::Revision(kv.mod_revision))
                        .unwrap_or(Condition::Absent);
                    (record, condition, true, None)
                }
                Some((kv, old)) => {
                    if options.create_only {
                        return Err(ApiError::PreconditionFailed(
                            "If-None-Match: * given but the entry exists".into(),
                        ));
                    }
                    if !old.writable_with(&read, &write) {
                        return Err(ApiError::Forbidden);
                    }
                    if let Some(want) = options.if_match
                        && want != kv.mod_revision
                    {
                        return Err(ApiError::PreconditionFailed(format!(
                            "If-Match: {want} but the entry is at revision {}",
                            kv.mod_revision
                        )));
                    }
                    let record = Record {
                        updated_at_ms: now,
                        value: value.clone(),
                        ..old
                    };
                    (
                        record,
                        Condition::Revision(kv.mod_revision),
                        false,
                        kv.lease,
                    )
                }
            };
            let lease = match options.ttl {
                Some(ttl) => LeaseChoice::Set(self.store.grant_lease(ttl).await?.id),
                None => LeaseChoice::Keep,
            };
            let put = Put {
                lease,
                ..Put::new(encoded.clone(), record.encode(), condition)
            };
            match self.store.put(put).await {
                Ok(revision) => {
                    if let (LeaseChoice::Set(_), Some(old)) = (lease, old_lease) {
                        // The entry moved to its new lease; the old one holds nothing now.
                        self.revoke_unused(old);
                    }
                    self.touch(&encoded, now);
                    return Ok(Written { revision, created });
                }
                Err(StoreError::Conflict { .. }) => {
                    if let LeaseChoice::Set(id) = lease {
                        self.revoke_unused(id);
                    }
                    if options.if_match.is_some() {
                        return Err(ApiError::PreconditionFailed(
                            "the entry changed concurrently".into(),
                        ));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict(
            "the entry is being changed by many writers at once; retry".into(),
        ))
    }

    /// The common writes, a plain modify of an existing entry or the creation of a
    /// new one, in one store step: the store checks the token hashes and carries the
    /// creation time over from the current record or, when there is no live entry,
    /// stores the new record as it is. Nothing is read first. `None` when this write
    /// is not such a write (options or idle expiry need the current record, or there
    /// is no entry and this request may not create one here): the caller takes the
    /// general path, which says why.
    async fn write_in_place(
        &self,
        caller: &Caller,
        encoded: &[u8],
        value: &str,
        read: &TokenHash,
        write: &TokenHash,
        options: &WriteOptions,
    ) -> Result<Option<Written>, ApiError> {
        // Idle expiry decides liveness from the record; create-only and leases need
        // to know whether the entry exists.
        if self.idle.is_some() || options.create_only || options.ttl.is_some() {
            return Ok(None);
        }
        // If-Match needs an existing entry, and creating may need a trusted
        // certificate: without them, only a modify is tried here.
        let create = options.if_match.is_none() && self.cert_allows(caller);
        let now = now_ms();
        let record = Record {
            // A modify carries the current record's over.
            created_at_ms: now,
            updated_at_ms: now,
            read_hash: *read,
            write_hash: *write,
            value: value.to_owned(),
        };
        let condition = match options.if_match {
            Some(revision) => Condition::Revision(revision),
            None if create => Condition::None,
            None => Condition::Exists,
        };
        let put = Put {
            guard: Some(ValueGuard {
                offset: Record::TOKEN_HASHES.start,
                expected: [read.0, write.0].concat(),
                carry: Record::CREATED_AT,
                create,
            }),
            ..Put::new(encoded.to_vec(), record.encode(), condition)
        };
        match self.store.put_outcome(put).await {
            Ok(outcome) => Ok(Some(Written {
                revision: outcome.revision,
                created: outcome.created,
            })),
            Err(StoreError::Mismatch) => Err(ApiError::Forbidden),
            // Absent, or If-Match did not hold: the general path says which.
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The live entry under `encoded` when both tokens are its own: 404 when it does
    /// not exist, 403 when the tokens are not its own.
    async fn owned(
        &self,
        encoded: &[u8],
        read: &TokenHash,
        write: &TokenHash,
    ) -> Result<KeyValue, ApiError> {
        let Some(kv) = self.store.get(encoded).await? else {
            return Err(ApiError::NotFound);
        };
        let Some(record) = self.live(&kv, now_ms())? else {
            return Err(ApiError::NotFound);
        };
        if !record.writable_with(read, write) {
            return Err(ApiError::Forbidden);
        }
        Ok(kv)
    }

    /// Deletes an entry with its tokens (and a trusted client certificate when the
    /// policy asks for one).
    pub async fn delete(
        &self,
        caller: &Caller,
        key: &EntryKey,
        read: &str,
        write: &str,
    ) -> Result<Revision, ApiError> {
        let work = self.delete_inner(caller, key, read, write);
        self.guarded(caller, Names::entry(key), |_| "delete", work)
            .await
    }

    async fn delete_inner(
        &self,
        caller: &Caller,
        key: &EntryKey,
        read: &str,
        write: &str,
    ) -> Result<Revision, ApiError> {
        self.require_cert(caller, "deleting an entry")?;
        let (read, write) = self.token_pair(read, write)?;
        let encoded = key.encode();
        for _ in 0..MAX_RETRIES {
            let kv = self.owned(&encoded, &read, &write).await?;
            match self
                .store
                .delete(&encoded, Condition::Revision(kv.mod_revision))
                .await
            {
                Ok(Some(revision)) => {
                    if let Some(idle) = &self.idle {
                        idle.last_access.remove(&encoded);
                    }
                    return Ok(revision);
                }
                Ok(None) => return Err(ApiError::NotFound),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Conflict(
            "the entry is being changed by many writers at once; retry".into(),
        ))
    }

    /// Lists the entries of a context (or of one family) visible to the read token.
    ///
    /// Invisible entries are skipped; to bound the work of one request, at most
    /// `limit × 10 + 100` entries are examined, and `next` tells where to go on.
    pub async fn list(
        &self,
        caller: &Caller,
        context: &str,
        family: Option<&str>,
        read: &str,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Listing, ApiError> {
        let names = Names {
            context: Some(context),
            family,
            key: None,
        };
        let work = self.list_inner(context, family, read, after, limit);
        self.guarded(caller, names, |_| "list", work).await
    }

    async fn list_inner(
        &self,
        context: &str,
        family: Option<&str>,
        read: &str,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Listing, ApiError> {
        let read = self.token(TokenRole::Read, read)?;
        let prefix = match family {
            Some(f) => family_prefix(context, f),
            None => context_prefix(context),
        };
        let mut budget = limit.saturating_mul(10).saturating_add(100);
        let mut after = after;
        let mut listing = Listing::default();
        loop {
            let chunk = (limit - listing.entries.len() + 1).min(budget).max(1);
            let page = self.store.range(&prefix, after.as_deref(), chunk).await?;
            let now = now_ms();
            for kv in &page.items {
                budget = budget.saturating_sub(1);
                listing.examined += 1;
                after = Some(kv.key.clone());
                let Some(record) = self.live(kv, now)? else {
                    continue;
                };
                if !record.readable_with(&read) {
                    continue;
                }
                if listing.entries.len() == limit {
                    // One more visible entry exists: continue after the last returned.
                    listing.next = listing.entries.last().map(|e| e.key.encode());
                    return Ok(listing);
                }
                self.touch(&kv.key, now);
                let key = EntryKey::decode(&kv.key).map_err(corrupted)?;
                listing
                    .entries
                    .push(self.found(kv, record).await?.named(key));
            }
            if !page.more {
                return Ok(listing);
            }
            if budget == 0 {
                listing.next = after;
                return Ok(listing);
            }
        }
    }

    /// Every visible entry of a context or family, for COMET's enumerateScope, which
    /// has no pagination. Refused beyond `max_enumerate` visible entries, or beyond
    /// `max_enumerate × 10 + 100` entries read (visible or not), the bound of a
    /// listing's scan: a caller who sees few of a context's entries cannot make the
    /// server read all of them.
    pub async fn enumerate(
        &self,
        caller: &Caller,
        context: &str,
        family: Option<&str>,
        read: &str,
    ) -> Result<Vec<Entry>, ApiError> {
        let names = Names {
            context: Some(context),
            family,
            key: None,
        };
        let work = self.enumerate_inner(context, family, read);
        self.guarded(caller, names, |_| "list", work).await
    }

    async fn enumerate_inner(
        &self,
        context: &str,
        family: Option<&str>,
        read: &str,
    ) -> Result<Vec<Entry>, ApiError> {
        let max = self.settings.max_enumerate;
        let max_examined = max.saturating_mul(10).saturating_add(100);
        let mut out = Vec::new();
        let mut examined = 0usize;
        let mut after = None;
        // A page reads at most `limit × 10 + 100` entries: checked between pages, the
        // bound is passed by at most one page.
        let limit = max.saturating_add(1).min(1000);
        loop {
            let page = self.list_inner(context, family, read, after, limit).await?;
            out.extend(page.entries);
            examined = examined.saturating_add(page.examined);
            if out.len() > max {
                return Err(ApiError::TooManyEntries(format!(
                    "enumerateScope answers at most {max} entries; name a family, or page through the native API's listing"
                )));
            }
            if examined > max_examined && page.next.is_some() {
                return Err(ApiError::TooManyEntries(format!(
                    "enumerateScope reads at most {max_examined} entries of a context (visible to this token or not); name a family, or page through the native API's listing"
                )));
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// The recent changes of an entry. Visible to whoever holds the read token of
    /// the incarnation a change belongs to, deletions included.
    pub async fn history(
        &self,
        caller: &Caller,
        key: &EntryKey,
        read: &str,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, ApiError> {
        let work = self.history_inner(caller, key, read, limit);
        self.guarded(caller, Names::entry(key), |_| "history", work)
            .await
    }

    async fn history_inner(
        &self,
        caller: &Caller,
        key: &EntryKey,
        read: &str,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, ApiError> {
        let read = self.token(TokenRole::Read, read)?;
        let events = self.store.history(&key.encode(), limit).await?;
        let any = !events.is_empty();
        // Walk oldest to newest so each deletion knows whose entry it ended.
        let mut visible = Vec::new();
        let mut owner_matches = false;
        for event in events.into_iter().rev() {
            match event.kind {
                EventKind::Put => {
                    let record = Record::decode(&event.value).map_err(corrupted)?;
                    owner_matches = record.readable_with(&read);
                    if owner_matches {
                        visible.push(HistoryItem {
                            revision: event.revision,
                            kind: event.kind,
                            at_ms: event.at_ms,
                            value: Some(record.value),
                        });
                    }
                }
                EventKind::Delete => {
                    // A deletion carries the record it ended (older logs: nothing).
                    if !event.value.is_empty() {
                        let record = Record::decode(&event.value).map_err(corrupted)?;
                        owner_matches = record.readable_with(&read);
                    }
                    if owner_matches {
                        visible.push(HistoryItem {
                            revision: event.revision,
                            kind: event.kind,
                            at_ms: event.at_ms,
                            value: None,
                        });
                    }
                    owner_matches = false;
                }
            }
        }
        if visible.is_empty() {
            // The answer does not say the entry has a history, but a token that
            // matches none of it counts as a failed check, as on a read: otherwise
            // history would be a way to guess tokens past the throttle.
            if any {
                self.token_failure(caller, &key.context);
            }
            return Err(ApiError::NotFound);
        }
        visible.reverse();
        Ok(visible)
    }

    /// Admits a watch of a context or a family: answers the hash of its read token,
    /// which decides what the stream shows. A wrong token is not an error here: it
    /// shows nothing, and says nothing about which entries exist.
    pub async fn open_watch(
        &self,
        caller: &Caller,
        context: &str,
        family: Option<&str>,
        read: &str,
    ) -> Result<TokenHash, ApiError> {
        let names = Names {
            context: Some(context),
            family,
            key: None,
        };
        let work = async { self.token(TokenRole::Read, read) };
        self.guarded(caller, names, |_| "watch", work).await
    }

    /// Renews the lease of an entry.
    pub async fn keep_alive(
        &self,
        caller: &Caller,
        key: &EntryKey,
        read: &str,
        write: &str,
    ) -> Result<(Revision, Lease), ApiError> {
        let work = self.keep_alive_inner(key, read, write);
        self.guarded(caller, Names::entry(key), |_| "keepalive", work)
            .await
    }

    async fn keep_alive_inner(
        &self,
        key: &EntryKey,
        read: &str,
        write: &str,
    ) -> Result<(Revision, Lease), ApiError> {
        let (read, write) = self.token_pair(read, write)?;
        let encoded = key.encode();
        let kv = self.owned(&encoded, &read, &write).await?;
        let now = now_ms();
        let Some(lease) = kv.lease else {
            return Err(ApiError::Conflict(
                "the entry has no lease; write it with ?ttl= to give it one".into(),
            ));
        };
        let lease = match self.store.keep_alive(lease).await {
            Ok(l) => l,
            Err(StoreError::LeaseNotFound(_)) => return Err(ApiError::NotFound),
            Err(e) => return Err(e.into()),
        };
        self.touch(&encoded, now);
        Ok((kv.mod_revision, lease))
    }

    /// True when the caller is an administrator: it sent the admin token as a bearer
    /// token, or holds a trusted certificate whose subject is listed as admin.
    pub fn is_admin(&self, caller: &Caller, bearer: Option<&str>) -> bool {
        let by_token = match (bearer, &self.settings.admin_token_sha256) {
            (Some(b), Some(want)) => {
                let got: [u8; 32] = Sha256::digest(b.as_bytes()).into();
                subtle::ConstantTimeEq::ct_eq(&got[..], &want[..]).into()
            }
            _ => false,
        };
        let by_cert = caller.trusted_cert
            && caller
                .subject
                .as_ref()
                .is_some_and(|s| self.settings.admin_subjects.iter().any(|a| a == s));
        by_token || by_cert
    }

    /// Admin: audits an administrative action.
    pub async fn audit_admin<T>(
        &self,
        caller: &Caller,
        operation: &str,
        context: Option<&str>,
        result: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let names = Names {
            context,
            ..Names::default()
        };
        self.finish(caller, operation, names, result).await
    }

    /// Admin: every context with its number of entries, in order.
    pub async fn contexts(&self) -> Result<Vec<(String, u64)>, ApiError> {
        let mut out: Vec<(String, u64)> = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .store
                .range(ENTRY_NAMESPACE, after.as_deref(), 1000)
                .await?;
            for kv in &page.items {
                let key = EntryKey::decode(&kv.key).map_err(corrupted)?;
                match out.last_mut() {
                    Some((c, n)) if *c == key.context => *n += 1,
                    _ => out.push((key.context, 1)),
                }
            }
            match (page.more, page.items.last()) {
                (true, Some(last)) => after = Some(last.key.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// Admin: deletes every entry of a context; answers how many were deleted.
    pub async fn delete_context(&self, context: &str) -> Result<u64, ApiError> {
        self.context_name(context)?;
        let prefix = context_prefix(context);
        let mut deleted = 0;
        loop {
            let page = self.store.range(&prefix, None, 1000).await?;
            if page.items.is_empty() {
                return Ok(deleted);
            }
            // Concurrent deletes share group commits: one fsync per page, not per entry.
            let mut tasks = tokio::task::JoinSet::new();
            for kv in page.items {
                let store = self.store.clone();
                tasks.spawn(async move {
                    store
                        .delete(&kv.key, Condition::Revision(kv.mod_revision))
                        .await
                });
            }
            while let Some(done) = tasks.join_next().await {
                match done.map_err(|e| ApiError::Internal(e.to_string()))? {
                    Ok(Some(_)) => deleted += 1,
                    Ok(None) | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    /// Admin: server statistics.
    pub async fn stats(&self) -> Result<Stats, ApiError> {
        Ok(Stats {
            revision: self.store.revision().await?,
            entries: self.store.entry_count().await?,
            uptime_seconds: now_ms().saturating_sub(self.started_ms) / 1000,
            idle_expiry_seconds: self.settings.idle_expiry.as_secs_f64(),
            require_client_cert: self.settings.require_client_cert,
        })
    }

    /// Forgets stale brute-force counters.
    pub fn prune_throttle(&self) {
        self.throttle.prune(now_ms());
    }

    /// One sweep of COMET's idle expiry: removes every stored entry idle for `2 × E`.
    /// Answers how many were removed.
    pub async fn sweep_idle(&self) -> Result<usize, ApiError> {
        let Some(idle) = &self.idle else { return Ok(0) };
        let mut removed = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .store
                .range(ENTRY_NAMESPACE, after.as_deref(), 1000)
                .await?;
            let now = now_ms();
            for kv in &page.items {
                let record = Record::decode(&kv.value).map_err(corrupted)?;
                if idle.expired(&kv.key, record.updated_at_ms, now) {
                    // By revision: an entry written meanwhile is not removed.
                    if let Ok(Some(_)) = self
                        .store
                        .delete(&kv.key, Condition::Revision(kv.mod_revision))
                        .await
                    {
                        removed += 1;
                        idle.last_access.remove(&kv.key);
                    }
                }
            }
            match (page.more, page.items.last()) {
                (true, Some(last)) => after = Some(last.key.clone()),
                _ => return Ok(removed),
            }
        }
    }
}
