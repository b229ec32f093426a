//! `meridian nats-auth`: the NATS users of a production region, for its nats-server (issue 8,
//! item 7). One nkey seed per role (gateway, applier, region for both), each in a 0600 file
//! that a process names as `bus.nkey_seed_file`, and the server's `authorization` block
//! (public keys and each role's subject permissions), plus a `tls` block when certificates
//! are given, to `include` from the server's configuration. `meridian up` makes the same for
//! its local servers on every start.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use meridian_bus::{nats_server_auth_config, BusRole, RoleCredentials, ServerTls};
use meridian_model::RegionId;

#[derive(Debug, thiserror::Error)]
pub enum NatsAuthError {
    #[error(
        "{0} exists: remove the region's old files to make new credentials (processes using \
         the old seeds are then refused once the server has the new block)"
    )]
    Exists(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Writes `<region>-{gateway,applier,region}.nk` and `<region>-auth.conf` into `out`
/// (created 0700) and returns their paths. `mirrors` are the regions whose streams this
/// region mirrors (the region file's `bus.mirrors`): the applier may manage exactly those
/// mirror streams and the gateway read their state. Refuses to overwrite: replacing
/// credentials is a rotation the operator should mean.
pub fn write(
    region: &RegionId,
    mirrors: &[RegionId],
    out: &Path,
    tls: Option<&ServerTls>,
) -> Result<Vec<PathBuf>, NatsAuthError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| NatsAuthError::Io { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(io(out))?;
    let conf_path = out.join(format!("{region}-auth.conf"));
    let creds: Vec<RoleCredentials> = BusRole::ALL
        .iter()
        .map(|&role| RoleCredentials::generate_with_mirrors(role, "", region, mirrors))
        .collect();
    let mut files: Vec<(PathBuf, String)> = creds
        .iter()
        .map(|c| {
            let path = out.join(format!("{region}-{}.nk", c.role.as_str()));
            (path, format!("{}\n", c.seed))
        })
        .collect();
    let users: Vec<_> = creds.iter().map(|c| c.user.clone()).collect();
    let conf = format!(
        "# Written by `meridian nats-auth --region {region}`: the users of region {region}'s \
         NATS servers.\n# Include it from the server's configuration: include \"{}\"\n{}",
        conf_path.display(),
        nats_server_auth_config(&users, tls)
    );
    files.push((conf_path, conf));
    if let Some((path, _)) = files.iter().find(|(p, _)| p.exists()) {
        return Err(NatsAuthError::Exists(path.display().to_string()));
    }
    for (path, text) in &files {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        f.write_all(text.as_bytes()).map_err(io(path))?;
    }
    Ok(files.into_iter().map(|(p, _)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_seed_per_role_and_the_servers_users_once() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nats");
        let region = RegionId::parse("us").unwrap();
        let tls = ServerTls {
            cert_file: "/etc/nats/server.pem".into(),
            key_file: "/etc/nats/server.key".into(),
            ca_file: None,
        };
        let mirrors = [RegionId::parse("eu").unwrap(), RegionId::parse("ap").unwrap()];
        let files = write(&region, &mirrors, &out, Some(&tls)).unwrap();
        assert_eq!(files.len(), 4);
        let conf = std::fs::read_to_string(out.join("us-auth.conf")).unwrap();
        // The gateway may read each mirror's state, for /readyz and /v1/admin/regions.
        for m in ["SYNC_EU", "SYNC_AP"] {
            assert!(conf.contains(&format!("$JS.API.STREAM.INFO.{m}")), "{m}: {conf}");
        }
        assert!(conf.contains("cert_file: \"/etc/nats/server.pem\""), "{conf}");
        for role in BusRole::ALL {
            let seed_file = out.join(format!("us-{}.nk", role.as_str()));
            let mode = std::fs::metadata(&seed_file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            // Each seed logs in as a user the block lists, with that role's permissions.
            let mut bus = meridian_bus::BusConfig::new("nats://127.0.0.1:4222", region.clone());
            bus.nkey_seed_file = Some(seed_file.clone());
            bus.validate().unwrap();
            let seed = std::fs::read_to_string(&seed_file).unwrap();
            assert!(!conf.contains(seed.trim()));
            let public = nkeys::KeyPair::from_seed(seed.trim()).unwrap().public_key();
            assert!(conf.contains(&public), "{role:?}");
        }
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let again = write(&region, &mirrors, &out, None).unwrap_err().to_string();
        assert!(
            again.contains("us-gateway.nk") && again.contains("exists"),
            "{again}"
        );
    }
}
