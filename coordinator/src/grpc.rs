//! The gRPC runner service: enrollment, the runner's long-lived stream, and
//! bundle downloads, behind a TLS acceptor and one authorization layer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use muster_common::pki::{runner_cert_info, CertificateAuthority, RunnerCert};
use muster_common::token::{self, TokenKind};
use muster_proto::runner::v1::runner_service_server::{RunnerService, RunnerServiceServer};
use muster_proto::runner::v1::{
    coordinator_message, runner_message, ArtifactChunk, ArtifactsStored, BundleChunk,
    CertificateRenewed, CoordinatorMessage, EnrollRequest, EnrollResponse, FetchBundleRequest,
    FinishedAck, LogAck, LogStream, Reject, RenewCertificate, RunFinished, RunOutcome, RunRef,
    RunnerMessage,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::bus::{announce, Bus, Event};
use crate::dispatch::Dispatcher;
use crate::revocation::Revocations;
use crate::store::{
    Fenced, JoinTokenRefusal, LeaseRenewal, LogAccount, LogChunk, NewRunner, RunEnd, RunStart,
    RunStatus, Scope, Store,
};
use crate::tls::{Peer, ServerTls, ENROLL_SERVER_NAME};

const ENROLL_PATH: &str = "/muster.runner.v1.RunnerService/Enroll";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const BUNDLE_CHUNK: usize = 1024 * 1024;
const MAX_LOG_CHUNK: usize = 1024 * 1024;
/// A PEM certificate signing request is well under 2 KiB.
const MAX_CSR_PEM: usize = 16 * 1024;
/// How stale the recorded `last_seen_at` of a connected runner may grow.
/// Whether a runner is online is its `connected` flag, written at connect
/// and disconnect; `last_seen_at` only tells when it was last heard of. A
/// runner heartbeats every 5 s, and recording each heartbeat was a durable
/// write per runner every 5 to 10 s: with 2,000 runners about 250 commits a
/// second, which kept most of the database pool busy and made dispatch wait
/// for a connection. Once a minute is 33 writes a second for 2,000 runners;
/// a minute's precision is what API keys' `last_used_at` has too.
const LAST_SEEN_PRECISION: Duration = Duration::from_secs(60);
/// How soon after a renewal a stream may ask for another: a runner asks at
/// connect and then hourly, so more is a runner gone wrong.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(60);

/// A TLS connection to the gRPC port and what its handshake proved.
pub struct RunnerConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
}

impl Connected for RunnerConn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for RunnerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for RunnerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes their TLS handshakes concurrently.
/// A client that asks for the enrollment name gets server-only TLS; every
/// other client must present a certificate the CA signed, or the handshake
/// fails.
pub async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    conns: mpsc::Sender<std::io::Result<RunnerConn>>,
    shutdown: CancellationToken,
) {
    let enroll = tls.enroll;
    let mutual = tls.mutual;
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "grpc accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (enroll, mutual, conns) = (enroll.clone(), mutual.clone(), conns.clone());
        tokio::spawn(async move {
            let handshake = async {
                let start =
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
                        .await?;
                let enrolling = start.client_hello().server_name() == Some(ENROLL_SERVER_NAME);
                let config = if enrolling { enroll } else { mutual };
                let io = start.into_stream(config).await?;
                let peer = if enrolling {
                    Peer::Enrolling
                } else {
                    let cert = io
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| runner_cert_info(c));
                    match cert {
                        Some(cert) => Peer::Runner(cert),
                        None => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::PermissionDenied,
                                "client certificate is not a runner certificate",
                            ))
                        }
                    }
                };
                Ok::<_, std::io::Error>(RunnerConn { io, peer })
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(conn)) => {
                    let _ = conns.send(Ok(conn)).await;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%addr, %error, "runner connection refused at the TLS handshake")
                }
                Err(_) => tracing::warn!(%addr, "runner TLS handshake timed out"),
            }
        });
    }
}

