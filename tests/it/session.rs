//! In-memory SMTP sessions: behaviour.md section B (protocol cases that apply to a relay
//! without TLS and AUTH), C30/C31/C40, the headers we add, "250 only after commit" and
//! shutdown. Each test drives `inbound::session::run` over a duplex and asserts on the exact
//! reply codes (with enhanced codes) and on the files in the spool.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::common::{Harness, QueuedMessage};

const PEER: &str = "127.0.0.1:40000";
const EHLO: &str = "EHLO printer.lan\r\n";
/// A client header section with Date and Message-ID, so the only field we add is Received.
const HDR: &str = "From: a@lan.example\r\nTo: b@ext.example\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <t1@lan.example>\r\nSubject: test\r\n\r\n";
/// What a successful single-message session answers, greeting to QUIT.
const OK_SESSION: [&str; 7] = [
    "220",
    "250",
    "250 2.1.0",
    "250 2.1.5",
    "354",
    "250 2.0.0",
    "221 2.0.0",
];

/// "code enhanced-code" of every reply (the last line of a multi-line one), e.g. "250 2.1.0",
/// or just the code when the reply has no enhanced code ("220", "354").
fn summary(out: &str) -> Vec<String> {
    assert!(
        out.is_empty() || out.ends_with("\r\n"),
        "server output ends in the middle of a line: {out:?}"
    );
    out.split("\r\n")
        .filter(|l| !l.is_empty())
        .filter(|l| l.as_bytes().get(3) != Some(&b'-'))
        .map(|l| {
            let mut words = l.splitn(3, ' ');
            let code = words.next().unwrap_or_default();
            match words.next() {
                Some(e) if is_enhanced(e) => format!("{code} {e}"),
                _ => code.to_string(),
            }
        })
        .collect()
}

fn is_enhanced(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn codes(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// MAIL, RCPTs, DATA, then `data` (already dot-stuffed, ending in CRLF) and the end marker.
fn tx(from: &str, rcpts: &[&str], data: &[u8]) -> Vec<u8> {
    let mut v = format!("MAIL FROM:<{from}>\r\n").into_bytes();
    for r in rcpts {
        v.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
    }
    v.extend_from_slice(b"DATA\r\n");
    v.extend_from_slice(data);
    v.extend_from_slice(b".\r\n");
    v
}

/// EHLO, one transaction, QUIT.
fn session(from: &str, rcpts: &[&str], data: &[u8]) -> Vec<u8> {
    let mut v = EHLO.as_bytes().to_vec();
    v.extend_from_slice(&tx(from, rcpts, data));
    v.extend_from_slice(b"QUIT\r\n");
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Splits stored content into our `Received:` field (with its continuation lines) and the
/// rest.
fn split_received(content: &[u8]) -> (String, &[u8]) {
    assert!(
        content.starts_with(b"Received: from "),
        "content does not start with our Received header: {:?}",
        String::from_utf8_lossy(&content[..content.len().min(200)])
    );
    let mut pos = 0;
    loop {
        let rel = content[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("Received field ends with CRLF");
        pos += rel + 2;
        if !matches!(content.get(pos), Some(b'\t' | b' ')) {
            break;
        }
    }
    let field = String::from_utf8(content[..pos].to_vec()).expect("Received is ASCII");
    (field, &content[pos..])
}

/// Checks our Received field exactly, up to its date (which must be now, RFC 5322 form).
fn check_received(field: &str, helo: &str, ip: &str, protocol: &str, id: &str, rcpt: Option<&str>) {
    let unfolded = field.strip_suffix("\r\n").expect("CRLF at the end");
    let (head, date) = unfolded.rsplit_once("; ").expect("; date");
    let mut want = format!(
        "Received: from {helo} ([{ip}])\r\n\tby relay.test (mailbridge) with {protocol} id {id}"
    );
    if let Some(r) = rcpt {
        want.push_str(&format!("\r\n\tfor <{r}>"));
    }
    assert_eq!(head, want);
    check_date(date);
}

/// `Fri, 27 Nov 2026 22:22:43 +0000`, within a minute of now.
fn check_date(date: &str) {
    let gmt = date
        .strip_suffix(" +0000")
        .unwrap_or_else(|| panic!("date {date:?} is not in UTC +0000 form"));
    let t = httpdate::parse_http_date(&format!("{gmt} GMT"))
        .unwrap_or_else(|e| panic!("date {date:?} does not parse: {e}"));
    let now = std::time::SystemTime::now();
    let skew = now.duration_since(t).unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(60), "date {date:?} is not now");
}

/// The only message in the queue.
fn only_message(h: &Harness) -> QueuedMessage {
    let mut q = h.queued_messages();
    assert_eq!(q.len(), 1, "expected exactly one queued message: {q:#?}");
    q.remove(0)
}

/// The client's part of a stored message whose client headers had Date and Message-ID.
fn client_bytes(m: &QueuedMessage) -> Vec<u8> {
    let (field, rest) = split_received(&m.content);
    assert!(
        field.contains(&format!(" id {}", m.envelope.id)),
        "Received names the queue id: {field:?}"
    );
    rest.to_vec()
}

fn rcpts(m: &QueuedMessage) -> Vec<&str> {
    m.envelope
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect()
}

/// Every CR is followed by LF and every LF preceded by CR.
fn assert_crlf_clean(content: &[u8], what: &str) {
    for (i, &c) in content.iter().enumerate() {
        if c == b'\r' {
            assert_eq!(content.get(i + 1), Some(&b'\n'), "lone CR at {i} ({what})");
        }
        if c == b'\n' {
            assert!(i > 0 && content[i - 1] == b'\r', "lone LF at {i} ({what})");
        }
    }
}

fn nothing_stored(h: &Harness) {
    assert_eq!(
        h.queued(),
        Vec::<std::path::PathBuf>::new(),
        "nothing queued"
    );
    assert_eq!(
        h.tmp_files(),
        Vec::<std::path::PathBuf>::new(),
        "nothing in tmp/"
    );
}

// ---------------------------------------------------------------------------------------
// EHLO, HELO, VRFY, EXPN
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn ehlo_lists_exactly_size_pipelining_8bitmime_smtputf8_enhancedstatuscodes() {
    let h = Harness::new("limits:\n  max_message_size: 10MiB\n");
    let out = h.converse(PEER, b"EHLO printer.lan\r\nQUIT\r\n").await;
    let lines: Vec<&str> = out.split("\r\n").collect();
    assert_eq!(lines[0], "220 relay.test ESMTP mailbridge ready");
    assert_eq!(lines[1], "250-relay.test Hello [127.0.0.1]");
    let mut keywords: Vec<&str> = lines[2..7].iter().map(|l| &l[4..]).collect();
    // Continuation lines use "250-", the last one "250 ".
    assert!(lines[2..6].iter().all(|l| l.starts_with("250-")), "{out:?}");
    assert!(lines[6].starts_with("250 "), "{out:?}");
    keywords.sort();
    assert_eq!(
        keywords,
        [
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "PIPELINING",
            "SIZE 10485760",
            "SMTPUTF8"
        ]
    );
    assert!(
        !out.contains("AUTH") && !out.contains("STARTTLS"),
        "{out:?}"
    );
    assert_eq!(lines[7], "221 2.0.0 Bye");
    assert_eq!(lines[8], "");
    assert_eq!(lines.len(), 9);
}

#[tokio::test]
async fn ehlo_size_defaults_to_35_mib() {
    let h = Harness::new("");
    let out = h.converse(PEER, EHLO.as_bytes()).await;
    assert!(out.contains("\r\n250-SIZE 36700160\r\n"), "{out:?}");
}

#[tokio::test]
async fn helo_reply_has_no_extensions_and_no_enhanced_code() {
    let h = Harness::new("");
    let out = h.converse(PEER, b"HELO printer.lan\r\n").await;
    assert_eq!(
        out,
        "220 relay.test ESMTP mailbridge ready\r\n250 relay.test\r\n"
    );
}

#[tokio::test]
async fn vrfy_252_and_expn_502_no_enumeration() {
    let h = Harness::new("");
    let out = h
        .converse(
            PEER,
            b"EHLO printer.lan\r\nVRFY root\r\nEXPN staff\r\nVRFY postmaster@relay.test\r\nQUIT\r\n",
        )
        .await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "252 2.5.0",
            "502 5.5.1",
            "252 2.5.0",
            "221 2.0.0"
        ])
    );
    assert!(!out.contains("root@") && !out.contains("staff"), "{out:?}");
}

// ---------------------------------------------------------------------------------------
// B13, B14: line length limits
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn b13_command_of_512_octets_ok_513_refused_500_5_5_2() {
    let h = Harness::new("");
    let ok = format!("NOOP {}\r\n", "x".repeat(505));
    let long = format!("NOOP {}\r\n", "x".repeat(506));
    let long_mail = format!("MAIL FROM:<a@lan.example> {}\r\n", "X".repeat(512));
    assert_eq!(ok.len(), 512);
    assert_eq!(long.len(), 513);
    let input = format!("{EHLO}{ok}{long}{long_mail}RCPT TO:<b@ext.example>\r\nNOOP\r\nQUIT\r\n");
    let out = h.converse(PEER, input.as_bytes()).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.0.0",
            "500 5.5.2",
            "500 5.5.2",
            // The over-long MAIL did not start a transaction.
            "503 5.5.1",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    assert!(out.contains("500 5.5.2 Line too long\r\n"), "{out:?}");
}

