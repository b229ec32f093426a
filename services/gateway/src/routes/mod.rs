//! The route table. One macro invocation lists every call once, and from it come both the
//! axum router and `GET /openapi.json`, so the published document cannot drift from what
//! is served; each row names its [`spec`] (parameters, bodies, answers, links).

pub mod admin;
pub mod conversations;
pub mod messages;
pub mod ops;
pub mod search;
pub mod spec;
pub mod sync;

use std::sync::Arc;

use axum::Router;
use serde_json::{json, Map, Value};

use crate::state::AppState;
use crate::GatewayConfig;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    User,
    Admin,
}

/// One documented call.
#[derive(Clone, Copy)]
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
    /// The success status.
    pub status: u16,
    pub summary: &'static str,
    /// Parameters, bodies, answers and links (see [`spec`]).
    pub spec: fn(&spec::DocContext) -> spec::OpSpec,
}

impl RouteDoc {
    pub fn operation_id(&self) -> String {
        format!("{}{}", self.method, self.path.replace(['/', '{', '}', '.'], "_"))
    }
}

macro_rules! api {
    ($( $method:ident $path:literal => $handler:path, $spec:path, $access:ident, $status:literal, $summary:literal; )*) => {
        /// The API's routes (state still to be supplied).
        pub fn routes() -> Router<Arc<AppState>> {
            let r = Router::new();
            $( let r = r.route($path, axum::routing::$method($handler)); )*
            r
        }

        pub const DOCS: &[RouteDoc] = &[
            $( RouteDoc { method: stringify!($method), path: $path, access: Access::$access, status: $status, summary: $summary, spec: $spec }, )*
        ];
    };
}

