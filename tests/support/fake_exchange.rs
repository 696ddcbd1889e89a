//! A fake Exchange Online SMTP client-submission server (smtp.office365.com:587 as the relay
//! meets it): STARTTLS with a self-signed certificate, `AUTH XOAUTH2` checked against the
//! tokens of a [`crate::fake_token::FakeToken`], the per-mailbox limit of concurrent
//! connections, SendAs checks at the final dot, and scripted failures ([`Rule`]).
//!
//! Loopback only (127.0.0.1:0). Time is the real clock (`std::time::Instant`): token expiry and
//! `wait_for_received` do not follow tokio's paused clock, and the server has no idle timers.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::fake_token::Issued;

/// The host name in the greeting and EHLO reply.
pub const HOSTNAME: &str = "fake.outlook.office365.com";
/// The advertised and enforced maximum message size (`SIZE 157286400`).
pub const MAX_SIZE: usize = 157_286_400;
/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_LINE: usize = 512;
/// Longest AUTH line / SASL continuation line, CRLF included.
pub const MAX_AUTH_LINE: usize = 16 * 1024;

pub const REPLY_THREAD_LIMIT: &str =
    "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded";
pub const REPLY_AUTH_FAILED: &str =
    "535 5.7.3 Authentication unsuccessful [SN4PR0501CA0000.namprd05.prod.outlook.com]";
pub const REPLY_SEND_AS_DENIED: &str =
    "550 5.7.60 SMTP; Client does not have permissions to send as this sender";
/// Exchange's sender blocks (exchange-online.md), for [`Rule::reply`]: the mailbox is
/// restricted for outbound spam (every message gets it, usually at MAIL FROM or the dot) ...
pub const REPLY_BAD_OUTBOUND_SENDER: &str = "550 5.1.8 Access denied, bad outbound sender";
/// ... the whole tenant is blocked ...
pub const REPLY_TENANT_THRESHOLD: &str = "550 5.7.705 Access denied, tenant has exceeded threshold";
/// ... or the sender's domain is not an accepted domain of the tenant (one domain only).
pub const REPLY_UNREGISTERED_DOMAIN: &str = "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains. For more information please go to https://go.microsoft.com/fwlink/?linkid=2147960";

/// Where a [`Rule`] is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Before the 220 greeting; `when` matches the peer address (`127.0.0.1:PORT`).
    Greeting,
    /// EHLO or HELO; `when` matches the client's host name.
    Ehlo,
    /// AUTH XOAUTH2 after decoding the blob; `when` matches the `user=`.
    Auth,
    /// MAIL FROM; `when` matches the reverse path.
    Mail,
    /// RCPT TO; `when` matches the address. A rejection rejects only that recipient.
    Rcpt,
    /// DATA (before 354); `when` matches the MAIL FROM address.
    Data,
    /// After the whole message was read; `when` matches the (unstuffed) message data.
    Dot,
    /// RSET; `when` matches "".
    Rset,
}

/// A scripted answer. The first rule of the stage whose `when` matches and which has `times`
/// left fires (and `times` is decremented). A 2xx/3xx `reply` counts as success for that stage
/// (e.g. the recipient is accepted); a 4xx/5xx one as a rejection. `drop` closes the connection
/// after the reply (or without one when `reply` is `None`); `hang` never answers (the server
/// keeps reading and discarding until the client closes).
///
/// At [`Stage::Dot`] the message is recorded in `received()` when the rule has no reply (drop:
/// "connection lost after the final dot", or hang), or when its reply is 2xx; not with 4xx/5xx.
#[derive(Clone, Debug)]
pub struct Rule {
    pub stage: Stage,
    pub when: Option<String>,
    pub reply: Option<String>,
    pub times: Option<usize>,
    pub drop: bool,
    pub hang: bool,
}

impl Rule {
    /// A rule that answers `reply` (multi-line with '\n') at `stage`, every time.
    pub fn reply(stage: Stage, reply: &str) -> Rule {
        Rule {
            stage,
            when: None,
            reply: Some(reply.to_string()),
            times: None,
            drop: false,
            hang: false,
        }
    }

    /// A rule that closes the connection at `stage` without a reply.
    pub fn drop_at(stage: Stage) -> Rule {
        Rule {
            stage,
            when: None,
            reply: None,
            times: None,
            drop: true,
            hang: false,
        }
    }

    /// A rule that never answers at `stage`.
    pub fn hang_at(stage: Stage) -> Rule {
        Rule {
            stage,
            when: None,
            reply: None,
            times: None,
            drop: false,
            hang: true,
        }
    }

    /// Only when the stage's argument contains `s` (case-insensitive).
    pub fn when(mut self, s: &str) -> Rule {
        self.when = Some(s.to_string());
        self
    }

