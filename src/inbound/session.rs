//! One SMTP session (RFC 5321, with PIPELINING RFC 2920, SIZE RFC 1870, 8BITMIME RFC 6152,
//! SMTPUTF8 RFC 6531, ENHANCEDSTATUSCODES RFC 2034). Generic over its stream so tests drive it
//! in memory. Parses untrusted bytes; the only state it hands on is a message committed to the
//! spool, and it says 250 only after the spool says the message is durable.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use smtp_proto::{
    Error as ProtoError, MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME, MAIL_SMTPUTF8,
    Request,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::SessionCtx;
use super::auth::{self, SaslExchange, Step};
use crate::config::{BareLf, TlsMode};
use crate::smtp::data::DataDecoder;
use crate::smtp::headers::{self, FromProblem, HeadState, TraceInfo};
use crate::smtp::reply::{self, Reply};
use crate::spool::{Envelope, Recipient, new_id, now_ms};

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// An over-long line is discarded up to this many bytes; beyond that the client is cut off.
const MAX_DISCARD: usize = 64 * 1024;
/// After this many errors the session is closed (behaviour.md C31).
pub const MAX_ERRORS: u32 = 20;
const READ_CHUNK: usize = 64 * 1024;

struct Transaction {
    sender: String,
    body: Option<String>,
    smtputf8: bool,
    recipients: Vec<String>,
    rcpt_refused: bool,
}

enum Input {
    Line(Vec<u8>),
    TooLong,
    /// An AUTH command line over the SASL response limit (RFC 4954 §6: 500 5.5.6).
    AuthTooLong,
    /// Over-long line without end: reply and disconnect.
    Flood,
    Closed,
    Timeout,
    Shutdown,
    /// `limits.max_session_age` reached at a command boundary.
    SessionTooOld,
}

enum Next {
    Continue,
    Close,
    /// STARTTLS was accepted: hand the stream to the TLS handshake.
    StartTls,
}

pub struct Session<S> {
    stream: S,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
    ctx: Arc<SessionCtx>,
    client_ip: IpAddr,
    helo: Option<String>,
    esmtp: bool,
    tx: Option<Transaction>,
    errors: u32,
    discarding: usize,
    /// The connection is TLS (implicit, or after STARTTLS).
    tls_active: bool,
    /// Set by a successful AUTH; cleared by STARTTLS (a new session).
    auth: Option<AuthedUser>,
    /// When the connection was accepted; carried across STARTTLS (`limits.max_session_age`).
    started: Instant,
    /// Commands without progress since the session began or the last accepted message
    /// (`limits.max_junk_commands`); carried across STARTTLS.
    junk: u32,
    /// The negotiated TLS version and cipher (sender inventory).
    tls_info: Option<(&'static str, String)>,
}

struct AuthedUser {
    username: String,
    mechanism: &'static str,
    allowed_senders: Vec<crate::config::SenderPattern>,
}

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs a session to its end. `peer` carries the canonical client address.
pub async fn run<S>(stream: S, peer: SocketAddr, _local: Option<SocketAddr>, ctx: Arc<SessionCtx>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ip = peer.ip();
    tracing::debug!(client = %ip, "connection");
    let acceptor = ctx.tls.clone();
    match (ctx.listener.tls, acceptor) {
        (TlsMode::Implicit, Some(acceptor)) => {
            // RFC 8314: TLS from the first byte, the greeting comes inside it.
            if let Some(tls) = handshake(&acceptor, stream, ip).await {
                let mut s = Session::new(tls, ip, ctx, true);
                s.tls_info = tls_info(&s.stream);
                s.serve(true).await;
            }
        }
        (_, acceptor) => {
            let mut plain = Session::new(stream, ip, ctx.clone(), false);
            if let End::StartTls = plain.serve(true).await
                && let Some(acceptor) = acceptor
            {
                let errors = plain.errors;
                let (started, junk) = (plain.started, plain.junk);
                if let Some(tls) = handshake(&acceptor, plain.stream, ip).await {
                    // RFC 3207 §4.2: everything learnt before TLS is forgotten; the client
                    // starts again with EHLO, and no new greeting is sent.
                    let mut s = Session::new(tls, ip, ctx, true);
                    s.tls_info = tls_info(&s.stream);
                    s.errors = errors;
                    (s.started, s.junk) = (started, junk);
                    s.serve(false).await;
                }
            }
        }
    }
    tracing::debug!(client = %ip, "disconnected");
}

/// The TLS version and cipher of an established session (sender inventory).
fn tls_info<S>(tls: &super::tls::TlsStream<S>) -> Option<(&'static str, String)> {
    let ssl = tls.ssl();
    Some((
        ssl.version_str(),
        ssl.current_cipher()
            .map(|c| c.name().to_string())
            .unwrap_or_default(),
    ))
}

async fn handshake<S>(
    acceptor: &super::tls::Acceptor,
    stream: S,
    ip: IpAddr,
) -> Option<super::tls::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // A failure is logged by the acceptor, with what the client offered (docs/tls.md).
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream, ip)).await {
        Ok(tls) => tls,
        Err(_) => {
            tracing::info!(client = %ip, "TLS handshake timed out");
            None
        }
    }
}

