//! What the OpenAPI document says about each call beyond its row in the route table: its
//! parameters, request body and answer schemas, the statuses it answers with, and links to
//! the calls its answer feeds. Every rule a handler enforces on its input is stated here
//! (patterns, lengths, enums, required fields, body size), taken from the same constants
//! the handlers check, so that a client or fuzzer built from the document sends requests
//! the server accepts. Rules that depend on stored state (a user must exist, a cursor must
//! come from this conversation) are stated with a `format` naming the kind of value and a
//! description, and the links say which answers such values come from.

use serde_json::{json, Map, Value};

use super::admin::{DEFAULT_TOKEN_TTL_S, MAX_DISPLAY_NAME_CHARS};
use super::conversations::{MAX_ANNOUNCEMENT_CHARS, MAX_LIST_LIMIT, MAX_MEMBERS_PER_CALL, MAX_NAME_CHARS};
use super::messages::{MAX_CLIENT_MSG_ID, MAX_HISTORY_LIMIT, MAX_TYPE};
use super::search::{MAX_QUERY_CHARS, MAX_SEARCH_LIMIT};
use super::sync::{MAX_DEVICE_TOKEN_BYTES, MAX_PRESENCE_USERS, MAX_SYNC_LIMIT, PUSH_PLATFORMS};
use crate::idempotency::MAX_KEY_LEN;
use crate::GatewayConfig;

/// The deployment facts the document states (limits and names that are configuration).
pub struct DocContext<'a> {
    pub cfg: &'a GatewayConfig,
}

impl DocContext<'_> {
    fn regions(&self) -> Vec<String> {
        let mut r: Vec<String> = self.cfg.region_endpoints.keys().cloned().collect();
        r.push(self.cfg.region.to_string());
        r.sort();
        r.dedup();
        r
    }
}

