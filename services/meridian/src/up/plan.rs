//! Where everything goes: ports, directories, generated files and the nats-server binary,
//! all checked before anything starts.

use super::*;

/// Where everything goes, checked before anything starts.
pub(super) struct Layout {
    pub(super) data_dir: PathBuf,
    pub(super) regions: Vec<Arc<RegionPlan>>,
    /// With two or more regions: the hub their nats-servers are leafnodes of.
    pub(super) hub: Option<Arc<HubPlan>>,
    /// The operator control API's port: `+2` of the block after the last region's.
    pub(super) control_port: u16,
}

pub(super) struct RegionPlan {
    pub(super) region: RegionId,
    pub(super) dir: PathBuf,
    pub(super) nats_port: u16,
    pub(super) gateway_port: u16,
    /// The other regions: this one mirrors and applies their streams.
    pub(super) mirrors: Vec<RegionId>,
    /// Where the region's WAN link proxy listens (its leafnode remote dials it); `None`
    /// with one region.
    pub(super) link_port: Option<u16>,
    /// The region's durability level (nats.conf's fsync setting, `gateway.durability`).
    pub(super) durability: Durability,
}

/// The hub: a nats-server without JetStream that the regions' servers are leafnodes of.
pub(super) struct HubPlan {
    pub(super) dir: PathBuf,
    pub(super) port: u16,
    pub(super) leaf_port: u16,
}

/// The login a region's nats-server uses on the hub's leafnode port; new every start.
pub(super) struct LeafLogin {
    pub(super) user: String,
    pub(super) password: String,
}

impl LeafLogin {
    pub(super) fn generate(region: &RegionId) -> LeafLogin {
        use rand::RngCore as _;
        let mut password = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut password);
        LeafLogin {
            user: format!("leaf-{region}"),
            // Hex: it goes into a URL unescaped.
            password: hex::encode(password),
        }
    }
}

impl Layout {
    pub(super) fn new(opts: &UpOptions) -> Result<Layout, UpError> {
        let invalid = |option, reason: String| Err(UpError::Invalid { option, reason });
        if opts.regions.is_empty() {
            return invalid("--regions", "name at least one region".into());
        }
        for (i, r) in opts.regions.iter().enumerate() {
            if opts.regions[..i].contains(r) {
                return invalid("--regions", format!("{r} is listed twice"));
            }
        }
        if opts.admin_key.chars().count() < MIN_ADMIN_KEY {
            return invalid(
                "--admin-key",
                format!(
                    "must be at least {MIN_ADMIN_KEY} characters (got {}); admin calls carry it \
                     in X-Admin-Key",
                    opts.admin_key.chars().count()
                ),
            );
        }
        if opts.durability == Durability::Geo && opts.regions.len() < 2 {
            return invalid(
                "--durability",
                "geo needs another region to hold a copy: run two or more --regions".into(),
            );
        }
        let linked = opts.regions.len() > 1;
        if !linked && opts.wan != WanOptions::default() {
            return invalid(
                "--wan-delay",
                "--wan-delay, --wan-jitter and --wan-loss shape the links between regions; \
                 name two or more with --regions"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&opts.wan.loss) {
            return invalid(
                "--wan-loss",
                format!("{} is not a probability in 0.0..=1.0", opts.wan.loss),
            );
        }
        // The block after the regions' holds the hub (with two or more) and the control API.
        let blocks = u32::try_from(opts.regions.len() + 1).unwrap_or(u32::MAX);
        let last_port = u32::from(opts.port_base) + u32::from(PORTS_PER_REGION) * blocks - 1;
        if opts.port_base < 1024 || last_port > u32::from(u16::MAX) {
            return invalid(
                "--port-base",
                format!(
                    "{} regions need ports {}..={last_port}, which must lie in 1024..=65535",
                    opts.regions.len(),
                    opts.port_base
                ),
            );
        }
        create_private_dir(&opts.data_dir)?;
        // Absolute, so the region processes find their store whatever their cwd.
        let data_dir = opts
            .data_dir
            .canonicalize()
            .map_err(io_err(format!("cannot resolve {}", opts.data_dir.display())))?;
        // The store URL ends its path at '?' (options follow), and the nats config quotes
        // paths, so only '?' is a problem.
        if data_dir.to_string_lossy().contains('?') {
            return invalid(
                "--data-dir",
                format!("{} must not contain '?'", data_dir.display()),
            );
        }
        let regions = opts
            .regions
            .iter()
            .enumerate()
            .map(|(i, region)| {
                let base = opts.port_base + PORTS_PER_REGION * i as u16;
                let mirrors: Vec<RegionId> = opts.regions.iter().filter(|r| *r != region).cloned().collect();
                Arc::new(RegionPlan {
                    region: region.clone(),
                    dir: data_dir.join(region.as_str()),
                    nats_port: base,
                    gateway_port: base + 1,
                    link_port: linked.then_some(base + 2),
                    mirrors,
                    durability: opts.durability,
                })
            })
            .collect();
        let after_regions = opts.port_base + PORTS_PER_REGION * opts.regions.len() as u16;
        let hub = linked.then(|| {
            Arc::new(HubPlan {
                dir: data_dir.join("hub"),
                port: after_regions,
                leaf_port: after_regions + 1,
            })
        });
        Ok(Layout {
            data_dir,
            regions,
            hub,
            control_port: after_regions + 2,
        })
    }
}

impl HubPlan {
    pub(super) fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
    pub(super) fn conf(&self) -> PathBuf {
        self.dir.join("nats.conf")
    }
    pub(super) fn log(&self) -> PathBuf {
        self.dir.join("nats.log")
    }

