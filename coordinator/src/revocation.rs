//! Runner revocation: what the coordinator refuses, and how a revocation
//! takes effect.
//!
//! The store records a revocation; this module makes it bite. Every
//! coordinator keeps the revoked runners' ids and certificate serials in
//! memory ([`Revocations`]), loaded from the store at start, added to at once
//! on a local revocation, and refreshed from the store every
//! [`REFRESH_EVERY`], so coordinators sharing a database converge. The TLS
//! handshake consults it through [`RevocationCheckingVerifier`]; a runner
//! whose stream this coordinator holds is cut off by the dispatcher.
//!
//! Revocation is permanent, so the sets only grow: a refresh adds what the
//! store says and never removes what a local revocation added while the
//! refresh was reading.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use muster_common::pki::{runner_cert_info, RunnerCert};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::Bus;
use crate::dispatch::{abandon, Dispatcher};
use crate::store::{RevokedRunner, Runner, Scope, Store, StoreError};

/// How often a coordinator reads revocations other coordinators recorded.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);

/// Why the runs of a revoked runner ended.
pub const REVOKED_RUN_ERROR: &str = "the runner was revoked";

/// The revoked runners this coordinator knows of.
#[derive(Debug, Default)]
pub struct Revocations {
    revoked: RwLock<Revoked>,
}

#[derive(Debug, Default)]
struct Revoked {
    /// Runner ids as a runner certificate's common name spells them.
    runner_ids: HashSet<String>,
    serials: HashSet<String>,
}

impl Revocations {
    /// The revocations the store holds now.
    pub async fn load(store: &dyn Store) -> Result<Arc<Revocations>, StoreError> {
        let revocations = Arc::new(Revocations::default());
        revocations.refresh(store).await?;
        Ok(revocations)
    }

    /// Adds what the store holds; returns how many runners were new.
    pub async fn refresh(&self, store: &dyn Store) -> Result<usize, StoreError> {
        let revoked = store.revoked_runners().await?;
        Ok(revoked.iter().filter(|r| self.add(r)).count())
    }

    /// Adds one revoked runner; returns whether it was new.
    pub fn add(&self, runner: &RevokedRunner) -> bool {
        let mut revoked = self.revoked.write().unwrap_or_else(PoisonError::into_inner);
        revoked.serials.extend(runner.cert_serials.iter().cloned());
        revoked.runner_ids.insert(runner.id.to_string())
    }

    /// Whether a certificate belongs to a revoked runner, or is itself revoked.
    pub fn refuses(&self, cert: &RunnerCert) -> bool {
        let revoked = self.revoked.read().unwrap_or_else(PoisonError::into_inner);
        revoked.runner_ids.contains(&cert.runner_id) || revoked.serials.contains(&cert.serial_hex)
    }

    pub fn runner_revoked(&self, id: Uuid) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .runner_ids
            .contains(&id.to_string())
    }
}

/// The CA check of client certificates, then the revocation check: a
/// certificate of a revoked runner fails the handshake with the
/// `certificate_revoked` alert, which tells the runner why.
#[derive(Debug)]
pub struct RevocationCheckingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl RevocationCheckingVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, revocations: Arc<Revocations>) -> Self {
        RevocationCheckingVerifier { inner, revocations }
    }
}

impl ClientCertVerifier for RevocationCheckingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(cert) = runner_cert_info(end_entity) {
            if self.revocations.refuses(&cert) {
                tracing::info!(runner_id = %cert.runner_id, serial = %cert.serial_hex, "refused a revoked runner's certificate");
                return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What revoking needs: the store that records it, and this coordinator's
/// view of it.
#[derive(Clone)]
pub struct Revoker {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub dispatcher: Arc<Dispatcher>,
    pub revocations: Arc<Revocations>,
}

impl Revoker {
    /// Revokes a runner of the scope: recorded in the store, refused at the
    /// handshake from now on, its runs that were leased or running `lost`,
    /// and its stream, if this coordinator holds it, told to stop them and
    /// closed. `None`: the scope has no such runner.
    pub async fn revoke(
        &self,
        scope: Scope,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<Runner>, StoreError> {
        let Some(runner) = self.store.revoke_runner(scope, id, now).await? else {
            return Ok(None);
        };
        self.revocations.add(&RevokedRunner {
            id,
            cert_serials: std::iter::once(runner.cert_serial.clone())
                .chain(runner.previous_cert_serial.clone())
                .collect(),
        });
        // The store's record of the runs comes first: whatever the runner
        // says about them later is refused as stale.
        for run in self.store.active_runs_of_runner(id).await? {
            abandon(
                &*self.store,
                &*self.bus,
                self.dispatcher.metrics(),
                run.id,
                run.fencing_token,
                REVOKED_RUN_ERROR,
            )
            .await?;
        }
        if self.dispatcher.kick(id) {
            tracing::info!(runner_id = %id, "closed the stream of a revoked runner");
        }
        Ok(Some(runner))
    }

    /// Every `REFRESH_EVERY`, learns of revocations other coordinators
    /// recorded and closes the streams this coordinator holds for them.
    pub async fn refresh_loop(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
            match self.revocations.refresh(&*self.store).await {
                Ok(0) => {}
                Ok(new) => tracing::info!(new, "learned of revoked runners"),
                Err(error) => {
                    tracing::warn!(%error, "could not read revoked runners; trying again soon")
                }
            }
            let revocations = &self.revocations;
            for id in self
                .dispatcher
                .kick_where(|id| revocations.runner_revoked(id))
            {
                tracing::info!(runner_id = %id, "closed the stream of a revoked runner");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(runner_id: &str, serial: &str) -> RunnerCert {
        RunnerCert {
            runner_id: runner_id.into(),
            serial_hex: serial.into(),
            not_before: Utc::now(),
            not_after: Utc::now(),
        }
    }

    #[test]
    fn refuses_by_runner_id_and_by_serial() {
        let revocations = Revocations::default();
        let id = Uuid::now_v7();
        assert!(!revocations.refuses(&cert(&id.to_string(), "01")));
        assert!(revocations.add(&RevokedRunner {
            id,
            cert_serials: vec!["01".into(), "02".into()],
        }));
        assert!(!revocations.add(&RevokedRunner {
            id,
            cert_serials: vec!["01".into()],
        }));
        assert!(revocations.runner_revoked(id));
        assert!(
            revocations.refuses(&cert(&id.to_string(), "ff")),
            "any certificate of the runner"
        );
        assert!(
            revocations.refuses(&cert("someone", "02")),
            "a revoked serial"
        );
        assert!(!revocations.refuses(&cert("someone", "03")));
        assert!(!revocations.runner_revoked(Uuid::now_v7()));
    }
}
