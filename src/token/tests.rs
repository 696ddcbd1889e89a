//! Token layer tests against a small fake token endpoint (HTTP/1.1 over a local TCP socket).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::secret::Secret;

const SECRET: &str = "s3cr3t~Value_with+special&chars=";

/// One scripted answer of the fake endpoint.
#[derive(Clone)]
enum Reply {
    Token {
        expires_in: u64,
    },
    Aadsts {
        status: u16,
        code: u32,
    },
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
}

struct Request {
    head: String,
    body: String,
    at: tokio::time::Instant,
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    requests: Vec<Request>,
    issued: u64,
}

/// Answers from the script, then tokens of `default_expires_in`; records every request.
struct FakeEndpoint {
    url: String,
    state: Arc<Mutex<State>>,
}

impl FakeEndpoint {
    async fn start(script: Vec<Reply>, default_expires_in: u64, delay: Duration) -> FakeEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/tenant/oauth2/v2.0/token",
            listener.local_addr().unwrap()
        );
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..State::default()
        }));
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let Some((head, body)) = read_request(&mut stream).await else {
                        return;
                    };
                    let reply = {
                        let mut state = state.lock().unwrap();
                        state.requests.push(Request {
                            head,
                            body,
                            at: tokio::time::Instant::now(),
                        });
                        let reply = state.script.pop_front().unwrap_or(Reply::Token {
                            expires_in: default_expires_in,
                        });
                        if matches!(reply, Reply::Token { .. }) {
                            state.issued += 1;
                        }
                        (reply, state.issued)
                    };
                    tokio::time::sleep(delay).await;
                    let response = render(reply.0, reply.1);
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        FakeEndpoint { url, state }
    }

    fn requests(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    fn creds(&self) -> ClientCredentials {
        ClientCredentials {
            token_url: self.url.clone(),
            client_id: "11111111-1111-1111-1111-111111111111".into(),
            scope: "https://outlook.office365.com/.default".into(),
            secret: ClientSecret::Secret(Secret::new(SECRET)),
        }
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    Some((head, body))
}

fn render(reply: Reply, issued: u64) -> String {
    let (status, extra, body) = match reply {
        Reply::Token { expires_in } => (
            200,
            String::new(),
            format!(
                r#"{{"token_type":"Bearer","expires_in":{expires_in},"ext_expires_in":{expires_in},"access_token":"tok-{issued}"}}"#
            ),
        ),
        Reply::Aadsts { status, code } => (
            status,
            String::new(),
            format!(
                r#"{{"error":"invalid_client","error_description":"AADSTS{code}: Invalid client secret provided. Trace ID: x","error_codes":[{code}]}}"#
            ),
        ),
        Reply::Status {
            status,
            retry_after,
        } => (
            status,
            retry_after
                .map(|s| format!("retry-after: {s}\r\n"))
                .unwrap_or_default(),
            r#"{"error":"temporarily_unavailable"}"#.to_string(),
        ),
    };
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
        body.len()
    )
}

fn client() -> reqwest::Client {
    http_client().unwrap()
}

fn decode_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                let s = s.replace('+', " ");
                let mut out = Vec::new();
                let bytes = s.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    if bytes[i] == b'%' {
                        out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                        i += 3;
                    } else {
                        out.push(bytes[i]);
                        i += 1;
                    }
                }
                String::from_utf8(out).unwrap()
            };
            (decode(k), decode(v))
        })
        .collect()
}