    /// Fires at most `n` times.
    pub fn times(mut self, n: usize) -> Rule {
        self.times = Some(n);
        self
    }

    /// Closes the connection after the reply.
    pub fn then_drop(mut self) -> Rule {
        self.drop = true;
        self
    }
}

/// One accepted (stored) message.
#[derive(Clone, Debug)]
pub struct Received {
    pub conn: u64,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// Dot-unstuffed, byte-exact, ending in CRLF (as the client meant it).
    pub data: Vec<u8>,
    pub auth_user: String,
}

/// One `AUTH XOAUTH2` attempt (other mechanisms are not recorded).
#[derive(Clone, Debug)]
pub struct AuthRecord {
    pub conn: u64,
    /// The `user=` of the SASL string ("" when malformed).
    pub user: String,
    /// The initial response came on the AUTH line (not after `334`).
    pub inline: bool,
    pub accepted: bool,
    /// The token was issued but `Instant::now() >= expires_at`.
    pub expired: bool,
    /// The token was never issued by the fake token endpoint.
    pub unknown: bool,
    /// The blob was not valid base64 / not `user=..\x01auth=Bearer ..\x01\x01`.
    pub malformed: bool,
    pub at: Instant,
}

struct Inner {
    rules: Vec<Rule>,
    max_connections: usize,
    max_recipients: usize,
    send_as: Option<Vec<String>>,
    strict_line_length: bool,
    received: Vec<Received>,
    auths: Vec<AuthRecord>,
    open: usize,
    max_concurrent: usize,
    rejected: usize,
    total: usize,
    next_conn: u64,
    count_only: bool,
    messages: usize,
    bytes: u64,
    recipients: usize,
    bare_lf: bool,
    next_id: u64,
    /// Raw bytes sent right behind the `220` to STARTTLS (same write), and how many more
    /// connections get them.
    inject: Option<(Vec<u8>, usize)>,
    /// Connections that got the injection.
    injected_conns: Vec<u64>,
    /// Connections whose TLS handshake failed after the 220 to STARTTLS.
    tls_failed_conns: Vec<u64>,
    /// Sessions that reached a `hang` rule (after flushing every reply before it).
    hung: usize,
    /// `STARTTLS` in the EHLO reply before TLS (default true; the command works either way).
    offer_starttls: bool,
    /// The AUTH line of the EHLO reply after TLS (default `AUTH LOGIN XOAUTH2`).
    auth_offer: String,
}

struct Shared {
    issued: Issued,
    mailbox: String,
    addr: SocketAddr,
    ca_pem: String,
    acceptor: tokio_rustls::TlsAcceptor,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// The first matching rule of `stage` with times left, decremented.
    fn fire(&self, stage: Stage, arg: &[u8]) -> Option<Rule> {
        let mut inner = self.lock();
        let rule = inner.rules.iter_mut().find(|r| {
            r.stage == stage
                && r.times != Some(0)
                && r.when.as_deref().is_none_or(|w| contains_ci(arg, w))
        })?;
        if let Some(t) = &mut rule.times {
            *t -= 1;
        }
        Some(rule.clone())
    }

    fn record(&self, message: Received) {
        let mut inner = self.lock();
        inner.messages += 1;
        inner.bytes += message.data.len() as u64;
        inner.recipients += message.rcpt_to.len();
        if !inner.count_only {
            inner.received.push(message);
        }
    }
}

/// The fake server. Dropping it stops accepting connections (open sessions go on).
pub struct FakeExchange {
    shared: Arc<Shared>,
    accept: tokio::task::AbortHandle,
}

