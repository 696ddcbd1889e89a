//! LAN-side AUTH (RFC 4954): the SASL PLAIN and LOGIN exchanges (sans-IO), password checks
//! against the configured argon2id hashes, and the failure limiter (per client address or
//! IPv6 /64, and per username).
//!
//! Parses untrusted bytes from LAN clients; owns no disk state. Passwords only ever live in
//! [`Secret`], so no `Debug`, log line or error message of this module can show one, nor its
//! base64 form (behaviour.md C35).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, Params, PasswordHash, PasswordVerifier};
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::listener::client_key;
use crate::config::User;
use crate::secret::Secret;
use crate::smtp::reply::{self, Reply};

/// The mechanisms we offer, as the EHLO `AUTH` line lists them (RFC 4954 §3).
pub const MECHANISMS: &str = "PLAIN LOGIN";

/// The longest client response we accept, CRLF not counted (RFC 4954 §4: servers must take
/// responses of at least 12,288 octets; behaviour.md B13). The session's line reader for
/// AUTH responses must allow this much, plus the CRLF, before it answers
/// [`reply::AUTH_LINE_TOO_LONG`].
pub const MAX_RESPONSE_LEN: usize = 12_288;

/// LOGIN's challenges: base64 of "Username:" and "Password:" (draft-murchison-sasl-login).
pub const LOGIN_USERNAME_CHALLENGE: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";
/// PLAIN without an initial response: an empty challenge, `334 ` (RFC 4954 §4).
pub const EMPTY_CHALLENGE: &str = "";

/// Padding is optional when decoding: some clients leave it out, and accepting both costs
/// nothing.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A SASL mechanism we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616.
    Plain,
    /// draft-murchison-sasl-login: what most printers and scanners speak.
    Login,
}

impl Mechanism {
    /// By name, case-insensitively (RFC 4954 §4: mechanism names are case-insensitive).
    /// Anything else is `504 5.5.4`.
    pub fn from_name(name: &str) -> Result<Mechanism, Reply> {
        if name.eq_ignore_ascii_case("PLAIN") {
            Ok(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case("LOGIN") {
            Ok(Mechanism::Login)
        } else {
            Err(reply::AUTH_MECH_UNKNOWN)
        }
    }

    /// From the mechanism bit of smtp-proto's `Request::Auth`; anything else is `504 5.5.4`.
    pub fn from_smtp_proto(mechanism: u64) -> Result<Mechanism, Reply> {
        match mechanism {
            smtp_proto::AUTH_PLAIN => Ok(Mechanism::Plain),
            smtp_proto::AUTH_LOGIN => Ok(Mechanism::Login),
            _ => Err(reply::AUTH_MECH_UNKNOWN),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// What the session does next in an AUTH exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send `334 <challenge>` ([`reply::auth_challenge`]) and pass the client's next line to
    /// [`SaslExchange::respond`].
    Challenge(&'static str),
    /// The client sent its credentials: check them with [`Authenticator::verify`].
    /// `username` is untrusted text (any UTF-8, control characters included): clean it
    /// before it reaches a log line or a header.
    Done { username: String, password: Secret },
    /// Send this reply; the AUTH command is over.
    Fail(Reply),
}

/// One AUTH exchange, without I/O: [`SaslExchange::start`] with the AUTH command, then
/// [`SaslExchange::respond`] with each client line while the step is a challenge.
#[derive(Debug)]
pub struct SaslExchange {
    state: State,
}

// No state holds a password: LOGIN's password is the last line, handed out in `Step::Done`.
#[derive(Debug)]
enum State {
    /// PLAIN, waiting for the response to the empty challenge.
    PlainResponse,
    LoginUsername,
    LoginPassword {
        username: String,
    },
    Finished,
}

impl SaslExchange {
    /// Starts an exchange for `AUTH <mechanism> [initial-response]`.
    ///
    /// `initial_response` is the command's second argument, `None` when there was none
    /// (smtp-proto gives `""` then). `Some("=")` is an empty initial response (RFC 4954 §4).
    /// For LOGIN, an initial response is the base64 username, as Outlook and many devices
    /// send it.
    pub fn start(mechanism: Mechanism, initial_response: Option<&str>) -> (SaslExchange, Step) {
        let mut exchange = SaslExchange {
            state: match mechanism {
                Mechanism::Plain => State::PlainResponse,
                Mechanism::Login => State::LoginUsername,
            },
        };
        let step = match initial_response {
            None => match mechanism {
                Mechanism::Plain => Step::Challenge(EMPTY_CHALLENGE),
                Mechanism::Login => Step::Challenge(LOGIN_USERNAME_CHALLENGE),
            },
            Some(initial) => {
                let decoded = if initial == "=" {
                    Ok(Vec::new())
                } else {
                    decode(initial.as_bytes())
                };
                match decoded {
                    Ok(bytes) => exchange.advance(bytes),
                    Err(r) => Step::Fail(r),
                }
            }
        };
        if !matches!(step, Step::Challenge(_)) {
            exchange.state = State::Finished;
        }
        (exchange, step)
    }

    /// Feeds one client line (with or without its CRLF). A line of `*` cancels
    /// (RFC 4954 §4: `501`).
    pub fn respond(&mut self, line: &[u8]) -> Step {
        let line = strip_line_end(line);
        let step = if matches!(self.state, State::Finished) {
            // A caller bug: the exchange already ended.
            Step::Fail(reply::LOCAL_ERROR)
        } else if line.len() > MAX_RESPONSE_LEN {
            Step::Fail(reply::AUTH_LINE_TOO_LONG)
        } else if line.trim_ascii() == b"*" {
            Step::Fail(reply::AUTH_CANCELLED)
        } else {
            match decode(line) {
                Ok(bytes) => self.advance(bytes),
                Err(r) => Step::Fail(r),
            }
        };
        if !matches!(step, Step::Challenge(_)) {
            self.state = State::Finished;
        }
        step
    }

    /// True once a `Done` or `Fail` step was returned.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    fn advance(&mut self, bytes: Vec<u8>) -> Step {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::PlainResponse => plain(bytes),
            State::LoginUsername => match String::from_utf8(bytes) {
                Ok(username) => {
                    self.state = State::LoginPassword { username };
                    Step::Challenge(LOGIN_PASSWORD_CHALLENGE)
                }
                Err(_) => Step::Fail(reply::AUTH_MALFORMED),
            },
            State::LoginPassword { username } => match String::from_utf8(bytes) {
                Ok(password) => Step::Done {
                    username,
                    password: Secret::new(password),
                },
                // The error holds the password's bytes: it goes no further.
                Err(_) => Step::Fail(reply::AUTH_MALFORMED),
            },
            State::Finished => Step::Fail(reply::LOCAL_ERROR),
        }
    }
}

/// RFC 4616 §2: `[authzid] NUL authcid NUL passwd`, all UTF-8, authcid and passwd not empty.
/// An authzid other than the authcid would mean acting as another user, which we do not
/// offer: that is `535 5.7.8`, without a password check.
fn plain(bytes: Vec<u8>) -> Step {
    let Ok(text) = String::from_utf8(bytes) else {
        return Step::Fail(reply::AUTH_MALFORMED);
    };
    let mut parts = text.split('\0');
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Step::Fail(reply::AUTH_MALFORMED);
    };
    if authcid.is_empty() || passwd.is_empty() {
        return Step::Fail(reply::AUTH_MALFORMED);
    }
    if !authzid.is_empty() && authzid != authcid {
        return Step::Fail(reply::AUTH_FAILED);
    }
    Step::Done {
        username: authcid.to_string(),
        password: Secret::new(passwd),
    }
}

fn strip_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Base64 with surrounding blanks ignored. Errors say nothing of the input.
fn decode(text: &[u8]) -> Result<Vec<u8>, Reply> {
    if text.len() > MAX_RESPONSE_LEN {
        return Err(reply::AUTH_LINE_TOO_LONG);
    }
    BASE64
        .decode(text.trim_ascii())
        .map_err(|_| reply::AUTH_BAD_BASE64)
}

/// Checks usernames and passwords against the configured users.
///
/// Username match: exact, or ASCII case-insensitive when the configured username contains
/// `@` (devices uppercase domains: `ERP@CONTOSO.COM`). A bare local part (`erp` for a user
/// `erp@contoso.com`) does not match: which user it means is ambiguous, and guessing would
/// let one configured name answer for another.
///
/// An unknown user costs the same argon2id computation as a wrong password (behaviour.md
/// C33), against a dummy hash made once, with the first user's parameters.
pub struct Authenticator {
    users: Vec<Account>,
    dummy: Secret,
    /// Each check holds about `m` KiB (19 MiB with the defaults) for its duration: bound how
    /// many run at once.
    slots: Arc<Semaphore>,
    /// How long an attempt waits for a slot before `454 4.7.0`.
    slot_timeout: Duration,
    stats: Arc<Stats>,
}

/// Counters of password checks, for tests and metrics.
#[derive(Debug, Default)]
struct Stats {
    started: AtomicU64,
    completed: AtomicU64,
    dummy: AtomicU64,
}

/// A snapshot of [`Authenticator::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthStats {
    /// argon2 verifications that got a slot and started.
    pub started: u64,
    /// argon2 verifications that ran to the end (match or not).
    pub completed: u64,
    /// Of `completed`, those against the dummy hash (unknown users).
    pub dummy: u64,
}

/// What [`Authenticator::attempt`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The credentials match: the configured (canonical) username.
    Authenticated(String),
    /// Unknown user or wrong password (`535 5.7.8`); counted by the limiter.
    Failed,
    /// No argon2 slot within the timeout: `454 4.7.0`, not counted as a failure.
    Busy,
    /// The client got blocked while this exchange ran (by its other connections): no
    /// password check; `421 4.7.0` and close, as at the start of AUTH.
    Blocked,
}

