//! The HTTP API under `/api/v1/`: JSON in and out, bearer API keys, every
//! query scoped to the caller's organization. Domain types are converted to
//! their JSON shape here and nowhere else.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, OriginalUri, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use muster_common::bundle::{Bundle, BundleError, Limits};
use muster_common::pki::CertificateAuthority;
use muster_common::plan::{self, PlanError};
use muster_common::token::{self, TokenKind};
use muster_common::workspace::{self, LoadedWorkspace};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::bus::{announce, Bus, Event};
use crate::error::{Code, ServiceError};
use crate::store::{
    ApiKey, CancelOutcome, NewApiKey, NewJoinToken, NewRun, Page, Role, Run, RunFilter, RunStatus,
    Runner, Scope, Store, Workspace,
};

pub(crate) mod openapi;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub ca: Arc<CertificateAuthority>,
    pub revoker: crate::revocation::Revoker,
    pub max_bundle_bytes: u64,
    /// How often live tails read the store while the bus is healthy.
    pub tail_poll: std::time::Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub(crate) type ApiResult<T> = Result<T, ServiceError>;

pub fn router(state: AppState) -> Router {
    let (endpoints, _) = endpoints().split_for_parts();
    endpoints
        .fallback(|| async {
            ServiceError::not_found("no such endpoint; the API lives under /api/v1/")
        })
        // JSON bodies are small; bundles are bounded by `read_bundle`.
        .layer(DefaultBodyLimit::max(1024 * 1024))
        .layer(axum::middleware::map_response(crate::error::json_refusals))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track_http,
        ))
        .with_state(state)
}

/// Every endpoint, each registered together with the OpenAPI description on
/// its handler (`#[utoipa::path]`, which names its path and method): the
/// router serves these and nothing else, and `/api/v1/schema/` documents
/// these. Add endpoints here, never with `Router::route`, so that none goes
/// undocumented.
fn endpoints() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(crate::metrics::serve))
        .routes(routes!(openapi::schema))
        .routes(routes!(list_organizations, create_organization))
        .routes(routes!(list_api_keys, create_api_key))
        .routes(routes!(revoke_api_key))
        .routes(routes!(list_workspaces, push_workspace))
        .routes(routes!(get_workspace))
        .routes(routes!(trigger))
        .routes(routes!(trigger_with_slash))
        .routes(routes!(list_runs))
        .routes(routes!(get_run))
        .routes(routes!(run_logs))
        .routes(routes!(cancel_run))
        .routes(routes!(list_artifacts))
        .routes(routes!(get_artifact))
        .routes(routes!(list_runners))
        .routes(routes!(revoke_runner))
        .routes(routes!(create_join_token))
        .merge(crate::monitoring::api::routes())
}

/// The OpenAPI document of the API, as `/api/v1/schema/` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi::finish(endpoints().into_openapi())
}

/// The process serves HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "meta",
    security(()),
    responses((status = 200, description = "alive", body = String, content_type = "text/plain")),
)]
async fn healthz() -> &'static str {
    "ok\n"
}

/// The coordinator can reach its database.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "meta",
    security(()),
    responses(
        (status = 200, description = "ready (the body says when the event bus is degraded)", body = String, content_type = "text/plain"),
        (status = 503, description = "the database is unreachable", body = String, content_type = "text/plain"),
    ),
)]
async fn readyz(State(state): State<AppState>) -> Response {
    match state
        .store
        .list_organizations(Scope::Org(Uuid::nil()))
        .await
    {
        // A bus outage slows live fan-out but loses nothing: still ready.
        Ok(_) if !*state.bus.health().borrow() => (
            StatusCode::OK,
            "ready; the event bus is degraded (Redis unreachable): live events arrive through the store\n",
        )
            .into_response(),
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {error}\n"),
        )
            .into_response(),
    }
}

// ---- helpers (the monitoring routes share them) ----------------------------

pub(crate) fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn opt_time(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(time(t))).unwrap_or(Value::Null)
}

/// A request's JSON body, as handlers take it: read as a `Value` first, for
/// [`json_body`] to turn into the type the handler wants.
pub(crate) type JsonBody = Result<Json<Value>, JsonRejection>;

/// A JSON body as a `T`, or a refusal that says what was wrong, naming the
/// field: 413 over the body limit, 400 otherwise (text with a NUL too).
pub(crate) fn json_body<T: DeserializeOwned + Serialize>(body: JsonBody) -> ApiResult<T> {
    json_body_as(body, Code::BadRequest)
}

/// [`json_body`], but well-formed JSON of the wrong shape (a field missing,
/// a string for a number) is refused with `wrong_shape`: the monitoring
/// routes answer 422 for that, as for every bad field of theirs.
pub(crate) fn json_body_as<T: DeserializeOwned + Serialize>(
    body: JsonBody,
    wrong_shape: Code,
) -> ApiResult<T> {
    let (v, sent) = parse_json_body(body, wrong_shape)?;
    no_nul_in_json("", &sent)?;
    Ok(v)
}

/// [`json_body_as`] without the NUL check, for a route that checks the
/// parts of its body one by one; with the JSON as it was sent.
///
/// Read through a `Value`, not straight into `T`, because serde's derive
/// also takes a struct written as an array of its fields in order
/// (`"tls": [null, null]`): the document says an object, and so does the
/// API, naming where one was expected.
pub(crate) fn parse_json_body<T: DeserializeOwned + Serialize>(
    body: JsonBody,
    wrong_shape: Code,
) -> ApiResult<(T, Value)> {
    let Json(sent) = body.map_err(|rejection| {
        let code = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Code::TooLarge
        } else {
            Code::BadRequest
        };
        ServiceError::new(
            code,
            format!("invalid JSON body: {}", rejection.body_text()),
        )
    })?;
    let v: T = serde_path_to_error::deserialize(&sent).map_err(|e| {
        let at = e.path().to_string();
        let what = e.into_inner();
        let message = if at == "." {
            format!("invalid JSON body: {what}")
        } else {
            format!("invalid JSON body: {at}: {what}")
        };
        ServiceError::new(wrong_shape, message)
    })?;
    let read =
        serde_json::to_value(&v).map_err(|e| ServiceError::new(Code::Internal, e.to_string()))?;
    no_array_for_object("", &sent, &read).map_err(|at| {
        ServiceError::new(
            wrong_shape,
            format!("invalid JSON body: {at}: expected an object, found an array"),
        )
    })?;
    Ok((v, sent))
}

