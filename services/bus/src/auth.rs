//! Who may do what on the bus (issue 8, item 7): one NATS user per role, each allowed only
//! the subjects its code uses, and the `authorization`/`tls` blocks of the nats-server
//! configuration that enforce them. A client without credentials is refused.
//!
//! What each role does on NATS, and so what it may do:
//! - gateway: publishes events to its region's sync subjects and waits for the PubAck;
//!   reads its own stream's state (readiness) and single events by sequence (the answer to
//!   a deduplicated retry), and its mirrors' state (mirror health); reads, in each other
//!   region's domain, the state of that region's mirror of its own stream (geo acks); publishes typing frames
//!   to users' ephemeral subjects in any region (a conversation's members may be served by
//!   other regions); sends presence requests to any region and answers those sent to its
//!   own (`allow_responses`: it may publish one reply to a request it received, whichever
//!   region's inbox that is); subscribes to its region's delivery and ephemeral subjects (it
//!   holds the users' WebSockets, and push runs beside it). It may not consume, create,
//!   change or delete streams, publish deliveries, or publish another region's events.
//! - applier: creates and updates its own stream; creates, updates and (to repair one that
//!   is not the right mirror) deletes its region's mirrors of the other regions' streams,
//!   and nothing else; reads any stream and drives durable pull consumers on it (its own,
//!   and the mirrors); acks; publishes deliveries. It may not publish events or delete
//!   its own stream.
//! - region: both, for the process that runs every role over the embedded store (what
//!   `meridian up` runs).
//!
//! Replies (PubAcks, JetStream API answers, pulled events) come to the client's inbox; each
//! role's inbox has its own prefix, so a gateway's credentials cannot read the events pulled
//! by the applier off a shared `_INBOX.>`.
//!
//! Credentials are nkeys: the server configuration holds only public keys, the seed stays in
//! a 0600 file the region file names, and the connection proves it holds the seed by signing
//! the server's nonce, so no secret crosses the wire even without TLS.

use std::path::PathBuf;

use meridian_model::RegionId;
use serde::{Deserialize, Serialize};

use crate::config::{quote, stream_name};

/// Which NATS user a process connects as; decides its permissions and its inbox prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusRole {
    Gateway,
    Applier,
    /// Gateway and applier in one process (the embedded store allows no other split).
    #[default]
    Region,
}

impl BusRole {
    pub const ALL: [BusRole; 3] = [BusRole::Gateway, BusRole::Applier, BusRole::Region];

