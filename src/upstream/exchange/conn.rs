//! One SMTP client session with Exchange Online, on lettre's low-level connection: TCP
//! connect, greeting, EHLO, STARTTLS (required: no plaintext fallback, TLS 1.2+), EHLO again,
//! AUTH XOAUTH2 in two steps, then transactions. Every step runs under its own timeout
//! (RFC 5321 §4.5.3.2 client timeouts; lettre's own timeout covers only the TCP connect).
//!
//! lettre gets our own TCP stream wrapper ([`Guarded`]): the message content is streamed
//! from the spool file in chunks, and if reading the file fails half-way the wrapper refuses
//! every further write, so the final dot is never sent and the server discards the partial
//! message instead of delivering it truncated.
//!
//! Trust boundary at STARTTLS: nothing the server sent before the TLS handshake may be read
//! after it. lettre reads through a buffer, so bytes that arrive right behind the `220`
//! reply to STARTTLS would sit in that buffer and be taken, after the upgrade, as replies
//! that came over TLS (STARTTLS response injection: a man in the middle could fake `235`,
//! `250` to the final dot, a `550` or a quota reply). [`Guarded`] sees every plaintext byte
//! lettre read; when the TLS handshake starts and more was read than the replies lettre
//! consumed, it refuses the handshake and the connection ends as a TLS problem.

use std::io::Read;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::extension::{ClientId, Extension};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::classify::{Problem, Step};
use crate::outcome::code;
use crate::secret::Secret;

/// Client timeouts (RFC 5321 §4.5.3.2), shortened where Exchange answers fast.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    pub greeting: Duration,
    pub command: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    pub data_init: Duration,
    /// Writing the content: at least this long, more for a large message (32 KiB/s).
    pub data_block: Duration,
    /// The reply to the final dot: 10 minutes.
    pub data_term: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(5 * 60),
            command: Duration::from_secs(2 * 60),
            mail: Duration::from_secs(5 * 60),
            rcpt: Duration::from_secs(5 * 60),
            data_init: Duration::from_secs(2 * 60),
            data_block: Duration::from_secs(3 * 60),
            data_term: Duration::from_secs(10 * 60),
        }
    }
}

/// What went wrong in a step: a reply from the server, or no reply at all.
#[derive(Debug, Clone)]
pub enum StepError {
    /// The server replied with a negative code; `text` is the reply without the code.
    Reply { step: Step, code: u16, text: String },
    /// Network, TLS or protocol error, or timeout; no usable reply.
    Broken {
        step: Step,
        what: String,
        problem: Option<Problem>,
    },
}

impl StepError {
    pub fn step(&self) -> Step {
        match self {
            StepError::Reply { step, .. } | StepError::Broken { step, .. } => *step,
        }
    }
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Reply { step, code, text } => {
                write!(f, "{code} {text} (in reply to {})", step.name())
            }
            StepError::Broken { step, what, .. } => write!(f, "{what} (at {})", step.name()),
        }
    }
}

/// The TCP stream handed to lettre. Writes fail once `poisoned` is set. Until the TLS
/// handshake starts it keeps what was read and written in plaintext ([`Plain`]).
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    poisoned: Arc<AtomicBool>,
    /// `None` once the TLS handshake has started.
    plain: Option<Plain>,
    /// Set when bytes followed the reply to STARTTLS.
    injected: Arc<AtomicBool>,
    /// The first bytes the server sent once the TLS handshake started (its ServerHello),
    /// until [`TlsInfo`] could be read from them; then emptied for good.
    hello: Option<Vec<u8>>,
    /// The negotiated TLS version and cipher suite, for `mailbridge doctor`.
    tls_info: Arc<OnceLock<TlsInfo>>,
}

/// What the server chose in its ServerHello (sent in clear in TLS 1.2 and 1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLS 1.3`, `TLS 1.2`, ...
    pub version: &'static str,
    /// The IANA name of the cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

/// The most handshake bytes kept to find the ServerHello in.
const MAX_HELLO: usize = 4096;

