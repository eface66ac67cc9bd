//! A fake S3-compatible object store on 127.0.0.1 speaking the real wire protocol (HTTP/1.1,
//! path-style addressing): `PUT`/`GET`/`DELETE` object and `GET ?list-type=2` (ListObjectsV2
//! XML, paged by `max_keys` with continuation tokens), and multipart uploads:
//! `POST ?uploads` (CreateMultipartUpload), `PUT ?partNumber=N&uploadId=ID` (UploadPart, answered
//! with an `ETag`), `POST ?uploadId=ID` (CompleteMultipartUpload: the parts listed in order,
//! each ETag matching, every part but the last at least `min_part_size` or `EntityTooSmall`) and
//! `DELETE ?uploadId=ID` (AbortMultipartUpload). Every request must carry a valid AWS
//! Signature Version 4, recomputed here independently of the client (canonical request from
//! the request as received, signing key from the secret key); anything else is answered 403
//! `SignatureDoesNotMatch` / `InvalidAccessKeyId` / `XAmzContentSHA256Mismatch` /
//! `RequestTimeTooSkewed`, as S3 does.
#![allow(dead_code, reason = "shared by several test files; each uses a part")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const ACCESS_KEY: &str = "AKIAFAKES3TESTKEY001";
pub const SECRET_KEY: &str = "fake/S3+secret/key/for+tests/0123456789";
pub const REGION: &str = "eu-test-1";

/// A multipart upload in progress: bucket, key, part number -> bytes.
pub type Upload = (String, String, BTreeMap<u32, Vec<u8>>);

#[derive(Default)]
pub struct State {
    /// bucket -> key -> bytes
    pub buckets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// (method, path?query, status) of every request, in order.
    pub log: Vec<(String, String, u16)>,
    /// Keys per listing page.
    pub max_keys: usize,
    /// Multipart uploads in progress: upload id -> (bucket, key, part number -> bytes).
    pub uploads: BTreeMap<String, Upload>,
    /// Uploads created so far (the next id).
    pub uploads_created: u64,
    /// The smallest part S3 accepts (5 MiB) except the last; tests lower it.
    pub min_part_size: usize,
    /// Answer `500 InternalError` to UploadPart with this part number.
    pub fail_part: Option<u32>,
}

pub struct FakeS3 {
    pub port: u16,
    pub state: Arc<Mutex<State>>,
}

impl FakeS3 {
    /// Starts the server with one empty bucket.
    pub fn start(bucket: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut st = State {
            max_keys: 1000,
            min_part_size: 5 * 1024 * 1024,
            ..State::default()
        };
        st.buckets.insert(bucket.to_string(), BTreeMap::new());
        let state = Arc::new(Mutex::new(st));
        let s2 = Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s3 = Arc::clone(&s2);
                std::thread::spawn(move || serve(conn, &s3));
            }
        });
        Self { port, state }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn keys(&self, bucket: &str) -> Vec<String> {
        self.state.lock().unwrap().buckets[bucket]
            .keys()
            .cloned()
            .collect()
    }

    pub fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        self.state.lock().unwrap().buckets[bucket].get(key).cloned()
    }

    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        self.state
            .lock()
            .unwrap()
            .buckets
            .get_mut(bucket)
            .unwrap()
            .insert(key.to_string(), bytes.to_vec());
    }

    /// Statuses of requests whose method is `method`.
    pub fn statuses(&self, method: &str) -> Vec<u16> {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|(m, _, _)| m == method)
            .map(|(_, _, s)| *s)
            .collect()
    }
}

struct Req {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn read_req(r: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Req {
        method,
        target,
        headers,
        body,
    })
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    while let Some(req) = read_req(&mut r) {
        let (status, body, etag) = handle(&req, state);
        state
            .lock()
            .unwrap()
            .log
            .push((req.method.clone(), req.target.clone(), status));
        let reason = match status {
            200 => "OK",
            204 => "No Content",
            403 => "Forbidden",
            404 => "Not Found",
            500 => "Internal Server Error",
            _ => "Bad Request",
        };
        let etag = etag.map(|e| format!("ETag: {e}\r\n")).unwrap_or_default();
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nContent-Type: application/xml\r\n{etag}\r\n",
            body.len()
        );
        if w.write_all(head.as_bytes()).is_err() || w.write_all(&body).is_err() {
            return;
        }
    }
}

type Answer = (u16, Vec<u8>, Option<String>);

fn error(status: u16, code: &str) -> Answer {
    (
        status,
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{code}</Message></Error>").into_bytes(),
        None,
    )
}

fn ok(status: u16, body: Vec<u8>) -> Answer {
    (status, body, None)
}

/// The text of each `<tag>...</tag>` in `xml`.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

fn etag_of(bytes: &[u8]) -> String {
    format!("\"{}\"", &hexs(&Sha256::digest(bytes))[..32])
}