#[tokio::test]
async fn b14_megabyte_line_without_newline_gets_500_and_disconnect() {
    let h = Harness::new("");
    let mut input = EHLO.as_bytes().to_vec();
    input.extend(std::iter::repeat_n(b'A', 1 << 20));
    let out = h.converse(PEER, &input).await;
    assert_eq!(summary(&out), codes(&["220", "250", "500 5.5.2"]));
    assert!(out.ends_with("500 5.5.2 Line too long\r\n"), "{out:?}");
}

#[tokio::test]
async fn b14_endless_line_is_cut_off_after_a_bounded_amount() {
    let h = Harness::new("");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    // Write up to 64 MiB without a newline; the server must hang up long before.
    let chunk = vec![b'A'; 64 * 1024];
    let mut written = 0usize;
    while written < 64 << 20 {
        match c.stream.write_all(&chunk).await {
            Ok(()) => written += chunk.len(),
            Err(_) => break,
        }
    }
    // 1 MiB of that sits in the duplex buffer; the server itself read little more than its
    // 64 KiB discard limit.
    assert!(
        written <= (1 << 20) + 256 * 1024,
        "server kept reading {written} bytes of one line"
    );
    let out = c.read_to_end().await;
    assert_eq!(out, "500 5.5.2 Line too long\r\n");
    c.task.await.unwrap();
}

// ---------------------------------------------------------------------------------------
// B15, B16: content lines
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn b15_line_over_998_octets_refused_554_5_6_0_and_998_accepted() {
    let h = Harness::new("");
    let line999 = "y".repeat(999);
    let line998 = "x".repeat(998);
    // A stuffed line: 999 octets on the wire, 998 once the leading dot is removed.
    let stuffed = format!(".{}", ".".to_string() + &"z".repeat(997));
    let mut input = EHLO.as_bytes().to_vec();
    input.extend(tx(
        "a@lan.example",
        &["b@ext.example"],
        format!("{HDR}{line999}\r\n").as_bytes(),
    ));
    input.extend(tx(
        "a@lan.example",
        &["b@ext.example"],
        format!("{HDR}{line998}\r\n{stuffed}\r\n").as_bytes(),
    ));
    input.extend(b"QUIT\r\n");
    let out = h.converse(PEER, &input).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "554 5.6.0",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    let m = only_message(&h);
    let want = format!("{HDR}{line998}\r\n.{}\r\n", "z".repeat(997));
    assert_eq!(
        String::from_utf8(client_bytes(&m)).unwrap(),
        want,
        "no truncation, no re-wrapping"
    );
    assert!(!String::from_utf8_lossy(&m.content).contains(&line999));
    // Reply texts are ASCII (RFC 5321 §4.2; UTF-8 only for SMTPUTF8 sessions).
    assert!(out.is_ascii(), "{out}");
}

#[tokio::test]
async fn b16_dot_lines_are_stored_unstuffed_exactly() {
    let h = Harness::new("");
    // The client's lines ".", "..", ".x", "x." and ". " are stuffed on the wire.
    let wire = format!("{HDR}..\r\n...\r\n..x\r\nx.\r\n. \r\nend\r\n");
    let out = h
        .converse(
            PEER,
            &session("a@lan.example", &["b@ext.example"], wire.as_bytes()),
        )
        .await;
    assert_eq!(summary(&out), codes(&OK_SESSION));
    let m = only_message(&h);
    assert_eq!(
        String::from_utf8(client_bytes(&m)).unwrap(),
        format!("{HDR}.\r\n..\r\n.x\r\nx.\r\n \r\nend\r\n")
    );
}

// ---------------------------------------------------------------------------------------
// B17: SMTP smuggling
// ---------------------------------------------------------------------------------------

/// The end-of-data look-alikes, and what each becomes in the stored content (None: the
/// message is refused).
const SMUGGLING: [(&[u8], Option<&[u8]>); 7] = [
    (b"\n.\n", Some(b"\r\n.\r\n")),
    (b"\n.\r\n", Some(b"\r\n.\r\n")),
    (b"\r.\r", Some(b" . ")),
    (b"\r\n.\r", Some(b"\r\n. ")),
    (b"\r\n.\n", Some(b"\r\n.\r\n")),
    (b"\r.\r\n", Some(b" .\r\n")),
    (b"\r\n\0.\r\n", None),
];
const SMUGGLED: &[u8] =
    b"MAIL FROM:<spoof@evil.example>\r\nRCPT TO:<victim@ext.example>\r\nDATA\r\nsmuggled\r\n";

fn smuggling_session(ending: &[u8]) -> Vec<u8> {
    let mut v = EHLO.as_bytes().to_vec();
    v.extend_from_slice(b"MAIL FROM:<real@lan.example>\r\nRCPT TO:<b@ext.example>\r\nDATA\r\n");
    v.extend_from_slice(HDR.as_bytes());
    v.extend_from_slice(b"body");
    v.extend_from_slice(ending);
    v.extend_from_slice(SMUGGLED);
    v.extend_from_slice(b".\r\nQUIT\r\n");
    v
}

#[tokio::test]
async fn b17_end_of_data_matrix_never_smuggles_a_second_message() {
    for (ending, stored) in SMUGGLING {
        let h = Harness::new("");
        let out = h.converse(PEER, &smuggling_session(ending)).await;
        let want = match stored {
            Some(_) => codes(&OK_SESSION),
            None => codes(&[
                "220",
                "250",
                "250 2.1.0",
                "250 2.1.5",
                "354",
                "554 5.6.0",
                "221 2.0.0",
            ]),
        };
        assert_eq!(summary(&out), want, "ending {ending:?}: {out}");
        let q = h.queued_messages();
        let Some(stored) = stored else {
            assert!(q.is_empty(), "ending {ending:?}: NUL message was queued");
            nothing_stored(&h);
            continue;
        };
        assert_eq!(q.len(), 1, "ending {ending:?}: {q:#?}");
        let m = &q[0];
        assert_eq!(m.envelope.sender, "real@lan.example", "ending {ending:?}");
        assert_eq!(rcpts(m), ["b@ext.example"], "ending {ending:?}");
        assert_crlf_clean(&m.content, &format!("ending {ending:?}"));
        let want = cat(&[HDR.as_bytes(), b"body", stored, SMUGGLED]);
        assert_eq!(
            String::from_utf8_lossy(&client_bytes(m)),
            String::from_utf8_lossy(&want),
            "ending {ending:?}"
        );
    }
}

#[tokio::test]
async fn b17_reject_mode_refuses_bare_lf_550_5_5_2() {
    let yaml = "listeners: [{address: \"127.0.0.1:0\", bare_lf: reject}]\n";
    for (ending, stored) in SMUGGLING {
        let h = Harness::new(yaml);
        let out = h.converse(PEER, &smuggling_session(ending)).await;
        let has_bare_lf = ending
            .iter()
            .enumerate()
            .any(|(i, &c)| c == b'\n' && (i == 0 || ending[i - 1] != b'\r'));
        let verdict = match stored {
            None => "554 5.6.0",
            Some(_) if has_bare_lf => "550 5.5.2",
            Some(_) => "250 2.0.0",
        };
        assert_eq!(
            summary(&out),
            codes(&[
                "220",
                "250",
                "250 2.1.0",
                "250 2.1.5",
                "354",
                verdict,
                "221 2.0.0"
            ]),
            "ending {ending:?}: {out}"
        );
        if verdict == "550 5.5.2" {
            assert!(out.contains("550 5.5.2 Error: bare <LF> received"), "{out}");
        }
        let q = h.queued_messages();
        if verdict == "250 2.0.0" {
            assert_eq!(q.len(), 1, "ending {ending:?}");
            assert_eq!(q[0].envelope.sender, "real@lan.example");
            assert_crlf_clean(&q[0].content, &format!("ending {ending:?}"));
        } else {
            assert!(q.is_empty(), "ending {ending:?}: {q:#?}");
            nothing_stored(&h);
        }
    }
}

#[tokio::test]
async fn b17_reject_mode_accepts_clean_crlf_and_refuses_lf_only_lines() {
    let h = Harness::new("listeners: [{address: \"127.0.0.1:0\", bare_lf: reject}]\n");
    let mut input = EHLO.as_bytes().to_vec();
    input.extend(tx(
        "a@lan.example",
        &["b@ext.example"],
        format!("{HDR}clean\r\n").as_bytes(),
    ));
    input.extend(tx(
        "a@lan.example",
        &["b@ext.example"],
        b"Subject: lf\n\nline\r\n",
    ));
    input.extend(b"QUIT\r\n");
    let out = h.converse(PEER, &input).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "550 5.5.2",
            "221 2.0.0"
        ])
    );
    let m = only_message(&h);
    assert_eq!(client_bytes(&m), format!("{HDR}clean\r\n").as_bytes());
}

// ---------------------------------------------------------------------------------------
// B18, B19, B20: stray CR/LF, NUL
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn b18_b19_bare_lf_becomes_crlf_and_bare_cr_becomes_space() {
    let h = Harness::new("");
    let hdr_lf = HDR.replace("\r\n", "\n");
    let data = format!("{hdr_lf}a\nb\rc\r\nd\r\r\ne\n\nf\r\n");
    let out = h
        .converse(
            PEER,
            &session("a@lan.example", &["b@ext.example"], data.as_bytes()),
        )
        .await;
    assert_eq!(summary(&out), codes(&OK_SESSION));
    let m = only_message(&h);
    assert_crlf_clean(&m.content, "stored content");
    // The LF-only header section was recognised (Date, Message-ID present: none added).
    assert_eq!(
        String::from_utf8(client_bytes(&m)).unwrap(),
        format!("{HDR}a\r\nb c\r\nd \r\ne\r\n\r\nf\r\n")
    );
}

