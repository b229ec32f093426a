//! Store views rendered as the JSON of docs/api.md. Times are milliseconds since the Unix epoch.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use meridian_model::events::entry_detail::Change;
use meridian_model::events::MemberRole;
use meridian_model::{ConversationId, EventId, OrderKey};
use meridian_store::conversations::{role_name, ConversationSummary, ConversationView};
use meridian_store::records::InboxEntry;
use meridian_store::timeline::MessageView;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// A stored message body is JSON the gateway validated before publishing; should one ever
/// fail to parse, it is shown as a string rather than failing the whole page.
fn body_value(body_json: &str) -> Value {
    serde_json::from_str(body_json).unwrap_or_else(|_| Value::String(body_json.to_string()))
}

pub fn message(m: &MessageView) -> Value {
    json!({
        "message_id": m.message_id.to_string(),
        "cursor": m.order_key.cursor().as_str(),
        "sender": m.sender,
        "type": m.msg_type,
        "body": m.body_json.as_deref().map(body_value),
        "sent_at": m.sent_at_ms,
        "recalled": m.recalled,
        "client_msg_id": m.client_msg_id,
    })
}

pub fn conversation(v: &ConversationView) -> Value {
    json!({
        "conversation_id": v.conversation_id.as_str(),
        "kind": v.kind,
        "name": v.name,
        "announcement": v.announcement,
        "members_can_add": v.members_can_add,
        "created_by": v.created_by,
        "member_count": v.members.len(),
        "members": v.members.iter().map(|m| json!({"user_id": m.user_id.as_str(), "role": m.role})).collect::<Vec<_>>(),
    })
}

pub fn summary(s: &ConversationSummary) -> Value {
    json!({
        "conversation_id": s.conversation_id.as_str(),
        "kind": s.kind,
        "name": s.name,
        "last_message": s.last_message.as_ref().map(message),
        "unread": s.unread,
        "muted": s.muted,
        "pinned": s.pinned,
        "member_count": s.member_count,
    })
}

/// A sync entry: `seq`, `conversation_id`, `kind`, `cursor`, `actor`, `at`; a message also
/// carries the history fields at the top level (a `recalled` one as a tombstone: no body,
/// as history shows it); a state change its details.
pub fn inbox_entry(e: &InboxEntry, recalled: bool) -> Value {
    let mut out = Map::new();
    out.insert("seq".into(), json!(e.seq));
    out.insert("conversation_id".into(), json!(e.conversation_id));
    let cursor = OrderKey::from_bytes(&e.order_key)
        .ok()
        .map(|k| k.cursor().as_str().to_string());
    out.insert("cursor".into(), json!(cursor));
    let Some(t) = &e.entry else {
        out.insert("kind".into(), json!("unknown"));
        return Value::Object(out);
    };
    out.insert("kind".into(), json!(t.kind));
    out.insert("actor".into(), json!(t.actor));
    out.insert("at".into(), json!(t.at_ms));
    if t.kind == "message" {
        let id = EventId::from_bytes(&t.event_id)
            .map(|i| i.to_string())
            .unwrap_or_default();
        out.insert("message_id".into(), json!(id));
        out.insert("sender".into(), json!(t.actor));
        out.insert("type".into(), json!(t.msg_type));
        let body = if recalled {
            Value::Null
        } else {
            body_value(&t.body_json)
        };
        out.insert("body".into(), body);
        out.insert("recalled".into(), json!(recalled));
        out.insert("sent_at".into(), json!(t.at_ms));
        out.insert("client_msg_id".into(), json!(t.client_msg_id));
    }
    match t.detail.as_ref().and_then(|d| d.change.as_ref()) {
        Some(change) => insert_change(&mut out, change),
        None => insert_legacy_detail(&mut out, &t.detail_json),
    }
    Value::Object(out)
}

