//! The HTTP(S) check: one request on a fresh connection that the check
//! opens itself (resolve, TCP connect, TLS handshake, then an HTTP/1.1
//! exchange with hyper's client connection), so each phase is timed on its
//! own. Redirects are followed when the endpoint asks for it, each on a new
//! connection; the timings are those of the last hop, `total_ms` covers all.
//!
//! `first_byte_ms` runs from the request being sent to the response head
//! having arrived. Up to 1 MiB of the body is read (that is what `[BODY]`
//! conditions see); the rest is left unread.

use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use muster_common::monitor::{Timings, TlsInfo};

use super::{connect, ms, resolve, tls, Checker, Outcome, Prepared};

const MAX_REDIRECTS: usize = 10;
const MAX_BODY: usize = 1 << 20;
const USER_AGENT: &str = concat!("muster-agent/", env!("CARGO_PKG_VERSION"));

pub async fn check(
    checker: &Checker,
    endpoint: &Prepared,
    out: &mut Outcome,
) -> Result<(), String> {
    let started = Instant::now();
    let options = &endpoint.spec.http;
    let target = endpoint.spec.target.trim();
    let mut uri: Uri = target
        .parse()
        .map_err(|e| format!("{target:?} is not a URL: {e}"))?;
    let mut method = match options.method.trim() {
        "" => Method::GET,
        m => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("{m:?} is not an HTTP method"))?,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &options.headers {
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("{name:?} is not a valid header name"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| format!("the value of header {name} is not valid"))?;
        headers.append(name, value);
    }
    let mut body = options.body.clone().map(Bytes::from).unwrap_or_default();
    let mut hops = 0;
    loop {
        let (status, location) = exchange(
            checker,
            endpoint,
            &uri,
            &method,
            &headers,
            body.clone(),
            out,
        )
        .await?;
        let redirect = matches!(status, 301 | 302 | 303 | 307 | 308);
        match location {
            Some(location) if options.follow_redirects && redirect => {
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err(format!("more than {MAX_REDIRECTS} redirects"));
                }
                let next = follow(&uri, &location)?;
                if next.scheme() != uri.scheme() || next.authority() != uri.authority() {
                    // Credentials are for the origin they were configured for.
                    for name in [
                        header::AUTHORIZATION,
                        header::COOKIE,
                        header::PROXY_AUTHORIZATION,
                    ] {
                        headers.remove(name);
                    }
                }
                if status == 303 || (matches!(status, 301 | 302) && method == Method::POST) {
                    method = Method::GET;
                    body = Bytes::new();
                }
                uri = next;
                out.timings = Timings::default();
                out.tls = TlsInfo::default();
                out.measured.certificate_expiration_ms = None;
                out.measured.status = None;
            }
            _ => {
                out.measured.response_time_ms = Some(ms(started.elapsed()));
                return Ok(());
            }
        }
    }
}

/// One request on a new connection; returns the status and the `Location`.
async fn exchange(
    checker: &Checker,
    endpoint: &Prepared,
    uri: &Uri,
    method: &Method,
    headers: &HeaderMap,
    body: Bytes,
    out: &mut Outcome,
) -> Result<(u16, Option<String>), String> {
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(format!(
                "{uri}: only http:// and https:// URLs can be checked"
            ))
        }
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{uri}: the URL has no host"))?;
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });

    let mut request = Request::builder()
        .method(method.clone())
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .body(Full::new(body))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    *request.headers_mut() = headers.clone();
    let defaults = [
        (header::HOST, authority),
        (header::USER_AGENT, USER_AGENT),
        (header::ACCEPT, "*/*"),
    ];
    for (name, value) in defaults {
        if !request.headers().contains_key(&name) {
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("{uri}: {value:?} is not a valid {name} header"))?;
            request.headers_mut().insert(name, value);
        }
    }
    // The connection is for this one request.
    request
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));

    let addrs = resolve(host, port, out).await?;
    let stream = connect(&addrs, out).await?;
    if https {
        out.phase = "in the TLS handshake";
        let began = Instant::now();
        let config = if endpoint.spec.http.insecure_tls {
            checker.tls.insecure.clone()
        } else {
            checker.tls.verified.clone()
        };
        let stream = tls::handshake(stream, host, config, &checker.tls, &mut out.tls).await?;
        out.timings.tls_ms = Some(ms(began.elapsed()));
        out.measured.certificate_expiration_ms = out
            .tls
            .certificate_expires_at
            .map(|at| (at - chrono::Utc::now()).num_milliseconds() as f64);
        send(TokioIo::new(stream), request, endpoint, out).await
    } else {
        send(TokioIo::new(stream), request, endpoint, out).await
    }
}