impl Drop for FakeExchange {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeExchange {
    /// Binds 127.0.0.1:0. Tokens are checked against `issued`; `user=` must be `mailbox`.
    pub async fn start(issued: Issued, mailbox: &str) -> FakeExchange {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            HOSTNAME.to_string(),
        ])
        .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let cert = params.self_signed(&key).unwrap();
        let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shared = Arc::new(Shared {
            issued,
            mailbox: mailbox.to_string(),
            addr: listener.local_addr().unwrap(),
            ca_pem: cert.pem(),
            acceptor,
            inner: Mutex::new(Inner {
                rules: Vec::new(),
                max_connections: 3,
                max_recipients: 500,
                send_as: None,
                strict_line_length: false,
                received: Vec::new(),
                auths: Vec::new(),
                open: 0,
                max_concurrent: 0,
                rejected: 0,
                total: 0,
                next_conn: 0,
                count_only: false,
                messages: 0,
                bytes: 0,
                recipients: 0,
                bare_lf: false,
                next_id: 0,
                inject: None,
                injected_conns: Vec::new(),
                tls_failed_conns: Vec::new(),
                hung: 0,
                offer_starttls: true,
                auth_offer: "AUTH LOGIN XOAUTH2".into(),
            }),
        });
        let accept_shared = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                tokio::spawn(connection(accept_shared.clone(), tcp, peer));
            }
        })
        .abort_handle();
        FakeExchange { shared, accept }
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The mailbox (`user=` that authenticates, and the default allowed From).
    pub fn mailbox(&self) -> String {
        self.shared.mailbox.clone()
    }

    /// PEM of the self-signed server certificate (SAN: DNS `localhost`,
    /// `fake.outlook.office365.com`, IP 127.0.0.1). Trust it as the CA.
    pub fn ca_pem(&self) -> String {
        self.shared.ca_pem.clone()
    }

    /// Writes `dir/ca.pem` and returns its path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.ca_pem()).unwrap();
        path
    }

    pub fn add_rule(&self, r: Rule) {
        self.shared.lock().rules.push(r);
    }

    pub fn clear_rules(&self) {
        self.shared.lock().rules.clear();
    }

    /// Concurrent connections allowed (default 3); one more is greeted with
    /// `432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded` and closed.
    pub fn set_max_connections(&self, n: usize) {
        self.shared.lock().max_connections = n;
    }

    /// Recipients per message (default 500); more get `452 4.5.3 Too many recipients`.
    pub fn set_max_recipients(&self, n: usize) {
        self.shared.lock().max_recipients = n;
    }

    /// `Some(list)`: at the final dot, a header From that is neither the mailbox nor in the
    /// list gets `550 5.7.60 ...` and the message is not stored. `None` (default): no check.
    pub fn set_send_as(&self, allowed: Option<Vec<String>>) {
        self.shared.lock().send_as = allowed;
    }

    /// `true`: an inline `AUTH XOAUTH2 <blob>` line over 512 octets gets
    /// `500 5.5.2 Line too long` (like Dovecot). Default `false`: accepted, like Exchange.
    pub fn set_strict_line_length(&self, on: bool) {
        self.shared.lock().strict_line_length = on;
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().received.clone()
    }

    /// Messages stored (also counted in count-only mode).
    pub fn received_count(&self) -> usize {
        self.shared.lock().messages
    }

    pub fn auths(&self) -> Vec<AuthRecord> {
        self.shared.lock().auths.clone()
    }

    /// High-water mark of concurrently open (admitted) connections.
    pub fn max_concurrent(&self) -> usize {
        self.shared.lock().max_concurrent
    }

    /// Admitted connections open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.lock().open
    }

    /// Connections refused with 432 (not counted in `max_concurrent`).
    pub fn rejected_connections(&self) -> usize {
        self.shared.lock().rejected
    }

    /// Every TCP connection accepted, including the rejected ones.
    pub fn connections_total(&self) -> usize {
        self.shared.lock().total
    }

    /// A bare LF (not preceded by CR) was seen in some message data.
    pub fn bare_lf_seen(&self) -> bool {
        self.shared.lock().bare_lf
    }

    /// Resolves to `true` once `received_count() >= n`, `false` after `timeout` (real time).
    pub fn wait_for_received(
        &self,
        n: usize,
        timeout: Duration,
    ) -> impl Future<Output = bool> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            let deadline = Instant::now() + timeout;
            loop {
                if shared.lock().messages >= n {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// A man in the middle: on the next `times` connections, `raw` (replies with their
    /// CRLFs, e.g. `"250 ok\r\n235 2.7.0 Authentication successful\r\n"`) is sent right
    /// after the `220` to STARTTLS, in the same write, before the TLS handshake. A client
    /// that reads them as replies after the upgrade has been fooled.
    pub fn inject_after_starttls(&self, raw: &str, times: usize) {
        self.shared.lock().inject = Some((raw.as_bytes().to_vec(), times));
    }

    /// Connections (ids as in [`Received::conn`]) that got an injection.
    pub fn injected_connections(&self) -> Vec<u64> {
        self.shared.lock().injected_conns.clone()
    }

    /// Connections whose TLS handshake failed after the `220` to STARTTLS (the client
    /// closed, or did not trust us).
    pub fn tls_failed_connections(&self) -> Vec<u64> {
        self.shared.lock().tls_failed_conns.clone()
    }

    /// Sessions that reached a `hang` rule. Counted after everything sent before the hang
    /// was flushed: from then on that session sends nothing.
    pub fn hung_connections(&self) -> usize {
        self.shared.lock().hung
    }

    /// `false`: the EHLO reply before TLS does not list STARTTLS (a server that is not
    /// Exchange, or a firewall stripping it).
    pub fn set_offer_starttls(&self, on: bool) {
        self.shared.lock().offer_starttls = on;
    }

    /// The AUTH line of the EHLO reply after TLS, e.g. `"AUTH LOGIN"` (no XOAUTH2).
    pub fn set_auth_offer(&self, line: &str) {
        self.shared.lock().auth_offer = line.to_string();
    }

    /// Benchmarks: keep only counts and byte totals, not the messages.
    pub fn set_count_only(&self, on: bool) {
        self.shared.lock().count_only = on;
    }

    /// (messages, bytes of data, recipients) stored so far.
    pub fn counts(&self) -> (usize, u64, usize) {
        let inner = self.shared.lock();
        (inner.messages, inner.bytes, inner.recipients)
    }
}

/// Case-insensitive (ASCII) substring test.
fn contains_ci(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Formats a (possibly multi-line) reply: `NNN-` on all lines but the last; lines without a
/// code get the first line's code.
fn format_reply(text: &str) -> String {
    let lines: Vec<&str> = text
        .trim_end_matches(['\r', '\n'])
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    let code = text.get(..3).unwrap_or("250").to_string();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        let b = line.as_bytes();
        let has_code = b.len() >= 3
            && b[..3].iter().all(u8::is_ascii_digit)
            && (b.len() == 3 || b[3] == b' ' || b[3] == b'-');
        if has_code {
            out.push_str(&line[..3]);
            out.push(sep);
            out.push_str(line.get(4..).unwrap_or(""));
        } else {
            out.push_str(&code);
            out.push(sep);
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

fn positive(reply: &str) -> bool {
    reply.starts_with('2') || reply.starts_with('3')
}

/// The address of the first `From:` header of `data` (case-insensitive, folded lines joined).
fn header_from(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let mut value: Option<String> = None;
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        if let Some(v) = &mut value {
            if line.starts_with([' ', '\t']) {
                v.push_str(line);
                continue;
            }
            break;
        }
        if line.len() >= 5 && line[..5].eq_ignore_ascii_case("from:") {
            value = Some(line[5..].to_string());
        }
    }
    let value = value?;
    if let (Some(start), Some(end)) = (value.find('<'), value.rfind('>'))
        && start < end
    {
        return Some(value[start + 1..end].trim().to_string());
    }
    value
        .split(|c: char| c.is_whitespace() || c == ',')
        .find(|w| w.contains('@'))
        .map(|w| w.trim_matches(['"', '(', ')']).to_string())
}

/// The address inside `FROM:<...>` / `TO:<...>` and the rest (parameters).
fn path_arg<'a>(arg: &'a str, keyword: &str) -> Option<(String, &'a str)> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some((rest[..end].to_string(), rest[end + 1..].trim()))
}

/// Plain TCP or TLS, so that one `BufReader` type serves both phases.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Only while switching to TLS.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream taken for TLS")
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
}

/// Decrements the open-connection count when the session ends.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.lock().open -= 1;
    }
}