/// One call's document beyond the route table row.
#[derive(Default)]
pub struct OpSpec {
    /// Path parameters whose schema is not the default for their name.
    pub path: Vec<(&'static str, Value)>,
    /// Query and header parameter objects.
    pub params: Vec<Value>,
    /// The JSON request body's schema.
    pub body: Option<Value>,
    /// The success answer's JSON schema (`None`: no JSON body, e.g. 204).
    pub response: Option<Value>,
    /// Statuses this call answers with beyond those of every call with its access.
    pub errors: Vec<u16>,
    /// Links from the success answer to the calls it feeds.
    pub links: Map<String, Value>,
    /// Extra keywords for the operation object (`x-...`).
    pub extra: Map<String, Value>,
    /// The success answer's media type when it is not JSON (`response` is then `None`).
    pub content_type: Option<&'static str>,
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn query(name: &str, required: bool, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": required, "schema": schema, "description": description})
}

fn int_range(min: usize, max: usize, default: usize) -> Value {
    json!({"type": "integer", "minimum": min, "maximum": max, "default": default})
}

fn link(operation_id: &str, parameters: Value, description: &str) -> Value {
    json!({"operationId": operation_id, "parameters": parameters, "description": description})
}

/// The default schema of a path parameter, by name.
pub fn path_param_schema(name: &str) -> Value {
    match name {
        "user_id" | "uid" => r("UserId"),
        "device_id" => r("DeviceId"),
        "cid" => r("ConversationId"),
        "mid" => r("MessageId"),
        _ => json!({"type": "string"}),
    }
}

/// The reusable schemas.
pub fn components(ctx: &DocContext) -> Value {
    let id = |what: &str| {
        json!({"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_.-]{1,64}$",
               "description": format!("{what}: 1-64 characters of [A-Za-z0-9_.-].")})
    };
    let mut user = id("A user id");
    user["format"] = json!("user-id");
    json!({
        "UserId": user,
        "DeviceId": id("A device id"),
        "Region": {"type": "string", "enum": ctx.regions(), "description": "A region of this deployment."},
        "ConversationId": {"type": "string", "format": "conversation-id", "pattern": "^[dg]_[0-9a-f]{32}$",
            "minLength": 34, "maxLength": 34,
            "description": "d_ (direct) or g_ (group) and 32 hex digits, as POST /v1/conversations answers."},
        "GroupId": {"type": "string", "format": "group-id", "pattern": "^g_[0-9a-f]{32}$",
            "minLength": 34, "maxLength": 34,
            "description": "The id of a group (g_ and 32 hex digits); a direct conversation's id is refused 400 not_a_group."},
        "MessageId": {"type": "string", "format": "message-id",
            "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
            "description": "A message id (UUID), as the send answers and history lists."},
        "Cursor": {"type": "string", "format": "cursor", "pattern": "^[A-Za-z0-9_-]{1,512}$",
            "description": "An opaque position in a conversation's timeline: the cursor of a message (send answer, history) or of a sync entry that is in the conversation's timeline (message, recall, member and conversation changes). Made-up values are refused 400."},
        "SearchCursor": {"type": "string", "format": "search-cursor", "pattern": "^[A-Za-z0-9_-]{1,512}$",
            "description": "Opaque: the next_cursor of the previous page of GET /v1/search with the same query. Made-up values are refused 400."},
        "ListCursor": {"type": "string", "format": "list-cursor", "pattern": "^[A-Za-z0-9_-]{1,512}$",
            "description": "Opaque: the next_cursor of the previous page of GET /v1/conversations."},
        "Error": {
            "type": "object", "required": ["error", "message"],
            "description": "Every error answer. `error` is a stable code (invalid_argument, malformed_json, malformed_body, too_large, unauthorized, forbidden, not_found, conversation_not_found, member_not_found, message_not_found, user_not_found, unknown_user, unknown_region, not_a_group, conversation_dissolved, resync_required, idempotency_conflict, idempotency_in_progress, rate_limited (with retry_after_ms), too_many_sockets, group_too_large, wrong_region, method_not_allowed, websocket_upgrade_required, unavailable, region_unsure, not_caught_up, failover_to_itself, durability_unavailable, not_geo_durable); `message` is for people. Some codes add fields: `field` (the input at fault), `reason`, `user_ids`, `epoch` and `head`, `region` and `endpoint`, `message_id`.",
            "properties": {
                "error": {"type": "string", "pattern": "^[a-z_]+$"},
                "message": {"type": "string"},
                "field": {"type": "string"},
                "reason": {"type": "string"},
                "user_ids": {"type": "array", "items": {"type": "string"}},
                "epoch": {"type": "string"},
                "head": {"type": "integer", "minimum": 0},
                "region": {"type": "string"},
                "endpoint": {"type": "string"},
                "message_id": {"type": "string"}
            }
        },
        "Member": {"type": "object", "required": ["user_id", "role"], "properties": {
            "user_id": {"type": "string"}, "role": {"type": "string", "enum": ["owner", "admin", "member"]}}},
        "Conversation": {"type": "object",
            "required": ["conversation_id", "kind", "name", "announcement", "members_can_add", "created_by", "member_count", "members"],
            "properties": {
                "conversation_id": {"type": "string"},
                "kind": {"type": "string", "enum": ["direct", "group"]},
                "name": {"type": "string"},
                "announcement": {"type": "string"},
                "members_can_add": {"type": "boolean"},
                "created_by": {"type": "string"},
                "member_count": {"type": "integer", "minimum": 0},
                "members": {"type": "array", "items": r("Member")},
                "dissolved": {"type": "boolean"},
                "muted": {"type": "boolean"},
                "pinned": {"type": "boolean"}
            }},
        "Message": {"type": "object",
            "required": ["message_id", "cursor", "sender", "type", "body", "sent_at", "recalled", "client_msg_id"],
            "properties": {
                "message_id": {"type": "string"},
                "cursor": {"type": "string"},
                "sender": {"type": "string"},
                "type": {"type": "string"},
                "body": {"description": "The JSON object sent; null once recalled."},
                "sent_at": {"type": "integer", "minimum": 0},
                "recalled": {"type": "boolean"},
                "client_msg_id": {"type": "string"}
            }},
        "ConversationSummary": {"type": "object",
            "required": ["conversation_id", "kind", "name", "last_message", "unread", "muted", "pinned", "member_count"],
            "properties": {
                "conversation_id": {"type": "string"},
                "kind": {"type": "string", "enum": ["direct", "group"]},
                "name": {"type": "string"},
                "last_message": {"oneOf": [r("Message"), {"type": "null"}]},
                "unread": {"type": "integer", "minimum": 0},
                "muted": {"type": "boolean"},
                "pinned": {"type": "boolean"},
                "member_count": {"type": "integer", "minimum": 0}
            }},
        "InboxEntry": {"type": "object", "required": ["seq", "conversation_id", "kind", "cursor"],
            "description": "A sync entry; a message entry carries the fields of Message (a recalled one with body null).",
            "properties": {
                "seq": {"type": "integer", "minimum": 1},
                "conversation_id": {"type": "string"},
                "kind": {"type": "string"},
                "cursor": {"type": ["string", "null"]},
                "actor": {"type": "string"},
                "at": {"type": "integer", "minimum": 0},
                "message_id": {"type": "string"},
                "recalled": {"type": "boolean"}
            }},
        "Readiness": {"type": "object", "required": ["status", "region", "apply_lag", "problems"], "properties": {
            "status": {"type": "string", "enum": ["ready", "not_ready"]},
            "region": {"type": "string"},
            "apply_lag": {"type": ["integer", "null"], "description": "Events of the region's own stream not yet applied."},
            "problems": {"type": "array", "items": {"type": "string"},
                "description": "Why not ready: store or NATS unreachable, a stream (own or mirror) whose apply lag is above 10,000 events, a mirror reporting an error, never active, or inactive longer than the gateway's mirror_unhealthy_after_s (each names the mirror and its region)."}}},
        "StreamHealth": {"type": "object",
            "required": ["stream", "origin", "mirror", "last_seq", "applied", "apply_lag", "mirror_lag", "active_age_ms", "error"],
            "properties": {
                "stream": {"type": "string"},
                "origin": {"type": "string", "description": "The region whose events the stream holds."},
                "mirror": {"type": "boolean", "description": "A mirror of another region's stream (false: this region's own)."},
                "last_seq": {"type": ["integer", "null"], "minimum": 0},
                "applied": {"type": "integer", "minimum": 0, "description": "The store's checkpoint of the stream."},
                "apply_lag": {"type": ["integer", "null"], "minimum": 0, "description": "last_seq minus applied."},
                "mirror_lag": {"type": "integer", "minimum": 0, "description": "Messages the origin holds that the mirror does not yet (0 for the own stream; also 0 for a cut mirror: see active_age_ms)."},
                "active_age_ms": {"type": ["integer", "null"], "minimum": 0, "description": "Milliseconds since the mirror last heard from its origin; null for the own stream and a mirror never active."},
                "error": {"type": ["string", "null"]}}}
    })
}

fn idempotency_header() -> Value {
    json!({"name": "Idempotency-Key", "in": "header", "required": false,
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LEN, "pattern": format!("^[\\x21-\\x7e]{{1,{MAX_KEY_LEN}}}$")},
        "description": "Makes a retry safe: the same key (same caller, same path) gets the first answer and changes nothing, also after a restart; the same key with another body is 409 idempotency_conflict; while the first attempt runs, 409 idempotency_in_progress. Remembered for 24 h; refused requests (4xx) are not remembered."})
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({"type": "object", "additionalProperties": false, "required": required, "properties": properties})
}

const CONVERSATION_LINKS: &[(&str, &str, &str)] = &[
    (
        "GetConversation",
        "get_v1_conversations__cid_",
        "The conversation's info.",
    ),
    (
        "SendMessage",
        "post_v1_conversations__cid__messages",
        "Send into it.",
    ),
    ("History", "get_v1_conversations__cid__messages", "Its history."),
    (
        "SeenBy",
        "get_v1_conversations__cid__read",
        "Its members' read indexes.",
    ),
    (
        "Settings",
        "put_v1_conversations__cid__settings",
        "The caller's settings for it.",
    ),
    (
        "Update",
        "patch_v1_conversations__cid_",
        "Update it (groups only).",
    ),
    (
        "DissolveOrHide",
        "delete_v1_conversations__cid_",
        "Dissolve the group, or hide the direct conversation.",
    ),
];

/// Calls on one member of a new conversation (the first after the caller).
const MEMBER_LINKS: &[(&str, &str, &str)] = &[
    (
        "ChangeRole",
        "patch_v1_conversations__cid__members__uid_",
        "Change a member's role (groups only).",
    ),
    (
        "RemoveMember",
        "delete_v1_conversations__cid__members__uid_",
        "Remove a member (groups only).",
    ),
];

fn conversation_links(from: &str) -> Map<String, Value> {
    let mut links: Map<String, Value> = CONVERSATION_LINKS
        .iter()
        .map(|(name, op, d)| (name.to_string(), link(op, json!({"cid": from}), d)))
        .collect();
    for (name, op, d) in MEMBER_LINKS {
        let params = json!({"cid": from, "uid": "$response.body#/members/1/user_id"});
        links.insert(name.to_string(), link(op, params, d));
    }
    links
}

pub fn none(_: &DocContext) -> OpSpec {
    OpSpec::default()
}

pub fn healthz(_: &DocContext) -> OpSpec {
    OpSpec {
        response: Some(object(
            &["status"],
            json!({"status": {"type": "string", "enum": ["ok"]}}),
        )),
        ..Default::default()
    }
}

pub fn readyz(_: &DocContext) -> OpSpec {
    OpSpec {
        params: vec![query(
            "scope",
            false,
            json!({"type": "string", "enum": ["region", "local"], "default": "region"}),
            "region: everything, mirrors included; local: only what serving this region's own users needs (for load balancers: a cut link between regions must not take the region out of service).",
        )],
        response: Some(r("Readiness")),
        errors: vec![503],
        ..Default::default()
    }
}

pub fn openapi(_: &DocContext) -> OpSpec {
    OpSpec {
        response: Some(json!({"type": "object", "required": ["openapi", "paths"]})),
        ..Default::default()
    }
}

pub fn put_user(_: &DocContext) -> OpSpec {
    let mut links = Map::new();
    links.insert(
        "MintToken".into(),
        json!({"operationId": "post_v1_admin_tokens", "requestBody": {"user_id": "$response.body#/user_id"},
               "description": "A token for the user."}),
    );
    OpSpec {
        body: Some(object(
            &["home_region"],
            json!({"home_region": r("Region"),
                   "display_name": {"type": "string", "maxLength": MAX_DISPLAY_NAME_CHARS, "default": ""}}),
        )),
        response: Some(
            json!({"type": "object", "required": ["user_id", "home_region", "display_name"],
            "properties": {"user_id": {"type": "string"}, "home_region": {"type": "string"}, "display_name": {"type": "string"}}}),
        ),
        links,
        ..Default::default()
    }
}

pub fn post_token(ctx: &DocContext) -> OpSpec {
    let max = ctx.cfg.max_token_ttl_s;
    OpSpec {
        body: Some(object(
            &["user_id", "device_id"],
            json!({"user_id": {"allOf": [r("UserId")], "description": "A provisioned user (404 user_not_found otherwise)."},
                   "device_id": r("DeviceId"),
                   "ttl_s": {"type": "integer", "minimum": 1, "maximum": max, "default": DEFAULT_TOKEN_TTL_S.min(max)}}),
        )),
        response: Some(json!({"type": "object", "required": ["token", "expires_at"],
            "properties": {"token": {"type": "string"}, "expires_at": {"type": "integer", "minimum": 0}}})),
        errors: vec![404],
        ..Default::default()
    }
}

pub fn admin_regions(_: &DocContext) -> OpSpec {
    let s = json!({"type": "string"});
    let region = json!({"type": "object", "required": ["region", "status", "serving", "serving_for", "epoch"], "properties": {
        "region": s,
        "status": {"type": "string", "enum": ["active", "failed"], "description": "active: the region serves its own users; failed: another region serves them."},
        "serving": {"allOf": [s], "description": "The region serving this region's users."},
        "serving_for": {"type": "array", "items": s, "description": "Regions whose users this region serves."},
        "epoch": s,
        "streams": {"type": "object", "additionalProperties": r("StreamHealth"),
            "description": "Only in the answering region's entry: every stream it applies (its own and each mirror), by name."},
        "mirror_problems": {"type": "array", "items": s, "description": "Only in the answering region's entry: unhealthy mirrors, as /readyz reports them."},
        "search": {"type": "object", "required": ["documents", "lag_events", "rebuilding", "last_commit_ms"],
            "description": "Only in the answering region's entry, when it runs the search index: messages searchable, events applied but not yet searchable, whether a rebuild from the store runs, and when the index last committed (ms since the epoch, 0: not yet).",
            "properties": {"documents": {"type": "integer", "minimum": 0}, "lag_events": {"type": "integer", "minimum": 0},
                "rebuilding": {"type": "boolean"}, "last_commit_ms": {"type": "integer", "minimum": 0}}}}});
    OpSpec {
        response: Some(
            json!({"type": "object", "required": ["region", "regions"], "properties": {
            "region": {"allOf": [s], "description": "The answering region."},
            "regions": {"type": "array", "items": region, "description": "Every region of the deployment, the answering one first."}}}),
        ),
        ..Default::default()
    }
}

pub fn admin_digest(_: &DocContext) -> OpSpec {
    OpSpec {
        response: Some(
            json!({"type": "object", "required": ["region", "applied", "digest", "settled"], "properties": {
            "region": {"type": "string"},
            "applied": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                "description": "The applied position of every stream the region applies (own and mirrors)."},
            "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                "description": "SHA-256 over every replicated record, whichever stream wrote it. Equal digests at equal applied positions mean equal replicas."},
            "settled": {"type": "boolean", "description": "Whether the applied positions were the same before and after the digest was taken."}}}),
        ),
        ..Default::default()
    }
}

