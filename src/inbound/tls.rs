//! LAN-side TLS with OpenSSL (built from source, the `vendored` feature): one server context
//! per `tls_profile` from `tls.cert_file`/`tls.key_file`, or from a self-signed certificate
//! generated once into `state_dir`. OpenSSL, not rustls, because old devices need TLS 1.0/1.1,
//! CBC suites, DHE and RSA key exchange (docs/tls.md); the upstream stays on rustls. Reads key
//! material from disk and never logs it (the certificate's SHA-256 fingerprint is public and
//! is logged for pinning). Parses the untrusted ClientHello of a failed handshake to log why.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use openssl::dh::Dh;
use openssl::pkey::{Id, PKey, Private};
use openssl::ssl::{
    HandshakeError, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslVersion,
};
use openssl::x509::X509;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::{Config, KeyType, TlsProfile};

/// The stream a session runs over once TLS is up.
pub type TlsStream<S> = tokio_openssl::SslStream<Recorder<S>>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert_file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("tls.key_file {path}: {reason} (PEM with a PKCS#8, PKCS#1 or SEC1 private key)")]
    Key { path: PathBuf, reason: String },
    #[error("certificate and key do not belong together, or the key type is not supported: {0}")]
    Config(String),
    #[error("cannot create the self-signed certificate in {path}: {reason}")]
    SelfSigned { path: PathBuf, reason: String },
}

/// TLS 1.2 suites of `modern`: ECDHE key exchange with an AEAD cipher only.
const MODERN_SUITES: &str = "ECDHE+AESGCM:ECDHE+CHACHA20";
/// TLS 1.2 (and, for `legacy`, 1.0/1.1) suites of `compatible` and `legacy`, best first (the
/// server's order wins): forward-secret AEAD, then CBC with ECDHE or DHE, then RSA key exchange
/// (AES-GCM and AES-CBC, SHA-1/SHA-256 MACs). The exclusions are spelt out so that no RC4,
/// 3DES, export, NULL or anonymous suite can come in, whatever OpenSSL's defaults are.
const COMPATIBLE_SUITES: &str = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:\
     ECDHE+AES+SHA256:ECDHE+AES+SHA1:DHE+AES+SHA256:DHE+AES+SHA1:\
     kRSA+AESGCM:kRSA+AES+SHA256:kRSA+AES+SHA1:\
     !aNULL:!eNULL:!EXPORT:!DES:!3DES:!RC4:!MD5:!PSK:!SRP:!DSS:!CAMELLIA:!ARIA:!SEED:!IDEA:!CCM";
/// TLS 1.3 suites, every profile (all AEAD, all forward-secret).
const TLS13_SUITES: &str =
    "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256";

/// RFC 7919 §A.1 ffdhe2048, for the DHE suites of `compatible` and `legacy` (a named group
/// rather than parameters of our own; OpenSSL recognises it).
const FFDHE2048: &[u8] = b"-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// The server contexts of all three profiles, over one certificate. All three are kept even
/// when listeners use one, so a failed handshake can say which profile would have accepted it.
pub struct Acceptors {
    contexts: Vec<(TlsProfile, SslContext)>,
    /// The certificate's key is ECDSA (clients with RSA suites only cannot use it).
    ecdsa: bool,
}

/// The TLS side of one listener: its profile's context.
#[derive(Clone)]
pub struct Acceptor {
    all: Arc<Acceptors>,
    profile: TlsProfile,
}