enum End {
    Closed,
    StartTls,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn new(stream: S, client_ip: IpAddr, ctx: Arc<SessionCtx>, tls_active: bool) -> Session<S> {
        Session {
            stream,
            rbuf: Vec::with_capacity(4096),
            rpos: 0,
            wbuf: Vec::with_capacity(1024),
            ctx,
            client_ip,
            helo: None,
            esmtp: false,
            tx: None,
            errors: 0,
            discarding: 0,
            tls_active,
            auth: None,
            started: Instant::now(),
            junk: 0,
            tls_info: None,
        }
    }

    fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.wbuf);
    }

    async fn flush(&mut self) -> bool {
        if self.wbuf.is_empty() {
            return true;
        }
        // A client that never reads its replies must not hold the session: writes share the
        // command timeout and give way to the hard stop.
        let ctx = self.ctx.clone();
        let write = async {
            self.stream.write_all(&self.wbuf).await.is_ok() && self.stream.flush().await.is_ok()
        };
        // Once the hard stop has come, a last reply (421) still gets a moment to go out.
        let stopping = ctx.hard_stop.is_cancelled();
        let limit = if stopping {
            std::time::Duration::from_secs(1)
        } else {
            ctx.config.limits.command_timeout
        };
        let ok = tokio::select! {
            _ = ctx.hard_stop.cancelled(), if !stopping => false,
            r = tokio::time::timeout(limit, write) => r.unwrap_or(false),
        };
        self.wbuf.clear();
        ok
    }

    async fn close_with(&mut self, r: &Reply) {
        self.reply(r);
        self.flush().await;
        let _ = self.stream.shutdown().await;
    }

    fn unread(&self) -> &[u8] {
        &self.rbuf[self.rpos..]
    }

    fn compact(&mut self) {
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        } else if self.rpos > READ_CHUNK {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
    }

    async fn serve(&mut self, greet: bool) -> End {
        if greet {
            let greeting = reply::greeting(&self.ctx.config.hostname);
            self.reply(&greeting);
        }
        loop {
            let input = self.next_command().await;
            let next = match input {
                Input::Line(line) => self.command(&line).await,
                Input::TooLong => {
                    self.reply(&reply::LINE_TOO_LONG);
                    self.error()
                }
                Input::AuthTooLong => {
                    self.reply(&reply::AUTH_LINE_TOO_LONG);
                    self.error()
                }
                Input::Flood => {
                    self.close_with(&reply::LINE_TOO_LONG).await;
                    Next::Close
                }
                Input::Closed => Next::Close,
                Input::Timeout => {
                    self.close_with(&reply::TIMEOUT).await;
                    Next::Close
                }
                Input::Shutdown => {
                    self.close_with(&reply::SHUTTING_DOWN).await;
                    Next::Close
                }
                Input::SessionTooOld => {
                    tracing::info!(client = %self.client_ip, "session older than limits.max_session_age: closing it with 421 4.7.0");
                    self.close_with(&reply::SESSION_TOO_OLD).await;
                    Next::Close
                }
            };
            match next {
                Next::Continue => {}
                Next::Close => break,
                Next::StartTls => return End::StartTls,
            }
        }
        // Replies queued by the command that ended the session (the 421 after too many
        // errors) have not been written yet.
        if !self.wbuf.is_empty() && self.flush().await {
            let _ = self.stream.shutdown().await;
        }
        End::Closed
    }

    /// Counts an error; at [`MAX_ERRORS`] the session ends.
    fn error(&mut self) -> Next {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            self.reply(&reply::TOO_MANY_ERRORS);
            return Next::Close;
        }
        Next::Continue
    }

    /// Reads more input, flushing pending replies first (so pipelined replies go out in one
    /// write, RFC 2920 §3.1). Returns false on EOF, error, timeout or shutdown.
    async fn fill(&mut self, deadline: Instant, watch_stop: bool) -> Result<(), Input> {
        if !self.flush().await {
            return Err(Input::Closed);
        }
        self.compact();
        self.rbuf.reserve(READ_CHUNK);
        let ctx = self.ctx.clone();
        let read = tokio::select! {
            biased;
            _ = ctx.stop.cancelled(), if watch_stop => return Err(Input::Shutdown),
            _ = ctx.hard_stop.cancelled() => return Err(Input::Shutdown),
            r = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)) => r,
        };
        match read {
            Err(_) => Err(Input::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => Err(Input::Closed),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Reads a command line. AUTH may carry an initial response up to the SASL limit
    /// (RFC 4954 §4); every other command is held to 512 octets.
    async fn next_command(&mut self) -> Input {
        // Issue 8 §3.3: NOOP and friends must not keep a session (and its slot) for ever.
        // The age is checked between commands and while idle, never inside DATA, so a
        // message in transfer is finished (and answered) first.
        let now = Instant::now();
        let timeout_at = now + self.ctx.config.limits.command_timeout;
        // An age too large for the clock means no age limit, not a panic.
        let too_old_at = self
            .started
            .checked_add(self.ctx.config.limits.max_session_age)
            .unwrap_or(timeout_at);
        if now >= too_old_at {
            return Input::SessionTooOld;
        }
        let deadline = timeout_at.min(too_old_at);
        let expired = |input: Input| match input {
            Input::Timeout if too_old_at < timeout_at => Input::SessionTooOld,
            input => input,
        };
        // Read until the verb is known (5 bytes, or a shorter complete line).
        while self.discarding == 0 && self.unread().len() < 5 && !self.unread().contains(&b'\n') {
            if let Err(e) = self.fill(deadline, true).await {
                return expired(e);
            }
        }
        let u = self.unread();
        let is_auth = self.discarding == 0 && u.len() >= 5 && u[..5].eq_ignore_ascii_case(b"AUTH ");
        let max = if is_auth {
            auth::MAX_RESPONSE_LEN + 64
        } else {
            MAX_COMMAND_LINE
        };
        match self.next_line(max, deadline).await {
            Input::TooLong if is_auth => Input::AuthTooLong,
            input => expired(input),
        }
    }

    async fn next_line(&mut self, max: usize, deadline: Instant) -> Input {
        // One deadline for the whole line: a client trickling a byte at a time cannot hold
        // the session open past `limits.command_timeout`.
        loop {
            let unread = self.unread();
            if let Some(pos) = unread.iter().position(|&b| b == b'\n') {
                let end = self.rpos + pos + 1;
                let len = pos + 1;
                if self.discarding > 0 {
                    self.discarding = 0;
                    self.rpos = end;
                    return Input::TooLong;
                }
                self.rpos = end;
                if len > max {
                    return Input::TooLong;
                }
                return Input::Line(self.rbuf[end - len..end].to_vec());
            }
            // No complete line yet: bound what we keep.
            if self.discarding > 0 || unread.len() > max {
                self.discarding += unread.len();
                self.rpos = self.rbuf.len();
                if self.discarding > MAX_DISCARD {
                    return Input::Flood;
                }
            }
            if let Err(e) = self.fill(deadline, true).await {
                return e;
            }
        }
    }

    async fn command(&mut self, line: &[u8]) -> Next {
        if line.contains(&0) {
            self.reply(&reply::NUL_IN_COMMAND);
            return self.error();
        }
        // `MAIL FROM:user@domain` from old senders becomes `MAIL FROM:<user@domain>` (Postfix's
        // strict_rfc821_envelopes = no); the bracketed line is what every later check sees.
        let bracketed = crate::smtp::command::bracket_bare_path(line);
        let line = bracketed.as_deref().unwrap_or(line);
        let parsed = Request::parse(&mut line.iter());
        let next = match parsed {
            Ok(req) => {
                let req = req.into_owned();
                self.request(req, line).await
            }
            Err(e) => {
                let r = match e {
                    ProtoError::UnknownCommand => reply::UNRECOGNIZED,
                    // `<"u@ext">`: the parser unquotes it and finds no domain; say why.
                    ProtoError::InvalidSenderAddress | ProtoError::InvalidRecipientAddress
                        if line.contains(&b'"') =>
                    {
                        reply::QUOTED_LOCAL_PART
                    }
                    ProtoError::InvalidSenderAddress => reply::BAD_SENDER_SYNTAX,
                    ProtoError::InvalidRecipientAddress => reply::BAD_RECIPIENT_SYNTAX,
                    ProtoError::SyntaxError { syntax } => reply::syntax(syntax),
                    ProtoError::InvalidParameter { param } => reply::invalid_parameter(param),
                    ProtoError::UnsupportedParameter { param } => {
                        reply::unsupported_parameter(&headers::clean_token(&param))
                    }
                    _ => reply::SYNTAX_ERROR,
                };
                self.reply(&r);
                self.error()
            }
        };
        if !matches!(next, Next::Continue) {
            return next;
        }
        // Without EHLO the client may not pipeline (RFC 2920): a second command already
        // waiting means a misbehaving or hostile client. After a message (DATA and its body)
        // a waiting QUIT is common from simple devices and harmless: the reply was queued.
        let was_data = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"DATA");
        if self.helo.is_some() && !self.esmtp && !was_data && !self.unread().is_empty() {
            self.close_with(&reply::IMPROPER_PIPELINING).await;
            return Next::Close;
        }
        Next::Continue
    }

    async fn request(&mut self, req: Request<String>, line: &[u8]) -> Next {
        // Commands that make no progress towards a message (Postfix's junk commands, plus
        // the greetings and HELP). MAIL, RCPT, DATA, AUTH and STARTTLS are not counted; an
        // accepted message or a successful AUTH starts the count again. Errors have their
        // own cap (MAX_ERRORS).
        if matches!(
            req,
            Request::Ehlo { .. }
                | Request::Helo { .. }
                | Request::Rset
                | Request::Noop { .. }
                | Request::Vrfy { .. }
                | Request::Help { .. }
        ) {
            self.junk += 1;
            if self.junk > self.ctx.config.limits.max_junk_commands {
                tracing::info!(client = %self.client_ip, "more than limits.max_junk_commands commands without mail: closing the session with 421 4.7.0");
                self.reply(&reply::TOO_MANY_JUNK_COMMANDS);
                return Next::Close;
            }
        }
        match req {
            Request::Ehlo { host } => {
                self.helo = Some(host);
                self.esmtp = true;
                self.tx = None;
                let mut lines = vec![
                    format!("{} Hello [{}]", self.ctx.config.hostname, self.client_ip),
                    "PIPELINING".to_string(),
                    format!("SIZE {}", self.ctx.config.limits.max_message_size),
                    "8BITMIME".to_string(),
                    "SMTPUTF8".to_string(),
                    "ENHANCEDSTATUSCODES".to_string(),
                ];
                if self.starttls_available() {
                    lines.push("STARTTLS".to_string());
                }
                // B12: AUTH only where it may be used (inside TLS unless allow_plaintext_auth).
                if self.auth_available() {
                    lines.push(format!("AUTH {}", auth::MECHANISMS));
                    // Postfix's broken_sasl_auth_clients: Outlook Express 4 and some printer
                    // firmware only look for the pre-RFC 2554 `AUTH=` form.
                    if self.ctx.listener.broken_sasl_auth_clients {
                        lines.push(format!("AUTH={}", auth::MECHANISMS));
                    }
                }
                reply::ehlo(&lines, &mut self.wbuf);
                Next::Continue
            }
            Request::Helo { host } => {
                self.helo = Some(host);
                self.esmtp = false;
                self.tx = None;
                let r = reply::helo_ok(&self.ctx.config.hostname);
                self.reply(&r);
                Next::Continue
            }
            Request::Mail { from } => self.mail(from, line),
            Request::Rcpt { to } => self.rcpt(to, line),
            Request::Data => self.data().await,
            Request::Rset => {
                self.tx = None;
                self.reply(&reply::RESET_OK);
                Next::Continue
            }
            Request::Noop { .. } => {
                self.reply(&reply::NOOP_OK);
                Next::Continue
            }
            Request::Quit => {
                self.close_with(&reply::BYE).await;
                Next::Close
            }
            Request::Vrfy { .. } => {
                self.reply(&reply::VRFY_CANNOT);
                Next::Continue
            }
            Request::Help { .. } => {
                self.reply(&reply::HELP);
                Next::Continue
            }
            Request::StartTls => self.starttls().await,
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                let before = self.auth.is_some();
                let next = self.authenticate(mechanism, &initial_response).await;
                if !before && self.auth.is_some() {
                    self.junk = 0; // a successful AUTH is progress
                }
                next
            }
            Request::Expn { .. }
            | Request::Bdat { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Lhlo { .. } => {
                self.reply(&reply::NOT_IMPLEMENTED);
                self.error()
            }
        }
    }

    /// The senders this client may use: its user's `allowed_senders` once authenticated,
    /// else `access.allowed_senders`.
    fn sender_patterns(&self) -> &[crate::config::SenderPattern] {
        match &self.auth {
            Some(user) => &user.allowed_senders,
            None => &self.ctx.config.access.allowed_senders,
        }
    }

    fn auth_available(&self) -> bool {
        self.ctx.auth.has_users() && (self.tls_active || self.ctx.listener.allow_plaintext_auth)
    }

    /// AUTH PLAIN / LOGIN (RFC 4954). Credentials live only in `Secret` values and in the
    /// line buffers of this exchange; nothing here logs them.
    async fn authenticate(&mut self, mechanism: u64, initial: &str) -> Next {
        let refusal = if self.helo.is_none() {
            Some(reply::BAD_SEQUENCE_HELO)
        } else if self.auth.is_some() {
            Some(reply::AUTH_ALREADY)
        } else if self.tx.is_some() {
            Some(reply::AUTH_IN_TRANSACTION)
        } else if !self.ctx.auth.has_users() {
            Some(reply::NOT_IMPLEMENTED)
        } else if !self.tls_active && !self.ctx.listener.allow_plaintext_auth {
            // behaviour.md C32: no password in the clear unless the listener allows it.
            Some(reply::AUTH_NEEDS_TLS)
        } else {
            None
        };
        if let Some(r) = refusal {
            self.reply(&r);
            return self.error();
        }
        // A blocked client is turned away before the exchange; the delays come in
        // `Authenticator::attempt`, before the password check.
        match self.ctx.auth_failures.check(self.client_ip) {
            Ok(_) => {}
            Err(r) => {
                tracing::warn!(client = %self.client_ip, "AUTH refused: too many failures from this address");
                self.close_with(&r).await;
                return Next::Close;
            }
        }
        let mechanism = match auth::Mechanism::from_smtp_proto(mechanism) {
            Ok(m) => m,
            Err(r) => {
                self.reply(&r);
                return self.error();
            }
        };
        let initial = (!initial.is_empty()).then_some(initial);
        let (mut exchange, mut step) = SaslExchange::start(mechanism, initial);
        loop {
            match step {
                Step::Challenge(c) => {
                    self.reply(&reply::auth_challenge(c));
                    let deadline = Instant::now() + self.ctx.config.limits.command_timeout;
                    let line = match self.next_line(auth::MAX_RESPONSE_LEN + 2, deadline).await {
                        Input::Line(l) => l,
                        Input::TooLong | Input::AuthTooLong => {
                            self.reply(&reply::AUTH_LINE_TOO_LONG);
                            return self.error();
                        }
                        Input::Flood => {
                            self.close_with(&reply::AUTH_LINE_TOO_LONG).await;
                            return Next::Close;
                        }
                        // SessionTooOld comes only from `next_command`.
                        Input::Closed | Input::SessionTooOld => return Next::Close,
                        Input::Timeout => {
                            self.close_with(&reply::TIMEOUT).await;
                            return Next::Close;
                        }
                        Input::Shutdown => {
                            self.close_with(&reply::SHUTTING_DOWN).await;
                            return Next::Close;
                        }
                    };
                    // Some printers give up with QUIT at the LOGIN prompt.
                    if line.trim_ascii().eq_ignore_ascii_case(b"QUIT") {
                        self.close_with(&reply::BYE).await;
                        return Next::Close;
                    }
                    step = exchange.respond(&line);
                }
                Step::Fail(r) => {
                    self.reply(&r);
                    return self.error();
                }
                Step::Done { username, password } => {
                    let shown = headers::clean_token(&username);
                    let attempt = self.ctx.auth.attempt(
                        &self.ctx.auth_failures,
                        self.client_ip,
                        &username,
                        password,
                    );
                    return match attempt.await {
                        auth::Attempt::Authenticated(name) => {
                            let allowed_senders = self
                                .ctx
                                .config
                                .users
                                .iter()
                                .find(|u| u.username == name)
                                .map(|u| u.allowed_senders.clone())
                                .unwrap_or_default();
                            tracing::info!(client = %self.client_ip, user = %headers::clean_token(&name), mechanism = mechanism.name(), "authenticated");
                            self.auth = Some(AuthedUser {
                                username: name,
                                mechanism: mechanism.name(),
                                allowed_senders,
                            });
                            self.reply(&reply::AUTH_OK);
                            Next::Continue
                        }
                        auth::Attempt::Failed => {
                            tracing::warn!(client = %self.client_ip, user = %shown, "authentication failed (unknown user or wrong password)");
                            self.reply(&reply::AUTH_FAILED);
                            self.error()
                        }
                        auth::Attempt::Blocked => {
                            tracing::warn!(client = %self.client_ip, "AUTH refused: too many failures from this address");
                            self.close_with(&reply::AUTH_TOO_MANY_FAILURES).await;
                            Next::Close
                        }
                        auth::Attempt::Busy => {
                            tracing::warn!(client = %self.client_ip, user = %shown, "authentication not checked: every password-check slot stayed busy (a flood of AUTH attempts?)");
                            self.reply(&reply::AUTH_BUSY);
                            self.error()
                        }
                    };
                }
            }
        }
    }

    fn starttls_available(&self) -> bool {
        !self.tls_active && self.ctx.listener.tls == TlsMode::StartTls && self.ctx.tls.is_some()
    }

    /// RFC 3207. Anything the client sent after STARTTLS in the same packet is discarded
    /// (CVE-2011-0411, behaviour.md C38): it was sent in plaintext and must not be read as
    /// if it came through TLS.
    async fn starttls(&mut self) -> Next {
        if self.tls_active {
            self.reply(&reply::TLS_ALREADY_ACTIVE);
            return self.error();
        }
        if !self.starttls_available() {
            self.reply(&reply::NOT_IMPLEMENTED);
            return self.error();
        }
        self.reply(&reply::READY_FOR_TLS);
        if !self.flush().await {
            return Next::Close;
        }
        self.rpos = self.rbuf.len();
        self.compact();
        Next::StartTls
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>, line: &[u8]) -> Next {
        if self.helo.is_none() {
            self.reply(&reply::BAD_SEQUENCE_HELO);
            return self.error();
        }
        if self.tx.is_some() {
            self.reply(&reply::BAD_SEQUENCE_NESTED_MAIL);
            return self.error();
        }
        // Relay permission (behaviour.md C30): clients from allow_networks may send without
        // AUTH unless the listener requires it; everyone else must authenticate first.
        let access = &self.ctx.config.access;
        if self.auth.is_none() && (self.ctx.listener.require_auth || !access.allows(self.client_ip))
        {
            self.reply(&reply::AUTH_REQUIRED);
            return self.error();
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        if let Some(r) = address_problem(&from.address, line, smtputf8) {
            self.reply(&r);
            return self.error();
        }
        if !crate::config::sender_allowed(self.sender_patterns(), &from.address) {
            tracing::warn!(client = %self.client_ip, from = %from.address, "sender not in access.allowed_senders");
            self.reply(&reply::SENDER_NOT_ALLOWED);
            return self.error();
        }
        if from.flags & MAIL_BODY_BINARYMIME != 0 {
            self.reply(&reply::BINARYMIME_UNSUPPORTED);
            return self.error();
        }
        let max = self.ctx.config.limits.max_message_size;
        if from.size as u64 > max {
            self.reply(&reply::SIZE_EXCEEDED);
            return self.error();
        }
        if !self.ctx.spool.has_room(from.size as u64) {
            tracing::error!(spool = %self.ctx.spool.root().display(), "spool file system is full: refusing mail with 452");
            self.reply(&reply::STORAGE_FULL);
            return Next::Continue;
        }
        let body = if from.flags & MAIL_BODY_8BITMIME != 0 {
            Some("8BITMIME".to_string())
        } else if from.flags & MAIL_BODY_7BIT != 0 {
            Some("7BIT".to_string())
        } else {
            None
        };
        self.tx = Some(Transaction {
            sender: from.address,
            body,
            smtputf8,
            recipients: Vec::new(),
            rcpt_refused: false,
        });
        self.reply(&reply::MAIL_OK);
        Next::Continue
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<String>, line: &[u8]) -> Next {
        let max = self.ctx.config.limits.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            self.reply(&reply::BAD_SEQUENCE_MAIL);
            return self.error();
        };
        let problem = if to.address.is_empty() {
            Some(reply::RECIPIENT_NEEDS_DOMAIN)
        } else if tx.recipients.len() >= max {
            // RFC 5321 §4.5.3.1.8: 452 and the client sends the rest in another transaction.
            Some(reply::TOO_MANY_RECIPIENTS)
        } else {
            address_problem(&to.address, line, tx.smtputf8)
        };
        match problem {
            Some(r) => {
                tx.rcpt_refused = true;
                let temporary = r.code < 500;
                self.reply(&r);
                if temporary {
                    Next::Continue
                } else {
                    self.error()
                }
            }
            None => {
                tx.recipients.push(to.address);
                self.reply(&reply::RCPT_OK);
                Next::Continue
            }
        }
    }

    async fn data(&mut self) -> Next {
        let refusal = match &self.tx {
            _ if self.helo.is_none() => Some(reply::BAD_SEQUENCE_HELO),
            None => Some(reply::BAD_SEQUENCE_MAIL),
            Some(tx) if tx.recipients.is_empty() && tx.rcpt_refused => {
                Some(reply::NO_VALID_RECIPIENTS)
            }
            Some(tx) if tx.recipients.is_empty() => Some(reply::BAD_SEQUENCE_RCPT),
            Some(_) => None,
        };
        if let Some(r) = refusal {
            // A message body already sent after a refused DATA would be read as commands.
            if !self.unread().is_empty() {
                self.close_with(&reply::IMPROPER_PIPELINING).await;
                return Next::Close;
            }
            self.reply(&r);
            return self.error();
        }
        let Some(tx) = self.tx.take() else {
            return Next::Continue;
        };
        self.reply(&reply::START_DATA);
        self.receive(tx).await
    }

    /// Reads the message after 354, streams it to the spool, and replies.
    async fn receive(&mut self, tx: Transaction) -> Next {
        let cfg = self.ctx.config.clone();
        let id = new_id();
        let now = SystemTime::now();
        let envelope = Envelope {
            id: id.clone(),
            sender: tx.sender,
            recipients: tx
                .recipients
                .into_iter()
                .map(|address| Recipient { address })
                .collect(),
            client_ip: self.client_ip,
            helo: self.helo.clone().unwrap_or_default(),
            auth_user: self.auth.as_ref().map(|a| a.username.clone()),
            arrival_ms: now_ms(),
            body: tx.body,
            smtputf8: tx.smtputf8,
            upstream: None,
            report: false,
        };
        let mut incoming = self.ctx.spool.begin(&envelope);
        let mut decoder = DataDecoder::new(cfg.limits.max_message_size);
        if cfg.access.lf_only(self.client_ip) {
            decoder.accept_lf_end();
        }
        // Content is held here until the header section has been scanned for Date and
        // Message-ID, then our headers go first and everything streams to the spool.
        let mut head: Option<Vec<u8>> = Some(Vec::new());
        // Issue 8 §3.2/§3.7: the whole header section is scanned (incrementally) and its
        // From parsed; a refused message is not written to the spool at all.
        let mut scan = headers::HeaderScan::new(cfg.limits.max_header_size);
        let mut head_refusal: Option<Reply> = None;
        let mut out = Vec::with_capacity(READ_CHUNK + 1024);
        let deadline = Instant::now() + cfg.limits.data_timeout;
        // RFC 3848 / RFC 6531 "with" keywords: S for TLS, A for AUTH.
        let protocol = match (
            self.esmtp,
            envelope.smtputf8,
            self.tls_active,
            self.auth.is_some(),
        ) {
            (false, _, _, _) => "SMTP",
            (true, false, false, false) => "ESMTP",
            (true, false, true, false) => "ESMTPS",
            (true, false, false, true) => "ESMTPA",
            (true, false, true, true) => "ESMTPSA",
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
        };
        let single_rcpt =
            (envelope.recipients.len() == 1).then(|| envelope.recipients[0].address.clone());
        let client_ip = self.client_ip;
        let trace = |present| {
            headers::added_headers(
                &TraceInfo {
                    helo: &envelope.helo,
                    client_ip,
                    hostname: &cfg.hostname,
                    protocol,
                    queue_id: &id,
                    // The envelope keeps the user for logs and routing either way.
                    auth_user: envelope
                        .auth_user
                        .as_deref()
                        .filter(|_| cfg.received_auth_user),
                    single_rcpt: single_rcpt.as_deref(),
                    now,
                },
                present,
            )
        };
        loop {
            out.clear();
            let found = decoder.feed(self.unread(), &mut out);
            self.rpos = match found {
                Some(n) => self.rpos + n,
                None => self.rbuf.len(),
            };
            if let Some(h) = head.as_mut() {
                h.extend_from_slice(&out);
                match scan.feed(h, found.is_some()) {
                    HeadState::Pending => {}
                    HeadState::TooBig => {
                        head = None;
                        tracing::warn!(client = %self.client_ip, max = cfg.limits.max_header_size, "header section over limits.max_header_size: refusing the message");
                        head_refusal = Some(reply::header_too_big(cfg.limits.max_header_size));
                    }
                    HeadState::Done { end, present } => {
                        let h = head.take().unwrap_or_default();
                        head_refusal = self.header_from_refusal(&h[..end], scan.from_fields());
                        if head_refusal.is_none() {
                            incoming.write(&trace(present)).await;
                            incoming.write(&h).await;
                        }
                    }
                }
            } else if !out.is_empty() && head_refusal.is_none() {
                incoming.write(&out).await;
            }
            if found.is_some() {
                break;
            }
            if let Err(e) = self.fill(deadline, false).await {
                // No 250 was sent: dropping `incoming` removes any partial file.
                drop(incoming);
                match e {
                    Input::Timeout => self.close_with(&reply::TIMEOUT).await,
                    Input::Shutdown => self.close_with(&reply::SHUTTING_DOWN).await,
                    _ => {}
                }
                return Next::Close;
            }
        }

        let dot_seen = Instant::now();
        let flags = decoder.flags;
        let refusal = if flags.oversize {
            Some(reply::SIZE_EXCEEDED)
        } else if flags.nul {
            Some(reply::NUL_IN_DATA)
        } else if flags.long_line {
            Some(reply::LINE_OVER_998)
        } else if flags.bare_lf && self.ctx.listener.bare_lf == BareLf::Reject {
            Some(reply::BARE_LF)
        } else {
            head_refusal
        };
        if let Some(r) = refusal {
            drop(incoming);
            tracing::info!(client = %self.client_ip, from = %envelope.sender, reason = %r.text, "message refused");
            self.reply(&r);
            return Next::Continue;
        }
        let size = incoming.content_len();
        match incoming.commit().await {
            Ok(queued) => {
                tracing::info!(
                    queue_id = %id,
                    client = %self.client_ip,
                    from = %envelope.sender,
                    recipients = envelope.recipients.len(),
                    size,
                    "message accepted"
                );
                self.ctx.scheduler.queued(queued);
                self.junk = 0;
                self.reply(&reply::queued(&id));
                self.ctx.ops.message_accepted(
                    &crate::ops::ClientInfo {
                        ip: self.client_ip,
                        helo: &envelope.helo,
                        auth_user: self.auth.as_ref().map(|a| a.username.as_str()),
                        auth_mechanism: self.auth.as_ref().map(|a| a.mechanism),
                        tls: self.tls_info.as_ref().map(|(v, c)| (*v, c.as_str())),
                        sender: &envelope.sender,
                    },
                    dot_seen.elapsed(),
                );
            }
            Err(e) => {
                tracing::error!(client = %self.client_ip, error = %e, "cannot write the message to the spool: refusing with 452");
                self.reply(&reply::STORAGE_FULL);
            }
        }
        Next::Continue
    }
}

