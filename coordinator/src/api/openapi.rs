//! The OpenAPI 3.1 document of the HTTP API, served at `/api/v1/schema/`.
//!
//! It is generated, not written: every endpoint is registered in
//! `api::endpoints` together with the `#[utoipa::path]` description on its
//! handler, so the router and the document come from one list. This module
//! adds what is common to them all (the two bearer schemes, the 401, 403
//! and 503 every authenticated endpoint can answer) and the schemas of the
//! JSON the handlers build with `json!`, which `response_schema_conformance`
//! in the schemathesis test (tests/tests/e2e/openapi.rs) holds to what they
//! send. The monitoring routes keep theirs in `monitoring/api/openapi.rs`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::Value;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Ref, RefOr,
    ResponseBuilder,
};
use utoipa::{PartialSchema, ToSchema};
use uuid::Uuid;

use crate::store::{Role, RunStatus};

/// The security scheme every endpoint requires but the public ones and
/// the agent routes.
const BEARER: &str = "api_key";

/// The security scheme of the agent routes (`security(("agent_token" = []))`
/// on their handlers): a monitoring agent's token, which opens nothing else.
const AGENT_TOKEN: &str = "agent_token";

/// Who may call an operation, from the security its handler declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// `security(())`: anyone.
    Public,
    /// The document's default: an API key.
    ApiKey,
    /// A monitoring agent's token.
    AgentToken,
}

fn guard(operation: &Operation) -> Guard {
    match &operation.security {
        None => Guard::ApiKey,
        Some(requirements)
            if requirements
                .contains(&SecurityRequirement::new(AGENT_TOKEN, Vec::<String>::new())) =>
        {
            Guard::AgentToken
        }
        Some(requirements)
            if requirements
                .iter()
                .all(|r| *r == SecurityRequirement::default()) =>
        {
            Guard::Public
        }
        Some(_) => Guard::ApiKey,
    }
}

/// The document with what `api::endpoints` does not add: info, the bearer
/// schemes, API keys as the default requirement.
pub(super) fn base() -> OpenApi {
    let info = InfoBuilder::new()
        .title("Muster API")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "Muster's coordinator API: workspaces, action runs, runners, API keys, \
             endpoint monitoring. Every request but /healthz, /readyz, this \
             document and the agent routes carries `Authorization: Bearer <API key>` \
             (keys start with `poly_`); the agent routes (/api/v1/agent/…) take a \
             monitoring agent's token instead (`agt_…`), which opens nothing else. \
             Errors answer `{\"detail\": \"...\"}` naming what was wrong.",
        ))
        .build();
    let mut doc = OpenApiBuilder::new()
        .info(info)
        .security(Some([SecurityRequirement::new(
            BEARER,
            Vec::<String>::new(),
        )]))
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("poly_…")
                .description(Some("an API key, `poly_…`"))
                .build(),
        ),
    );
    components.add_security_scheme(
        AGENT_TOKEN,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("agt_…")
                .description(Some(
                    "a monitoring agent's token, `agt_…`, given when the agent was created",
                ))
                .build(),
        ),
    );
    doc
}

/// Completes the document `api::endpoints` collected.
pub(super) fn finish(mut doc: OpenApi) -> OpenApi {
    let components = doc.components.get_or_insert_with(Default::default);
    // The answers many operations share; the first two challenge the caller
    // to authenticate.
    for (name, description, challenge) in [
        (
            "Unauthorized",
            "no, an unknown, an expired or a revoked API key",
            true,
        ),
        (
            "AgentUnauthorized",
            "no, an unknown or a revoked agent token",
            true,
        ),
        (
            "NotForAgents",
            "an agent token: agents may use the agent routes only",
            false,
        ),
        (
            "Unavailable",
            "the database is unavailable; try again",
            false,
        ),
    ] {
        let mut response = ResponseBuilder::new()
            .description(description)
            .content("application/json", problem_content());
        if challenge {
            response = response.header(
                "WWW-Authenticate",
                HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::String))
                    .description(Some("`Bearer`"))
                    .build(),
            );
        }
        components
            .responses
            .insert(name.into(), RefOr::T(response.build()));
    }
    components
        .schemas
        .insert(Problem::name().into_owned(), Problem::schema());

    let paths = std::mem::take(&mut doc.paths.paths);
    for (path, mut item) in paths {
        for operation in operations(&mut item) {
            // Authenticated operations can fail to authenticate or to reach
            // the database; an agent token on any but the agent routes is
            // refused (the agent routes document their refusal of API keys).
            let common: &[(&str, &str)] = match guard(operation) {
                Guard::Public => &[],
                Guard::ApiKey => &[
                    ("401", "Unauthorized"),
                    ("403", "NotForAgents"),
                    ("503", "Unavailable"),
                ],
                Guard::AgentToken => &[("401", "AgentUnauthorized"), ("503", "Unavailable")],
            };
            for (status, name) in common {
                operation
                    .responses
                    .responses
                    .entry((*status).into())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name(*name)));
            }
        }
        doc.paths.paths.insert(openapi_path(&path), item);
    }
    doc
}

