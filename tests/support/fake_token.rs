//! A fake Entra ID (Azure AD) OAuth 2.0 token endpoint for the client-credentials grant:
//! plain HTTP/1.1 on 127.0.0.1, one request per connection (`Connection: close`).
//!
//! It issues JWT-shaped access tokens (1.5+ KB, like real ones) and records them in an
//! [`Issued`] registry that the fake Exchange server checks at `AUTH XOAUTH2`.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The tenant in the token URL path.
pub const TENANT: &str = "contoso-tenant";
/// The tenant id (`tid`) in issued tokens.
pub const TENANT_ID: &str = "c0de0000-7e57-4f4e-a6e0-000000000001";
/// The audience of issued tokens.
pub const AUDIENCE: &str = "https://outlook.office365.com";
/// `client_assertion_type` for a JWT bearer assertion.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// One issued access token.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// Real clock (`std::time::Instant`), not tokio's paused clock.
    pub expires_at: Instant,
    pub client_id: String,
    pub scope: String,
}

/// Registry of issued tokens (token string -> details), shared with the fake Exchange server.
#[derive(Clone, Default)]
pub struct Issued(pub Arc<Mutex<HashMap<String, IssuedToken>>>);

impl Issued {
    pub fn new() -> Issued {
        Issued::default()
    }

    /// The details of `token`, if this endpoint issued it.
    pub fn get(&self, token: &str) -> Option<IssuedToken> {
        self.0.lock().unwrap().get(token).cloned()
    }

    /// Number of tokens issued so far.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a token by hand (e.g. for a server-only test).
    pub fn insert(&self, token: &str, details: IssuedToken) {
        self.0.lock().unwrap().insert(token.to_string(), details);
    }

    /// Makes every token issued so far expired (the server then answers 535 5.7.3).
    pub fn expire_all(&self) {
        let now = Instant::now();
        for t in self.0.lock().unwrap().values_mut() {
            t.expires_at = now;
        }
    }

    /// Forgets every token issued so far (the server then treats them as unknown: 535 5.7.3).
    pub fn revoke_all(&self) {
        self.0.lock().unwrap().clear();
    }
}

/// A scripted failure of the token endpoint.
#[derive(Clone, Debug)]
pub enum Failure {
    /// `status` with `{"error": error, "error_description": "<code>: ...", "error_codes": [..]}`;
    /// `code` is like `"AADSTS7000215"`.
    Aadsts {
        status: u16,
        error: &'static str,
        code: &'static str,
    },
    /// 429 with `Retry-After: N` (seconds).
    RetryAfter(u64),
    /// 500 with a JSON error body.
    ServerError,
}

impl Failure {
    /// 401 invalid_client AADSTS7000215 (invalid client secret).
    pub fn invalid_secret() -> Failure {
        Failure::Aadsts {
            status: 401,
            error: "invalid_client",
            code: "AADSTS7000215",
        }
    }
}

struct CertCheck {
    pem: String,
    x5t_s256: String,
    x5t: String,
}

struct State {
    lifetime: Duration,
    /// `expires_in` claimed in the response instead of the real lifetime (a lying endpoint).
    claimed_expires_in: Option<u64>,
    requests: usize,
    fail_next: VecDeque<Failure>,
    fail_always: Option<Failure>,
    cert: Option<CertCheck>,
    secret: Option<String>,
    client_id: Option<String>,
    roles: Vec<String>,
    audience: String,
    forms: Vec<Vec<(String, String)>>,
    delay: Duration,
}

struct Shared {
    url: String,
    issued: Issued,
    state: Mutex<State>,
}

/// The fake token endpoint. Dropping it stops accepting connections.
pub struct FakeToken {
    shared: Arc<Shared>,
    accept: tokio::task::AbortHandle,
}