impl<S> Session<S> {
    /// The header From policy (behaviour.md C34, issue 8 §3.2) for a complete header
    /// section: every mailbox's addr-spec must match the client's sender patterns. Several
    /// From fields are always refused; a From without mailboxes only where the patterns
    /// restrict the sender (with `*` there is nothing to protect, and `sender_rewrite:
    /// mailbox` replaces such a From upstream).
    fn header_from_refusal(&self, head: &[u8], from_fields: usize) -> Option<Reply> {
        let patterns = match &self.auth {
            Some(user) => &user.allowed_senders,
            None => &self.ctx.config.access.allowed_senders,
        };
        match headers::header_from(head, from_fields) {
            Ok(addresses) => {
                let bad = addresses
                    .iter()
                    .find(|a| !crate::config::sender_allowed(patterns, a))?;
                // Refused here rather than bounced later by Exchange with 5.7.60 (C34).
                tracing::warn!(client = %self.client_ip, header_from = %bad, "header From not allowed for this client or user");
                Some(reply::HEADER_FROM_NOT_ALLOWED)
            }
            Err(FromProblem::NotMailboxes)
                if patterns.contains(&crate::config::SenderPattern::Any) =>
            {
                None
            }
            Err(problem) => {
                tracing::warn!(client = %self.client_ip, %problem, "header From refused");
                Some(match problem {
                    FromProblem::Several(_) => reply::SEVERAL_HEADER_FROM,
                    FromProblem::NotMailboxes => reply::HEADER_FROM_NOT_MAILBOXES,
                })
            }
        }
    }
}

/// Checks an address the parser accepted against what this relay can forward faithfully.
fn address_problem(address: &str, line: &[u8], smtputf8: bool) -> Option<Reply> {
    // smtp-proto unquotes `"john doe"@x`; forwarding the unquoted form would change the
    // address, so quoted local parts are refused (behaviour.md C30's `<"u@ext">` too).
    if line.contains(&b'"') {
        return Some(reply::QUOTED_LOCAL_PART);
    }
    if !address.is_ascii() && !smtputf8 {
        return Some(reply::UTF8_NEEDS_SMTPUTF8);
    }
    // smtp-proto replaces invalid UTF-8 with U+FFFD: that would forward another address.
    if std::str::from_utf8(line).is_err() {
        return Some(reply::ADDRESS_NOT_UTF8);
    }
    None
}