#[tokio::test(start_paused = true)]
async fn b18_lf_only_client_cannot_end_data_and_is_cut_off_421_4_4_2() {
    // Outside access.lf_only_networks, `\n.\n` never ends DATA.
    let h = Harness::new("limits:\n  data_timeout: 60s\n");
    let mut c = h.connect(PEER);
    let input = "EHLO printer.lan\nMAIL FROM:<a@lan.example>\nRCPT TO:<b@ext.example>\nDATA\nSubject: lf\n\nbody\n.\nQUIT\n";
    c.send(input.as_bytes()).await;
    let start = Instant::now();
    let out = c.read_to_end().await;
    assert_eq!(
        summary(&out),
        codes(&["220", "250", "250 2.1.0", "250 2.1.5", "354", "421 4.4.2"])
    );
    assert!(
        start.elapsed() >= Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    c.task.await.unwrap();
    nothing_stored(&h);
}

#[tokio::test]
async fn b18_lf_only_network_may_end_data_with_lf_dot_lf() {
    let h = Harness::new("access:\n  lf_only_networks: [\"127.0.0.0/8\"]\n");
    let input = "EHLO printer.lan\nMAIL FROM:<a@lan.example>\nRCPT TO:<b@ext.example>\nDATA\nSubject: lf\n\n..dot\nbody\n.\nQUIT\n";
    let out = h.converse(PEER, input.as_bytes()).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    let msgs = h.queued_messages();
    assert_eq!(msgs.len(), 1);
    let content = &msgs[0].content;
    assert!(
        content.ends_with(b"Subject: lf\r\n\r\n.dot\r\nbody\r\n"),
        "{}",
        String::from_utf8_lossy(content)
    );
    // Another client, not in the list, still cannot end DATA that way.
    let h = Harness::new(
        "access:\n  allow_networks: [\"0.0.0.0/0\"]\n  lf_only_networks: [\"10.0.0.0/8\"]\n",
    );
    let out = h.converse(PEER, input.as_bytes()).await;
    assert!(!out.contains("250 2.0.0 Ok"), "{out}");
    assert!(h.queued().is_empty());
}

#[tokio::test]
async fn c30_client_outside_allow_networks_must_authenticate_530() {
    // 127.0.0.1 is in the default auth_networks but not in allow_networks: it may talk,
    // but MAIL needs AUTH first.
    let h = Harness::new("access:\n  allow_networks: [\"10.0.0.0/8\"]\n");
    let out = h
        .converse(
            PEER,
            b"EHLO x\r\nMAIL FROM:<a@lan.example>\r\nRCPT TO:<b@ext.example>\r\nQUIT\r\n",
        )
        .await;
    assert_eq!(
        summary(&out),
        codes(&["220", "250", "530 5.7.0", "503 5.5.1", "221 2.0.0"])
    );
    nothing_stored(&h);
}

#[tokio::test]
async fn c30_require_auth_listener_refuses_allowed_network_too() {
    let h = Harness::new(
        "listeners:\n  - address: \"127.0.0.1:0\"\n    require_auth: true\n    allow_plaintext_auth: true\n",
    );
    let out = h
        .converse(PEER, b"EHLO x\r\nMAIL FROM:<a@lan.example>\r\nQUIT\r\n")
        .await;
    assert_eq!(
        summary(&out),
        codes(&["220", "250", "530 5.7.0", "221 2.0.0"])
    );
}

#[tokio::test]
async fn unauthenticated_senders_are_held_to_access_allowed_senders() {
    let h =
        Harness::new("access:\n  allowed_senders: [\"*@contoso.com\", \"scanner@fabrikam.com\"]\n");
    let out = h
        .converse(
            PEER,
            b"EHLO x\r\nMAIL FROM:<ceo@evil.example>\r\nMAIL FROM:<Printer@CONTOSO.com>\r\nRSET\r\nMAIL FROM:<scanner@fabrikam.com>\r\nRSET\r\nMAIL FROM:<other@fabrikam.com>\r\nQUIT\r\n",
        )
        .await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "553 5.7.1",
            "250 2.1.0",
            "250 2.0.0",
            "250 2.1.0",
            "250 2.0.0",
            "553 5.7.1",
            "221 2.0.0"
        ])
    );
}

#[tokio::test]
async fn c34_header_from_outside_allowed_senders_is_refused_before_queueing() {
    let h = Harness::new("access:\n  allowed_senders: [\"*@contoso.com\"]\n");
    let out = h
        .converse(
            PEER,
            b"EHLO x\r\nMAIL FROM:<scanner@contoso.com>\r\nRCPT TO:<b@ext.example>\r\nDATA\r\nFrom: \"CEO\" <ceo@corp.example>\r\nSubject: spoof\r\n\r\nx\r\n.\r\nMAIL FROM:<scanner@contoso.com>\r\nRCPT TO:<b@ext.example>\r\nDATA\r\nFrom: Scanner <Scanner@Contoso.com>\r\nSubject: ok\r\n\r\nx\r\n.\r\nQUIT\r\n",
        )
        .await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "550 5.7.1",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    let msgs = h.queued_messages();
    assert_eq!(msgs.len(), 1);
    assert!(String::from_utf8_lossy(&msgs[0].content).contains("Subject: ok"));
}

/// One message from an allowed client whose header section is `head` (ending in its empty
/// line), envelope sender `from`; returns the reply to the final dot.
async fn header_from_verdict(h: &Harness, from: &str, head: &str) -> String {
    let input = format!(
        "{EHLO}MAIL FROM:<{from}>\r\nRCPT TO:<b@ext.example>\r\nDATA\r\n{head}body\r\n.\r\nQUIT\r\n"
    );
    let out = h.converse(PEER, input.as_bytes()).await;
    let s = summary(&out);
    assert_eq!(
        s[..5],
        ["220", "250", "250 2.1.0", "250 2.1.5", "354"],
        "{out}"
    );
    assert_eq!(s[6], "221 2.0.0", "{out}");
    assert_eq!(s.len(), 7, "{out}");
    s[5].clone()
}

const PRINTERS: &str = "access:\n  allowed_senders: [\"*@printers.corp.example\"]\n";

#[tokio::test]
async fn c34_header_from_after_64_kib_of_other_headers_is_checked() {
    let h = Harness::new(PRINTERS);
    // Far enough past 64 KiB that the From arrives in a later read than the first 64 KiB.
    let mut filler = String::new();
    while filler.len() < 200 * 1024 {
        filler.push_str(&format!(
            "X-Filler-{:05}: {}\r\n",
            filler.len(),
            "y".repeat(60)
        ));
    }
    let head = format!("{filler}From: ceo@corp.example\r\nSubject: x\r\n\r\n");
    let r = header_from_verdict(&h, "x@printers.corp.example", &head).await;
    assert_eq!(r, "550 5.7.1");
    nothing_stored(&h);
    // The same header section with an allowed From goes through whole.
    let head = format!("{filler}From: x@printers.corp.example\r\nSubject: x\r\n\r\n");
    let r = header_from_verdict(&h, "x@printers.corp.example", &head).await;
    assert_eq!(r, "250 2.0.0");
    let m = only_message(&h);
    assert!(m.content.ends_with(format!("{head}body\r\n").as_bytes()));
}

#[tokio::test]
async fn c34_comments_holding_a_quote_or_angle_do_not_hide_a_mailbox() {
    let h = Harness::new(PRINTERS);
    for from in [
        "From: ceo@corp.example (\"), x@printers.corp.example",
        "From: (<) ceo@corp.example, x@printers.corp.example",
    ] {
        let r =
            header_from_verdict(&h, "x@printers.corp.example", &format!("{from}\r\n\r\n")).await;
        assert_eq!(r, "550 5.7.1", "{from}");
    }
    nothing_stored(&h);
}

#[tokio::test]
async fn c34_quoted_angle_address_after_the_mailbox_is_not_what_is_checked() {
    let h = Harness::new("access:\n  allowed_senders: [\"scanner@ok.example\"]\n");
    let r = header_from_verdict(
        &h,
        "scanner@ok.example",
        "From: <ceo@corp.example> \"<scanner@ok.example>\"\r\n\r\n",
    )
    .await;
    assert_eq!(r, "550 5.7.1");
    nothing_stored(&h);
}

#[tokio::test]
async fn c34_empty_angle_brackets_after_an_address_do_not_check_nothing() {
    let h = Harness::new(PRINTERS);
    let r = header_from_verdict(
        &h,
        "x@printers.corp.example",
        "From: ceo@corp.example <>\r\n\r\n",
    )
    .await;
    assert_eq!(r, "550 5.7.1");
    nothing_stored(&h);
}

#[tokio::test]
async fn c34_several_from_fields_are_refused_even_for_any_sender() {
    let h = Harness::new("");
    for head in [
        "From: a@lan.example\r\nFrom: ceo@corp.example\r\n\r\n",
        "From: a@lan.example\r\nSubject: x\r\nfrom : ceo@corp.example\r\n\r\n",
    ] {
        let r = header_from_verdict(&h, "a@lan.example", head).await;
        assert_eq!(r, "550 5.7.1", "{head}");
    }
    nothing_stored(&h);
}