/// Where `sent` holds an array that was read as a struct (`read` is what
/// was read, written back), the path to it.
fn no_array_for_object(at: &str, sent: &Value, read: &Value) -> Result<(), String> {
    match (sent, read) {
        (Value::Array(_), Value::Object(_)) => Err(if at.is_empty() {
            "body".to_owned()
        } else {
            at.to_owned()
        }),
        (Value::Array(sent), Value::Array(read)) => sent
            .iter()
            .zip(read)
            .enumerate()
            .try_for_each(|(i, (s, r))| no_array_for_object(&format!("{at}[{i}]"), s, r)),
        (Value::Object(sent), Value::Object(read)) => sent.iter().try_for_each(|(key, s)| {
            let Some(r) = read.get(key) else {
                return Ok(());
            };
            let at = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            no_array_for_object(&at, s, r)
        }),
        _ => Ok(()),
    }
}

/// Refuses text holding a NUL character, naming the field: PostgreSQL
/// cannot store or compare it, and no name or path holds one.
pub(crate) fn no_nul(field: &str, value: &str) -> ApiResult<()> {
    if value.contains('\0') {
        return Err(ServiceError::bad_request(format!(
            "{field}: contains a NUL character (\\u0000), which no text here may hold"
        )));
    }
    Ok(())
}

/// `no_nul` over every key and string of a JSON body; `at` is the path so far.
pub(crate) fn no_nul_in_json(at: &str, value: &Value) -> ApiResult<()> {
    let field = |key: &str| {
        if at.is_empty() {
            key.to_owned()
        } else {
            format!("{at}.{key}")
        }
    };
    match value {
        Value::String(s) => no_nul(if at.is_empty() { "body" } else { at }, s),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| no_nul_in_json(&format!("{at}[{i}]"), v)),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            no_nul(&field("(a key)"), k)?;
            no_nul_in_json(&field(k), v)
        }),
        _ => Ok(()),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The page, from 1.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 4294967)]
    page: Option<String>,
    /// Results per page; 50 unless given.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 500)]
    page_size: Option<String>,
}

pub(crate) fn page_of(q: &PageQuery) -> ApiResult<Page> {
    let parse = |v: &Option<String>, name: &str, default: u32, max: u32| -> ApiResult<u32> {
        match v {
            None => Ok(default),
            Some(s) => match s.parse::<u32>() {
                Ok(n) if n >= 1 && n <= max => Ok(n),
                _ => Err(ServiceError::bad_request(format!(
                    "{name}: expected a whole number from 1 to {max}, found '{s}'"
                ))),
            },
        }
    };
    Ok(Page {
        page: parse(&q.page, "page", 1, u32::MAX / 1000)?,
        page_size: parse(&q.page_size, "page_size", 50, 500)?,
    })
}

/// `{count, next, previous, results}` with links that keep the other query
/// parameters.
pub(crate) fn paginated(
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    page: Page,
    count: i64,
    results: Vec<Value>,
) -> Value {
    let link = |n: u32| {
        let mut pairs: Vec<(String, String)> = uri
            .query()
            .map(|q| {
                q.split('&')
                    .filter_map(|kv| {
                        kv.split_once('=')
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    })
                    .filter(|(k, _)| k != "page")
                    .collect()
            })
            .unwrap_or_default();
        pairs.push(("page".into(), n.to_string()));
        let query: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}{}?{}", base_url(headers), uri.path(), query.join("&"))
    };
    let last_page = ((count.max(0) as u64).div_ceil(u64::from(page.page_size))).max(1);
    let next = (u64::from(page.page) < last_page).then(|| link(page.page + 1));
    let previous = (page.page > 1).then(|| link(page.page - 1));
    json!({ "count": count, "next": next, "previous": previous, "results": results })
}

/// A list that is never long, in the paginated shape, on one page.
pub(crate) fn listing(results: Vec<Value>) -> Value {
    json!({ "count": results.len(), "next": null, "previous": null, "results": results })
}

fn base_url(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| format!("http://{h}"))
        .unwrap_or_default()
}

fn run_not_found(id: Uuid) -> ServiceError {
    ServiceError::not_found(format!("run '{id}' not found"))
}

/// An id from a path: one that is not a UUID names nothing there is.
pub(crate) fn parse_id(s: &str, what: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| ServiceError::not_found(format!("{what} '{s}' not found")))
}

/// A store error, with `what` as the message when it is a conflict (a name
/// that is taken).
pub(crate) fn conflict(e: crate::store::StoreError, what: String) -> ServiceError {
    match e {
        crate::store::StoreError::Conflict(_) => ServiceError::new(Code::Conflict, what),
        other => other.into(),
    }
}

// ---- organizations ------------------------------------------------------

fn organization_json(o: &crate::store::Organization) -> Value {
    json!({ "id": o.id, "name": o.name, "created_at": time(o.created_at) })
}

#[derive(Debug, Deserialize, ToSchema, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrganization {
    #[schema(schema_with = openapi::name_schema)]
    name: String,
}

#[utoipa::path(
    post,
    path = "/api/v1/organizations/",
    tag = "organizations",
    summary = "Create an organization (super admins)",
    request_body = NewOrganization,
    responses(
        (status = 201, description = "created", body = openapi::Organization),
        (status = 400, description = "the body is not a valid organization", body = openapi::Problem),
        (status = 403, description = "only super admins create organizations", body = openapi::Problem),
        (status = 409, description = "an organization of that name exists", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
    ),
)]
async fn create_organization(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::SuperAdmin, "create organizations")?;
    let body: NewOrganization = json_body(body)?;
    if !workspace::is_valid_name(&body.name) {
        return Err(ServiceError::bad_request(format!(
            "name: '{}' is not a valid name (letters first, then letters, digits, '-', '_' or '/')",
            body.name
        )));
    }
    let org = state
        .store
        .create_organization(&body.name)
        .await
        .map_err(|e| conflict(e, format!("organization '{}' already exists", body.name)))?;
    Ok((StatusCode::CREATED, Json(organization_json(&org))))
}

#[utoipa::path(
    get,
    path = "/api/v1/organizations/",
    tag = "organizations",
    summary = "The organizations the caller sees (all of them for super admins)",
    responses((status = 200, description = "the organizations, on one page", body = openapi::Paginated<openapi::Organization>)),
)]
async fn list_organizations(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Value>> {
    let orgs = state.store.list_organizations(caller.scope()).await?;
    Ok(Json(listing(orgs.iter().map(organization_json).collect())))
}

// ---- API keys -----------------------------------------------------------

fn api_key_json(k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "identity_id": k.identity_id,
        "created_at": time(k.created_at),
        "expires_at": opt_time(k.expires_at),
        "last_used_at": opt_time(k.last_used_at),
        "revoked": k.revoked_at.is_some(),
        "revoked_at": opt_time(k.revoked_at),
    })
}