/// How long an attempt waits for an argon2 slot. A full queue means a flood; the client
/// gets `454 4.7.0` and may try again (RFC 4954 §6), instead of holding its session open.
pub const SLOT_TIMEOUT: Duration = Duration::from_secs(10);

struct Account {
    username: String,
    hash: Secret,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "users",
                &self.users.iter().map(|u| &u.username).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The password behind the dummy hash; never reported as a success.
const DUMMY_PASSWORD: &[u8] = b"mailbridge: no such user";

impl Authenticator {
    /// Computes the dummy hash: one argon2id run (tens of milliseconds in a release build),
    /// so build it at start-up or in `spawn_blocking`.
    pub fn new(users: &[User]) -> Authenticator {
        let template = users.first().map(|u| u.password_hash.expose());
        let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
        Authenticator {
            users: users
                .iter()
                .map(|u| Account {
                    username: u.username.clone(),
                    hash: u.password_hash.clone(),
                })
                .collect(),
            // Without users AUTH is never offered, so no dummy is needed.
            dummy: if users.is_empty() {
                Secret::new(String::new())
            } else {
                dummy_hash(template)
            },
            slots: Arc::new(Semaphore::new(parallelism.clamp(1, 8))),
            slot_timeout: SLOT_TIMEOUT,
            stats: Arc::default(),
        }
    }

    /// Like [`new`](Self::new) with `slots` argon2 checks at once and another slot timeout.
    #[cfg(test)]
    fn with_slots(users: &[User], slots: usize, slot_timeout: Duration) -> Authenticator {
        let mut a = Authenticator::new(users);
        a.slots = Arc::new(Semaphore::new(slots.max(1)));
        a.slot_timeout = slot_timeout;
        a
    }

    /// Counters of password checks so far.
    pub fn stats(&self) -> AuthStats {
        AuthStats {
            started: self.stats.started.load(Ordering::Relaxed),
            completed: self.stats.completed.load(Ordering::Relaxed),
            dummy: self.stats.dummy.load(Ordering::Relaxed),
        }
    }

    /// The argon2 parameters (m KiB, t, p) a check of `username` runs with: the user's own,
    /// or the dummy hash's for an unknown user. Lets a test show that an unknown user costs
    /// the same work as a known one (behaviour.md C33).
    pub fn work_params(&self, username: &str) -> Option<(u32, u32, u32)> {
        let hash = match self.lookup(username) {
            Some(a) => a.hash.clone(),
            None => self.dummy.clone(),
        };
        let parsed = PasswordHash::new(hash.expose()).ok()?;
        let p = Params::try_from(&parsed).ok()?;
        Some((p.m_cost(), p.t_cost(), p.p_cost()))
    }

