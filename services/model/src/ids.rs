//! Validated identifiers. Constructors check the docs/api.md §2 rules once, at the edge, so the
//! rest of the system can take a `UserId` on trust.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::ModelError;

fn check_token(field: &'static str, s: &str, max: usize) -> Result<(), ModelError> {
    if s.is_empty() || s.len() > max {
        return Err(ModelError::invalid(field, format!("must be 1-{max} characters")));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(ModelError::invalid(field, "may only contain [A-Za-z0-9_.-]"));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $field:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<Self, ModelError> {
                let s = s.into();
                ($check)(&s)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl TryFrom<String> for $name {
            type Error = ModelError;
            fn try_from(s: String) -> Result<Self, ModelError> {
                Self::parse(s)
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// A user: 1-64 characters of `[A-Za-z0-9_.-]` (docs/api.md §2).
    UserId, "user_id", |s: &str| check_token("user_id", s, 64)
);
string_id!(
    /// One of a user's devices; same alphabet as user ids.
    DeviceId, "device_id", |s: &str| check_token("device_id", s, 64)
);
string_id!(
    /// A region name: 1-32 characters of `[a-z0-9-]`. It never contains a zero byte, which
    /// the order-key encoding relies on as a terminator.
    RegionId, "region", |s: &str| {
        if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            Err(ModelError::invalid("region", "must be 1-32 characters of [a-z0-9-]"))
        } else {
            Ok(())
        }
    }
);
string_id!(
    /// A conversation: `d_` + 32 hex digits for direct conversations (derived from the two
    /// members, so concurrent creation in two regions meets), `g_` + 32 hex digits for groups.
    ConversationId, "conversation_id", |s: &str| {
        let ok = s.len() == 34
            && (s.starts_with("d_") || s.starts_with("g_"))
            && s[2..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok { Ok(()) } else { Err(ModelError::invalid("conversation_id", "unknown conversation id format")) }
    }
);

impl ConversationId {
    /// The id of the direct conversation between `a` and `b`, the same whichever of them asks.
    pub fn direct(a: &UserId, b: &UserId) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut h = Sha256::new();
        h.update(b"meridian/direct\0");
        h.update(lo.as_str());
        h.update(b"\0");
        h.update(hi.as_str());
        let digest = h.finalize();
        let mut s = String::with_capacity(34);
        s.push_str("d_");
        for b in &digest[..16] {
            s.push_str(&format!("{b:02x}"));
        }
        Self(s)
    }

    /// A fresh group id.
    pub fn new_group() -> Self {
        Self(format!("g_{}", Uuid::now_v7().simple()))
    }

    pub fn is_direct(&self) -> bool {
        self.0.starts_with("d_")
    }
}

/// An event id, which is also the id of the message a `MessageSent` event creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(Uuid);

impl EventId {
    /// A fresh time-ordered id (UUIDv7).
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id of the message `sender` sends into `conversation` with `client_msg_id`: a
    /// UUIDv8 over the three (the idempotency key), so a retry, however late, carries the
    /// same id and is caught by JetStream's duplicate window and by the applier's record of
    /// applied events, while the same `client_msg_id` in another conversation is another
    /// message.
    pub fn for_message(sender: &UserId, conversation: &ConversationId, client_msg_id: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"meridian/message/2\0");
        h.update(sender.as_str());
        h.update(b"\0");
        h.update(conversation.as_str());
        h.update(b"\0");
        h.update(client_msg_id.as_bytes());
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        Self(uuid::Builder::from_custom_bytes(b).into_uuid())
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, ModelError> {
        let arr: [u8; 16] = b
            .try_into()
            .map_err(|_| ModelError::invalid("event_id", "must be 16 bytes"))?;
        Ok(Self(Uuid::from_bytes(arr)))
    }

    pub fn parse(s: &str) -> Result<Self, ModelError> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| ModelError::invalid("message_id", "not a valid id"))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_follow_the_api_rules() {
        assert!(UserId::parse("ann.b-c_9").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a".repeat(65)).is_err());
        assert!(UserId::parse("a".repeat(64)).is_ok());
        assert!(UserId::parse("ann bob").is_err());
        assert!(UserId::parse("ann/bob").is_err());
        assert_eq!(UserId::parse("x y").unwrap_err().field(), "user_id");
    }

    #[test]
    fn direct_ids_do_not_depend_on_who_asks() {
        let a = UserId::parse("ann").unwrap();
        let b = UserId::parse("bob").unwrap();
        let c = UserId::parse("cat").unwrap();
        assert_eq!(ConversationId::direct(&a, &b), ConversationId::direct(&b, &a));
        assert_ne!(ConversationId::direct(&a, &b), ConversationId::direct(&a, &c));
        let id = ConversationId::direct(&a, &b);
        assert!(id.is_direct());
        assert_eq!(ConversationId::parse(id.as_str()).unwrap(), id);
        assert!(!ConversationId::new_group().is_direct());
        assert!(ConversationId::parse("g_zz").is_err());
    }

    #[test]
    fn message_event_ids_are_derived_from_sender_conversation_and_client_msg_id() {
        let a = UserId::parse("ann").unwrap();
        let b = UserId::parse("bob").unwrap();
        let g = ConversationId::new_group();
        let h = ConversationId::new_group();
        assert_eq!(
            EventId::for_message(&a, &g, "m1"),
            EventId::for_message(&a, &g, "m1")
        );
        assert_ne!(
            EventId::for_message(&a, &g, "m1"),
            EventId::for_message(&b, &g, "m1")
        );
        assert_ne!(
            EventId::for_message(&a, &g, "m1"),
            EventId::for_message(&a, &g, "m2")
        );
        assert_ne!(
            EventId::for_message(&a, &g, "m1"),
            EventId::for_message(&a, &h, "m1")
        );
        let id = EventId::new_v7();
        assert_eq!(EventId::parse(&id.to_string()).unwrap(), id);
        assert_eq!(EventId::from_bytes(id.as_bytes()).unwrap(), id);
    }

    #[test]
    fn regions_exclude_the_terminator_byte() {
        assert!(RegionId::parse("us-east-1").is_ok());
        assert!(RegionId::parse("US").is_err());
        assert!(RegionId::parse("u\0s").is_err());
    }
}