#[derive(Debug, Deserialize, ToSchema, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewApiKeyBody {
    /// What the key is for.
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    /// When the key stops working; never unless given.
    expires_at: Option<DateTime<Utc>>,
    /// Create the key for a new service identity of this name (with `role`)
    /// instead of for the caller.
    identity: Option<String>,
    /// The new identity's role, at most the caller's; `user` unless given.
    #[schema(value_type = Option<openapi::RoleName>)]
    role: Option<String>,
    /// Super admins only: the organization of the new identity.
    organization: Option<String>,
}

/// Create an API key, for the caller or for a new service identity
///
/// The answer holds the key itself, this once.
#[utoipa::path(
    post,
    path = "/api/v1/api-keys/",
    tag = "api-keys",
    request_body = NewApiKeyBody,
    responses(
        (status = 201, description = "created", body = openapi::CreatedApiKey),
        (status = 400, description = "a field is not valid", body = openapi::Problem),
        (status = 403, description = "the caller's role may not create that identity", body = openapi::Problem),
        (status = 409, description = "an identity of that name exists", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
        (status = 422, description = "the organization does not exist", body = openapi::Problem),
    ),
)]
async fn create_api_key(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let body: NewApiKeyBody = json_body(body)?;
    if body.name.trim().is_empty() || body.name.len() > 128 {
        return Err(ServiceError::bad_request(
            "name: expected 1 to 128 characters",
        ));
    }
    if body.expires_at.is_some_and(|t| t <= Utc::now()) {
        return Err(ServiceError::bad_request(
            "expires_at: must be in the future",
        ));
    }
    let identity = match &body.identity {
        None => {
            if body.role.is_some() || body.organization.is_some() {
                return Err(ServiceError::bad_request(
                    "role and organization need identity: they describe a new identity",
                ));
            }
            caller.identity.clone()
        }
        Some(name) => {
            caller.require(Role::OrgAdmin, "create identities")?;
            let role_name = body.role.as_deref().unwrap_or("user");
            let role = Role::parse(role_name).ok_or_else(|| {
                ServiceError::bad_request(format!(
                    "role: expected one of viewer, user, workspace_admin, org_admin, super_admin; found '{role_name}'"
                ))
            })?;
            if role > caller.identity.role {
                return Err(ServiceError::forbidden(format!(
                    "role: cannot grant {} above your own role",
                    role.as_str()
                )));
            }
            let org_id = match &body.organization {
                None => caller.identity.org_id,
                Some(org) => {
                    caller.require(
                        Role::SuperAdmin,
                        "create identities in another organization",
                    )?;
                    state
                        .store
                        .organization_by_name(org)
                        .await?
                        .ok_or_else(|| {
                            ServiceError::unprocessable(format!(
                                "organization: '{org}' does not exist"
                            ))
                        })?
                        .id
                }
            };
            state
                .store
                .create_identity(org_id, name, role)
                .await
                .map_err(|e| {
                    conflict(
                        e,
                        format!("identity '{name}' already exists in that organization"),
                    )
                })?
        }
    };
    let secret = token::generate(TokenKind::ApiKey);
    let key = state
        .store
        .create_api_key(NewApiKey {
            identity_id: identity.id,
            org_id: identity.org_id,
            name: body.name.clone(),
            prefix: token::display_prefix(&secret),
            token_hash: token::hash(&secret),
            expires_at: body.expires_at,
        })
        .await?;
    tracing::info!(key_id = %key.id, identity = %identity.name, by = %caller.identity.name, "api key created");
    let mut out = api_key_json(&key);
    out["key"] = Value::String(secret);
    out["identity"] = Value::String(identity.name.clone());
    out["organization"] = Value::String(identity.org_name.clone());
    out["role"] = Value::String(identity.role.as_str().to_owned());
    Ok((StatusCode::CREATED, Json(out)))
}

#[utoipa::path(
    get,
    path = "/api/v1/api-keys/",
    tag = "api-keys",
    summary = "The API keys of the caller's organization (org admins; all for super admins)",
    params(PageQuery),
    responses(
        (status = 200, description = "one page of API keys", body = openapi::Paginated<openapi::ApiKey>),
        (status = 400, description = "page or page_size is not valid", body = openapi::Problem),
        (status = 403, description = "only org admins list API keys", body = openapi::Problem),
    ),
)]
async fn list_api_keys(
    State(state): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Value>> {
    caller.require(Role::OrgAdmin, "list API keys")?;
    let page = page_of(&q)?;
    let (count, keys) = state.store.list_api_keys(caller.scope(), page).await?;
    Ok(Json(paginated(
        &uri,
        &headers,
        page,
        count,
        keys.iter().map(api_key_json).collect(),
    )))
}

#[utoipa::path(
    delete,
    path = "/api/v1/api-keys/{id}/",
    tag = "api-keys",
    summary = "Revoke an API key: anyone their own, org admins any of their organization",
    params(("id" = Uuid, Path, description = "the API key's id")),
    responses(
        (status = 204, description = "revoked"),
        (status = 403, description = "only org admins revoke other keys", body = openapi::Problem),
        (status = 404, description = "no such API key", body = openapi::Problem),
    ),
)]
async fn revoke_api_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id(&id, "API key")?;
    // Anyone may revoke their own key; admins any key of their organization.
    if id != caller.key_id {
        caller.require(Role::OrgAdmin, "revoke other API keys")?;
    }
    if state
        .store
        .revoke_api_key(caller.scope(), id, Utc::now())
        .await?
    {
        tracing::info!(key_id = %id, by = %caller.identity.name, "api key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ServiceError::not_found(format!("API key '{id}' not found")))
    }
}

// ---- workspaces ---------------------------------------------------------

fn loaded_model(ws: &Workspace) -> ApiResult<LoadedWorkspace> {
    serde_json::from_value(ws.model.clone()).map_err(|e| {
        tracing::error!(workspace = %ws.name, error = %e, "stored workspace model does not parse");
        ServiceError::new(
            Code::Internal,
            "stored workspace model is unreadable; push the workspace again",
        )
    })
}