/// The fields docs/api.md §5 lists for a state change, named here: the store keeps them
/// typed. A detail field is what the entry is about, so it replaces an entry field of the
/// same name (a `read` entry's `cursor` is the read index it set, not the event's position).
fn insert_change(out: &mut Map<String, Value>, change: &Change) {
    let message_id = |id: &[u8]| EventId::from_bytes(id).map(|i| i.to_string()).unwrap_or_default();
    match change {
        Change::ConversationCreated(d) => {
            out.insert("name".into(), json!(d.name));
            out.insert("user_ids".into(), json!(d.user_ids));
        }
        Change::ConversationUpdated(d) => {
            if let Some(name) = &d.name {
                out.insert("name".into(), json!(name));
            }
            if let Some(a) = &d.announcement {
                out.insert("announcement".into(), json!(a));
            }
            if let Some(m) = d.members_can_add {
                out.insert("members_can_add".into(), json!(m));
            }
        }
        Change::MembersAdded(d) => {
            out.insert("user_ids".into(), json!(d.user_ids));
        }
        Change::MemberRemoved(d) => {
            out.insert("user_id".into(), json!(d.user_id));
        }
        Change::MemberRoleChanged(d) => {
            out.insert("user_id".into(), json!(d.user_id));
            out.insert("role".into(), json!(role_name(d.role)));
        }
        Change::Settings(d) => {
            out.insert("muted".into(), json!(d.muted));
            out.insert("pinned".into(), json!(d.pinned));
        }
        Change::Recall(d) | Change::MessageDeleted(d) => {
            out.insert("message_id".into(), json!(message_id(&d.message_id)));
        }
        Change::Read(d) => {
            out.insert("user_id".into(), json!(d.user_id));
            let cursor = OrderKey::from_bytes(&d.read_index)
                .ok()
                .map(|k| k.cursor().as_str().to_string());
            out.insert("cursor".into(), json!(cursor));
        }
    }
}

/// Entries stored before details were typed carry them as JSON with the API's names, except
/// a role, stored as the protobuf enum name (`MEMBER_ROLE_ADMIN`).
fn insert_legacy_detail(out: &mut Map<String, Value>, detail_json: &str) {
    let Ok(Value::Object(detail)) = serde_json::from_str::<Value>(detail_json) else {
        return;
    };
    for (k, v) in detail {
        let v = match (k.as_str(), v.as_str().and_then(MemberRole::from_str_name)) {
            ("role", Some(role)) => json!(role_name(role as i32)),
            _ => v,
        };
        out.insert(k, v);
    }
}

/// The WebSocket `entry` frame of one live inbox entry (just applied, so not recalled):
/// [`inbox_entry`] plus `"op": "entry"`.
/// A plain message (the common case) is serialized straight from the record, its body
/// embedded as the raw JSON it is stored as: building a `Value` tree per delivery and
/// re-parsing the body was ~7 % of the region process under W1 load.
pub fn entry_frame(e: &InboxEntry) -> String {
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Body<'a> {
        Json(&'a RawValue),
        Text(&'a str),
    }
    #[derive(Serialize)]
    struct MessageFrame<'a> {
        op: &'static str,
        seq: u64,
        conversation_id: &'a str,
        cursor: Option<String>,
        kind: &'a str,
        actor: &'a str,
        at: u64,
        message_id: String,
        sender: &'a str,
        #[serde(rename = "type")]
        msg_type: &'a str,
        body: Body<'a>,
        recalled: bool,
        sent_at: u64,
        client_msg_id: &'a str,
    }
    if let Some(t) = e
        .entry
        .as_ref()
        .filter(|t| t.kind == "message" && t.detail.is_none() && t.detail_json.is_empty())
    {
        let frame = MessageFrame {
            op: "entry",
            seq: e.seq,
            conversation_id: &e.conversation_id,
            cursor: OrderKey::from_bytes(&e.order_key)
                .ok()
                .map(|k| k.cursor().as_str().to_string()),
            kind: &t.kind,
            actor: &t.actor,
            at: t.at_ms,
            message_id: EventId::from_bytes(&t.event_id)
                .map(|i| i.to_string())
                .unwrap_or_default(),
            sender: &t.actor,
            msg_type: &t.msg_type,
            body: serde_json::from_str::<&RawValue>(&t.body_json)
                .map(Body::Json)
                .unwrap_or(Body::Text(&t.body_json)),
            recalled: false,
            sent_at: t.at_ms,
            client_msg_id: &t.client_msg_id,
        };
        if let Ok(text) = serde_json::to_string(&frame) {
            return text;
        }
    }
    let mut v = inbox_entry(e, false);
    v["op"] = json!("entry");
    v.to_string()
}

