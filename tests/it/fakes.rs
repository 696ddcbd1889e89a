//! Self-tests of the fake token endpoint and the fake Exchange Online server.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::fake_exchange::{FakeExchange, Rule, Stage};
use crate::fake_token::{self, Failure, FakeToken};

const MAILBOX: &str = "relay@contoso.example";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const SCOPE: &str = "https://outlook.office365.com/.default";

fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn http() -> reqwest::Client {
    install_provider();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn post(url: &str, form: &[(&str, &str)]) -> reqwest::Response {
    http().post(url).form(form).send().await.unwrap()
}

async fn token(ft: &FakeToken) -> String {
    let response = post(
        &ft.url(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("scope", SCOPE),
            ("client_secret", "s3cr3t"),
        ],
    )
    .await;
    assert_eq!(response.status(), 200);
    let json: serde_json::Value = response.json().await.unwrap();
    json["access_token"].as_str().unwrap().to_string()
}

fn xoauth2(user: &str, token: &str) -> String {
    STANDARD.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// A line-oriented SMTP client for the tests.
struct Smtp<S> {
    r: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Smtp<S> {
    fn new(s: S) -> Smtp<S> {
        Smtp {
            r: BufReader::new(s),
        }
    }

    /// A whole (multi-line) reply, lines joined with '\n'; "" at EOF.
    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return lines.join("\n");
            }
            let line = line.trim_end_matches(['\r', '\n']).to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    async fn send(&mut self, raw: &[u8]) {
        let w = self.r.get_mut();
        w.write_all(raw).await.unwrap();
        w.flush().await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }
}

type TlsSmtp = Smtp<tokio_rustls::client::TlsStream<TcpStream>>;

async fn plain(fx: &FakeExchange) -> (Smtp<TcpStream>, String) {
    let tcp = TcpStream::connect(fx.addr()).await.unwrap();
    let mut s = Smtp::new(tcp);
    let greeting = s.reply().await;
    (s, greeting)
}

fn connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    install_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Connects, EHLO, STARTTLS, EHLO again; returns the session and the second EHLO reply.
async fn tls(fx: &FakeExchange) -> (TlsSmtp, String) {
    let (mut s, greeting) = plain(fx).await;
    assert!(
        greeting.starts_with("220 fake.outlook.office365.com "),
        "{greeting}"
    );
    let ehlo = s.cmd("EHLO client.test").await;
    assert!(ehlo.contains("250-STARTTLS"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert_eq!(s.cmd("STARTTLS").await, "220 2.0.0 SMTP server ready");
    let tcp = s.r.into_inner();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector(&fx.ca_pem()).connect(name, tcp).await.unwrap();
    let mut s = Smtp::new(stream);
    let ehlo = s.cmd("EHLO client.test").await;
    (s, ehlo)
}

/// TLS + two-step AUTH XOAUTH2; returns the session and the final AUTH reply.
async fn authed(fx: &FakeExchange, user: &str, token: &str) -> (TlsSmtp, String) {
    let (mut s, _) = tls(fx).await;
    assert_eq!(s.cmd("AUTH XOAUTH2").await, "334 ");
    let reply = s.cmd(&xoauth2(user, token)).await;
    (s, reply)
}

async fn start() -> (FakeToken, FakeExchange) {
    let ft = FakeToken::start(Duration::from_secs(3600)).await;
    let fx = FakeExchange::start(ft.issued(), MAILBOX).await;
    (ft, fx)
}

/// Sends one message in an authenticated session; returns the reply to the final dot.
async fn send_message(s: &mut TlsSmtp, from: &str, to: &[&str], data: &[u8]) -> String {
    assert_eq!(
        s.cmd(&format!("MAIL FROM:<{from}>")).await,
        "250 2.1.0 Sender OK"
    );
    for rcpt in to {
        assert_eq!(
            s.cmd(&format!("RCPT TO:<{rcpt}>")).await,
            "250 2.1.5 Recipient OK"
        );
    }
    assert!(s.cmd("DATA").await.starts_with("354 "));
    s.send(data).await;
    s.send(b".\r\n").await;
    s.reply().await
}

#[tokio::test]
async fn token_endpoint_issues_long_jwt_shaped_tokens() {
    let ft = FakeToken::start(Duration::from_secs(3)).await;
    assert!(ft.url().ends_with("/contoso-tenant/oauth2/v2.0/token"));
    let response = post(
        &ft.url(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("scope", SCOPE),
            ("client_secret", "a+b&c=d"),
        ],
    )
    .await;
    assert_eq!(response.status(), 200);
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["expires_in"], 3);
    assert_eq!(json["ext_expires_in"], 3);
    let access = json["access_token"].as_str().unwrap();
    assert!(access.len() > 1500, "{}", access.len());
    assert_eq!(access.split('.').count(), 3);
    let claims = fake_token::token_claims(access).unwrap();
    assert_eq!(claims["aud"], "https://outlook.office365.com");
    assert_eq!(claims["appid"], CLIENT_ID);
    assert_eq!(claims["roles"], serde_json::json!(["SMTP.SendAsApp"]));
    assert_eq!(claims["tid"], fake_token::TENANT_ID);
    assert_eq!(
        claims["exp"].as_u64().unwrap(),
        claims["iat"].as_u64().unwrap() + 3
    );
    let issued = ft.issued().get(access).unwrap();
    assert_eq!(issued.client_id, CLIENT_ID);
    assert_eq!(issued.scope, SCOPE);
    let left = issued.expires_at - std::time::Instant::now();
    assert!(left > Duration::from_secs(2) && left <= Duration::from_secs(3));
    let form = ft.last_form();
    assert!(form.contains(&("client_secret".into(), "a+b&c=d".into())));
    assert_eq!(ft.requests(), 1);

    ft.set_lifetime(Duration::from_secs(4500));
    ft.set_roles(vec![]);
    let second = token(&ft).await;
    assert_ne!(second, access);
    assert_eq!(
        fake_token::token_claims(&second).unwrap()["roles"],
        serde_json::json!([])
    );
    assert_eq!(ft.issued().len(), 2);
}

#[tokio::test]
async fn token_endpoint_fails_as_scripted() {
    let ft = FakeToken::start(Duration::from_secs(3600)).await;
    ft.fail_next(
        1,
        Failure::Aadsts {
            status: 401,
            error: "invalid_client",
            code: "AADSTS7000215",
        },
    );
    ft.fail_next(2, Failure::RetryAfter(7));
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("scope", SCOPE),
        ("client_secret", "x"),
    ];
    let r = post(&ft.url(), &form).await;
    assert_eq!(r.status(), 401);
    let json: serde_json::Value = r.json().await.unwrap();
    assert_eq!(json["error"], "invalid_client");
    assert!(
        json["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215: Invalid client secret provided.")
    );
    assert_eq!(json["error_codes"], serde_json::json!([7000215]));
    for _ in 0..2 {
        let r = post(&ft.url(), &form).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "7");
    }
    ft.fail_always(Some(Failure::ServerError));
    assert_eq!(post(&ft.url(), &form).await.status(), 500);
    assert_eq!(post(&ft.url(), &form).await.status(), 500);
    ft.fail_always(None);
    assert_eq!(post(&ft.url(), &form).await.status(), 200);

    // Malformed requests.
    let r = post(&ft.url(), &[("client_id", CLIENT_ID), ("scope", SCOPE)]).await;
    assert_eq!(r.status(), 400);
    let json: serde_json::Value = r.json().await.unwrap();
    assert_eq!(json["error"], "invalid_request");
    let r = post(
        &ft.url(),
        &[("grant_type", "client_credentials"), ("scope", SCOPE)],
    )
    .await;
    assert_eq!(r.status(), 400);
    ft.set_secret(Some("right"));
    assert_eq!(post(&ft.url(), &form).await.status(), 401);
    assert_eq!(ft.requests(), 9);
    assert_eq!(ft.issued().len(), 1);
}

fn rsa_certificate() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["mailbridge.test".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn assertion(url: &str, cert_pem: &str, key_pem: &str, alg: jsonwebtoken::Algorithm) -> String {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    use sha2::{Digest as _, Sha256};
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let mut header = jsonwebtoken::Header::new(alg);
    header.x5t_s256 = Some(URL_SAFE_NO_PAD.encode(Sha256::digest(der.as_ref())));
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "aud": url, "iss": CLIENT_ID, "sub": CLIENT_ID, "jti": "j1",
        "nbf": now, "iat": now, "exp": now + 600,
    });
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test]
async fn token_endpoint_verifies_client_assertions() {
    let ft = FakeToken::start(Duration::from_secs(3600)).await;
    let (cert_pem, key_pem) = rsa_certificate();
    let (_, other_key) = rsa_certificate();
    ft.expect_certificate(&cert_pem);
    let send = |jwt: String| {
        let url = ft.url();
        async move {
            post(
                &url,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", CLIENT_ID),
                    ("scope", SCOPE),
                    ("client_assertion_type", fake_token::ASSERTION_TYPE),
                    ("client_assertion", &jwt),
                ],
            )
            .await
        }
    };
    for alg in [
        jsonwebtoken::Algorithm::PS256,
        jsonwebtoken::Algorithm::RS256,
    ] {
        let r = send(assertion(&ft.url(), &cert_pem, &key_pem, alg)).await;
        assert_eq!(r.status(), 200, "{alg:?}");
    }
    // Signed with another key, but claiming this certificate's thumbprint.
    let r = send(assertion(
        &ft.url(),
        &cert_pem,
        &other_key,
        jsonwebtoken::Algorithm::PS256,
    ))
    .await;
    assert_eq!(r.status(), 400);
    let json: serde_json::Value = r.json().await.unwrap();
    assert_eq!(json["error"], "invalid_client");
    assert!(
        json["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS700027: Client assertion failed signature validation.")
    );
    // Wrong audience.
    let r = send(assertion(
        "http://elsewhere/token",
        &cert_pem,
        &key_pem,
        jsonwebtoken::Algorithm::PS256,
    ))
    .await;
    assert_eq!(r.status(), 400);
    // A secret is refused once a certificate is expected.
    let r = post(
        &ft.url(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("scope", SCOPE),
            ("client_secret", "x"),
        ],
    )
    .await;
    assert_eq!(r.status(), 401);
    assert_eq!(ft.issued().len(), 2);
}