fn workspace_json(ws: &Workspace, model: &LoadedWorkspace) -> Value {
    let blocks: Vec<Value> = model
        .blocks
        .values()
        .map(|b| {
            json!({
                "name": b.name,
                "version": b.version,
                "kind": b.kind,
                "from": b.from,
                "actions": b.actions.iter().map(|a| json!({
                    "name": a.name,
                    "description": a.description,
                    "kind": match a.kind { workspace::ActionKind::Playbook(_) => "playbook", workspace::ActionKind::Script(_) => "script" },
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "id": ws.id,
        "name": ws.name,
        "organization": ws.organization,
        "description": model.workspace.description,
        "digest": ws.bundle_digest,
        "blocks": blocks,
        "created_at": time(ws.created_at),
        "updated_at": time(ws.updated_at),
    })
}

fn bundle_error(e: BundleError) -> ServiceError {
    match e {
        BundleError::TooLarge { .. } => {
            ServiceError::new(Code::TooLarge, format!("workspace bundle refused: {e}"))
        }
        other => ServiceError::bad_request(format!("workspace bundle refused: {other}")),
    }
}

/// How much of a too-large bundle is read and thrown away before it is refused. A client
/// that is still sending when the server answers and closes sees a reset connection, not
/// the 413 that says what was wrong; reading on lets an oversized push of a sane size end
/// with that message.
const OVERSIZE_DRAIN_BYTES: u64 = 64 * 1024 * 1024;

/// Reads a workspace bundle of at most `limit` bytes.
async fn read_bundle(headers: &HeaderMap, body: Body, limit: u64) -> ApiResult<Bytes> {
    let too_large = || {
        ServiceError::new(
            Code::TooLarge,
            format!(
                "workspace bundle is larger than the coordinator's limit of {} MiB",
                limit / (1024 * 1024)
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit.saturating_add(OVERSIZE_DRAIN_BYTES)) {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let mut buffer = Vec::new();
    let mut seen: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ServiceError::bad_request(format!("could not read the request body: {e}"))
        })?;
        seen += chunk.len() as u64;
        if seen > limit.saturating_add(OVERSIZE_DRAIN_BYTES) {
            break;
        }
        if seen <= limit {
            buffer.extend_from_slice(&chunk);
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    Ok(Bytes::from(buffer))
}

#[utoipa::path(
    post,
    path = "/api/v1/workspaces/",
    tag = "workspaces",
    summary = "Push a workspace (workspace admins): create it, or replace its bundle",
    request_body(
        description = "the workspace directory as a gzip'd tar archive (`workspace.poly` at its root)",
        content((openapi::Binary = "application/gzip"), (openapi::Binary = "application/octet-stream")),
    ),
    responses(
        (status = 201, description = "stored", body = openapi::Workspace),
        (status = 400, description = "the body is empty, or not a safe gzip'd tar archive", body = openapi::Problem),
        (status = 403, description = "only workspace admins push workspaces", body = openapi::Problem),
        (status = 413, description = "the bundle is larger than the coordinator's limit", body = openapi::Problem),
        (status = 422, description = "the workspace does not load (the error names the file, line and key), or belongs to another organization", body = openapi::Problem),
    ),
)]
async fn push_workspace(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::WorkspaceAdmin, "push workspaces")?;
    let body = read_bundle(&headers, body, state.max_bundle_bytes).await?;
    if body.is_empty() {
        return Err(ServiceError::bad_request(
            "the request body is empty; send the workspace as a gzip'd tar archive",
        ));
    }
    let limits = Limits {
        max_compressed_bytes: state.max_bundle_bytes,
        ..Limits::default()
    };
    // Unpacking, hashing and compressing are CPU work: keep them off the executor.
    let (bundle, loaded, digest, canonical) =
        tokio::task::spawn_blocking(move || -> ApiResult<_> {
            let bundle = Bundle::from_tar_gz(&body, &limits).map_err(bundle_error)?;
            let loaded =
                workspace::load(&bundle).map_err(|e| ServiceError::unprocessable(e.to_string()))?;
            let digest = bundle.digest();
            let canonical = bundle.to_tar_gz();
            Ok((bundle, loaded, digest, canonical))
        })
        .await
        .map_err(|_| ServiceError::new(Code::Internal, "bundle processing panicked"))??;
    drop(bundle);

    let org_name = loaded.workspace.organization.clone();
    let org_id = match caller.scope() {
        Scope::Org(own) => {
            if org_name != caller.identity.org_name {
                return Err(ServiceError::unprocessable(format!(
                    "workspace.poly: organization '{org_name}' is not the organization of this API key ('{}')",
                    caller.identity.org_name
                )));
            }
            own
        }
        Scope::All => match state.store.organization_by_name(&org_name).await? {
            Some(org) => org.id,
            None => state.store.create_organization(&org_name).await?.id,
        },
    };
    let model = serde_json::to_value(&loaded)
        .map_err(|e| ServiceError::new(Code::Internal, e.to_string()))?;
    let ws = state
        .store
        .put_workspace(org_id, &loaded.workspace.name, &digest, &model, &canonical)
        .await?;
    tracing::info!(workspace = %ws.name, organization = %ws.organization, digest = %digest, by = %caller.identity.name, "workspace pushed");
    Ok((StatusCode::CREATED, Json(workspace_json(&ws, &loaded))))
}

#[utoipa::path(
    get,
    path = "/api/v1/workspaces/",
    tag = "workspaces",
    summary = "The workspaces the caller sees",
    params(PageQuery),
    responses(
        (status = 200, description = "one page of workspaces", body = openapi::Paginated<openapi::Workspace>),
        (status = 400, description = "page or page_size is not valid", body = openapi::Problem),
    ),
)]
async fn list_workspaces(
    State(state): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Value>> {
    let page = page_of(&q)?;
    let (count, list) = state.store.list_workspaces(caller.scope(), page).await?;
    let results = list
        .iter()
        .map(|ws| loaded_model(ws).map(|m| workspace_json(ws, &m)))
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(paginated(&uri, &headers, page, count, results)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OrgQuery {
    /// The workspace's organization, where several have one of that name.
    organization: Option<String>,
}

/// Finds the workspace a caller means by name. Another organization's
/// workspace is "not found", never "forbidden", so existence does not leak.
async fn find_workspace(
    state: &AppState,
    caller: &Caller,
    name: &str,
    org: Option<&str>,
) -> ApiResult<Workspace> {
    no_nul("name", name)?;
    let mut found = state.store.workspaces_named(caller.scope(), name).await?;
    if let Some(org) = org {
        found.retain(|w| w.organization == org);
    }
    match found.len() {
        0 => Err(ServiceError::not_found(format!(
            "workspace '{name}' not found"
        ))),
        1 => Ok(found.remove(0)),
        _ => {
            Err(ServiceError::new(
                Code::Conflict,
                format!(
                "workspace '{name}' exists in several organizations ({}); add ?organization=<name>",
                found.iter().map(|w| w.organization.as_str()).collect::<Vec<_>>().join(", ")
            ),
            ))
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/workspaces/{name}/",
    tag = "workspaces",
    summary = "A workspace with its blocks and their actions",
    params(("name" = String, Path, description = "the workspace's name"), OrgQuery),
    responses(
        (status = 200, description = "the workspace", body = openapi::Workspace),
        (status = 404, description = "no such workspace the caller may see", body = openapi::Problem),
        (status = 409, description = "workspaces of that name exist in several organizations: add ?organization=", body = openapi::Problem),
    ),
)]
async fn get_workspace(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<OrgQuery>,
) -> ApiResult<Json<Value>> {
    let ws = find_workspace(&state, &caller, &name, q.organization.as_deref()).await?;
    let model = loaded_model(&ws)?;
    Ok(Json(workspace_json(&ws, &model)))
}

// ---- runs ---------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema, serde::Serialize)]
pub struct TriggerBody {
    /// The block, as the workspace names it.
    block: String,
    /// The block's action.
    action: String,
    /// Why the run was triggered.
    #[schema(max_length = 4096)]
    reason: Option<String>,
    #[serde(default)]
    parameters: TriggerParameters,
}

#[derive(Debug, Default, Deserialize, ToSchema, serde::Serialize)]
pub struct TriggerParameters {
    /// Variables for the action, as top-level Ansible variables.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    extra_vars: Option<Value>,
    /// Only runners carrying all these labels may take the run.
    #[serde(default)]
    runner_labels: BTreeMap<String, String>,
    /// The CI system that triggered the run, when the caller says so.
    #[serde(default)]
    ci: Option<String>,
    /// Seconds the run may take once started; overrides the action's `timeout:`.
    #[serde(default)]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 604800)]
    timeout: Option<Value>,
    /// Further attempts when the runner is lost; overrides the action's `retries:`.
    #[serde(default)]
    #[schema(schema_with = openapi::retries_schema)]
    retries: Option<Value>,
}

/// A whole number in `range` from a trigger's parameter, or a clear error.
fn whole_number(
    value: &Option<Value>,
    name: &str,
    range: std::ops::RangeInclusive<u64>,
) -> ApiResult<Option<u64>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().filter(|n| range.contains(n)) {
            Some(n) => Ok(Some(n)),
            None => Err(ServiceError::bad_request(format!(
                "parameters.{name}: expected a whole number from {} to {}, found {v}",
                range.start(),
                range.end()
            ))),
        },
    }
}

/// The CI system, from what the caller says or its User-Agent.
fn ci_system(headers: &HeaderMap, declared: Option<&str>) -> Option<String> {
    if let Some(ci) = declared.or_else(|| headers.get("x-muster-ci").and_then(|v| v.to_str().ok()))
    {
        return Some(ci.chars().take(64).collect());
    }
    let agent = headers
        .get(header::USER_AGENT)?
        .to_str()
        .ok()?
        .to_ascii_lowercase();
    [
        ("gitlab", "gitlab-ci"),
        ("github", "github-actions"),
        ("jenkins", "jenkins"),
        ("buildkite", "buildkite"),
    ]
    .into_iter()
    .find(|(needle, _)| agent.contains(needle))
    .map(|(_, name)| name.to_owned())
}

pub fn run_json(base: &str, run: &Run) -> Value {
    json!({
        "id": run.id,
        "url": format!("{base}/api/v1/action-runs/{}/", run.id),
        "logs_url": format!("{base}/api/v1/action-runs/{}/logs/", run.id),
        "workspace": run.workspace,
        "organization": run.organization,
        "block": run.block,
        "block_version": run.block_version,
        "action": run.action,
        "status": run.status.as_str(),
        "exit_code": run.exit_code,
        "error": run.error,
        "reason": run.reason,
        "parameters": run.parameters,
        "trigger": run.trigger,
        "runner": run.runner_name,
        "runner_id": run.runner_id,
        "executor": run.executor,
        "image": run.image,
        "image_digest": run.image_digest,
        "bundle_digest": run.bundle_digest,
        "attempt": run.attempt,
        "fencing_token": run.fencing_token,
        "max_attempts": run.max_attempts,
        "timeout": run.timeout_secs,
        "created_at": time(run.created_at),
        "leased_at": opt_time(run.leased_at),
        "started_at": opt_time(run.started_at),
        "finished_at": opt_time(run.finished_at),
        "cancel_requested_at": opt_time(run.cancel_requested_at),
        "log": run.log_check.as_ref().map(|c| json!({
            "bytes": c.bytes,
            "sha256": c.sha256,
            "verified": c.verified,
        })),
    })
}

/// Trigger an action of a block: queue a run
///
/// Checks that the workspace exists and defines the block and action, and
/// resolves what the run needs.
#[utoipa::path(
    post,
    path = "/api/v1/workspaces/{name}/actions",
    tag = "runs",
    params(("name" = String, Path, description = "the workspace's name"), OrgQuery),
    request_body = TriggerBody,
    responses(
        (status = 202, description = "queued", body = openapi::RunAccepted),
        (status = 400, description = "the body is not valid; the answer names the field", body = openapi::Problem),
        (status = 403, description = "viewers do not trigger runs", body = openapi::Problem),
        (status = 404, description = "no such workspace the caller may see", body = openapi::Problem),
        (status = 409, description = "workspaces of that name exist in several organizations: add ?organization=", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
        (status = 422, description = "the workspace has no such block or action", body = openapi::Problem),
    ),
)]
async fn trigger(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<OrgQuery>,
    headers: HeaderMap,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let body: TriggerBody = json_body(body)?;
    let ws = find_workspace(&state, &caller, &name, q.organization.as_deref()).await?;
    caller.require(Role::User, "trigger runs")?;
    let extra_vars = match body.parameters.extra_vars {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(ServiceError::bad_request(format!(
                "parameters.extra_vars: expected an object of variables, found {}",
                match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    _ => "a boolean",
                }
            )))
        }
    };
    if body.reason.as_ref().is_some_and(|r| r.len() > 4096) {
        return Err(ServiceError::bad_request(
            "reason: longer than 4096 characters",
        ));
    }
    let timeout = whole_number(&body.parameters.timeout, "timeout", 1..=7 * 24 * 3600)?;
    let retries = whole_number(
        &body.parameters.retries,
        "retries",
        0..=u64::from(muster_common::workspace::MAX_RETRIES),
    )?;
    let model = loaded_model(&ws)?;
    let mut job =
        plan::plan(&model, &body.block, &body.action, &extra_vars).map_err(|e| match e {
            PlanError::UnknownBlock { .. } | PlanError::UnknownAction { .. } => {
                ServiceError::unprocessable(e.to_string())
            }
        })?;
    if timeout.is_some() {
        job.timeout_secs = timeout;
    }
    if let Some(retries) = retries {
        job.retries = Some(retries as u32);
    }
    let block_version = job.block_version.clone();
    let trigger = json!({
        "api_key": caller.key_name,
        "api_key_id": caller.key_id,
        "user": caller.identity.name,
        "ci": ci_system(&headers, body.parameters.ci.as_deref()),
        "user_agent": headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(|s| s.chars().take(256).collect::<String>()),
    });
    let parameters = json!({
        "extra_vars": Value::Object(extra_vars),
        "runner_labels": body.parameters.runner_labels,
        "timeout": timeout,
        "retries": retries,
    });
    let run = state
        .store
        .create_run(NewRun {
            org_id: ws.org_id,
            workspace_id: ws.id,
            workspace: ws.name.clone(),
            bundle_digest: ws.bundle_digest.clone(),
            block: body.block,
            block_version,
            action: body.action,
            parameters,
            reason: body.reason,
            trigger,
            plan: serde_json::to_value(&job)
                .map_err(|e| ServiceError::new(Code::Internal, e.to_string()))?,
            runner_labels: body.parameters.runner_labels,
            max_attempts: 1 + job.retries.unwrap_or(0) as i32,
            timeout_secs: job.timeout_secs.map(|t| t as i64),
        })
        .await?;
    state.metrics.run_queued();
    // Were this lost, the dispatchers' fallback tick finds the run a moment later.
    announce(&*state.bus, Event::RunQueued { run_id: run.id }).await;
    tracing::info!(run_id = %run.id, workspace = %run.workspace, block = %run.block, action = %run.action, by = %caller.identity.name, "run queued");
    let base = base_url(&headers);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": run.id,
            "status": run.status.as_str(),
            "url": format!("{base}/api/v1/action-runs/{}/", run.id),
            "logs_url": format!("{base}/api/v1/action-runs/{}/logs/", run.id),
        })),
    ))
}