impl Drop for FakeToken {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeToken {
    /// Binds 127.0.0.1:0; issued tokens live `lifetime` (`expires_in` = whole seconds of it).
    pub async fn start(lifetime: Duration) -> FakeToken {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/{TENANT}/oauth2/v2.0/token",
            listener.local_addr().unwrap()
        );
        let shared = Arc::new(Shared {
            url,
            issued: Issued::new(),
            state: Mutex::new(State {
                lifetime,
                claimed_expires_in: None,
                requests: 0,
                fail_next: VecDeque::new(),
                fail_always: None,
                cert: None,
                secret: None,
                client_id: None,
                roles: vec!["SMTP.SendAsApp".to_string()],
                audience: AUDIENCE.to_string(),
                forms: Vec::new(),
                delay: Duration::ZERO,
            }),
        });
        let accept_shared = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = accept_shared.clone();
                tokio::spawn(async move { serve(shared, stream).await });
            }
        })
        .abort_handle();
        FakeToken { shared, accept }
    }

    /// `http://127.0.0.1:PORT/contoso-tenant/oauth2/v2.0/token`.
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// The registry of issued tokens (give it to `FakeExchange::start`).
    pub fn issued(&self) -> Issued {
        self.shared.issued.clone()
    }

    /// Requests served so far (including failed and malformed ones).
    pub fn requests(&self) -> usize {
        self.state().requests
    }

    pub fn set_lifetime(&self, d: Duration) {
        self.state().lifetime = d;
    }

    /// Responses claim `expires_in` (and `ext_expires_in`) = `secs` whatever the tokens
    /// really live (`None`: the truth). For untrusted-number tests, e.g. `u64::MAX`.
    pub fn claim_expires_in(&self, secs: Option<u64>) {
        self.state().claimed_expires_in = secs;
    }

    /// The next `n` requests fail like `f` (queued after any failures already scheduled).
    pub fn fail_next(&self, n: usize, f: Failure) {
        let mut s = self.state();
        for _ in 0..n {
            s.fail_next.push_back(f.clone());
        }
    }

    /// Every request (after the `fail_next` ones) fails like this; `None` stops it.
    pub fn fail_always(&self, f: Option<Failure>) {
        self.state().fail_always = f;
    }

    /// From now on require a `client_assertion` signed by this certificate's key (PS256 or
    /// RS256) with `x5t#S256` (or `x5t`) = its thumbprint; `client_secret` is then refused.
    pub fn expect_certificate(&self, cert_pem: &str) {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject as _;
        use sha2::{Digest as _, Sha256};
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("a PEM certificate");
        jsonwebtoken::DecodingKey::from_rsa_pem(cert_pem.as_bytes()).expect("an RSA certificate");
        let sha1 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &der);
        self.state().cert = Some(CertCheck {
            pem: cert_pem.to_string(),
            x5t_s256: URL_SAFE_NO_PAD.encode(Sha256::digest(der.as_ref())),
            x5t: URL_SAFE_NO_PAD.encode(sha1.as_ref()),
        });
    }

    /// `Some(s)`: only this `client_secret` is valid (else 401 AADSTS7000215). Default: any
    /// non-empty secret.
    pub fn set_secret(&self, secret: Option<&str>) {
        self.state().secret = secret.map(str::to_string);
    }

    /// `Some(id)`: only this `client_id` is known (else 400 AADSTS700016). Default: any.
    pub fn set_client_id(&self, client_id: Option<&str>) {
        self.state().client_id = client_id.map(str::to_string);
    }

    /// The `roles` claim of tokens issued from now on (default `["SMTP.SendAsApp"]`).
    pub fn set_roles(&self, roles: Vec<String>) {
        self.state().roles = roles;
    }

    /// The `aud` claim of tokens issued from now on (default [`AUDIENCE`]).
    pub fn set_audience(&self, aud: &str) {
        self.state().audience = aud.to_string();
    }

    /// Delay before every response (for client timeout tests).
    pub fn set_delay(&self, d: Duration) {
        self.state().delay = d;
    }

    /// Decoded form fields of the last request.
    pub fn last_form(&self) -> Vec<(String, String)> {
        self.state().forms.last().cloned().unwrap_or_default()
    }

    /// Decoded form fields of every request, in order.
    pub fn forms(&self) -> Vec<Vec<(String, String)>> {
        self.state().forms.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }
}

struct Response {
    status: u16,
    headers: String,
    body: String,
}

fn json_error(status: u16, error: &str, code: &str, text: &str) -> Response {
    let number = code.trim_start_matches("AADSTS");
    let codes = if number.chars().all(|c| c.is_ascii_digit()) && !number.is_empty() {
        number.to_string()
    } else {
        String::new()
    };
    let body = serde_json::json!({
        "error": error,
        "error_description": format!(
            "{code}: {text} Trace ID: 00000000-0000-0000-0000-000000000000 \
             Correlation ID: 00000000-0000-0000-0000-000000000000 Timestamp: 2025-01-01 00:00:00Z"
        ),
        "error_codes": serde_json::from_str::<serde_json::Value>(&format!("[{codes}]")).unwrap(),
        "timestamp": "2025-01-01 00:00:00Z",
        "trace_id": "00000000-0000-0000-0000-000000000000",
        "correlation_id": "00000000-0000-0000-0000-000000000000",
    });
    Response {
        status,
        headers: String::new(),
        body: body.to_string(),
    }
}