/// The answer of failover and failback: who serves the region's users now.
fn region_move_answer() -> Value {
    let s = json!({"type": "string"});
    json!({"type": "object", "required": ["region", "serving", "epoch", "changed", "applied", "failover_point"], "properties": {
        "region": s,
        "serving": {"allOf": [s], "description": "The region serving the region's users now."},
        "epoch": {"allOf": [s], "description": "Their inbox epoch now (clients with another one resync)."},
        "changed": {"type": "boolean", "description": "false: it was so already (a repeat); no event was published."},
        "applied": {"type": "boolean", "description": "Whether the answering region had applied the move when it answered (it is in the stream either way)."},
        "failover_point": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
            "description": "While failed over: how far the acting region had applied each stream when it took over (what failback waits for)."}}})
}

pub fn admin_failover(_: &DocContext) -> OpSpec {
    OpSpec {
        params: vec![operator_header(false)],
        body: Some(object(
            &["region"],
            json!({"region": {"allOf": [r("Region")], "description": "The failed region whose users move."},
                   "to": {"allOf": [r("Region")], "description": "The acting region (default: the answering one). Another region answers 421 wrong_region naming it."}}),
        )),
        response: Some(region_move_answer()),
        errors: vec![400, 409, 421],
        extra: {
            let mut m = Map::new();
            m.insert("x-conflict".into(), json!("409 failover_to_itself: region and to (or the answering region) are the same; use failback."));
            m
        },
        ..Default::default()
    }
}

