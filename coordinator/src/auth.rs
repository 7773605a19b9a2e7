//! API key authentication: `Authorization: Bearer poly_…` → the caller's
//! identity, role and organization scope.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use muster_common::token::{self, TokenKind};
use uuid::Uuid;

use crate::api::AppState;
use crate::error::ServiceError;
use crate::store::{Identity, Role, Scope};

/// An authenticated API caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub key_id: Uuid,
    pub key_name: String,
}

impl Caller {
    /// The organizations this caller may see.
    pub fn scope(&self) -> Scope {
        if self.identity.role == Role::SuperAdmin {
            Scope::All
        } else {
            Scope::Org(self.identity.org_id)
        }
    }

    /// Refuses callers whose role is below `role`.
    pub fn require(&self, role: Role, to: &str) -> Result<(), ServiceError> {
        if self.identity.role >= role {
            Ok(())
        } else {
            Err(ServiceError::forbidden(format!(
                "to {to} you need the role {} or higher; this API key's identity has {}",
                role.as_str(),
                self.identity.role.as_str()
            )))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ServiceError::unauthenticated(
                    "missing Authorization header; send 'Authorization: Bearer <API key>'",
                )
            })?;
        let value = header
            .to_str()
            .map_err(|_| ServiceError::unauthenticated("Authorization header is not valid text"))?;
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("Token "))
            .map(str::trim)
            .ok_or_else(|| {
                ServiceError::unauthenticated("Authorization header must be 'Bearer <API key>'")
            })?;
        token::validate(TokenKind::ApiKey, key)
            .map_err(|e| ServiceError::unauthenticated(format!("API key refused: {e}")))?;
        let found = state
            .store
            .authenticate_api_key(&token::hash(key), chrono::Utc::now())
            .await?;
        let (api_key, identity) = found.ok_or_else(|| {
            ServiceError::unauthenticated("API key is unknown, expired or revoked")
        })?;
        Ok(Caller {
            identity,
            key_id: api_key.id,
            key_name: api_key.name,
        })
    }
}