#[test]
fn refresh_at_follows_the_rule() {
    let min = |m: u64| Duration::from_secs(m * 60);
    assert_eq!(refresh_at(min(60)), min(48));
    // 80 % = 60 min leaves 15 min, already more than the 10-minute margin.
    assert_eq!(refresh_at(min(75)), min(60));
    assert_eq!(refresh_at(min(90)), min(72));
    // 80 % = 24 min would leave 6 min: moved to 20 min.
    assert_eq!(refresh_at(min(30)), min(20));
    // 10 minutes cannot remain: never before half the lifetime.
    assert_eq!(refresh_at(min(15)), Duration::from_secs(450));
    let short = refresh_at(Duration::from_secs(12));
    assert!(
        short >= Duration::from_secs(6) && short <= Duration::from_millis(9600),
        "{short:?}"
    );
    for secs in [1u64, 2, 12, 600, 1200, 3599, 4500, 5400] {
        let lifetime = Duration::from_secs(secs);
        let at = refresh_at(lifetime);
        assert!(
            at >= lifetime / 2 && at <= lifetime.mul_f64(0.8),
            "{secs}: {at:?}"
        );
        let jittered = handle::jittered(lifetime, 0.05);
        assert!(
            jittered <= at
                && jittered + Duration::from_millis(1) >= at.mul_f64(0.95).max(lifetime / 2),
            "{secs}: {jittered:?}"
        );
    }
}

#[test]
fn aadsts_codes_are_parsed() {
    assert_eq!(
        error::aadsts_code("AADSTS7000215: Invalid client secret"),
        Some(7000215)
    );
    assert_eq!(
        error::aadsts_code("x AADSTS90002: Tenant not found"),
        Some(90002)
    );
    assert_eq!(error::aadsts_code("no code"), None);
}

#[tokio::test]
async fn secret_goes_in_the_form_body_and_token_is_parsed() {
    let endpoint = FakeEndpoint::start(vec![], 3599, Duration::ZERO).await;
    let token = fetch(&client(), &endpoint.creds()).await.unwrap();
    assert_eq!(token.value.expose(), "tok-1");
    assert_eq!(token.lifetime, Duration::from_secs(3599));
    assert!(token.expires_in() > Duration::from_secs(3590));
    let debug = format!("{token:?}");
    assert!(
        !debug.contains("tok-1") && debug.contains("expires_in"),
        "{debug}"
    );

    let state = endpoint.state.lock().unwrap();
    let request = &state.requests[0];
    assert!(
        request.head.starts_with("POST /tenant/oauth2/v2.0/token "),
        "{}",
        request.head
    );
    let head = request.head.to_ascii_lowercase();
    assert!(
        !head.contains("authorization:"),
        "no HTTP Basic: {}",
        request.head
    );
    assert!(
        head.contains("content-type: application/x-www-form-urlencoded"),
        "{head}"
    );
    assert!(!request.head.contains(SECRET));
    let form = decode_form(&request.body);
    let get = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("grant_type"), Some("client_credentials"));
    assert_eq!(
        get("client_id"),
        Some("11111111-1111-1111-1111-111111111111")
    );
    assert_eq!(get("client_secret"), Some(SECRET));
    assert_eq!(get("scope"), Some("https://outlook.office365.com/.default"));
}

#[tokio::test]
async fn aadsts_error_is_explained_without_the_secret() {
    let endpoint = FakeEndpoint::start(
        vec![
            Reply::Aadsts {
                status: 401,
                code: 7000215,
            },
            Reply::Aadsts {
                status: 400,
                code: 90002,
            },
        ],
        3599,
        Duration::ZERO,
    )
    .await;
    let error = fetch(&client(), &endpoint.creds()).await.unwrap_err();
    assert_eq!(error.aadsts(), Some(7000215));
    assert_eq!(error.status(), Some(401));
    assert!(!error.is_temporary());
    assert!(
        error.remedy().contains("Value (not its Secret ID)"),
        "{}",
        error.remedy()
    );
    assert!(error.remedy().contains("Certificates & secrets"));
    assert_eq!(error.meaning(), "invalid client secret");
    let display = error.to_string();
    assert!(
        display.contains("AADSTS7000215") && display.contains("401"),
        "{display}"
    );
    for text in [display, format!("{error:?}"), error.remedy().to_string()] {
        assert!(!text.contains(SECRET), "{text}");
    }

    let error = fetch(&client(), &endpoint.creds()).await.unwrap_err();
    assert_eq!(error.aadsts(), Some(90002));
    assert!(error.remedy().contains("tenant_id"));
}