/// Reads the ServerHello at the start of `buf` (a TLS record stream). `Ok(None)`: not all of
/// it arrived yet; `Err(())`: it is not a ServerHello (nothing more to learn).
fn parse_server_hello(buf: &[u8]) -> Result<Option<TlsInfo>, ()> {
    // Record header: type 22 (handshake), version, length; then the handshake message:
    // type 2 (ServerHello), 24-bit length, legacy_version, random[32], session id, cipher
    // suite, compression method, extensions (supported_versions = 43 names TLS 1.3).
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 22 {
        return Err(());
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    let Some(rec) = buf.get(5..5 + record_len) else {
        return Ok(None);
    };
    let (&kind, rest) = rec.split_first().ok_or(())?;
    if kind != 2 || rest.len() < 3 {
        return Err(());
    }
    let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
    // A ServerHello split over two records is not followed; it is small and never is.
    let body = rest.get(3..3 + len).ok_or(())?;
    let u16_at = |i: usize| -> Result<u16, ()> {
        Ok(u16::from_be_bytes([
            *body.get(i).ok_or(())?,
            *body.get(i + 1).ok_or(())?,
        ]))
    };
    let mut version = u16_at(0)?;
    let sid_len = usize::from(*body.get(34).ok_or(())?);
    let mut i = 35 + sid_len;
    let cipher = u16_at(i)?;
    i += 3;
    if body.len() >= i + 2 {
        let ext_end = (i + 2 + usize::from(u16_at(i)?)).min(body.len());
        i += 2;
        while i + 4 <= ext_end {
            let (ty, n) = (u16_at(i)?, usize::from(u16_at(i + 2)?));
            if ty == 43 && n == 2 {
                version = u16_at(i + 4)?;
            }
            i += 4 + n;
        }
    }
    let version = match version {
        0x0304 => "TLS 1.3",
        0x0303 => "TLS 1.2",
        0x0302 => "TLS 1.1",
        0x0301 => "TLS 1.0",
        _ => "TLS (unknown version)",
    };
    Ok(Some(TlsInfo {
        version,
        cipher: format!("{:?}", rustls::CipherSuite::from(cipher)),
    }))
}

/// The most plaintext kept (greeting, EHLO and STARTTLS replies; lettre allows 4 KiB of
/// reply per command). More than this before TLS is itself refused.
const MAX_PLAIN: usize = 64 * 1024;

/// The plaintext part of the session as the wrapper saw it.
#[derive(Debug, Default)]
struct Plain {
    /// Every byte lettre read before TLS (at most [`MAX_PLAIN`]).
    read: Vec<u8>,
    overflow: bool,
    /// Command lines written (each is answered by one reply).
    commands: usize,
    /// The line being written, up to its LF.
    line: Vec<u8>,
    /// `STARTTLS` was written: the next write is the TLS ClientHello.
    starttls_sent: bool,
}

impl Plain {
    fn wrote(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.line.len() < 64 {
                self.line.push(b);
            }
            if b == b'\n' {
                self.commands += 1;
                if self.line.eq_ignore_ascii_case(b"STARTTLS\r\n") {
                    self.starttls_sent = true;
                }
                self.line.clear();
            }
        }
    }

    /// How many bytes lettre read past the replies it consumed: the greeting plus one reply
    /// per command. `None` if the replies are not all there (cannot happen unless something
    /// is wrong, so it counts as tampering too).
    fn unconsumed(&self) -> Option<usize> {
        if self.overflow {
            return None;
        }
        let mut pos = 0;
        let mut replies = 0;
        // A reply ends with a line whose fourth octet is not '-' (RFC 5321 §4.2.1).
        while replies < self.commands + 1 {
            let end = self.read[pos..].iter().position(|&b| b == b'\n')?;
            let line = &self.read[pos..pos + end + 1];
            pos += end + 1;
            if line.get(3) != Some(&b'-') {
                replies += 1;
            }
        }
        Some(self.read.len() - pos)
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &res {
            let this = &mut *self;
            let new = &buf.filled()[before..];
            if let Some(p) = this.plain.as_mut() {
                if p.read.len() + new.len() > MAX_PLAIN {
                    p.overflow = true;
                } else {
                    p.read.extend_from_slice(new);
                }
            } else if let Some(h) = this.hello.as_mut() {
                let room = MAX_HELLO.saturating_sub(h.len());
                h.extend_from_slice(&new[..new.len().min(room)]);
                match parse_server_hello(h) {
                    Ok(None) if h.len() < MAX_HELLO && !new.is_empty() => {}
                    Ok(Some(info)) => {
                        let _ = this.tls_info.set(info);
                        this.hello = None;
                    }
                    _ => this.hello = None,
                }
            }
        }
        res
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Poll::Ready(Err(std::io::Error::other(
                "message content could not be read from the spool; transaction abandoned",
            )));
        }
        if let Some(p) = &self.plain
            && p.starttls_sent
        {
            // The TLS handshake starts with this write: from here on, only what comes over
            // TLS counts. Anything lettre already buffered came in plaintext.
            match p.unconsumed() {
                Some(0) => self.plain = None,
                extra => {
                    self.injected.store(true, Ordering::SeqCst);
                    let what = match extra {
                        Some(n) => format!("{n} bytes"),
                        None => "unexpected data".into(),
                    };
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{what} followed the 220 reply to STARTTLS before the TLS handshake"
                        ),
                    )));
                }
            }
        }
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(p)) = (&res, self.plain.as_mut()) {
            p.wrote(&buf[..*n]);
        }
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Poll::Ready(Err(std::io::Error::other("transaction abandoned")));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for Guarded {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.peer_addr()
    }
}