pub fn admin_failback(_: &DocContext) -> OpSpec {
    OpSpec {
        params: vec![operator_header(false)],
        body: Some(object(
            &["region"],
            json!({"region": {"allOf": [r("Region")], "description": "The home region taking its users back; only it answers (others: 421 wrong_region naming it)."}}),
        )),
        response: Some(region_move_answer()),
        errors: vec![400, 409, 421],
        extra: {
            let mut m = Map::new();
            m.insert("x-conflict".into(), json!("409 not_caught_up: {lag: {stream: events behind}, reasons: [why the region cannot tell yet]}; retry."));
            m
        },
        ..Default::default()
    }
}

pub fn admin_timeline(_: &DocContext) -> OpSpec {
    let mut links = Map::new();
    links.insert(
        "NextPage".into(),
        link(
            "get_v1_admin_conversations__cid__messages",
            json!({"cid": "$request.path.cid", "after": "$response.body#/next_cursor"}),
            "Continue forward.",
        ),
    );
    OpSpec {
        params: vec![
            query(
                "after",
                false,
                json!({"anyOf": [r("Cursor"), {"const": ""}]}),
                "Messages strictly after this cursor of this conversation, oldest first; empty or absent: from the beginning.",
            ),
            query(
                "limit",
                false,
                int_range(1, crate::routes::admin::MAX_TIMELINE_LIMIT, 100),
                "Page size.",
            ),
        ],
        response: Some(json!({"type": "object", "required": ["messages", "next_cursor"], "properties": {
            "messages": {"type": "array", "items": r("Message")},
            "next_cursor": {"type": ["string", "null"]}}})),
        errors: vec![404],
        links,
        ..Default::default()
    }
}

