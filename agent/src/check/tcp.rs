//! The TCP check: connect to `host:port`, optionally handshake TLS, send a
//! line and wait for a reply that contains an expected text.
//!
//! The TLS handshake here does not verify the chain: it is there to read
//! the certificate's expiry and the protocol version of any TLS service
//! (use an HTTPS check to verify one). `send` goes out with a `\n` added
//! when it does not end with one; `expect` is looked for in the first
//! 64 KiB of the reply (a banner, when nothing is sent).

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{connect, ms, resolve, split_host_port, tls, Checker, Outcome, Prepared};

const MAX_REPLY: usize = 64 * 1024;

pub async fn check(
    checker: &Checker,
    endpoint: &Prepared,
    out: &mut Outcome,
) -> Result<(), String> {
    let started = Instant::now();
    let (host, port) = split_host_port(&endpoint.spec.target, None)?;
    let addrs = resolve(&host, port, out).await?;
    let stream = connect(&addrs, out).await?;
    let options = &endpoint.spec.tcp;
    if options.tls {
        out.phase = "in the TLS handshake";
        let began = Instant::now();
        let stream = tls::handshake(
            stream,
            &host,
            checker.tls.insecure.clone(),
            &checker.tls,
            &mut out.tls,
        )
        .await?;
        out.timings.tls_ms = Some(ms(began.elapsed()));
        out.measured.certificate_expiration_ms = out
            .tls
            .certificate_expires_at
            .map(|at| (at - chrono::Utc::now()).num_milliseconds() as f64);
        converse(stream, endpoint, out).await?;
    } else {
        converse(stream, endpoint, out).await?;
    }
    out.measured.response_time_ms = Some(ms(started.elapsed()));
    Ok(())
}

async fn converse<S>(mut stream: S, endpoint: &Prepared, out: &mut Outcome) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let options = &endpoint.spec.tcp;
    let began = Instant::now();
    if let Some(send) = &options.send {
        out.phase = "sending";
        let mut line = send.clone();
        if !line.ends_with('\n') {
            line.push('\n');
        }
        stream
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("sending failed: {e}"))?;
        stream
            .flush()
            .await
            .map_err(|e| format!("sending failed: {e}"))?;
    }
    let Some(expect) = options.expect.as_deref().filter(|e| !e.is_empty()) else {
        return Ok(());
    };
    out.phase = "waiting for the reply";
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the reply failed: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the connection closed before the reply contained {expect:?} (received {:?})",
                preview(&reply)
            ));
        }
        if out.timings.first_byte_ms.is_none() {
            out.timings.first_byte_ms = Some(ms(began.elapsed()));
        }
        reply.extend_from_slice(&buf[..n]);
        if contains(&reply, expect.as_bytes()) {
            return Ok(());
        }
        if reply.len() >= MAX_REPLY {
            return Err(format!(
                "the first {} KiB of the reply do not contain {expect:?}",
                MAX_REPLY / 1024
            ));
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The start of a reply, for an error message.
fn preview(reply: &[u8]) -> String {
    let text = String::from_utf8_lossy(&reply[..reply.len().min(120)]);
    text.into_owned()
}