/// A command line sent as is (MAIL, RCPT, AUTH): lettre's typed commands would re-validate
/// addresses the inbound side already accepted, and its AUTH sends XOAUTH2 inline.
struct Line(String);

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)?;
        f.write_str("\r\n")
    }
}

/// Splits a lettre error into a reply (code + text) or a broken connection.
fn step_error(step: Step, e: lettre::transport::smtp::Error) -> StepError {
    if let Some(code) = e.status() {
        let code: u16 = code.to_string().parse().unwrap_or(0);
        let text = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        return StepError::Reply { step, code, text };
    }
    let problem = if e.is_tls() || step == Step::StartTls {
        Some(Problem::Tls(e.to_string()))
    } else {
        None
    };
    StepError::Broken {
        step,
        what: e.to_string(),
        problem,
    }
}

fn timed_out(step: Step, after: Duration) -> StepError {
    StepError::Broken {
        step,
        what: format!(
            "no reply within {} (timeout)",
            humantime::format_duration(after)
        ),
        problem: (step == Step::StartTls).then(|| {
            Problem::Tls(format!(
                "TLS handshake timed out after {}",
                humantime::format_duration(after)
            ))
        }),
    }
}

async fn within<T>(
    step: Step,
    after: Duration,
    f: impl std::future::Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, StepError> {
    match tokio::time::timeout(after, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(step_error(step, e)),
        Err(_) => Err(timed_out(step, after)),
    }
}

/// Where and how to connect.
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub helo: String,
    pub tls: TlsParameters,
    pub timeouts: Timeouts,
}

impl Endpoint {
    /// TLS parameters: the platform verifier (system roots) plus the certificates in
    /// `ca_file`, TLS 1.2 minimum (rustls speaks 1.2 and 1.3 only).
    pub fn tls_parameters(
        host: &str,
        ca_file: Option<&std::path::Path>,
    ) -> Result<TlsParameters, String> {
        let mut b = TlsParameters::builder(host.to_string());
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
            let certs: Vec<_> = rustls_pki_types::pem::PemObject::pem_slice_iter(&pem)
                .collect::<Result<Vec<rustls_pki_types::CertificateDer>, _>>()
                .map_err(|e| format!("ca_file {}: not PEM certificates: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("ca_file {}: no certificate found", path.display()));
            }
            for c in certs {
                let cert = lettre::transport::smtp::client::Certificate::from_der(c.to_vec())
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                b = b.add_root_certificate(cert);
            }
        }
        b.build_rustls().map_err(|e| format!("TLS setup: {e}"))
    }
}