fn operator_header(required: bool) -> Value {
    json!({"name": "X-Operator", "in": "header", "required": required,
           "schema": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9][A-Za-z0-9 _.@-]{0,63}$"},
           "description": "Who acts (a name, not a credential): logged with the move."})
}

fn conflict(text: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("x-conflict".into(), json!(text));
    m
}

pub fn console_events(_: &DocContext) -> OpSpec {
    OpSpec {
        content_type: Some("text/event-stream"),
        extra: {
            let mut m = Map::new();
            m.insert("x-events".into(), json!("history: {samples: [sample...]} (the last minutes), then sample: {at_ms, region, regions: [{region, status, serving, serving_for, epoch, reachable, errors, streams, mirror_problems, search?, digest, settled, applied, metrics: {published_per_s, delivered_per_s, applied_per_s, p99_delivery_ms, deliveries_in_window, lags}}], convergence: {state: converged|catching_up|diverged|unknown, since_ms, detail}, actions: [{at_ms, operator, action, region, to, acting, status, outcome, answer}]} about every second."));
            m
        },
        ..Default::default()
    }
}

pub fn console_failover(_: &DocContext) -> OpSpec {
    OpSpec {
        params: vec![operator_header(true)],
        body: Some(object(
            &["region", "to"],
            json!({"region": {"allOf": [r("Region")], "description": "The region whose users move."},
                   "to": {"allOf": [r("Region")], "description": "The acting region, which serves them from now on (the call is sent to it)."}}),
        )),
        response: Some(region_move_answer()),
        errors: vec![400, 409, 421],
        extra: conflict("409 as POST /v1/admin/failover answers it (failover_to_itself)."),
        ..Default::default()
    }
}

pub fn console_failback(_: &DocContext) -> OpSpec {
    OpSpec {
        params: vec![operator_header(true)],
        body: Some(object(
            &["region"],
            json!({"region": {"allOf": [r("Region")], "description": "The home region taking its users back (the call is sent to it)."}}),
        )),
        response: Some(region_move_answer()),
        errors: vec![400, 409, 421],
        extra: conflict("409 not_caught_up as POST /v1/admin/failback answers it: {lag, reasons}; retry."),
        ..Default::default()
    }
}

fn run_param() -> Vec<(&'static str, Value)> {
    vec![(
        "run",
        json!({"type": "string", "pattern": crate::console::RUN_PATTERN, "minLength": 1, "maxLength": 128,
               "description": "A run folder's name as GET /v1/admin/drills lists it."}),
    )]
}

pub fn drills(_: &DocContext) -> OpSpec {
    let n = json!({"type": ["number", "null"]});
    let run = json!({"type": "object", "required": ["run", "verdict"], "properties": {
        "run": {"type": "string"}, "scenario": {"type": ["string", "null"]},
        "verdict": {"type": ["string", "null"], "description": "pass, fail, or unreadable (report.json is not JSON)."},
        "started_at_ms": n, "duration_s": n, "regions": {"type": ["array", "null"], "items": {"type": "string"}},
        "acked": n, "lost": n, "duplicated": n, "delivered": n, "converge_s": n,
        "digests_equal": {"type": ["boolean", "null"]}, "faults": {"type": "integer"}, "violations": {"type": "integer"}}});
    OpSpec {
        response: Some(object(
            &["configured", "runs"],
            json!({"configured": {"type": "boolean", "description": "Whether console.drills_dir is set."},
                   "runs": {"type": "array", "items": run}}),
        )),
        ..Default::default()
    }
}

pub fn drill_report(_: &DocContext) -> OpSpec {
    OpSpec {
        path: run_param(),
        response: Some(json!({"type": "object", "description": "report.json as the drill wrote it."})),
        errors: vec![404, 409],
        extra: conflict("409 report_unreadable: the run's report.json is not JSON."),
        ..Default::default()
    }
}

pub fn drill_picture(_: &DocContext) -> OpSpec {
    OpSpec {
        path: run_param(),
        content_type: Some("image/svg+xml"),
        errors: vec![404],
        ..Default::default()
    }
}

pub fn admin_search_reindex(_: &DocContext) -> OpSpec {
    OpSpec {
        response: Some(
            json!({"type": "object", "required": ["region", "requested", "rebuilding"], "properties": {
            "region": {"type": "string"},
            "requested": {"type": "boolean", "description": "false when a rebuild was already asked for and has not started: it covers this request."},
            "rebuilding": {"type": "boolean"}}}),
        ),
        ..Default::default()
    }
}

pub fn me(_: &DocContext) -> OpSpec {
    let s = json!({"type": "string"});
    OpSpec {
        response: Some(json!({"type": "object",
            "required": ["user_id", "device_id", "display_name", "home_region", "serving_region", "served_by", "epoch"],
            "properties": {"user_id": s, "device_id": s, "display_name": s, "home_region": s,
                           "serving_region": s, "served_by": s, "epoch": s}})),
        ..Default::default()
    }
}