/// The HTTP/1.1 exchange over an established connection: hyper's
/// connection future is driven here, alongside the request, so nothing
/// outlives the check.
async fn send<I>(
    io: I,
    request: Request<Full<Bytes>>,
    endpoint: &Prepared,
    out: &mut Outcome,
) -> Result<(u16, Option<String>), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    out.phase = "sending the request";
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake failed: {}", chain(&e)))?;
    let mut connection = std::pin::pin!(connection);
    let keep_body = endpoint.wants_body;
    let exchange = async {
        let began = Instant::now();
        out.phase = "waiting for the response";
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("the request failed: {}", chain(&e)))?;
        out.timings.first_byte_ms = Some(ms(began.elapsed()));
        let status = response.status().as_u16();
        out.measured.status = Some(status);
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned);
        out.phase = "reading the body";
        let mut body = response.into_body();
        let mut kept = Vec::new();
        let mut seen = 0;
        while seen < MAX_BODY {
            let Some(frame) = body.frame().await else {
                break;
            };
            let frame = frame.map_err(|e| format!("reading the body failed: {}", chain(&e)))?;
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if keep_body {
                    let room = MAX_BODY - kept.len();
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
        }
        if keep_body {
            out.measured.body = Some(String::from_utf8_lossy(&kept).into_owned());
        }
        Ok((status, location))
    };
    let mut exchange = std::pin::pin!(exchange);
    tokio::select! {
        biased;
        result = &mut exchange => result,
        ended = &mut connection => match ended {
            // Closed after a complete response: what it delivered is still
            // to be read.
            Ok(()) => exchange.await,
            Err(e) => Err(format!("the connection failed: {}", chain(&e))),
        },
    }
}

/// The URL a `Location` points to, relative to the one that answered.
fn follow(base: &Uri, location: &str) -> Result<Uri, String> {
    let location = location.trim();
    let invalid =
        |e: &dyn std::fmt::Display| format!("the redirect to {location:?} is not a URL: {e}");
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().map_err(|e| invalid(&e));
    }
    let scheme = base.scheme_str().unwrap_or("http");
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}")
            .parse()
            .map_err(|e| invalid(&e));
    }
    let authority = base.authority().map_or("", |a| a.as_str());
    let path = if location.starts_with('/') {
        location.to_owned()
    } else {
        let base_path = base.path();
        let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        format!("{dir}{location}")
    };
    format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|e| invalid(&e))
}

/// An error and its causes, `outer: inner: innermost`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_current_url() {
        let base: Uri = "https://example.test:8443/a/b?x=1".parse().unwrap();
        assert_eq!(
            follow(&base, "/c").unwrap().to_string(),
            "https://example.test:8443/c"
        );
        assert_eq!(
            follow(&base, "c?y=2").unwrap().to_string(),
            "https://example.test:8443/a/c?y=2"
        );
        assert_eq!(
            follow(&base, "//other.test/d").unwrap().to_string(),
            "https://other.test/d"
        );
        assert_eq!(
            follow(&base, "http://plain.test/").unwrap().to_string(),
            "http://plain.test/"
        );
        assert!(follow(&base, "http://bad host/").is_err());
    }
}