    /// One AUTH attempt from `ip`, after the exchange gave `username` and `password`:
    /// 1. waits the limiter's delay for this client and this username, before any argon2
    ///    work, so a flood of guesses is slowed without costing CPU or memory first;
    /// 2. waits at most [`SLOT_TIMEOUT`] for an argon2 slot ([`Attempt::Busy`] after that);
    /// 3. verifies, and records a failure for the client and the username.
    ///
    /// The delay does not depend on the result, so a quick answer does not tell that a
    /// password was right. A success does not clear earlier failures: they decay with time
    /// (issue 8 §3.4: "3 guesses, 1 good login, repeat" must not give unlimited guesses).
    pub async fn attempt(
        &self,
        limiter: &FailureLimiter,
        ip: IpAddr,
        username: &str,
        password: Secret,
    ) -> Attempt {
        let Ok(client_delay) = limiter.check(ip) else {
            return Attempt::Blocked;
        };
        let delay = client_delay.max(limiter.user_delay(username));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
            // Other connections of this client may have been blocked meanwhile.
            if limiter.check(ip).is_err() {
                return Attempt::Blocked;
            }
        }
        match self
            .verify_within(username, password, self.slot_timeout)
            .await
        {
            None => Attempt::Busy,
            Some(Some(name)) => Attempt::Authenticated(name),
            Some(None) => {
                limiter.failed(ip);
                limiter.failed_user(username);
                Attempt::Failed
            }
        }
    }

    /// True when there is at least one user, i.e. AUTH is worth offering.
    pub fn has_users(&self) -> bool {
        !self.users.is_empty()
    }

    /// The canonical (configured) username when `username` and `password` match a user.
    /// A wrong password and an unknown user are both `None`, after the same amount of work.
    pub async fn verify(&self, username: &str, password: Secret) -> Option<String> {
        self.verify_within(username, password, Duration::MAX)
            .await
            .flatten()
    }

    /// [`verify`](Self::verify), or `None` when no slot was free within `wait`.
    async fn verify_within(
        &self,
        username: &str,
        password: Secret,
        wait: Duration,
    ) -> Option<Option<String>> {
        let (canonical, hash, dummy) = match self.lookup(username) {
            Some(a) => (Some(a.username.clone()), a.hash.clone(), false),
            None => (None, self.dummy.clone(), true),
        };
        let slot = self.slots.clone().acquire_owned();
        let permit = if wait == Duration::MAX {
            slot.await.ok()?
        } else {
            tokio::time::timeout(wait, slot).await.ok()?.ok()?
        };
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        let stats = self.stats.clone();
        let matched = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let Ok(parsed) = PasswordHash::new(hash.expose()) else {
                return false;
            };
            // Algorithm, version and parameters come from the PHC string.
            let ok = Argon2::default()
                .verify_password(password.expose().as_bytes(), &parsed)
                .is_ok();
            // Counted right after the argon2 run, so the count proves the work was done.
            stats.completed.fetch_add(1, Ordering::Relaxed);
            if dummy {
                stats.dummy.fetch_add(1, Ordering::Relaxed);
            }
            ok
        })
        .await
        .unwrap_or(false);
        Some(if matched { canonical } else { None })
    }

    fn lookup(&self, username: &str) -> Option<&Account> {
        if let Some(a) = self.users.iter().find(|a| a.username == username) {
            return Some(a);
        }
        let mut folded = self
            .users
            .iter()
            .filter(|a| a.username.contains('@') && a.username.eq_ignore_ascii_case(username));
        let first = folded.next()?;
        // Two users differing only in case: no guess.
        if folded.next().is_some() {
            return None;
        }
        Some(first)
    }
}

/// A hash of [`DUMMY_PASSWORD`] with the algorithm, version and parameters of `template`
/// (a configured user's hash), else with the argon2 defaults (argon2id, m=19456, t=2, p=1).
fn dummy_hash(template: Option<&str>) -> Secret {
    let salt = SaltString::generate(&mut OsRng);
    let argon2 = Argon2::default();
    let like_template = template
        .and_then(|t| PasswordHash::new(t).ok())
        .and_then(|t| {
            let params = Params::try_from(&t).ok()?;
            argon2
                .hash_password_customized(
                    DUMMY_PASSWORD,
                    Some(t.algorithm),
                    t.version,
                    params,
                    &salt,
                )
                .ok()
                .map(|h| h.to_string())
        });
    let hash = like_template.unwrap_or_else(|| {
        argon2
            .hash_password(DUMMY_PASSWORD, &salt)
            .expect("the default argon2 parameters are valid")
            .to_string()
    });
    Secret::new(hash)
}

/// An argon2id PHC string for `password`, with the argon2 defaults (m=19456, t=2, p=1) and a
/// random salt: what `mailbridge hash-password` prints and `users[].password_hash` holds.
pub fn hash_password(password: &Secret) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)?
        .to_string())
}

/// Failures that cost nothing.
const FREE_FAILURES: usize = 3;
/// The delay after the free failures; it doubles with each further failure up to
/// [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(8);
/// This many failures within [`WINDOW`] block the address for [`BLOCK_FOR`].
const BLOCK_AFTER: usize = 10;
/// How long a failure counts: failures decay one by one, 15 minutes after each.
const WINDOW: Duration = Duration::from_secs(15 * 60);
const BLOCK_FOR: Duration = Duration::from_secs(15 * 60);
/// Failures against one username (from anywhere) that cost nothing. More than per client:
/// a device with a stale password on a few machines should not slow its colleagues.
const USER_FREE_FAILURES: usize = 5;
/// Failure times remembered per username; enough to reach [`MAX_DELAY`].
const USER_MAX_REMEMBERED: usize = 16;
/// Clients (addresses or /64s) remembered at most; past this the least recently failed is
/// forgotten.
pub const MAX_TRACKED_ADDRESSES: usize = 10_000;
/// Usernames remembered at most (as keyed hashes, so a long name costs no memory).
pub const MAX_TRACKED_USERNAMES: usize = 10_000;

/// Failed AUTH attempts (behaviour.md C33, issue 8 §3.4).
///
/// Per client, that is per IPv4 address or per IPv6 /64 ([`client_key`]; a host rotating
/// addresses within its /64 is one client): the first 3 failures within 15 minutes cost
/// nothing, then each attempt waits 1, 2, 4, then 8 seconds; the 10th failure within 15
/// minutes blocks the client for 15 minutes. Each failure counts for 15 minutes; a success
/// does not clear them.
///
/// Per username, from any client: the first 5 failures within 15 minutes cost nothing, then
/// each attempt on that username waits 1, 2, 4, then 8 seconds. Never a block: an attacker
/// must not be able to lock a printer out of its account; the right password still works,
/// after the delay.
///
/// Use: [`check`](Self::check) when AUTH arrives (an `Err` is sent and the connection
/// closed); then [`Authenticator::attempt`], which waits [`delay`](Self::delay) before the
/// argon2 work and records failures with [`failed`](Self::failed) and
/// [`failed_user`](Self::failed_user).
///
/// Memory is bounded: entries older than 15 minutes are dropped, and at most
/// [`MAX_TRACKED_ADDRESSES`] clients and [`MAX_TRACKED_USERNAMES`] usernames are kept.
#[derive(Debug)]
pub struct FailureLimiter {
    entries: Mutex<HashMap<IpAddr, Entry>>,
    capacity: usize,
    users: Mutex<HashMap<u64, UserEntry>>,
    user_capacity: usize,
    /// Keys the username hashes with a per-process random key (SipHash), so nobody can
    /// pick names that collide.
    hasher: RandomState,
}

