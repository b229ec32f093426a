//! Bus configuration and the nats-server configuration the launcher and tests write.

use std::path::PathBuf;

use async_nats::ServerAddr;
use meridian_model::RegionId;
use serde::{Deserialize, Serialize};

use crate::auth::BusRole;
use crate::BusError;

/// How durable an acknowledged send is (docs/design.md §6), weakest first: each level
/// promises what the one before it does and more.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acked once the region's JetStream holds the event; JetStream writes it to its files
    /// before acking but fsyncs lazily (every 2 minutes by default), so it survives any
    /// process crash, not a power loss.
    #[default]
    Process,
    /// Acked only after an fsync. This is a server setting (`jetstream { sync_interval:
    /// always }`), not a stream or publish option, which is why it lives in
    /// [`nats_server_config`]. Publishing atomic batches ([`crate::Bus::publish_batch`])
    /// lets one fsync cover many events.
    Disk,
    /// Acked once another region's mirror also holds the event (the gateway waits for it);
    /// survives losing the whole region. As a deployment's level its servers also fsync
    /// before acking, as under `Disk`.
    Geo,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Process => "process",
            Durability::Disk => "disk",
            Durability::Geo => "geo",
        }
    }

    /// Whether a region's nats-server at this level fsyncs before every ack.
    pub fn fsyncs(self) -> bool {
        self >= Durability::Disk
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "process" => Ok(Durability::Process),
            "disk" => Ok(Durability::Disk),
            "geo" => Ok(Durability::Geo),
            other => Err(format!("unknown durability {other:?}: one of process, disk, geo")),
        }
    }
}

/// One region's nats-server: what [`nats_server_config`] renders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsServerSpec {
    /// JetStream's file store (kept across restarts: it is the region's durable record).
    pub store_dir: PathBuf,
    /// Client port, on loopback.
    pub port: u16,
    pub durability: Durability,
    /// Unique among every server the hub links (leafnodes refuse a second server of the
    /// same name).
    pub server_name: String,
    /// The region's JetStream domain (by convention its region id, see
    /// [`BusConfig::domain`]): other regions reach this JetStream as `$JS.<domain>.API`.
    /// Empty: no domain, for a server that is not linked to other regions.
    pub domain: String,
    /// Leafnode connections this server makes to the hub (none for a lone region).
    pub leaf_remotes: Vec<LeafRemote>,
}

/// A leafnode connection a region's server makes to the hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafRemote {
    /// `nats-leaf://user:password@host:port`: the hub's leafnode port and this region's
    /// leaf user there (see [`HubSpec::leaf_users`]).
    pub url: String,
}

/// Renders the nats-server configuration for one region's server: client port on loopback,
/// JetStream with its file store under `store_dir` and its domain, for
/// [`Durability::Disk`] an fsync before every ack, and a leafnode remote to the hub.
///
/// The leaf link needs nothing else (measured with nats-server 2.15.1): the link binds to
/// the server's global account, the one the `authorization` users of [`crate::auth`] live
/// in, so the other regions' JetStream APIs (`$JS.<domain>.API.>`), the deliver and
/// flow-control subjects of mirrors, and the cross-region core subjects (typing, presence)
/// all cross it, while the server keeps its own `$JS.API.>` to itself because the domains
/// differ. What a local client may publish is still decided by its user's permissions.
pub fn nats_server_config(spec: &NatsServerSpec) -> String {
    let mut out = String::new();
    out.push_str("# Written by Meridian (meridian_bus::nats_server_config); regenerate rather than edit.\n");
    out.push_str(&format!("server_name: {}\n", quote(&spec.server_name)));
    out.push_str("host: \"127.0.0.1\"\n");
    out.push_str(&format!("port: {}\n", spec.port));
    out.push_str("jetstream {\n");
    out.push_str(&format!(
        "  store_dir: {}\n",
        quote(&spec.store_dir.to_string_lossy())
    ));
    if !spec.domain.is_empty() {
        out.push_str(&format!("  domain: {}\n", quote(&spec.domain)));
    }
    if spec.durability.fsyncs() {
        out.push_str(&format!(
            "  # durability={}: fsync every write before the PubAck goes out.\n",
            spec.durability
        ));
        out.push_str("  sync_interval: always\n");
    }
    out.push_str("}\n");
    if !spec.leaf_remotes.is_empty() {
        out.push_str("# The link to the other regions: a leafnode of the hub.\n");
        out.push_str("leafnodes {\n  remotes = [\n");
        for remote in &spec.leaf_remotes {
            out.push_str(&format!("    {{ url: {} }}\n", quote(&remote.url)));
        }
        out.push_str("  ]\n}\n");
    }
    out
}