/// Axum's catch-all `{*name}` is OpenAPI's `{name}`: the value may hold
/// `/`, percent-encoded as `%2F` or not.
fn openapi_path(axum_path: &str) -> String {
    axum_path.replace("{*", "{")
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

fn problem_content() -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name(Problem::name())))
        .build()
}

/// The document as served, built once.
pub(super) fn document() -> &'static str {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        super::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serializes")
    })
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/v1/schema/",
    tag = "meta",
    security(()),
    responses((status = 200, description = "the OpenAPI 3.1 document of this API", body = Object, content_type = "application/json")),
)]
pub(super) async fn schema() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document()).into_response()
}

// ---- schemas ----------------------------------------------------------------

/// A Polycrate name: a letter first, then letters, digits and `_`, with
/// single `-`, `/` or `_` between them.
pub(super) fn name_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(muster_common::workspace::NAME_PATTERN))
        .build()
}

/// A trigger's `retries`.
pub(super) fn retries_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
        .minimum(Some(0))
        .maximum(Some(muster_common::workspace::MAX_RETRIES))
        .build()
}

pub(crate) use shapes::*;

/// Types that describe JSON for the document; none is ever built.
#[allow(dead_code)]
mod shapes {
    use super::*;

    /// A run's status.
    pub(in crate::api) struct RunStatusName;