/// The one place runner calls are authorized: enrollment connections may only
/// enroll; every other call comes from a verified runner certificate.
#[derive(Clone, Copy, Debug, Default)]
pub struct AuthorizeLayer;

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        S::Future,
        futures_util::future::Ready<Result<S::Response, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let allowed = match req.extensions().get::<Peer>() {
            Some(Peer::Runner(_)) => true,
            Some(Peer::Enrolling) => req.uri().path() == ENROLL_PATH,
            None => false,
        };
        if allowed {
            futures_util::future::Either::Left(self.inner.call(req))
        } else {
            let status = Status::unauthenticated(
                "this call needs a runner client certificate; enroll first",
            );
            futures_util::future::Either::Right(futures_util::future::ready(Ok(status.into_http())))
        }
    }
}

pub struct RunnerServiceImpl {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub dispatcher: Arc<Dispatcher>,
    pub ca: Arc<CertificateAuthority>,
    pub runner_cert_validity: Duration,
    pub max_artifact_bytes: u64,
    pub revocations: Arc<Revocations>,
    pub shutdown: CancellationToken,
}

impl RunnerServiceImpl {
    pub fn into_server(self) -> RunnerServiceServer<Self> {
        RunnerServiceServer::new(self)
    }
}

fn runner_of<T>(req: &Request<T>) -> Result<RunnerCert, Status> {
    match req.extensions().get::<Peer>() {
        Some(Peer::Runner(cert)) => Ok(cert.clone()),
        _ => Err(Status::unauthenticated("no runner certificate")),
    }
}

fn parse_uuid(s: &str, what: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(s).map_err(|_| Status::invalid_argument(format!("{what} '{s}' is not a UUID")))
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_else(Utc::now)
}

fn store_status(e: crate::store::StoreError) -> Status {
    crate::error::ServiceError::from(e).into()
}

#[tonic::async_trait]
impl RunnerService for RunnerServiceImpl {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let req = request.into_inner();
        token::validate(TokenKind::JoinToken, &req.join_token)
            .map_err(|e| Status::unauthenticated(format!("join token refused: {e}")))?;
        if req.capacity == 0 || req.capacity > 1024 {
            return Err(Status::invalid_argument(format!(
                "capacity {} is out of range, expected 1 to 1024",
                req.capacity
            )));
        }
        let name = req.name.trim();
        if name.is_empty() || name.len() > 128 {
            return Err(Status::invalid_argument(
                "runner name must have 1 to 128 characters",
            ));
        }
        let join = match self
            .store
            .consume_join_token(&token::hash(&req.join_token), Utc::now())
            .await
            .map_err(store_status)?
        {
            Ok(join) => join,
            Err(
                refusal @ (JoinTokenRefusal::Unknown
                | JoinTokenRefusal::Expired
                | JoinTokenRefusal::Used),
            ) => {
                tracing::warn!(reason = %refusal, runner = name, "enrollment refused");
                return Err(Status::permission_denied(format!("{refusal}")));
            }
        };
        let runner_id = Uuid::now_v7();
        let issued = self
            .ca
            .sign_runner_csr(
                &req.csr_pem,
                &runner_id.to_string(),
                self.runner_cert_validity,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        self.store
            .create_runner(NewRunner {
                id: runner_id,
                org_id: join.org_id,
                name: name.to_owned(),
                labels,
                capacity: req.capacity as i32,
                cert_serial: issued.serial_hex.clone(),
                cert_not_after: issued.not_after,
            })
            .await
            .map_err(store_status)?;
        tracing::info!(runner_id = %runner_id, runner = name, "runner enrolled");
        Ok(Response::new(EnrollResponse {
            runner_id: runner_id.to_string(),
            certificate_pem: issued.pem,
            ca_certificate_pem: self.ca.cert_pem().to_owned(),
        }))
    }