    /// Writes the hub's nats.conf: a leafnode listener accepting each region's login.
    pub(super) fn write_conf(&self, logins: &[LeafLogin]) -> Result<(), UpError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(io_err(format!("cannot create {}", self.dir.display())))?;
        let conf = nats_hub_config(&HubSpec {
            server_name: "meridian-hub".into(),
            port: self.port,
            leaf_port: self.leaf_port,
            leaf_users: logins
                .iter()
                .map(|l| (l.user.clone(), l.password.clone()))
                .collect(),
        });
        // 0600: it holds the leaf passwords.
        write_file(&self.conf(), conf.as_bytes(), 0o600)
    }
}

impl RegionPlan {
    pub(super) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }
    pub(super) fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.nats_port)
    }
    pub(super) fn nats_conf(&self) -> PathBuf {
        self.dir.join("nats.conf")
    }
    pub(super) fn nats_log(&self) -> PathBuf {
        self.dir.join("nats.log")
    }
    pub(super) fn region_toml(&self) -> PathBuf {
        self.dir.join("region.toml")
    }
    pub(super) fn region_log(&self) -> PathBuf {
        self.dir.join("region.log")
    }
    /// The nkey seed the region process logs in to its nats-server with.
    pub(super) fn nats_seed(&self) -> PathBuf {
        self.dir.join("nats-region.nk")
    }

    /// Writes nats.conf, the NATS credentials and region.toml, regenerated on every start so
    /// a changed port base or key takes effect (and a new nkey each run: the old seed opens
    /// nothing once the server has the new configuration); the data directories they point
    /// at are kept. `leaf` is the login on the hub, used when the region is linked. Returns
    /// the region file as the region process will load it.
    pub(super) fn write_files(
        &self,
        jwt_secret: &str,
        admin_key: &str,
        endpoints: &BTreeMap<String, String>,
        leaf: &LeafLogin,
    ) -> Result<RegionConfig, UpError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(io_err(format!("cannot create {}", self.dir.display())))?;
        // The one process per region runs every role, so it logs in as the region user;
        // nats-server accepts no one else.
        // Its permissions cover the mirrors it creates and reads the health of.
        let creds = RoleCredentials::generate_with_mirrors(BusRole::Region, "", &self.region, &self.mirrors);
        write_file(&self.nats_seed(), creds.seed.as_bytes(), 0o600)?;
        let leaf_remotes = self
            .link_port
            .map(|port| LeafRemote {
                url: format!("nats-leaf://{}:{}@127.0.0.1:{port}", leaf.user, leaf.password),
            })
            .into_iter()
            .collect();
        let mut conf = nats_server_config(&NatsServerSpec {
            store_dir: self.dir.join("jetstream"),
            port: self.nats_port,
            durability: self.durability,
            server_name: format!("meridian-{}", self.region),
            // The JetStream domain other regions' mirrors address: the region id.
            domain: self.region.to_string(),
            leaf_remotes,
        });
        conf.push_str(&nats_server_auth_config(std::slice::from_ref(&creds.user), None));
        // Public keys and this run's leaf password: nobody else needs to read it.
        write_file(&self.nats_conf(), conf.as_bytes(), 0o600)?;

        let mut gateway = toml::Table::new();
        gateway.insert("listen".into(), format!("127.0.0.1:{}", self.gateway_port).into());
        gateway.insert("jwt_secret".into(), jwt_secret.into());
        gateway.insert("admin_key".into(), admin_key.into());
        gateway.insert("durability".into(), self.durability.as_str().into());
        let endpoints: toml::Table = endpoints
            .iter()
            .map(|(r, e)| (r.clone(), toml::Value::from(e.as_str())))
            .collect();
        gateway.insert("region_endpoints".into(), endpoints.into());
        let mut bus = toml::Table::new();
        bus.insert("nats_url".into(), self.nats_url().into());
        bus.insert("role".into(), creds.role.as_str().into());
        bus.insert(
            "nkey_seed_file".into(),
            self.nats_seed().display().to_string().into(),
        );
        if !self.mirrors.is_empty() {
            bus.insert("domain".into(), self.region.as_str().into());
            let mirrors: Vec<toml::Value> = self.mirrors.iter().map(|r| r.as_str().into()).collect();
            bus.insert("mirrors".into(), mirrors.into());
        }
        let mut doc = toml::Table::new();
        doc.insert("region".into(), self.region.as_str().into());
        let store = format!("embedded://{}", self.dir.join("store").display());
        doc.insert("store".into(), store.into());
        doc.insert("bus".into(), bus.into());
        doc.insert("gateway".into(), gateway.into());
        // Every applier field at its default; listed so the file shows where to tune it.
        doc.insert("applier".into(), toml::Table::new().into());
        // The console lists the drill runs `meridian drill --cluster` writes here (its default
        // --out for this deployment).
        if let Some(data_dir) = self.dir.parent() {
            let mut console = toml::Table::new();
            console.insert(
                "drills_dir".into(),
                data_dir.join("drills").display().to_string().into(),
            );
            doc.insert("console".into(), console.into());
        }
        let body = toml::to_string(&doc).map_err(|e| UpError::Invalid {
            option: "region file",
            reason: e.to_string(),
        })?;
        let text = format!(
            "# Written by `meridian up` at every start; edit the flags, not this file.\n\
             # Run by hand with: meridian region --config {}\n{body}",
            self.region_toml().display()
        );
        let path = self.region_toml();
        // Checked here so a bad flag fails in the launcher with the field named, instead of
        // as a crash loop of the region process.
        let cfg =
            RegionConfig::from_toml(&text, &path.display().to_string(), Vec::new()).map_err(|source| {
                UpError::Config {
                    path: path.display().to_string(),
                    source,
                }
            })?;
        write_file(&path, text.as_bytes(), 0o600)?;
        Ok(cfg)
    }
}