/// Builds the contexts for listeners that speak TLS. Blocking (file I/O, key generation).
pub fn acceptor(config: &Config) -> Result<Arc<Acceptors>, TlsError> {
    let generated = config.tls.cert_file.is_none() || config.tls.key_file.is_none();
    let (cert_path, key_path) = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => self_signed(&config.state_dir, &config.hostname, config.tls.key_type)?,
    };
    let cert_err = |reason: String| TlsError::Cert {
        path: cert_path.clone(),
        reason,
    };
    let pem = std::fs::read(&cert_path).map_err(|e| cert_err(e.to_string()))?;
    let chain = X509::stack_from_pem(&pem).map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err(
            "no certificate found (expected PEM \"BEGIN CERTIFICATE\")".into(),
        ));
    }
    let key = load_key(&key_path)?;
    let der = chain[0].to_der().map_err(|e| cert_err(e.to_string()))?;
    tracing::info!(
        cert = %cert_path.display(),
        sha256 = %fingerprint(&der),
        "TLS certificate loaded"
    );
    let ecdsa = key.id() == Id::EC;
    if generated && (config.tls.key_type == KeyType::Ecdsa) != ecdsa {
        // Replacing it would break devices that pinned its fingerprint: the admin decides.
        let (has, wants) = if ecdsa {
            ("ECDSA", "rsa")
        } else {
            ("RSA", "ecdsa")
        };
        tracing::warn!(
            cert = %cert_path.display(),
            key = %key_path.display(),
            "the generated certificate has an {has} key, made earlier; it is kept so pinned fingerprints stay valid. {} To replace it with tls.key_type: {wants}, stop mailbridge, delete both files and start it again (then pin the new fingerprint)",
            if ecdsa {
                "Devices without ECDSA (many printers, Windows Server 2008 R2) cannot connect with it."
            } else {
                ""
            }
        );
    }
    let mut contexts = Vec::new();
    for profile in TlsProfile::ALL {
        contexts.push((profile, context(&chain, &key, profile)?));
    }
    Ok(Arc::new(Acceptors { contexts, ecdsa }))
}

/// A private key is a secret: refuse one that group or others may read (C36). OpenSSL reads
/// PKCS#8, PKCS#1 (`BEGIN RSA PRIVATE KEY`) and SEC1 (`BEGIN EC PRIVATE KEY`).
fn load_key(path: &Path) -> Result<PKey<Private>, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |reason: String| TlsError::Key {
        path: path.to_path_buf(),
        reason,
    };
    let mode = std::fs::metadata(path)
        .map_err(|e| err(e.to_string()))?
        .permissions()
        .mode();
    // Group read is fine in systemd's credentials directory (LoadCredential=, mode 0440).
    let creds = crate::config::credentials::dir_from_env();
    if !crate::config::credentials::mode_allowed(path, mode, creds.as_deref()) {
        return Err(err(format!(
            "readable by group or others (mode {:o}); run: chmod 600 {}",
            mode & 0o777,
            path.display()
        )));
    }
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    // OpenSSL's own error text would be about PEM routines; say what is missing instead.
    PKey::private_key_from_pem(&pem).map_err(|_| err("no private key found".into()))
}

fn context(
    chain: &[X509],
    key: &PKey<Private>,
    profile: TlsProfile,
) -> Result<SslContext, TlsError> {
    let cfg = |e: openssl::error::ErrorStack| TlsError::Config(e.to_string());
    let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(cfg)?;
    let (min, suites) = match profile {
        TlsProfile::Modern => (SslVersion::TLS1_2, MODERN_SUITES.to_string()),
        TlsProfile::Compatible => (SslVersion::TLS1_2, COMPATIBLE_SUITES.to_string()),
        // OpenSSL 3 refuses TLS 1.0/1.1 (their MD5+SHA-1 signatures) above security level 0.
        TlsProfile::Legacy => (SslVersion::TLS1, format!("{COMPATIBLE_SUITES}:@SECLEVEL=0")),
    };
    b.set_min_proto_version(Some(min)).map_err(cfg)?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))
        .map_err(cfg)?;
    if profile != TlsProfile::Legacy {
        // Set, not inherited from whatever openssl.cnf the machine has.
        b.set_security_level(1);
    }
    b.set_cipher_list(&suites).map_err(cfg)?;
    b.set_ciphersuites(TLS13_SUITES).map_err(cfg)?;
    let dh = Dh::params_from_pem(FFDHE2048).map_err(cfg)?;
    b.set_tmp_dh(&dh).map_err(cfg)?;
    // The server's order wins (the best suite both sides know); no TLS compression (CRIME),
    // no renegotiation (a client could make us do handshakes for free).
    b.set_options(
        SslOptions::CIPHER_SERVER_PREFERENCE
            | SslOptions::NO_COMPRESSION
            | SslOptions::NO_RENEGOTIATION,
    );
    b.set_certificate(&chain[0]).map_err(cfg)?;
    for c in &chain[1..] {
        b.add_extra_chain_cert(c.clone()).map_err(cfg)?;
    }
    b.set_private_key(key).map_err(cfg)?;
    b.check_private_key().map_err(cfg)?;
    Ok(b.build())
}