#[tokio::test]
async fn exchange_requires_starttls_then_accepts_two_step_xoauth2() {
    let (ft, fx) = start().await;
    let (mut s, _) = plain(&fx).await;
    assert!(s.cmd("EHLO client.test").await.starts_with("250-"));
    assert_eq!(
        s.cmd("AUTH XOAUTH2").await,
        "504 5.7.4 Unrecognized authentication type"
    );
    assert_eq!(
        s.cmd("MAIL FROM:<a@b.example>").await,
        "530 5.7.0 Must issue a STARTTLS command first"
    );
    assert!(s.cmd("QUIT").await.starts_with("221 "));

    let (mut s, ehlo) = tls(&fx).await;
    assert!(ehlo.contains("250-AUTH LOGIN XOAUTH2"), "{ehlo}");
    assert!(ehlo.contains("250-SIZE 157286400"), "{ehlo}");
    assert!(ehlo.ends_with("250 SMTPUTF8"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(
        s.cmd("MAIL FROM:<a@b.example>").await,
        "530 5.7.57 Client not authenticated to send mail"
    );
    let tok = token(&ft).await;
    assert_eq!(s.cmd("AUTH XOAUTH2").await, "334 ");
    assert_eq!(
        s.cmd(&xoauth2("Relay@Contoso.example", &tok)).await,
        "235 2.7.0 Authentication successful"
    );
    let data = b"From: relay@contoso.example\r\nSubject: t\r\n\r\n..leading dot\r\nline\r\n.\r\n";
    // The same message dot-stuffed on the wire: every line starting with '.' gets one more.
    let wire = b"From: relay@contoso.example\r\nSubject: t\r\n\r\n...leading dot\r\nline\r\n..\r\n";
    let reply = send_message(&mut s, MAILBOX, &["x@y.example", "z@y.example"], wire).await;
    assert!(reply.starts_with("250 2.0.0 OK <"), "{reply}");
    assert!(reply.ends_with("[Hostname=FAKE0000]"), "{reply}");
    assert!(s.cmd("QUIT").await.starts_with("221 "));

    let received = fx.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].data, data);
    assert_eq!(received[0].mail_from, MAILBOX);
    assert_eq!(received[0].rcpt_to, ["x@y.example", "z@y.example"]);
    assert_eq!(received[0].auth_user, "Relay@Contoso.example");
    assert!(!fx.bare_lf_seen());
    let auths = fx.auths();
    assert_eq!(auths.len(), 1);
    assert!(auths[0].accepted && !auths[0].inline && !auths[0].expired && !auths[0].unknown);
    assert_eq!(fx.counts(), (1, data.len() as u64, 2));
}