#[tokio::test]
async fn c34_from_without_a_mailbox_is_refused_where_senders_are_restricted() {
    let h = Harness::new(PRINTERS);
    for head in [
        "From: Scanner\r\n\r\n",
        "From: <>\r\n\r\n",
        "From: undisclosed:;\r\n\r\n",
        "junk line\r\nFrom: ceo@corp.example\r\n\r\n",
    ] {
        let r = header_from_verdict(&h, "x@printers.corp.example", head).await;
        assert_eq!(r, "550 5.7.1", "{head}");
    }
    nothing_stored(&h);
    // With `*` (the default) there is no sender to protect: such a From passes.
    let h = Harness::new("");
    let r = header_from_verdict(&h, "a@lan.example", "From: Scanner\r\n\r\n").await;
    assert_eq!(r, "250 2.0.0");
}

#[tokio::test]
async fn header_section_over_limits_max_header_size_is_refused_550_5_7_1() {
    let h = Harness::new("limits:\n  max_header_size: 4KiB\n");
    let mut head = String::new();
    while head.len() < 5 * 1024 {
        head.push_str(&format!("X-Filler: {}\r\n", "y".repeat(60)));
    }
    let r = header_from_verdict(&h, "a@lan.example", &format!("{head}\r\n")).await;
    assert_eq!(r, "550 5.7.1");
    // A message without the empty line is all header section.
    let r = header_from_verdict(&h, "a@lan.example", &head).await;
    assert_eq!(r, "550 5.7.1");
    nothing_stored(&h);
    // Just under the limit is fine.
    let small = &head[..3 * 1024 + 4];
    let cut = small.rfind("\r\n").unwrap() + 2;
    let r = header_from_verdict(&h, "a@lan.example", &format!("{}\r\n", &head[..cut])).await;
    assert_eq!(r, "250 2.0.0");
}

#[tokio::test]
async fn b20_nul_in_command_is_500_5_5_2() {
    let h = Harness::new("");
    let out = h
        .converse(
            PEER,
            b"EHLO printer.lan\r\nNOOP\0\r\nMAIL FROM:<a\0@lan.example>\r\nRCPT TO:<b@ext.example>\r\nQUIT\r\n",
        )
        .await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "500 5.5.2",
            "500 5.5.2",
            "503 5.5.1",
            "221 2.0.0"
        ])
    );
    assert!(
        out.contains("500 5.5.2 NUL character in command\r\n"),
        "{out}"
    );
    nothing_stored(&h);
}

#[tokio::test]
async fn b20_nul_in_data_is_refused_554_5_6_0_not_truncated() {
    let h = Harness::new("");
    let mut input = EHLO.as_bytes().to_vec();
    input.extend(tx(
        "a@lan.example",
        &["b@ext.example"],
        format!("{HDR}before\0after\r\n").as_bytes(),
    ));
    input.extend(tx(
        "a@lan.example",
        &["b@ext.example"],
        format!("{HDR}second\r\n").as_bytes(),
    ));
    input.extend(b"QUIT\r\n");
    let out = h.converse(PEER, &input).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "554 5.6.0",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    let m = only_message(&h);
    assert_eq!(client_bytes(&m), format!("{HDR}second\r\n").as_bytes());
}

// ---------------------------------------------------------------------------------------
// B21, B22: limits
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn b21_recipient_over_limit_452_4_5_3_earlier_ones_kept() {
    let h = Harness::new("limits:\n  max_recipients: 3\n");
    let out = h
        .converse(
            PEER,
            &session(
                "a@lan.example",
                &[
                    "r1@ext.example",
                    "r2@ext.example",
                    "r3@ext.example",
                    "r4@ext.example",
                ],
                HDR.as_bytes(),
            ),
        )
        .await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "452 4.5.3",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    let m = only_message(&h);
    assert_eq!(
        rcpts(&m),
        ["r1@ext.example", "r2@ext.example", "r3@ext.example"]
    );
}

#[tokio::test]
async fn b22_declared_size_over_limit_552_5_3_4_at_mail() {
    let h = Harness::new("limits:\n  max_message_size: 1000\n");
    let out = h
        .converse(
            PEER,
            b"EHLO printer.lan\r\nMAIL FROM:<a@lan.example> SIZE=1001\r\nMAIL FROM:<a@lan.example> SIZE=1000\r\nQUIT\r\n",
        )
        .await;
    assert!(out.contains("\r\n250-SIZE 1000\r\n"), "{out}");
    assert_eq!(
        summary(&out),
        codes(&["220", "250", "552 5.3.4", "250 2.1.0", "221 2.0.0"])
    );
}

/// A client message of exactly `len` octets (CRLF-clean, nothing to unstuff).
fn message_of_len(len: usize) -> String {
    let mut m = HDR.to_string();
    while m.len() + 80 < len {
        m.push_str(&"b".repeat(78));
        m.push_str("\r\n");
    }
    let rest = len - m.len() - 2;
    m.push_str(&"c".repeat(rest));
    m.push_str("\r\n");
    assert_eq!(m.len(), len);
    m
}

#[tokio::test]
async fn b22_undeclared_oversize_read_to_end_then_552_and_session_continues() {
    let h = Harness::new("limits:\n  max_message_size: 1000\n");
    let mut input = EHLO.as_bytes().to_vec();
    // The body of the refused message holds commands: they must not run.
    let mut big = message_of_len(1001);
    big.push_str("MAIL FROM:<x@evil.example>\r\nRCPT TO:<y@ext.example>\r\nDATA\r\n");
    input.extend(tx("a@lan.example", &["b@ext.example"], big.as_bytes()));
    input.extend(tx(
        "a@lan.example",
        &["b@ext.example"],
        message_of_len(1000).as_bytes(),
    ));
    input.extend(b"QUIT\r\n");
    let out = h.converse(PEER, &input).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "552 5.3.4",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    let m = only_message(&h);
    assert_eq!(client_bytes(&m), message_of_len(1000).as_bytes());
    assert!(h.tmp_files().is_empty());
}

#[tokio::test]
async fn b22_undeclared_oversize_that_spilled_to_disk_leaves_no_file() {
    // Over the spool's in-memory threshold (256 KiB), so part of it was written to tmp/.
    let h = Harness::new("limits:\n  max_message_size: 300KiB\n");
    let big = message_of_len(600_000);
    let out = h
        .converse(
            PEER,
            &session("a@lan.example", &["b@ext.example"], big.as_bytes()),
        )
        .await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "552 5.3.4",
            "221 2.0.0"
        ])
    );
    nothing_stored(&h);
}

// ---------------------------------------------------------------------------------------
// B23, B24: pipelining
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn b23_pipelined_mail_rcpt_rcpt_data_replies_in_order() {
    let h = Harness::new("");
    let out = h
        .converse(
            PEER,
            &session(
                "a@lan.example",
                &["r1@ext.example", "r2@ext.example"],
                format!("{HDR}hello\r\n").as_bytes(),
            ),
        )
        .await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    let m = only_message(&h);
    assert_eq!(rcpts(&m), ["r1@ext.example", "r2@ext.example"]);
    assert_eq!(client_bytes(&m), format!("{HDR}hello\r\n").as_bytes());
}

#[tokio::test]
async fn b23_pipelined_group_with_one_refused_rcpt_still_gets_354() {
    let h = Harness::new("");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    c.send(b"MAIL FROM:<a@lan.example>\r\nRCPT TO:<\xc3\xbc@ext.example>\r\nRCPT TO:<b@ext.example>\r\nDATA\r\n")
        .await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.extend(summary(&c.reply().await));
    }
    assert_eq!(got, ["250 2.1.0", "553 5.6.7", "250 2.1.5", "354"]);
    c.send(format!("{HDR}hi\r\n.\r\n").as_bytes()).await;
    assert_eq!(summary(&c.reply().await), ["250 2.0.0"]);
    assert_eq!(summary(&c.cmd("QUIT").await), ["221 2.0.0"]);
    c.finish().await;
    assert_eq!(rcpts(&only_message(&h)), ["b@ext.example"]);
}

#[tokio::test]
async fn b23_pipelined_group_without_accepted_rcpt_gets_no_354() {
    let h = Harness::new("");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    c.send(b"MAIL FROM:<a@lan.example>\r\nRCPT TO:<\xc3\xbc@ext.example>\r\nRCPT TO:<ext!u>\r\nDATA\r\n")
        .await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.extend(summary(&c.reply().await));
    }
    assert_eq!(got, ["250 2.1.0", "553 5.6.7", "501 5.1.3", "554 5.5.1"]);
    // The session goes on.
    assert_eq!(summary(&c.cmd("RSET").await), ["250 2.0.0"]);
    assert_eq!(summary(&c.cmd("QUIT").await), ["221 2.0.0"]);
    c.finish().await;
    nothing_stored(&h);
}

#[tokio::test]
async fn b24_pipelining_after_helo_554_5_5_0_and_disconnect() {
    let h = Harness::new("");
    let mut input = b"HELO printer.lan\r\n".to_vec();
    input.extend(tx(
        "a@lan.example",
        &["b@ext.example"],
        format!("{HDR}hi\r\n").as_bytes(),
    ));
    input.extend(b"QUIT\r\n");
    let out = h.converse(PEER, &input).await;
    assert_eq!(summary(&out), codes(&["220", "250", "554 5.5.0"]));
    assert!(
        out.ends_with("554 5.5.0 Improper use of SMTP command pipelining\r\n"),
        "{out}"
    );
    nothing_stored(&h);
}