pub fn create_conversation(_: &DocContext) -> OpSpec {
    let name = json!({"type": "string", "maxLength": MAX_NAME_CHARS, "default": ""});
    let other = json!({"allOf": [r("UserId")], "description": "A provisioned user other than the caller (400 unknown_user otherwise)."});
    let direct = json!({"type": "object", "additionalProperties": false, "required": ["kind", "members"],
        "properties": {
            "kind": {"const": "direct"},
            "name": {"type": "string", "maxLength": MAX_NAME_CHARS, "description": "Ignored for direct conversations."},
            "members": {"type": "array", "minItems": 1, "maxItems": 1, "items": other}}});
    let group = json!({"type": "object", "additionalProperties": false, "required": ["kind"],
        "properties": {
            "kind": {"const": "group"},
            "name": name,
            "members": {"type": "array", "maxItems": MAX_MEMBERS_PER_CALL, "default": [], "items": other,
                        "description": "Provisioned users besides the caller (the owner); duplicates are ignored."}}});
    let mut links = conversation_links("$response.body#/conversation_id");
    links.insert(
        "AddMembers".into(),
        link(
            "post_v1_conversations__cid__members",
            json!({"cid": "$response.body#/conversation_id"}),
            "Add members (groups only).",
        ),
    );
    OpSpec {
        params: vec![idempotency_header()],
        body: Some(json!({"oneOf": [direct, group]})),
        response: Some(r("Conversation")),
        errors: vec![200, 409],
        links,
        ..Default::default()
    }
}

pub fn list_conversations(_: &DocContext) -> OpSpec {
    let mut links = Map::new();
    links.insert(
        "NextPage".into(),
        link(
            "get_v1_conversations",
            json!({"cursor": "$response.body#/next_cursor"}),
            "The next page, while next_cursor is not null.",
        ),
    );
    OpSpec {
        params: vec![
            query("limit", false, int_range(1, MAX_LIST_LIMIT, 50), "Page size."),
            query(
                "cursor",
                false,
                r("ListCursor"),
                "Continue after the previous page.",
            ),
        ],
        response: Some(
            json!({"type": "object", "required": ["conversations", "next_cursor"], "properties": {
            "conversations": {"type": "array", "items": r("ConversationSummary")},
            "next_cursor": {"type": ["string", "null"]}}}),
        ),
        links,
        ..Default::default()
    }
}

pub fn get_conversation(_: &DocContext) -> OpSpec {
    OpSpec {
        response: Some(r("Conversation")),
        ..Default::default()
    }
}

fn group_path() -> Vec<(&'static str, Value)> {
    vec![("cid", r("GroupId"))]
}

pub fn update_conversation(_: &DocContext) -> OpSpec {
    let mut body = object(
        &[],
        json!({"name": {"type": "string", "maxLength": MAX_NAME_CHARS},
               "announcement": {"type": "string", "maxLength": MAX_ANNOUNCEMENT_CHARS},
               "members_can_add": {"type": "boolean"}}),
    );
    body["minProperties"] = json!(1);
    OpSpec {
        path: group_path(),
        body: Some(body),
        response: Some(r("Conversation")),
        errors: vec![409],
        ..Default::default()
    }
}

pub fn delete_conversation(_: &DocContext) -> OpSpec {
    OpSpec {
        errors: vec![409],
        ..Default::default()
    }
}

pub fn add_members(_: &DocContext) -> OpSpec {
    OpSpec {
        path: group_path(),
        params: vec![idempotency_header()],
        body: Some(object(
            &["user_ids"],
            json!({"user_ids": {"type": "array", "minItems": 1, "maxItems": MAX_MEMBERS_PER_CALL,
                "items": {"allOf": [r("UserId")], "description": "A provisioned user (400 unknown_user otherwise)."}}}),
        )),
        response: Some(r("Conversation")),
        errors: vec![409],
        ..Default::default()
    }
}

pub fn remove_member(_: &DocContext) -> OpSpec {
    OpSpec {
        path: group_path(),
        errors: vec![409],
        ..Default::default()
    }
}

pub fn change_role(_: &DocContext) -> OpSpec {
    OpSpec {
        path: group_path(),
        body: Some(object(
            &["role"],
            json!({"role": {"type": "string", "enum": ["admin", "member"]}}),
        )),
        response: Some(
            json!({"type": "object", "required": ["user_id", "role"], "properties": {
            "user_id": {"type": "string"}, "role": {"type": "string", "enum": ["admin", "member"]}}}),
        ),
        errors: vec![409],
        ..Default::default()
    }
}

pub fn put_settings(_: &DocContext) -> OpSpec {
    let mut body = object(
        &[],
        json!({"muted": {"type": "boolean"}, "pinned": {"type": "boolean"}}),
    );
    body["minProperties"] = json!(1);
    OpSpec {
        body: Some(body),
        response: Some(
            json!({"type": "object", "required": ["conversation_id", "muted", "pinned"], "properties": {
            "conversation_id": {"type": "string"}, "muted": {"type": "boolean"}, "pinned": {"type": "boolean"}}}),
        ),
        ..Default::default()
    }
}