api! {
    get "/healthz" => ops::healthz, spec::healthz, Public, 200, "Liveness: the process answers.";
    get "/readyz" => ops::readyz, spec::readyz, Public, 200, "Readiness: store and NATS reachable, apply lag of every stream under bound, every mirror healthy (503 with the same body otherwise); ?scope=local leaves the mirrors out.";
    get "/metrics" => ops::metrics, spec::none, Public, 200, "Metrics, OpenMetrics text (Prometheus scrapes it as is).";
    get "/openapi.json" => ops::openapi, spec::openapi, Public, 200, "This document.";
    put "/v1/admin/users/{user_id}" => admin::put_user, spec::put_user, Admin, 200, "Provision or update a user: {home_region, display_name}.";
    post "/v1/admin/tokens" => admin::post_token, spec::post_token, Admin, 200, "Mint a client token: {user_id, device_id, ttl_s} -> {token, expires_at}.";
    get "/v1/admin/regions" => admin::get_regions, spec::admin_regions, Admin, 200, "Every region's status; per stream this region applies (own and mirrors): apply lag, mirror lag, active age.";
    get "/v1/admin/digest" => admin::get_digest, spec::admin_digest, Admin, 200, "Replica digest with the applied position of every stream.";
    post "/v1/admin/failover" => admin::post_failover, spec::admin_failover, Admin, 200, "Fail a region's users over to the answering region: {region, to}; idempotent.";
    get "/v1/admin/conversations/{cid}/messages" => admin::get_timeline, spec::admin_timeline, Admin, 200, "A conversation's storage timeline in this region as stored, oldest first, recalled messages included, no membership check (?after, ?limit up to 1000); 404 not_found for a conversation this region does not hold.";
    post "/v1/admin/failback" => admin::post_failback, spec::admin_failback, Admin, 200, "Bring a region's users home: {region}, answered by that region; 409 not_caught_up until it has applied every stream up to the failover point.";
    get "/v1/admin/console/events" => crate::console::events, spec::console_events, Admin, 200, "The operator console's live feed (server-sent events): a history event with the kept samples, then a sample of every region (status, streams, digest, rates, p99 delivery latency, convergence, actions) about every second.";
    post "/v1/admin/console/failover" => crate::console::failover, spec::console_failover, Admin, 200, "Failover on behalf of an operator (X-Operator): POST /v1/admin/failover {region, to} sent to the acting region `to`, answered as it answers; logged with who and when.";
    post "/v1/admin/console/failback" => crate::console::failback, spec::console_failback, Admin, 200, "Failback on behalf of an operator (X-Operator): POST /v1/admin/failback {region} sent to the home region, answered as it answers (409 not_caught_up with the reasons); logged with who and when.";
    get "/v1/admin/drills" => crate::console::drills, spec::drills, Admin, 200, "Drill runs found in console.drills_dir, newest first, each with its verdict and summary figures.";
    get "/v1/admin/drills/{run}/report" => crate::console::drill_report, spec::drill_report, Admin, 200, "A drill run's report.json as written.";
    get "/v1/admin/drills/{run}/picture" => crate::console::drill_picture, spec::drill_picture, Admin, 200, "A drill run's report.svg.";
    post "/v1/admin/search/reindex" => admin::post_search_reindex, spec::admin_search_reindex, Admin, 200, "Rebuild this region's search index from the store; search answers meanwhile, and /v1/admin/regions shows search.rebuilding until done.";
    get "/v1/me" => sync::me, spec::me, User, 200, "The caller: user, device, home and serving region.";
    post "/v1/conversations" => conversations::create, spec::create_conversation, User, 201, "Create a conversation: {kind: direct|group, name, members}. An existing direct conversation answers 200. Idempotency-Key makes retries safe.";
    get "/v1/conversations" => conversations::list, spec::list_conversations, User, 200, "The caller's conversations, most recent activity first (?limit, ?cursor).";
    get "/v1/conversations/{cid}" => conversations::get, spec::get_conversation, User, 200, "Conversation info and members with roles.";
    patch "/v1/conversations/{cid}" => conversations::update, spec::update_conversation, User, 200, "Update a group: {name, announcement, members_can_add} (owner/admin).";
    delete "/v1/conversations/{cid}" => conversations::delete, spec::delete_conversation, User, 204, "Group: the owner dissolves it. Direct: hide it for the caller.";
    post "/v1/conversations/{cid}/members" => conversations::add_members, spec::add_members, User, 200, "Add members: {user_ids} (admin, or anyone when members_can_add). Idempotency-Key makes retries safe.";
    delete "/v1/conversations/{cid}/members/{uid}" => conversations::remove_member, spec::remove_member, User, 204, "Remove a member (admin) or leave (yourself).";
    patch "/v1/conversations/{cid}/members/{uid}" => conversations::change_role, spec::change_role, User, 200, "Change a member's role: {role: admin|member} (owner).";
    put "/v1/conversations/{cid}/settings" => conversations::put_settings, spec::put_settings, User, 200, "The caller's own settings: {muted, pinned}.";
    post "/v1/conversations/{cid}/messages" => messages::post, spec::send_message, User, 202, "Send: {client_msg_id, type, body}; 202 once durable at the level asked (Meridian-Durability: process|disk|geo) or the deployment's, named in the answer's durability; idempotent per client_msg_id.";
    get "/v1/conversations/{cid}/messages" => messages::history, spec::history, User, 200, "History, oldest first within a page (?after, ?before, ?limit).";
    post "/v1/conversations/{cid}/messages/{mid}/recall" => messages::recall, spec::recall, User, 200, "Recall a message (sender within the window, or a group admin).";
    delete "/v1/conversations/{cid}/messages/{mid}" => messages::delete_for_me, spec::none, User, 204, "Hide a message for the caller only.";
    put "/v1/conversations/{cid}/read" => messages::put_read, spec::put_read, User, 200, "Set the caller's read index: {cursor} of this conversation; never moves back.";
    get "/v1/conversations/{cid}/read" => messages::get_read, spec::get_read, User, 200, "Every current member's read index (seen by).";
    get "/v1/search" => search::search, spec::search, User, 200, "Full-text search over the caller's conversations, newest first (?q, ?conversation_id, ?sender, ?before, ?after, ?limit, ?cursor); recalled and deleted-for-me messages never appear.";
    get "/v1/sync" => sync::sync, spec::sync, User, 200, "Inbox entries after a seq (?after, ?epoch, ?limit); 409 resync_required.";
    get "/v1/ws" => crate::ws::upgrade, spec::ws, User, 101, "WebSocket: hello/send/typing/ping frames in, entry/ack/error/typing frames out; a user served by another region gets a wrong_region frame and close code 4421.";
    get "/v1/presence" => sync::presence, spec::presence, User, 200, "Presence of users who share a conversation with the caller (?user_ids=a,b); others read as never seen.";
    put "/v1/devices/{device_id}" => sync::put_device, spec::put_device, User, 200, "Register an offline push target: {platform: apns|fcm|webhook, token}.";
    delete "/v1/devices/{device_id}" => sync::delete_device, spec::none, User, 204, "Unregister a push target.";
}