#[tokio::test]
async fn exchange_accepts_inline_xoauth2_unless_strict() {
    let (ft, fx) = start().await;
    let tok = token(&ft).await;
    let (mut s, _) = tls(&fx).await;
    let line = format!("AUTH XOAUTH2 {}", xoauth2(MAILBOX, &tok));
    assert!(line.len() > 2000);
    assert_eq!(s.cmd(&line).await, "235 2.7.0 Authentication successful");
    // Pipelined transaction (one write), with a bare LF in the body.
    s.send(
        b"MAIL FROM:<relay@contoso.example>\r\nRCPT TO:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n",
    )
    .await;
    assert_eq!(s.reply().await, "250 2.1.0 Sender OK");
    assert_eq!(s.reply().await, "250 2.1.5 Recipient OK");
    assert_eq!(s.reply().await, "250 2.1.5 Recipient OK");
    assert!(s.reply().await.starts_with("354 "));
    s.send(b"Subject: x\r\n\r\nbare\nlf\r\n.\r\n").await;
    assert!(s.reply().await.starts_with("250 2.0.0 OK"));
    assert!(fx.bare_lf_seen());
    assert!(fx.auths()[0].inline);

    fx.set_strict_line_length(true);
    let (mut s, _) = tls(&fx).await;
    assert_eq!(s.cmd(&line).await, "500 5.5.2 Line too long");
    let long = format!("NOOP {}", "x".repeat(600));
    assert_eq!(s.cmd(&long).await, "500 5.5.2 Line too long");
    assert_eq!(s.cmd("NOOP").await, "250 2.0.0 OK");
}