    impl PartialSchema for RunStatusName {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(RunStatus::ALL.map(RunStatus::as_str)))
                .into()
        }
    }

    impl ToSchema for RunStatusName {
        fn name() -> Cow<'static, str> {
            "RunStatus".into()
        }
    }

    /// An identity's role, lowest first.
    pub(in crate::api) struct RoleName;

    impl PartialSchema for RoleName {
        fn schema() -> RefOr<Schema> {
            let roles = [
                Role::Viewer,
                Role::User,
                Role::WorkspaceAdmin,
                Role::OrgAdmin,
                Role::SuperAdmin,
            ];
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(roles.map(Role::as_str)))
                .into()
        }
    }

    impl ToSchema for RoleName {
        fn name() -> Cow<'static, str> {
            "Role".into()
        }
    }

    /// Bytes: a workspace bundle, an artifact.
    pub(in crate::api) struct Binary;

    impl PartialSchema for Binary {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::Binary,
                )))
                .into()
        }
    }

    impl ToSchema for Binary {}

    // ---- answers ----

    /// The body of every error answer.
    #[derive(ToSchema)]
    pub(crate) struct Problem {
        /// What was wrong, naming the field or value.
        detail: String,
    }

    /// One page of a list.
    #[derive(ToSchema)]
    pub(crate) struct Paginated<T: ToSchema> {
        /// How many there are in all.
        count: i64,
        /// The next page's URL, null on the last.
        next: Option<String>,
        /// The previous page's URL, null on the first.
        previous: Option<String>,
        results: Vec<T>,
    }

    #[derive(ToSchema)]
    pub(in crate::api) struct Organization {
        id: Uuid,
        name: String,
        created_at: DateTime<Utc>,
    }

    #[derive(ToSchema)]
    pub(in crate::api) struct ApiKey {
        id: Uuid,
        name: String,
        /// The first characters of the key, to recognise it.
        prefix: String,
        identity_id: Uuid,
        created_at: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
        last_used_at: Option<DateTime<Utc>>,
        revoked: bool,
        revoked_at: Option<DateTime<Utc>>,
    }

    /// A new API key: the only answer that holds the key itself.
    #[derive(ToSchema)]
    pub(in crate::api) struct CreatedApiKey {
        #[serde(flatten)]
        api_key: ApiKey,
        /// The key, `poly_…`: shown this once, stored only as a hash.
        key: String,
        identity: String,
        organization: String,
        role: RoleName,
    }

    #[derive(ToSchema)]
    pub(in crate::api) struct Workspace {
        id: Uuid,
        name: String,
        organization: String,
        description: Option<String>,
        /// `sha256:…` of the canonical bundle.
        digest: String,
        blocks: Vec<WorkspaceBlock>,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
    }

    #[derive(ToSchema)]
    pub(in crate::api) struct WorkspaceBlock {
        name: String,
        version: Option<String>,
        kind: Option<String>,
        /// The block this one was made from.
        from: Option<String>,
        actions: Vec<WorkspaceAction>,
    }

    #[derive(ToSchema)]
    pub(in crate::api) struct WorkspaceAction {
        name: String,
        description: Option<String>,
        kind: ActionKind,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "snake_case")]
    pub(in crate::api) enum ActionKind {
        Playbook,
        Script,
    }

    /// A run that was queued.
    #[derive(ToSchema)]
    pub(in crate::api) struct RunAccepted {
        id: Uuid,
        status: RunStatusName,
        url: String,
        logs_url: String,
    }

    #[derive(ToSchema)]
    pub(in crate::api) struct Run {
        id: Uuid,
        url: String,
        logs_url: String,
        workspace: String,
        organization: String,
        block: String,
        block_version: Option<String>,
        action: String,
        status: RunStatusName,
        exit_code: Option<i32>,
        error: Option<String>,
        reason: Option<String>,
        /// `extra_vars`, `runner_labels`, `timeout`, `retries` as triggered.
        parameters: BTreeMap<String, Value>,
        /// Who triggered the run: API key, user, CI system, user agent.
        trigger: BTreeMap<String, Value>,
        /// The runner's name.
        runner: Option<String>,
        runner_id: Option<Uuid>,
        /// `docker` or `process`.
        executor: Option<String>,
        image: Option<String>,
        image_digest: Option<String>,
        bundle_digest: String,
        attempt: i32,
        /// The current lease's fencing token.
        fencing_token: i64,
        max_attempts: i32,
        /// Seconds the run may take once started.
        timeout: Option<i64>,
        created_at: DateTime<Utc>,
        leased_at: Option<DateTime<Utc>>,
        started_at: Option<DateTime<Utc>>,
        finished_at: Option<DateTime<Utc>>,
        cancel_requested_at: Option<DateTime<Utc>>,
        /// The runner's account of the log once the run ended.
        log: Option<LogCheck>,
    }

    #[derive(ToSchema)]
    pub(in crate::api) struct LogCheck {
        bytes: i64,
        sha256: String,
        /// Whether the stored log matches the runner's byte count and digest.
        verified: bool,
    }

    #[derive(ToSchema)]
    pub(in crate::api) struct Artifact {
        /// Relative to the block's artifacts directory.
        path: String,
        size: i64,
        sha256: String,
        url: String,
    }

    #[derive(ToSchema)]
    pub(in crate::api) struct Runner {
        id: Uuid,
        name: String,
        labels: BTreeMap<String, String>,
        capacity: i32,
        active_runs: i64,
        status: RunnerStatus,
        connected: bool,
        revoked_at: Option<DateTime<Utc>>,
        version: String,
        /// Whether the runner serves every organization.
        instance_wide: bool,
        certificate_expires_at: DateTime<Utc>,
        created_at: DateTime<Utc>,
        last_seen_at: Option<DateTime<Utc>>,
    }

    #[derive(ToSchema)]
    #[schema(rename_all = "snake_case")]
    pub(in crate::api) enum RunnerStatus {
        Online,
        Offline,
        Revoked,
    }

    #[derive(ToSchema)]
    pub(in crate::api) struct JoinToken {
        /// Shown this once; the runner presents it to enroll.
        token: String,
        /// What the runner pins with `--ca-cert-hash`.
        ca_cert_hash: String,
        expires_at: DateTime<Utc>,
        single_use: bool,
        /// The organization whose runs the runner takes; null for every one.
        organization: Option<String>,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::{openapi, router, AppState};
    use super::openapi_path;
    use crate::bus::{Bus, InProcessBus};
    use crate::dispatch::Dispatcher;
    use crate::revocation::{Revocations, Revoker};
    use crate::store::sqlite::SqliteStore;
    use crate::store::Store;

    async fn state(dir: &std::path::Path) -> AppState {
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.join("muster.db"))
                .await
                .expect("a fresh SQLite store"),
        );
        let bus: Arc<dyn Bus> = Arc::new(InProcessBus::default());
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let dispatcher = Dispatcher::new(
            store.clone(),
            bus.clone(),
            Duration::from_secs(30),
            crate::dispatch::FALLBACK_TICK,
            metrics.clone(),
        );
        AppState {
            store: store.clone(),
            bus: bus.clone(),
            ca: Arc::new(
                crate::tls::load_or_create_ca(&*store, dir)
                    .await
                    .expect("a CA"),
            ),
            revoker: Revoker {
                store,
                bus,
                dispatcher,
                revocations: Arc::new(Revocations::default()),
            },
            max_bundle_bytes: 1024 * 1024,
            tail_poll: crate::tail::POLL_EVERY,
            metrics,
        }
    }

    /// The route table of `router`: each path with the methods it serves.
    /// Axum lists its routes nowhere but in its `Debug` form, which is read
    /// here: `RouteId(n): MethodRouter(… allow_header: Bytes(b"GET,HEAD") …)`
    /// and `node: Node { paths: {RouteId(n): "/path", …} }`. Should a new axum
    /// print them otherwise, this finds no routes and fails; it cannot pass
    /// by reading nothing.
    fn route_table(router: &axum::Router) -> BTreeMap<String, BTreeSet<String>> {
        let text = format!("{router:?}");
        let table = text
            .split("fallback_router")
            .next()
            .expect("split yields one part");
        let (routes, paths) = table
            .split_once("node: Node")
            .expect("the route table's Debug form names its node");
        let ids = |part: &str| -> Vec<(String, String)> {
            part.split("RouteId(")
                .skip(1)
                .filter_map(|rest| {
                    let (id, rest) = rest.split_once(')')?;
                    Some((id.to_owned(), rest.to_owned()))
                })
                .collect()
        };
        let mut methods: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (id, rest) in ids(routes) {
            let allowed = rest
                .split_once("allow_header: Bytes(b\"")
                .and_then(|(_, after)| after.split_once('"'))
                .map(|(list, _)| list.split(',').map(str::to_owned).collect())
                .unwrap_or_default();
            methods.insert(id, allowed);
        }
        ids(paths)
            .into_iter()
            .filter_map(|(id, rest)| {
                let path = rest.split('"').nth(1)?;
                Some((path.to_owned(), methods.remove(&id).unwrap_or_default()))
            })
            .collect()
    }

    /// Every route the finished router serves, with its methods, is in the
    /// document, and nothing else: `router()` may add layers and a fallback
    /// to what `api::endpoints` registers, never a route of its own.
    #[tokio::test]
    async fn the_router_serves_exactly_what_the_document_describes() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let served: BTreeMap<String, BTreeSet<String>> =
            route_table(&router(state(dir.path()).await))
                .into_iter()
                .map(|(path, methods)| (openapi_path(&path), methods))
                .collect();
        assert!(served.len() > 10, "read only {served:?} from the router");
        let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (path, mut item) in openapi().paths.paths {
            let methods = documented.entry(path).or_default();
            for (name, operation) in [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("DELETE", &item.delete),
            ] {
                if operation.is_some() {
                    methods.insert(name.to_owned());
                }
            }
            // Axum answers HEAD wherever it answers GET.
            if item.get.take().is_some() {
                methods.insert("HEAD".to_owned());
            }
        }
        let differ = |a: &BTreeMap<String, BTreeSet<String>>,
                      b: &BTreeMap<String, BTreeSet<String>>| {
            a.iter()
                .filter(|(path, methods)| b.get(*path) != Some(methods))
                .map(|(path, methods)| format!("{methods:?} {path}"))
                .collect::<Vec<_>>()
        };
        let undocumented = differ(&served, &documented);
        let unserved = differ(&documented, &served);
        assert!(
            undocumented.is_empty() && unserved.is_empty(),
            "served but not so documented (register it in api::endpoints, with #[utoipa::path] \
             on its handler): {undocumented:?}; documented but not so served: {unserved:?}"
        );
    }

    #[test]
    fn the_document_is_complete() {
        let doc: serde_json::Value =
            serde_json::from_str(super::document()).expect("the document is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            assert!(!path.contains('*'), "{path}: axum's syntax, not OpenAPI's");
            for (method, operation) in item.as_object().expect("a path item") {
                let id = operation["operationId"].as_str().expect("an operation id");
                assert!(ids.insert(id.to_owned()), "operation id {id} is not unique");
                let responses = operation["responses"].as_object().expect("responses");
                let security = &operation["security"];
                let public = *security == serde_json::json!([{}]);
                let agent = path.starts_with("/api/v1/agent/");
                assert_eq!(
                    agent,
                    *security == serde_json::json!([{ "agent_token": [] }]),
                    "{method} {path}: the agent routes, and only they, take the agent token"
                );
                assert!(
                    public || agent || security.is_null(),
                    "{method} {path}: {security}"
                );
                for status in ["401", "403"] {
                    assert_eq!(
                        !public,
                        responses.contains_key(status),
                        "{method} {path}: {status} is documented where a token is required"
                    );
                }
                assert!(
                    public || responses.contains_key("503"),
                    "{method} {path}: 503 is documented where the database is asked"
                );
                for (status, response) in responses {
                    if status.starts_with('4') {
                        assert!(
                            response.get("$ref").is_some()
                                || response["content"]["application/json"].is_object(),
                            "{method} {path}: {status} answers JSON with `detail`"
                        );
                    }
                }
            }
        }
    }
}
