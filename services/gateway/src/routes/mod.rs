//! The route table. One macro invocation lists every call once, and from it come both the
//! axum router and `GET /openapi.json`, so the published document cannot drift from what
//! is served.

pub mod admin;
pub mod conversations;
pub mod messages;
pub mod ops;
pub mod sync;

use std::sync::Arc;

use axum::Router;
use serde_json::{json, Map, Value};

use crate::state::AppState;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    User,
    Admin,
}

/// One documented call.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
    /// The success status.
    pub status: u16,
    pub summary: &'static str,
}

macro_rules! api {
    ($( $method:ident $path:literal => $handler:path, $access:ident, $status:literal, $summary:literal; )*) => {
        /// The API's routes (state still to be supplied).
        pub fn routes() -> Router<Arc<AppState>> {
            let r = Router::new();
            $( let r = r.route($path, axum::routing::$method($handler)); )*
            r
        }

        pub const DOCS: &[RouteDoc] = &[
            $( RouteDoc { method: stringify!($method), path: $path, access: Access::$access, status: $status, summary: $summary }, )*
        ];
    };
}

api! {
    get "/healthz" => ops::healthz, Public, 200, "Liveness: the process answers.";
    get "/readyz" => ops::readyz, Public, 200, "Readiness: store and NATS reachable, applier lag under bound.";
    get "/metrics" => ops::metrics, Public, 200, "Prometheus text metrics.";
    get "/openapi.json" => ops::openapi, Public, 200, "This document.";
    put "/v1/admin/users/{user_id}" => admin::put_user, Admin, 200, "Provision or update a user: {home_region, display_name}.";
    post "/v1/admin/tokens" => admin::post_token, Admin, 200, "Mint a client token: {user_id, device_id, ttl_s} -> {token, expires_at}.";
    get "/v1/admin/regions" => admin::get_regions, Admin, 200, "Region status, apply lag per stream.";
    get "/v1/admin/digest" => admin::get_digest, Admin, 200, "Replica digest with the applied stream positions.";
    get "/v1/me" => sync::me, User, 200, "The caller: user, device, home and serving region.";
    post "/v1/conversations" => conversations::create, User, 201, "Create a conversation: {kind: direct|group, name, members}. An existing direct conversation answers 200.";
    get "/v1/conversations" => conversations::list, User, 200, "The caller's conversations, most recent activity first (?limit, ?cursor).";
    get "/v1/conversations/{cid}" => conversations::get, User, 200, "Conversation info and members with roles.";
    patch "/v1/conversations/{cid}" => conversations::update, User, 200, "Update a group: {name, announcement, members_can_add} (owner/admin).";
    delete "/v1/conversations/{cid}" => conversations::delete, User, 204, "Group: the owner dissolves it. Direct: hide it for the caller.";
    post "/v1/conversations/{cid}/members" => conversations::add_members, User, 200, "Add members: {user_ids} (admin, or anyone when members_can_add).";
    delete "/v1/conversations/{cid}/members/{uid}" => conversations::remove_member, User, 204, "Remove a member (admin) or leave (yourself).";
    patch "/v1/conversations/{cid}/members/{uid}" => conversations::change_role, User, 200, "Change a member's role: {role: admin|member} (owner).";
    put "/v1/conversations/{cid}/settings" => conversations::put_settings, User, 200, "The caller's own settings: {muted, pinned}.";
    post "/v1/conversations/{cid}/messages" => messages::post, User, 202, "Send: {client_msg_id, type, body}; 202 once durable in the stream; idempotent per client_msg_id.";
    get "/v1/conversations/{cid}/messages" => messages::history, User, 200, "History, oldest first within a page (?after, ?before, ?limit).";
    post "/v1/conversations/{cid}/messages/{mid}/recall" => messages::recall, User, 200, "Recall a message (sender within the window, or a group admin).";
    delete "/v1/conversations/{cid}/messages/{mid}" => messages::delete_for_me, User, 204, "Hide a message for the caller only.";
    put "/v1/conversations/{cid}/read" => messages::put_read, User, 200, "Set the caller's read index: {cursor}; never moves back.";
    get "/v1/conversations/{cid}/read" => messages::get_read, User, 200, "Every member's read index (seen by).";
    get "/v1/sync" => sync::sync, User, 200, "Inbox entries after a seq (?after, ?epoch, ?limit); 409 resync_required.";
    get "/v1/ws" => crate::ws::upgrade, User, 101, "WebSocket: hello/send/typing/ping frames in, entry/ack/error/typing frames out.";
    get "/v1/presence" => sync::presence, User, 200, "Presence of users (?user_ids=a,b).";
    put "/v1/devices/{device_id}" => sync::put_device, User, 200, "Register an offline push target: {platform: apns|fcm|webhook, token}.";
    delete "/v1/devices/{device_id}" => sync::delete_device, User, 204, "Unregister a push target.";
}

/// The OpenAPI 3.1 document built from [`DOCS`].
pub fn openapi_document() -> Value {
    let mut paths = Map::new();
    for doc in DOCS {
        let mut op = Map::new();
        op.insert("summary".into(), json!(doc.summary));
        op.insert(
            "operationId".into(),
            json!(format!(
                "{}{}",
                doc.method,
                doc.path.replace(['/', '{', '}', '.'], "_")
            )),
        );
        let params: Vec<Value> = doc
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
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
        let mut responses = Map::new();
        responses.insert(doc.status.to_string(), json!({"description": "success"}));
        let mut errors = vec!["400", "429"];
        match doc.access {
            Access::Public => errors.clear(),
            Access::User => errors.extend(["401", "403", "404", "413", "421"]),
            Access::Admin => errors.extend(["401", "413"]),
        }
        for code in errors {
            responses.insert(code.into(), json!({"$ref": "#/components/responses/Error"}));
        }
        op.insert("responses".into(), Value::Object(responses));
        let entry = paths.entry(doc.path.to_string()).or_insert_with(|| json!({}));
        entry[doc.method] = Value::Object(op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Meridian", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Client and operator API of a Meridian region. Field contract: API.md."},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "adminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key"}
            },
            "responses": {
                "Error": {
                    "description": "An error",
                    "content": {"application/json": {"schema": {
                        "type": "object", "required": ["error", "message"],
                        "properties": {"error": {"type": "string"}, "message": {"type": "string"}}
                    }}}
                }
            }
        }
    })
}