/// Trigger an action of a block: as `…/actions`
#[utoipa::path(
    post,
    path = "/api/v1/workspaces/{name}/actions/",
    tag = "runs",
    params(("name" = String, Path, description = "the workspace's name"), OrgQuery),
    request_body = TriggerBody,
    responses(
        (status = 202, description = "queued", body = openapi::RunAccepted),
        (status = 400, description = "the body is not valid; the answer names the field", body = openapi::Problem),
        (status = 403, description = "viewers do not trigger runs", body = openapi::Problem),
        (status = 404, description = "no such workspace the caller may see", body = openapi::Problem),
        (status = 409, description = "workspaces of that name exist in several organizations: add ?organization=", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
        (status = 422, description = "the workspace has no such block or action", body = openapi::Problem),
    ),
)]
async fn trigger_with_slash(
    state: State<AppState>,
    caller: Caller,
    name: Path<String>,
    q: Query<OrgQuery>,
    headers: HeaderMap,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    trigger(state, caller, name, q, headers, body).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunQuery {
    /// Only runs of this workspace.
    workspace: Option<String>,
    /// Only runs of this block.
    block: Option<String>,
    /// Only runs of this action.
    action: Option<String>,
    /// Only runs in this status.
    #[param(value_type = Option<openapi::RunStatusName>, inline)]
    status: Option<String>,
    /// Only runs triggered by this API key, user or CI system.
    trigger: Option<String>,
    // Documented as `PageQuery` next to this.
    #[serde(flatten)]
    #[param(ignore)]
    page: PageQuery,
}

#[utoipa::path(
    get,
    path = "/api/v1/action-runs/",
    tag = "runs",
    summary = "The runs the caller sees, newest first",
    params(RunQuery, PageQuery),
    responses(
        (status = 200, description = "one page of runs", body = openapi::Paginated<openapi::Run>),
        (status = 400, description = "a filter, page or page_size is not valid", body = openapi::Problem),
    ),
)]
async fn list_runs(
    State(state): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(q): Query<RunQuery>,
) -> ApiResult<Json<Value>> {
    let page = page_of(&q.page)?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            RunStatus::parse(s).ok_or_else(|| {
                ServiceError::bad_request(format!(
                    "status: expected one of {}; found '{s}'",
                    RunStatus::ALL.map(RunStatus::as_str).join(", ")
                ))
            })
        })
        .transpose()?;
    for (field, value) in [
        ("workspace", &q.workspace),
        ("block", &q.block),
        ("action", &q.action),
        ("trigger", &q.trigger),
    ] {
        value.as_deref().map(|v| no_nul(field, v)).transpose()?;
    }
    let filter = RunFilter {
        workspace: q.workspace,
        block: q.block,
        action: q.action,
        status,
        trigger: q.trigger,
    };
    let (count, runs) = state.store.list_runs(caller.scope(), &filter, page).await?;
    let base = base_url(&headers);
    Ok(Json(paginated(
        &uri,
        &headers,
        page,
        count,
        runs.iter().map(|r| run_json(&base, r)).collect(),
    )))
}