/// An authenticated session, ready for transactions.
pub struct Session {
    conn: AsyncSmtpConnection,
    poisoned: Arc<AtomicBool>,
    tls_info: Arc<OnceLock<TlsInfo>>,
    timeouts: Timeouts,
    pub eight_bit: bool,
    pub smtputf8: bool,
    /// Transactions sent on this session.
    pub used: u32,
}

/// Connects, says EHLO, starts TLS and says EHLO again. Authentication is separate so a
/// `535` can be answered with a fresh token (on a new connection: Exchange may close one
/// after a failed AUTH).
pub async fn open(ep: &Endpoint) -> Result<Session, StepError> {
    let t = &ep.timeouts;
    let tcp = match tokio::time::timeout(t.connect, TcpStream::connect((ep.host.as_str(), ep.port)))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let what = format!("cannot connect to {}:{}: {e}", ep.host, ep.port);
            return Err(StepError::Broken {
                step: Step::Connect,
                problem: Some(Problem::Unreachable(what.clone())),
                what,
            });
        }
        Err(_) => {
            let what = format!(
                "cannot connect to {}:{}: no answer within {}",
                ep.host,
                ep.port,
                humantime::format_duration(t.connect)
            );
            return Err(StepError::Broken {
                step: Step::Connect,
                problem: Some(Problem::Unreachable(what.clone())),
                what,
            });
        }
    };
    let _ = tcp.set_nodelay(true);
    let poisoned = Arc::new(AtomicBool::new(false));
    let injected = Arc::new(AtomicBool::new(false));
    let tls_info = Arc::new(OnceLock::new());
    let stream = Box::new(Guarded {
        inner: tcp,
        poisoned: poisoned.clone(),
        plain: Some(Plain::default()),
        injected: injected.clone(),
        hello: Some(Vec::new()),
        tls_info: tls_info.clone(),
    });
    let helo = ClientId::Domain(ep.helo.clone());
    // lettre reads the greeting and sends EHLO in one call.
    let mut conn = within(
        Step::Greeting,
        t.greeting + t.command,
        AsyncSmtpConnection::connect_with_transport(stream, &helo),
    )
    .await?;
    if !conn.server_info().supports_feature(Extension::StartTls) {
        conn.abort().await;
        return Err(StepError::Broken {
            step: Step::StartTls,
            what: "the server does not offer STARTTLS".into(),
            problem: Some(Problem::NoStartTls),
        });
    }
    let upgraded = within(
        Step::StartTls,
        t.command * 2,
        conn.starttls(ep.tls.clone(), &helo),
    )
    .await;
    if injected.load(Ordering::SeqCst) {
        // Nothing read on this connection is trusted: it is closed (dropped) unused.
        let what = match upgraded {
            Err(e) => e.to_string(),
            Ok(()) => "bytes followed the 220 reply to STARTTLS".into(),
        };
        return Err(StepError::Broken {
            step: Step::StartTls,
            problem: Some(Problem::StartTlsInjection(what.clone())),
            what,
        });
    }
    upgraded?;
    if !conn.is_encrypted() {
        return Err(StepError::Broken {
            step: Step::StartTls,
            what: "STARTTLS did not encrypt the connection".into(),
            problem: Some(Problem::NoStartTls),
        });
    }
    let info = conn.server_info();
    let eight_bit = info.supports_feature(Extension::EightBitMime);
    let smtputf8 = info.supports_feature(Extension::SmtpUtfEight);
    Ok(Session {
        conn,
        poisoned,
        tls_info,
        timeouts: t.clone(),
        eight_bit,
        smtputf8,
        used: 0,
    })
}

impl Session {
    /// The TLS version and cipher suite the server chose (`None` if its ServerHello could not
    /// be read).
    pub fn tls_info(&self) -> Option<&TlsInfo> {
        self.tls_info.get()
    }

    /// What the server said in its EHLO reply after STARTTLS.
    pub fn server_info(&self) -> &lettre::transport::smtp::extension::ServerInfo {
        self.conn.server_info()
    }

    /// Whether the EHLO reply after STARTTLS offers `AUTH XOAUTH2`.
    pub fn offers_xoauth2(&self) -> bool {
        self.conn
            .server_info()
            .supports_auth_mechanism(lettre::transport::smtp::authentication::Mechanism::Xoauth2)
    }