/// Writes `path` (via a temporary file and a rename, so no reader sees half of it) with
/// `mode` permissions from the start.
pub(super) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), UpError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(io_err(format!("cannot write {}", path.display())))
}

pub(super) fn check_port_free(port: u16, what: &str, owner: &str) -> Result<(), UpError> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| UpError::Invalid {
            option: "--port-base",
            reason: format!(
                "port {port} ({what} of {owner}) is not free: {e}; is another `meridian up` \
                 running? Stop it or choose another --port-base"
            ),
        })
}

/// Finds nats-server: the flag, then `$MERIDIAN_NATS_SERVER`, then `.tools/bin/nats-server`
/// in an ancestor of the executable (`target/{debug,release}/meridian` sits two levels under
/// the repository) or of the working directory.
pub fn resolve_nats_server(flag: Option<&Path>) -> Result<PathBuf, UpError> {
    let named = flag.map(|p| (p.to_path_buf(), "--nats-server")).or_else(|| {
        std::env::var_os("MERIDIAN_NATS_SERVER")
            .filter(|v| !v.is_empty())
            .map(|v| (PathBuf::from(v), "MERIDIAN_NATS_SERVER"))
    });
    if let Some((path, source)) = named {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(UpError::NatsMissing {
                tried: format!("{source} names {}, which is not a file", path.display()),
            })
        };
    }
    let mut starts = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    let mut tried = Vec::new();
    for start in &starts {
        for dir in start.ancestors().skip(1) {
            let candidate = dir.join(".tools/bin/nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
            if dir.join("Cargo.toml").is_file() && dir.join("deploy").is_dir() {
                // The repository root: looking further up would find someone else's.
                tried.push(candidate.display().to_string());
                break;
            }
        }
    }
    if tried.is_empty() {
        tried.push("no repository with .tools/bin/nats-server above the executable or cwd".into());
    }
    Err(UpError::NatsMissing {
        tried: tried.join(", "),
    })
}