#[utoipa::path(
    get,
    path = "/api/v1/action-runs/{id}/",
    tag = "runs",
    summary = "A run",
    params(("id" = Uuid, Path, description = "the run's id")),
    responses(
        (status = 200, description = "the run", body = openapi::Run),
        (status = 404, description = "no such run the caller may see", body = openapi::Problem),
    ),
)]
async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "run")?;
    let run = state
        .store
        .run(caller.scope(), id)
        .await?
        .ok_or_else(|| run_not_found(id))?;
    Ok(Json(run_json(&base_url(&headers), &run)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Only what came after chunk N.
    #[param(value_type = Option<i64>, minimum = 0)]
    after_seq: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/action-runs/{id}/artifacts/",
    tag = "runs",
    params(("id" = Uuid, Path, description = "the run's id")),
    responses(
        (status = 200, description = "the run's artifacts, on one page", body = openapi::Paginated<openapi::Artifact>),
        (status = 404, description = "no such run the caller may see", body = openapi::Problem),
    ),
)]
/// The files the run's job left in its block's artifacts directory.
async fn list_artifacts(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let id = parse_id(&id, "run")?;
    let list = state
        .store
        .artifacts(caller.scope(), id)
        .await?
        .ok_or_else(|| run_not_found(id))?;
    let base = base_url(&headers);
    let results: Vec<Value> = list
        .iter()
        .map(|a| {
            json!({
                "path": a.path,
                "size": a.size,
                "sha256": a.sha256,
                "url": format!("{base}/api/v1/action-runs/{id}/artifacts/{}", a.path),
            })
        })
        .collect();
    Ok(Json(listing(results)))
}