/// The hub: a nats-server without JetStream that the regions' servers connect to as
/// leafnodes; what [`nats_hub_config`] renders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSpec {
    pub server_name: String,
    /// Client port, on loopback. The hub serves no clients: the port only takes the leaf
    /// users' logins (for inspection), nobody anonymous.
    pub port: u16,
    /// The leafnode port the regions' servers connect to, on loopback.
    pub leaf_port: u16,
    /// (user, password) per region's leaf connection.
    pub leaf_users: Vec<(String, String)>,
}

/// Renders the hub's configuration: no JetStream, a `leafnodes { listen }` block that
/// accepts exactly `leaf_users`. The leaf users carry no permissions: the hub only relays
/// between the regions' servers, each of which decides what its own clients may publish.
pub fn nats_hub_config(spec: &HubSpec) -> String {
    let users = |indent: &str| {
        let mut s = String::new();
        for (user, password) in &spec.leaf_users {
            s.push_str(&format!(
                "{indent}{{ user: {}, password: {} }}\n",
                quote(user),
                quote(password)
            ));
        }
        s
    };
    let mut out = String::new();
    out.push_str("# Written by Meridian (meridian_bus::nats_hub_config); regenerate rather than edit.\n");
    out.push_str("# The hub links the regions' servers (leafnodes); it has no JetStream of its own.\n");
    out.push_str(&format!("server_name: {}\n", quote(&spec.server_name)));
    out.push_str("host: \"127.0.0.1\"\n");
    out.push_str(&format!("port: {}\n", spec.port));
    if !spec.leaf_users.is_empty() {
        // Without this block the client port would take anyone, who could then publish into
        // every region through the links.
        out.push_str("authorization {\n  users = [\n");
        out.push_str(&users("    "));
        out.push_str("  ]\n}\n");
    }
    out.push_str("leafnodes {\n");
    out.push_str("  host: \"127.0.0.1\"\n");
    out.push_str(&format!("  port: {}\n", spec.leaf_port));
    // Without it the hub tells each leafnode its own leafnode URL, and a remote that lost
    // its connection reconnects there directly, around the WAN link it was configured to
    // dial: delay, loss and cuts of that link would then stop applying after any reconnect.
    out.push_str("  no_advertise: true\n");
    if !spec.leaf_users.is_empty() {
        out.push_str("  authorization {\n    users = [\n");
        out.push_str(&users("      "));
        out.push_str("    ]\n  }\n");
    }
    out.push_str("}\n");
    out
}

