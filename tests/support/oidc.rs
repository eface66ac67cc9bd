//! A fake OpenID Connect issuer on 127.0.0.1 with the real wire protocol: discovery
//! (`/.well-known/openid-configuration`), a JWKS (`/jwks`, ES256 key `k1`), an authorization
//! endpoint (`/authorize`: answers 302 to the redirect URI with a one-time code, as if the
//! person had signed in) and a token endpoint (`/token`: checks the code, the redirect URI,
//! the PKCE verifier against the challenge and the client's credentials, and returns a signed
//! ID token). [`Behavior`] makes it misbehave the ways tests need (wrong audience, expired,
//! signed by a key it does not publish, an unknown kid, a chosen nonce).
#![allow(dead_code, reason = "each test file uses a different part of the fake")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const CLIENT_ID: &str = "chitin-test";

/// How the next ID tokens are made.
#[derive(Debug, Clone)]
pub struct Behavior {
    /// The `aud` claim (default: the client id).
    pub aud: Option<String>,
    /// `exp` relative to now, seconds (default 300).
    pub exp_in_s: i64,
    /// Sign with a key the JWKS does not publish (but name the published kid).
    pub rogue_signature: bool,
    /// The header's kid (default `k1`).
    pub kid: Option<String>,
    /// The `nonce` claim (default: the one the login sent).
    pub nonce: Option<String>,
    pub email: String,
    pub groups: Vec<String>,
    /// The client secret the token endpoint requires (HTTP Basic), if any.
    pub client_secret: Option<String>,
    /// Sign with the second key `k2`, which the JWKS publishes only after [`FakeIssuer::rotate`].
    pub second_key: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            aud: None,
            exp_in_s: 300,
            rogue_signature: false,
            kid: None,
            nonce: None,
            email: "alice@example.com".into(),
            groups: vec!["owners".into()],
            client_secret: None,
            second_key: false,
        }
    }
}

struct Code {
    nonce: String,
    challenge: String,
    redirect_uri: String,
}

struct Inner {
    behavior: Behavior,
    codes: HashMap<String, Code>,
    jwks_fetches: usize,
    /// Whether the JWKS also publishes `k2`.
    rotated: bool,
    /// Nonces of the ID tokens issued so far.
    issued_nonces: Vec<String>,
}

pub struct FakeIssuer {
    pub port: u16,
    inner: Arc<Mutex<Inner>>,
    key: Arc<Vec<u8>>,
    rogue: Arc<Vec<u8>>,
    jwk: Value,
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn jwk_of(kid: &str, public: &[u8]) -> Value {
    json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": b64(&public[1..33]), "y": b64(&public[33..65]),
    })
}

fn keypair() -> (Vec<u8>, Vec<u8>) {
    let rng = SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref()).unwrap();
    (doc.as_ref().to_vec(), kp.public_key().as_ref().to_vec())
}

impl FakeIssuer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (key, public) = keypair();
        let (rogue, _) = keypair();
        let (key2, public2) = keypair();
        assert_eq!(public.len(), 65);
        let jwk = jwk_of("k1", &public);
        let second = Arc::new((key2, jwk_of("k2", &public2)));
        let fake = Self {
            port,
            inner: Arc::new(Mutex::new(Inner {
                behavior: Behavior::default(),
                codes: HashMap::new(),
                jwks_fetches: 0,
                rotated: false,
                issued_nonces: Vec::new(),
            })),
            key: Arc::new(key),
            rogue: Arc::new(rogue),
            jwk,
        };
        let (inner, key, rogue, jwk) = (
            Arc::clone(&fake.inner),
            Arc::clone(&fake.key),
            Arc::clone(&fake.rogue),
            fake.jwk.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (inner, key, rogue, jwk, second) = (
                    Arc::clone(&inner),
                    Arc::clone(&key),
                    Arc::clone(&rogue),
                    jwk.clone(),
                    Arc::clone(&second),
                );
                std::thread::spawn(move || {
                    let _ = serve(stream, port, &inner, &key, &rogue, &jwk, &second);
                });
            }
        });
        fake
    }

    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, f: impl FnOnce(&mut Behavior)) {
        f(&mut self.inner.lock().unwrap().behavior);
    }

    /// Back to the default behavior (a rotation stays: `k2` keeps signing).
    pub fn reset(&self) {
        let mut g = self.inner.lock().unwrap();
        let rotated = g.rotated;
        g.behavior = Behavior::default();
        g.behavior.second_key = rotated;
    }

    /// Publishes a second key `k2` and signs the next ID tokens with it.
    pub fn rotate(&self) {
        let mut g = self.inner.lock().unwrap();
        g.rotated = true;
        g.behavior.second_key = true;
    }

    pub fn jwks_fetches(&self) -> usize {
        self.inner.lock().unwrap().jwks_fetches
    }

    pub fn issued_nonces(&self) -> Vec<String> {
        self.inner.lock().unwrap().issued_nonces.clone()
    }

    /// A JWT with these claims signed by the published key (`k1`), e.g. for a trusted proxy.
    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_der(&self.key)).unwrap()
    }

    /// The same signed by a key the JWKS does not publish.
    pub fn sign_rogue(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_der(&self.rogue)).unwrap()
    }

    pub fn now_s() -> i64 {
        now_s()
    }
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &str) {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    let _ = s.write_all(out.as_bytes());
}