impl Acceptors {
    /// The acceptor of a listener with this profile.
    pub fn for_profile(self: &Arc<Self>, profile: TlsProfile) -> Acceptor {
        Acceptor {
            all: self.clone(),
            profile,
        }
    }

    fn context(&self, profile: TlsProfile) -> &SslContext {
        &self
            .contexts
            .iter()
            .find(|(p, _)| *p == profile)
            .expect("a context for every profile")
            .1
    }
}

impl Acceptor {
    pub fn profile(&self) -> TlsProfile {
        self.profile
    }

    /// Runs the server side of the handshake. A failure is logged with what the client offered
    /// and which profile would have accepted it, and gives `None`.
    pub async fn accept<S>(&self, stream: S, client: IpAddr) -> Option<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let setup = Ssl::new(self.all.context(self.profile))
            .and_then(|ssl| tokio_openssl::SslStream::new(ssl, Recorder::new(stream)));
        let mut tls = match setup {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(client = %client, error = %e, "cannot set up TLS for a connection");
                return None;
            }
        };
        match Pin::new(&mut tls).accept().await {
            Ok(()) => {
                tls.get_mut().stop();
                tracing::debug!(
                    client = %client,
                    version = tls.ssl().version_str(),
                    cipher = tls.ssl().current_cipher().map(|c| c.name()).unwrap_or("?"),
                    "TLS established"
                );
                Some(tls)
            }
            Err(e) => {
                let why = self.explain(tls.get_ref().seen());
                tracing::info!(client = %client, profile = self.profile.name(), error = %e, "TLS handshake failed: {why}");
                None
            }
        }
    }

    /// One sentence on a failed handshake's ClientHello: what the client offered, and which
    /// profile (if any) would have accepted it.
    pub fn explain(&self, seen: &[u8]) -> String {
        let hello = match parse_client_hello(seen) {
            Hello::Complete(h) => h,
            Hello::Empty => {
                return "the client closed the connection without sending a TLS ClientHello".into();
            }
            Hello::Partial => {
                return "the client's ClientHello was cut short".into();
            }
            Hello::NotTls => {
                return "the client did not send a TLS ClientHello (plain SMTP on a TLS port? use a listener with tls: starttls, or tls: none)".into();
            }
        };
        let offered = format!(
            "client offered {} with {}{}",
            hello.versions_text(),
            self.suite_names(&hello.suites),
            if hello.sha1_signatures_only() {
                " and SHA-1 signatures only"
            } else {
                ""
            }
        );
        let accepting: Vec<TlsProfile> = TlsProfile::ALL
            .into_iter()
            .filter(|p| replay_accepts(self.all.context(*p), &seen[..hello.end]))
            .collect();
        let own = self.profile.name();
        if accepting.contains(&self.profile) {
            return format!(
                "{offered}; profile {own} accepts that, so the handshake failed after it: the client most likely does not trust the certificate (give it tls.cert_file from a CA it trusts, or import/pin the certificate) or gave up"
            );
        }
        match accepting.first() {
            Some(p) => format!(
                "{offered}; profile {own} refuses it; tls_profile: {} would accept it",
                p.name()
            ),
            None if self.all.ecdsa => format!(
                "{offered}; no profile accepts it with this ECDSA certificate: clients with RSA suites only need an RSA certificate (tls.key_type: rsa, or an RSA tls.cert_file)"
            ),
            None => format!(
                "{offered}; no profile accepts it (mailbridge never offers RC4, 3DES, export or NULL suites); this device can only use a plain listener on an allowed network"
            ),
        }
    }

    /// OpenSSL's names for the offered suites (GREASE values left out, unknown ones counted).
    fn suite_names(&self, raw: &[u8]) -> String {
        let ids: Vec<u8> = raw
            .chunks_exact(2)
            .filter(|c| !is_grease(u16::from_be_bytes([c[0], c[1]])))
            .flatten()
            .copied()
            .collect();
        let mut names = Vec::new();
        let mut known = 0;
        if let Ok(ssl) = Ssl::new(self.all.context(self.profile))
            && let Ok(lists) = ssl.bytes_to_cipher_list(&ids, false)
        {
            known = lists.suites.len() + lists.signalling_suites.len();
            names.extend(lists.suites.iter().map(|c| c.name().to_string()));
        }
        let unknown = (ids.len() / 2).saturating_sub(known);
        if unknown > 0 {
            names.push(format!("{unknown} suite(s) unknown to OpenSSL"));
        }
        if names.is_empty() {
            "no cipher suites".into()
        } else {
            names.join(", ")
        }
    }
}