/// A double-quoted nats-server config string (the format takes JSON-style escapes).
pub(crate) fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// How a role reaches its region's JetStream.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// e.g. "nats://127.0.0.1:4222"; the servers of one cluster comma-separated (the client
    /// tries them in turn). `tls://` requires TLS. A URL may carry `user:password@` (the test
    /// harness's login); production uses `nkey_seed_file`, which keeps the secret out of
    /// this file.
    pub nats_url: String,
    /// The region this process belongs to: it publishes to `SYNC_<region>` only.
    pub region: RegionId,
    /// The region's JetStream domain; unset: the region id, which is what other regions
    /// assume when they mirror this one (`$JS.<region>.API`), so set it only for a server
    /// that no other region mirrors under that name. Only `[A-Za-z0-9_-]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The other regions whose streams this region holds a mirror of (and applies), each
    /// named like its origin ([`BusConfig::stream_name`]). Empty: a region on its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<RegionId>,
    /// Prepended to stream names and subjects: "" in production, unique per test so tests
    /// can share one server without seeing each other. Only `[A-Za-z0-9_]`.
    #[serde(default)]
    pub prefix: String,
    /// JetStream's duplicate window: a retried publish with the same event id inside it is
    /// dropped by the server. At least 120 s, so a publisher retrying through a NATS restart
    /// (bounded by `publish_timeout_s`) stays inside it.
    #[serde(default = "default_duplicate_window_s")]
    pub duplicate_window_s: u64,
    /// How long the stream keeps events. Mirrors and a restarted applier catch up from it.
    #[serde(default = "default_max_age_s")]
    pub max_age_s: u64,
    /// Size cap of the stream in bytes; -1 for none.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: i64,
    /// How long a publish keeps retrying through a NATS outage before it gives up with
    /// [`BusError::Unavailable`]; also bounds the initial connect.
    #[serde(default = "default_publish_timeout_s")]
    pub publish_timeout_s: u64,
    /// Which NATS user this process is (see [`crate::auth`]): its credentials must be that
    /// role's, and it sets the inbox prefix those permissions allow. Unset: what the process
    /// runs (`meridian gateway`: gateway, `meridian applier`: applier, else region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<BusRole>,
    /// A file holding the nkey seed (`SU...`) of this process's NATS user; `meridian up`
    /// writes one per region (mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<PathBuf>,
    /// Or the name of an environment variable holding that seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_seed_env: Option<String>,
    /// PEM CA certificates to verify the servers with; setting it requires TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (mutual TLS); needs
    /// `tls_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

/// What a connection logs in with, resolved from a [`BusConfig`] (files and variables read).
pub(crate) struct Login {
    pub(crate) servers: Vec<ServerAddr>,
    pub(crate) user_password: Option<(String, String)>,
    pub(crate) nkey_seed: Option<String>,
}

fn default_duplicate_window_s() -> u64 {
    300
}
fn default_max_age_s() -> u64 {
    30 * 24 * 3600
}
fn default_max_bytes() -> i64 {
    -1
}
fn default_publish_timeout_s() -> u64 {
    30
}

/// JetStream rejects a duplicate window longer than the stream's max age.
const MIN_DUPLICATE_WINDOW_S: u64 = 120;