/// The multipart requests on `bucket`/`key`; `None` when the request is not one.
fn multipart(
    req: &Req,
    st: &mut State,
    bucket: &str,
    key: &str,
    q: &dyn Fn(&str) -> Option<String>,
) -> Option<Answer> {
    let xml_head = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
    let ns = "xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"";
    if req.method == "POST" && q("uploads").is_some() {
        st.uploads_created += 1;
        let id = format!(
            "upload-{}-{}",
            st.uploads_created,
            &hexs(&Sha256::digest(key.as_bytes()))[..8]
        );
        st.uploads.insert(
            id.clone(),
            (bucket.to_string(), key.to_string(), BTreeMap::new()),
        );
        let body = format!(
            "{xml_head}<InitiateMultipartUploadResult {ns}><Bucket>{bucket}</Bucket><Key>{}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>",
            xml_escape(key)
        );
        return Some(ok(200, body.into_bytes()));
    }
    let id = q("uploadId")?;
    let Some((b, k, parts)) = st.uploads.get_mut(&id) else {
        return Some(error(404, "NoSuchUpload"));
    };
    if b != bucket || k != key {
        return Some(error(404, "NoSuchUpload"));
    }
    match req.method.as_str() {
        "PUT" => {
            let Some(n) = q("partNumber").and_then(|n| n.parse::<u32>().ok()) else {
                return Some(error(400, "InvalidArgument"));
            };
            if !(1..=10_000).contains(&n) {
                return Some(error(400, "InvalidArgument"));
            }
            if st.fail_part == Some(n) {
                return Some(error(500, "InternalError"));
            }
            let etag = etag_of(&req.body);
            parts.insert(n, req.body.clone());
            Some((200, Vec::new(), Some(etag)))
        }
        "POST" => {
            let text = String::from_utf8_lossy(&req.body).into_owned();
            if !text.contains("<CompleteMultipartUpload") {
                return Some(error(400, "MalformedXML"));
            }
            let listed = elements(&text, "Part");
            if listed.is_empty() {
                return Some(error(400, "MalformedXML"));
            }
            let mut object = Vec::new();
            let mut last = 0u32;
            for (i, p) in listed.iter().enumerate() {
                let n: u32 = match elements(p, "PartNumber")
                    .first()
                    .and_then(|n| n.trim().parse().ok())
                {
                    Some(n) => n,
                    None => return Some(error(400, "MalformedXML")),
                };
                if n <= last {
                    return Some(error(400, "InvalidPartOrder"));
                }
                last = n;
                let etag = elements(p, "ETag")
                    .first()
                    .map(|e| e.replace("&quot;", "\""))
                    .unwrap_or_default();
                let Some(bytes) = parts.get(&n) else {
                    return Some(error(400, "InvalidPart"));
                };
                if etag != etag_of(bytes) {
                    return Some(error(400, "InvalidPart"));
                }
                if i + 1 < listed.len() && bytes.len() < st.min_part_size {
                    return Some(error(400, "EntityTooSmall"));
                }
                object.extend_from_slice(bytes);
            }
            st.uploads.remove(&id);
            st.buckets
                .get_mut(bucket)
                .unwrap()
                .insert(key.to_string(), object.clone());
            let body = format!(
                "{xml_head}<CompleteMultipartUploadResult {ns}><Location>http://127.0.0.1/{bucket}/{0}</Location><Bucket>{bucket}</Bucket><Key>{0}</Key><ETag>{1}</ETag></CompleteMultipartUploadResult>",
                xml_escape(key),
                xml_escape(&etag_of(&object))
            );
            Some(ok(200, body.into_bytes()))
        }
        "DELETE" => {
            st.uploads.remove(&id);
            Some(ok(204, Vec::new()))
        }
        _ => Some(error(400, "InvalidRequest")),
    }
}

fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// RFC 3986 encoding (unreserved kept; `/` kept in paths), as SigV4 defines it.
fn enc(s: &str, path: bool) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (path && b == b'/') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn hmac(k: &[u8], d: &[u8]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(k).unwrap();
    m.update(d);
    m.finalize().into_bytes().to_vec()
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks the request's SigV4 signature; `Err` is the S3 error code.
fn verify(req: &Req, path: &str, query: &[(String, String)]) -> Result<(), &'static str> {
    let header = |n: &str| {
        req.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    let auth = header("authorization").ok_or("AccessDenied")?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("AccessDenied")?;
    let mut cred = None;
    let mut signed = None;
    let mut sig = None;
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or("AccessDenied")?;
        match k {
            "Credential" => cred = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => sig = Some(v),
            _ => return Err("AccessDenied"),
        }
    }
    let (cred, signed, sig) = (
        cred.ok_or("AccessDenied")?,
        signed.ok_or("AccessDenied")?,
        sig.ok_or("AccessDenied")?,
    );
    let mut c = cred.splitn(5, '/');
    let (ak, date, region, service, term) = (
        c.next().unwrap_or(""),
        c.next().unwrap_or(""),
        c.next().unwrap_or(""),
        c.next().unwrap_or(""),
        c.next().unwrap_or(""),
    );
    if ak != ACCESS_KEY {
        return Err("InvalidAccessKeyId");
    }
    if region != REGION || service != "s3" || term != "aws4_request" {
        return Err("AuthorizationHeaderMalformed");
    }
    let amz_date = header("x-amz-date").ok_or("AccessDenied")?;
    if amz_date.get(..8) != Some(date) {
        return Err("SignatureDoesNotMatch");
    }
    let t = time::PrimitiveDateTime::parse(
        amz_date,
        time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"),
    )
    .map_err(|_| "AccessDenied")?
    .assume_utc();
    if (time::OffsetDateTime::now_utc() - t).abs() > time::Duration::minutes(15) {
        return Err("RequestTimeTooSkewed");
    }
    let payload = header("x-amz-content-sha256").ok_or("AccessDenied")?;
    if payload != hexs(&Sha256::digest(&req.body)) {
        return Err("XAmzContentSHA256Mismatch");
    }
    let names: Vec<&str> = signed.split(';').collect();
    if !names.contains(&"host") || !names.contains(&"x-amz-date") {
        return Err("AccessDenied");
    }
    let mut canonical_headers = String::new();
    for n in &names {
        let v = header(n).ok_or("SignatureDoesNotMatch")?;
        canonical_headers.push_str(&format!("{n}:{}\n", v.trim()));
    }
    let mut q: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (enc(k, false), enc(v, false)))
        .collect();
    q.sort();
    let cq = q
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let creq = format!(
        "{}\n{}\n{cq}\n{canonical_headers}\n{signed}\n{payload}",
        req.method,
        enc(path, true)
    );
    let sts = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/s3/aws4_request\n{}",
        hexs(&Sha256::digest(creq.as_bytes()))
    );
    let mut k = hmac(format!("AWS4{SECRET_KEY}").as_bytes(), date.as_bytes());
    for part in [region.as_bytes(), b"s3", b"aws4_request"] {
        k = hmac(&k, part);
    }
    if hexs(&hmac(&k, sts.as_bytes())) != sig {
        return Err("SignatureDoesNotMatch");
    }
    Ok(())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn handle(req: &Req, state: &Mutex<State>) -> Answer {
    let (raw_path, raw_query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let path = pct_decode(raw_path);
    let query: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect();
    if let Err(code) = verify(req, &path, &query) {
        return error(403, code);
    }
    let mut st = state.lock().unwrap();
    let max_keys = st.max_keys;
    let trimmed = path.trim_start_matches('/');
    let (bucket, key) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    if !st.buckets.contains_key(bucket) {
        return error(404, "NoSuchBucket");
    }
    if !key.is_empty() {
        let q = |n: &str| query.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        if let Some(answer) = multipart(req, &mut st, bucket, key, &q) {
            return answer;
        }
    }
    let objects = st.buckets.get_mut(bucket).unwrap();
    match (req.method.as_str(), key.is_empty()) {
        ("PUT", false) => {
            objects.insert(key.to_string(), req.body.clone());
            (200, Vec::new(), Some(etag_of(&req.body)))
        }
        ("GET", false) => match objects.get(key) {
            Some(b) => ok(200, b.clone()),
            None => error(404, "NoSuchKey"),
        },
        ("DELETE", false) => {
            objects.remove(key);
            ok(204, Vec::new())
        }
        ("GET", true) => {
            let q = |n: &str| query.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            if q("list-type").as_deref() != Some("2") {
                return error(400, "InvalidArgument");
            }
            let prefix = q("prefix").unwrap_or_default();
            let after = q("continuation-token").unwrap_or_default();
            let matching: Vec<(&String, &Vec<u8>)> = objects
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix) && k.as_str() > after.as_str())
                .collect();
            let page = &matching[..matching.len().min(max_keys)];
            let truncated = matching.len() > page.len();
            let mut xml = String::from(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
            );
            xml.push_str(&format!(
                "<Name>{bucket}</Name><Prefix>{}</Prefix><KeyCount>{}</KeyCount><MaxKeys>{max_keys}</MaxKeys><IsTruncated>{truncated}</IsTruncated>",
                xml_escape(&prefix),
                page.len()
            ));
            for (k, b) in page {
                xml.push_str(&format!(
                    "<Contents><Key>{}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>&quot;x&quot;</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
                    xml_escape(k),
                    b.len()
                ));
            }
            if truncated && let Some((last, _)) = page.last() {
                xml.push_str(&format!(
                    "<NextContinuationToken>{}</NextContinuationToken>",
                    xml_escape(last)
                ));
            }
            xml.push_str("</ListBucketResult>");
            ok(200, xml.into_bytes())
        }
        _ => error(400, "InvalidRequest"),
    }
}
