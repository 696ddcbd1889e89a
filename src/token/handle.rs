//! The shared token: a lock-free handle for readers, a single-flight refresh, and the
//! background refresher.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ClientCredentials, Token, TokenError, fetch, refresh_at};

/// A failed fetch is handed to callers that arrive within this time with the same stale token,
/// instead of asking the endpoint again (N workers failing at once, endpoint down).
const FAILURE_REUSE: Duration = Duration::from_secs(1);

/// The current token of one (token URL, client id, scope), shared by every delivery. Cloning is
/// cheap; all clones see the same token.
#[derive(Clone)]
pub struct TokenHandle {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    creds: ClientCredentials,
    slot: ArcSwapOption<Token>,
    /// Serialises fetches (single flight) and holds what the last one did.
    flight: Mutex<Flight>,
    next_generation: AtomicU64,
    /// Wakes the refresher when someone else stored a new token.
    stored: Notify,
    /// The last failed fetch (explained) and when, for `mailbridge status`; cleared by a
    /// success.
    last_error: std::sync::Mutex<Option<(u64, String)>>,
}

/// What `mailbridge status` shows about a token (never the token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFacts {
    /// When the token in hand expires, milliseconds since the Unix epoch.
    pub expires_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
}

#[derive(Default)]
struct Flight {
    /// The generation that was current when the last fetch failed, when, and why.
    last_failure: Option<(u64, Instant, Arc<TokenError>)>,
    /// What was last logged, so a repeated failure is logged once (status, AADSTS code).
    logged_failure: Option<(Option<u16>, Option<u32>)>,
}

impl std::fmt::Debug for TokenHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenHandle")
            .field("token_url", &self.inner.creds.token_url)
            .field("client_id", &self.inner.creds.client_id)
            .field("token", &self.inner.slot.load_full())
            .finish()
    }
}

impl TokenHandle {
    /// A handle with no token yet and no background task: [`TokenHandle::get`] fetches on demand.
    /// [`Refresher::spawn`] makes one that is kept fresh.
    pub fn new(http: reqwest::Client, creds: ClientCredentials) -> TokenHandle {
        TokenHandle {
            inner: Arc::new(Inner {
                http,
                creds,
                slot: ArcSwapOption::empty(),
                flight: Mutex::new(Flight::default()),
                next_generation: AtomicU64::new(1),
                stored: Notify::new(),
                last_error: std::sync::Mutex::new(None),
            }),
        }
    }

    pub fn credentials(&self) -> &ClientCredentials {
        &self.inner.creds
    }

    /// The current token, if there is one and it has not expired. Never waits.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.inner.slot.load_full().filter(|t| !t.is_expired())
    }

    /// Expiry of the token in hand and the last fetch error, for `mailbridge status`.
    pub fn facts(&self) -> TokenFacts {
        let expires_ms = self
            .inner
            .slot
            .load()
            .as_ref()
            .map(|t| crate::spool::now_ms() + t.expires_in().as_millis() as u64);
        let last = self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        TokenFacts {
            expires_ms,
            last_error_ms: last.as_ref().map(|(at, _)| *at),
            last_error: last.map(|(_, e)| e),
        }
    }

    /// The current token, or a freshly fetched one if there is none (single flight).
    pub async fn get(&self) -> Result<Arc<Token>, Arc<TokenError>> {
        if let Some(token) = self.current() {
            return Ok(token);
        }
        self.refresh_unless(true, |current| current.is_some_and(|t| !t.is_expired()))
            .await
    }

    /// Replaces `seen` after the server refused it (`535` on AUTH). Single flight: when N callers
    /// report the same token, the first fetches and the others get its result; a caller whose
    /// `seen` has already been replaced gets the newer token without a request.
    pub async fn force_refresh(&self, seen: &Token) -> Result<Arc<Token>, Arc<TokenError>> {
        let seen = seen.generation;
        self.refresh_unless(true, |current| {
            current.is_some_and(|t| t.generation != seen && !t.is_expired())
        })
        .await
    }

    /// Under the flight lock: returns the current token if `fresh_enough` says so, otherwise
    /// fetches (or, with `reuse_failure`, hands out a failure less than [`FAILURE_REUSE`] old;
    /// the refresher paces itself and does not).
    async fn refresh_unless(
        &self,
        reuse_failure: bool,
        fresh_enough: impl FnOnce(Option<&Token>) -> bool,
    ) -> Result<Arc<Token>, Arc<TokenError>> {
        let mut flight = self.inner.flight.lock().await;
        let current = self.inner.slot.load_full();
        if fresh_enough(current.as_deref())
            && let Some(token) = current
        {
            return Ok(token);
        }
        let current_generation = current.as_ref().map_or(0, |t| t.generation);
        if reuse_failure
            && let Some((generation, at, error)) = &flight.last_failure
            && *generation == current_generation
            && at.elapsed() < FAILURE_REUSE
        {
            return Err(error.clone());
        }
        self.fetch_and_store(&mut flight).await
    }

    async fn fetch_and_store(&self, flight: &mut Flight) -> Result<Arc<Token>, Arc<TokenError>> {
        let creds = &self.inner.creds;
        match fetch(&self.inner.http, creds).await {
            Ok(mut token) => {
                token.generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
                let token = Arc::new(token);
                self.inner.slot.store(Some(token.clone()));
                self.inner.stored.notify_one();
                flight.last_failure = None;
                *self
                    .inner
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                if flight.logged_failure.take().is_some() {
                    tracing::info!(
                        token_url = %creds.token_url,
                        client_id = %creds.client_id,
                        expires_in = token.lifetime.as_secs(),
                        "token endpoint works again: token fetched"
                    );
                } else {
                    tracing::info!(
                        token_url = %creds.token_url,
                        client_id = %creds.client_id,
                        expires_in = token.lifetime.as_secs(),
                        "token fetched"
                    );
                }
                Ok(token)
            }
            Err(error) => {
                let error = Arc::new(error);
                let generation = self.inner.slot.load().as_ref().map_or(0, |t| t.generation);
                flight.last_failure = Some((generation, Instant::now(), error.clone()));
                *self
                    .inner
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some((
                    crate::spool::now_ms(),
                    format!("{error}: {}; fix: {}", error.meaning(), error.remedy()),
                ));
                let key = (error.status(), error.aadsts());
                if flight.logged_failure != Some(key) {
                    flight.logged_failure = Some(key);
                    log_failure(creds, &error, self.current().is_some());
                } else {
                    tracing::debug!(
                        token_url = %creds.token_url,
                        error = %error,
                        "token fetch failed again"
                    );
                }
                Err(error)
            }
        }
    }
}