    /// `AUTH XOAUTH2` alone, then the base64 string after `334` (RFC 4954 §4: a token makes
    /// the inline form longer than 512 octets). The token is only ever in this buffer.
    pub async fn auth_xoauth2(&mut self, user: &str, token: &Secret) -> Result<(), StepError> {
        if !self
            .conn
            .server_info()
            .supports_auth_mechanism(lettre::transport::smtp::authentication::Mechanism::Xoauth2)
        {
            return Err(StepError::Broken {
                step: Step::Auth,
                what: "the server does not offer AUTH XOAUTH2".into(),
                problem: Some(Problem::NoXoauth2),
            });
        }
        let t = self.timeouts.command;
        let first = within(
            Step::Auth,
            t,
            self.conn.command(Line("AUTH XOAUTH2".into())),
        )
        .await?;
        if first.code().to_string() != code::AUTH_CONTINUE.to_string() {
            return Err(StepError::Broken {
                step: Step::Auth,
                what: format!("unexpected reply {} to AUTH XOAUTH2", first.code()),
                problem: None,
            });
        }
        let blob = base64::engine::general_purpose::STANDARD.encode(format!(
            "user={user}\x01auth=Bearer {}\x01\x01",
            token.expose()
        ));
        match within(Step::Auth, t, self.conn.command(Line(blob.clone()))).await {
            Ok(_) => Ok(()),
            Err(StepError::Reply { step, code, .. }) if code == code::AUTH_CONTINUE => {
                // An error challenge (JSON); RFC 7628 says answer with an empty line.
                let _ = within(step, t, self.conn.command(Line(String::new()))).await;
                Err(StepError::Reply {
                    step,
                    code: code::AUTH_INVALID,
                    text: "5.7.3 Authentication unsuccessful (XOAUTH2 error challenge)".into(),
                })
            }
            Err(e) => Err(without_credential(e, &blob, token.expose())),
        }
    }

    pub async fn mail(
        &mut self,
        from: &str,
        body: Option<&str>,
        smtputf8: bool,
    ) -> Result<String, StepError> {
        let mut line = format!("MAIL FROM:<{from}>");
        if let Some(b) = body
            && self.eight_bit
        {
            line.push_str(" BODY=");
            line.push_str(b);
        }
        if smtputf8 && self.smtputf8 {
            line.push_str(" SMTPUTF8");
        }
        let r = within(
            Step::Mail,
            self.timeouts.mail,
            self.conn.command(Line(line)),
        )
        .await?;
        Ok(reply_text(&r))
    }

    pub async fn rcpt(&mut self, to: &str) -> Result<String, StepError> {
        let r = within(
            Step::Rcpt,
            self.timeouts.rcpt,
            self.conn.command(Line(format!("RCPT TO:<{to}>"))),
        )
        .await?;
        Ok(reply_text(&r))
    }

