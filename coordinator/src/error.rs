//! The coordinator's service error: one code that maps to both an HTTP status
//! (with a JSON body naming what was wrong) and a gRPC status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BadRequest,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    Unprocessable,
    TooLarge,
    Unavailable,
    Internal,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    pub code: Code,
    pub message: String,
}

impl ServiceError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ServiceError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(Code::BadRequest, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Code::NotFound, m)
    }
    pub fn unprocessable(m: impl Into<String>) -> Self {
        Self::new(Code::Unprocessable, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(Code::Forbidden, m)
    }
    pub fn unauthenticated(m: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, m)
    }

    pub fn http_status(&self) -> StatusCode {
        match self.code {
            Code::BadRequest => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::Forbidden => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::Conflict => StatusCode::CONFLICT,
            Code::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            Code::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self.code {
            Code::BadRequest | Code::Unprocessable => tonic::Code::InvalidArgument,
            Code::Unauthenticated => tonic::Code::Unauthenticated,
            Code::Forbidden => tonic::Code::PermissionDenied,
            Code::NotFound => tonic::Code::NotFound,
            Code::Conflict => tonic::Code::AlreadyExists,
            Code::TooLarge => tonic::Code::ResourceExhausted,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::Internal => tonic::Code::Internal,
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => {
                ServiceError::new(Code::Conflict, format!("{what} already exists"))
            }
            StoreError::Unavailable(_) => {
                tracing::error!(error = %e, "database unavailable");
                ServiceError::new(Code::Unavailable, "the database is unavailable; try again")
            }
            StoreError::Invalid(why) => ServiceError::bad_request(format!(
                "a value cannot be stored or searched for: {why}"
            )),
            StoreError::Database(_) | StoreError::Corrupt(_) => {
                tracing::error!(error = %e, "database error");
                ServiceError::new(Code::Internal, "internal error (logged on the coordinator)")
            }
        }
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        tonic::Status::new(e.grpc_code(), e.message)
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        let mut response = (status, axum::Json(json!({ "detail": self.message }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Axum refuses some requests itself, in plain text: a query string or path
/// its extractors cannot read, a method the path does not serve. The API
/// answers every refusal as `{"detail": …}`, so those are rewritten here (as
/// a layer over the whole router); JSON answers pass as they are.
pub async fn json_refusals(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Axum's refusals are one short line; anything longer is cut.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let detail = if status == StatusCode::METHOD_NOT_ALLOWED {
        // The router adds `Allow` after this layer has run.
        "method not allowed: the Allow header lists the methods of this path".to_owned()
    } else if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("refused")
            .to_lowercase()
    } else {
        text
    };
    let body = serde_json::to_vec(&json!({ "detail": detail })).unwrap_or_default();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(body))
}