/// Sends FIN, then reads and discards what the client still sends (briefly), so that a reply
/// written just before closing is not destroyed by a TCP reset.
async fn close_gracefully<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

async fn connection(shared: Arc<Shared>, mut tcp: TcpStream, peer: SocketAddr) {
    let admitted = {
        let mut inner = shared.lock();
        inner.total += 1;
        if inner.open >= inner.max_connections {
            inner.rejected += 1;
            None
        } else {
            inner.open += 1;
            inner.max_concurrent = inner.max_concurrent.max(inner.open);
            inner.next_conn += 1;
            Some(inner.next_conn)
        }
    };
    let Some(conn) = admitted else {
        let _ = tcp
            .write_all(format!("{REPLY_THREAD_LIMIT}\r\n").as_bytes())
            .await;
        close_gracefully(tcp).await;
        return;
    };
    let guard = OpenGuard(shared.clone());
    let mut session = Session {
        shared,
        conn,
        peer,
        reader: BufReader::with_capacity(64 * 1024, Conn::Plain(tcp)),
        out: Vec::new(),
        tls: false,
        helo: false,
        auth_user: None,
        mail_from: None,
        rcpts: Vec::new(),
    };
    match session.run().await {
        Ok(End::Hang) => {
            // Never answer; keep reading until the client gives up. Still counts as open.
            let _ = session.flush().await;
            session.shared.lock().hung += 1;
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut session.reader, &mut sink).await;
            drop(guard);
        }
        Ok(End::Close) => {
            // The slot is free before the last reply (221 after QUIT) goes out, so a client
            // that reconnects at once after it is never refused because of this session.
            drop(guard);
            let _ = session.flush().await;
            close_gracefully(session.reader.into_inner()).await;
        }
        Err(_) => drop(guard),
    }
}