    pub fn as_str(self) -> &'static str {
        match self {
            BusRole::Gateway => "gateway",
            BusRole::Applier => "applier",
            BusRole::Region => "region",
        }
    }

    fn gateway(self) -> bool {
        matches!(self, BusRole::Gateway | BusRole::Region)
    }

    fn applier(self) -> bool {
        matches!(self, BusRole::Applier | BusRole::Region)
    }

    /// The role a process running the gateway and/or the applier needs.
    pub fn for_roles(gateway: bool, applier: bool) -> BusRole {
        match (gateway, applier) {
            (true, false) => BusRole::Gateway,
            (false, true) => BusRole::Applier,
            _ => BusRole::Region,
        }
    }

    /// Whether a process running the gateway (`gateway`) and/or the applier (`applier`) can
    /// do its work with this role's permissions.
    pub fn covers(self, gateway: bool, applier: bool) -> bool {
        (!gateway || self.gateway()) && (!applier || self.applier())
    }

    /// The inbox prefix of this role's connections: `{prefix}_INBOX.{region}.{role}`.
    pub fn inbox_prefix(self, prefix: &str, region: &RegionId) -> String {
        format!("{prefix}_INBOX.{region}.{}", self.as_str())
    }

    /// The subjects this role may publish to and subscribe to, for `region` under `prefix`
    /// (see the module docs for why each is there), for a region that mirrors no other.
    pub fn permissions(self, prefix: &str, region: &RegionId) -> Permissions {
        self.permissions_with_mirrors(prefix, region, &[])
    }

    /// [`BusRole::permissions`] for a region holding mirrors of `mirrors`' streams
    /// (`BusConfig::mirrors`).
    pub fn permissions_with_mirrors(
        self,
        prefix: &str,
        region: &RegionId,
        mirrors: &[RegionId],
    ) -> Permissions {
        let stream = stream_name(prefix, region);
        let mirror_streams: Vec<String> = mirrors.iter().map(|m| stream_name(prefix, m)).collect();
        let mut publish = Vec::new();
        let mut subscribe = Vec::new();
        let mut allow_responses = false;
        if self.gateway() {
            publish.extend([
                format!("{prefix}sync.{region}.>"),
                format!("{prefix}deliver.*.*.t"),
                format!("{prefix}presence.*"),
                format!("$JS.API.STREAM.INFO.{stream}"),
                format!("$JS.API.STREAM.MSG.GET.{stream}"),
                format!("$JS.API.DIRECT.GET.{stream}"),
                format!("$JS.API.DIRECT.GET.{stream}.>"),
            ]);
            publish.extend(mirror_streams.iter().map(|m| format!("$JS.API.STREAM.INFO.{m}")));
            for (m, mirror_stream) in mirrors.iter().zip(&mirror_streams) {
                publish.extend([
                    // The origin's own view of each mirrored stream, through its domain, for
                    // the mirror's real lag (JetStream's own figure is refreshed too rarely).
                    format!("$JS.{m}.API.STREAM.INFO.{mirror_stream}"),
                    // Geo acks: how far that region's mirror of this region's stream reaches,
                    // asked in its domain (the regions mirror each other).
                    format!("$JS.{m}.API.STREAM.INFO.{stream}"),
                ]);
            }
            subscribe.extend([
                format!("{prefix}deliver.{region}.*.*"),
                format!("{prefix}presence.{region}"),
            ]);
            allow_responses = true;
        }
        if self.applier() {
            publish.extend([
                format!("{prefix}deliver.{region}.*.e"),
                format!("$JS.API.STREAM.CREATE.{stream}"),
                format!("$JS.API.STREAM.UPDATE.{stream}"),
                // Retention: applied events are trimmed from the streams this region holds.
                format!("$JS.API.STREAM.PURGE.{stream}"),
                "$JS.API.STREAM.INFO.*".to_string(),
                "$JS.API.STREAM.MSG.GET.*".to_string(),
                "$JS.API.DIRECT.GET.>".to_string(),
                "$JS.API.CONSUMER.>".to_string(),
                "$JS.ACK.>".to_string(),
            ]);
            for m in &mirror_streams {
                publish.extend([
                    format!("$JS.API.STREAM.CREATE.{m}"),
                    format!("$JS.API.STREAM.UPDATE.{m}"),
                    format!("$JS.API.STREAM.DELETE.{m}"),
                    format!("$JS.API.STREAM.PURGE.{m}"),
                ]);
            }
            // Retention trims this region's stream only as far as every other region's
            // mirror of it reaches, asked in that region's domain.
            publish.extend(
                mirrors
                    .iter()
                    .map(|m| format!("$JS.{m}.API.STREAM.INFO.{stream}")),
            );
        }
        subscribe.push(format!("{}.>", self.inbox_prefix(prefix, region)));
        // The union role lists some subjects twice (the applier's wildcards cover the
        // gateway's single-stream ones); the server does not mind, but a file read by people
        // should not repeat itself.
        let mut seen = std::collections::HashSet::new();
        publish.retain(|s| seen.insert(s.clone()));
        Permissions {
            publish,
            subscribe,
            allow_responses,
        }
    }
}

/// The subjects one user may publish to and subscribe to; everything else is denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May publish one reply to each request it received (to the requester's inbox,
    /// whatever its subject), without a publish permission for it.
    pub allow_responses: bool,
}

/// How a user proves who it is to nats-server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NatsLogin {
    /// An nkey user: the server holds the public key (`U...`), the client the seed.
    Nkey { public_key: String },
    /// A user name and a plain password (the test harness's own user; the password then
    /// sits in the server configuration).
    Password { user: String, password: String },
}

/// One user of the server's `authorization` block. `permissions: None` allows everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsUser {
    pub login: NatsLogin,
    pub permissions: Option<Permissions>,
}

/// TLS for the server's client port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// With a CA, the server also asks clients for a certificate signed by it (mutual TLS).
    pub ca_file: Option<PathBuf>,
}

/// A freshly generated nkey user for `role`: the seed (`SU...`, the client's secret) and the
/// server-side user holding only its public key.
#[derive(Clone)]
pub struct RoleCredentials {
    pub role: BusRole,
    pub prefix: String,
    pub region: RegionId,
    pub seed: String,
    pub user: NatsUser,
}

