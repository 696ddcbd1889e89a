//! LAN-side TLS (OpenSSL) over an in-memory stream with a real rustls client: STARTTLS
//! (RFC 3207), implicit TLS (RFC 8314), and behaviour.md B12, B27 and C38; hand-made
//! ClientHellos with suites no current client offers (RC4, 3DES, export, NULL); the
//! handshake time limit.

use std::net::SocketAddr;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

use crate::common::Harness;

const PEER: &str = "127.0.0.1:40000";

fn start(h: &Harness) -> DuplexStream {
    let (client, server) = tokio::io::duplex(1 << 16);
    let peer: SocketAddr = PEER.parse().unwrap();
    let ctx = h.ctx.clone();
    tokio::spawn(async move {
        mailbridge::inbound::session::run(server, peer, None, ctx).await;
    });
    client
}

/// Reads one complete reply (all lines of a multi-line one).
async fn reply<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).await.unwrap();
        if n == 0 {
            break;
        }
        out.push(b[0]);
        if out.ends_with(b"\r\n") {
            let text = String::from_utf8_lossy(&out).to_string();
            // The last line without its CRLF; a trailing space stays (`334 ` is complete).
            let body = text.strip_suffix("\r\n").unwrap_or(&text);
            let last = body.rsplit("\r\n").next().unwrap_or("");
            if last.len() >= 4 && last.as_bytes()[3] == b' ' {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, line: &str) -> String {
    s.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
    reply(s).await
}

fn starttls_harness() -> Harness {
    Harness::new("listeners:\n  - address: \"127.0.0.1:0\"\n    tls: starttls\n")
}

#[tokio::test]
async fn starttls_then_mail_is_accepted_b12_b27() {
    let h = starttls_harness();
    let mut c = start(&h);
    assert!(reply(&mut c).await.starts_with("220 relay.test"));
    let ehlo = cmd(&mut c, "EHLO printer.lan").await;
    assert!(
        ehlo.contains("250-STARTTLS\r\n") || ehlo.contains("250 STARTTLS\r\n"),
        "{ehlo}"
    );
    assert!(!ehlo.contains("AUTH"), "no AUTH before TLS: {ehlo}");
    assert!(cmd(&mut c, "STARTTLS").await.starts_with("220 2.0.0"));
    let name = ServerName::try_from("relay.test").unwrap();
    let mut t = h.tls_connector().connect(name, c).await.expect("handshake");
    // B27: the state is reset; MAIL before a new EHLO is out of sequence.
    assert!(
        cmd(&mut t, "MAIL FROM:<a@lan.example>")
            .await
            .starts_with("503 5.5.1")
    );
    let ehlo = cmd(&mut t, "EHLO printer.lan").await;
    assert!(!ehlo.contains("STARTTLS"), "no STARTTLS inside TLS: {ehlo}");
    // B12: a second STARTTLS is refused.
    assert!(cmd(&mut t, "STARTTLS").await.starts_with("503 5.5.1"));
    assert!(
        cmd(&mut t, "MAIL FROM:<a@lan.example>")
            .await
            .starts_with("250 2.1.0")
    );
    assert!(
        cmd(&mut t, "RCPT TO:<b@ext.example>")
            .await
            .starts_with("250 2.1.5")
    );
    assert!(cmd(&mut t, "DATA").await.starts_with("354"));
    let r = cmd(&mut t, "Subject: tls\r\n\r\nover tls\r\n.").await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    assert!(cmd(&mut t, "QUIT").await.starts_with("221"));
    let msgs = h.queued_messages();
    assert_eq!(msgs.len(), 1);
    let content = String::from_utf8_lossy(&msgs[0].content).to_string();
    assert!(content.contains("with ESMTPS id"), "{content}");
    assert!(
        content.ends_with("Subject: tls\r\n\r\nover tls\r\n"),
        "{content}"
    );
}

#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_discarded_c38() {
    let h = starttls_harness();
    let mut c = start(&h);
    reply(&mut c).await;
    // One write: EHLO, STARTTLS and an injected RSET (CVE-2011-0411).
    c.write_all(b"EHLO x\r\nSTARTTLS\r\nRSET\r\n")
        .await
        .unwrap();
    assert!(reply(&mut c).await.starts_with("250-"));
    assert!(reply(&mut c).await.starts_with("220 2.0.0"));
    let name = ServerName::try_from("localhost").unwrap();
    let mut t = h.tls_connector().connect(name, c).await.expect("handshake");
    // The first reply inside TLS answers our EHLO, not the injected RSET.
    let first = cmd(&mut t, "EHLO x").await;
    assert!(first.starts_with("250-relay.test"), "{first}");
    assert!(cmd(&mut t, "QUIT").await.starts_with("221"));
}