    /// DATA, then the content from `reader` (CRLF, not yet dot-stuffed; lettre stuffs it),
    /// then the final dot. Returns the reply to the dot, or an error saying whether the dot
    /// may have reached the server (`Step::Dot`).
    pub async fn data(
        &mut self,
        head: Vec<u8>,
        len: u64,
        mut reader: impl Read + Send,
    ) -> Result<String, StepError> {
        within(
            Step::Data,
            self.timeouts.data_init,
            self.conn.command(lettre::transport::smtp::commands::Data),
        )
        .await?;
        let poisoned = self.poisoned.clone();
        // Set once the whole content went to lettre: only then may the final dot have been
        // sent, so only then is a lost connection a possible duplicate.
        let all_sent = Arc::new(AtomicBool::new(false));
        let all_sent_iter = all_sent.clone();
        let mut head = Some(head);
        let mut done = false;
        // lettre always writes CRLF.CRLF after the content, so the content's own final
        // CRLF is held back (the last two bytes are only released once more data follows).
        let mut tail: Vec<u8> = Vec::new();
        let chunks = std::iter::from_fn(move || {
            loop {
                if done {
                    return None;
                }
                let next = match head.take() {
                    Some(h) => h,
                    None => {
                        let mut buf = vec![0u8; 64 * 1024];
                        match reader.read(&mut buf) {
                            Ok(0) => {
                                done = true;
                                all_sent_iter.store(true, Ordering::SeqCst);
                                let rest = std::mem::take(&mut tail);
                                return (rest != b"\r\n" && !rest.is_empty()).then_some(rest);
                            }
                            Ok(n) => {
                                buf.truncate(n);
                                buf
                            }
                            Err(_) => {
                                done = true;
                                poisoned.store(true, Ordering::SeqCst);
                                return None;
                            }
                        }
                    }
                };
                let mut combined = std::mem::take(&mut tail);
                combined.extend_from_slice(&next);
                let keep = combined.len().min(2);
                tail = combined.split_off(combined.len() - keep);
                if !combined.is_empty() {
                    return Some(combined);
                }
            }
        });
        // The reply to the dot gets `data_term`; sending gets `data_block`, or longer for a
        // large message (at least 32 KiB/s must get through).
        let sending = self
            .timeouts
            .data_block
            .max(Duration::from_secs(len / (32 * 1024)));
        let total = self.timeouts.data_term + sending;
        let res = within(Step::Dot, total, self.conn.message_iter(chunks)).await;
        if self.poisoned.load(Ordering::SeqCst) {
            self.conn.abort().await;
            return Err(StepError::Broken {
                step: Step::Data,
                what: "reading the message from the spool failed; the transaction was abandoned before the final dot".into(),
                problem: None,
            });
        }
        match res {
            Ok(r) => Ok(reply_text(&r)),
            // Failed while the content was still being written: the dot was never sent.
            Err(StepError::Broken { what, problem, .. }) if !all_sent.load(Ordering::SeqCst) => {
                Err(StepError::Broken {
                    step: Step::Data,
                    what,
                    problem,
                })
            }
            Err(e) => Err(e),
        }
    }

    pub async fn rset(&mut self) -> Result<(), StepError> {
        within(
            Step::Mail,
            self.timeouts.command,
            self.conn.command(lettre::transport::smtp::commands::Rset),
        )
        .await
        .map(|_| ())
    }

    pub fn is_broken(&self) -> bool {
        self.conn.has_broken()
    }

    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.conn.quit()).await;
    }
}

fn reply_text(r: &lettre::transport::smtp::response::Response) -> String {
    let lines: Vec<&str> = r.message().collect();
    format!("{} {}", r.code(), lines.join(" "))
}