#[tokio::test]
async fn b24_helo_client_that_waits_for_replies_is_served() {
    let h = Harness::new("");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(c.cmd("HELO printer.lan").await, "250 relay.test\r\n");
    assert_eq!(
        summary(&c.cmd("MAIL FROM:<a@lan.example>").await),
        ["250 2.1.0"]
    );
    assert_eq!(
        summary(&c.cmd("RCPT TO:<b@ext.example>").await),
        ["250 2.1.5"]
    );
    assert_eq!(summary(&c.cmd("DATA").await), ["354"]);
    c.send(format!("{HDR}hi\r\n.\r\n").as_bytes()).await;
    assert_eq!(summary(&c.reply().await), ["250 2.0.0"]);
    assert_eq!(summary(&c.cmd("QUIT").await), ["221 2.0.0"]);
    c.finish().await;
    let m = only_message(&h);
    let (field, rest) = split_received(&m.content);
    check_received(
        &field,
        "printer.lan",
        "127.0.0.1",
        "SMTP",
        &m.envelope.id,
        Some("b@ext.example"),
    );
    assert_eq!(rest, format!("{HDR}hi\r\n").as_bytes());
}

#[tokio::test]
async fn b24_body_pipelined_after_failed_data_554_5_5_0() {
    // DATA refused (no recipient), the body follows in the same write: it must never be
    // read as commands.
    for rcpt_line in ["", "RCPT TO:<ext!u>\r\n"] {
        let h = Harness::new("");
        let input = format!(
            "{EHLO}MAIL FROM:<a@lan.example>\r\n{rcpt_line}DATA\r\n{HDR}MAIL FROM:<x@evil.example>\r\nRCPT TO:<y@ext.example>\r\nDATA\r\nevil\r\n.\r\nQUIT\r\n"
        );
        let out = h.converse(PEER, input.as_bytes()).await;
        let mut want = vec!["220", "250", "250 2.1.0"];
        if !rcpt_line.is_empty() {
            want.push("501 5.1.3");
        }
        want.push("554 5.5.0");
        assert_eq!(summary(&out), codes(&want), "{out}");
        nothing_stored(&h);
    }
}

// ---------------------------------------------------------------------------------------
// B25: sequence and syntax errors
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn b25_bad_sequence_503_unknown_verb_500_bad_syntax_501() {
    let h = Harness::new("");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(
        summary(&c.cmd("MAIL FROM:<a@lan.example>").await),
        ["503 5.5.1"]
    );
    assert_eq!(summary(&c.cmd("EHLO").await), ["501 5.5.4"]);
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    assert_eq!(
        summary(&c.cmd("RCPT TO:<b@ext.example>").await),
        ["503 5.5.1"]
    );
    assert_eq!(summary(&c.cmd("DATA").await), ["503 5.5.1"]);
    assert_eq!(summary(&c.cmd("FOO bar").await), ["500 5.5.2"]);
    // A bare path is forgiven (issue 8 section 2), but not one with a stray bracket.
    assert_eq!(
        summary(&c.cmd("MAIL FROM:a@lan.example>").await),
        ["501 5.5.4"]
    );
    assert_eq!(
        summary(&c.cmd("MAIL TO:<a@lan.example>").await),
        ["501 5.5.4"]
    );
    assert_eq!(
        summary(&c.cmd("MAIL FROM:<a@lan.example>").await),
        ["250 2.1.0"]
    );
    assert_eq!(
        summary(&c.cmd("MAIL FROM:<a@lan.example>").await),
        ["503 5.5.1"]
    );
    assert_eq!(summary(&c.cmd("DATA").await), ["503 5.5.1"]);
    assert_eq!(
        summary(&c.cmd("RCPT TO:b@ext.example>").await),
        ["501 5.5.4"]
    );
    assert_eq!(
        summary(&c.cmd("RCPT TO:<b@ext.example> FOO=BAR").await),
        ["555 5.5.4"]
    );
    // The transaction survived the errors.
    assert_eq!(
        summary(&c.cmd("RCPT TO:<b@ext.example>").await),
        ["250 2.1.5"]
    );
    assert_eq!(summary(&c.cmd("DATA").await), ["354"]);
    c.send(format!("{HDR}x\r\n.\r\n").as_bytes()).await;
    assert_eq!(summary(&c.reply().await), ["250 2.0.0"]);
    assert_eq!(summary(&c.cmd("QUIT").await), ["221 2.0.0"]);
    c.finish().await;
    let m = only_message(&h);
    assert_eq!(m.envelope.sender, "a@lan.example");
    assert_eq!(rcpts(&m), ["b@ext.example"]);
}

// ---------------------------------------------------------------------------------------
// Old senders' habits (issue 8 section 2): paths without brackets, `AUTH=` in EHLO
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn quirk_space_after_colon_lowercase_verbs_and_8bit_without_body_param() {
    let h = Harness::new("");
    let body = "Subject: caf\u{e9}\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <q@lan.example>\r\n\r\nCaf\u{e9} cr\u{e8}me\r\n";
    let input = format!(
        "ehlo printer.lan\r\nmail from: <a@lan.example>\r\nrcpt to: <b@ext.example>\r\ndata\r\n{body}.\r\nquit\r\n"
    );
    let out = h.converse(PEER, input.as_bytes()).await;
    assert_eq!(summary(&out), codes(&OK_SESSION), "{out}");
    let m = only_message(&h);
    assert_eq!(m.envelope.sender, "a@lan.example");
    assert_eq!(rcpts(&m), ["b@ext.example"]);
    assert_eq!(m.envelope.body, None, "no BODY= given, none invented");
    assert_eq!(client_bytes(&m), body.as_bytes());
}

#[tokio::test]
async fn quirk_mail_and_rcpt_without_brackets_are_accepted_as_bracketed() {
    let h = Harness::new("");
    let input = format!(
        "{EHLO}MAIL FROM:a@lan.example SIZE=100\r\nRCPT TO:b@ext.example\r\nrcpt to: c@ext.example\r\nDATA\r\n{HDR}x\r\n.\r\nQUIT\r\n"
    );
    let out = h.converse(PEER, input.as_bytes()).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ]),
        "{out}"
    );
    let m = only_message(&h);
    assert_eq!(m.envelope.sender, "a@lan.example");
    assert_eq!(rcpts(&m), ["b@ext.example", "c@ext.example"]);
    // The single recipient is not named in Received here (two recipients), and the
    // envelope is exactly what the bracketed form gives.
    assert_eq!(client_bytes(&m), format!("{HDR}x\r\n").as_bytes());
}

#[tokio::test]
async fn quirk_bare_paths_keep_parameters_and_checks() {
    let h = Harness::new("limits:\n  max_message_size: 1000\n");
    let out = h
        .converse(
            PEER,
            b"EHLO x\r\nMAIL FROM:a@lan.example SIZE=5000\r\nMAIL FROM:a@lan.example FOO=BAR\r\nMAIL FROM:j\xc3\xb6s\xc3\xa9@lan.example\r\nMAIL FROM:a@lan.example BODY=8BITMIME SIZE=10\r\nRCPT TO:u%ext.example@relay.test\r\nQUIT\r\n",
        )
        .await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "552 5.3.4",
            "555 5.5.4",
            "553 5.6.7",
            "250 2.1.0",
            "250 2.1.5",
            "221 2.0.0"
        ]),
        "{out}"
    );
}

#[tokio::test]
async fn quirk_garbage_paths_are_still_refused_501() {
    let h = Harness::new("");
    let out = h
        .converse(
            PEER,
            b"EHLO x\r\nMAIL FROM:\r\nMAIL FROM:printer\r\nMAIL FROM:a@b@c\r\nMAIL FROM:a@lan.example>\r\nMAIL FROM:<a@lan.example\r\nMAIL FROM:a(x)@lan.example\r\nMAIL FROM:a@lan.example\r\nRCPT TO:@relay.test:b@ext.example\r\nRCPT TO:b@ext.example, c@ext.example\r\nRCPT TO:\"b\"@ext.example\r\nQUIT\r\n",
        )
        .await;
    let s = summary(&out);
    assert_eq!(s[0..2], ["220", "250"], "{out}");
    for (i, line) in [
        "MAIL FROM:",
        "MAIL FROM:printer",
        "MAIL FROM:a@b@c",
        "MAIL FROM:a@lan.example>",
        "MAIL FROM:<a@lan.example",
        "MAIL FROM:a(x)@lan.example",
    ]
    .iter()
    .enumerate()
    {
        assert!(s[2 + i].starts_with("501 "), "{line}: {}", s[2 + i]);
    }
    assert_eq!(s[8], "250 2.1.0");
    for r in &s[9..12] {
        assert!(r.starts_with("501 ") || r.starts_with("553 "), "{out}");
    }
    assert_eq!(s[12], "221 2.0.0");
    nothing_stored(&h);
}

/// An argon2id hash of [`USER_PW`], made once per test binary.
fn user_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        mailbridge::inbound::auth::hash_password(&mailbridge::secret::Secret::new(USER_PW)).unwrap()
    })
}
const USER: &str = "printer01";
const USER_PW: &str = "Pr1nter-S3cret!pw";

/// A plain listener that allows AUTH before TLS (`listener_opts` added to it), one user who
/// may send as `*@lan.example`, and `extra` top-level YAML.
fn auth_harness(listener_opts: &str, extra: &str) -> Harness {
    Harness::new(&format!(
        "listeners:\n  - address: \"127.0.0.1:0\"\n    allow_plaintext_auth: true\n{listener_opts}users:\n  - username: {USER}\n    password_hash: \"{}\"\n    allowed_senders: [\"*@lan.example\"]\n{extra}",
        user_hash()
    ))
}