impl std::fmt::Debug for RoleCredentials {
    // The seed is a secret: never in a log line or a panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleCredentials")
            .field("role", &self.role)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl RoleCredentials {
    /// A new random nkey user with `role`'s permissions for `region` under `prefix`.
    pub fn generate(role: BusRole, prefix: &str, region: &RegionId) -> RoleCredentials {
        Self::generate_with_mirrors(role, prefix, region, &[])
    }

    /// [`RoleCredentials::generate`] for a region holding mirrors of `mirrors`' streams.
    pub fn generate_with_mirrors(
        role: BusRole,
        prefix: &str,
        region: &RegionId,
        mirrors: &[RegionId],
    ) -> RoleCredentials {
        let key = nkeys::KeyPair::new_user();
        let seed = key.seed().expect("a generated key pair has its seed");
        RoleCredentials {
            role,
            prefix: prefix.to_string(),
            region: region.clone(),
            seed,
            user: NatsUser {
                login: NatsLogin::Nkey {
                    public_key: key.public_key(),
                },
                permissions: Some(role.permissions_with_mirrors(prefix, region, mirrors)),
            },
        }
    }
}

/// The `authorization` block for `users` and, when given, the `tls` block: appended to a
/// [`crate::nats_server_config`] text. Empty `users` leaves the server open (no block).
pub fn nats_server_auth_config(users: &[NatsUser], tls: Option<&ServerTls>) -> String {
    let mut out = String::new();
    if !users.is_empty() {
        out.push_str("# Every client must log in as one of these users (nkeys: only public keys here).\n");
        out.push_str("authorization {\n  users = [\n");
        for u in users {
            out.push_str("    {\n");
            match &u.login {
                NatsLogin::Nkey { public_key } => {
                    out.push_str(&format!("      nkey: {}\n", quote(public_key)));
                }
                NatsLogin::Password { user, password } => {
                    out.push_str(&format!("      user: {}\n", quote(user)));
                    out.push_str(&format!("      password: {}\n", quote(password)));
                }
            }
            if let Some(p) = &u.permissions {
                out.push_str("      permissions: {\n");
                out.push_str(&format!("        publish: {{ allow: {} }}\n", list(&p.publish)));
                out.push_str(&format!(
                    "        subscribe: {{ allow: {} }}\n",
                    list(&p.subscribe)
                ));
                if p.allow_responses {
                    out.push_str("        allow_responses: true\n");
                }
                out.push_str("      }\n");
            }
            out.push_str("    }\n");
        }
        out.push_str("  ]\n}\n");
    }
    if let Some(tls) = tls {
        out.push_str("tls {\n");
        out.push_str(&format!(
            "  cert_file: {}\n",
            quote(&tls.cert_file.to_string_lossy())
        ));
        out.push_str(&format!(
            "  key_file: {}\n",
            quote(&tls.key_file.to_string_lossy())
        ));
        if let Some(ca) = &tls.ca_file {
            out.push_str(&format!("  ca_file: {}\n", quote(&ca.to_string_lossy())));
            out.push_str("  verify: true\n");
        }
        // Seconds for the handshake; the default half second is tight on a loaded machine.
        out.push_str("  timeout: 5\n");
        out.push_str("}\n");
    }
    out
}

fn list(subjects: &[String]) -> String {
    let quoted: Vec<String> = subjects.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us() -> RegionId {
        RegionId::parse("us").unwrap()
    }

    #[test]
    fn gateway_publishes_only_its_regions_events_and_typing() {
        let p = BusRole::Gateway.permissions("", &us());
        assert!(p.publish.contains(&"sync.us.>".to_string()));
        assert!(!p
            .publish
            .iter()
            .any(|s| s.contains("sync.eu") || s.ends_with(".e")));
        assert!(!p
            .publish
            .iter()
            .any(|s| s.contains("CONSUMER") || s.contains("CREATE")));
        assert_eq!(
            p.subscribe,
            vec!["deliver.us.*.*", "presence.us", "_INBOX.us.gateway.>"]
        );
    }

    #[test]
    fn item2_gateway_reaches_other_regions_only_for_typing_presence_and_mirror_state() {
        let eu = RegionId::parse("eu").unwrap();
        let ap = RegionId::parse("ap").unwrap();
        let p = BusRole::Gateway.permissions_with_mirrors("t1_", &us(), &[eu.clone(), ap.clone()]);
        for s in [
            "t1_deliver.*.*.t",
            "t1_presence.*",
            "$JS.API.STREAM.INFO.T1_SYNC_EU",
            "$JS.API.STREAM.INFO.T1_SYNC_AP",
        ] {
            assert!(p.publish.contains(&s.to_string()), "{s} in {:?}", p.publish);
        }
        // Its own events only; no deliveries, no stream management, not even of mirrors.
        assert!(!p.publish.iter().any(|s| s.contains("sync.eu")
            || s.ends_with(".e")
            || s.contains("CREATE")
            || s.contains("DELETE")
            || s.contains("CONSUMER")));
        // Presence requests to it are answered; other regions' are not its to read.
        assert!(p.subscribe.contains(&"t1_presence.us".to_string()));
        assert!(!p
            .subscribe
            .iter()
            .any(|s| s.contains("presence.*") || s.contains(".eu")));
        assert!(p.allow_responses);
        assert!(!BusRole::Applier.permissions("", &us()).allow_responses);
    }

    #[test]
    fn item2_applier_manages_exactly_its_mirrors() {
        let eu = RegionId::parse("eu").unwrap();
        let p = BusRole::Applier.permissions_with_mirrors("", &us(), std::slice::from_ref(&eu));
        for s in [
            "$JS.API.STREAM.CREATE.SYNC_EU",
            "$JS.API.STREAM.UPDATE.SYNC_EU",
            "$JS.API.STREAM.DELETE.SYNC_EU",
            "$JS.API.STREAM.CREATE.SYNC_US",
        ] {
            assert!(p.publish.contains(&s.to_string()), "{s}");
        }
        // Its own stream is the region's record: never deleted. No other stream is touched.
        assert!(!p.publish.contains(&"$JS.API.STREAM.DELETE.SYNC_US".to_string()));
        assert!(!p
            .publish
            .iter()
            .any(|s| s.contains('*') && (s.contains("CREATE") || s.contains("DELETE"))));
        // Its deliveries stay in its region; typing is the gateway's.
        assert!(!p
            .publish
            .iter()
            .any(|s| s.contains("deliver.*") || s.ends_with(".t")));
        assert_eq!(
            BusRole::Applier.permissions("", &us()),
            BusRole::Applier.permissions_with_mirrors("", &us(), &[])
        );
    }

    #[test]
    fn region_is_the_union_without_repeats() {
        let p = BusRole::Region.permissions("t1_", &us());
        for s in BusRole::Gateway
            .permissions("t1_", &us())
            .publish
            .iter()
            .chain(&BusRole::Applier.permissions("t1_", &us()).publish)
        {
            assert!(p.publish.contains(s), "{s}");
        }
        let mut sorted = p.publish.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), p.publish.len());
        assert!(p
            .publish
            .contains(&"$JS.API.STREAM.CREATE.T1_SYNC_US".to_string()));
        assert!(BusRole::Region.covers(true, true));
        assert!(!BusRole::Gateway.covers(true, true));
        assert!(BusRole::Applier.covers(false, true));
    }

    #[test]
    fn auth_block_lists_public_keys_and_tls() {
        let creds = RoleCredentials::generate(BusRole::Gateway, "", &us());
        assert!(creds.seed.starts_with("SU"));
        assert!(!format!("{creds:?}").contains(&creds.seed));
        let tls = ServerTls {
            cert_file: "/etc/nats/cert.pem".into(),
            key_file: "/etc/nats/key.pem".into(),
            ca_file: Some("/etc/nats/ca.pem".into()),
        };
        let text = nats_server_auth_config(std::slice::from_ref(&creds.user), Some(&tls));
        let NatsLogin::Nkey { public_key } = &creds.user.login else {
            panic!("an nkey user")
        };
        assert!(text.contains(&format!("nkey: \"{public_key}\"")));
        assert!(!text.contains(&creds.seed));
        assert!(text.contains(r#"publish: { allow: ["sync.us.>", "#));
        assert!(text.contains("        allow_responses: true\n"));
        assert!(text.contains(r#"ca_file: "/etc/nats/ca.pem""#) && text.contains("verify: true"));
        assert_eq!(nats_server_auth_config(&[], None), "");
    }
}