#[tokio::test]
async fn an_echoed_secret_is_scrubbed() {
    let creds = ClientCredentials {
        token_url: "http://unused".into(),
        client_id: "c".into(),
        scope: "s".into(),
        secret: ClientSecret::Secret(Secret::new(SECRET)),
    };
    let body = format!(
        r#"{{"error":"invalid_client","error_description":"AADSTS7000215: got {SECRET}"}}"#
    );
    let error = error::from_error_response(400, None, body.as_bytes(), &creds);
    assert_eq!(error.aadsts(), Some(7000215));
    assert!(!error.to_string().contains(SECRET) && !format!("{error:?}").contains(SECRET));
}

#[tokio::test]
async fn an_echoed_request_body_is_scrubbed() {
    // A proxy or endpoint that quotes the request body sends the secret form-encoded.
    let creds = ClientCredentials {
        token_url: "http://unused".into(),
        client_id: "c".into(),
        scope: "s".into(),
        secret: ClientSecret::Secret(Secret::new(SECRET)),
    };
    let encoded = "s3cr3t%7EValue_with%2Bspecial%26chars%3D";
    let lower = "s3cr3t%7eValue_with%2bspecial%26chars%3d";
    let jwt = "eyJhbGciOiJQUzI1NiJ9.eyJhdWQiOiJ4In0.c2lnbmF0dXJl-_x";
    let body = format!(
        r#"{{"error":"invalid_request","error_description":"AADSTS900144: body was grant_type=client_credentials&client_secret={encoded}&x={lower}","error_codes":[900144],"error_uri":"client_assertion={jwt}"}}"#
    );
    let error = error::from_error_response(400, None, body.as_bytes(), &creds);
    let body = format!(
        r#"{{"error":"client_assertion={jwt}","error_description":"AADSTS700027: assertion {jwt} rejected"}}"#
    );
    let cert_error = error::from_error_response(400, None, body.as_bytes(), &creds);
    for text in [
        error.to_string(),
        format!("{error:?}"),
        cert_error.to_string(),
        format!("{cert_error:?}"),
    ] {
        assert!(
            !text.contains(encoded) && !text.contains(lower) && !text.contains(jwt),
            "{text}"
        );
        assert!(!text.contains("c2lnbmF0dXJl"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
    }
    assert_eq!(cert_error.aadsts(), Some(700027));
}

#[tokio::test]
async fn throttling_and_server_errors_are_temporary() {
    let endpoint = FakeEndpoint::start(
        vec![
            Reply::Status {
                status: 429,
                retry_after: Some(7),
            },
            Reply::Status {
                status: 503,
                retry_after: None,
            },
        ],
        3599,
        Duration::ZERO,
    )
    .await;
    let error = fetch(&client(), &endpoint.creds()).await.unwrap_err();
    assert_eq!(error.status(), Some(429));
    assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
    assert!(error.is_temporary() && error.remedy().contains("retried"));
    let error = fetch(&client(), &endpoint.creds()).await.unwrap_err();
    assert_eq!(error.status(), Some(503));
    assert_eq!(error.retry_after(), None);
    assert!(error.is_temporary() && error.remedy().contains("retried"));
}

#[tokio::test]
async fn untrusted_expires_in_is_capped_at_a_day() {
    let sent = tokio::time::Instant::now();
    for (body, want) in [
        (
            r#"{"access_token":"abc","expires_in":18446744073709551615,"token_type":"Bearer"}"#,
            24 * 3600,
        ),
        (
            r#"{"access_token":"abc","expires_in":"18446744073709551615","token_type":"Bearer"}"#,
            24 * 3600,
        ),
        (
            r#"{"access_token":"abc","expires_in":9223372036854775808,"token_type":"Bearer"}"#,
            24 * 3600,
        ),
        (
            r#"{"access_token":"abc","expires_in":1e300,"token_type":"Bearer"}"#,
            24 * 3600,
        ),
        (
            r#"{"access_token":"abc","expires_in":3599,"token_type":"Bearer"}"#,
            3599,
        ),
    ] {
        let token = parse_token(200, body.as_bytes(), sent).unwrap();
        assert_eq!(token.lifetime, Duration::from_secs(want), "{body}");
        assert!(token.expires_at <= sent + Duration::from_secs(want));
        // What the refresher and the upstream compute from it must not overflow either.
        let _ = refresh_at(token.lifetime);
        let _ = handle::jittered(token.lifetime, 0.05);
        let _ = token.issued_at() + refresh_at(token.lifetime);
    }
}

#[tokio::test]
async fn a_huge_expires_in_from_the_endpoint_does_not_panic_the_refresher() {
    let endpoint = FakeEndpoint::start(vec![], u64::MAX, Duration::ZERO).await;
    let shutdown = CancellationToken::new();
    let handle = Refresher::spawn_with(client(), endpoint.creds(), shutdown.clone(), fast_policy());
    let token = handle.get().await.unwrap();
    assert_eq!(token.lifetime, Duration::from_secs(24 * 3600));
    // The refresher scheduled the renewal (it would have panicked computing the due time).
    tokio::task::yield_now().await;
    assert!(handle.current().is_some());
    shutdown.cancel();
}

#[test]
fn a_huge_retry_after_is_capped() {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::RETRY_AFTER,
        "18446744073709551615".parse().unwrap(),
    );
    let after = error::parse_retry_after(&headers).unwrap();
    assert!(after <= Duration::from_secs(24 * 3600), "{after:?}");
}

#[tokio::test]
async fn bad_json_is_reported_without_quoting_it() {
    let sent = tokio::time::Instant::now();
    let error = parse_token(
        200,
        br#"{"access_token":"abc","expires_in":"x","token_type":"Bearer"}"#,
        sent,
    )
    .unwrap_err();
    assert!(matches!(error, TokenError::BadResponse { .. }));
    assert!(!error.to_string().contains("abc"));
    assert!(parse_token(200, b"<html>", sent).is_err());
    // The v1.0 endpoint's string expires_in is accepted.
    let token = parse_token(
        200,
        br#"{"access_token":"abc","expires_in":"3599","token_type":"Bearer"}"#,
        sent,
    )
    .unwrap();
    assert_eq!(token.lifetime, Duration::from_secs(3599));
}

#[tokio::test]
async fn unreachable_endpoint_is_a_transport_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    drop(listener);
    let creds = ClientCredentials {
        token_url: url,
        client_id: "c".into(),
        scope: "s".into(),
        secret: ClientSecret::Secret(Secret::new(SECRET)),
    };
    let error = fetch(&client(), &creds).await.unwrap_err();
    assert!(matches!(error, TokenError::Transport(_)), "{error:?}");
    assert!(error.is_temporary());
    assert!(!error.to_string().contains(SECRET) && !format!("{error:?}").contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_refresh_is_single_flight() {
    let endpoint = FakeEndpoint::start(vec![], 3599, Duration::from_millis(200)).await;
    let handle = TokenHandle::new(client(), endpoint.creds());
    let stale = handle.get().await.unwrap();
    assert_eq!(endpoint.requests(), 1);
    assert_eq!(handle.current().unwrap().value.expose(), "tok-1");

    let calls = (0..20).map(|_| {
        let handle = handle.clone();
        let stale = stale.clone();
        tokio::spawn(async move { handle.force_refresh(&stale).await.unwrap() })
    });
    let results = futures_join(calls).await;
    assert_eq!(endpoint.requests(), 2, "one extra request for 20 callers");
    for token in &results {
        assert_eq!(token.value.expose(), "tok-2");
    }
    assert_eq!(handle.current().unwrap().value.expose(), "tok-2");
    // A caller that still holds the old token gets the new one without a request.
    handle.force_refresh(&stale).await.unwrap();
    assert_eq!(endpoint.requests(), 2);
    // A refusal of the new token does fetch again.
    handle.force_refresh(&results[0]).await.unwrap();
    assert_eq!(endpoint.requests(), 3);
}

async fn futures_join<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        out.push(
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_force_refresh_is_shared_too() {
    let endpoint = FakeEndpoint::start(vec![], 3599, Duration::from_millis(100)).await;
    let handle = TokenHandle::new(client(), endpoint.creds());
    let stale = handle.get().await.unwrap();
    endpoint
        .state
        .lock()
        .unwrap()
        .script
        .push_back(Reply::Status {
            status: 500,
            retry_after: None,
        });
    let calls = (0..10).map(|_| {
        let handle = handle.clone();
        let stale = stale.clone();
        tokio::spawn(async move { handle.force_refresh(&stale).await.is_err() })
    });
    assert!(futures_join(calls).await.into_iter().all(|failed| failed));
    assert_eq!(endpoint.requests(), 2);
    // The old token is still served while it is valid.
    assert_eq!(handle.current().unwrap().value.expose(), "tok-1");
}

/// Polls until `check` holds or `limit` passes.
async fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

fn fast_policy() -> RefreshPolicy {
    RefreshPolicy {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
        ..RefreshPolicy::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresher_honours_retry_after_and_backs_off() {
    let endpoint = FakeEndpoint::start(
        vec![
            Reply::Status {
                status: 429,
                retry_after: Some(1),
            },
            Reply::Status {
                status: 500,
                retry_after: None,
            },
        ],
        3599,
        Duration::ZERO,
    )
    .await;
    let shutdown = CancellationToken::new();
    let handle = Refresher::spawn_with(client(), endpoint.creds(), shutdown.clone(), fast_policy());
    assert!(wait_for(Duration::from_secs(10), || handle.current().is_some()).await);
    assert_eq!(handle.current().unwrap().value.expose(), "tok-1");
    let state = endpoint.state.lock().unwrap();
    assert_eq!(state.requests.len(), 3);
    let after_429 = state.requests[1].at - state.requests[0].at;
    let after_500 = state.requests[2].at - state.requests[1].at;
    assert!(
        after_429 >= Duration::from_millis(950),
        "Retry-After ignored: {after_429:?}"
    );
    assert!(after_429 < Duration::from_secs(3), "{after_429:?}");
    // Back-off doubled from 100 ms after the first failure.
    assert!(
        after_500 >= Duration::from_millis(190) && after_500 < Duration::from_millis(800),
        "{after_500:?}"
    );
    drop(state);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresher_renews_before_expiry_and_keeps_the_old_token_on_failure() {
    // 3 s tokens: renewed after 1.5 s (half the lifetime, since 10 minutes cannot remain).
    let endpoint = FakeEndpoint::start(vec![], 3, Duration::ZERO).await;
    let shutdown = CancellationToken::new();
    let handle = Refresher::spawn_with(client(), endpoint.creds(), shutdown.clone(), fast_policy());
    assert!(wait_for(Duration::from_secs(5), || handle.current().is_some()).await);
    let first = handle.current().unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || {
            handle.current().is_some_and(|t| t.value != first.value)
        })
        .await
    );
    assert_eq!(endpoint.requests(), 2);
    assert!(!first.is_expired(), "renewed before the old one expired");
    {
        let state = endpoint.state.lock().unwrap();
        let gap = state.requests[1].at - state.requests[0].at;
        assert!(
            gap >= Duration::from_millis(1400) && gap < Duration::from_millis(2900),
            "{gap:?}"
        );
    }

    // Now the endpoint fails: the current token is served until it expires, then nothing.
    {
        let mut state = endpoint.state.lock().unwrap();
        for _ in 0..100 {
            state.script.push_back(Reply::Aadsts {
                status: 401,
                code: 7000222,
            });
        }
    }
    let kept = handle.current().unwrap();
    assert!(wait_for(Duration::from_secs(5), || endpoint.requests() >= 4).await);
    // No new token was issued: whatever is served is the kept one, until it expires.
    if let Some(now) = handle.current() {
        assert_eq!(now.value, kept.value);
    }
    assert!(wait_for(Duration::from_secs(5), || handle.current().is_none()).await);

    // After shutdown no more requests.
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let count = endpoint.requests();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(endpoint.requests(), count);
}

/// A `MakeWriter` that collects log output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// Log lines of all tests. A global subscriber, not a scoped one: with a scoped dispatcher,
/// callsites first hit by tests on other threads cache "not interested" (tracing-core).
fn captured_logs() -> &'static Captured {
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in the lib tests");
        captured
    })
}

#[tokio::test]
async fn logs_explain_failures_once_and_never_show_secrets() {
    let captured = captured_logs();
    let endpoint = FakeEndpoint::start(
        vec![
            Reply::Aadsts {
                status: 401,
                code: 7000215,
            },
            Reply::Aadsts {
                status: 401,
                code: 7000215,
            },
        ],
        3599,
        Duration::ZERO,
    )
    .await;
    let handle = TokenHandle::new(client(), endpoint.creds());
    assert_eq!(handle.get().await.unwrap_err().aadsts(), Some(7000215));
    // Within a second the same failure is handed out without a request.
    assert!(handle.get().await.is_err());
    assert_eq!(endpoint.requests(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(handle.get().await.is_err());
    assert_eq!(endpoint.requests(), 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let token = handle.get().await.unwrap();
    // A later success is logged with expires_in only.
    handle.force_refresh(&token).await.unwrap();
    assert_eq!(endpoint.requests(), 4);

    let logs: String = String::from_utf8(captured.0.lock().unwrap().clone())
        .unwrap()
        .lines()
        .filter(|line| line.contains(&endpoint.url))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(logs.matches("token fetch failed").count(), 1, "{logs}");
    assert!(
        logs.contains("AADSTS7000215") && logs.contains("invalid client secret"),
        "{logs}"
    );
    assert!(logs.contains("Secret ID"), "remedy logged: {logs}");
    assert!(
        logs.contains("works again")
            && logs.contains("token fetched")
            && logs.contains("expires_in=3599"),
        "{logs}"
    );
    assert!(!logs.contains(SECRET) && !logs.contains("tok-"), "{logs}");
    assert!(!format!("{handle:?}").contains(token.value.expose()));
}

/// A self-signed RSA-2048 certificate and its private key (PKCS#8), both PEM.
fn rsa_certificate() -> (String, String, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["mailbridge.test".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), key.serialize_der())
}

fn certificate_creds(endpoint: &FakeEndpoint, secret: ClientSecret) -> ClientCredentials {
    ClientCredentials {
        secret,
        ..endpoint.creds()
    }
}

#[derive(serde::Deserialize)]
struct AssertionClaims {
    aud: String,
    iss: String,
    sub: String,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

/// Checks one recorded request's assertion; returns its `jti`.
fn check_assertion(request: &Request, url: &str, cert_pem: &str) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    use sha2::{Digest as _, Sha256};

    let form = decode_form(&request.body);
    let get = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("grant_type"), Some("client_credentials"));
    assert_eq!(
        get("client_id"),
        Some("11111111-1111-1111-1111-111111111111")
    );
    assert_eq!(get("scope"), Some("https://outlook.office365.com/.default"));
    assert_eq!(get("client_secret"), None, "{}", request.body);
    assert_eq!(
        get("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    let jwt = get("client_assertion").expect("client_assertion");
    assert!(!request.body.contains("PRIVATE KEY"));

    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, Algorithm::PS256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    assert_eq!(
        header.x5t_s256.as_deref(),
        Some(
            URL_SAFE_NO_PAD
                .encode(Sha256::digest(der.as_ref()))
                .as_str()
        )
    );
    let sha1 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &der);
    let x5t = header.x5t.as_deref().unwrap();
    assert_eq!(x5t, URL_SAFE_NO_PAD.encode(sha1.as_ref()));
    assert_eq!(URL_SAFE_NO_PAD.decode(x5t).unwrap().len(), 20);

    // The signature verifies with the certificate's public key; aud, exp and nbf are checked.
    let key = DecodingKey::from_rsa_pem(cert_pem.as_bytes()).unwrap();
    let mut validation = Validation::new(Algorithm::PS256);
    validation.set_audience(&[url]);
    validation.set_issuer(&["11111111-1111-1111-1111-111111111111"]);
    validation.validate_nbf = true;
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
    let claims = jsonwebtoken::decode::<AssertionClaims>(jwt, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims.aud, url);
    assert_eq!(claims.iss, "11111111-1111-1111-1111-111111111111");
    assert_eq!(claims.sub, claims.iss);
    assert!(uuid::Uuid::parse_str(&claims.jti).is_ok(), "{}", claims.jti);
    let now = jsonwebtoken::get_current_timestamp();
    assert!(
        claims.nbf <= now && claims.nbf + 60 >= now,
        "{}",
        claims.nbf
    );
    assert_eq!(claims.iat, claims.nbf);
    assert_eq!(claims.exp, claims.nbf + 600);

    // A different key does not verify it.
    let (other_pem, _, _) = rsa_certificate();
    let other = DecodingKey::from_rsa_pem(other_pem.as_bytes()).unwrap();
    assert!(jsonwebtoken::decode::<AssertionClaims>(jwt, &other, &validation).is_err());
    claims.jti
}

#[tokio::test]
async fn certificate_sends_a_signed_client_assertion() {
    let (cert_pem, key_pem, _) = rsa_certificate();
    let secret =
        ClientSecret::certificate_from_pem(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap();
    let endpoint = FakeEndpoint::start(vec![], 3599, Duration::ZERO).await;
    let creds = certificate_creds(&endpoint, secret);
    let token = fetch(&client(), &creds).await.unwrap();
    assert_eq!(token.value.expose(), "tok-1");
    fetch(&client(), &creds).await.unwrap();

    let state = endpoint.state.lock().unwrap();
    assert_eq!(state.requests.len(), 2);
    assert!(
        !state.requests[0]
            .head
            .to_ascii_lowercase()
            .contains("authorization:")
    );
    let first = check_assertion(&state.requests[0], &endpoint.url, &cert_pem);
    let second = check_assertion(&state.requests[1], &endpoint.url, &cert_pem);
    assert_ne!(first, second, "a fresh jti per request");
}

#[tokio::test]
async fn certificate_accepts_a_pkcs1_key() {
    let (cert_pem, _, pkcs8) = rsa_certificate();
    // PKCS#8 of an RSA-2048 key: SEQUENCE { version, AlgorithmIdentifier, OCTET STRING (82 len)
    // { PKCS#1 RSAPrivateKey } }; the PKCS#1 key starts at byte 26.
    assert_eq!(&pkcs8[22..24], &[0x04, 0x82]);
    let pkcs1 = &pkcs8[26..];
    let pem = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs1);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----\n",
            lines.join("\n")
        )
    };
    let secret = ClientSecret::certificate_from_pem(cert_pem.as_bytes(), pem.as_bytes()).unwrap();
    let endpoint = FakeEndpoint::start(vec![], 3599, Duration::ZERO).await;
    fetch(&client(), &certificate_creds(&endpoint, secret))
        .await
        .unwrap();
    let state = endpoint.state.lock().unwrap();
    check_assertion(&state.requests[0], &endpoint.url, &cert_pem);
}

#[test]
fn certificate_debug_and_errors_show_no_key_material() {
    let (cert_pem, key_pem, _) = rsa_certificate();
    let secret =
        ClientSecret::certificate_from_pem(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap();
    let creds = ClientCredentials {
        token_url: "http://unused".into(),
        client_id: "c".into(),
        scope: "s".into(),
        secret,
    };
    let debug = format!("{creds:?} {:#?}", creds.secret);
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let cert_body: String = cert_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(
        !debug.contains("PRIVATE") && !debug.contains("BEGIN"),
        "{debug}"
    );
    for line in key_pem.lines().chain(cert_pem.lines()) {
        assert!(!debug.contains(line), "{debug}");
    }
    assert!(!debug.contains(&key_body[..40]) && !debug.contains(&cert_body[..40]));
    assert!(debug.contains("[redacted]"), "{debug}");

    // Bad input is refused at load time, without quoting it.
    let garbage = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n";
    for (cert, key) in [
        (cert_pem.as_str(), garbage),
        (cert_pem.as_str(), ""),
        ("", key_pem.as_str()),
        (key_pem.as_str(), cert_pem.as_str()),
    ] {
        let error =
            ClientSecret::certificate_from_pem(cert.as_bytes(), key.as_bytes()).unwrap_err();
        assert!(
            !error.contains("bm90") && !error.contains(&key_body[..40]),
            "{error}"
        );
    }
    // An EC key is not an RSA key.
    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    assert!(
        ClientSecret::certificate_from_pem(cert_pem.as_bytes(), ec.serialize_pem().as_bytes())
            .is_err()
    );
}

#[test]
fn certificate_with_someone_elses_key_is_refused_at_load() {
    let (cert_pem, _, _) = rsa_certificate();
    let (_, other_key, _) = rsa_certificate();
    let e =
        ClientSecret::certificate_from_pem(cert_pem.as_bytes(), other_key.as_bytes()).unwrap_err();
    assert!(e.contains("does not belong to the certificate"), "{e}");
    assert!(!e.contains("PRIVATE KEY-----"), "{e}");
    // The matching pair loads.
    let (cert_pem, key_pem, _) = rsa_certificate();
    assert!(ClientSecret::certificate_from_pem(cert_pem.as_bytes(), key_pem.as_bytes()).is_ok());
}

#[test]
fn extra_roots_for_the_token_endpoint_must_be_pem_certificates() {
    let (cert_pem, _, _) = rsa_certificate();
    assert!(http_client_with_roots(Some(cert_pem.as_bytes())).is_ok());
    let e = http_client_with_roots(Some(
        b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    ))
    .unwrap_err();
    assert!(e.contains("ca_file"), "{e}");
}

#[test]
fn certificate_expiry_is_warned_30_days_ahead() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["mailbridge.test".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2030, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    let ClientSecret::Certificate(c) =
        ClientSecret::certificate_from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .unwrap()
    else {
        panic!("certificate expected")
    };
    let not_after = 1_893_456_000; // 2030-01-01T00:00:00Z
    assert_eq!(c.not_after(), Some(not_after));
    assert_eq!(c.expiry_warning(not_after - 40 * 86_400), None);
    let soon = c.expiry_warning(not_after - 10 * 86_400).unwrap();
    assert!(
        soon.contains("in 10 days") && soon.contains("Certificates & secrets"),
        "{soon}"
    );
    let gone = c.expiry_warning(not_after + 1).unwrap();
    assert!(gone.contains("expired on Tue, 01 Jan 2030"), "{gone}");
}

/// AADSTS700016 is a wrong client or tenant ID, never a consent problem (issue 8, section 5):
/// sending an admin to the consent screen wastes the first hour of a set-up.
#[test]
fn aadsts700016_points_at_the_ids_not_at_consent() {
    let error = TokenError::Endpoint {
        status: 400,
        error: Some("unauthorized_client".into()),
        description: Some("AADSTS700016: Application with identifier 'x' was not found".into()),
        aadsts: Some(700016),
        retry_after: None,
    };
    let remedy = error.remedy();
    assert!(
        remedy.contains("client_id") && remedy.contains("tenant_id"),
        "{remedy}"
    );
    assert!(!remedy.contains("grant"), "{remedy}");
    assert!(remedy.contains("not a consent problem"), "{remedy}");
}

#[tokio::test]
async fn facts_show_expiry_and_the_last_error_until_a_success() {
    let endpoint = FakeEndpoint::start(
        vec![Reply::Aadsts {
            status: 401,
            code: 7000215,
        }],
        3599,
        Duration::ZERO,
    )
    .await;
    let handle = TokenHandle::new(client(), endpoint.creds());
    assert_eq!(handle.facts(), super::TokenFacts::default());
    assert!(handle.get().await.is_err());
    let facts = handle.facts();
    assert_eq!(facts.expires_ms, None);
    let error = facts.last_error.unwrap();
    assert!(
        error.contains("AADSTS7000215") && error.contains("invalid client secret"),
        "{error}"
    );
    assert!(error.contains("fix: "), "{error}");
    assert!(!error.contains(SECRET), "{error}");
    assert!(facts.last_error_ms.is_some());
    // A failure is handed out again for a second (FAILURE_REUSE): wait past it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    handle.get().await.unwrap();
    let facts = handle.facts();
    assert_eq!(facts.last_error, None);
    let left = facts.expires_ms.unwrap() - crate::spool::now_ms();
    assert!((3_000_000..=3_599_000).contains(&left), "{left}");
}