/// The conversation list cursor: the last item's activity key and id.
pub fn list_cursor(activity: &[u8], cid: &ConversationId) -> String {
    let mut b = Vec::with_capacity(2 + activity.len() + cid.as_str().len());
    b.extend_from_slice(&(activity.len() as u16).to_be_bytes());
    b.extend_from_slice(activity);
    b.extend_from_slice(cid.as_str().as_bytes());
    URL_SAFE_NO_PAD.encode(b)
}

pub fn parse_list_cursor(s: &str) -> Result<(Vec<u8>, ConversationId), ApiError> {
    let bad = || {
        ApiError::bad_request("invalid_argument", "cursor is not one this service issued")
            .with("field", "cursor")
    };
    let b = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
    if b.len() < 2 {
        return Err(bad());
    }
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    if b.len() < 2 + n {
        return Err(bad());
    }
    let cid = std::str::from_utf8(&b[2 + n..]).map_err(|_| bad())?;
    let cid = ConversationId::parse(cid.to_string()).map_err(|_| bad())?;
    Ok((b[2..2 + n].to_vec(), cid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cursor_round_trips_and_rejects_garbage() {
        let cid = ConversationId::new_group();
        let c = list_cursor(b"\x01\x02activity", &cid);
        assert_eq!(
            parse_list_cursor(&c).unwrap(),
            (b"\x01\x02activity".to_vec(), cid)
        );
        assert!(parse_list_cursor("!!").is_err());
        assert!(parse_list_cursor(&URL_SAFE_NO_PAD.encode([0, 9, 1])).is_err());
    }

    fn message_entry(body_json: &str, detail_json: &str) -> InboxEntry {
        let key = OrderKey::new(
            meridian_model::Hlc(7 << 16),
            meridian_model::RegionId::parse("us").unwrap(),
            EventId::new_v7(),
        );
        InboxEntry {
            seq: 42,
            conversation_id: ConversationId::new_group().to_string(),
            order_key: key.to_bytes(),
            appended_at_ms: 9,
            entry: Some(meridian_store::records::TimelineEntry {
                kind: "message".into(),
                event_id: key.event_id.as_bytes().to_vec(),
                actor: "ann".into(),
                at_ms: 7,
                msg_type: "text".into(),
                body_json: body_json.into(),
                client_msg_id: "c-1".into(),
                detail_json: detail_json.into(),
                detail: None,
            }),
        }
    }

    #[test]
    fn entry_frame_is_the_inbox_entry_with_op() {
        for (body, detail) in [
            (r#"{"text":"hi \"there\"","n":[1,2]}"#, ""),
            ("not json", ""),
            (r#"{"text":"x"}"#, r#"{"extra":true}"#),
        ] {
            let e = message_entry(body, detail);
            let mut expected = inbox_entry(&e, false);
            expected["op"] = json!("entry");
            let got: Value = serde_json::from_str(&entry_frame(&e)).unwrap();
            assert_eq!(got, expected, "body {body} detail {detail}");
        }
    }

    /// Entries stored before details were typed (JSON in `detail_json`) render as typed ones
    /// do: the read index as the `cursor`, the role by its API name.
    #[test]
    fn a_legacy_json_detail_renders_with_the_api_names() {
        let read_index = OrderKey::new(
            meridian_model::Hlc(3 << 16),
            meridian_model::RegionId::parse("us").unwrap(),
            EventId::new_v7(),
        );
        let read_cursor = read_index.cursor().as_str().to_string();
        let mut e = message_entry("", "");
        let t = e.entry.as_mut().unwrap();
        t.kind = "read".into();
        t.detail_json = json!({"user_id": "ann", "cursor": read_cursor}).to_string();
        let v = inbox_entry(&e, false);
        assert_eq!(v["cursor"], read_cursor, "{v}");
        assert_eq!(v["user_id"], "ann");

        let t = e.entry.as_mut().unwrap();
        t.kind = "member_role_changed".into();
        t.detail_json = r#"{"user_id":"bob","role":"MEMBER_ROLE_ADMIN"}"#.into();
        let v = inbox_entry(&e, false);
        assert_eq!(v["role"], "admin", "{v}");
        assert_eq!(v["user_id"], "bob");
    }

    #[test]
    fn a_recalled_entry_is_a_tombstone() {
        let v = inbox_entry(&message_entry(r#"{"text":"x"}"#, ""), true);
        assert_eq!(v["recalled"], true);
        assert!(v["body"].is_null());
    }
}