pub fn send_message(_: &DocContext) -> OpSpec {
    let mut links = Map::new();
    for (name, op, d) in [
        (
            "Recall",
            "post_v1_conversations__cid__messages__mid__recall",
            "Recall it.",
        ),
        (
            "DeleteForMe",
            "delete_v1_conversations__cid__messages__mid_",
            "Hide it for the caller.",
        ),
    ] {
        links.insert(
            name.into(),
            link(
                op,
                json!({"cid": "$request.path.cid", "mid": "$response.body#/message_id"}),
                d,
            ),
        );
    }
    links.insert(
        "MarkRead".into(),
        json!({"operationId": "put_v1_conversations__cid__read", "parameters": {"cid": "$request.path.cid"},
               "requestBody": {"cursor": "$response.body#/cursor"}, "description": "Mark it read."}),
    );
    OpSpec {
        body: Some(object(
            &["client_msg_id", "body"],
            json!({
                "client_msg_id": {"type": "string", "minLength": 1, "maxLength": MAX_CLIENT_MSG_ID,
                    "pattern": format!("^[\\x20-\\x7e]{{1,{MAX_CLIENT_MSG_ID}}}$"),
                    "description": format!("Unique per sender; a retry reuses it. The server takes any 1-{MAX_CLIENT_MSG_ID} bytes without control characters.")},
                "type": {"type": "string", "default": "text", "minLength": 1, "maxLength": MAX_TYPE,
                    "pattern": format!("^[A-Za-z0-9_./-]{{1,{MAX_TYPE}}}$")},
                "body": {"type": "object", "description": "Any JSON object (the whole request is within the body limit)."}
            }),
        )),
        params: vec![
            json!({"name": "Meridian-Durability", "in": "header", "required": false,
            "schema": {"type": "string", "enum": ["process", "disk", "geo"]},
            "description": "The durability level this send asks for (design.md §6); the deployment's level when absent or weaker. disk where the region's JetStream does not fsync before acking is 409 durability_unavailable, as is geo in a region no other region mirrors. A geo send not confirmed by another region in time answers 503 not_geo_durable (stored: true): retrying with the same client_msg_id is safe."}),
        ],
        response: Some(
            json!({"type": "object", "required": ["message_id", "cursor", "accepted_at", "durability"], "properties": {
            "message_id": {"type": "string"}, "cursor": {"type": "string"}, "accepted_at": {"type": "integer"},
            "durability": {"type": "string", "enum": ["process", "disk", "geo"], "description": "The durability level met."}}}),
        ),
        errors: vec![409],
        links,
        ..Default::default()
    }
}

pub fn history(_: &DocContext) -> OpSpec {
    let mut links = Map::new();
    links.insert(
        "NextPage".into(),
        link(
            "get_v1_conversations__cid__messages",
            json!({"cid": "$request.path.cid", "after": "$response.body#/next_cursor"}),
            "Continue forward (after a forward page).",
        ),
    );
    let mut extra = Map::new();
    extra.insert(
        "x-mutually-exclusive-parameters".into(),
        json!([["after", "before"]]),
    );
    OpSpec {
        params: vec![
            query(
                "after",
                false,
                json!({"anyOf": [r("Cursor"), {"const": ""}]}),
                "Messages strictly after this cursor of this conversation, oldest first; empty: from the beginning. Not together with before (400).",
            ),
            query(
                "before",
                false,
                r("Cursor"),
                "The messages just before this cursor of this conversation. Not together with after (400).",
            ),
            query("limit", false, int_range(1, MAX_HISTORY_LIMIT, 50), "Page size."),
        ],
        response: Some(json!({"type": "object", "required": ["messages", "next_cursor"], "properties": {
            "messages": {"type": "array", "items": r("Message")},
            "next_cursor": {"type": ["string", "null"]}}})),
        links,
        extra,
        ..Default::default()
    }
}