fn failure_response(f: &Failure) -> Response {
    match f {
        Failure::Aadsts {
            status,
            error,
            code,
        } => {
            let text = match *code {
                "AADSTS7000215" => "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                "AADSTS7000222" => "The provided client secret keys for app are expired.",
                "AADSTS700016" => "Application with identifier was not found in the directory.",
                "AADSTS90002" => "Tenant not found.",
                "AADSTS700027" => "Client assertion failed signature validation.",
                _ => "Scripted failure.",
            };
            json_error(*status, error, code, text)
        }
        Failure::RetryAfter(secs) => Response {
            status: 429,
            headers: format!("Retry-After: {secs}\r\n"),
            body: r#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: The server terminated an operation because it encountered a client request loop."}"#.to_string(),
        },
        Failure::ServerError => Response {
            status: 500,
            headers: String::new(),
            body: r#"{"error":"server_error","error_description":"AADSTS90033: A transient error has occurred. Please try again."}"#.to_string(),
        },
    }
}

async fn serve(shared: Arc<Shared>, mut stream: TcpStream) {
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    let (response, delay) = handle(&shared, request);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Error",
    };
    let text = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Content-Length: {}\r\nCache-Control: no-store, no-cache\r\n{}Connection: close\r\n\r\n{}",
        response.status,
        response.body.len(),
        response.headers,
        response.body
    );
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.shutdown().await;
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    if length > 1024 * 1024 {
        return None;
    }
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        path,
        headers,
        body: buf[head_end..head_end + length].to_vec(),
    })
}

/// Decodes `application/x-www-form-urlencoded` (`+` = space, `%XX`).
pub fn decode_form(body: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn handle(shared: &Shared, request: Request) -> (Response, Duration) {
    let mut state = shared.state.lock().unwrap();
    state.requests += 1;
    let form = decode_form(&String::from_utf8_lossy(&request.body));
    state.forms.push(form.clone());
    let delay = state.delay;
    let response = decide(shared, &mut state, &request, &form);
    (response, delay)
}

fn decide(
    shared: &Shared,
    state: &mut State,
    request: &Request,
    form: &[(String, String)],
) -> Response {
    let path = request.path.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if segments.len() != 4 || segments[1..] != ["oauth2", "v2.0", "token"] {
        return Response {
            status: 404,
            headers: String::new(),
            body: r#"{"error":"not_found"}"#.to_string(),
        };
    }
    if request.method != "POST" {
        return json_error(
            405,
            "invalid_request",
            "AADSTS900561",
            "The endpoint only accepts POST requests.",
        );
    }
    if segments[0] != TENANT {
        return json_error(
            400,
            "invalid_request",
            "AADSTS90002",
            "Tenant not found. Check to make sure you have the correct tenant ID.",
        );
    }
    if let Some(f) = state.fail_next.pop_front() {
        return failure_response(&f);
    }
    if let Some(f) = &state.fail_always {
        return failure_response(f);
    }
    let content_type = request
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return json_error(
            400,
            "invalid_request",
            "AADSTS900144",
            "The request body must contain the following parameter: 'grant_type'. \
             (Content-Type is not application/x-www-form-urlencoded.)",
        );
    }
    let get = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    match get("grant_type") {
        Some("client_credentials") => {}
        Some(_) => {
            return json_error(
                400,
                "unsupported_grant_type",
                "AADSTS70003",
                "The app requested an unsupported grant type.",
            );
        }
        None => {
            return json_error(
                400,
                "invalid_request",
                "AADSTS900144",
                "The request body must contain the following parameter: 'grant_type'.",
            );
        }
    }
    let Some(client_id) = get("client_id").filter(|c| !c.is_empty()) else {
        return json_error(
            400,
            "invalid_request",
            "AADSTS900144",
            "The request body must contain the following parameter: 'client_id'.",
        );
    };
    let Some(scope) = get("scope").filter(|s| !s.is_empty()) else {
        return json_error(
            400,
            "invalid_request",
            "AADSTS900144",
            "The request body must contain the following parameter: 'scope'.",
        );
    };
    if !scope.ends_with("/.default") {
        return json_error(
            400,
            "invalid_scope",
            "AADSTS1002012",
            "The provided value for scope is not valid. Client credential flows must have a \
             scope value with /.default suffixed to the resource identifier.",
        );
    }
    if let Some(known) = &state.client_id
        && known != client_id
    {
        return json_error(
            400,
            "unauthorized_client",
            "AADSTS700016",
            "Application with identifier was not found in the directory.",
        );
    }
    let secret = get("client_secret");
    let assertion = get("client_assertion");
    match (secret, assertion) {
        (Some(_), Some(_)) => {
            return json_error(
                400,
                "invalid_request",
                "AADSTS90024",
                "Only one of client_secret and client_assertion may be sent.",
            );
        }
        (None, None) => {
            return json_error(
                401,
                "invalid_client",
                "AADSTS7000218",
                "The request body must contain the following parameter: 'client_assertion' \
                 or 'client_secret'.",
            );
        }
        (Some(secret), None) => {
            let ok = state.cert.is_none()
                && !secret.is_empty()
                && state.secret.as_deref().is_none_or(|s| s == secret);
            if !ok {
                return failure_response(&Failure::invalid_secret());
            }
        }
        (None, Some(jwt)) => {
            if get("client_assertion_type") != Some(ASSERTION_TYPE) {
                return json_error(
                    400,
                    "invalid_request",
                    "AADSTS50027",
                    "Invalid client_assertion_type.",
                );
            }
            if let Err(why) = verify_assertion(state, jwt, &shared.url, client_id) {
                return json_error(
                    400,
                    "invalid_client",
                    "AADSTS700027",
                    &format!("Client assertion failed signature validation. ({why})"),
                );
            }
        }
    }
    let lifetime = state.lifetime;
    let token = make_token(client_id, &state.roles, &state.audience, lifetime);
    shared.issued.insert(
        &token,
        IssuedToken {
            expires_at: Instant::now() + lifetime,
            client_id: client_id.to_string(),
            scope: scope.to_string(),
        },
    );
    let secs = state.claimed_expires_in.unwrap_or(lifetime.as_secs());
    let body = serde_json::json!({
        "token_type": "Bearer",
        "expires_in": secs,
        "ext_expires_in": secs,
        "access_token": token,
    });
    Response {
        status: 200,
        headers: String::new(),
        body: body.to_string(),
    }
}