/// `AUTH PLAIN` with the initial response for [`USER`].
fn auth_plain() -> String {
    use base64::Engine as _;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{USER_PW}"));
    format!("AUTH PLAIN {b}\r\n")
}

/// The keywords of the EHLO reply in `out` (every `250-`/`250 ` line after the first).
fn ehlo_keywords(out: &str) -> Vec<&str> {
    out.split("\r\n")
        .skip_while(|l| !l.starts_with("250-"))
        .skip(1)
        .take_while(|l| l.starts_with("250"))
        .map(|l| &l[4..])
        .collect()
}

#[tokio::test]
async fn quirk_ehlo_also_offers_the_old_auth_equals_form() {
    let h = auth_harness("", "");
    let out = h.converse(PEER, b"EHLO printer.lan\r\nQUIT\r\n").await;
    let keywords = ehlo_keywords(&out);
    assert!(keywords.contains(&"AUTH PLAIN LOGIN"), "{out}");
    assert!(keywords.contains(&"AUTH=PLAIN LOGIN"), "{out}");
    // Where AUTH is not offered, neither form is.
    let h = Harness::new("");
    let out = h.converse(PEER, b"EHLO printer.lan\r\nQUIT\r\n").await;
    assert!(!out.contains("AUTH"), "{out}");
}

#[tokio::test]
async fn quirk_auth_equals_form_can_be_turned_off_per_listener() {
    let h = auth_harness("    broken_sasl_auth_clients: false\n", "");
    let out = h.converse(PEER, b"EHLO printer.lan\r\nQUIT\r\n").await;
    assert!(ehlo_keywords(&out).contains(&"AUTH PLAIN LOGIN"), "{out}");
    assert!(!out.contains("AUTH="), "{out}");
}

// ---------------------------------------------------------------------------------------
// Received names the AUTH user only when asked to (issue 8 section 3.8)
// ---------------------------------------------------------------------------------------

async fn authenticated_message(h: &Harness) -> QueuedMessage {
    let input = format!(
        "{EHLO}{}MAIL FROM:<scanner@lan.example>\r\nRCPT TO:<b@ext.example>\r\nDATA\r\n{}x\r\n.\r\nQUIT\r\n",
        auth_plain(),
        HDR.replace("a@lan.example", "scanner@lan.example")
    );
    let out = h.converse(PEER, input.as_bytes()).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "235 2.7.0",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ]),
        "{out}"
    );
    only_message(h)
}

#[tokio::test]
async fn c35_received_does_not_name_the_auth_user_by_default() {
    let h = auth_harness("", "");
    let m = authenticated_message(&h).await;
    assert_eq!(m.envelope.auth_user.as_deref(), Some(USER));
    let (field, _) = split_received(&m.content);
    check_received(
        &field,
        "printer.lan",
        "127.0.0.1",
        "ESMTPA",
        &m.envelope.id,
        Some("b@ext.example"),
    );
    let all = String::from_utf8_lossy(&m.content);
    assert!(!all.contains(USER), "{all}");
}

#[tokio::test]
async fn c35_received_names_the_auth_user_with_received_auth_user() {
    let h = auth_harness("", "received_auth_user: true\n");
    let m = authenticated_message(&h).await;
    let (field, _) = split_received(&m.content);
    let want = format!(
        "Received: from printer.lan ([127.0.0.1])\r\n\tby relay.test (mailbridge) with ESMTPA id {}\r\n\t(Authenticated sender: {USER})\r\n\tfor <b@ext.example>; ",
        m.envelope.id
    );
    assert!(field.starts_with(&want), "{field:?}");
}

// ---------------------------------------------------------------------------------------
// B28: SMTPUTF8
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn b28_smtputf8_utf8_local_part_accepted_and_flagged() {
    let h = Harness::new("");
    let data = format!("{HDR}Grüße\r\n");
    let input = format!(
        "{EHLO}MAIL FROM:<jösé@lan.example> SMTPUTF8 BODY=8BITMIME\r\nRCPT TO:<ü@ext.example>\r\nDATA\r\n{data}.\r\nQUIT\r\n"
    );
    let out = h.converse(PEER, input.as_bytes()).await;
    assert_eq!(summary(&out), codes(&OK_SESSION));
    let m = only_message(&h);
    assert!(m.envelope.smtputf8);
    assert_eq!(m.envelope.body.as_deref(), Some("8BITMIME"));
    assert_eq!(m.envelope.sender, "jösé@lan.example");
    assert_eq!(rcpts(&m), ["ü@ext.example"]);
    let (field, rest) = split_received(&m.content);
    // A non-ASCII recipient is left out of the (ASCII) Received field.
    check_received(
        &field,
        "printer.lan",
        "127.0.0.1",
        "UTF8SMTP",
        &m.envelope.id,
        None,
    );
    assert_eq!(rest, data.as_bytes());
}

#[tokio::test]
async fn b28_utf8_address_without_smtputf8_refused_553_5_6_7() {
    let h = Harness::new("");
    let input = format!(
        "{EHLO}MAIL FROM:<jösé@lan.example>\r\nMAIL FROM:<a@lan.example> BODY=8BITMIME\r\nRCPT TO:<ü@ext.example>\r\nRCPT TO:<u@exämple.org>\r\nRSET\r\nQUIT\r\n"
    );
    let out = h.converse(PEER, input.as_bytes()).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "553 5.6.7",
            "250 2.1.0",
            "553 5.6.7",
            "553 5.6.7",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    nothing_stored(&h);
}

#[tokio::test]
async fn b28_invalid_utf8_address_is_refused_not_rewritten() {
    // smtp-proto turns invalid UTF-8 into U+FFFD: accepting it would forward the message to
    // an address the client never gave.
    let h = Harness::new("");
    let mut input = EHLO.as_bytes().to_vec();
    input.extend(b"MAIL FROM:<\xff@lan.example> SMTPUTF8\r\n");
    input.extend(b"MAIL FROM:<\xe9@lan.example>\r\n");
    input.extend(b"MAIL FROM:<a@lan.example> SMTPUTF8\r\n");
    input.extend(b"RCPT TO:<b\xc3@ext.example>\r\n");
    input.extend(b"RCPT TO:<b\xc3\xa9@ext.example>\r\n");
    input.extend(b"DATA\r\n");
    input.extend(HDR.as_bytes());
    input.extend(b".\r\nQUIT\r\n");
    let out = h.converse(PEER, &input).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "501 5.5.4",
            // Without SMTPUTF8, any non-ASCII address gets the README's 553 5.6.7.
            "553 5.6.7",
            "250 2.1.0",
            "501 5.5.4",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    assert!(
        out.contains("501 5.5.4 Address is not valid UTF-8"),
        "{out}"
    );
    let m = only_message(&h);
    assert_eq!(m.envelope.sender, "a@lan.example");
    assert_eq!(rcpts(&m), ["bé@ext.example"]);
    assert!(m.envelope.smtputf8);
}

// ---------------------------------------------------------------------------------------
// B29: timeouts (paused time)
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn b29_idle_longer_than_command_timeout_gets_421_4_4_2() {
    let h = Harness::new("limits:\n  command_timeout: 300s\n");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    // Each command restarts the clock: 3 x 200 s is longer than the timeout in total.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(200)).await;
        assert_eq!(summary(&c.cmd("NOOP").await), ["250 2.0.0"]);
    }
    let idle_from = Instant::now();
    let out = c.read_to_end().await;
    let idle = idle_from.elapsed();
    assert_eq!(out, "421 4.4.2 Timeout exceeded, closing connection\r\n");
    assert!(
        idle >= Duration::from_secs(300) && idle < Duration::from_secs(301),
        "cut off after {idle:?}"
    );
    c.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn b29_data_timeout_cuts_off_a_slow_sender_without_250() {
    let h = Harness::new("limits:\n  command_timeout: 300s\n  data_timeout: 60s\n");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    assert_eq!(
        summary(&c.cmd("MAIL FROM:<a@lan.example>").await),
        ["250 2.1.0"]
    );
    assert_eq!(
        summary(&c.cmd("RCPT TO:<b@ext.example>").await),
        ["250 2.1.5"]
    );
    assert_eq!(summary(&c.cmd("DATA").await), ["354"]);
    let start = Instant::now();
    c.send(HDR.as_bytes()).await;
    // One byte every 10 s: always within the command timeout, never done.
    let (mut rd, mut wr) = tokio::io::split(&mut c.stream);
    let trickle = async move {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if wr.write_all(b"x").await.is_err() {
                break;
            }
        }
    };
    let read = async move {
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut out)
            .await
            .unwrap();
        (out, start.elapsed())
    };
    let ((out, after), ()) = tokio::join!(read, trickle);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "421 4.4.2 Timeout exceeded, closing connection\r\n"
    );
    assert!(
        after >= Duration::from_secs(60) && after < Duration::from_secs(61),
        "cut off after {after:?}"
    );
    c.task.await.unwrap();
    nothing_stored(&h);
}