impl BusConfig {
    pub fn new(nats_url: impl Into<String>, region: RegionId) -> Self {
        Self {
            nats_url: nats_url.into(),
            region,
            domain: None,
            mirrors: Vec::new(),
            prefix: String::new(),
            duplicate_window_s: default_duplicate_window_s(),
            max_age_s: default_max_age_s(),
            max_bytes: default_max_bytes(),
            publish_timeout_s: default_publish_timeout_s(),
            role: None,
            nkey_seed_file: None,
            nkey_seed_env: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }

    /// Checks every field; the error names the first bad one. Reads the credential and TLS
    /// files it names, so a missing or wrong one fails here rather than at the first
    /// connect.
    pub fn validate(&self) -> Result<(), BusError> {
        self.login()?;
        for (field, path) in [
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    return Err(BusError::config(
                        field,
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(BusError::config("tls_key_file", "is required with tls_cert_file"))
            }
            (None, Some(_)) => {
                return Err(BusError::config("tls_cert_file", "is required with tls_key_file"))
            }
            _ => {}
        }
        if !self
            .prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(BusError::config("prefix", "may only contain [A-Za-z0-9_]"));
        }
        if let Some(domain) = &self.domain {
            if domain.is_empty()
                || !domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(BusError::config(
                    "domain",
                    "must be 1 or more characters of [A-Za-z0-9_-] (it is a subject token)",
                ));
            }
        }
        for (i, mirror) in self.mirrors.iter().enumerate() {
            if *mirror == self.region {
                return Err(BusError::config(
                    "mirrors",
                    format!("lists this region ({mirror}): its own stream is not a mirror"),
                ));
            }
            if self.mirrors[..i].contains(mirror) {
                return Err(BusError::config("mirrors", format!("lists {mirror} twice")));
            }
        }
        if self.duplicate_window_s < MIN_DUPLICATE_WINDOW_S {
            return Err(BusError::config(
                "duplicate_window_s",
                format!("must be at least {MIN_DUPLICATE_WINDOW_S} (retries through a NATS restart must stay inside it)"),
            ));
        }
        if self.max_age_s == 0 {
            return Err(BusError::config("max_age_s", "must be positive"));
        }
        if self.max_age_s < self.duplicate_window_s {
            return Err(BusError::config(
                "max_age_s",
                "must be at least duplicate_window_s (JetStream rejects a longer window)",
            ));
        }
        if self.max_bytes == 0 || self.max_bytes < -1 {
            return Err(BusError::config(
                "max_bytes",
                "must be positive, or -1 for no limit",
            ));
        }
        if self.publish_timeout_s == 0 {
            return Err(BusError::config("publish_timeout_s", "must be positive"));
        }
        if self.publish_timeout_s >= self.duplicate_window_s {
            return Err(BusError::config(
                "publish_timeout_s",
                "must be shorter than duplicate_window_s, or a late retry could be stored twice",
            ));
        }
        Ok(())
    }