#[utoipa::path(
    get,
    path = "/api/v1/action-runs/{id}/artifacts/{*path}",
    tag = "runs",
    summary = "One artifact of a run, as stored",
    params(("id" = Uuid, Path, description = "the run's id"), ("path" = String, Path, description = "the artifact's path in the block's artifacts directory; it may hold `/`")),
    responses(
        (status = 200, description = "the file", body = openapi::Binary, content_type = "application/octet-stream"),
        (status = 404, description = "no such run, or it has no such artifact", body = openapi::Problem),
    ),
)]
async fn get_artifact(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    let id = parse_id(&id, "run")?;
    no_nul("path", &path)?;
    let data = state
        .store
        .artifact(caller.scope(), id, &path)
        .await?
        .ok_or_else(|| ServiceError::not_found(format!("run '{id}' has no artifact '{path}'")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

/// Cancels a run: a queued one at once (200, `canceled`); a leased or
/// running one is stopped by its runner (202; it ends `canceled` with its
/// log up to that point); one that has ended answers 409.
#[utoipa::path(
    post,
    path = "/api/v1/action-runs/{id}/cancel/",
    tag = "runs",
    params(("id" = Uuid, Path, description = "the run's id")),
    responses(
        (status = 200, description = "the run was queued and is now canceled", body = openapi::Run),
        (status = 202, description = "its runner is told to stop it; it ends canceled", body = openapi::Run),
        (status = 403, description = "viewers do not cancel runs", body = openapi::Problem),
        (status = 404, description = "no such run the caller may see", body = openapi::Problem),
        (status = 409, description = "the run has already ended", body = openapi::Problem),
    ),
)]
async fn cancel_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::User, "cancel runs")?;
    let id = parse_id(&id, "run")?;
    let outcome = state
        .store
        .cancel_run(caller.scope(), id, chrono::Utc::now())
        .await?
        .ok_or_else(|| run_not_found(id))?;
    let base = base_url(&headers);
    match outcome {
        CancelOutcome::Canceled(run) => {
            tracing::info!(run_id = %run.id, by = %caller.identity.name, "queued run canceled");
            state.metrics.run_finished(&run);
            let finished = Event::Finished {
                run_id: run.id,
                status: run.status,
                exit_code: None,
            };
            announce(&*state.bus, finished).await;
            Ok((StatusCode::OK, Json(run_json(&base, &run))))
        }
        CancelOutcome::Requested(run) => {
            tracing::info!(run_id = %run.id, by = %caller.identity.name, "cancel requested");
            if let Some(runner_id) = run.runner_id {
                let cancel = Event::CancelRun {
                    run_id: run.id,
                    runner_id,
                    fencing_token: run.fencing_token,
                };
                // Were this lost, the stored request reaches the runner when
                // its run starts or it reconnects.
                announce(&*state.bus, cancel).await;
            }
            Ok((StatusCode::ACCEPTED, Json(run_json(&base, &run))))
        }
        CancelOutcome::AlreadyFinal(run) => Err(ServiceError::new(
            Code::Conflict,
            format!("run '{id}' has already ended ({})", run.status.as_str()),
        )),
    }
}

/// The run's log as plain text, in order. `?after_seq=N` returns only what
/// came after chunk N; the `Muster-Last-Seq` header says where to continue and
/// `Muster-Run-Status` whether more can come.
#[utoipa::path(
    get,
    path = "/api/v1/action-runs/{id}/logs/",
    tag = "runs",
    params(
        ("id" = Uuid, Path, description = "the run's id"),
        LogQuery,
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0, description = "resume after this chunk (as `after_seq`); sent by event-stream clients"),
    ),
    responses(
        (status = 200, description = "the log: plain text, or with `Accept: text/event-stream` a live tail (events `log` with the chunk's seq as id, then one `end`)",
            content((String = "text/plain"), (String = "text/event-stream")),
            headers(
                ("Muster-Last-Seq" = i64, description = "plain text: the last chunk's seq, where to continue"),
                ("Muster-Run-Status" = openapi::RunStatusName, description = "plain text: the run's status; more can come unless it is final"),
            ),
        ),
        (status = 400, description = "after_seq or Last-Event-ID is not a whole number", body = openapi::Problem),
        (status = 404, description = "no such run the caller may see", body = openapi::Problem),
    ),
)]
async fn run_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = parse_id(&id, "run")?;
    let seq = |what: &str, s: &str| {
        s.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ServiceError::bad_request(format!("{what}: expected a whole number, found '{s}'"))
        })
    };
    let resume = headers
        .get("last-event-id")
        .map(|v| seq("Last-Event-ID", v.to_str().unwrap_or("?")))
        .transpose()?;
    let after_seq = q
        .after_seq
        .as_deref()
        .map(|s| seq("after_seq", s))
        .transpose()?;
    let after = resume.or(after_seq).unwrap_or(0);
    let live = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if live {
        if state.store.run(caller.scope(), id).await?.is_none() {
            return Err(run_not_found(id));
        }
        let events = crate::tail::tail(
            state.store.clone(),
            state.bus.clone(),
            state.tail_poll,
            id,
            after,
        );
        return Ok(axum::response::sse::Sse::new(events)
            .keep_alive(axum::response::sse::KeepAlive::default())
            .into_response());
    }
    // Read the status first: a run seen final here has its whole log stored.
    let run = state
        .store
        .run(caller.scope(), id)
        .await?
        .ok_or_else(|| run_not_found(id))?;
    let mut text = Vec::new();
    let mut last = after;
    loop {
        let chunks = state.store.logs(id, last, 1000).await?;
        let Some(tail) = chunks.last() else { break };
        last = tail.seq;
        for chunk in &chunks {
            text.extend_from_slice(&chunk.data);
        }
        if chunks.len() < 1000 {
            break;
        }
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::HeaderName::from_static("muster-last-seq"),
                last.to_string(),
            ),
            (
                header::HeaderName::from_static("muster-run-status"),
                run.status.as_str().to_owned(),
            ),
        ],
        text,
    )
        .into_response())
}

// ---- runners ------------------------------------------------------------

fn runner_json(r: &Runner) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "labels": r.labels,
        "capacity": r.capacity,
        "active_runs": r.active_runs,
        "status": if r.revoked_at.is_some() { "revoked" } else if r.connected { "online" } else { "offline" },
        "connected": r.connected,
        "revoked_at": opt_time(r.revoked_at),
        "version": r.version,
        "instance_wide": r.org_id.is_none(),
        "certificate_expires_at": time(r.cert_not_after),
        "created_at": time(r.created_at),
        "last_seen_at": opt_time(r.last_seen_at),
    })
}