#[tokio::test]
async fn exchange_rejects_expired_unknown_and_foreign_tokens() {
    let ft = FakeToken::start(Duration::from_secs(3600)).await;
    let fx = FakeExchange::start(ft.issued(), MAILBOX).await;
    let tok = token(&ft).await;
    // Expired now, without waiting for a clock.
    ft.issued().expire_all();
    let (mut s, reply) = authed(&fx, MAILBOX, &tok).await;
    assert_eq!(
        reply,
        "535 5.7.3 Authentication unsuccessful [SN4PR0501CA0000.namprd05.prod.outlook.com]"
    );
    // The session goes on: a fresh token works.
    ft.set_lifetime(Duration::from_secs(60));
    let fresh = token(&ft).await;
    assert_eq!(s.cmd("AUTH XOAUTH2").await, "334 ");
    assert!(s.cmd(&xoauth2(MAILBOX, &fresh)).await.starts_with("235 "));

    let (_, reply) = authed(&fx, MAILBOX, "not-a-token").await;
    assert!(reply.starts_with("535 5.7.3 "), "{reply}");
    let (_, reply) = authed(&fx, "other@contoso.example", &fresh).await;
    assert!(reply.starts_with("535 5.7.3 "), "{reply}");
    let (mut s, _) = tls(&fx).await;
    assert_eq!(s.cmd("AUTH XOAUTH2").await, "334 ");
    assert!(s.cmd("bm90IHhvYXV0aDI=").await.starts_with("501 5.5.124 "));

    let auths = fx.auths();
    assert_eq!(auths.len(), 5);
    assert!(auths[0].expired && !auths[0].accepted && !auths[0].unknown);
    assert!(auths[1].accepted);
    assert!(auths[2].unknown && !auths[2].accepted);
    assert!(!auths[3].unknown && !auths[3].expired && !auths[3].accepted);
    assert!(auths[4].malformed);
}

