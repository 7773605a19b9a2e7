//! How a job's output becomes log chunks, for every executor: bytes of one
//! stream are gathered and written to the [`LogSink`] once the job pauses
//! for [`LINGER`], at least every [`FLUSH_EVERY`], or once [`FLUSH_BYTES`]
//! have gathered; a chunk never mixes stdout with stderr. So a line printed
//! alone reaches a live tail at once, and a burst goes out in few chunks.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::Instant;

use crate::session::{LogSink, Stream};

/// Longest output waits before it is sent.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// How long a pause in the output must be for what came before to be sent.
pub const LINGER: Duration = Duration::from_millis(5);
/// Most output gathered into one chunk before it is sent.
pub const FLUSH_BYTES: usize = 32 * 1024;

/// Writes everything `output` yields into `sink` until `output` ends.
pub async fn forward<S>(output: S, sink: &LogSink)
where
    S: futures_util::Stream<Item = (Stream, Bytes)>,
{
    let mut output = std::pin::pin!(output);
    // Output not yet sent, and when its first byte came: a steady trickle
    // is still sent every FLUSH_EVERY, not only when the job pauses.
    let mut pending: Option<(Stream, Vec<u8>, Instant)> = None;
    let mut last_read = Instant::now();
    loop {
        let next = match &pending {
            Some((_, _, since)) => {
                let due = (*since + FLUSH_EVERY).min(last_read + LINGER);
                match tokio::time::timeout_at(due, output.next()).await {
                    Ok(next) => next,
                    Err(_elapsed) => {
                        flush(&mut pending, sink).await;
                        continue;
                    }
                }
            }
            None => output.next().await,
        };
        let Some((stream, bytes)) = next else { break };
        if bytes.is_empty() {
            continue;
        }
        last_read = Instant::now();
        if pending.as_ref().is_some_and(|(s, _, _)| *s != stream) {
            flush(&mut pending, sink).await;
        }
        match &mut pending {
            Some((_, data, _)) => data.extend_from_slice(&bytes),
            None => pending = Some((stream, bytes.to_vec(), Instant::now())),
        }
        if pending
            .as_ref()
            .is_some_and(|(_, data, _)| data.len() >= FLUSH_BYTES)
        {
            flush(&mut pending, sink).await;
        }
    }
    flush(&mut pending, sink).await;
}

/// Sends what is pending, in pieces of at most [`FLUSH_BYTES`] (one read can
/// bring more than that), so no chunk comes near the coordinator's limit.
async fn flush(pending: &mut Option<(Stream, Vec<u8>, Instant)>, sink: &LogSink) {
    let Some((stream, data, _)) = pending.take() else {
        return;
    };
    if data.len() <= FLUSH_BYTES {
        sink.write(stream, data).await;
        return;
    }
    for piece in data.chunks(FLUSH_BYTES) {
        sink.write(stream, piece.to_vec()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use muster_proto::runner::v1::{runner_message, LogStream, RunnerMessage};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::session::Link;

    /// Forwards what `feed` sends and returns the chunks the sink wrote.
    async fn chunks_of<F, Fut>(feed: F) -> Vec<(LogStream, Vec<u8>)>
    where
        F: FnOnce(mpsc::Sender<(Stream, Bytes)>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let link = Arc::new(Link::default());
        let (outbox, mut messages) = mpsc::channel::<RunnerMessage>(1024);
        link.attach(outbox).await;
        link.add_job("r", 1, CancellationToken::new()).await;
        let sink = LogSink::new("r", 1, link.clone());
        let (tx, rx) = mpsc::channel(16);
        let producer = tokio::spawn(feed(tx));
        forward(tokio_stream::wrappers::ReceiverStream::new(rx), &sink).await;
        producer.await.unwrap();
        let mut chunks = Vec::new();
        while let Ok(message) = messages.try_recv() {
            if let Some(runner_message::Kind::Log(chunk)) = message.kind {
                chunks.push((LogStream::try_from(chunk.stream).unwrap(), chunk.data));
            }
        }
        chunks
    }

    fn item(stream: Stream, text: &str) -> (Stream, Bytes) {
        (stream, Bytes::from(text.to_owned()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_chunk_never_mixes_streams() {
        let chunks = chunks_of(|tx| async move {
            for (stream, text) in [
                (Stream::Stdout, "a"),
                (Stream::Stdout, "b"),
                (Stream::Stderr, "c"),
                (Stream::Stdout, "d"),
            ] {
                tx.send(item(stream, text)).await.unwrap();
            }
        })
        .await;
        assert_eq!(
            chunks,
            [
                (LogStream::Stdout, b"ab".to_vec()),
                (LogStream::Stderr, b"c".to_vec()),
                (LogStream::Stdout, b"d".to_vec()),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_trickle_is_sent_every_flush_interval() {
        // A byte every 3 ms for 300 ms: never a pause of LINGER, so only
        // FLUSH_EVERY cuts it.
        let chunks = chunks_of(|tx| async move {
            for _ in 0..100 {
                tx.send(item(Stream::Stdout, "x")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
        .await;
        let sizes: Vec<usize> = chunks.iter().map(|(_, d)| d.len()).collect();
        assert_eq!(sizes.len(), 6, "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn output_is_sent_when_the_job_pauses() {
        // Each line followed by a pause goes out alone, long before FLUSH_EVERY.
        let chunks = chunks_of(|tx| async move {
            for line in ["one\n", "two\n", "three\n"] {
                tx.send(item(Stream::Stdout, line)).await.unwrap();
                tokio::time::sleep(LINGER * 4).await;
            }
        })
        .await;
        assert_eq!(
            chunks,
            [
                (LogStream::Stdout, b"one\n".to_vec()),
                (LogStream::Stdout, b"two\n".to_vec()),
                (LogStream::Stdout, b"three\n".to_vec()),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn large_output_is_cut_at_the_chunk_bound() {
        let chunks = chunks_of(|tx| async move {
            let big = "y".repeat(3 * FLUSH_BYTES + 10);
            tx.send(item(Stream::Stderr, &big)).await.unwrap();
        })
        .await;
        let sizes: Vec<usize> = chunks.iter().map(|(_, d)| d.len()).collect();
        assert_eq!(sizes, [FLUSH_BYTES, FLUSH_BYTES, FLUSH_BYTES, 10]);
    }
}