/// Feeds a recorded ClientHello to a fresh server of `ctx`, in memory: the server either
/// answers it (then waits for more, which never comes) or refuses it. OpenSSL decides, with
/// the same certificate, so the verdict cannot drift from what a real handshake would do.
fn replay_accepts(ctx: &SslContext, hello: &[u8]) -> bool {
    struct Replay<'a>(&'a [u8]);
    impl std::io::Read for Replay<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    impl std::io::Write for Replay<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let Ok(ssl) = Ssl::new(ctx) else {
        return false;
    };
    match ssl.accept(Replay(hello)) {
        Ok(_) | Err(HandshakeError::WouldBlock(_)) => true,
        Err(_) => false,
    }
}

/// RFC 8701: GREASE values (0x0A0A, 0x1A1A, …) are noise a client adds on purpose.
fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && (v >> 8) == (v & 0xff)
}

fn version_name(v: u16) -> String {
    match v {
        0x0300 => "SSL3".into(),
        0x0301 => "TLS1.0".into(),
        0x0302 => "TLS1.1".into(),
        0x0303 => "TLS1.2".into(),
        0x0304 => "TLS1.3".into(),
        other => format!("0x{other:04x}"),
    }
}

struct ClientHello {
    /// `legacy_version` (RFC 8446 §4.1.2): the highest version when there is no
    /// supported_versions extension.
    legacy_version: u16,
    /// The supported_versions extension (RFC 8446 §4.2.1), GREASE removed.
    versions: Option<Vec<u16>>,
    /// Cipher suites, two bytes each, as sent.
    suites: Vec<u8>,
    /// The signature_algorithms extension (RFC 5246 §7.4.1.4.1, RFC 8446 §4.2.3).
    sigalgs: Option<Vec<u16>>,
    /// Where the records holding the ClientHello end in the recorded bytes.
    end: usize,
}

impl ClientHello {
    /// True when every signature algorithm offered hashes with MD5 or SHA-1 (TLS 1.2 code
    /// points with hash byte 1 or 2). OpenSSL 3 accepts those only at security level 0, so
    /// such a client needs `legacy` even for TLS 1.2.
    fn sha1_signatures_only(&self) -> bool {
        self.sigalgs
            .as_ref()
            .is_some_and(|v| !v.is_empty() && v.iter().all(|a| matches!(a >> 8, 1 | 2)))
    }

    fn versions_text(&self) -> String {
        match &self.versions {
            Some(v) if !v.is_empty() => v
                .iter()
                .map(|v| version_name(*v))
                .collect::<Vec<_>>()
                .join(", "),
            _ if self.legacy_version == 0x0301 => "TLS1.0 only".into(),
            // Without supported_versions the lowest version a client takes is not on the wire.
            _ => format!("{} at most", version_name(self.legacy_version)),
        }
    }
}

enum Hello {
    Complete(ClientHello),
    Empty,
    Partial,
    NotTls,
}