// ---------------------------------------------------------------------------------------
// Issue 8 section 3.3: session age and commands that make no progress (paused time)
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn max_session_age_ends_an_idle_session_with_421_4_7_0() {
    let h = Harness::new("limits:\n  max_session_age: 10m\n  command_timeout: 5m\n");
    let start = Instant::now();
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    // A NOOP every 4 minutes keeps the command timeout from ever firing.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(240)).await;
        assert_eq!(summary(&c.cmd("NOOP").await), ["250 2.0.0"]);
    }
    let out = c.read_to_end().await;
    let age = start.elapsed();
    assert_eq!(
        out,
        "421 4.7.0 Session time limit reached, closing connection\r\n"
    );
    assert!(
        age >= Duration::from_secs(600) && age < Duration::from_secs(601),
        "closed after {age:?}"
    );
    c.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn max_session_age_lets_a_data_transfer_finish_then_421() {
    let h = Harness::new("limits:\n  max_session_age: 10m\n  command_timeout: 5m\n");
    let start = Instant::now();
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    tokio::time::sleep(Duration::from_secs(240)).await;
    assert_eq!(
        summary(&c.cmd("MAIL FROM:<a@lan.example>").await),
        ["250 2.1.0"]
    );
    assert_eq!(
        summary(&c.cmd("RCPT TO:<b@ext.example>").await),
        ["250 2.1.5"]
    );
    assert_eq!(summary(&c.cmd("DATA").await), ["354"]);
    c.send(HDR.as_bytes()).await;
    // The session passes its age in the middle of the message.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(240)).await;
        c.send(b"slow line\r\n").await;
    }
    assert!(start.elapsed() > Duration::from_secs(600));
    c.send(b".\r\n").await;
    assert_eq!(summary(&c.reply().await), ["250 2.0.0"]);
    let m = only_message(&h);
    assert_eq!(
        client_bytes(&m),
        format!("{HDR}slow line\r\nslow line\r\n").as_bytes()
    );
    // Past its age, the session ends at the next command boundary: right after the 250.
    assert_eq!(
        c.read_to_end().await,
        "421 4.7.0 Session time limit reached, closing connection\r\n"
    );
    c.task.await.unwrap();
}