fn log_failure(creds: &ClientCredentials, error: &TokenError, serving_old: bool) {
    let aadsts = error.aadsts().map(|c| format!("AADSTS{c}"));
    if error.is_temporary() {
        tracing::warn!(
            token_url = %creds.token_url,
            client_id = %creds.client_id,
            aadsts = aadsts.as_deref(),
            meaning = error.meaning(),
            remedy = error.remedy(),
            serving_old_token = serving_old,
            error = %error,
            "token fetch failed"
        );
    } else {
        tracing::error!(
            token_url = %creds.token_url,
            client_id = %creds.client_id,
            aadsts = aadsts.as_deref(),
            meaning = error.meaning(),
            remedy = error.remedy(),
            serving_old_token = serving_old,
            error = %error,
            "token fetch failed"
        );
    }
}

/// Timings of the [`Refresher`]; the defaults suit production, tests shorten them.
#[derive(Clone, Debug)]
pub struct RefreshPolicy {
    /// First wait after a failure; doubles per consecutive failure.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The refresh happens up to this fraction of [`refresh_at`] earlier (never before half
    /// the lifetime), so refreshers started together do not stay in step.
    pub jitter: f64,
    /// The longest `Retry-After` obeyed.
    pub max_retry_after: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5 * 60),
            jitter: 0.05,
            max_retry_after: Duration::from_secs(60 * 60),
        }
    }
}

/// The background task that keeps a [`TokenHandle`] fresh.
pub struct Refresher;

impl Refresher {
    /// Starts the refresher with the default policy; it stops when `shutdown` is cancelled.
    pub fn spawn(
        http: reqwest::Client,
        creds: ClientCredentials,
        shutdown: CancellationToken,
    ) -> TokenHandle {
        Refresher::spawn_with(http, creds, shutdown, RefreshPolicy::default())
    }

    pub fn spawn_with(
        http: reqwest::Client,
        creds: ClientCredentials,
        shutdown: CancellationToken,
        policy: RefreshPolicy,
    ) -> TokenHandle {
        let handle = TokenHandle::new(http, creds);
        tokio::spawn(run(handle.clone(), shutdown, policy));
        handle
    }
}

async fn run(handle: TokenHandle, shutdown: CancellationToken, policy: RefreshPolicy) {
    let mut backoff = policy.initial_backoff;
    // The token whose renewal is scheduled, and when.
    let mut scheduled: Option<(u64, Instant)> = None;
    loop {
        let current = handle.inner.slot.load_full();
        if let Some(token) = &current {
            let due = match scheduled {
                Some((generation, due)) if generation == token.generation => due,
                _ => {
                    let due = token.issued_at() + jittered(token.lifetime, policy.jitter);
                    scheduled = Some((token.generation, due));
                    due
                }
            };
            // A forced refresh stores a newer token and wakes us to reschedule.
            let stored = handle.inner.stored.notified();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = stored => continue,
                _ = tokio::time::sleep_until(due) => {}
            }
        }
        let seen = current.as_ref().map_or(0, |t| t.generation);
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = handle.refresh_unless(false, |now| now.is_some_and(|t| t.generation != seen)) => result,
        };
        match result {
            Ok(_) => backoff = policy.initial_backoff,
            Err(error) => {
                let wait = match error.retry_after() {
                    Some(after) => after.min(policy.max_retry_after),
                    None => backoff,
                };
                backoff = (backoff * 2).min(policy.max_backoff);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// [`refresh_at`] moved up to `jitter` of itself earlier, never before half the lifetime.
pub(super) fn jittered(lifetime: Duration, jitter: f64) -> Duration {
    let at = refresh_at(lifetime);
    let fraction = (RandomState::new().hash_one(Instant::now()) % 10_000) as f64 / 10_000.0;
    at.saturating_sub(at.mul_f64(jitter.clamp(0.0, 0.5) * fraction))
        .max(lifetime / 2)
}