#[utoipa::path(
    get,
    path = "/api/v1/runners/",
    tag = "runners",
    summary = "The runners the caller sees: its organization's and the instance-wide ones",
    params(PageQuery),
    responses(
        (status = 200, description = "one page of runners", body = openapi::Paginated<openapi::Runner>),
        (status = 400, description = "page or page_size is not valid", body = openapi::Problem),
    ),
)]
async fn list_runners(
    State(state): State<AppState>,
    caller: Caller,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<Value>> {
    let page = page_of(&q)?;
    let (count, runners) = state.store.list_runners(caller.scope(), page).await?;
    Ok(Json(paginated(
        &uri,
        &headers,
        page,
        count,
        runners.iter().map(runner_json).collect(),
    )))
}

/// Revokes a runner (204): its certificates are refused at the handshake
/// from now on, its stream is closed, and its leased or running runs end
/// `lost`. Org admins revoke their organization's runners; instance-wide
/// runners only super admins (403). Revoking again changes nothing (204).
#[utoipa::path(
    delete,
    path = "/api/v1/runners/{id}/",
    tag = "runners",
    params(("id" = Uuid, Path, description = "the runner's id")),
    responses(
        (status = 204, description = "revoked (or it was already)"),
        (status = 403, description = "only org admins revoke runners, and only super admins instance-wide ones", body = openapi::Problem),
        (status = 404, description = "no such runner the caller may see", body = openapi::Problem),
    ),
)]
async fn revoke_runner(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(Role::OrgAdmin, "revoke runners")?;
    let id = parse_id(&id, "runner")?;
    if let Some(runner) = state.revoker.revoke(caller.scope(), id, Utc::now()).await? {
        tracing::warn!(runner_id = %id, runner = %runner.name, by = %caller.identity.name, "runner revoked");
        return Ok(StatusCode::NO_CONTENT);
    }
    // Not in the caller's organization: an instance-wide runner, which it
    // sees but may not revoke, or none it may know of.
    let instance_wide = state
        .store
        .runner(id)
        .await?
        .is_some_and(|r| r.org_id.is_none());
    if instance_wide {
        Err(ServiceError::forbidden(
            "only super admins revoke instance-wide runners",
        ))
    } else {
        Err(ServiceError::not_found(format!("runner '{id}' not found")))
    }
}

#[derive(Debug, Default, Deserialize, ToSchema, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenBody {
    /// Default true: the token enrolls one runner.
    single_use: Option<bool>,
    /// Seconds until the token expires; default one hour, at most 30 days.
    #[schema(minimum = 60, maximum = 2592000)]
    expires_in: Option<u64>,
    /// Super admins: the organization whose runs the runner takes; absent, the
    /// runner serves every organization.
    organization: Option<String>,
}

#[utoipa::path(
    post,
    path = "/api/v1/runners/join-tokens/",
    tag = "runners",
    summary = "Create a join token a runner enrolls with (org admins)",
    request_body(content = Option<JoinTokenBody>, description = "optional: without a body the token enrolls one runner of the caller's organization (every organization's for super admins) within an hour"),
    responses(
        (status = 201, description = "created", body = openapi::JoinToken),
        (status = 400, description = "a field is not valid", body = openapi::Problem),
        (status = 403, description = "the caller's role may not create it", body = openapi::Problem),
        (status = 413, description = "the body is larger than 1 MiB", body = openapi::Problem),
        (status = 422, description = "the organization does not exist", body = openapi::Problem),
    ),
)]
async fn create_join_token(
    State(state): State<AppState>,
    caller: Caller,
    body: JsonBody,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.require(Role::OrgAdmin, "create runner join tokens")?;
    // No JSON body, or `null`, asks for the defaults.
    let body = match body {
        Err(JsonRejection::MissingJsonContentType(_)) => None,
        body => json_body::<Option<JoinTokenBody>>(body)?,
    }
    .unwrap_or_default();
    let expires_in = body.expires_in.unwrap_or(3600);
    if !(60..=30 * 24 * 3600).contains(&expires_in) {
        return Err(ServiceError::bad_request(format!(
            "expires_in: expected 60 to 2592000 seconds, found {expires_in}"
        )));
    }
    let org_id = match (caller.scope(), &body.organization) {
        (Scope::Org(own), None) => Some(own),
        (Scope::Org(_), Some(_)) => {
            return Err(ServiceError::forbidden(
                "organization: only super admins choose a runner's organization",
            ))
        }
        (Scope::All, None) => None,
        (Scope::All, Some(org)) => Some(
            state
                .store
                .organization_by_name(org)
                .await?
                .ok_or_else(|| {
                    ServiceError::unprocessable(format!("organization: '{org}' does not exist"))
                })?
                .id,
        ),
    };
    let secret = token::generate(TokenKind::JoinToken);
    let expires_at = Utc::now() + chrono::Duration::seconds(expires_in as i64);
    let single_use = body.single_use.unwrap_or(true);
    state
        .store
        .create_join_token(NewJoinToken {
            token_hash: token::hash(&secret),
            org_id,
            created_by: caller.identity.id,
            single_use,
            expires_at,
        })
        .await?;
    tracing::info!(by = %caller.identity.name, single_use, "runner join token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": secret,
            "ca_cert_hash": state.ca.hash(),
            "expires_at": time(expires_at),
            "single_use": single_use,
            "organization": body.organization,
        })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    struct Outer {
        inner: Option<Inner>,
        #[serde(default)]
        pairs: Vec<(String, String)>,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    struct Inner {
        a: Option<u32>,
        b: Option<String>,
    }

    fn read(body: Value) -> ApiResult<Outer> {
        parse_json_body(Ok(Json(body)), Code::Unprocessable).map(|(v, _)| v)
    }

    #[test]
    fn bodies_name_the_field_that_has_the_wrong_type() {
        let error = read(json!({"inner": {"a": "x"}})).expect_err("refused");
        assert_eq!(error.code, Code::Unprocessable);
        assert!(
            error
                .message
                .starts_with("invalid JSON body: inner.a: invalid type"),
            "{}",
            error.message
        );
    }

    #[test]
    fn an_object_written_as_an_array_is_refused_where_it_is() {
        // serde alone reads both as the struct.
        assert!(serde_json::from_value::<Outer>(json!({"inner": [1, "x"]})).is_ok());
        assert!(serde_json::from_value::<Outer>(json!([null, []])).is_ok());
        for (body, at) in [
            (json!({"inner": [1, "x"]}), "inner"),
            (json!([null, []]), "body"),
        ] {
            let error = read(body).expect_err("refused");
            assert_eq!(error.code, Code::Unprocessable);
            assert_eq!(
                error.message,
                format!("invalid JSON body: {at}: expected an object, found an array")
            );
        }
        // Arrays where the type has them pass.
        let read = read(json!({"inner": {"a": 1}, "pairs": [["k", "v"]]})).expect("read");
        assert_eq!(read.pairs, [("k".to_owned(), "v".to_owned())]);
    }
}