#[tokio::test]
async fn exchange_limits_concurrent_connections() {
    let (_ft, fx) = start().await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let (s, greeting) = plain(&fx).await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        open.push(s);
    }
    let (mut fourth, greeting) = plain(&fx).await;
    assert_eq!(
        greeting,
        "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
    );
    assert_eq!(fourth.reply().await, "", "closed after the 432");
    assert_eq!(fx.max_concurrent(), 3);
    assert_eq!(fx.rejected_connections(), 1);
    assert_eq!(fx.connections_total(), 4);

    let mut first = open.remove(0);
    assert!(first.cmd("QUIT").await.starts_with("221 "));
    drop(first);
    for _ in 0..100 {
        if fx.open_connections() < 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_again, greeting) = plain(&fx).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert_eq!(fx.max_concurrent(), 3);
    assert_eq!(fx.rejected_connections(), 1);
}

#[tokio::test]
async fn exchange_rules_reject_one_recipient_and_drop_after_dot() {
    let (ft, fx) = start().await;
    fx.add_rule(
        Rule::reply(
            Stage::Rcpt,
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        )
        .when("BAD@"),
    );
    let tok = token(&ft).await;
    let (mut s, reply) = authed(&fx, MAILBOX, &tok).await;
    assert!(reply.starts_with("235 "));
    assert!(
        s.cmd("MAIL FROM:<relay@contoso.example>")
            .await
            .starts_with("250 ")
    );
    assert!(s.cmd("RCPT TO:<good1@x.example>").await.starts_with("250 "));
    assert!(
        s.cmd("RCPT TO:<bad@x.example>")
            .await
            .starts_with("550 5.1.10 ")
    );
    assert!(s.cmd("RCPT TO:<good2@x.example>").await.starts_with("250 "));
    assert!(s.cmd("DATA").await.starts_with("354 "));
    s.send(b"Subject: a\r\n\r\nbody\r\n.\r\n").await;
    assert!(s.reply().await.starts_with("250 2.0.0 OK"));
    assert_eq!(
        fx.received()[0].rcpt_to,
        ["good1@x.example", "good2@x.example"]
    );

    // Connection lost after the final dot: the server has the message.
    fx.add_rule(Rule::drop_at(Stage::Dot).times(1));
    let reply = send_message(
        &mut s,
        MAILBOX,
        &["good1@x.example"],
        b"Subject: b\r\n\r\nb\r\n",
    )
    .await;
    assert_eq!(reply, "");
    assert!(fx.wait_for_received(2, Duration::from_secs(5)).await);
    assert_eq!(fx.received()[1].data, b"Subject: b\r\n\r\nb\r\n");

    // A 4xx at the dot: not stored; multi-line replies are formatted.
    fx.add_rule(
        Rule::reply(Stage::Dot, "451 4.7.500 Server busy\nTry again later").when("Subject: c"),
    );
    let (mut s, _) = authed(&fx, MAILBOX, &tok).await;
    let reply = send_message(
        &mut s,
        MAILBOX,
        &["a@x.example"],
        b"Subject: c\r\n\r\nc\r\n",
    )
    .await;
    assert_eq!(reply, "451-4.7.500 Server busy\n451 Try again later");
    assert_eq!(fx.received_count(), 2);

    // Greeting rule, once.
    fx.add_rule(
        Rule::reply(Stage::Greeting, "421 4.3.2 Service not available")
            .times(1)
            .then_drop(),
    );
    let (mut s, greeting) = plain(&fx).await;
    assert_eq!(greeting, "421 4.3.2 Service not available");
    assert_eq!(s.reply().await, "");
    let (_, greeting) = plain(&fx).await;
    assert!(greeting.starts_with("220 "));
}

