//! The OpenAPI 3.1 description of the HTTP API, generated from the handlers' `#[utoipa::path]`
//! annotations and the wire types' schemas. `GET /openapi.json` serves it; `docs/openapi.json`
//! is the checked-in copy (a test keeps it current: `TALLY_UPDATE_DOCS=1 cargo test -p
//! tally-server --lib openapi` rewrites it).

use crate::{accounts, admin, billing, consume, entitlements, holds, leases, metrics, password_auth, plans, secrets, settings, sync};
use crate::{usage, usage_events, voids, webhooks};
use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Components, OpenApi as Spec, Ref, RefOr, Response, ResponseBuilder, content::ContentBuilder};
use utoipa::{Modify, OpenApi};

/// The API description (see the module documentation).
#[derive(OpenApi)]
#[openapi(
    info(title = "Tally sync server", description = "Entitlements, quota decisions, usage metering and offline sync. Every error answers `{\"error\": {\"code\", \"message\"}}`; docs/api.md lists each route's statuses and codes."),
    paths(
        healthz, metrics::readyz, metrics::render, openapi_json, plans::public_plans,
        accounts::get_me, accounts::patch_me, accounts::delete_me, accounts::export_me,
        leases::list_devices, leases::delete_device,
        sync::sync, settings::get_settings, settings::put_settings, settings::patch_settings,
        entitlements::get_entitlements, entitlements::get_keys,
        usage::check, usage::record, usage::report, usage_events::list, voids::void, consume::consume,
        holds::create, holds::commit, holds::release,
        billing::webhook::receive, billing::apple::notification, billing::apple::purchase,
        billing::google::notification, billing::google::purchase,
        billing::get_billing, billing::checkout, billing::portal,
        admin::create_user, admin::user_usage, admin::disable_user, admin::enable_user, admin::create_grant, admin::revoke_grant,
        admin::put_plan, admin::patch_plan, admin::get_plans, admin::create_api_key, admin::list_api_keys, admin::revoke_api_key,
        password_auth::signup, password_auth::login, password_auth::refresh, password_auth::logout, password_auth::verify,
        password_auth::forgot, password_auth::reset,
        secrets::list, secrets::read, secrets::write, secrets::remove,
        webhooks::create, webhooks::list, webhooks::remove, webhooks::replay, webhooks::deliveries,
    ),
    components(schemas(tally_core::wire::ErrorBody)),
    modifiers(&Conventions),
)]
pub struct ApiDoc;

/// The security schemes and the error answer shared by every operation.
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, api: &mut Spec) {
        let components = api.components.get_or_insert_with(Components::new);
        let bearer = |what: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(what.to_string());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            "bearer",
            bearer("A user's credential: an identity provider's JWT (HS256 with TALLY_JWT_SECRET, or keys from TALLY_JWKS_URL) or a server-signed access token of a password account"),
        );
        components.add_security_scheme(
            "api_key",
            bearer("A backend's API key (`tally-server api-key create`), scoped: usage:write, usage:read, admin, secrets:read"),
        );
        let error: RefOr<Response> = ResponseBuilder::new()
            .description("An error: `{\"error\": {\"code\", \"message\"}}` (a denied decision adds `decision`); docs/api.md lists the statuses and codes of each route")
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
            .build()
            .into();
        for item in api.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten() {
                op.responses.responses.entry("default".into()).or_insert_with(|| error.clone());
            }
        }
    }
}

/// The description as JSON text, as checked in at `docs/openapi.json`.
pub fn json() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

/// `GET /healthz`: the process is up.
#[utoipa::path(
    operation_id = "openapi_healthz",
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "Alive", body = String, content_type = "text/plain")),
)]
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /openapi.json`: this description.
#[utoipa::path(
    operation_id = "openapi_openapi_json",
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 description of the API", body = Object)),
)]
pub async fn openapi_json() -> Json<Spec> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    /// `docs/openapi.json` is the generated description; `TALLY_UPDATE_DOCS=1` rewrites it.
    #[test]
    fn the_checked_in_openapi_description_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let want = super::json();
        if std::env::var_os("TALLY_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &want).expect("write docs/openapi.json");
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(have == want, "docs/openapi.json is stale: run `TALLY_UPDATE_DOCS=1 cargo test -p tally-server --lib openapi`");
    }
}