/// The OpenAPI 3.1 document built from [`DOCS`] and each call's [`spec`], for a gateway
/// with `cfg` (limits and region names are configuration).
pub fn openapi_document(cfg: &GatewayConfig) -> Value {
    let ctx = spec::DocContext { cfg };
    let error = json!({"$ref": "#/components/responses/Error"});
    let mut paths = Map::new();
    for doc in DOCS {
        let spec = (doc.spec)(&ctx);
        let mut op = Map::new();
        op.insert("summary".into(), json!(doc.summary));
        op.insert("operationId".into(), json!(doc.operation_id()));
        let mut params: Vec<Value> = doc
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| {
                let schema = spec
                    .path
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or_else(|| spec::path_param_schema(name), |(_, s)| s.clone());
                json!({"name": name, "in": "path", "required": true, "schema": schema})
            })
            .collect();
        let has_ids = !params.is_empty();
        params.extend(spec.params.iter().cloned());
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        if let Some(body) = &spec.body {
            op.insert(
                "requestBody".into(),
                json!({"required": true,
                       "description": format!("JSON, at most {} bytes (413 too_large above).", cfg.max_body_bytes),
                       "x-max-body-bytes": cfg.max_body_bytes,
                       "content": {"application/json": {"schema": body}}}),
            );
        }
        match doc.access {
            Access::Public => {}
            Access::User => {
                op.insert("security".into(), json!([{"bearer": []}]));
            }
            Access::Admin => {
                op.insert("security".into(), json!([{"adminKey": []}]));
            }
        }
        let success = match (&spec.response, doc.path) {
            (Some(schema), _) => json!({"description": "success",
                "content": {"application/json": {"schema": schema}}}),
            (None, "/metrics") => json!({"description": "success",
                "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}),
            (None, _) if spec.content_type.is_some() => json!({"description": "success",
                "content": {spec.content_type.unwrap_or_default(): {"schema": {"type": "string"}}}}),
            (None, _) => json!({"description": "success, no body"}),
        };
        let mut responses = Map::new();
        let mut ok = success.clone();
        if !spec.links.is_empty() {
            ok["links"] = Value::Object(spec.links.clone());
        }
        responses.insert(doc.status.to_string(), ok);
        let mut errors: Vec<u16> = match doc.access {
            Access::Public => vec![],
            Access::User => vec![400, 401, 403, 421, 429, 503],
            Access::Admin => vec![400, 401, 503],
        };
        if spec.body.is_some() {
            errors.push(413);
        }
        if has_ids && doc.access == Access::User {
            errors.push(404);
        }
        errors.extend(spec.errors.iter().copied());
        errors.sort_unstable();
        errors.dedup();
        for code in errors {
            let answer = match code {
                // Readiness answers its own body when not ready.
                503 if doc.path == "/readyz" => success.clone(),
                c if c < 400 => success.clone(),
                _ => error.clone(),
            };
            responses.insert(code.to_string(), answer);
        }
        op.insert("responses".into(), Value::Object(responses));
        for (k, v) in spec.extra {
            op.insert(k, v);
        }
        let entry = paths.entry(doc.path.to_string()).or_insert_with(|| json!({}));
        entry[doc.method] = Value::Object(op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Meridian", "version": env!("CARGO_PKG_VERSION"),
                 "description": format!(
                     "Client and operator API of a Meridian region. Every error is JSON \
                      (components/schemas/Error). Request bodies are JSON of at most {} bytes. \
                      String formats name where a value comes from: user-id (a provisioned \
                      user), conversation-id and group-id (POST /v1/conversations), message-id \
                      and cursor (the send answer, history, sync entries of that \
                      conversation), list-cursor (next_cursor of the list).",
                     cfg.max_body_bytes)},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": format!("HS256 JWT: sub = user id, dev = device id, exp (and optional iat); lifetime at most {} s.", cfg.max_token_ttl_s)},
                "adminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key"}
            },
            "schemas": spec::components(&ctx),
            "responses": {
                "Error": {
                    "description": "An error",
                    "headers": {"Retry-After": {"description": "Seconds to wait (429, 503, 409 idempotency_in_progress).",
                                                "schema": {"type": "integer", "minimum": 0}}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => r
                .trim_start_matches("#/")
                .split('/')
                .fold(doc, |node, part| &node[part]),
            None => v,
        }
    }

    /// Every `$ref` in `v` names something in `doc`.
    fn refs_resolve(doc: &Value, v: &Value, at: &str) {
        match v {
            Value::Object(o) => {
                if let Some(r) = o.get("$ref") {
                    assert!(!resolve(doc, v).is_null(), "{at}: dangling {r}");
                }
                for (k, x) in o {
                    refs_resolve(doc, x, &format!("{at}/{k}"));
                }
            }
            Value::Array(items) => items.iter().for_each(|x| refs_resolve(doc, x, at)),
            _ => {}
        }
    }

    #[test]
    fn the_document_states_ids_bodies_and_errors_for_every_call() {
        let cfg = GatewayConfig::new(
            meridian_model::RegionId::parse("us").unwrap(),
            "k".repeat(32),
            "a".repeat(16),
        );
        let doc = openapi_document(&cfg);
        refs_resolve(&doc, &doc, "");
        let mut ids = std::collections::BTreeSet::new();
        for d in DOCS {
            let op = &doc["paths"][d.path][d.method];
            assert!(ids.insert(d.operation_id()), "{} is not unique", d.operation_id());
            for p in op["parameters"].as_array().into_iter().flatten() {
                let schema = resolve(&doc, &p["schema"]);
                if p["in"] == "path" {
                    assert!(
                        schema["pattern"].is_string(),
                        "{} {}: {p} has no pattern",
                        d.method,
                        d.path
                    );
                }
            }
            let has_body = op.get("requestBody").is_some();
            assert_eq!(
                has_body,
                ["post", "put", "patch"].contains(&d.method)
                    && d.path != "/v1/conversations/{cid}/messages/{mid}/recall"
                    && d.path != "/v1/admin/search/reindex",
                "{} {}: a request body exactly where the handler reads one",
                d.method,
                d.path
            );
            if has_body {
                assert_eq!(op["requestBody"]["x-max-body-bytes"], cfg.max_body_bytes);
                assert!(op["responses"]["413"].is_object(), "{} {}", d.method, d.path);
            }
            if d.access != Access::Public {
                for code in ["400", "401"] {
                    assert_eq!(
                        op["responses"][code]["$ref"], "#/components/responses/Error",
                        "{} {} {code}",
                        d.method, d.path
                    );
                }
            }
        }
    }
}