/// `e` with the XOAUTH2 response and the token removed from its text: a server that echoes
/// the line it did not like must not put the token into the spool's attempt record, the log,
/// `mailbridge status` or the status page.
fn without_credential(e: StepError, blob: &str, token: &str) -> StepError {
    let clean = |t: String| {
        let mut t = t;
        for secret in [blob, token] {
            if !secret.is_empty() && t.contains(secret) {
                t = t.replace(secret, "[redacted]");
            }
        }
        t
    };
    match e {
        StepError::Reply { step, code, text } => StepError::Reply {
            step,
            code,
            text: clean(text),
        },
        StepError::Broken {
            step,
            what,
            problem,
        } => StepError::Broken {
            step,
            what: clean(what),
            problem,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echoed_xoauth2_response_or_token_is_not_kept() {
        let token = "eyJ0eXAiOiJKV1QifQ.eyJhdWQiOiJ4In0.sig";
        let blob = "dXNlcj1yZWxheUBjb250b3NvLmNvbQFhdXRoPUJlYXJlciBleUo=";
        let e = StepError::Reply {
            step: Step::Auth,
            code: 500,
            text: format!("5.3.3 Unrecognized command '{blob}' (token {token})"),
        };
        let shown = without_credential(e, blob, token).to_string();
        assert!(!shown.contains(blob) && !shown.contains(token), "{shown}");
        assert!(shown.contains("5.3.3 Unrecognized command"), "{shown}");
        let e = StepError::Broken {
            step: Step::Auth,
            what: format!("protocol error near {blob}"),
            problem: None,
        };
        let shown = without_credential(e, blob, token).to_string();
        assert!(!shown.contains(blob), "{shown}");
    }

    fn plain(read: &str, wrote: &str) -> Plain {
        let mut p = Plain::default();
        p.read.extend_from_slice(read.as_bytes());
        p.wrote(wrote.as_bytes());
        p
    }

    const GREETING: &str = "220-fake ready\r\n220 ESMTP\r\n";
    const EHLO: &str = "250-fake Hello\r\n250-STARTTLS\r\n250 SMTPUTF8\r\n";
    const WROTE: &str = "EHLO relay.test\r\nSTARTTLS\r\n";

    #[test]
    fn nothing_may_follow_the_reply_to_starttls() {
        let clean = plain(&format!("{GREETING}{EHLO}220 2.0.0 go ahead\r\n"), WROTE);
        assert!(clean.starttls_sent);
        assert_eq!(clean.unconsumed(), Some(0));
        // Behind the 220, in the same read.
        let p = plain(
            &format!("{GREETING}{EHLO}220 2.0.0 go ahead\r\n235 2.7.0 ok\r\n"),
            WROTE,
        );
        assert_eq!(p.unconsumed(), Some(14));
        // Even a partial line counts.
        let p = plain(&format!("{GREETING}{EHLO}220 2.0.0 go ahead\r\n2"), WROTE);
        assert_eq!(p.unconsumed(), Some(1));
        // Sent ahead, behind the EHLO reply: lettre buffered the fake 220 and what follows.
        let p = plain(
            &format!("{GREETING}{EHLO}220 fake go ahead\r\n235 ok\r\n"),
            "EHLO relay.test\r\nSTARTTLS\r\n",
        );
        assert_eq!(p.unconsumed(), Some(8));
        // Fewer replies than commands: something is off, refused too.
        let p = plain(&format!("{GREETING}{EHLO}"), WROTE);
        assert_eq!(p.unconsumed(), None);
        let mut p = plain(&format!("{GREETING}{EHLO}220 go\r\n"), WROTE);
        p.overflow = true;
        assert_eq!(p.unconsumed(), None);
    }

    /// A ServerHello record: `version` in the header, `ext` its extensions (if any).
    fn server_hello(cipher: u16, ext: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(32);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&cipher.to_be_bytes());
        body.push(0);
        if let Some(e) = ext {
            body.extend_from_slice(&(e.len() as u16).to_be_bytes());
            body.extend_from_slice(e);
        }
        let mut msg = vec![2, 0, (body.len() >> 8) as u8, body.len() as u8];
        msg.extend_from_slice(&body);
        let mut rec = vec![22, 3, 3, (msg.len() >> 8) as u8, msg.len() as u8];
        rec.extend_from_slice(&msg);
        rec
    }

    #[test]
    fn the_server_hello_names_version_and_cipher() {
        // TLS 1.3: supported_versions (43) says 0x0304; key_share (51) before it is skipped.
        let ext13 = [0, 51, 0, 2, 0, 29, 0, 43, 0, 2, 3, 4];
        let hello = server_hello(0x1302, Some(&ext13));
        let info = parse_server_hello(&hello).unwrap().unwrap();
        assert_eq!(info.version, "TLS 1.3");
        assert_eq!(info.cipher, "TLS13_AES_256_GCM_SHA384");
        // TLS 1.2 without extensions.
        let info = parse_server_hello(&server_hello(0xc02f, None))
            .unwrap()
            .unwrap();
        assert_eq!(info.version, "TLS 1.2");
        assert_eq!(info.cipher, "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256");
        // Not all there yet; not a handshake at all.
        assert_eq!(parse_server_hello(&hello[..20]), Ok(None));
        assert!(parse_server_hello(b"220 hello\r\n").is_err());
    }

    #[test]
    fn starttls_is_recognised_in_any_case_and_split_writes() {
        let mut p = Plain::default();
        p.wrote(b"EHLO x\r\nstart");
        assert!(!p.starttls_sent);
        p.wrote(b"tls\r\n");
        assert!(p.starttls_sent);
        assert_eq!(p.commands, 2);
    }
}