    type SessionStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<RunnerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let cert = runner_of(&request)?;
        let runner_id = parse_uuid(&cert.runner_id, "runner id")?;
        let runner = self
            .store
            .runner(runner_id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::permission_denied("runner is not registered"))?;
        if !runner.accepts_cert(&cert.serial_hex) {
            return Err(Status::permission_denied(
                "runner certificate is revoked or superseded",
            ));
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(RunnerMessage {
                kind: Some(runner_message::Kind::Hello(hello)),
            }))) => hello,
            Ok(Some(Err(status))) => return Err(status),
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message on a stream must be Hello",
                ))
            }
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10 s")),
        };
        let capacity = hello.capacity.clamp(1, 1024) as usize;
        let labels: BTreeMap<String, String> = hello.labels.into_iter().collect();
        self.store
            .runner_connected(
                runner_id,
                &cert.serial_hex,
                &labels,
                capacity as i32,
                &hello.version,
                Utc::now(),
            )
            .await
            .map_err(store_status)?;

        // Runs the database gives this runner but it no longer executes (it
        // restarted) will never report back: take them back from it.
        let held = held_runs(&hello.active);
        let still_running: HashSet<(Uuid, i64)> = held.iter().copied().collect();
        let mut running = HashMap::new();
        for run in self
            .store
            .active_runs_of_runner(runner_id)
            .await
            .map_err(store_status)?
        {
            if still_running.contains(&(run.id, run.fencing_token)) {
                running.insert(run.id, run.fencing_token);
                continue;
            }
            crate::dispatch::abandon(
                &*self.store,
                &*self.bus,
                self.dispatcher.metrics(),
                run.id,
                run.fencing_token,
                "the runner restarted and no longer executes this run",
            )
            .await
            .map_err(store_status)?;
        }
        // A runner back within its lease keeps its runs: their leases run on.
        let renewal = self
            .store
            .extend_leases(runner_id, &held, Utc::now() + self.dispatcher.lease_ttl())
            .await
            .map_err(store_status)?;

        let (outbox, rx) = mpsc::channel(256);
        // Cancels asked for while this runner was away, and runs it still
        // executes but lost meanwhile (lease expired, retried elsewhere).
        apply_renewal(&outbox, renewal);
        let session = self.dispatcher.connect(
            runner_id,
            runner.org_id,
            labels,
            capacity,
            running,
            outbox.clone(),
        );
        // A revocation between the store's check above and `connect` found
        // no stream to close; the revocation set is updated before the
        // dispatcher is told, so this check catches it.
        if self.revocations.runner_revoked(runner_id) {
            self.dispatcher.kick(runner_id);
        }
        tracing::info!(runner_id = %runner_id, runner = %runner.name, capacity, "runner connected");

        let store = self.store.clone();
        let dispatcher = self.dispatcher.clone();
        let bus = self.bus.clone();
        let shutdown = self.shutdown.clone();
        let renewer = Renewer {
            ca: self.ca.clone(),
            validity: self.runner_cert_validity,
            runner_id,
            presented_serial: cert.serial_hex.clone(),
            last: None,
        };
        tokio::spawn(async move {
            let mut renewer = renewer;
            // Each runner's writes are put at a phase of the minute of its
            // own (its id's random bits), so a fleet that connected at once
            // does not write all at once every minute.
            let phase = Duration::from_millis(
                (runner_id.as_u128() % LAST_SEEN_PRECISION.as_millis()) as u64,
            );
            let now = tokio::time::Instant::now();
            let mut last_seen = now.checked_sub(phase).unwrap_or(now);
            let failed = CancellationToken::new();
            let mut lanes = Lanes::open(
                capacity,
                LaneContext {
                    store: store.clone(),
                    dispatcher: dispatcher.clone(),
                    bus: bus.clone(),
                    runner_id,
                    outbox: outbox.clone(),
                    failed: failed.clone(),
                },
            );
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = session.kicked.cancelled() => {
                        let _ = outbox.try_send(Err(Status::permission_denied("this runner was revoked")));
                        break;
                    }
                    // A lane's message failed; it told the runner why.
                    _ = failed.cancelled() => break,
                    m = inbound.next() => m,
                };
                let message = match message {
                    Some(Ok(m)) => m,
                    Some(Err(status)) => {
                        tracing::info!(runner_id = %runner_id, error = %status, "runner stream broke");
                        break;
                    }
                    None => break,
                };
                if last_seen.elapsed() > LAST_SEEN_PRECISION {
                    last_seen = tokio::time::Instant::now();
                    if let Err(error) = store.runner_seen(runner_id, Utc::now()).await {
                        tracing::warn!(%error, "could not record runner heartbeat");
                    }
                }
                let handled = match message.kind {
                    Some(runner_message::Kind::RenewCertificate(renew)) => {
                        renewer.renew(&*store, &outbox, renew).await
                    }
                    _ => match lanes.lane_of(&message) {
                        Some(lane) => {
                            lanes.send(lane, message).await;
                            Ok(())
                        }
                        None => {
                            handle_message(&*store, &dispatcher, &*bus, runner_id, &outbox, message)
                                .await
                        }
                    },
                };
                if let Err(error) = handled {
                    tracing::warn!(runner_id = %runner_id, %error, "runner message failed; closing its stream");
                    let _ = outbox.send(Err(error)).await;
                    break;
                }
            }
            // What the runner sent before its stream ended is still handled
            // (a result, its last log); nothing more once the stream failed
            // or the coordinator shuts down.
            if failed.is_cancelled() || shutdown.is_cancelled() {
                lanes.abort();
            }
            lanes.close().await;
            dispatcher.disconnect(runner_id, session.id);
            if let Err(error) = store.runner_disconnected(runner_id, Utc::now()).await {
                tracing::warn!(%error, "could not record runner disconnect");
            }
            tracing::info!(runner_id = %runner_id, "runner disconnected");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn upload_artifacts(
        &self,
        request: Request<Streaming<ArtifactChunk>>,
    ) -> Result<Response<ArtifactsStored>, Status> {
        let cert = runner_of(&request)?;
        let mut chunks = request.into_inner();
        let mut run: Option<(String, u64)> = None;
        let mut archive = Vec::new();
        while let Some(chunk) = chunks.message().await? {
            run.get_or_insert_with(|| (chunk.run_id.clone(), chunk.fencing_token));
            archive.extend_from_slice(&chunk.data);
            if archive.len() as u64 > self.max_artifact_bytes {
                return Err(Status::resource_exhausted(format!(
                    "the artifacts are over the coordinator's limit of {} MiB (--max-artifacts-mib)",
                    self.max_artifact_bytes >> 20
                )));
            }
        }
        let (run_id, token) = run.ok_or_else(|| Status::invalid_argument("no artifacts sent"))?;
        let run_id = parse_uuid(&run_id, "run id")?;
        let holder = self
            .store
            .run(Scope::All, run_id)
            .await
            .map_err(store_status)?;
        let held = |r: &crate::store::Run| {
            r.runner_id.map(|id| id.to_string()) == Some(cert.runner_id.clone())
        };
        if !holder.as_ref().is_some_and(held) {
            return Err(Status::permission_denied(
                "this runner does not hold that run",
            ));
        }
        let limits = muster_common::bundle::Limits {
            max_compressed_bytes: self.max_artifact_bytes,
            max_unpacked_bytes: self.max_artifact_bytes.saturating_mul(4),
            max_entries: 10_000,
        };
        let files = tokio::task::spawn_blocking(move || {
            muster_common::bundle::Bundle::from_tar_gz(&archive, &limits).map(|bundle| {
                bundle
                    .files()
                    .filter_map(|(path, entry)| match entry {
                        muster_common::bundle::Entry::File { data, .. } => {
                            Some((path.to_owned(), data.clone()))
                        }
                        muster_common::bundle::Entry::Symlink { .. } => None,
                    })
                    .collect::<Vec<_>>()
            })
        })
        .await
        .map_err(|_| Status::internal("reading the artifacts panicked"))?
        .map_err(|e| {
            Status::invalid_argument(format!("the artifacts archive is unreadable: {e}"))
        })?;
        let bytes = files.iter().map(|(_, d)| d.len() as u64).sum();
        match self
            .store
            .put_artifacts(run_id, token as i64, &files)
            .await
            .map_err(store_status)?
        {
            Fenced::Applied => {
                tracing::info!(run_id = %run_id, files = files.len(), bytes, "artifacts stored");
                Ok(Response::new(ArtifactsStored {
                    files: files.len() as u32,
                    bytes,
                }))
            }
            Fenced::Stale => Err(Status::failed_precondition("this lease is no longer valid")),
        }
    }

    type FetchBundleStream = ReceiverStream<Result<BundleChunk, Status>>;

    async fn fetch_bundle(
        &self,
        request: Request<FetchBundleRequest>,
    ) -> Result<Response<Self::FetchBundleStream>, Status> {
        let cert = runner_of(&request)?;
        let req = request.into_inner();
        let run_id = parse_uuid(&req.run_id, "run id")?;
        let run = self
            .store
            .run(Scope::All, run_id)
            .await
            .map_err(store_status)?;
        // A runner may read a bundle only while it holds a lease that pins it.
        let entitled = run.is_some_and(|r| {
            r.runner_id.map(|id| id.to_string()) == Some(cert.runner_id.clone())
                && matches!(r.status, RunStatus::Leased | RunStatus::Running)
                && r.bundle_digest == req.digest
        });
        if !entitled {
            return Err(Status::permission_denied(
                "no active lease of this runner pins that bundle",
            ));
        }
        let bytes = self
            .store
            .bundle(&req.digest)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("bundle {} is not stored", req.digest)))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for chunk in bytes.chunks(BUNDLE_CHUNK) {
                if tx
                    .send(Ok(BundleChunk {
                        data: chunk.to_vec(),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Signs a stream's certificate renewals: always for the runner the
/// stream's client certificate names, whatever the request says.
struct Renewer {
    ca: Arc<CertificateAuthority>,
    validity: Duration,
    runner_id: Uuid,
    /// The serial of the certificate the stream was opened with.
    presented_serial: String,
    last: Option<tokio::time::Instant>,
}

impl Renewer {
    async fn renew(
        &mut self,
        store: &dyn Store,
        outbox: &crate::dispatch::Outbox,
        request: RenewCertificate,
    ) -> Result<(), Status> {
        if self
            .last
            .is_some_and(|at| at.elapsed() < MIN_RENEWAL_INTERVAL)
        {
            return Err(Status::resource_exhausted(
                "certificate renewed less than a minute ago on this stream",
            ));
        }
        if request.csr_pem.len() > MAX_CSR_PEM {
            return Err(Status::invalid_argument(format!(
                "certificate signing request of {} bytes, expected at most {MAX_CSR_PEM}",
                request.csr_pem.len()
            )));
        }
        let issued = self
            .ca
            .sign_runner_csr(&request.csr_pem, &self.runner_id.to_string(), self.validity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let recorded = store
            .runner_cert_renewed(
                self.runner_id,
                &self.presented_serial,
                &issued.serial_hex,
                issued.not_after,
            )
            .await
            .map_err(store_status)?;
        if !recorded {
            return Err(Status::permission_denied(
                "runner certificate is revoked or superseded",
            ));
        }
        self.last = Some(tokio::time::Instant::now());
        tracing::info!(runner_id = %self.runner_id, serial = %issued.serial_hex, not_after = %issued.not_after, "runner certificate renewed");
        send(
            outbox,
            coordinator_message::Kind::CertificateRenewed(CertificateRenewed {
                cert_pem: issued.pem,
                not_after_ms: issued.not_after.timestamp_millis(),
            }),
        );
        Ok(())
    }
}

fn send(outbox: &crate::dispatch::Outbox, kind: coordinator_message::Kind) {
    // A full outbox means the runner stopped reading; its stream is torn down
    // by keep-alive, so dropping an acknowledgement here loses nothing: the
    // runner resends what was not acknowledged.
    let _ = outbox.try_send(Ok(CoordinatorMessage { kind: Some(kind) }));
}

/// Tells a runner what its lease renewal found: runs to stop because it no
/// longer holds them (what they report is refused anyway), and runs asked to
/// cancel, asked again at every heartbeat until they end, so a cancel signal
/// the event bus lost still arrives.
fn apply_renewal(outbox: &crate::dispatch::Outbox, renewal: LeaseRenewal) {
    for (run_id, token) in renewal.cancel {
        send_cancel(outbox, run_id, token);
    }
    for (run_id, token) in renewal.stale {
        reject(
            outbox,
            &run_id.to_string(),
            token as u64,
            "this lease has expired",
        );
    }
}

fn send_cancel(outbox: &crate::dispatch::Outbox, run_id: Uuid, token: i64) {
    // Dropped when the outbox is full, as acknowledgements are: the stored
    // request is sent again when the run starts or the runner reconnects.
    let _ = outbox.try_send(Ok(crate::dispatch::cancel_message(run_id, token)));
}

/// The runs a runner says it executes, as `(run, fencing token)`.
fn held_runs(refs: &[RunRef]) -> Vec<(Uuid, i64)> {
    refs.iter()
        .filter_map(|r| Some((Uuid::parse_str(&r.run_id).ok()?, r.fencing_token as i64)))
        .collect()
}

fn reject(outbox: &crate::dispatch::Outbox, run_id: &str, token: u64, reason: &str) {
    send(
        outbox,
        coordinator_message::Kind::Reject(Reject {
            run_id: run_id.to_owned(),
            fencing_token: token,
            reason: reason.to_owned(),
        }),
    );
}

/// The most lanes one runner's stream is handled on.
const MAX_LANES: usize = 16;
/// Messages waiting per lane before the stream's reader waits for it.
const LANE_QUEUE: usize = 64;

/// What a lane needs to handle a runner's messages.
#[derive(Clone)]
struct LaneContext {
    store: Arc<dyn Store>,
    dispatcher: Arc<Dispatcher>,
    bus: Arc<dyn Bus>,
    runner_id: Uuid,
    outbox: crate::dispatch::Outbox,
    /// Fired when a message failed: the stream closes.
    failed: CancellationToken,
}

/// A runner's stream handled on a few lanes, each a task taking its
/// messages one at a time: all the messages of one run (started, log,
/// finished, release) go to the same lane, so they keep the order the
/// runner sent them in, while different runs' messages proceed at once
/// instead of each waiting for the others' commits.
struct Lanes {
    context: LaneContext,
    /// Each lane's queue, once a message went to it: a runner that runs
    /// nothing costs no task.
    queues: Vec<Option<mpsc::Sender<RunnerMessage>>>,
    tasks: tokio::task::JoinSet<()>,
    hasher: std::hash::RandomState,
}

impl Lanes {
    /// As many lanes as the runner runs jobs at once, up to [`MAX_LANES`].
    fn open(capacity: usize, context: LaneContext) -> Lanes {
        Lanes {
            context,
            queues: vec![None; capacity.clamp(1, MAX_LANES)],
            tasks: tokio::task::JoinSet::new(),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// The lane of a message about one run; `None` for the others
    /// (heartbeats, drain notices), handled where they are read.
    fn lane_of(&self, message: &RunnerMessage) -> Option<usize> {
        use std::hash::BuildHasher;
        let run_id = match message.kind.as_ref()? {
            runner_message::Kind::Started(m) => &m.run_id,
            runner_message::Kind::Log(m) => &m.run_id,
            runner_message::Kind::Finished(m) => &m.run_id,
            runner_message::Kind::Release(m) => &m.run_id,
            _ => return None,
        };
        Some(self.hasher.hash_one(run_id) as usize % self.queues.len())
    }

    /// Queues a message on its lane, waiting while that lane is full. A
    /// lane that ended has failed, and the stream closes.
    async fn send(&mut self, lane: usize, message: RunnerMessage) {
        let queue = self.queues[lane].get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::channel::<RunnerMessage>(LANE_QUEUE);
            let c = self.context.clone();
            self.tasks.spawn(async move {
                while let Some(message) = rx.recv().await {
                    let handled = handle_message(
                        &*c.store,
                        &c.dispatcher,
                        &*c.bus,
                        c.runner_id,
                        &c.outbox,
                        message,
                    )
                    .await;
                    if let Err(error) = handled {
                        tracing::warn!(runner_id = %c.runner_id, %error, "runner message failed; closing its stream");
                        let _ = c.outbox.send(Err(error)).await;
                        c.failed.cancel();
                        return;
                    }
                }
            });
            tx
        });
        let _ = queue.send(message).await;
    }

    fn abort(&mut self) {
        self.tasks.abort_all();
    }

    /// Waits for the lanes to finish what they were given.
    async fn close(mut self) {
        self.queues.clear();
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn handle_message(
    store: &dyn Store,
    dispatcher: &Dispatcher,
    bus: &dyn Bus,
    runner_id: Uuid,
    outbox: &crate::dispatch::Outbox,
    message: RunnerMessage,
) -> Result<(), Status> {
    use runner_message::Kind;
    match message.kind {
        Some(Kind::Draining(_)) => {
            tracing::info!(runner_id = %runner_id, "runner drains: no more leases for it");
            dispatcher.drain(runner_id);
            Ok(())
        }
        Some(Kind::Release(release)) => {
            let run_id = parse_uuid(&release.run_id, "run id")?;
            let released = store
                .release_lease(run_id, release.fencing_token as i64)
                .await
                .map_err(store_status)?;
            dispatcher.release(runner_id, run_id);
            if released == Fenced::Applied {
                tracing::info!(run_id = %run_id, runner_id = %runner_id, "runner gave a lease back; run queued again");
                announce(bus, Event::RunQueued { run_id }).await;
            }
            Ok(())
        }
        None | Some(Kind::Hello(_)) | Some(Kind::RenewCertificate(_)) => Err(
            Status::invalid_argument("unexpected message on an open stream"),
        ),
        Some(Kind::Heartbeat(beat)) => {
            let renewal = store
                .extend_leases(
                    runner_id,
                    &held_runs(&beat.active),
                    Utc::now() + dispatcher.lease_ttl(),
                )
                .await
                .map_err(store_status)?;
            apply_renewal(outbox, renewal);
            Ok(())
        }
        Some(Kind::Started(started)) => {
            let run_id = parse_uuid(&started.run_id, "run id")?;
            let start = RunStart {
                executor: started.executor,
                image: Some(started.image).filter(|s| !s.is_empty()),
                image_digest: Some(started.image_digest).filter(|s| !s.is_empty()),
                started_at: ms_to_time(started.started_at_ms),
            };
            match store
                .mark_running(run_id, started.fencing_token as i64, &start)
                .await
                .map_err(store_status)?
            {
                None => reject(
                    outbox,
                    &started.run_id,
                    started.fencing_token,
                    "this lease is no longer valid",
                ),
                Some(run) => {
                    // A cancel that came while the lease was on its way
                    // reached a runner that did not know the run yet.
                    if run.cancel_requested_at.is_some() {
                        send_cancel(outbox, run_id, started.fencing_token as i64);
                    }
                    let running = Event::StatusChanged {
                        run_id,
                        status: run.status,
                        runner: run.runner_name,
                    };
                    announce(bus, running).await;
                }
            }
            Ok(())
        }
        Some(Kind::Log(chunk)) => {
            let run_id = parse_uuid(&chunk.run_id, "run id")?;
            if chunk.seq == 0 || chunk.data.len() > MAX_LOG_CHUNK {
                return Err(Status::invalid_argument(
                    "log chunk with seq 0 or over 1 MiB",
                ));
            }
            let stream = match LogStream::try_from(chunk.stream).unwrap_or(LogStream::Unspecified) {
                LogStream::Stderr => 2,
                LogStream::System => 3,
                _ => 1,
            };
            let stored = LogChunk {
                seq: chunk.seq as i64,
                stream,
                ts: ms_to_time(chunk.timestamp_ms),
                data: chunk.data,
            };
            match store
                .append_logs(
                    run_id,
                    chunk.fencing_token as i64,
                    std::slice::from_ref(&stored),
                )
                .await
                .map_err(store_status)?
            {
                Ok(acked) => {
                    dispatcher.metrics().log_stored(stored.data.len());
                    send(
                        outbox,
                        coordinator_message::Kind::LogAck(LogAck {
                            run_id: chunk.run_id,
                            acked_seq: acked as u64,
                        }),
                    );
                    announce(
                        bus,
                        Event::Log {
                            run_id,
                            chunk: stored,
                        },
                    )
                    .await;
                }
                Err(Fenced::Stale | Fenced::Applied) => reject(
                    outbox,
                    &chunk.run_id,
                    chunk.fencing_token,
                    "this lease is no longer valid",
                ),
            }
            Ok(())
        }
        Some(Kind::Finished(finished)) => {
            finish(store, dispatcher, bus, runner_id, outbox, finished).await
        }
    }
}

async fn finish(
    store: &dyn Store,
    dispatcher: &Dispatcher,
    bus: &dyn Bus,
    runner_id: Uuid,
    outbox: &crate::dispatch::Outbox,
    finished: RunFinished,
) -> Result<(), Status> {
    let run_id = parse_uuid(&finished.run_id, "run id")?;
    let status = match RunOutcome::try_from(finished.outcome).unwrap_or(RunOutcome::Unspecified) {
        RunOutcome::Succeeded => RunStatus::Succeeded,
        RunOutcome::Canceled => RunStatus::Canceled,
        RunOutcome::TimedOut => RunStatus::TimedOut,
        RunOutcome::Failed | RunOutcome::Unspecified => RunStatus::Failed,
    };
    let end = RunEnd {
        status,
        exit_code: finished.exit_code,
        error: Some(finished.error).filter(|e| !e.is_empty()),
        last_seq: finished.last_seq as i64,
        finished_at: ms_to_time(finished.finished_at_ms),
        // Empty from a runner from before log checks.
        log_account: (!finished.log_sha256.is_empty()).then_some(LogAccount {
            bytes: finished.log_bytes as i64,
            sha256: finished.log_sha256,
        }),
    };
    let token = finished.fencing_token as i64;
    let outcome = match dispatcher.refill(runner_id, run_id) {
        Some(next) => store.finish_and_claim(run_id, token, &end, &next).await,
        None => store
            .finish_run(run_id, token, &end)
            .await
            .map(|run| run.map(|run| (run, None))),
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(error) => {
            dispatcher.release(runner_id, run_id);
            return Err(store_status(error));
        }
    };
    match &outcome {
        Some((_, Some(next))) => dispatcher
            .hand_over(runner_id, run_id, next)
            .await
            .map_err(store_status)?,
        _ => dispatcher.release(runner_id, run_id),
    }
    match outcome.map(|(run, _)| run) {
        Some(run) => {
            if run.log_check.as_ref().is_some_and(|c| !c.verified) {
                tracing::warn!(run_id = %run_id, runner_bytes = end.log_account.as_ref().map(|a| a.bytes), "the stored log does not match the runner's account of it");
            }
            tracing::info!(run_id = %run_id, status = status.as_str(), exit_code = ?end.exit_code, "run finished");
            dispatcher.metrics().run_finished(&run);
            announce(
                bus,
                Event::Finished {
                    run_id,
                    status,
                    exit_code: end.exit_code,
                },
            )
            .await;
            send(
                outbox,
                coordinator_message::Kind::FinishedAck(FinishedAck {
                    run_id: finished.run_id,
                }),
            );
        }
        None => reject(
            outbox,
            &finished.run_id,
            finished.fencing_token,
            "this lease is no longer valid",
        ),
    }
    Ok(())
}