    /// The server list and the login, with the seed read and checked. Errors name the field.
    pub(crate) fn login(&self) -> Result<Login, BusError> {
        let mut servers = Vec::new();
        let mut user_password: Option<(String, String)> = None;
        for part in self.nats_url.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let addr: ServerAddr = part
                .parse()
                .map_err(|e| BusError::config("nats_url", format!("{}: {e}", redact(part))))?;
            let mut url = addr.into_inner();
            if !url.username().is_empty() {
                let login = (
                    url.username().to_string(),
                    url.password().unwrap_or_default().to_string(),
                );
                if user_password.as_ref().is_some_and(|l| *l != login) {
                    return Err(BusError::config(
                        "nats_url",
                        "the servers carry different user:password logins",
                    ));
                }
                user_password = Some(login);
                // Only the client's CONNECT carries the login; the address stays clean.
                let _ = url.set_username("");
                let _ = url.set_password(None);
            }
            servers.push(ServerAddr::from_url(url).map_err(|e| BusError::config("nats_url", e.to_string()))?);
        }
        if servers.is_empty() {
            return Err(BusError::config("nats_url", "must name at least one server"));
        }
        let seed = match (&self.nkey_seed_file, &self.nkey_seed_env) {
            (Some(_), Some(_)) => {
                return Err(BusError::config(
                    "nkey_seed_env",
                    "set either nkey_seed_file or nkey_seed_env, not both",
                ))
            }
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    BusError::config("nkey_seed_file", format!("cannot read {}: {e}", path.display()))
                })?;
                Some(("nkey_seed_file", text.trim().to_string()))
            }
            (None, Some(var)) => {
                let text = std::env::var(var)
                    .map_err(|e| BusError::config("nkey_seed_env", format!("variable {var}: {e}")))?;
                Some(("nkey_seed_env", text.trim().to_string()))
            }
            (None, None) => None,
        };
        let nkey_seed = match seed {
            Some((field, seed)) => {
                // Never the seed itself in the message: it is the secret.
                let key = nkeys::KeyPair::from_seed(&seed)
                    .map_err(|_| BusError::config(field, "does not hold an nkey seed (SU...)"))?;
                if key.key_pair_type() != nkeys::KeyPairType::User {
                    return Err(BusError::config(
                        field,
                        "holds an nkey seed that is not a user's (SU...)",
                    ));
                }
                if user_password.is_some() {
                    return Err(BusError::config(
                        field,
                        "is set and nats_url carries user:password; log in one way",
                    ));
                }
                Some(seed)
            }
            None => None,
        };
        Ok(Login {
            servers,
            user_password,
            nkey_seed,
        })
    }

    /// `nats_url` without any password, for logs and errors.
    pub fn redacted_url(&self) -> String {
        self.nats_url
            .split(',')
            .map(|p| redact(p.trim()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The role this process logs in as: `role`, or `region` when unset.
    pub fn role(&self) -> BusRole {
        self.role.unwrap_or_default()
    }

    /// This process's inbox prefix (see [`BusRole::inbox_prefix`]).
    pub fn inbox_prefix(&self) -> String {
        self.role().inbox_prefix(&self.prefix, &self.region)
    }

    /// The stream `region` publishes to: `{PREFIX}SYNC_{REGION}`, upper-cased with '-' as
    /// '_' (stream names may not contain '.', and upper case keeps them apart from subjects).
    pub fn stream_name(&self, region: &RegionId) -> String {
        stream_name(&self.prefix, region)
    }

    /// This region's JetStream domain: `domain`, or the region id.
    pub fn domain(&self) -> String {
        self.domain.clone().unwrap_or_else(|| self.region.to_string())
    }

    /// The JetStream API prefix of `region`'s domain as seen across the leafnode links
    /// (`$JS.<region>.API`): what a mirror of `region`'s stream names as its `external.api`.
    /// Another region's domain is its region id (see `domain`).
    pub fn domain_api(&self, region: &RegionId) -> String {
        format!("$JS.{region}.API")
    }

    /// Subjects `region`'s stream captures.
    pub fn stream_subjects(&self, region: &RegionId) -> String {
        format!("{}sync.{}.>", self.prefix, region)
    }

    /// The subject events of `region` are published on.
    pub fn events_subject(&self, region: &RegionId) -> String {
        format!("{}sync.{}.events", self.prefix, region)
    }
}

/// `url` with the password of a `user:password@` replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

/// See [`BusConfig::stream_name`].
pub(crate) fn stream_name(prefix: &str, region: &RegionId) -> String {
    format!("{prefix}SYNC_{region}").to_uppercase().replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BusConfig {
        BusConfig::new("nats://127.0.0.1:4222", RegionId::parse("us-east-1").unwrap())
    }

    #[test]
    fn defaults_validate_and_name_the_stream() {
        let c = cfg();
        c.validate().unwrap();
        assert_eq!(c.stream_name(&c.region), "SYNC_US_EAST_1");
        let mut p = cfg();
        p.prefix = "t1x2_".into();
        assert_eq!(p.stream_name(&p.region), "T1X2_SYNC_US_EAST_1");
        assert_eq!(p.events_subject(&p.region), "t1x2_sync.us-east-1.events");
    }

    #[test]
    fn validation_names_the_field() {
        let field = |c: BusConfig| match c.validate() {
            Err(BusError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        let mut c = cfg();
        c.duplicate_window_s = 119;
        assert_eq!(field(c), "duplicate_window_s");
        let mut c = cfg();
        c.prefix = "a.b".into();
        assert_eq!(field(c), "prefix");
        let mut c = cfg();
        c.max_bytes = 0;
        assert_eq!(field(c), "max_bytes");
        let mut c = cfg();
        c.publish_timeout_s = 0;
        assert_eq!(field(c), "publish_timeout_s");
        let mut c = cfg();
        c.nats_url = " ".into();
        assert_eq!(field(c), "nats_url");
    }

    #[test]
    fn credential_and_tls_fields_are_checked_by_name() {
        let field = |c: &BusConfig| match c.validate() {
            Err(BusError::Config { field, reason }) => (field, reason),
            other => panic!("expected a config error, got {other:?}"),
        };
        let existing = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        let missing = PathBuf::from("/nonexistent/meridian/file.pem");
        let mut c = cfg();
        c.tls_ca_file = Some(missing.clone());
        assert_eq!(field(&c).0, "tls_ca_file");
        let mut c = cfg();
        c.tls_cert_file = Some(existing.clone());
        assert_eq!(field(&c).0, "tls_key_file");
        c.tls_key_file = Some(missing.clone());
        assert_eq!(field(&c).0, "tls_key_file");
        let mut c = cfg();
        c.tls_key_file = Some(existing.clone());
        assert_eq!(field(&c).0, "tls_cert_file");

        let mut c = cfg();
        c.nkey_seed_file = Some(missing);
        assert_eq!(field(&c).0, "nkey_seed_file");
        c.nkey_seed_env = Some("MERIDIAN_TEST_NO_SUCH_SEED_VARIABLE".into());
        assert_eq!(field(&c).0, "nkey_seed_env", "both set");
        c.nkey_seed_file = None;
        assert_eq!(field(&c).0, "nkey_seed_env", "variable unset");

        let dir = std::env::temp_dir().join(format!("meridian-bus-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_a_seed = dir.join("not-a-seed.nk");
        std::fs::write(&not_a_seed, "SUPER-SECRET-BUT-NOT-A-SEED").unwrap();
        let mut c = cfg();
        c.nkey_seed_file = Some(not_a_seed);
        let (f, reason) = field(&c);
        assert_eq!(f, "nkey_seed_file");
        assert!(
            !reason.contains("SUPER-SECRET"),
            "the file's text is not echoed: {reason}"
        );
        let account = dir.join("account.nk");
        std::fs::write(&account, nkeys::KeyPair::new_account().seed().unwrap()).unwrap();
        c.nkey_seed_file = Some(account);
        assert_eq!(field(&c).0, "nkey_seed_file", "not a user seed");
        let user = dir.join("user.nk");
        std::fs::write(&user, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
        c.nkey_seed_file = Some(user);
        c.validate().unwrap();
        c.nats_url = "nats://ann:pw@127.0.0.1:4222".into();
        assert_eq!(field(&c).0, "nkey_seed_file", "two logins");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn server_lists_and_url_logins_are_split() {
        let mut c = cfg();
        c.nats_url = "nats://a.internal:4222, nats://meridian:s3cret@b.internal:4222,tls://c:4443".into();
        let login = c.login().unwrap();
        let servers: Vec<&str> = login.servers.iter().map(|s| s.as_url_str()).collect();
        assert_eq!(
            servers,
            ["nats://a.internal:4222", "nats://b.internal:4222", "tls://c:4443"]
        );
        assert_eq!(
            login.user_password,
            Some(("meridian".to_string(), "s3cret".to_string()))
        );
        let shown = c.redacted_url();
        assert!(
            shown.contains("meridian:***@b.internal") && !shown.contains("s3cret"),
            "{shown}"
        );
        c.nats_url = "nats://a:1@x:1,nats://b:2@y:2".into();
        assert!(matches!(
            c.validate(),
            Err(BusError::Config {
                field: "nats_url",
                ..
            })
        ));
        c.nats_url = "http://a:4222".into();
        assert!(matches!(
            c.validate(),
            Err(BusError::Config {
                field: "nats_url",
                ..
            })
        ));
    }

    #[test]
    fn deserializes_with_defaults() {
        let c: BusConfig = serde_json::from_str(r#"{"nats_url":"nats://x:1","region":"eu"}"#).unwrap();
        assert_eq!(c.duplicate_window_s, 300);
        assert_eq!(c.publish_timeout_s, 30);
        assert_eq!(c.max_bytes, -1);
        assert_eq!(c.prefix, "");
        let d: Durability = serde_json::from_str(r#""disk""#).unwrap();
        assert_eq!(d, Durability::Disk);
        assert_eq!(c.role, None);
        let typo = serde_json::from_str::<BusConfig>(
            r#"{"nats_url":"nats://x:1","region":"eu","nkey_seed_fil":"/x"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(typo.contains("nkey_seed_fil"), "{typo}");
        let role: BusConfig =
            serde_json::from_str(r#"{"nats_url":"nats://x:1","region":"eu","role":"gateway"}"#).unwrap();
        assert_eq!(role.role(), BusRole::Gateway);
    }

    #[test]
    fn server_config_turns_on_fsync_for_disk() {
        let spec = |durability| NatsServerSpec {
            store_dir: "/tmp/js \"x\"".into(),
            port: 4333,
            durability,
            server_name: "eu".into(),
            domain: String::new(),
            leaf_remotes: Vec::new(),
        };
        let process = nats_server_config(&spec(Durability::Process));
        assert!(process.contains("port: 4333"));
        assert!(process.contains(r#"store_dir: "/tmp/js \"x\"""#));
        assert!(!process.contains("sync_interval"));
        assert!(!process.contains("domain") && !process.contains("leafnodes"));
        let disk = nats_server_config(&spec(Durability::Disk));
        assert!(disk.contains("sync_interval: always"));
    }

    #[test]
    fn linked_server_has_its_domain_and_a_leaf_remote_to_the_hub() {
        let text = nats_server_config(&NatsServerSpec {
            store_dir: "/tmp/js".into(),
            port: 4333,
            durability: Durability::Process,
            server_name: "meridian-eu".into(),
            domain: "eu".into(),
            leaf_remotes: vec![LeafRemote {
                url: "nats-leaf://eu:pw@127.0.0.1:7902".into(),
            }],
        });
        assert!(text.contains("  domain: \"eu\"\n"), "{text}");
        assert!(
            text.contains("remotes = [\n    { url: \"nats-leaf://eu:pw@127.0.0.1:7902\" }\n  ]"),
            "{text}"
        );
        let hub = nats_hub_config(&HubSpec {
            server_name: "hub".into(),
            port: 7900,
            leaf_port: 7902,
            leaf_users: vec![("eu".into(), "p\"w".into()), ("us".into(), "x".into())],
        });
        assert!(!hub.contains("jetstream"), "{hub}");
        assert!(hub.contains("  port: 7902\n"), "{hub}");
        assert!(hub.contains("  no_advertise: true\n"), "{hub}");
        assert!(
            hub.contains("      { user: \"eu\", password: \"p\\\"w\" }\n"),
            "{hub}"
        );
    }

    #[test]
    fn domain_and_mirrors_are_validated() {
        let field = |c: BusConfig| match c.validate() {
            Err(BusError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        let mut c = cfg();
        assert_eq!(c.domain(), "us-east-1");
        assert_eq!(c.domain_api(&RegionId::parse("eu").unwrap()), "$JS.eu.API");
        c.domain = Some("a.b".into());
        assert_eq!(field(c), "domain");
        let mut c = cfg();
        c.domain = Some(String::new());
        assert_eq!(field(c), "domain");
        let mut c = cfg();
        c.mirrors = vec![c.region.clone()];
        assert_eq!(field(c), "mirrors");
        let mut c = cfg();
        let eu = RegionId::parse("eu").unwrap();
        c.mirrors = vec![eu.clone(), eu.clone()];
        assert_eq!(field(c), "mirrors");
        let mut c = cfg();
        c.mirrors = vec![eu, RegionId::parse("ap").unwrap()];
        c.domain = Some("us_1".into());
        c.validate().unwrap();
        let back: BusConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.mirrors, c.mirrors);
        assert_eq!(back.domain(), "us_1");
    }
}