pub fn search(_: &DocContext) -> OpSpec {
    let mut links = Map::new();
    links.insert(
        "NextPage".into(),
        link(
            "get_v1_search",
            json!({"q": "$request.query.q", "cursor": "$response.body#/next_cursor"}),
            "The next (older) page, while next_cursor is not null.",
        ),
    );
    let hit = json!({"allOf": [r("Message"), {"type": "object", "required": ["conversation_id", "highlights"], "properties": {
        "conversation_id": {"type": "string"},
        "highlights": {"type": "array", "description": "Where the query matched: a fragment of the message's text and the matched ranges in it, as [start, end) in characters (Unicode scalar values) from the fragment's start.",
            "items": {"type": "object", "required": ["fragment", "ranges"], "properties": {
                "fragment": {"type": "string"},
                "ranges": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2, "maxItems": 2}}}}}}}]});
    OpSpec {
        params: vec![
            query(
                "q",
                true,
                json!({"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS}),
                "The words to find; every word must match (case- and accent-insensitive; Chinese, Japanese and Korean by their characters). Punctuation separates words; a query of punctuation only finds nothing.",
            ),
            query(
                "conversation_id",
                false,
                json!({"allOf": [r("ConversationId")], "description": "Only this conversation (404 conversation_not_found unless the caller is a member)."}),
                "Only this conversation.",
            ),
            query("sender", false, r("UserId"), "Only messages this user sent."),
            query(
                "before",
                false,
                json!({"type": "integer", "minimum": 0}),
                "Only messages sent before this time (ms since the Unix epoch).",
            ),
            query(
                "after",
                false,
                json!({"type": "integer", "minimum": 0}),
                "Only messages sent after this time (ms since the Unix epoch).",
            ),
            query("limit", false, int_range(1, MAX_SEARCH_LIMIT, 20), "Page size."),
            query("cursor", false, r("SearchCursor"), "Continue after the previous page."),
        ],
        response: Some(json!({"type": "object", "required": ["messages", "next_cursor"], "properties": {
            "messages": {"type": "array", "items": hit, "description": "Newest first. A page may hold fewer than limit messages while next_cursor is not null."},
            "next_cursor": {"type": ["string", "null"]}}})),
        errors: vec![404],
        links,
        ..Default::default()
    }
}

pub fn recall(_: &DocContext) -> OpSpec {
    OpSpec {
        response: Some(
            json!({"type": "object", "required": ["message_id", "recalled"], "properties": {
            "message_id": {"type": "string"}, "recalled": {"const": true}}}),
        ),
        ..Default::default()
    }
}

pub fn put_read(_: &DocContext) -> OpSpec {
    OpSpec {
        body: Some(object(
            &["cursor"],
            json!({"cursor": {"allOf": [r("Cursor")],
                "description": "A cursor of this conversation's timeline (see Cursor); another conversation's cursor, or one past its newest entry, is refused 400."}}),
        )),
        response: Some(
            json!({"type": "object", "required": ["conversation_id", "cursor"], "properties": {
            "conversation_id": {"type": "string"}, "cursor": {"type": ["string", "null"]}}}),
        ),
        ..Default::default()
    }
}

pub fn get_read(_: &DocContext) -> OpSpec {
    OpSpec {
        response: Some(json!({"type": "object", "required": ["members"], "properties": {
            "members": {"type": "array", "items": {"type": "object", "required": ["user_id", "cursor"], "properties": {
                "user_id": {"type": "string"}, "cursor": {"type": "string"}}}}}})),
        ..Default::default()
    }
}

pub fn sync(_: &DocContext) -> OpSpec {
    let mut links = Map::new();
    links.insert(
        "NextPage".into(),
        link(
            "get_v1_sync",
            json!({"epoch": "$response.body#/epoch"}),
            "Continue after the last entry's seq while has_more.",
        ),
    );
    OpSpec {
        params: vec![
            query(
                "after",
                false,
                json!({"type": "integer", "minimum": 0, "default": 0}),
                "The last seq the device has; an unknown one (past the head, expired) is 409 resync_required.",
            ),
            query(
                "epoch",
                false,
                json!({"type": "string"}),
                "The epoch the device synced under; another is 409 resync_required.",
            ),
            query("limit", false, int_range(1, MAX_SYNC_LIMIT, 200), "Page size."),
        ],
        response: Some(json!({"type": "object", "required": ["epoch", "entries", "head", "has_more"], "properties": {
            "epoch": {"type": "string"},
            "entries": {"type": "array", "items": r("InboxEntry")},
            "head": {"type": "integer", "minimum": 0},
            "has_more": {"type": "boolean"}}})),
        errors: vec![409],
        links,
        ..Default::default()
    }
}

pub fn ws(_: &DocContext) -> OpSpec {
    OpSpec {
        params: vec![query(
            "token",
            false,
            json!({"type": "string"}),
            "The bearer token, for browsers that cannot set headers on a WebSocket.",
        )],
        errors: vec![405, 426],
        extra: {
            let mut m = Map::new();
            m.insert(
                "x-close-codes".into(),
                json!({"1009": "a frame over the frame limit",
                       "4401": "token_expired: reconnect with a fresh token",
                       "4421": "wrong_region: after a {op: wrong_region, region, endpoint} frame; the user is served by that region (at the upgrade, or when the user moves while the socket is open)"}),
            );
            m
        },
        ..Default::default()
    }
}

pub fn presence(_: &DocContext) -> OpSpec {
    let mut p = query(
        "user_ids",
        true,
        json!({"type": "array", "minItems": 1, "maxItems": MAX_PRESENCE_USERS, "items": r("UserId")}),
        "Comma-separated users. Only users who share a conversation with the caller are shown; anyone else is reported as never seen (online false, last_seen null).",
    );
    p["style"] = json!("form");
    p["explode"] = json!(false);
    OpSpec {
        params: vec![p],
        response: Some(json!({"type": "object", "required": ["users"], "properties": {
            "users": {"type": "array", "items": {"type": "object", "required": ["user_id", "online", "last_seen"], "properties": {
                "user_id": {"type": "string"}, "online": {"type": "boolean"},
                "last_seen": {"type": ["integer", "null"]}}}}}})),
        ..Default::default()
    }
}

pub fn put_device(_: &DocContext) -> OpSpec {
    OpSpec {
        body: Some(object(
            &["platform", "token"],
            json!({"platform": {"type": "string", "enum": PUSH_PLATFORMS},
                   "token": {"type": "string", "minLength": 1, "maxLength": MAX_DEVICE_TOKEN_BYTES,
                             "pattern": format!("^[\\x20-\\x7e]{{1,{MAX_DEVICE_TOKEN_BYTES}}}$"),
                             "description": format!("The provider's device token; the server takes any 1-{MAX_DEVICE_TOKEN_BYTES} bytes.")}}),
        )),
        response: Some(
            json!({"type": "object", "required": ["device_id", "platform"], "properties": {
            "device_id": {"type": "string"}, "platform": {"type": "string", "enum": PUSH_PLATFORMS}}}),
        ),
        ..Default::default()
    }
}