#[tokio::test]
async fn exchange_checks_send_as_on_the_header_from() {
    let (ft, fx) = start().await;
    fx.set_send_as(Some(vec!["Shared@Contoso.example".into()]));
    let tok = token(&ft).await;
    let (mut s, _) = authed(&fx, MAILBOX, &tok).await;
    let denied = send_message(
        &mut s,
        MAILBOX,
        &["a@x.example"],
        b"Subject: x\r\nFrom: \"Printer\"\r\n <printer@contoso.example>\r\n\r\nx\r\n",
    )
    .await;
    assert_eq!(
        denied,
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
    );
    for from in ["RELAY@contoso.example", "Shared <shared@contoso.example>"] {
        let data = format!("from: {from}\r\n\r\nx\r\n");
        let ok = send_message(&mut s, MAILBOX, &["a@x.example"], data.as_bytes()).await;
        assert!(ok.starts_with("250 2.0.0 OK"), "{from}: {ok}");
    }
    assert_eq!(fx.received_count(), 2);
}

#[tokio::test]
async fn exchange_talks_to_lettre() {
    use lettre::transport::smtp::authentication::{Credentials, Mechanism};
    use lettre::transport::smtp::client::{
        AsyncSmtpConnection, Certificate, CertificateStore, TlsParameters,
    };
    use lettre::transport::smtp::extension::ClientId;
    install_provider();
    let (ft, fx) = start().await;
    let tok = token(&ft).await;
    let hello = ClientId::Domain("relay.test".into());
    let mut conn = AsyncSmtpConnection::connect_tokio1(
        fx.addr(),
        Some(Duration::from_secs(10)),
        &hello,
        None,
        None,
    )
    .await
    .unwrap();
    let params = TlsParameters::builder("localhost".into())
        .certificate_store(CertificateStore::None)
        .add_root_certificate(Certificate::from_pem(fx.ca_pem().as_bytes()).unwrap())
        .build_rustls()
        .unwrap();
    conn.starttls(params, &hello).await.unwrap();
    let response = conn
        .auth(
            &[Mechanism::Xoauth2],
            &Credentials::new(MAILBOX.into(), tok),
        )
        .await
        .unwrap();
    assert_eq!(response.code().to_string(), "235");
    let envelope = lettre::address::Envelope::new(
        Some(MAILBOX.parse().unwrap()),
        vec!["to@x.example".parse().unwrap()],
    )
    .unwrap();
    conn.send(&envelope, b"Subject: l\r\n\r\n.dot\r\n")
        .await
        .unwrap();
    conn.quit().await.unwrap();
    // lettre's `send`/`message` always appends "\r\n.\r\n": a message that already ends in
    // CRLF arrives with one extra empty line.
    assert_eq!(fx.received()[0].data, b"Subject: l\r\n\r\n.dot\r\n\r\n");
    assert!(fx.auths()[0].inline, "lettre sends XOAUTH2 inline");
}

#[tokio::test]
async fn exchange_hang_rule_never_answers_and_expire_all_invalidates_tokens() {
    let (ft, fx) = start().await;
    fx.add_rule(Rule::hang_at(Stage::Mail).times(1));
    let tok = token(&ft).await;
    let (mut s, _) = authed(&fx, MAILBOX, &tok).await;
    s.send(b"MAIL FROM:<relay@contoso.example>\r\n").await;
    // The fake says when it decided to hang (after sending everything it had): no reply can
    // come after that, so none may be waiting now.
    for _ in 0..200 {
        if fx.hung_connections() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fx.hung_connections(), 1);
    let waited = tokio::time::timeout(Duration::ZERO, s.reply()).await;
    assert!(waited.is_err(), "no reply: {waited:?}");
    assert_eq!(fx.open_connections(), 1, "a hanging session still counts");
    drop(s);
    for _ in 0..200 {
        if fx.open_connections() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fx.open_connections(), 0);

    ft.issued().expire_all();
    let (_, reply) = authed(&fx, MAILBOX, &tok).await;
    assert!(reply.starts_with("535 5.7.3 "), "{reply}");
    assert!(fx.auths()[1].expired);
}