/// Parses the first ClientHello from the first bytes of a TLS connection (RFC 5246 §6.2,
/// §7.4.1.2; RFC 8446 §4.1.2). It may span several handshake records.
fn parse_client_hello(seen: &[u8]) -> Hello {
    if seen.is_empty() {
        return Hello::Empty;
    }
    // Handshake content type; an SSLv2-style hello or plain text is not parsed.
    if seen[0] != 22 {
        return Hello::NotTls;
    }
    let mut msg = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = seen.get(pos..pos + 5) else {
            return Hello::Partial;
        };
        if header[0] != 22 || header[1] != 3 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let Some(body) = seen.get(pos + 5..pos + 5 + len) else {
            return Hello::Partial;
        };
        msg.extend_from_slice(body);
        pos += 5 + len;
        if msg.len() >= 4 {
            if msg[0] != 1 {
                return Hello::NotTls;
            }
            let need =
                4 + (usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]));
            if msg.len() >= need {
                return match parse_hello_body(&msg[4..need], pos) {
                    Some(h) => Hello::Complete(h),
                    None => Hello::NotTls,
                };
            }
        }
    }
}

fn parse_hello_body(b: &[u8], end: usize) -> Option<ClientHello> {
    let mut r = Reader(b);
    let legacy_version = r.u16()?;
    r.take(32)?;
    let sid = usize::from(r.u8()?);
    r.take(sid)?;
    let n = usize::from(r.u16()?);
    let suites = r.take(n)?.to_vec();
    let n = usize::from(r.u8()?);
    r.take(n)?;
    let mut versions = None;
    let mut sigalgs = None;
    if let Some(n) = r.u16() {
        let mut ext = Reader(r.take(usize::from(n))?);
        while let Some(kind) = ext.u16() {
            let n = usize::from(ext.u16()?);
            let data = ext.take(n)?;
            if kind == 13 {
                let mut d = Reader(data);
                let n = usize::from(d.u16()?);
                let list = d.take(n)?;
                sigalgs = Some(
                    list.chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .filter(|v| !is_grease(*v))
                        .collect(),
                );
            }
            if kind == 43 {
                let mut d = Reader(data);
                let n = usize::from(d.u8()?);
                let list = d.take(n)?;
                versions = Some(
                    list.chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .filter(|v| !is_grease(*v))
                        .collect(),
                );
            }
        }
    }
    Some(ClientHello {
        legacy_version,
        versions,
        suites,
        sigalgs,
        end,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Most bytes kept of a handshake's start: a ClientHello is one record (≤ 16 KiB) in practice.
const RECORD_LIMIT: usize = 5 + 16 * 1024 + 1024;

/// Passes a stream through and keeps a copy of the first bytes read, so that a failed
/// handshake can be explained from the client's ClientHello. Stops copying (and frees the
/// copy) once the handshake is done.
pub struct Recorder<S> {
    inner: S,
    seen: Vec<u8>,
    recording: bool,
}

impl<S> Recorder<S> {
    fn new(inner: S) -> Recorder<S> {
        Recorder {
            inner,
            seen: Vec::new(),
            recording: true,
        }
    }

    fn seen(&self) -> &[u8] {
        &self.seen
    }

    fn stop(&mut self) {
        self.recording = false;
        self.seen = Vec::new();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.recording && r.is_ready() {
            let new = &buf.filled()[before..];
            let room = RECORD_LIMIT.saturating_sub(this.seen.len());
            this.seen.extend_from_slice(&new[..new.len().min(room)]);
            if this.seen.len() >= RECORD_LIMIT {
                this.recording = false;
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// SHA-256 of a certificate's DER, as colon-separated hex (what `openssl x509 -fingerprint
/// -sha256` prints), for admins who pin it.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Returns the paths of the generated certificate and key in `state_dir/tls/`, creating them
/// the first time (printers rarely verify certificates; the fingerprint is logged). Existing
/// files are kept whatever their key type, so a pinned fingerprint stays valid.
fn self_signed(
    state_dir: &Path,
    hostname: &str,
    key_type: KeyType,
) -> Result<(PathBuf, PathBuf), TlsError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = state_dir.join("tls");
    let cert = dir.join("selfsigned-cert.pem");
    let key = dir.join("selfsigned-key.pem");
    if cert.is_file() && key.is_file() {
        return Ok((cert, key));
    }
    let err = |reason: String| TlsError::SelfSigned {
        path: dir.clone(),
        reason,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| err(e.to_string()))?;
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let signing_key = match key_type {
        // RSA 2048: every TLS client has RSA; many printers have no ECDSA.
        KeyType::Rsa => rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256),
        KeyType::Ecdsa => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
    }
    .map_err(|e| err(e.to_string()))?;
    let generated = rcgen::CertificateParams::new(names)
        .and_then(|p| p.self_signed(&signing_key))
        .map_err(|e| err(e.to_string()))?;
    let write = |path: &Path, data: &str, mode: u32| -> std::io::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write(&key, &signing_key.serialize_pem(), 0o600).map_err(|e| err(e.to_string()))?;
    write(&cert, &generated.pem(), 0o644).map_err(|e| err(e.to_string()))?;
    tracing::warn!(
        cert = %cert.display(),
        sha256 = %fingerprint(generated.der()),
        key_type = ?key_type,
        "no tls.cert_file configured: generated a self-signed certificate (devices that verify certificates need tls.cert_file, or pin this fingerprint)"
    );
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = self_signed(dir.path(), "relay.test", KeyType::Rsa).unwrap();
        let first = std::fs::read(&c1).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&k1).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (c2, _) = self_signed(dir.path(), "relay.test", KeyType::Ecdsa).unwrap();
        assert_eq!(std::fs::read(c2).unwrap(), first, "not regenerated");
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "upstreams: [{{name: o, type: outbox, path: /tmp/o}}]\ntls:\n  cert_file: {d}/c.pem\n  key_file: {d}/k.pem\n",
            d = dir.path().display()
        );
        let cfg = crate::config::from_yaml_str(&yaml).unwrap();
        std::fs::write(dir.path().join("c.pem"), "not pem").unwrap();
        std::fs::write(dir.path().join("k.pem"), "not pem").unwrap();
        let e = acceptor(&cfg).err().unwrap().to_string();
        assert!(
            e.contains("tls.cert_file") && e.contains("no certificate found"),
            "{e}"
        );
    }

    /// A ClientHello split over two records, with GREASE (RFC 8701) in its suites and
    /// versions, as browsers send it.
    #[test]
    fn client_hello_parsing() {
        let mut body = vec![3, 3];
        body.extend([0u8; 32]);
        body.push(0);
        body.extend([0, 6, 0x1a, 0x1a, 0x13, 0x01, 0xc0, 0x2f]);
        body.extend([1, 0]);
        let ext = [0, 43, 0, 7, 6, 0x2a, 0x2a, 3, 4, 3, 3];
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1, 0];
        hs.extend((body.len() as u16).to_be_bytes());
        hs.extend(&body);
        let (a, b) = hs.split_at(10);
        let mut wire = Vec::new();
        for part in [a, b] {
            wire.extend([22, 3, 1]);
            wire.extend((part.len() as u16).to_be_bytes());
            wire.extend(part);
        }
        let end = wire.len();
        wire.extend(b"more records");
        let Hello::Complete(h) = parse_client_hello(&wire) else {
            panic!("not parsed");
        };
        assert_eq!(h.versions_text(), "TLS1.3, TLS1.2");
        assert_eq!(h.suites, [0x1a, 0x1a, 0x13, 0x01, 0xc0, 0x2f]);
        assert_eq!(h.end, end);
        assert!(is_grease(0x1a1a) && !is_grease(0x1301));

        // Without supported_versions only the highest version is known.
        let mut old = wire[..end].to_vec();
        old[9..11].copy_from_slice(&[3, 1]);
        assert!(matches!(parse_client_hello(&old), Hello::Complete(_)));
        assert!(matches!(
            parse_client_hello(&wire[..end - 1]),
            Hello::Partial
        ));
        assert!(matches!(
            parse_client_hello(b"EHLO printer\r\n"),
            Hello::NotTls
        ));
        assert!(matches!(parse_client_hello(b""), Hello::Empty));
    }
}