/// Creates the data dir (and missing parents) with mode 0700: it holds the keys, the NATS
/// credentials and every message. An existing empty one (`mkdir`, a temporary directory) is
/// made 0700 as if created here. An existing one with contents that other users can enter
/// is refused rather than changed: it may be a directory they were meant to share (or
/// `/tmp`), and what it already holds may have been read.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), UpError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    match std::fs::metadata(dir) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            let empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
            if mode & 0o077 != 0 && empty {
                return std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(format!("cannot make {} private (0700)", dir.display())));
            }
            if mode & 0o077 != 0 {
                return Err(UpError::Invalid {
                    option: "--data-dir",
                    reason: format!(
                        "{} is open to other users (mode {mode:04o}), and it holds the keys and \
                         every message; run `chmod 700 {}` or choose a new directory",
                        dir.display(),
                        dir.display()
                    ),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(format!("cannot create {}", dir.display()))),
        Err(e) => Err(io_err(format!("cannot read {}", dir.display()))(e)),
    }
}

/// Reads the HS256 key, or makes one: it must outlive runs so issued tokens stay valid. A
/// key file others can read is refused, not fixed: anyone who read it can mint tokens for
/// every user, so the operator must decide whether to rotate it, and a silent chmod would
/// hide that it was ever exposed.
pub(super) fn load_or_create_jwt_secret(path: &Path) -> Result<String, UpError> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(UpError::Invalid {
                    option: "jwt_secret",
                    reason: format!(
                        "{} is readable or writable by other users (mode {mode:04o}); it must be \
                         0600. Run `chmod 600 {}`, or, if others may have read it, delete it to \
                         have a new key generated (tokens issued with the old one stop working)",
                        path.display(),
                        path.display()
                    ),
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("cannot read {}", path.display()))(e)),
    }
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let s = s.trim().to_string();
            if s.len() < 32 {
                return Err(UpError::Invalid {
                    option: "jwt_secret",
                    reason: format!(
                        "{} holds fewer than 32 characters; delete it to have a new key generated \
                         (tokens issued with the old one stop working)",
                        path.display()
                    ),
                });
            }
            Ok(s)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            use rand::RngCore as _;
            let mut key = [0u8; JWT_SECRET_BYTES];
            rand::rngs::OsRng.fill_bytes(&mut key);
            let secret = hex::encode(key);
            write_file(path, format!("{secret}\n").as_bytes(), 0o600)?;
            Ok(secret)
        }
        Err(e) => Err(io_err(format!("cannot read {}", path.display()))(e)),
    }
}