enum End {
    Close,
    Hang,
}

enum Line {
    Eof,
    TooLong,
    /// Without the line ending.
    Text(Vec<u8>),
}

struct Session {
    shared: Arc<Shared>,
    conn: u64,
    peer: SocketAddr,
    reader: BufReader<Conn>,
    out: Vec<u8>,
    tls: bool,
    helo: bool,
    auth_user: Option<String>,
    mail_from: Option<String>,
    rcpts: Vec<String>,
}

/// What a fired rule asks for, after its reply (if any) was queued.
enum Act {
    /// No rule fired: do the default.
    Default,
    /// The rule replied positively: do the default action but do not send the default reply.
    Accepted,
    /// The rule replied negatively: the command failed.
    Rejected,
    /// Close (after the reply, if any).
    Close,
    Hang,
}

impl Session {
    fn reply(&mut self, text: &str) {
        self.out.extend_from_slice(format_reply(text).as_bytes());
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let w = self.reader.get_mut();
            w.write_all(&out).await?;
            w.flush().await?;
        }
        Ok(())
    }

    /// Applies the rule of `stage` for `arg`, if one fires.
    fn rule(&mut self, stage: Stage, arg: &[u8]) -> Act {
        let Some(rule) = self.shared.fire(stage, arg) else {
            return Act::Default;
        };
        if rule.hang {
            return Act::Hang;
        }
        match &rule.reply {
            Some(text) => {
                self.reply(text);
                if rule.drop {
                    Act::Close
                } else if positive(text) {
                    Act::Accepted
                } else {
                    Act::Rejected
                }
            }
            None if rule.drop => Act::Close,
            None => Act::Default,
        }
    }

    /// Reads one line (up to `limit` octets with its CRLF), flushing pending replies first
    /// when the client has nothing buffered (PIPELINING: one flush per command group).
    async fn read_line(&mut self, limit: usize) -> io::Result<Line> {
        let mut line = Vec::new();
        let mut too_long = false;
        loop {
            if self.reader.buffer().is_empty() {
                self.flush().await?;
            }
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                return Ok(Line::Eof);
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    if !too_long {
                        line.extend_from_slice(&buf[..=pos]);
                    }
                    self.reader.consume(pos + 1);
                    break;
                }
                None => {
                    let n = buf.len();
                    if !too_long {
                        line.extend_from_slice(buf);
                        if line.len() > limit {
                            too_long = true;
                            line = Vec::new();
                        }
                    }
                    self.reader.consume(n);
                }
            }
        }
        if too_long || line.len() > limit {
            return Ok(Line::TooLong);
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(Line::Text(line))
    }

    fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.rcpts.clear();
    }

    async fn run(&mut self) -> io::Result<End> {
        let peer = self.peer.to_string();
        match self.rule(Stage::Greeting, peer.as_bytes()) {
            Act::Hang => return Ok(End::Hang),
            Act::Close => return Ok(End::Close),
            Act::Accepted | Act::Rejected => {}
            Act::Default => {
                let date = httpdate::fmt_http_date(std::time::SystemTime::now());
                self.reply(&format!(
                    "220 {HOSTNAME} Microsoft ESMTP MAIL Service ready at {date}"
                ));
            }
        }
        loop {
            let line = match self.read_line(MAX_AUTH_LINE).await? {
                Line::Eof => return Ok(End::Close),
                Line::TooLong => {
                    self.reply("500 5.5.2 Line too long");
                    continue;
                }
                Line::Text(line) => line,
            };
            let text = String::from_utf8_lossy(&line).into_owned();
            let (verb, arg) = match text.split_once(' ') {
                Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
                None => (text.trim().to_ascii_uppercase(), String::new()),
            };
            let strict = self.shared.lock().strict_line_length;
            if line.len() + 2 > MAX_LINE && (verb != "AUTH" || strict) {
                self.reply("500 5.5.2 Line too long");
                continue;
            }
            let end = match verb.as_str() {
                "EHLO" | "HELO" => self.ehlo(&verb, &arg),
                "STARTTLS" => self.starttls().await?,
                "AUTH" => self.auth(&arg).await?,
                "MAIL" => self.mail(&arg),
                "RCPT" => self.rcpt(&arg),
                "DATA" => self.data().await?,
                "RSET" => {
                    match self.rule(Stage::Rset, b"") {
                        Act::Hang => return Ok(End::Hang),
                        Act::Close => return Ok(End::Close),
                        Act::Rejected => {}
                        Act::Accepted => self.reset_transaction(),
                        Act::Default => {
                            self.reset_transaction();
                            self.reply("250 2.0.0 Resetting");
                        }
                    }
                    None
                }
                "NOOP" => {
                    self.reply("250 2.0.0 OK");
                    None
                }
                "QUIT" => {
                    self.reply("221 2.0.0 Service closing transmission channel");
                    Some(End::Close)
                }
                "VRFY" => {
                    self.reply("252 2.1.5 Cannot VRFY user");
                    None
                }
                "HELP" => {
                    self.reply("214-This server supports the following commands:\n214 HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH");
                    None
                }
                _ => {
                    let shown: String = verb.chars().take(32).collect();
                    self.reply(&format!("500 5.3.3 Unrecognized command '{shown}'"));
                    None
                }
            };
            if let Some(end) = end {
                return Ok(end);
            }
        }
    }

    fn act_end(act: &Act) -> Option<End> {
        match act {
            Act::Hang => Some(End::Hang),
            Act::Close => Some(End::Close),
            _ => None,
        }
    }

    fn ehlo(&mut self, verb: &str, arg: &str) -> Option<End> {
        if arg.is_empty() {
            self.reply("501 5.5.4 Invalid domain name");
            return None;
        }
        let act = self.rule(Stage::Ehlo, arg.as_bytes());
        if let Some(end) = Self::act_end(&act) {
            return Some(end);
        }
        match act {
            Act::Rejected => return None,
            Act::Accepted => {}
            _ => {
                let hello = format!("{HOSTNAME} Hello [{}]", self.peer.ip());
                if verb == "HELO" {
                    self.reply(&format!("250 {hello}"));
                } else {
                    let mut lines = vec![
                        format!("250-{hello}"),
                        "250-SIZE 157286400".into(),
                        "250-PIPELINING".into(),
                        "250-DSN".into(),
                        "250-ENHANCEDSTATUSCODES".into(),
                    ];
                    let (starttls, auth) = {
                        let inner = self.shared.lock();
                        (inner.offer_starttls, inner.auth_offer.clone())
                    };
                    if self.tls {
                        lines.push(format!("250-{auth}"));
                    } else if starttls {
                        lines.push("250-STARTTLS".into());
                    }
                    lines.extend([
                        "250-8BITMIME".into(),
                        "250-BINARYMIME".into(),
                        "250-CHUNKING".into(),
                        "250 SMTPUTF8".into(),
                    ]);
                    self.reply(&lines.join("\n"));
                }
            }
        }
        self.helo = true;
        self.reset_transaction();
        None
    }

    async fn starttls(&mut self) -> io::Result<Option<End>> {
        if self.tls {
            self.reply("503 5.5.1 TLS already active");
            return Ok(None);
        }
        if !self.helo {
            self.reply("503 5.5.2 Send hello first");
            return Ok(None);
        }
        self.reply("220 2.0.0 SMTP server ready");
        {
            let mut inner = self.shared.lock();
            if let Some((raw, left)) = &mut inner.inject
                && *left > 0
            {
                *left -= 1;
                self.out.extend_from_slice(raw);
                inner.injected_conns.push(self.conn);
            }
        }
        self.flush().await?;
        // Anything the client pipelined after STARTTLS is discarded (RFC 3207 §4.2): it stays
        // in the old buffer.
        let old = std::mem::replace(&mut self.reader, BufReader::new(Conn::Gone));
        let Conn::Plain(tcp) = old.into_inner() else {
            return Err(io::Error::other("STARTTLS on a non-plain stream"));
        };
        // A failed handshake (TLS < 1.2, a client that does not trust us) ends the session.
        let tls = match self.shared.acceptor.accept(tcp).await {
            Ok(tls) => tls,
            Err(e) => {
                self.shared.lock().tls_failed_conns.push(self.conn);
                return Err(e);
            }
        };
        self.reader = BufReader::with_capacity(64 * 1024, Conn::Tls(Box::new(tls)));
        self.tls = true;
        self.helo = false;
        self.auth_user = None;
        self.reset_transaction();
        Ok(None)
    }

    async fn auth(&mut self, arg: &str) -> io::Result<Option<End>> {
        let mut words = arg.split_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        if !self.tls {
            self.reply("504 5.7.4 Unrecognized authentication type");
            return Ok(None);
        }
        if !self.helo {
            self.reply("503 5.5.2 Send hello first");
            return Ok(None);
        }
        if self.auth_user.is_some() {
            self.reply("503 5.5.1 Already authenticated");
            return Ok(None);
        }
        if self.mail_from.is_some() {
            self.reply("503 5.5.1 Bad sequence of commands");
            return Ok(None);
        }
        match mechanism.as_str() {
            "XOAUTH2" => {}
            "LOGIN" => {
                // Basic authentication: go through the prompts, then refuse.
                if initial.is_none() {
                    self.reply("334 VXNlcm5hbWU6");
                    if !matches!(self.read_line(MAX_AUTH_LINE).await?, Line::Text(_)) {
                        return Ok(Some(End::Close));
                    }
                }
                self.reply("334 UGFzc3dvcmQ6");
                if !matches!(self.read_line(MAX_AUTH_LINE).await?, Line::Text(_)) {
                    return Ok(Some(End::Close));
                }
                self.reply(
                    "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. \
                     [SN4PR0501CA0000.namprd05.prod.outlook.com]",
                );
                return Ok(None);
            }
            "" => {
                self.reply("501 5.5.4 Invalid arguments");
                return Ok(None);
            }
            _ => {
                self.reply("504 5.7.4 Unrecognized authentication type");
                return Ok(None);
            }
        }
        let inline = initial.is_some();
        let blob = match initial {
            Some(b) if b == "=" => String::new(),
            Some(b) => b,
            None => {
                self.reply("334 ");
                match self.read_line(MAX_AUTH_LINE).await? {
                    Line::Eof => return Ok(Some(End::Close)),
                    Line::TooLong => {
                        self.reply("500 5.5.2 Line too long");
                        return Ok(None);
                    }
                    Line::Text(t) => String::from_utf8_lossy(&t).trim().to_string(),
                }
            }
        };
        if blob == "*" {
            self.reply("501 5.0.0 Authentication cancelled");
            return Ok(None);
        }
        let parsed = STANDARD
            .decode(blob.as_bytes())
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|s| parse_xoauth2(&s));
        let (user, token) = parsed.clone().unwrap_or_default();
        let (unknown, expired) = if parsed.is_some() {
            match self.shared.issued.get(&token) {
                None => (true, false),
                Some(t) => (false, Instant::now() >= t.expires_at),
            }
        } else {
            (false, false)
        };
        let act = self.rule(Stage::Auth, user.as_bytes());
        let accepted = match act {
            Act::Hang | Act::Close => false,
            Act::Accepted => true,
            Act::Rejected => false,
            Act::Default => {
                if parsed.is_none() {
                    self.reply("501 5.5.124 Invalid XOAUTH2 auth data");
                    false
                } else if unknown || expired || !user.eq_ignore_ascii_case(&self.shared.mailbox) {
                    self.reply(REPLY_AUTH_FAILED);
                    false
                } else {
                    self.reply("235 2.7.0 Authentication successful");
                    true
                }
            }
        };
        self.shared.lock().auths.push(AuthRecord {
            conn: self.conn,
            user: user.clone(),
            inline,
            accepted,
            expired,
            unknown,
            malformed: parsed.is_none(),
            at: Instant::now(),
        });
        if accepted {
            self.auth_user = Some(user);
        }
        Ok(Self::act_end(&act))
    }

    /// Checks common to MAIL, RCPT and DATA; queues the error reply and returns false.
    fn ready_for_mail(&mut self) -> bool {
        if !self.tls {
            self.reply("530 5.7.0 Must issue a STARTTLS command first");
            false
        } else if !self.helo {
            self.reply("503 5.5.2 Send hello first");
            false
        } else if self.auth_user.is_none() {
            self.reply("530 5.7.57 Client not authenticated to send mail");
            false
        } else {
            true
        }
    }

    fn mail(&mut self, arg: &str) -> Option<End> {
        if !self.ready_for_mail() {
            return None;
        }
        if self.mail_from.is_some() {
            self.reply("503 5.5.1 Sender already specified");
            return None;
        }
        let Some((from, params)) = path_arg(arg, "FROM:") else {
            self.reply("501 5.5.4 Invalid arguments");
            return None;
        };
        let size = params
            .split_whitespace()
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.eq_ignore_ascii_case("SIZE"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        if size.is_some_and(|s| s > MAX_SIZE) {
            self.reply("552 5.3.4 Message size exceeds fixed maximum message size");
            return None;
        }
        let act = self.rule(Stage::Mail, from.as_bytes());
        if let Some(end) = Self::act_end(&act) {
            return Some(end);
        }
        match act {
            Act::Rejected => {}
            Act::Accepted => self.mail_from = Some(from),
            _ => {
                self.mail_from = Some(from);
                self.reply("250 2.1.0 Sender OK");
            }
        }
        None
    }

    fn rcpt(&mut self, arg: &str) -> Option<End> {
        if !self.ready_for_mail() {
            return None;
        }
        if self.mail_from.is_none() {
            self.reply("503 5.5.1 Bad sequence of commands");
            return None;
        }
        let Some((to, _params)) = path_arg(arg, "TO:") else {
            self.reply("501 5.5.4 Invalid arguments");
            return None;
        };
        if self.rcpts.len() >= self.shared.lock().max_recipients {
            self.reply("452 4.5.3 Too many recipients");
            return None;
        }
        let act = self.rule(Stage::Rcpt, to.as_bytes());
        if let Some(end) = Self::act_end(&act) {
            return Some(end);
        }
        match act {
            Act::Rejected => {}
            Act::Accepted => self.rcpts.push(to),
            _ => {
                self.rcpts.push(to);
                self.reply("250 2.1.5 Recipient OK");
            }
        }
        None
    }

    async fn data(&mut self) -> io::Result<Option<End>> {
        if !self.ready_for_mail() {
            return Ok(None);
        }
        let Some(from) = self.mail_from.clone() else {
            self.reply("503 5.5.1 Bad sequence of commands");
            return Ok(None);
        };
        if self.rcpts.is_empty() {
            self.reply("554 5.5.1 No valid recipients");
            return Ok(None);
        }
        let act = self.rule(Stage::Data, from.as_bytes());
        if let Some(end) = Self::act_end(&act) {
            return Ok(Some(end));
        }
        match act {
            Act::Rejected => return Ok(None),
            Act::Accepted => {}
            _ => self.reply("354 Start mail input; end with <CRLF>.<CRLF>"),
        }
        // Read the message: lines up to CRLF.CRLF, dot-unstuffed, bytes kept exactly.
        let mut data = Vec::new();
        let mut line = Vec::new();
        let mut prev_crlf = true;
        let mut bare_lf = false;
        loop {
            line.clear();
            if self.reader.buffer().is_empty() {
                self.flush().await?;
            }
            if self.reader.read_until(b'\n', &mut line).await? == 0 || line.last() != Some(&b'\n') {
                // Connection lost before the final dot: nothing stored.
                return Ok(Some(End::Close));
            }
            if prev_crlf && line == b".\r\n" {
                break;
            }
            let crlf = line.ends_with(b"\r\n");
            if !crlf {
                bare_lf = true;
            }
            prev_crlf = crlf;
            let content = if line.first() == Some(&b'.') {
                &line[1..]
            } else {
                &line[..]
            };
            if data.len() <= MAX_SIZE {
                data.extend_from_slice(content);
            }
        }
        if bare_lf {
            self.shared.lock().bare_lf = true;
        }
        let message = Received {
            conn: self.conn,
            mail_from: from,
            rcpt_to: std::mem::take(&mut self.rcpts),
            data,
            auth_user: self.auth_user.clone().unwrap_or_default(),
        };
        self.reset_transaction();

        if let Some(rule) = self.shared.fire(Stage::Dot, &message.data) {
            if rule.hang {
                self.shared.record(message);
                return Ok(Some(End::Hang));
            }
            match &rule.reply {
                Some(text) => {
                    if positive(text) {
                        self.shared.record(message);
                    }
                    self.reply(text);
                }
                None if rule.drop => self.shared.record(message),
                None => self.accept_message(message),
            }
            return Ok(rule.drop.then_some(End::Close));
        }
        self.accept_message(message);
        Ok(None)
    }

    /// Default handling at the final dot: size and SendAs checks, then store.
    fn accept_message(&mut self, message: Received) {
        if message.data.len() > MAX_SIZE {
            self.reply("552 5.3.4 Message size exceeds fixed maximum message size");
            return;
        }
        let send_as = self.shared.lock().send_as.clone();
        if let Some(allowed) = send_as {
            let from = header_from(&message.data).unwrap_or_default();
            let ok = from.eq_ignore_ascii_case(&self.shared.mailbox)
                || allowed.iter().any(|a| a.eq_ignore_ascii_case(&from));
            if !ok {
                self.reply(REPLY_SEND_AS_DENIED);
                return;
            }
        }
        let id = {
            let mut inner = self.shared.lock();
            inner.next_id += 1;
            inner.next_id
        };
        self.shared.record(message);
        self.reply(&format!(
            "250 2.0.0 OK <{:08x}.{id}@fake> [Hostname=FAKE0000]",
            self.conn
        ));
    }
}

/// `user=<u>\x01auth=Bearer <token>\x01\x01` -> (user, token).
fn parse_xoauth2(s: &str) -> Option<(String, String)> {
    let body = s.strip_suffix("\x01\x01")?;
    let (user_part, auth_part) = body.split_once('\x01')?;
    let user = user_part.strip_prefix("user=")?;
    let auth = auth_part.strip_prefix("auth=")?;
    let (scheme, token) = auth.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("Bearer") || user.is_empty() || token.is_empty() {
        return None;
    }
    if token.contains(['\x01', ' ']) {
        return None;
    }
    Some((user.to_string(), token.to_string()))
}