#[derive(Debug)]
struct Entry {
    /// Failure times within the window, oldest first; at most `BLOCK_AFTER`.
    failures: VecDeque<Instant>,
    blocked_until: Option<Instant>,
    last: Instant,
}

impl Entry {
    /// Drops what the window no longer covers; true when nothing is left to remember.
    fn expire(&mut self, now: Instant) -> bool {
        if self.blocked_until.is_some_and(|b| b <= now) {
            self.blocked_until = None;
            self.failures.clear();
        }
        expire_failures(&mut self.failures, now);
        self.blocked_until.is_none() && self.failures.is_empty()
    }
}

#[derive(Debug)]
struct UserEntry {
    /// Failure times within the window, oldest first; at most `USER_MAX_REMEMBERED`.
    failures: VecDeque<Instant>,
}

fn expire_failures(failures: &mut VecDeque<Instant>, now: Instant) {
    while failures
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
    {
        failures.pop_front();
    }
}

impl Default for FailureLimiter {
    fn default() -> Self {
        FailureLimiter::new()
    }
}

impl FailureLimiter {
    pub fn new() -> FailureLimiter {
        FailureLimiter::with_capacity(MAX_TRACKED_ADDRESSES)
    }

    /// At most `capacity` clients and `capacity` usernames are remembered.
    pub fn with_capacity(capacity: usize) -> FailureLimiter {
        FailureLimiter {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            users: Mutex::new(HashMap::new()),
            user_capacity: capacity.clamp(1, MAX_TRACKED_USERNAMES),
            hasher: RandomState::new(),
        }
    }

    /// Before an attempt: the delay this client's failures call for, or `421 4.7.0` when
    /// the client is blocked.
    pub fn check(&self, ip: IpAddr) -> Result<Duration, Reply> {
        let key = client_key(ip);
        let now = Instant::now();
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(&key) else {
            return Ok(Duration::ZERO);
        };
        if entry.expire(now) {
            entries.remove(&key);
            return Ok(Duration::ZERO);
        }
        if entry.blocked_until.is_some() {
            return Err(reply::AUTH_TOO_MANY_FAILURES);
        }
        Ok(delay_after(entry.failures.len(), FREE_FAILURES))
    }

    /// The delay this username's recent failures call for, from any client.
    pub fn user_delay(&self, username: &str) -> Duration {
        let key = self.user_key(username);
        let now = Instant::now();
        let mut users = self.lock_users();
        let Some(entry) = users.get_mut(&key) else {
            return Duration::ZERO;
        };
        expire_failures(&mut entry.failures, now);
        if entry.failures.is_empty() {
            users.remove(&key);
            return Duration::ZERO;
        }
        delay_after(entry.failures.len(), USER_FREE_FAILURES)
    }

    /// The wait before an attempt by `ip` on `username`: the longer of the two delays
    /// ([`MAX_DELAY`] for a blocked client).
    pub fn delay(&self, ip: IpAddr, username: &str) -> Duration {
        let client = self.check(ip).unwrap_or(MAX_DELAY);
        client.max(self.user_delay(username))
    }

    /// After a failed attempt from `ip` (wrong password or unknown user).
    pub fn failed(&self, ip: IpAddr) {
        let key = client_key(ip);
        let now = Instant::now();
        let mut entries = self.lock();
        if !entries.contains_key(&key) && entries.len() >= self.capacity {
            entries.retain(|_, e| !e.expire(now));
            if entries.len() >= self.capacity
                && let Some(oldest) = entries.iter().min_by_key(|(_, e)| e.last).map(|(k, _)| *k)
            {
                entries.remove(&oldest);
            }
        }
        let entry = entries.entry(key).or_insert_with(|| Entry {
            failures: VecDeque::new(),
            blocked_until: None,
            last: now,
        });
        entry.expire(now);
        entry.last = now;
        if entry.blocked_until.is_some() {
            return;
        }
        entry.failures.push_back(now);
        if entry.failures.len() >= BLOCK_AFTER {
            entry.failures.clear();
            entry.blocked_until = Some(now + BLOCK_FOR);
        }
    }

    /// After a failed attempt on `username` (configured or not: an unknown name is counted
    /// the same way, so the delays do not tell which names exist).
    pub fn failed_user(&self, username: &str) {
        let key = self.user_key(username);
        let now = Instant::now();
        let mut users = self.lock_users();
        if !users.contains_key(&key) && users.len() >= self.user_capacity {
            users.retain(|_, e| {
                expire_failures(&mut e.failures, now);
                !e.failures.is_empty()
            });
            if users.len() >= self.user_capacity
                && let Some(oldest) = users
                    .iter()
                    .min_by_key(|(_, e)| e.failures.back().copied())
                    .map(|(k, _)| *k)
            {
                users.remove(&oldest);
            }
        }
        let entry = users.entry(key).or_insert_with(|| UserEntry {
            failures: VecDeque::new(),
        });
        expire_failures(&mut entry.failures, now);
        entry.failures.push_back(now);
        if entry.failures.len() > USER_MAX_REMEMBERED {
            entry.failures.pop_front();
        }
    }

    /// How many clients are remembered (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    /// How many usernames are remembered (for tests and metrics).
    pub fn tracked_usernames(&self) -> usize {
        self.lock_users().len()
    }