fn verify_assertion(state: &State, jwt: &str, url: &str, client_id: &str) -> Result<(), String> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let Some(cert) = &state.cert else {
        return Err("no certificate is registered for the application".into());
    };
    let header = jsonwebtoken::decode_header(jwt).map_err(|e| format!("header: {e}"))?;
    if !matches!(header.alg, Algorithm::PS256 | Algorithm::RS256) {
        return Err(format!("unsupported alg {:?}", header.alg));
    }
    match (&header.x5t_s256, &header.x5t) {
        (Some(t), _) if *t == cert.x5t_s256 => {}
        (None, Some(t)) if *t == cert.x5t => {}
        _ => return Err("x5t#S256 does not match a registered certificate".into()),
    }
    let key = DecodingKey::from_rsa_pem(cert.pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(header.alg);
    validation.algorithms = vec![Algorithm::PS256, Algorithm::RS256];
    validation.set_audience(&[url]);
    validation.set_issuer(&[client_id]);
    validation.sub = Some(client_id.to_string());
    validation.leeway = 0;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    jsonwebtoken::decode::<serde_json::Value>(jwt, &key, &validation)
        .map(|_| ())
        .map_err(|e| format!("{:?}", e.kind()))
}

fn make_token(client_id: &str, roles: &[String], audience: &str, lifetime: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "RS256",
        "x5t": "fake-x5t",
        "kid": "fake-kid",
    });
    let jti = uuid::Uuid::now_v7().to_string();
    // Real tokens carry ~1.5-2.5 KB; pad with deterministic filler derived from the jti.
    let pad: String = jti
        .bytes()
        .filter(|b| b.is_ascii_alphanumeric())
        .cycle()
        .take(1200)
        .map(char::from)
        .collect();
    let payload = serde_json::json!({
        "aud": audience,
        "iss": format!("https://sts.windows.net/{TENANT_ID}/"),
        "iat": now,
        "nbf": now,
        "exp": now + lifetime.as_secs(),
        "aio": "fake",
        "app_displayname": "mailbridge-test",
        "appid": client_id,
        "appidacr": "1",
        "idp": format!("https://sts.windows.net/{TENANT_ID}/"),
        "oid": "00000000-0000-0000-0000-00000000a11e",
        "roles": roles,
        "sid": jti,
        "sub": "00000000-0000-0000-0000-00000000a11e",
        "tid": TENANT_ID,
        "ver": "1.0",
        "jti": jti,
        "pad": pad,
    });
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        URL_SAFE_NO_PAD.encode("fake-signature"),
    )
}

/// Decodes the claims of a JWT-shaped token without checking anything (for assertions).
pub fn token_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}
