//! API key authentication: `Authorization: Bearer poly_…` → the caller's
//! identity, role and organization scope; and monitoring agents' tokens
//! (`agt_…`), which open the agent routes only.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use muster_common::token::{self, TokenKind};
use uuid::Uuid;

use crate::api::AppState;
use crate::error::ServiceError;
use crate::monitoring::Agent;
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

/// The bearer token of a request.
fn bearer(parts: &Parts) -> Result<&str, ServiceError> {
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
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("Token "))
        .map(str::trim)
        .ok_or_else(|| {
            ServiceError::unauthenticated("Authorization header must be 'Bearer <API key>'")
        })
}

/// The agent an agent token belongs to; 401 for an unknown, malformed or
/// revoked one.
async fn agent_of(state: &AppState, token: &str) -> Result<Agent, ServiceError> {
    token::validate(TokenKind::AgentToken, token)
        .map_err(|e| ServiceError::unauthenticated(format!("agent token refused: {e}")))?;
    state
        .store
        .authenticate_agent(&token::hash(token))
        .await?
        .ok_or_else(|| ServiceError::unauthenticated("agent token is unknown or revoked"))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer(parts)?;
        if key.starts_with(TokenKind::AgentToken.prefix()) {
            // A monitoring agent's token opens the agent routes and nothing else.
            agent_of(state, key).await?;
            return Err(ServiceError::forbidden(
                "an agent token may only use the agent routes (/api/v1/agent/health/, \
                 /api/v1/agent/endpoints/, /api/v1/agent/results/)",
            ));
        }
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

/// An authenticated monitoring agent, on the agent routes: only an agent
/// token (`agt_…`) gets this far; an API key is refused with 403.
#[derive(Debug, Clone)]
pub struct AgentCaller(pub Agent);

impl FromRequestParts<AppState> for AgentCaller {
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?;
        if token.starts_with(TokenKind::ApiKey.prefix()) {
            return Err(ServiceError::forbidden(
                "this route is for monitoring agents: authenticate with an agent token (agt_…), not an API key",
            ));
        }
        Ok(AgentCaller(agent_of(state, token).await?))
    }
}
