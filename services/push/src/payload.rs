//! What a notification says, and the request bodies each provider gets. Pure functions, so
//! the wire formats are unit-tested without a server.
//!
//! No message text ever leaves in a push (provider logs, lock screens, relays): the payload
//! names the inbox seq, and the app pulls `GET /v1/sync` to learn what happened.

use serde_json::{json, Value};

/// Entry kinds worth a visible alert. Everything else (a recall, a member change, a rename)
/// only needs the app to sync, so it goes out as a silent background push: an alert saying
/// "New message" for a recall would be wrong, and silence is what APNs and FCM expect for
/// "content changed, refresh".
const ALERT_KINDS: &[&str] = &["message", "conversation_advanced"];

/// One device's notification for one inbox entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub user_id: String,
    pub device_id: String,
    /// The provider's address for the device, as registered.
    pub token: String,
    /// `webhook`, `apns` or `fcm`.
    pub platform: String,
    /// The inbox seq: the app pulls up to here before showing anything.
    pub seq: u64,
    pub conversation_id: String,
    /// The entry's kind (`message`, `recall`, `member_added`, ...).
    pub kind: String,
    /// Who caused the entry (the sender of a message).
    pub sender: String,
    /// When it happened: the event's HLC physical time, ms since the epoch.
    pub sent_at: u64,
    /// The alert title: the sender's display name, or their id.
    pub title: String,
}

impl Notification {
    /// A visible alert, or a silent "please sync" push (see `ALERT_KINDS`).
    pub fn is_alert(&self) -> bool {
        ALERT_KINDS.contains(&self.kind.as_str())
    }

    /// The alert's text. Fixed strings, never content.
    pub fn alert_body(&self) -> &'static str {
        match self.kind.as_str() {
            "conversation_advanced" => "New messages",
            _ => "New message",
        }
    }
}

/// The webhook's JSON: everything a relay needs to reach the device and nothing of the
/// message itself.
pub fn webhook_body(n: &Notification) -> Value {
    json!({
        "user_id": n.user_id,
        "device_id": n.device_id,
        "token": n.token,
        "platform": n.platform,
        "seq": n.seq,
        "conversation_id": n.conversation_id,
        "kind": n.kind,
        "sender": n.sender,
        "sent_at": n.sent_at,
    })
}

/// The APNs request body. An alert has `mutable-content` so a notification service
/// extension can pull and fill in the real text; `thread-id` groups a conversation's
/// alerts. A silent push is `content-available` only (it must carry no alert, sound or
/// badge, and is sent with `apns-push-type: background` and priority 5).
pub fn apns_body(n: &Notification) -> Value {
    let aps = if n.is_alert() {
        json!({
            "alert": {"title": n.title, "body": n.alert_body()},
            "mutable-content": 1,
            "thread-id": n.conversation_id,
        })
    } else {
        json!({"content-available": 1})
    };
    json!({
        "aps": aps,
        "seq": n.seq,
        "conversation_id": n.conversation_id,
        "kind": n.kind,
    })
}

/// The APNs headers that depend on the notification: (`apns-push-type`, `apns-priority`).
pub(crate) fn apns_kind_headers(n: &Notification) -> (&'static str, &'static str) {
    if n.is_alert() {
        ("alert", "10")
    } else {
        // Apple requires priority 5 for background pushes.
        ("background", "5")
    }
}

/// The FCM HTTP v1 `messages:send` body. `data` values must be strings in FCM. An alert
/// has a `notification` block and high Android priority (a chat message should wake the
/// device); a silent push is data-only, which the app handles in the background.
pub fn fcm_body(n: &Notification) -> Value {
    let mut message = json!({
        "token": n.token,
        "data": {
            "seq": n.seq.to_string(),
            "conversation_id": n.conversation_id,
            "kind": n.kind,
        },
    });
    if n.is_alert() {
        message["notification"] = json!({"title": n.title, "body": n.alert_body()});
        message["android"] = json!({"priority": "HIGH"});
    }
    json!({ "message": message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: &str) -> Notification {
        Notification {
            user_id: "bob".into(),
            device_id: "phone".into(),
            token: "abc123".into(),
            platform: "webhook".into(),
            seq: 42,
            conversation_id: "d_0123456789abcdef0123456789abcdef".into(),
            kind: kind.into(),
            sender: "ann".into(),
            sent_at: 1_700_000_000_000,
            title: "Ann".into(),
        }
    }

    #[test]
    fn webhook_body_has_exactly_the_documented_fields() {
        let body = webhook_body(&sample("message"));
        assert_eq!(
            body,
            json!({
                "user_id": "bob", "device_id": "phone", "token": "abc123", "platform": "webhook",
                "seq": 42, "conversation_id": "d_0123456789abcdef0123456789abcdef",
                "kind": "message", "sender": "ann", "sent_at": 1_700_000_000_000u64,
            })
        );
    }

    #[test]
    fn apns_alert_and_silent_bodies() {
        let n = sample("message");
        let body = apns_body(&n);
        assert_eq!(body["aps"]["alert"]["title"], "Ann");
        assert_eq!(body["aps"]["alert"]["body"], "New message");
        assert_eq!(body["aps"]["mutable-content"], 1);
        assert_eq!(body["seq"], 42);
        assert_eq!(body["conversation_id"], n.conversation_id.as_str());
        assert_eq!(apns_kind_headers(&n), ("alert", "10"));

        let n = sample("recall");
        let body = apns_body(&n);
        assert_eq!(body["aps"], json!({"content-available": 1}));
        assert_eq!(body["kind"], "recall");
        assert_eq!(apns_kind_headers(&n), ("background", "5"));

        assert_eq!(
            apns_body(&sample("conversation_advanced"))["aps"]["alert"]["body"],
            "New messages"
        );
    }

    #[test]
    fn fcm_alert_and_silent_bodies() {
        let body = fcm_body(&sample("message"));
        let m = &body["message"];
        assert_eq!(m["token"], "abc123");
        assert_eq!(
            m["data"],
            json!({"seq": "42", "conversation_id": "d_0123456789abcdef0123456789abcdef", "kind": "message"})
        );
        assert_eq!(m["notification"], json!({"title": "Ann", "body": "New message"}));

        let body = fcm_body(&sample("member_removed"));
        assert!(body["message"].get("notification").is_none());
        assert_eq!(body["message"]["data"]["seq"], "42");
    }

    #[test]
    fn no_payload_carries_the_message_text() {
        // The body text is not even an input; make sure no builder invents content fields.
        let n = sample("message");
        for v in [webhook_body(&n), apns_body(&n), fcm_body(&n)] {
            let text = v.to_string();
            assert!(!text.contains("\"text\""), "{text}");
            assert!(!text.contains("body_json"), "{text}");
        }
    }
}