/// Sends `line` inside TLS and reads one reply (all lines of a multi-line one).
async fn tls_cmd<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    t: &mut S,
    line: &str,
) -> String {
    use tokio::io::AsyncReadExt;
    t.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        assert_eq!(t.read(&mut byte).await.unwrap(), 1, "closed: {out:?}");
        out.push(byte[0]);
        if out.ends_with(b"\r\n") {
            let last = out[..out.len() - 2]
                .rsplit(|&b| b == b'\n')
                .next()
                .unwrap_or_default();
            if last.get(3) != Some(&b'-') {
                return String::from_utf8_lossy(&out).into_owned();
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn max_session_age_counts_from_the_connection_across_starttls() {
    let h = Harness::new(
        "listeners:\n  - address: \"127.0.0.1:0\"\n    tls: starttls\nlimits:\n  max_session_age: 10m\n  command_timeout: 5m\n",
    );
    let start = Instant::now();
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    tokio::time::sleep(Duration::from_secs(240)).await;
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    assert_eq!(summary(&c.cmd("STARTTLS").await), ["220 2.0.0"]);
    let (spare, _) = tokio::io::duplex(1);
    let stream = std::mem::replace(&mut c.stream, spare);
    let name = rustls_pki_types::ServerName::try_from("relay.test").unwrap();
    let mut t = h.tls_connector().connect(name, stream).await.unwrap();
    assert!(
        tls_cmd(&mut t, "EHLO printer.lan")
            .await
            .starts_with("250-")
    );
    tokio::time::sleep(Duration::from_secs(240)).await;
    assert_eq!(tls_cmd(&mut t, "NOOP").await, "250 2.0.0 Ok\r\n");
    // 10 minutes after the connection, not after STARTTLS (which would be 14 minutes, and
    // the command timeout would come first, at 13).
    let mut out = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut t, &mut out).await;
    let age = start.elapsed();
    assert_eq!(
        String::from_utf8_lossy(&out),
        "421 4.7.0 Session time limit reached, closing connection\r\n"
    );
    assert!(
        age >= Duration::from_secs(600) && age < Duration::from_secs(601),
        "closed after {age:?}"
    );
}

#[tokio::test]
async fn max_session_age_defaults_to_30_minutes() {
    let h = Harness::new("limits:\n  max_session_age: 90s\n");
    assert_eq!(h.ctx.config.limits.max_session_age, Duration::from_secs(90));
    assert_eq!(
        Harness::new("").ctx.config.limits.max_session_age,
        Duration::from_secs(30 * 60)
    );
}

#[tokio::test]
async fn junk_commands_are_capped_at_30_by_default_then_421_4_7_0() {
    let h = Harness::new("");
    let mut input = EHLO.as_bytes().to_vec();
    // EHLO plus 29 more commands that make no progress: 30 in all are answered.
    let junk = [
        "NOOP\r\n",
        "RSET\r\n",
        "VRFY root\r\n",
        "HELP\r\n",
        "EHLO again\r\n",
    ];
    for i in 0..29 {
        input.extend_from_slice(junk[i % junk.len()].as_bytes());
    }
    input.extend_from_slice(b"NOOP\r\nMAIL FROM:<a@lan.example>\r\n");
    let out = h.converse(PEER, &input).await;
    let s = summary(&out);
    assert_eq!(s.len(), 32, "{out}");
    assert!(
        s[1..31]
            .iter()
            .all(|r| !r.starts_with('4') && !r.starts_with('5')),
        "{out}"
    );
    assert_eq!(s[31], "421 4.7.0", "{out}");
    assert!(
        out.ends_with("421 4.7.0 Too many commands without mail, closing connection\r\n"),
        "{out}"
    );
    nothing_stored(&h);
}

#[tokio::test]
async fn junk_command_count_restarts_after_a_delivered_message() {
    let h = Harness::new("limits:\n  max_junk_commands: 5\n");
    let msg = String::from_utf8(tx("a@lan.example", &["b@ext.example"], HDR.as_bytes())).unwrap();
    // EHLO + 4 NOOP = 5; the message starts the count again; 5 more; MAIL and RCPT do
    // not count, but the RSET that throws them away is the sixth.
    let input = format!(
        "{EHLO}NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n{msg}NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nMAIL FROM:<a@lan.example>\r\nRCPT TO:<b@ext.example>\r\nRSET\r\nNOOP\r\n"
    );
    let out = h.converse(PEER, input.as_bytes()).await;
    let mut want = vec!["220", "250"];
    want.extend(["250 2.0.0"; 4]);
    want.extend(["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]);
    want.extend(["250 2.0.0"; 5]);
    want.extend(["250 2.1.0", "250 2.1.5", "421 4.7.0"]);
    assert_eq!(summary(&out), codes(&want), "{out}");
    assert_eq!(h.queued().len(), 1);
}

// ---------------------------------------------------------------------------------------
// C30, C31: relay tests from an allowed client, junk
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn c30_relay_test_addresses_are_refused_or_kept_verbatim() {
    let h = Harness::new("");
    let input = format!(
        "{EHLO}MAIL FROM:<>\r\nRCPT TO:<\"u@ext.example\">\r\nRCPT TO:<\"u@ext.example\"@relay.test>\r\nRCPT TO:<ext.example!u>\r\nRCPT TO:<u%ext.example@relay.test>\r\nRCPT TO:<@relay.test:u@ext.example>\r\nRCPT TO:<ext.example!u@relay.test>\r\nDATA\r\n{HDR}x\r\n.\r\nQUIT\r\n"
    );
    let out = h.converse(PEER, input.as_bytes()).await;
    assert_eq!(
        summary(&out),
        codes(&[
            "220",
            "250",
            "250 2.1.0",
            "553 5.1.3",
            "553 5.1.3",
            "501 5.1.3",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "221 2.0.0"
        ])
    );
    let m = only_message(&h);
    assert_eq!(m.envelope.sender, "", "null sender stored as empty");
    // Percent hack and bang path kept verbatim (never re-routed); the source route
    // `@relay.test:` is dropped as RFC 5321 §3.6.1 / appendix C allow, leaving the mailbox.
    assert_eq!(
        rcpts(&m),
        [
            "u%ext.example@relay.test",
            "u@ext.example",
            "ext.example!u@relay.test"
        ]
    );
}

#[tokio::test]
async fn c30_null_sender_accepted_and_stored_empty() {
    let h = Harness::new("");
    let out = h
        .converse(PEER, &session("", &["b@ext.example"], HDR.as_bytes()))
        .await;
    assert_eq!(summary(&out), codes(&OK_SESSION));
    let m = only_message(&h);
    assert_eq!(m.envelope.sender, "");
    assert_eq!(rcpts(&m), ["b@ext.example"]);
}

#[tokio::test]
async fn c31_junk_and_proxy_v1_get_500s_then_421_4_7_0_after_20_errors() {
    let h = Harness::new("");
    let junk: [&[u8]; 7] = [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 25\r\n",
        b"GET / HTTP/1.1\r\n",
        b"Host: relay.test\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n",
        b"\xff\xfe\xfd\xfc\r\n",
        b"\r\n",
        b"\x1b[2J\x7f\x80\r\n",
    ];
    let mut input = Vec::new();
    for i in 0..30 {
        input.extend_from_slice(junk[i % junk.len()]);
    }
    input.extend_from_slice(b"EHLO printer.lan\r\n");
    let out = h.converse(PEER, &input).await;
    let mut want = vec!["220"];
    want.extend(std::iter::repeat_n("500 5.5.2", 20));
    want.push("421 4.7.0");
    assert_eq!(summary(&out), codes(&want), "{out}");
    assert!(
        out.ends_with("421 4.7.0 Too many errors, closing connection\r\n"),
        "{out}"
    );
    nothing_stored(&h);
}

#[tokio::test]
async fn c31_proxy_v2_signature_is_junk_then_its_quit() {
    // The PROXY v2 signature is built to make SMTP servers quit: \r\n\r\n\0\r\nQUIT\n.
    let h = Harness::new("");
    let mut input = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    input.extend_from_slice(b"\x21\x11\x00\x0c\xc0\x00\x02\x01\xc0\x00\x02\x02\x9c\x40\x00\x19");
    let out = h.converse(PEER, &input).await;
    assert_eq!(
        summary(&out),
        codes(&["220", "500 5.5.2", "500 5.5.2", "500 5.5.2", "221 2.0.0"])
    );
}

// ---------------------------------------------------------------------------------------
// The headers we add; C40
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn received_then_date_and_message_id_added_when_missing() {
    let h = Harness::new("");
    let data = "From: a@lan.example\r\nSubject: scan\r\n\r\nDate: in the body does not count\r\n";
    let out = h
        .converse(
            PEER,
            &session("a@lan.example", &["b@ext.example"], data.as_bytes()),
        )
        .await;
    assert_eq!(summary(&out), codes(&OK_SESSION));
    let m = only_message(&h);
    let id = &m.envelope.id;
    let (field, rest) = split_received(&m.content);
    check_received(
        &field,
        "printer.lan",
        "127.0.0.1",
        "ESMTP",
        id,
        Some("b@ext.example"),
    );
    let rest = std::str::from_utf8(rest).unwrap();
    let (date_line, rest) = rest.split_once("\r\n").unwrap();
    let date = date_line
        .strip_prefix("Date: ")
        .unwrap_or_else(|| panic!("Date added after Received: {date_line:?}"));
    check_date(date);
    let (mid_line, rest) = rest.split_once("\r\n").unwrap();
    assert_eq!(mid_line, format!("Message-ID: <{id}@relay.test>"));
    assert_eq!(rest, data, "then the client's bytes exactly");
}

#[tokio::test]
async fn received_only_when_client_has_date_and_message_id() {
    let h = Harness::new("");
    // Case and spacing vary in the wild.
    let data = "DATE : Mon, 01 Jan 2024 00:00:00 +0000\r\nmessage-id: <x@lan.example>\r\nSubject: s\r\n\r\nbody\r\n";
    let out = h
        .converse(
            PEER,
            &session("a@lan.example", &["b@ext.example"], data.as_bytes()),
        )
        .await;
    assert_eq!(summary(&out), codes(&OK_SESSION));
    let m = only_message(&h);
    let (field, rest) = split_received(&m.content);
    check_received(
        &field,
        "printer.lan",
        "127.0.0.1",
        "ESMTP",
        &m.envelope.id,
        Some("b@ext.example"),
    );
    assert_eq!(rest, data.as_bytes());
}

#[tokio::test]
async fn received_adds_only_the_missing_message_id() {
    let h = Harness::new("");
    let data = "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nSubject: s\r\n\r\nbody\r\n";
    let out = h
        .converse(
            "[::1]:40000",
            &session(
                "a@lan.example",
                &["b@ext.example", "c@ext.example"],
                data.as_bytes(),
            ),
        )
        .await;
    assert_eq!(summary(&out)[6], "250 2.0.0", "{out}");
    let m = only_message(&h);
    let id = &m.envelope.id;
    let (field, rest) = split_received(&m.content);
    // Two recipients: no "for" clause. IPv6 client literal as in RFC 5321 (bracketed).
    check_received(&field, "printer.lan", "::1", "ESMTP", id, None);
    assert_eq!(
        std::str::from_utf8(rest).unwrap(),
        format!("Message-ID: <{id}@relay.test>\r\n{data}")
    );
}

#[tokio::test]
async fn c40_helo_with_control_chars_is_cleaned_and_length_limited() {
    let h = Harness::new("");
    let mut helo: Vec<u8> = b"\x01ev\x1bil[31m(x);<y>\"\\\x7f\t\xc3\xa9\xff".to_vec();
    helo.extend(std::iter::repeat_n(b'a', 200));
    assert!(helo.len() <= 255);
    let mut input = b"EHLO ".to_vec();
    input.extend_from_slice(&helo);
    input.extend_from_slice(b"\r\n");
    input.extend(tx("a@lan.example", &["b@ext.example"], HDR.as_bytes()));
    input.extend(b"QUIT\r\n");
    let out = h.converse(PEER, &input).await;
    assert_eq!(summary(&out), codes(&OK_SESSION), "{out}");
    let m = only_message(&h);
    let (field, rest) = split_received(&m.content);
    // 64 characters kept (each control, 8-bit or delimiter character replaced), then "...".
    let want = format!("?ev?il_31m_x___y___????{}...", "a".repeat(41));
    check_received(
        &field,
        &want,
        "127.0.0.1",
        "ESMTP",
        &m.envelope.id,
        Some("b@ext.example"),
    );
    assert!(
        field
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) || b == b'\r' || b == b'\n' || b == b'\t'),
        "{field:?}"
    );
    assert_eq!(rest, HDR.as_bytes());
}

#[tokio::test]
async fn c40_helo_of_10_kb_is_refused_as_too_long() {
    let h = Harness::new("");
    let input = format!(
        "EHLO {}\r\nEHLO {}\r\nMAIL FROM:<a@lan.example>\r\nQUIT\r\n",
        "h".repeat(10 * 1024),
        "h".repeat(256)
    );
    let out = h.converse(PEER, input.as_bytes()).await;
    // 10 KB: over the command line limit. 256 octets: over the domain limit (RFC 5321
    // §4.5.3.1.2). Neither counts as a greeting.
    assert_eq!(
        summary(&out),
        codes(&["220", "500 5.5.2", "501 5.5.4", "503 5.5.1", "221 2.0.0"])
    );
}

// ---------------------------------------------------------------------------------------
// 250 only after commit; shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn queued_reply_names_the_id_and_the_file_exists_when_it_is_read() {
    let h = Harness::new("");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    assert_eq!(
        summary(&c.cmd("MAIL FROM:<a@lan.example>").await),
        ["250 2.1.0"]
    );
    assert_eq!(
        summary(&c.cmd("RCPT TO:<b@ext.example>").await),
        ["250 2.1.5"]
    );
    assert_eq!(summary(&c.cmd("DATA").await), ["354"]);
    c.send(format!("{HDR}hello\r\n.\r\n").as_bytes()).await;
    let reply = c.reply().await;
    let id = reply
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .and_then(|r| r.strip_suffix("\r\n"))
        .unwrap_or_else(|| panic!("unexpected reply {reply:?}"));
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    // Checked before anything else happens: the file is already committed.
    let path = h.dir.path().join(format!("spool/queue/{id}.msg"));
    assert!(
        path.exists(),
        "{} missing when 250 was read",
        path.display()
    );
    let m = only_message(&h);
    assert_eq!(m.envelope.id, id);
    assert_eq!(m.path, path);
    assert!(h.tmp_files().is_empty());
    assert_eq!(summary(&c.cmd("QUIT").await), ["221 2.0.0"]);
    c.finish().await;
}

#[tokio::test]
async fn shutdown_while_idle_gets_421_4_3_2() {
    let h = Harness::new("");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    h.ctx.stop.cancel();
    let out = c.read_to_end().await;
    assert_eq!(out, "421 4.3.2 Service shutting down, try again later\r\n");
    c.task.await.unwrap();
}

#[tokio::test]
async fn shutdown_during_data_lets_the_message_finish_then_421() {
    let h = Harness::new("");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    assert_eq!(
        summary(&c.cmd("MAIL FROM:<a@lan.example>").await),
        ["250 2.1.0"]
    );
    assert_eq!(
        summary(&c.cmd("RCPT TO:<b@ext.example>").await),
        ["250 2.1.5"]
    );
    assert_eq!(summary(&c.cmd("DATA").await), ["354"]);
    c.send(HDR.as_bytes()).await;
    h.ctx.stop.cancel();
    c.send(b"rest\r\n.\r\n").await;
    assert_eq!(summary(&c.reply().await), ["250 2.0.0"]);
    let out = c.read_to_end().await;
    assert_eq!(out, "421 4.3.2 Service shutting down, try again later\r\n");
    c.task.await.unwrap();
    let m = only_message(&h);
    assert_eq!(client_bytes(&m), format!("{HDR}rest\r\n").as_bytes());
}

#[tokio::test]
async fn hard_stop_during_data_421_and_nothing_queued() {
    let h = Harness::new("");
    let mut c = h.connect(PEER);
    assert_eq!(summary(&c.reply().await), ["220"]);
    assert_eq!(summary(&c.cmd("EHLO printer.lan").await), ["250"]);
    assert_eq!(
        summary(&c.cmd("MAIL FROM:<a@lan.example>").await),
        ["250 2.1.0"]
    );
    assert_eq!(
        summary(&c.cmd("RCPT TO:<b@ext.example>").await),
        ["250 2.1.5"]
    );
    assert_eq!(summary(&c.cmd("DATA").await), ["354"]);
    // Large enough to have spilled to tmp/ before the cut.
    c.send(message_of_len(400_000).as_bytes()).await;
    h.ctx.stop.cancel();
    h.ctx.hard_stop.cancel();
    let out = c.read_to_end().await;
    assert_eq!(out, "421 4.3.2 Service shutting down, try again later\r\n");
    c.task.await.unwrap();
    nothing_stored(&h);
}