    /// Usernames match ASCII case-insensitively when they hold `@` (see [`Authenticator`]);
    /// folding every name errs on the side of one shared delay.
    fn user_key(&self, username: &str) -> u64 {
        self.hasher.hash_one(username.to_ascii_lowercase())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_users(&self) -> std::sync::MutexGuard<'_, HashMap<u64, UserEntry>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The delay before answering an attempt that follows `failures` recent failures, the
/// first `free` of which cost nothing.
fn delay_after(failures: usize, free: usize) -> Duration {
    if failures < free {
        return Duration::ZERO;
    }
    let doublings = (failures - free).min(8) as u32;
    (FIRST_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "correct horse battery staple";

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn done(username: &str, password: &str) -> Step {
        Step::Done {
            username: username.to_string(),
            password: Secret::new(password),
        }
    }

    fn start(mechanism: &str, initial: Option<&str>) -> (SaslExchange, Step) {
        SaslExchange::start(Mechanism::from_name(mechanism).unwrap(), initial)
    }

    #[test]
    fn mechanisms_by_name_and_by_smtp_proto_bit() {
        assert_eq!(Mechanism::from_name("plain"), Ok(Mechanism::Plain));
        assert_eq!(Mechanism::from_name("LOGIN"), Ok(Mechanism::Login));
        for unknown in ["CRAM-MD5", "XOAUTH2", "", "PLAINX"] {
            let e = Mechanism::from_name(unknown).unwrap_err();
            assert_eq!((e.code, e.enhanced), (504, "5.5.4"), "{unknown}");
        }
        assert_eq!(
            Mechanism::from_smtp_proto(smtp_proto::AUTH_PLAIN),
            Ok(Mechanism::Plain)
        );
        assert_eq!(
            Mechanism::from_smtp_proto(smtp_proto::AUTH_LOGIN),
            Ok(Mechanism::Login)
        );
        assert_eq!(
            Mechanism::from_smtp_proto(smtp_proto::AUTH_CRAM_MD5),
            Err(reply::AUTH_MECH_UNKNOWN)
        );
        assert_eq!(Mechanism::from_smtp_proto(0), Err(reply::AUTH_MECH_UNKNOWN));
        for m in MECHANISMS.split(' ') {
            assert_eq!(Mechanism::from_name(m).unwrap().name(), m);
        }
    }

    #[test]
    fn plain_with_initial_response() {
        let ir = b64(b"\0printer1\0secret");
        let (ex, step) = start("PLAIN", Some(&ir));
        assert_eq!(step, done("printer1", "secret"));
        assert!(ex.is_finished());
        // authzid equal to authcid is the same thing.
        let ir = b64(b"printer1\0printer1\0secret");
        assert_eq!(start("PLAIN", Some(&ir)).1, done("printer1", "secret"));
    }

    #[test]
    fn plain_after_an_empty_challenge() {
        let (mut ex, step) = start("PLAIN", None);
        assert_eq!(step, Step::Challenge(""));
        assert!(!ex.is_finished());
        let line = format!("{}\r\n", b64(b"\0scanner\0p\xc3\xa4ss"));
        assert_eq!(ex.respond(line.as_bytes()), done("scanner", "päss"));
        assert!(ex.is_finished());
        assert_eq!(ex.respond(b"AAAA"), Step::Fail(reply::LOCAL_ERROR));
    }

    #[test]
    fn plain_equals_sign_is_an_empty_response() {
        // RFC 4954 §4: "=" is an empty initial response, which is not a valid PLAIN message.
        assert_eq!(
            start("PLAIN", Some("=")).1,
            Step::Fail(reply::AUTH_MALFORMED)
        );
    }

    #[test]
    fn plain_malformed_messages() {
        for bad in [
            &b""[..],
            b"printer1\0secret",
            b"\0printer1\0secret\0extra",
            b"\0\0secret",
            b"\0printer1\0",
            b"\0printer1\0\xff\xfe",
            b"\0\xc3\0secret",
        ] {
            let (_, step) = start("PLAIN", Some(&b64(bad)));
            assert_eq!(step, Step::Fail(reply::AUTH_MALFORMED), "{bad:?}");
        }
    }

    #[test]
    fn plain_authzid_other_than_authcid_is_refused() {
        let (_, step) = start("PLAIN", Some(&b64(b"admin\0printer1\0secret")));
        assert_eq!(step, Step::Fail(reply::AUTH_FAILED));
    }

    #[test]
    fn login_two_challenges() {
        let (mut ex, step) = start("LOGIN", None);
        assert_eq!(step, Step::Challenge("VXNlcm5hbWU6"));
        let step = ex.respond(format!("{}\r\n", b64(b"scanner01")).as_bytes());
        assert_eq!(step, Step::Challenge("UGFzc3dvcmQ6"));
        assert!(!ex.is_finished());
        let step = ex.respond(format!("{}\r\n", b64(PASSWORD.as_bytes())).as_bytes());
        assert_eq!(step, done("scanner01", PASSWORD));
        assert!(ex.is_finished());
    }

    #[test]
    fn login_with_initial_username() {
        let (mut ex, step) = start("login", Some(&b64(b"erp@contoso.com")));
        assert_eq!(step, Step::Challenge(LOGIN_PASSWORD_CHALLENGE));
        assert_eq!(
            ex.respond(b64(b"pw").as_bytes()),
            done("erp@contoso.com", "pw")
        );
    }

    #[test]
    fn login_empty_answers_reach_the_password_check() {
        let (mut ex, step) = start("LOGIN", Some("="));
        assert_eq!(step, Step::Challenge(LOGIN_PASSWORD_CHALLENGE));
        assert_eq!(ex.respond(b"\r\n"), done("", ""));
    }

    #[test]
    fn the_challenge_reply_on_the_wire() {
        let mut out = Vec::new();
        reply::auth_challenge(LOGIN_USERNAME_CHALLENGE).write_to(&mut out);
        reply::auth_challenge(EMPTY_CHALLENGE).write_to(&mut out);
        assert_eq!(out, b"334 VXNlcm5hbWU6\r\n334 \r\n");
    }

    #[test]
    fn star_cancels_at_any_challenge() {
        let (mut ex, _) = start("PLAIN", None);
        assert_eq!(ex.respond(b"*\r\n"), Step::Fail(reply::AUTH_CANCELLED));
        assert!(ex.is_finished());
        let (mut ex, _) = start("LOGIN", None);
        assert_eq!(ex.respond(b"*"), Step::Fail(reply::AUTH_CANCELLED));
        let (mut ex, _) = start("LOGIN", None);
        ex.respond(b64(b"u").as_bytes());
        assert_eq!(ex.respond(b"*\r\n"), Step::Fail(reply::AUTH_CANCELLED));
        let r = reply::AUTH_CANCELLED;
        assert_eq!((r.code, r.enhanced), (501, "5.0.0"));
    }

    #[test]
    fn bad_base64_is_501_5_5_2() {
        for bad in ["not base64!", "A", "=", "****", "AAAA====x"] {
            let (mut ex, _) = start("LOGIN", None);
            assert_eq!(
                ex.respond(bad.as_bytes()),
                Step::Fail(reply::AUTH_BAD_BASE64),
                "{bad}"
            );
            assert!(ex.is_finished());
        }
        assert_eq!(
            start("PLAIN", Some("%%%")).1,
            Step::Fail(reply::AUTH_BAD_BASE64)
        );
        assert_eq!(
            start("LOGIN", Some("%%%")).1,
            Step::Fail(reply::AUTH_BAD_BASE64)
        );
        let r = reply::AUTH_BAD_BASE64;
        assert_eq!((r.code, r.enhanced), (501, "5.5.2"));
    }

    #[test]
    fn padding_is_optional_and_blanks_are_ignored() {
        let unpadded = b64(b"\0u\0pw").trim_end_matches('=').to_string();
        assert_eq!(start("PLAIN", Some(&unpadded)).1, done("u", "pw"));
        let (mut ex, _) = start("PLAIN", None);
        let line = format!(" {} \r\n", b64(b"\0u\0pw"));
        assert_eq!(ex.respond(line.as_bytes()), done("u", "pw"));
    }

    #[test]
    fn response_length_limit() {
        // behaviour.md B13: a 12,000-byte response is accepted, 13,000 bytes is 500 5.5.6.
        let password = "x".repeat(8_997);
        let line = b64(format!("\0u\0{password}").as_bytes());
        assert_eq!(line.len(), 12_000);
        let (mut ex, _) = start("PLAIN", None);
        assert_eq!(
            ex.respond(format!("{line}\r\n").as_bytes()),
            done("u", &password)
        );

        let line = b64(&[b'x'; 9_750]);
        assert_eq!(line.len(), 13_000);
        let (mut ex, _) = start("LOGIN", None);
        assert_eq!(
            ex.respond(line.as_bytes()),
            Step::Fail(reply::AUTH_LINE_TOO_LONG)
        );
        assert!(ex.is_finished());
        assert_eq!(
            start("PLAIN", Some(&line)).1,
            Step::Fail(reply::AUTH_LINE_TOO_LONG)
        );
        let r = reply::AUTH_LINE_TOO_LONG;
        assert_eq!((r.code, r.enhanced), (500, "5.5.6"));

        // The boundary: exactly 12,288 octets is accepted, one more is not.
        let (mut ex, _) = start("LOGIN", None);
        let at_limit = "A".repeat(MAX_RESPONSE_LEN);
        assert_eq!(
            ex.respond(format!("{at_limit}\r\n").as_bytes()),
            Step::Challenge(LOGIN_PASSWORD_CHALLENGE)
        );
        let (mut ex, _) = start("LOGIN", None);
        let over = "A".repeat(MAX_RESPONSE_LEN + 1);
        assert_eq!(
            ex.respond(over.as_bytes()),
            Step::Fail(reply::AUTH_LINE_TOO_LONG)
        );
    }

    #[test]
    fn no_debug_output_shows_the_password_or_its_base64() {
        let secret = "S3cr3t-pw!";
        let encoded_plain = b64(format!("\0printer1\0{secret}").as_bytes());
        let encoded_login = b64(secret.as_bytes());
        let (ex, step) = start("PLAIN", Some(&encoded_plain));
        let (mut login, _) = start("LOGIN", Some(&b64(b"printer1")));
        let before = format!("{login:?}");
        let login_step = login.respond(encoded_login.as_bytes());
        assert_eq!(login_step, done("printer1", secret));
        let bad_utf8 = start("PLAIN", Some(&b64(b"\0printer1\0S3cr3t\xff"))).1;
        for text in [
            format!("{ex:?}"),
            format!("{step:?}"),
            before,
            format!("{login:?}"),
            format!("{login_step:?}"),
            format!("{bad_utf8:?}"),
        ] {
            for needle in [secret, "S3cr3t", &encoded_plain, &encoded_login] {
                assert!(!text.contains(needle), "{needle:?} in {text}");
            }
        }
        assert!(format!("{step:?}").contains("printer1"));
    }

    // Cheap parameters keep the tests fast in debug builds; the dummy hash copies them.
    fn cheap_hash(password: &str) -> Secret {
        let salt = SaltString::generate(&mut OsRng);
        let params = Params::new(64, 1, 1, None).unwrap();
        let hash = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string();
        Secret::new(hash)
    }

    fn user(name: &str, password: &str) -> User {
        User {
            username: name.to_string(),
            password_hash: cheap_hash(password),
            allowed_senders: vec![crate::config::SenderPattern::Any],
            upstream: None,
        }
    }

    #[tokio::test]
    async fn verify_matches_users_and_passwords() {
        let auth = Authenticator::new(&[
            user("scanner01", "scan-pw"),
            user("erp@contoso.com", "erp-pw"),
        ]);
        assert!(auth.has_users());
        let v = |u: &'static str, p: &'static str| auth.verify(u, Secret::new(p));
        assert_eq!(
            v("scanner01", "scan-pw").await.as_deref(),
            Some("scanner01")
        );
        assert_eq!(v("scanner01", "erp-pw").await, None);
        assert_eq!(v("scanner01", "").await, None);
        assert_eq!(v("nobody", "scan-pw").await, None);
        // Without '@' the name is exact.
        assert_eq!(v("SCANNER01", "scan-pw").await, None);
        // With '@', ASCII case does not matter; the configured name is returned.
        assert_eq!(
            v("ERP@CONTOSO.COM", "erp-pw").await.as_deref(),
            Some("erp@contoso.com")
        );
        assert_eq!(
            v("Erp@Contoso.com", "erp-pw").await.as_deref(),
            Some("erp@contoso.com")
        );
        assert_eq!(v("ERP@CONTOSO.COM", "ERP-PW").await, None);
        // A bare local part is ambiguous: no match.
        assert_eq!(v("erp", "erp-pw").await, None);
    }

    #[tokio::test]
    async fn names_differing_only_in_case_match_exactly_only() {
        let auth = Authenticator::new(&[user("a@x.org", "one"), user("A@x.org", "two")]);
        let v = |u: &'static str, p: &'static str| auth.verify(u, Secret::new(p));
        assert_eq!(v("a@x.org", "one").await.as_deref(), Some("a@x.org"));
        assert_eq!(v("A@x.org", "two").await.as_deref(), Some("A@x.org"));
        assert_eq!(v("A@X.ORG", "one").await, None);
        assert_eq!(v("A@X.ORG", "two").await, None);
    }

    #[tokio::test]
    async fn unknown_users_never_match_the_dummy() {
        let auth = Authenticator::new(&[user("u", "pw")]);
        let dummy = std::str::from_utf8(DUMMY_PASSWORD).unwrap();
        assert_eq!(auth.verify("nobody", Secret::new(dummy)).await, None);
        let auth = Authenticator::new(&[]);
        assert!(!auth.has_users());
        assert_eq!(auth.verify("nobody", Secret::new(dummy)).await, None);
    }

    #[test]
    fn the_dummy_hash_copies_the_users_parameters() {
        let template = cheap_hash("x");
        let dummy = dummy_hash(Some(template.expose()));
        let d = PasswordHash::new(dummy.expose()).unwrap();
        let t = PasswordHash::new(template.expose()).unwrap();
        assert_eq!(d.algorithm, t.algorithm);
        assert_eq!(d.version, t.version);
        assert_eq!(d.params, t.params);
        assert_ne!(d.salt, t.salt);
    }

    #[test]
    fn default_hash_is_argon2id_m19456_t2_p1() {
        let hash = hash_password(&Secret::new(PASSWORD)).unwrap();
        let parsed = PasswordHash::new(&hash).unwrap();
        assert_eq!(parsed.algorithm.as_str(), "argon2id");
        assert_eq!(parsed.version, Some(19));
        let params = Params::try_from(&parsed).unwrap();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (19456, 2, 1)
        );
        assert!(
            Argon2::default()
                .verify_password(PASSWORD.as_bytes(), &parsed)
                .is_ok()
        );
        // The dummy for a configuration without users uses the same defaults.
        let dummy = dummy_hash(None);
        let d = PasswordHash::new(dummy.expose()).unwrap();
        assert_eq!(d.algorithm, parsed.algorithm);
        assert_eq!(d.params, parsed.params);
    }

    #[test]
    fn authenticator_debug_shows_no_hash() {
        let u = user("scanner01", PASSWORD);
        let hash = u.password_hash.expose().to_string();
        let auth = Authenticator::new(&[u]);
        let text = format!("{auth:?}");
        assert!(text.contains("scanner01"), "{text}");
        assert!(!text.contains("argon2"), "{text}");
        assert!(!text.contains(&hash), "{text}");
        assert!(!text.contains(PASSWORD), "{text}");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn delays_grow_then_the_address_is_blocked() {
        let limiter = FailureLimiter::new();
        let client = ip("192.0.2.7");
        let mut delays = Vec::new();
        for _ in 0..BLOCK_AFTER {
            let delay = limiter.check(client).unwrap();
            delays.push(delay.as_secs());
            tokio::time::advance(delay).await;
            limiter.failed(client);
        }
        assert_eq!(delays, [0, 0, 0, 1, 2, 4, 8, 8, 8, 8]);
        let e = limiter.check(client).unwrap_err();
        assert_eq!((e.code, e.enhanced), (421, "4.7.0"));
        assert_eq!(e, reply::AUTH_TOO_MANY_FAILURES);
        // Other addresses are not affected.
        assert_eq!(limiter.check(ip("192.0.2.8")), Ok(Duration::ZERO));
        // The IPv4-mapped form is the same client.
        assert!(limiter.check(ip("::ffff:192.0.2.7")).is_err());

        tokio::time::advance(BLOCK_FOR - Duration::from_secs(1)).await;
        assert!(limiter.check(client).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(limiter.check(client), Ok(Duration::ZERO));
        assert_eq!(limiter.tracked(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_are_forgotten() {
        let limiter = FailureLimiter::new();
        let client = ip("2001:db8::1");
        for _ in 0..5 {
            limiter.failed(client);
        }
        assert_eq!(limiter.check(client), Ok(Duration::from_secs(4)));
        tokio::time::advance(Duration::from_secs(10 * 60)).await;
        for _ in 0..4 {
            limiter.failed(client);
        }
        // 9 within the window: not yet blocked.
        assert_eq!(limiter.check(client), Ok(MAX_DELAY));
        // The first 5 leave the window; 4 remain.
        tokio::time::advance(Duration::from_secs(5 * 60)).await;
        assert_eq!(limiter.check(client), Ok(Duration::from_secs(2)));
        limiter.failed(client);
        assert_eq!(limiter.check(client), Ok(Duration::from_secs(4)));
        tokio::time::advance(WINDOW).await;
        assert_eq!(limiter.check(client), Ok(Duration::ZERO));
        assert_eq!(limiter.tracked(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ten_failures_spread_over_the_window_block() {
        let limiter = FailureLimiter::new();
        let client = ip("192.0.2.9");
        for _ in 0..BLOCK_AFTER {
            limiter.failed(client);
            tokio::time::advance(Duration::from_secs(90)).await;
        }
        // The 10th came 13.5 minutes after the 1st.
        assert!(limiter.check(client).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_clients_are_limited_per_64() {
        // Issue 8 §3.4: rotating addresses within one /64 used to give unlimited guesses.
        let limiter = FailureLimiter::new();
        for i in 0..BLOCK_AFTER as u16 {
            limiter.failed(IpAddr::from([0x2001, 0xdb8, 0, 7, i, 0, 0, 1]));
        }
        assert_eq!(limiter.tracked(), 1);
        assert!(limiter.check(ip("2001:db8:0:7:ffff::1")).is_err());
        assert_eq!(limiter.check(ip("2001:db8:0:8::1")), Ok(Duration::ZERO));
        // IPv4 stays per address.
        limiter.failed(ip("192.0.2.1"));
        assert_eq!(limiter.tracked(), 2);
        assert_eq!(limiter.check(ip("192.0.2.2")), Ok(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_good_login_between_guesses_buys_no_more_guesses() {
        // Issue 8 §3.4: "3 free guesses, 1 good login, repeat" used to reset the count each
        // time; now each failure counts for 15 minutes whatever happens in between.
        let auth = Authenticator::new(&[user("printer1", "right")]);
        let limiter = FailureLimiter::new();
        let client = ip("192.0.2.10");
        let mut failures = 0;
        let mut logins = 0;
        'rounds: for _ in 0..10 {
            for _ in 0..3 {
                let a = auth.attempt(&limiter, client, "printer1", Secret::new("guess"));
                match a.await {
                    Attempt::Failed => failures += 1,
                    Attempt::Blocked => break 'rounds,
                    other => panic!("{other:?}"),
                }
            }
            let a = auth.attempt(&limiter, client, "printer1", Secret::new("right"));
            match a.await {
                Attempt::Authenticated(_) => logins += 1,
                Attempt::Blocked => break 'rounds,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            (failures, logins),
            (BLOCK_AFTER, 3),
            "the 10th failure blocks"
        );
        assert!(limiter.check(client).is_err());
        // Blocked means no password check at all, even with the right password.
        let before = auth.stats().started;
        let a = auth.attempt(&limiter, client, "printer1", Secret::new("right"));
        assert_eq!(a.await, Attempt::Blocked);
        assert_eq!(auth.stats().started, before);
        // The failures decay by time: 15 minutes after the block, the client starts afresh.
        tokio::time::advance(BLOCK_FOR).await;
        assert_eq!(limiter.check(client), Ok(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_on_a_username_slow_it_from_anywhere_but_never_lock_it() {
        let auth = Authenticator::new(&[user("printer1", "right"), user("erp@x.org", "e")]);
        let limiter = FailureLimiter::new();
        // One wrong guess from each of 40 addresses: no client comes near its own limits.
        for i in 0..40u8 {
            let from = IpAddr::from([198, 51, 100, i]);
            let a = auth.attempt(&limiter, from, "printer1", Secret::new("guess"));
            assert_eq!(a.await, Attempt::Failed);
            assert!(limiter.check(from).is_ok());
        }
        assert_eq!(limiter.user_delay("printer1"), MAX_DELAY);
        // Other names are not slowed; a name with @ matches in any case, as logins do.
        assert_eq!(limiter.user_delay("erp@x.org"), Duration::ZERO);
        for _ in 0..USER_FREE_FAILURES {
            limiter.failed_user("ERP@X.ORG");
        }
        assert_eq!(limiter.user_delay("erp@x.org"), FIRST_DELAY);
        // Unknown names are counted the same way (the delay tells nothing of which exist).
        for _ in 0..USER_FREE_FAILURES {
            limiter.failed_user("nobody");
        }
        assert_eq!(limiter.user_delay("nobody"), FIRST_DELAY);

        // Never a lockout: the printer itself, from a fresh address, waits the delay and
        // gets in.
        let started = Instant::now();
        let a = auth.attempt(&limiter, ip("10.0.0.5"), "printer1", Secret::new("right"));
        assert_eq!(a.await, Attempt::Authenticated("printer1".into()));
        assert!(started.elapsed() >= MAX_DELAY);
        assert!(started.elapsed() < MAX_DELAY + Duration::from_secs(1));
        // The delays decay: 15 minutes later the name is free again.
        tokio::time::advance(WINDOW).await;
        assert_eq!(limiter.user_delay("printer1"), Duration::ZERO);
        assert_eq!(limiter.tracked_usernames(), 2, "erp and nobody until read");
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_comes_before_any_argon2_work() {
        let auth = Arc::new(Authenticator::new(&[user("printer1", "right")]));
        let limiter = Arc::new(FailureLimiter::new());
        let client = ip("192.0.2.20");
        for _ in 0..4 {
            limiter.failed(client);
        }
        let delay = limiter.delay(client, "printer1");
        assert_eq!(delay, Duration::from_secs(2));
        let task = {
            let (auth, limiter) = (auth.clone(), limiter.clone());
            tokio::spawn(async move {
                auth.attempt(&limiter, client, "printer1", Secret::new("right"))
                    .await
            })
        };
        // The clock only moves when told to: no check starts during the delay.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(auth.stats().started, 0);
        tokio::time::advance(delay - Duration::from_millis(1)).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            auth.stats().started,
            0,
            "argon2 started before the delay was over"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            task.await.unwrap(),
            Attempt::Authenticated("printer1".into())
        );
        assert_eq!(auth.stats().started, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_an_argon2_slot_times_out_with_454() {
        let auth = Authenticator::with_slots(&[user("printer1", "right")], 1, SLOT_TIMEOUT);
        let limiter = FailureLimiter::new();
        let held = auth.slots.clone().acquire_owned().await.unwrap();
        let started = Instant::now();
        let a = auth.attempt(&limiter, ip("192.0.2.30"), "printer1", Secret::new("right"));
        assert_eq!(a.await, Attempt::Busy);
        assert_eq!(started.elapsed(), SLOT_TIMEOUT);
        assert_eq!(auth.stats().started, 0);
        // Busy is not a failure of the client.
        assert_eq!(limiter.tracked(), 0);
        assert_eq!(limiter.tracked_usernames(), 0);
        let r = reply::AUTH_BUSY;
        assert_eq!((r.code, r.enhanced), (454, "4.7.0"));
        drop(held);
        let a = auth.attempt(&limiter, ip("192.0.2.30"), "printer1", Secret::new("right"));
        assert_eq!(a.await, Attempt::Authenticated("printer1".into()));
    }

    #[tokio::test]
    async fn unknown_users_run_argon2_against_the_dummy_with_the_users_parameters() {
        let auth = Authenticator::new(&[user("printer1", "right")]);
        assert_eq!(auth.work_params("nobody"), auth.work_params("printer1"));
        assert_eq!(auth.work_params("nobody"), Some((64, 1, 1)));
        assert_eq!(auth.verify("nobody", Secret::new("x")).await, None);
        assert_eq!(
            auth.stats(),
            AuthStats {
                started: 1,
                completed: 1,
                dummy: 1
            }
        );
        assert_eq!(auth.verify("printer1", Secret::new("x")).await, None);
        assert_eq!(auth.stats().completed, 2);
        assert_eq!(auth.stats().dummy, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let limiter = FailureLimiter::with_capacity(100);
        for i in 0..1_000u32 {
            limiter.failed(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(limiter.tracked(), 100);
        // The most recent are kept, the oldest evicted.
        let kept = |a: &str| limiter.lock().contains_key(&ip(a));
        assert!(kept("10.0.3.231"), "the newest");
        assert!(kept("10.0.3.132"));
        assert!(!kept("10.0.3.131"));
        assert!(!kept("10.0.0.0"), "the oldest");
        // A full map first drops what expired.
        tokio::time::advance(WINDOW).await;
        limiter.failed(ip("192.0.2.1"));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn delay_schedule() {
        let secs: Vec<u64> = (0..12)
            .map(|n| delay_after(n, FREE_FAILURES).as_secs())
            .collect();
        assert_eq!(secs, [0, 0, 0, 1, 2, 4, 8, 8, 8, 8, 8, 8]);
        assert_eq!(delay_after(usize::MAX, FREE_FAILURES), MAX_DELAY);
        let secs: Vec<u64> = (0..10)
            .map(|n| delay_after(n, USER_FREE_FAILURES).as_secs())
            .collect();
        assert_eq!(secs, [0, 0, 0, 0, 0, 1, 2, 4, 8, 8]);
    }
}