#[tokio::test]
async fn starttls_on_a_plain_listener_is_not_offered() {
    let h = Harness::new("");
    let out = h.converse(PEER, b"EHLO x\r\nSTARTTLS\r\nQUIT\r\n").await;
    assert!(!out.contains("STARTTLS"), "{out}");
    assert!(out.contains("\r\n502 5.5.1"), "{out}");
}

#[tokio::test]
async fn implicit_tls_greets_inside_tls() {
    let h = Harness::new("listeners:\n  - address: \"127.0.0.1:0\"\n    tls: implicit\n");
    let c = start(&h);
    let name = ServerName::try_from("relay.test").unwrap();
    let mut t = h.tls_connector().connect(name, c).await.expect("handshake");
    assert!(reply(&mut t).await.starts_with("220 relay.test"));
    let ehlo = cmd(&mut t, "EHLO x").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(cmd(&mut t, "QUIT").await.starts_with("221"));
}

#[tokio::test]
async fn implicit_tls_listener_drops_a_plaintext_client() {
    let h = Harness::new("listeners:\n  - address: \"127.0.0.1:0\"\n    tls: implicit\n");
    let mut c = start(&h);
    c.write_all(b"EHLO x\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("250"),
        "no SMTP in the clear"
    );
}

/// A TLS 1.2 ClientHello (RFC 5246 §7.4.1.2) offering exactly `suites`, with the extensions
/// ECDHE needs (RFC 8422 §5.1) and signature algorithms (RFC 5246 §7.4.1.4.1).
fn client_hello(suites: &[u16]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend(s.to_be_bytes());
    }
    body.extend([1, 0]);
    let ext: &[u8] = &[
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, // groups: x25519, P-256
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // point formats: uncompressed
        0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x01, 0x08, 0x04, // rsa sha256, pss
    ];
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1, 0];
    hs.extend((body.len() as u16).to_be_bytes());
    hs.extend(body);
    let mut rec = vec![22, 3, 1];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// The content type of the server's first record: 22 (handshake: ServerHello) or 21 (alert).
async fn first_record_type(profile: &str, suites: &[u16]) -> u8 {
    let h = Harness::new(&format!(
        "listeners:\n  - address: \"127.0.0.1:0\"\n    tls: implicit\n    tls_profile: {profile}\n"
    ));
    let mut c = start(&h);
    c.write_all(&client_hello(suites)).await.unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.unwrap();
    b[0]
}

/// No RC4, 3DES, export, NULL or anonymous suite in any profile (issue 8 §1). OpenSSL 3
/// clients cannot offer most of these any more, so the ClientHello is made here.
#[tokio::test]
async fn rc4_3des_export_null_and_anonymous_suites_are_refused_by_every_profile() {
    const REFUSED: &[(u16, &str)] = &[
        (0x000a, "DES-CBC3-SHA"),
        (0xc012, "ECDHE-RSA-DES-CBC3-SHA"),
        (0x0016, "DHE-RSA-DES-CBC3-SHA"),
        (0x0005, "RC4-SHA"),
        (0x0004, "RC4-MD5"),
        (0xc011, "ECDHE-RSA-RC4-SHA"),
        (0x0003, "EXP-RC4-MD5"),
        (0x0008, "EXP-DES-CBC-SHA"),
        (0x0009, "DES-CBC-SHA"),
        (0x0001, "NULL-MD5"),
        (0x0002, "NULL-SHA"),
        (0x003b, "NULL-SHA256"),
        (0xc010, "ECDHE-RSA-NULL-SHA"),
        (0x0034, "ADH-AES128-SHA"),
        (0xc018, "AECDH-AES128-SHA"),
    ];
    for profile in ["modern", "compatible", "legacy"] {
        for (id, name) in REFUSED {
            assert_eq!(
                first_record_type(profile, &[*id]).await,
                21,
                "{name} accepted by {profile}"
            );
        }
    }
    // The same ClientHello with a suite the profile has is answered (so the refusals above
    // are about the suites).
    assert_eq!(first_record_type("compatible", &[0x002f]).await, 22);
    assert_eq!(first_record_type("modern", &[0xc02f]).await, 22);
}

/// A client that connects to an implicit-TLS port and sends half a ClientHello is cut off
/// after the 30-second handshake limit (paused clock), not held forever.
#[tokio::test(start_paused = true)]
async fn a_stalled_handshake_is_cut_off_after_30_seconds() {
    let h = Harness::new("listeners:\n  - address: \"127.0.0.1:0\"\n    tls: implicit\n");
    let mut c = start(&h);
    let hello = client_hello(&[0xc02f]);
    c.write_all(&hello[..hello.len() / 2]).await.unwrap();
    let begin = tokio::time::Instant::now();
    let mut buf = Vec::new();
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(120), c.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 120 s");
    let waited = begin.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(30) && waited < std::time::Duration::from_secs(31),
        "{waited:?}"
    );
    assert!(buf.is_empty(), "nothing is sent for half a ClientHello");
}
