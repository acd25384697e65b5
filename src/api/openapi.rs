//! `GET /openapi.json`: the API's OpenAPI 3.1 document, generated from the handlers'
//! `#[utoipa::path]` attributes and the request and response types they use, so that
//! it changes with the code. `docs/api.md` is the prose; this is the machine-readable
//! form. `tests/openapi_contract.rs` checks it against [`super::routes`] and runs
//! schemathesis against a live server with it.
//!
//! What every authenticated operation may also answer (401, the failed-login 429, a
//! 503 while the registry is down) is added here once, by [`Common`], rather than on
//! each handler.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use bytes::Bytes;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, Ref, RefOr, ResponseBuilder, Type as SchemaKind,
};
use utoipa::{Modify, OpenApi};

use super::{dashboard, devices, ingest, ops, snapshot, users};
use crate::http::error::ErrorBody;
use crate::query::{latest, routes as queries};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "iotpipe HTTP API",
        version = "1",
        description = "Time-series ingestion for IoT events. The prose, with the rules \
                       a schema cannot state, is docs/api.md.",
    ),
    paths(
        users::create,
        users::rotate_key,
        devices::create,
        devices::list,
        devices::show,
        devices::delete,
        ingest::ingest,
        queries::events,
        queries::device_aggregates,
        queries::grouped_aggregates,
        queries::device_live,
        queries::user_live,
        latest::device,
        latest::fleet,
        snapshot::snapshot,
        ops::health,
        ops::metrics,
        dashboard::index,
        dashboard::asset,
        document,
    ),
    // Referenced from parameters, which utoipa does not collect on its own.
    components(schemas(ErrorBody, crate::query::fill::Fill, crate::query::GroupBy)),
    modifiers(&Common),
    tags(
        (name = "registry", description = "Users and their devices"),
        (name = "ingest", description = "Events in"),
        (name = "queries", description = "Events, aggregates, live figures and latest values out (user key)"),
        (name = "operations", description = "Health and metrics (no authentication), and the admin's store snapshot"),
        (name = "dashboard", description = "The built-in page and its assets (no authentication)"),
    ),
)]
struct ApiDoc;

/// The document, as served.
pub fn document_json() -> Bytes {
    static JSON: LazyLock<Bytes> = LazyLock::new(|| {
        Bytes::from(
            ApiDoc::openapi()
                .to_pretty_json()
                .expect("the document serializes"),
        )
    });
    JSON.clone()
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
pub(super) async fn document() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
}

/// The secrets (`docs/api.md`, Authentication), and the answers every authenticated
/// operation shares.
struct Common;

const SECRETS: [(&str, &str); 3] = [
    ("adminToken", "The admin token (`ipa_...`): creates users"),
    (
        "userKey",
        "A user's API key (`ipk_...`): the registry, queries, and ingest in gateway mode",
    ),
    ("deviceToken", "A device token (`ipd_...`): ingest"),
];

impl Modify for Common {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        for (name, description) in SECRETS {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(description))
                        .build(),
                ),
            );
        }
        let error = |description: &str, retry_after: bool| {
            let mut response = ResponseBuilder::new().description(description).content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Error")))
                    .build(),
            );
            if retry_after {
                response = response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(Some(
                            utoipa::openapi::ObjectBuilder::new()
                                .schema_type(SchemaKind::Integer)
                                .minimum(Some(1)),
                        ))
                        .description(Some("Whole seconds to wait"))
                        .build(),
                );
            }
            response.build()
        };
        components.responses.insert(
            "Unauthorized".into(),
            error(
                "No secret, an unknown one, or the wrong kind for the operation",
                false,
            )
            .into(),
        );
        components.responses.insert(
            "TooManyRequests".into(),
            error(
                "A budget is in debt: `limit` is `device` or `user` (ingest rate limits) or \
                 `login` (too many failed logins from this address, on any endpoint)",
                true,
            )
            .into(),
        );
        components.responses.insert(
            "Unavailable".into(),
            error(
                "The registry or the store is unreachable, the ingest pipeline is full, or \
                 shutdown is under way",
                true,
            )
            .into(),
        );
        for item in doc.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                if op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    shared(op, "401", "Unauthorized");
                    shared(op, "429", "TooManyRequests");
                    shared(op, "503", "Unavailable");
                }
            }
        }
    }
}

fn shared(op: &mut Operation, status: &str, response: &str) {
    op.responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| RefOr::Ref(Ref::new(format!("#/components/responses/{response}"))));
}