fn pairs(q: &str) -> HashMap<String, String> {
    reqwest::Url::parse(&format!("http://x/?{q}"))
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn serve(
    stream: TcpStream,
    port: u16,
    inner: &Mutex<Inner>,
    key: &[u8],
    rogue: &[u8],
    jwk: &Value,
    second: &(Vec<u8>, Value),
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    let mut s = stream;
    let base = format!("http://127.0.0.1:{port}");
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let json_type = [("Content-Type", "application/json".to_string())];
    match (method.as_str(), path) {
        ("GET", "/.well-known/openid-configuration") => {
            let doc = json!({
                "issuer": base,
                "authorization_endpoint": format!("{base}/authorize"),
                "token_endpoint": format!("{base}/token"),
                "jwks_uri": format!("{base}/jwks"),
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256"],
                "code_challenge_methods_supported": ["S256"],
            });
            respond(&mut s, "200 OK", &json_type, &doc.to_string());
        }
        ("GET", "/jwks") => {
            let mut g = inner.lock().unwrap();
            g.jwks_fetches += 1;
            let keys = if g.rotated {
                json!([jwk, second.1])
            } else {
                json!([jwk])
            };
            drop(g);
            respond(
                &mut s,
                "200 OK",
                &json_type,
                &json!({ "keys": keys }).to_string(),
            );
        }
        ("GET", "/authorize") => {
            let q = pairs(query);
            let ok = q.get("response_type").map(String::as_str) == Some("code")
                && q.get("client_id").map(String::as_str) == Some(CLIENT_ID)
                && q.get("code_challenge_method").map(String::as_str) == Some("S256")
                && q.get("scope")
                    .is_some_and(|s| s.split(' ').any(|x| x == "openid"));
            if !ok {
                respond(&mut s, "400 Bad Request", &[], "bad authorization request");
                return Ok(());
            }
            let code = b64(&Sha256::digest(format!("{query}{}", now_s()).as_bytes())[..16]);
            let redirect = q["redirect_uri"].clone();
            inner.lock().unwrap().codes.insert(
                code.clone(),
                Code {
                    nonce: q["nonce"].clone(),
                    challenge: q["code_challenge"].clone(),
                    redirect_uri: redirect.clone(),
                },
            );
            let mut url = reqwest::Url::parse(&redirect).unwrap();
            url.query_pairs_mut()
                .append_pair("code", &code)
                .append_pair("state", &q["state"]);
            respond(&mut s, "302 Found", &[("Location", url.to_string())], "");
        }
        ("POST", "/token") => {
            let f = pairs(std::str::from_utf8(&body).unwrap_or(""));
            let mut g = inner.lock().unwrap();
            let b = g.behavior.clone();
            if let Some(secret) = &b.client_secret {
                let want = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{CLIENT_ID}:{secret}"))
                );
                if headers.get("authorization") != Some(&want) {
                    drop(g);
                    respond(
                        &mut s,
                        "401 Unauthorized",
                        &json_type,
                        r#"{"error":"invalid_client"}"#,
                    );
                    return Ok(());
                }
            }
            let code = f.get("code").cloned().unwrap_or_default();
            let Some(c) = g.codes.remove(&code) else {
                drop(g);
                respond(
                    &mut s,
                    "400 Bad Request",
                    &json_type,
                    r#"{"error":"invalid_grant"}"#,
                );
                return Ok(());
            };
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            let pkce_ok = b64(&Sha256::digest(verifier.as_bytes())) == c.challenge;
            let ok = f.get("grant_type").map(String::as_str) == Some("authorization_code")
                && f.get("redirect_uri") == Some(&c.redirect_uri)
                && f.get("client_id").map(String::as_str) == Some(CLIENT_ID)
                && pkce_ok;
            if !ok {
                drop(g);
                respond(
                    &mut s,
                    "400 Bad Request",
                    &json_type,
                    r#"{"error":"invalid_grant"}"#,
                );
                return Ok(());
            }
            let nonce = b.nonce.clone().unwrap_or(c.nonce);
            g.issued_nonces.push(nonce.clone());
            drop(g);
            let now = now_s();
            let claims = json!({
                "iss": base,
                "sub": "user-123",
                "aud": b.aud.clone().unwrap_or_else(|| CLIENT_ID.into()),
                "exp": now + b.exp_in_s,
                "iat": now,
                "nonce": nonce,
                "email": b.email,
                "email_verified": true,
                "groups": b.groups,
            });
            let mut h = Header::new(Algorithm::ES256);
            let default_kid = if b.second_key { "k2" } else { "k1" };
            h.kid = Some(b.kid.clone().unwrap_or_else(|| default_kid.into()));
            let signing = if b.rogue_signature {
                rogue
            } else if b.second_key {
                second.0.as_slice()
            } else {
                key
            };
            let id_token =
                jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_der(signing)).unwrap();
            respond(
                &mut s,
                "200 OK",
                &json_type,
                &json!({"access_token": "opaque", "token_type": "Bearer", "expires_in": 300, "id_token": id_token}).to_string(),
            );
        }
        _ => respond(&mut s, "404 Not Found", &[], "no such route"),
    }
    Ok(())
}
